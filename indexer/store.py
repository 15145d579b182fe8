"""Writer and on-disk format: one index directory of immutable segments and one catalog written in place.

    IDX/lock                 flock held by the single writer
    IDX/catalog.sqlite       SQLite in WAL mode, written in place, one transaction per commit:
                             photos, labels, objects, segmented, meta (what the photos are);
                             vec / objvec (photo id -> the segment holding its live vectors);
                             commits (generation -> manifest JSON: settings and the live segments)
    IDX/seg-000007/          the vectors added by commit 7, never modified once named
        global.faiss         CLS vectors, id = photo id
        patches.faiss        patch vectors, id = photo id * h*w + row*w + col
        objects.faiss        SAM object crops' CLS vectors, id = photo id * 256 + rank (catalog table objects)
    IDX/seg-stage-*.tmp/     a segment a Ray worker wrote for the live writer (write_staged_segment); its next commit
                             renames it to its number (Writer.adopt); any other writer's is a leftover, removed

A commit writes the vectors added since the last one as a new segment (``seg-N.tmp``, fsynced, renamed), then
commits the catalog's transaction, which also inserts the new manifest: that transaction is the atomic switch.
A vector whose photo's ``vec`` row names another segment (or none) is a tombstone, masked at search time.
A kill before the transaction leaves an unnamed segment (removed by the next writer), never a half state.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from indexer.errors import ConfigError, IndexBusy, IndexFormatError, IndexWriteError, ModelMismatch
from indexer.segments import Part, SegmentedIndex

if TYPE_CHECKING:
    from indexer.embedder import Embedder
    from indexer.reader import PhotoMeta

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: whole snapshots (snap-N/ + CURRENT), converted in place by the next writer
GLOBAL_FILE, PATCH_FILE, CATALOG_FILE, MANIFEST_FILE = "global.faiss", "patches.faiss", "catalog.sqlite", "manifest.json"
OBJECT_FILE = "objects.faiss"
MAX_OBJECTS = 256  # per photo; object id = photo id * MAX_OBJECTS + rank

SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id        INTEGER PRIMARY KEY,
    path      BLOB NOT NULL UNIQUE,      -- os.fsencode(absolute path): any file name survives
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    hash      TEXT,                      -- blake2b-128 of the file's bytes
    width     INTEGER,
    height    INTEGER,
    status    TEXT NOT NULL CHECK (status IN ('indexed', 'failed')),
    error     TEXT,
    updated   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_status ON photos(status);
CREATE TABLE IF NOT EXISTS labels (         -- class tags: the classifier's top-k per photo
    photo_id  INTEGER NOT NULL,
    rank      INTEGER NOT NULL,
    label     TEXT NOT NULL,
    prob      REAL NOT NULL,
    PRIMARY KEY (photo_id, rank)
);
CREATE INDEX IF NOT EXISTS labels_label ON labels(label);
CREATE TABLE IF NOT EXISTS objects (        -- SAM objects; the vector of each is in objects.faiss under its id
    id        INTEGER PRIMARY KEY,          -- photo id * 256 + rank (best first)
    photo_id  INTEGER NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL,  -- box in the photo's own pixels
    score     REAL NOT NULL,                -- SAM's predicted IoU
    mask      TEXT NOT NULL                 -- COCO-style RLE (JSON) at the size SAM's masks were made
);
CREATE INDEX IF NOT EXISTS objects_photo ON objects(photo_id);
CREATE TABLE IF NOT EXISTS segmented (      -- photos SAM has looked at (also those where it found nothing)
    photo_id  INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS meta (           -- what a photo's header says (reader.photo_meta); NULL = unknown
    photo_id     INTEGER PRIMARY KEY,
    taken        TEXT,                      -- ISO 8601 local time, no zone: '2021-06-30T14:05:09'
    taken_source TEXT,                      -- 'DateTimeOriginal', 'DateTime' or 'mtime'
    make         TEXT,
    model        TEXT,
    lat          REAL,                      -- degrees, north positive
    lon          REAL,                      -- degrees, east positive
    orientation  INTEGER,                   -- EXIF 1..8
    folder       BLOB NOT NULL              -- os.fsencode of the photo's folder (absolute)
);
CREATE INDEX IF NOT EXISTS meta_taken ON meta(taken);
CREATE INDEX IF NOT EXISTS meta_folder ON meta(folder);
CREATE TABLE IF NOT EXISTS vec (            -- where a photo's live global and patch vectors are
    photo_id  INTEGER PRIMARY KEY,
    seg       INTEGER NOT NULL              -- seg-NNNNNN
);
CREATE INDEX IF NOT EXISTS vec_seg ON vec(seg);
CREATE TABLE IF NOT EXISTS objvec (         -- where a photo's live object vectors are
    photo_id  INTEGER PRIMARY KEY,
    seg       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS objvec_seg ON objvec(seg);
CREATE TABLE IF NOT EXISTS commits (        -- the newest row is the live manifest; older rows are kept one commit
    gen       INTEGER PRIMARY KEY,
    manifest  TEXT NOT NULL,
    time      REAL NOT NULL
);
"""

KIND_FILES = {"global": GLOBAL_FILE, "patches": PATCH_FILE, "objects": OBJECT_FILE}
KIND_FIELD = {"global": "global_kind", "patches": "patch_kind", "objects": "object_kind"}  # the manifest's kind of fresh segments


@dataclass
class Manifest:
    """Everything needed to query an index the way it was built."""

    model: str
    model_type: str
    revision: str | None
    dim: int
    patch_size: int
    num_registers: int
    resolution: int
    grid: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str
    fingerprint: list[float]  # CLS of a fixed synthetic photo (see Embedder.fingerprint)
    global_kind: str = "Flat"
    patch_kind: str = "SQ8"
    kinds_forced: tuple[str | None, str | None] = (None, None)
    next_id: int = 1
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)  # format 1 only (its snapshot's files)
    gen: int = 0  # the commit that wrote this manifest
    segments: list[dict] = field(default_factory=list)  # live segments: {seg, kinds: {kind: factory}, files: {name: digest}}
    classifier: str | None = None  # the model that made the labels, if any
    segmenter: dict | None = None  # the SAM model and settings that made the objects, if any
    store: str | None = None  # URI of an external vector store (Milvus) that also holds the vectors and serves them
    object_kind: str = "Flat"
    not_images: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> extension -> files its last scan passed over
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @classmethod
    def load(cls, path: Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> Manifest:
        """A format-1 snapshot's manifest.json (read only to convert it)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise IndexFormatError(f"{path} is missing: not a dinosearch index") from None
        except OSError as e:
            raise IndexFormatError(f"{path} is unreadable: {e}") from None
        return cls.from_json(text, str(path), versions=versions)

    @classmethod
    def from_json(cls, text: str, where: str, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise IndexFormatError(f"{where} is unreadable: {e}") from None
        if data.get("format_version") not in versions:
            raise IndexFormatError(
                f"{where}: index format {data.get('format_version')!r}, this dinosearch reads format {FORMAT_VERSION}; rebuild the index"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise IndexFormatError(f"{where}: malformed manifest ({e})") from None

    @classmethod
    def load_current(cls, root: str | os.PathLike) -> Manifest:
        """The live manifest of an index directory (a format-1 index's too: the writer converts it)."""
        root = Path(root).expanduser()
        old = _format1_snapshot(root)
        if old is not None:
            return cls.load(old / MANIFEST_FILE, versions=(1,))
        snap = Snapshot.open(root)
        snap.close()
        return snap.manifest

    @classmethod
    def for_embedder(cls, e: Embedder, *, global_kind: str | None = None, patch_kind: str | None = None) -> Manifest:
        return cls(
            model=e.config.model, model_type=e.model_type, revision=e.config.revision, dim=e.dim,
            patch_size=e.patch_size, num_registers=e.num_registers, resolution=e.config.resolution,
            grid=e.grid, mean=e.mean, std=e.std, precision=e.precision,
            fingerprint=[round(float(v), 6) for v in e.fingerprint()],
            global_kind=global_kind or choose_kind(0, e.dim, patches=False),
            patch_kind=patch_kind or choose_kind(0, e.dim, patches=True),
            kinds_forced=(global_kind, patch_kind),
        )

    def check(self, e: Embedder) -> None:
        """Raise ModelMismatch unless ``e`` embeds exactly like the model that built this index."""
        built = f"{self.model} ({self.model_type}, dim {self.dim}, patch {self.patch_size}, {self.resolution}px)"
        given = f"{e.config.model} ({e.model_type}, dim {e.dim}, patch {e.patch_size}, {e.config.resolution}px)"
        if (self.model_type, self.dim, self.patch_size, self.resolution) != (e.model_type, e.dim, e.patch_size, e.config.resolution):
            raise ModelMismatch(f"index was built with {built} but the model given is {given}; use the same --model or a new --index")
        ref = np.asarray(self.fingerprint, np.float32)
        cos = float(ref @ e.fingerprint() / (np.linalg.norm(ref) + 1e-12))
        if cos < 0.99:
            raise ModelMismatch(
                f"index was built with {self.model} but {e.config.model} embeds differently (fingerprint cosine {cos:.3f}): "
                f"other weights or preprocessing; use the model that built the index or a new --index"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def not_images_total(self) -> dict[str, int]:
        """Files passed over as not photos, by extension, over the indexed folders (one inside another counted once)."""
        roots = [r for r in self.not_images if not any(r.startswith(o.rstrip(os.sep) + os.sep) for o in self.not_images)]
        total: dict[str, int] = {}
        for r in roots:
            for ext, n in self.not_images[r].items():
                total[ext] = total.get(ext, 0) + n
        return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------- index kinds

GLOBAL_FLAT_MAX = 200_000  # exact search below this many photos
PATCH_SQ8_MAX = 65_536  # 8-bit scalar quantized, scanned whole, below this many patch vectors (~256 photos)
PATCH_IVF_SQ8_MAX = 600_000  # then IVF over SQ8 codes; above, IVF over PQ codes (56 bytes a patch at d=384)


def choose_kind(n: int, dim: int, *, patches: bool) -> str:
    """FAISS factory string for n vectors: exact/SQ8 while small, IVF above (nlist ~ sqrt(n), a power of 2)."""
    nlist = 1 << max(4, round(math.log2(math.sqrt(max(n, 1)))))
    if patches:
        if n <= PATCH_SQ8_MAX:
            return "SQ8"
        if n <= PATCH_IVF_SQ8_MAX:
            return f"IVF{nlist},SQ8"
        return f"IVF{nlist},PQ{dim // 8}"
    if n <= GLOBAL_FLAT_MAX:
        return "Flat"
    return f"IVF{nlist},Flat"


HNSW_M = 32  # neighbours per HNSW node (FAISS's usual default)


def seal_kind(n: int, dim: int, kind: str) -> str:
    """FAISS factory string of a sealed (compacted) segment of n vectors of ``kind`` (global, patches, objects):
    global and object vectors exact while small, then HNSW (never removed from: deletes are tombstones);
    patches by choose_kind, so an IVF's list count grows with the data at each compaction."""
    if kind == "patches":
        return choose_kind(n, dim, patches=True)
    return "Flat" if n <= GLOBAL_FLAT_MAX else f"HNSW{HNSW_M}"


def check_kind(kind: str) -> None:
    """Refuse a FAISS factory string that does not parse or cannot delete vectors (HNSW, NSG): the indexer
    replaces changed photos and removes deleted ones, so such a kind would fail on the first later run."""
    try:
        index = faiss.IndexIDMap2(faiss.index_factory(64, kind, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError as e:
        raise ConfigError(f"bad FAISS index kind {kind!r}: {str(e).strip().splitlines()[-1]}") from None
    try:
        index.remove_ids(faiss.IDSelectorBatch(np.zeros(1, np.int64)))
    except RuntimeError:
        raise ConfigError(f"index kind {kind!r} cannot delete vectors (FAISS has no remove_ids for it), and a re-run "
                          f"deletes changed and removed photos: use Flat, SQ8, IVFn,Flat, IVFn,SQ8 or IVFn,PQm") from None


def make_index(kind: str, dim: int, train: np.ndarray | None) -> faiss.Index:
    """An empty ID-mapped inner-product index of ``kind``, trained on ``train`` if it needs it."""
    try:
        inner = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"bad FAISS index kind {kind!r}: {str(e).splitlines()[0]}") from None
    if isinstance(inner, faiss.IndexScalarQuantizer):
        inner.sq.rangestat = faiss.ScalarQuantizer.RS_minmax
        inner.sq.rangestat_arg = 0.2  # headroom beyond the training range for later photos
    if not inner.is_trained:
        if train is None or len(train) == 0:
            raise ConfigError(f"index kind {kind!r} needs training vectors")
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            # faiss-gpu: train the coarse k-means on the GPUs; the index itself stays a CPU index on disk
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        try:
            inner.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as e:
            raise ConfigError(f"cannot train index kind {kind!r} on {len(train)} vectors ({str(e).strip().splitlines()[-1][:160]}); "
                              f"use a smaller IVF list count, or leave the kind to dinosearch") from None
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(inner.nlist, 32)
        return inner  # IVF carries ids itself
    return faiss.IndexIDMap2(inner)


def index_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an index made by make_index (the live ones of a SegmentedIndex)."""
    if isinstance(index, SegmentedIndex):
        return index.ids()
    if isinstance(index, faiss.IndexIDMap2) or isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    out = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy() for i in range(ivf.nlist) if invlists.list_size(i)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def reconstruct_all(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of everything in the index (exact for Flat, decoded for compressed kinds)."""
    ids = index_ids(index)
    if len(ids) == 0:
        return ids, np.zeros((0, index.d), np.float32)
    if isinstance(index, SegmentedIndex):
        return ids, index.reconstruct_batch(ids)
    if isinstance(index, faiss.IndexIVF):
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        xb = index.reconstruct_batch(ids)
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        return ids, xb
    return ids, index.index.reconstruct_n(0, index.ntotal)


def on_disk_lists(index: faiss.Index):
    """The OnDiskInvertedLists of an IVF index merged by build-index, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    il = faiss.downcast_InvertedLists(ivf.invlists)
    return il if isinstance(il, faiss.OnDiskInvertedLists) else None


@contextlib.contextmanager
def _stdout_to_stderr():
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_index_mapped(path: Path) -> faiss.Index:
    """Read an index with flat codes memory-mapped (Flat, SQ, PQ storage): its vectors need not fit in RAM."""
    if not path.is_file():
        raise IndexFormatError(f"{path} is missing")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return read_index(path)  # kinds FAISS cannot map (IVF with lists in memory): read whole


def read_index(path: Path, *, mmap: bool = False) -> faiss.Index:
    if not path.is_file():
        raise IndexFormatError(f"{path} is missing")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            if not path.with_suffix(".ivfdata").is_file():
                raise
            # build-index's .ivfdata lies beside its index file; the directory moved since: look for it there
            # (FAISS says so on stdout, which belongs to the CLI's output: sent to stderr meanwhile)
            with _stdout_to_stderr():
                index = faiss.read_index(str(path), flags | faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:
        raise IndexFormatError(f"{path} is corrupt or truncated: {str(e).splitlines()[0][:200]}") from None
    except MemoryError:  # a damaged header can ask for any size; under a memory limit FAISS says std::bad_alloc
        raise IndexFormatError(f"{path} is corrupt or truncated: reading it asks for more memory than this process may have "
                               f"(a damaged header?)") from None
    return index  # read_index already returns the concrete class (downcasting again would drop ownership)


# ---------------------------------------------------------------- snapshots


def file_digest(path: Path) -> dict[str, int | str]:
    """Size and blake2b of a file, recorded in the manifest so `verify` catches any corruption."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"size": path.stat().st_size, "blake2b": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def seg_name(seg: int) -> str:
    return f"seg-{seg:06d}"


def _format1_snapshot(root: Path) -> Path | None:
    """The live snapshot of an index still in format 1 (snap-N/ + CURRENT, no root catalog), else None."""
    cur = root / "CURRENT"
    if (root / CATALOG_FILE).exists() or not cur.is_file():
        return None
    snap = root / cur.read_text().strip()
    if not snap.name.startswith("snap-") or not snap.is_dir():
        raise IndexFormatError(f"{cur} points at '{snap.name}', which is not a snapshot in {root}")
    return snap


def _connect_ro(root: Path) -> sqlite3.Connection:
    path = root / CATALOG_FILE
    # autocommit mode: the reader opens its own read transaction (BEGIN) and keeps it while it reads one commit
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)


def live_generation(root: str | os.PathLike) -> int | None:
    """The generation of an index directory's live commit; None if nothing was committed (0: a format-1 index,
    which the next writer converts)."""
    root = Path(root).expanduser()
    if _format1_snapshot(root) is not None:
        return 0
    if not (root / CATALOG_FILE).is_file():
        return None
    try:
        db = _connect_ro(root)
        try:
            row = db.execute("SELECT max(gen) FROM commits").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise IndexFormatError(f"{root / CATALOG_FILE} is not a readable catalog: {e}") from None
    return row[0] if row else None


def current_snapshot(root: Path) -> Path | None:
    """The live commit of an index as a name (IDX/gen-N; not a directory since format 2), or None."""
    gen = live_generation(root)
    return None if gen is None else Path(root) / f"gen-{gen:06d}"


@dataclass
class Snapshot:
    """A committed, read-only view of an index directory: the catalog inside one read transaction (so every
    query sees the same commit) and the segments that commit's manifest names."""

    root: Path
    manifest: Manifest
    db: sqlite3.Connection = field(repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> Snapshot:
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise IndexFormatError(f"{root} is a file, not an index directory")
        if not root.is_dir():
            raise IndexFormatError(f"no index at {root} (run `dinosearch index FOLDER --index {root}` first)")
        if _format1_snapshot(root) is not None:
            raise IndexFormatError(f"{root} is in the old snapshot format (1): run `dinosearch verify {root} --repair` (or any "
                                   f"`dinosearch index ... --index {root}`) once to convert it in place, no re-embedding")
        if not (root / CATALOG_FILE).is_file():
            raise IndexFormatError(f"{root} has no committed snapshot yet: not a dinosearch index, or its first run has not committed")
        try:
            db = _connect_ro(root)
            db.execute("BEGIN")
            row = db.execute("SELECT manifest FROM commits ORDER BY gen DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{root / CATALOG_FILE} is corrupt: {e}") from None
        if row is None:
            db.close()
            raise IndexFormatError(f"{root} has no committed snapshot yet: not a dinosearch index, or its first run has not committed")
        return cls(root, Manifest.from_json(row[0], str(root / CATALOG_FILE)), db)

    @property
    def path(self) -> Path:
        """The index directory (its catalog is ``path / catalog.sqlite``)."""
        return self.root

    @property
    def name(self) -> str:
        return f"gen-{self.manifest.gen:06d}"

    def close(self) -> None:
        self.db.close()

    def catalog(self) -> sqlite3.Connection:
        """The catalog as of this commit (read-only, inside the snapshot's read transaction)."""
        return self.db

    def segment_files(self, kind: str) -> list[tuple[int, Path]]:
        f = KIND_FILES[kind]
        return [(s["seg"], self.root / seg_name(s["seg"]) / f) for s in self.manifest.segments if f in s["files"]]

    def checked(self, seg: int, name: str) -> Path:
        """The path of one of a segment's files, after checking it against the size and checksum the manifest
        recorded at commit: a damaged file is never handed to FAISS in this process (a damaged header can make
        FAISS allocate without bound). Costs one read of the file (blake2b ~0.8 GB/s), which also warms the cache."""
        path = self.root / seg_name(seg) / name
        want = next((s["files"].get(name) for s in self.manifest.segments if s["seg"] == seg), None)
        if want is not None and path.is_file():
            if path.stat().st_size != want["size"] or file_digest(path) != want:
                raise IndexFormatError(f"{path} is corrupt or truncated: it differs from what was committed (size or checksum); "
                                       f"`dinosearch verify --repair` drops it (its photos are indexed again by the next run)")
        return path

    def _where(self, table: str) -> np.ndarray:
        rows = np.array(self.db.execute(f"SELECT photo_id, seg FROM {table}").fetchall(), np.int64).reshape(-1, 2)
        where = np.zeros(max(self.manifest.next_id, int(rows[:, 0].max(initial=0)) + 1), np.int64)
        where[rows[:, 0]] = rows[:, 1]
        return where

    def _segmented(self, kind: str, table: str, per_photo: int) -> SegmentedIndex:
        where = self._where(table)
        parts = []
        for seg, path in self.segment_files(kind):
            index = read_index_mapped(self.checked(seg, path.name))  # flat codes mapped: they need not fit in RAM
            ids = np.sort(index_ids(index))
            photo = ids // per_photo
            ok = photo < len(where)
            live = np.zeros(len(ids), bool)
            live[ok] = where[photo[ok]] == seg
            parts.append(Part(seg, index, ids, ids[~live]))
        return SegmentedIndex(parts, self.manifest.dim, per_photo, where)

    def global_index(self) -> SegmentedIndex:
        return self._segmented("global", "vec", 1)

    def patch_index(self) -> SegmentedIndex:
        return self._segmented("patches", "vec", self.manifest.grid**2)

    def object_index(self) -> SegmentedIndex:
        """SAM objects' vectors (empty when the index has none)."""
        return self._segmented("objects", "objvec", MAX_OBJECTS)


def _convert_format1(root: Path, snap: Path) -> None:
    """Convert a format-1 index in place: its snapshot's FAISS files become segment 1 (hard links, no copy), its
    catalog the root catalog. The catalog's rename is the switch; a kill before it leaves format 1 intact."""
    m = Manifest.load(snap / MANIFEST_FILE, versions=(1,))
    seg = root / seg_name(1)
    shutil.rmtree(seg, ignore_errors=True)
    seg.mkdir()
    files = {}
    for f in sorted(p.name for p in snap.iterdir() if p.suffix in (".faiss", ".ivfdata")):
        try:
            os.link(snap / f, seg / f)
        except OSError:
            shutil.copy2(snap / f, seg / f)
        if f.endswith(".faiss"):
            files[f] = m.files.get(f) or file_digest(seg / f)
    files = {f: d for f, d in files.items() if read_index(seg / f).ntotal > 0}  # empty files named nothing
    for f in seg.iterdir():
        _fsync_file(f)
    _fsync_dir(seg)
    tmp = root / (CATALOG_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{snap / CATALOG_FILE}?mode=ro", uri=True)
    db = sqlite3.connect(tmp)
    src.backup(db)
    src.close()
    db.executescript(SCHEMA)
    m.format_version, m.gen, m.files = FORMAT_VERSION, 1, {}
    m.segments = [{"seg": 1, "files": files, "kinds": {k: getattr(m, KIND_FIELD[k]) for k, f in KIND_FILES.items()
                                                       if f in files}}] if files else []
    with db:
        if GLOBAL_FILE in files:
            db.execute("INSERT INTO vec (photo_id, seg) SELECT id, 1 FROM photos WHERE status='indexed'")
        if OBJECT_FILE in files:
            db.execute("INSERT INTO objvec (photo_id, seg) SELECT DISTINCT photo_id, 1 FROM objects")
        db.execute("INSERT INTO commits (gen, manifest, time) VALUES (1, ?, ?)", (m.to_json(), time.time()))
    db.close()
    _fsync_file(tmp)
    os.replace(tmp, root / CATALOG_FILE)
    _fsync_dir(root)
    (root / "CURRENT").unlink()
    for s in root.glob("snap-*"):
        shutil.rmtree(s, ignore_errors=True)
    log.warning("converted %s in place from whole snapshots (format 1) to segments (format 2); nothing re-embedded", root)


def _create_catalog(root: Path) -> None:
    """A new, empty catalog, made beside its name and renamed into place: a reader polling a new index sees either
    no catalog or one with every table (never a file whose schema is still being written)."""
    tmp = root / (CATALOG_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    db.execute("PRAGMA journal_mode=WAL")  # kept in the file's header
    db.executescript(SCHEMA)
    db.close()  # checkpoints and removes its WAL
    _fsync_file(tmp)
    os.replace(tmp, root / CATALOG_FILE)
    _fsync_dir(root)


class Writer:
    """The single writer of an index directory: new vectors in memory until a commit writes them as a segment;
    the catalog is changed in place inside one open transaction, committed with the new manifest."""

    def __init__(self, root: str | os.PathLike, manifest: Manifest | None, *, vectors=None, load_indexes: bool = True,
                 wait: float = 0.0):
        """``manifest``: the settings of a new index (an existing one keeps its own).
        ``vectors``: an external VectorStore (indexer.vectors) kept in step with every change.
        ``load_indexes`` is accepted for compatibility: a writer never loads the committed vectors.
        ``wait``: seconds to wait for another writer to finish before IndexBusy (compaction's short swap)."""
        self.vectors = vectors
        self.root = Path(root).expanduser().absolute()
        self.staging_prefix = f"{STAGE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-"  # segments staged for this writer
        self._staged: dict[str, int] = {}  # staged folder name -> the segment number it was given
        self._to_place: list[dict] = []  # adopted staged segments the next commit names
        if self.root.exists() and not self.root.is_dir():
            raise IndexFormatError(f"{self.root} is a file, not an index directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / "lock", "a+")
        except OSError as e:
            raise IndexWriteError(f"cannot write to the index {self.root}: {e.strerror or e} (a read-only folder or disk?)",
                                  errno=e.errno) from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._lock.close()
                    raise IndexBusy(f"another dinosearch process is writing {self.root}; wait for it to finish") from None
                time.sleep(0.1)
        try:
            old = _format1_snapshot(self.root)
            if old is not None:
                _convert_format1(self.root, old)
            fresh = not (self.root / CATALOG_FILE).exists()
            if fresh:
                _create_catalog(self.root)
            self.db = sqlite3.connect(self.root / CATALOG_FILE, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns
            self.db.executescript(SCHEMA)  # tables added since the catalog was written
            row = None if fresh else self.db.execute("SELECT manifest FROM commits ORDER BY gen DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            self._unlock()
            raise IndexFormatError(f"{self.root / CATALOG_FILE} is not a readable catalog: {e}") from None
        except BaseException:
            self._unlock()
            raise
        if row is None and manifest is None:
            self.close()
            raise IndexFormatError(f"{self.root} has no committed snapshot yet: index a folder first")
        self.manifest = Manifest.from_json(row[0], str(self.root / CATALOG_FILE)) if row else manifest
        self.global_index: faiss.Index | None = None  # this commit's new vectors (the next segment)
        self.patch_index: faiss.Index | None = None
        self.object_index: faiss.Index | None = None
        self._clean()
        self.dirty = False

    @property
    def next_seg(self) -> int:
        """The segment (and generation) the next commit writes."""
        return self.manifest.gen + 1

    # -- lifecycle

    def _unlock(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def close(self) -> None:
        self.db.close()  # an uncommitted transaction is rolled back: the catalog stays as the last commit left it
        for p in self.root.glob(self.staging_prefix + "*"):  # staged for this writer, never named by a commit
            shutil.rmtree(p, ignore_errors=True)
        self._unlock()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clean(self) -> None:
        """Remove unfinished segments (a kill before the catalog's commit) and segments no manifest of the
        live or the previous commit names (readers that opened the previous commit keep their files)."""
        named = {s["seg"] for s in self.manifest.segments}
        for (text,) in self.db.execute("SELECT manifest FROM commits ORDER BY gen DESC LIMIT 2"):
            named |= {s["seg"] for s in json.loads(text).get("segments", [])}
        for p in self.root.glob("seg-*"):
            if p.name.startswith(self.staging_prefix):
                continue  # written for this writer by a worker, adopted (or not) by its next commits
            if p.name.endswith(".tmp") or int(p.name[4:10]) not in named:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob("snap-*"):  # a format-1 leftover (a kill inside the conversion's clean-up)
            shutil.rmtree(p, ignore_errors=True)


    # -- catalog

    def known(self) -> dict[str, tuple[int, int, int, str | None, str]]:
        """path -> (id, size, mtime_ns, hash, status) for every photo in the catalog."""
        rows = self.db.execute("SELECT path, id, size, mtime_ns, hash, status FROM photos")
        return {os.fsdecode(p): (i, s, m, h, st) for p, i, s, m, h, st in rows}

    def set_not_images(self, root: str, counts: dict[str, int]) -> None:
        """Record what a scan of ``root`` passed over (extension -> files); kept in the manifest at commit."""
        if self.manifest.not_images.get(root, {}) != counts:
            if counts:
                self.manifest.not_images[root] = counts
            else:
                self.manifest.not_images.pop(root)
            self.dirty = True

    def allocate_id(self) -> int:
        i = self.manifest.next_id
        self.manifest.next_id += 1
        return i

    def set_labels(self, photo_ids: list[int], labels: list[list[tuple[str, float]]]) -> None:
        """Replace the class tags of photos (top-k (label, probability), best first)."""
        self.db.executemany("DELETE FROM labels WHERE photo_id=?", [(int(i),) for i in photo_ids])
        self.db.executemany("INSERT INTO labels (photo_id, rank, label, prob) VALUES (?,?,?,?)",
                            [(int(i), r, lab, p) for i, tags in zip(photo_ids, labels) for r, (lab, p) in enumerate(tags)])
        if self.vectors is not None:
            self.vectors.set_tags(photo_ids, [[lab for lab, _ in tags] for tags in labels])
        self.dirty = True

    def unlabelled(self) -> set[int]:
        """Indexed photos with no class tags."""
        return {i for (i,) in self.db.execute(
            "SELECT id FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM labels)")}

    # -- objects

    def set_objects(self, photo_id: int, objects: list[tuple[tuple[float, float, float, float], float, dict]],
                    vectors: np.ndarray) -> None:
        """Replace a photo's SAM objects: (box in photo pixels, score, RLE mask) each, best first, with their vectors."""
        objects = objects[:MAX_OBJECTS]
        self._remove_objects([photo_id])
        ids = np.arange(len(objects), dtype=np.int64) + int(photo_id) * MAX_OBJECTS
        if len(objects):
            vectors = np.ascontiguousarray(vectors[: len(objects)], dtype=np.float32)
            if self.object_index is None:
                self.object_index = make_index("Flat", self.manifest.dim, None)
            self.object_index.add_with_ids(vectors, ids)
            self.db.execute("INSERT OR REPLACE INTO objvec (photo_id, seg) VALUES (?,?)", (int(photo_id), self.next_seg))
            if self.vectors is not None:
                self.vectors.add("objects", ids, np.full(len(ids), int(photo_id), np.int64), vectors)
            self.db.executemany(
                "INSERT INTO objects (id, photo_id, x0, y0, x1, y1, score, mask) VALUES (?,?,?,?,?,?,?,?)",
                [(int(i), int(photo_id), *map(float, box), float(score), json.dumps(rle, separators=(",", ":")))
                 for i, (box, score, rle) in zip(ids, objects)])
        self.db.execute("INSERT OR REPLACE INTO segmented (photo_id) VALUES (?)", (int(photo_id),))
        self.dirty = True

    # -- metadata

    def set_meta(self, photo_id: int, path: str, meta: PhotoMeta) -> None:
        """Replace what is known of a photo's date, camera, position (and its folder, from ``path``)."""
        self.db.execute(
            "INSERT OR REPLACE INTO meta (photo_id, taken, taken_source, make, model, lat, lon, orientation, folder) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (int(photo_id), meta.taken, meta.taken_source, meta.make, meta.model, meta.lat, meta.lon, meta.orientation,
             os.fsencode(os.path.dirname(path))))
        self.dirty = True

    def clear_meta(self, photo_ids: list[int]) -> None:
        self.db.executemany("DELETE FROM meta WHERE photo_id=?", [(int(i),) for i in photo_ids])
        self.dirty = True

    def without_meta(self) -> dict[int, tuple[str, int]]:
        """Indexed photos with no metadata row yet (an index from before metadata): id -> (path, mtime_ns)."""
        return {i: (os.fsdecode(p), m) for i, p, m in self.db.execute(
            "SELECT id, path, mtime_ns FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM meta)")}

    def unsegmented(self) -> set[int]:
        """Indexed photos SAM has not looked at yet."""
        return {i for (i,) in self.db.execute(
            "SELECT id FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM segmented)")}

    def reset_objects(self) -> None:
        """Forget every object (another SAM model or settings: all photos are segmented anew)."""
        if self.vectors is not None:
            self.vectors.clear("objects")
        self.db.execute("DELETE FROM objects")
        self.db.execute("DELETE FROM segmented")
        self.db.execute("DELETE FROM objvec")  # every object segment is dead: the next commit drops them
        self.object_index = None
        self.dirty = True

    def forget_objects(self, photo_ids: list[int]) -> None:
        """Forget photos' objects (they count as not segmented: the next run with --objects segments them again)."""
        self._remove_objects(photo_ids)
        self.dirty = True

    def _remove_objects(self, photo_ids: list[int]) -> None:
        if not photo_ids:
            return
        q = ",".join("?" * len(photo_ids))
        ids = [i for (i,) in self.db.execute(f"SELECT id FROM objects WHERE photo_id IN ({q})", [int(i) for i in photo_ids])]
        self.db.execute(f"DELETE FROM objects WHERE photo_id IN ({q})", [int(i) for i in photo_ids])
        self.db.execute(f"DELETE FROM segmented WHERE photo_id IN ({q})", [int(i) for i in photo_ids])
        self.db.execute(f"DELETE FROM objvec WHERE photo_id IN ({q})", [int(i) for i in photo_ids])  # tombstones
        if ids and self.object_index is not None:
            self.object_index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
        if ids and self.vectors is not None:
            self.vectors.remove_photos(photo_ids, kinds=("objects",))

    def record_failure(self, photo_id: int, path: str, size: int, mtime_ns: int, hash_: str | None, error: str) -> None:
        self.db.execute("DELETE FROM labels WHERE photo_id=?", (photo_id,))
        self.db.execute("DELETE FROM meta WHERE photo_id=?", (photo_id,))
        self._remove_objects([photo_id])
        self._remove_vectors([photo_id])
        self._upsert(photo_id, path, size, mtime_ns, hash_, None, None, "failed", error)

    def move(self, photo_id: int, path: str, size: int, mtime_ns: int) -> None:
        """The same bytes found at another path (a moved or renamed photo): the row follows, id and vectors stay."""
        self.db.execute("UPDATE photos SET path=?, size=?, mtime_ns=? WHERE id=?", (os.fsencode(path), size, mtime_ns, photo_id))
        self.dirty = True

    def touch(self, photo_id: int, size: int, mtime_ns: int) -> None:
        """Same content, new mtime: update the catalog only."""
        self.db.execute("UPDATE photos SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, photo_id))
        self.dirty = True

    def _upsert(self, photo_id, path, size, mtime_ns, hash_, width, height, status, error) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO photos (id, path, size, mtime_ns, hash, width, height, status, error, updated) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (photo_id, os.fsencode(path), size, mtime_ns, hash_, width, height, status, error, time.time()),
        )
        self.dirty = True

    def delete(self, photo_ids: Iterable[int]) -> None:
        ids = [int(i) for i in photo_ids]
        if not ids:
            return
        self._remove_vectors(ids)
        for i in range(0, len(ids), 500):
            self._remove_objects(ids[i:i + 500])
        self.db.executemany("DELETE FROM photos WHERE id=?", [(i,) for i in ids])
        self.db.executemany("DELETE FROM labels WHERE photo_id=?", [(i,) for i in ids])
        self.db.executemany("DELETE FROM meta WHERE photo_id=?", [(i,) for i in ids])
        self.dirty = True

    # -- vectors

    def _patch_ids(self, photo_ids: np.ndarray) -> np.ndarray:
        return patch_ids(photo_ids, self.manifest.grid)

    def _remove_vectors(self, photo_ids: list[int]) -> None:
        """Forget photos' global and patch vectors: their ``vec`` rows go (so what a segment holds of them is a
        tombstone) and this commit's new vectors of them are removed (a small in-memory index)."""
        if not photo_ids:
            return
        ids = np.asarray(photo_ids, np.int64)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500].tolist()
            self.db.execute(f"DELETE FROM vec WHERE photo_id IN ({','.join('?' * len(chunk))})", chunk)
        if self.global_index is not None:
            self.global_index.remove_ids(faiss.IDSelectorBatch(ids))
            self.patch_index.remove_ids(faiss.IDSelectorBatch(self._patch_ids(ids)))
        if self.vectors is not None:
            self.vectors.remove_photos(ids.tolist(), kinds=("global", "patches"))

    def add(self, rows: list[tuple[int, str, int, int, str, int, int]], cls: np.ndarray, patches: np.ndarray) -> None:
        """Add (or replace) photos: rows of (id, path, size, mtime_ns, hash, width, height), CLS [B, D], patches [B, h, w, D].
        The vectors go to this commit's new segment; a replaced photo's older vectors become tombstones."""
        m = self.manifest
        b = len(rows)
        assert cls.shape == (b, m.dim) and patches.shape == (b, m.grid, m.grid, m.dim), (cls.shape, patches.shape)
        ids = np.array([r[0] for r in rows], np.int64)
        flat = np.ascontiguousarray(patches.reshape(-1, m.dim), dtype=np.float32)
        if self.global_index is None:  # fresh segments are exact (SQ8 for patches); forced kinds are trained at commit
            self.global_index = make_index(FRESH_KINDS["global"], m.dim, None)
            self.patch_index = make_index(FRESH_KINDS["patches"], m.dim, flat)
        q = ",".join("?" * b)
        replaced = [i for (i,) in self.db.execute(f"SELECT id FROM photos WHERE status='indexed' AND id IN ({q})", ids.tolist())]
        self._remove_vectors(replaced)
        self._remove_objects(replaced)  # a changed photo's objects are made again (or stay gone without --objects)
        self.global_index.add_with_ids(np.ascontiguousarray(cls, dtype=np.float32), ids)
        self.patch_index.add_with_ids(flat, self._patch_ids(ids))
        self.db.executemany("INSERT OR REPLACE INTO vec (photo_id, seg) VALUES (?,?)", [(int(i), self.next_seg) for i in ids])
        if self.vectors is not None:  # upserts: a resumed run re-sending a photo leaves one copy
            self.vectors.add("global", ids, ids, cls)
            self.vectors.add("patches", self._patch_ids(ids), np.repeat(ids, m.grid * m.grid), flat)
        for r in rows:
            self._upsert(*r, "indexed", None)

    def _seal_kinds(self) -> dict[str, faiss.Index]:
        """This commit's new indexes by kind, a forced (--kind) kind trained on the segment's own vectors."""
        m = self.manifest
        return seal_indexes({"global": self.global_index, "patches": self.patch_index, "objects": self.object_index},
                            m.kinds_forced, m.dim, first=not m.segments)

    def replace_segments(self, inputs: list[int], built: Path, record: dict) -> None:
        """Compaction's swap: ``built`` (a directory of files holding the live vectors of ``inputs`` as of an
        earlier commit) becomes segment ``record["seg"]`` in their place, committed at once. Vectors of photos
        changed since that commit no longer named by an input segment stay tombstones in the new one."""
        if self.dirty:
            raise IndexWriteError("replace_segments needs a writer with nothing uncommitted")
        seg = record["seg"]
        assert seg == self.next_seg, (seg, self.next_seg)
        final = self.root / seg_name(seg)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(built, final)
        _fsync_dir(self.root)
        q = ",".join("?" * len(inputs))
        if GLOBAL_FILE in record["files"]:
            self.db.execute(f"UPDATE vec SET seg=? WHERE seg IN ({q})", [seg, *inputs])
        if OBJECT_FILE in record["files"]:
            self.db.execute(f"UPDATE objvec SET seg=? WHERE seg IN ({q})", [seg, *inputs])
        gone = set(inputs)
        self.manifest.segments = [s for s in self.manifest.segments if s["seg"] not in gone] + [record]
        self.dirty = True
        self.commit()

    # -- commit

    def _write_segment(self, indexes: dict[str, faiss.Index]) -> dict:
        """Write this commit's new vectors as seg-N (files fsynced, then the directory renamed into place)."""
        seg = self.next_seg
        final = self.root / seg_name(seg)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(final, ignore_errors=True)
        record = write_segment_files(tmp, indexes)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        return {"seg": seg, **record}

    def commit(self) -> str | None:
        """Write the vectors added since the last commit as a new segment, then commit the catalog's transaction
        with the new manifest in it: the atomic switch. Returns the new commit's name (gen-N), None if nothing changed."""
        if not self.dirty and self.manifest.gen > 0:
            return None
        indexes = self._seal_kinds()  # before any write: a kind that cannot be trained fails with nothing written
        if self.vectors is not None:
            self.vectors.flush()  # the store holds everything the commit will name
        m = self.manifest
        prev, before = m.gen, list(m.segments)
        gen = self.next_seg + len(self._to_place)  # adopted segments are numbered after this writer's own
        try:
            if indexes:
                m.segments = [*m.segments, self._write_segment(indexes)]
            m.segments = [*m.segments, *self._place_staged()]
            live = {s for (s,) in self.db.execute("SELECT DISTINCT seg FROM vec")}
            live_obj = {s for (s,) in self.db.execute("SELECT DISTINCT seg FROM objvec")}
            segments = []
            for s in m.segments:  # a segment whose vectors are all tombstones leaves the manifest
                keep = {f: d for f, d in s["files"].items() if (s["seg"] in live if f != OBJECT_FILE else s["seg"] in live_obj)}
                if keep:
                    segments.append({**s, "files": keep, "kinds": {k: v for k, v in s["kinds"].items() if KIND_FILES[k] in keep}})
            m.segments = segments
            m.gen, m.updated = gen, time.time()
            if not m.kinds_forced[0]:
                m.global_kind = _largest_kind(segments, "global", "Flat")
            if not m.kinds_forced[1]:
                m.patch_kind = _largest_kind(segments, "patches", "SQ8")
            m.object_kind = _largest_kind(segments, "objects", "Flat")
            self.db.execute("INSERT INTO commits (gen, manifest, time) VALUES (?,?,?)", (gen, m.to_json(), time.time()))
            self.db.execute("DELETE FROM commits WHERE gen < ?", (prev,))  # the previous commit's row stays
            self.db.commit()
        except (OSError, RuntimeError, sqlite3.Error) as e:  # FAISS reports write errors as RuntimeError
            with contextlib.suppress(sqlite3.Error):
                self.db.rollback()
            m.gen, m.segments = prev, before
            for seg in range(prev + 1, gen + 1):
                shutil.rmtree(self.root / (seg_name(seg) + ".tmp"), ignore_errors=True)
                shutil.rmtree(self.root / seg_name(seg), ignore_errors=True)
            code = getattr(e, "errno", None)
            e = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:200]
            kept = f"the last commit (gen-{prev:06d}) is intact" if prev > 0 else "nothing had been committed yet"
            raise IndexWriteError(f"could not write a new snapshot in {self.root}: {e}; {kept}; "
                                  f"free space (or lift the limit) and run again to resume", errno=code) from None
        self.global_index = self.patch_index = self.object_index = None
        self._to_place = []
        self.dirty = False
        self._clean()
        return f"gen-{gen:06d}"

    # -- segments written by other processes (Ray workers)

    def adopt(self, rows: list[tuple[int, str, int, int, str, int, int]], staged: dict,
              vectors: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """Add (or replace) photos whose vectors a worker wrote as a staged segment (``write_staged_segment``'s
        record): rows of (id, path, size, mtime_ns, hash, width, height), as ``add`` takes them. The segment is
        named by the next commit, in the transaction that commits these rows. ``vectors`` (CLS, patches) are
        only for an external store (the writer's own segments never see them). Returns the segment's number."""
        name = staged["name"]
        seg = self._staged.get(name)
        if seg is None:
            if not name.startswith(self.staging_prefix):
                raise IndexWriteError(f"staged segment {name} was not written for this writer ({self.staging_prefix}*)")
            for f, want in staged["files"].items():
                path = self.root / name / f
                if not path.is_file() or path.stat().st_size != want["size"]:
                    raise IndexWriteError(
                        f"{path}, written by process {staged.get('pid')} on {staged.get('host')}, is missing or not the size "
                        f"it was written with: the index folder must be on storage every Ray node shares")
            seg = self.next_seg + 1 + len(self._to_place)
            self._staged[name] = seg
            self._to_place.append({"seg": seg, "name": name, "files": staged["files"], "kinds": staged["kinds"],
                                   "pid": staged.get("pid"), "host": staged.get("host")})
        ids = np.array([r[0] for r in rows], np.int64)
        q = ",".join("?" * len(ids))
        replaced = [i for (i,) in self.db.execute(f"SELECT id FROM photos WHERE status='indexed' AND id IN ({q})", ids.tolist())]
        self._remove_vectors(replaced)
        self._remove_objects(replaced)
        self.db.executemany("INSERT OR REPLACE INTO vec (photo_id, seg) VALUES (?,?)", [(int(i), seg) for i in ids])
        if self.vectors is not None:
            if vectors is None:
                raise IndexWriteError("this index has an external vector store: adopt() needs the photos' vectors for it")
            cls, patches = vectors
            flat = np.ascontiguousarray(patches.reshape(-1, self.manifest.dim), dtype=np.float32)
            self.vectors.add("global", ids, ids, cls)
            self.vectors.add("patches", self._patch_ids(ids), np.repeat(ids, self.manifest.grid ** 2), flat)
        for r in rows:
            self._upsert(*r, "indexed", None)
        return seg

    def _place_staged(self) -> list[dict]:
        """Rename the adopted staged segments to their numbers (their files were fsynced by the worker)."""
        out = []
        for s in self._to_place:
            os.replace(self.root / s["name"], self.root / seg_name(s["seg"]))
            out.append({k: v for k, v in s.items() if k != "name"})
        if out:
            _fsync_dir(self.root)
        return out


TRAIN_SAMPLE = 65_536  # vectors a trained kind learns from (bounded: training time must not grow with the data)


def _kind_of(index: faiss.Index) -> str:
    """A short description of an index's kind for the manifest (the factory string it was made from)."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    if ivf is not None:
        codes = faiss.downcast_index(ivf)
        if isinstance(codes, faiss.IndexIVFPQ):
            return f"IVF{ivf.nlist},PQ{codes.pq.M}"
        if isinstance(codes, faiss.IndexIVFScalarQuantizer):
            return f"IVF{ivf.nlist},SQ8"
        return f"IVF{ivf.nlist},Flat"
    if isinstance(inner, faiss.IndexScalarQuantizer):
        return "SQ8"
    if isinstance(inner, faiss.IndexHNSW):
        return f"HNSW{inner.hnsw.nb_neighbors(1)}"
    return "Flat"


def _largest_kind(segments: list[dict], kind: str, default: str) -> str:
    """The kind of the segment with the most vectors of ``kind`` (what `info` reports)."""
    best = max((s for s in segments if kind in s["kinds"]), key=lambda s: s["files"][KIND_FILES[kind]]["size"], default=None)
    return best["kinds"][kind] if best else default


# ---------------------------------------------------------------- writing a segment (a commit, or a Ray worker)

FRESH_KINDS = {"global": "Flat", "patches": "SQ8", "objects": "Flat"}  # the kinds of a segment a run adds
STAGE_PREFIX = "seg-stage-"  # + the writer's token + a unique part + ".tmp": a segment staged for a writer to adopt


def patch_ids(photo_ids: np.ndarray, grid: int) -> np.ndarray:
    """Patch vector ids of photos: photo id * grid^2 + row * grid + col."""
    g = grid * grid
    return (np.asarray(photo_ids, np.int64)[:, None] * g + np.arange(g, dtype=np.int64)[None, :]).ravel()


def seal_indexes(indexes: dict[str, faiss.Index | None], forced: tuple[str | None, str | None], dim: int, *,
                 first: bool) -> dict[str, faiss.Index]:
    """A new segment's indexes by kind (empty ones left out), a forced (--kind) kind trained on the segment's own
    vectors; ``first``: the index's first segment, where a kind that cannot be trained is an error at once
    (later, too few vectors leave the segment exact until compaction)."""
    out = {}
    for kind, index in indexes.items():
        if index is None or index.ntotal == 0:
            continue
        want = {"global": forced[0], "patches": forced[1]}.get(kind)
        if want and want != FRESH_KINDS[kind]:
            ids, xb = reconstruct_all(index)
            sample = xb[np.random.default_rng(0).permutation(len(xb))[:TRAIN_SAMPLE]]
            try:
                trained = make_index(want, dim, sample)
            except ConfigError:
                if first:
                    raise
                log.info("%d %s vectors are too few to train %s: this segment stays exact until compaction", len(xb), kind, want)
            else:
                trained.add_with_ids(xb, ids)
                index = trained
        out[kind] = index
    return out


def write_segment_files(folder: Path, indexes: dict[str, faiss.Index]) -> dict:
    """Write ``indexes`` as one segment's files in ``folder`` (made anew): each file fsynced, then the folder.
    Returns the segment's record without its number: {"files": {name: size + blake2b}, "kinds": {kind: factory}}."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = {}
    for kind, index in indexes.items():
        f = KIND_FILES[kind]
        faiss.write_index(index, str(folder / f))
        _fsync_file(folder / f)
        files[f] = file_digest(folder / f)
    _fsync_dir(folder)
    return {"files": files, "kinds": {k: _kind_of(i) for k, i in indexes.items()}}


def write_staged_segment(root: str | os.PathLike, prefix: str, ids: np.ndarray, cls: np.ndarray, patches: np.ndarray,
                         forced: tuple[str | None, str | None] = (None, None)) -> dict:
    """Write photos' global and patch vectors (ids [B], CLS [B, D], patches [B, h, w, D]) as a segment staged inside
    the index folder ``root`` under ``prefix`` (a Writer's ``staging_prefix``), for that writer to ``adopt``: the
    kinds and files a commit of the same photos writes. Returns its record: name, files, kinds, and the pid and
    host that wrote it."""
    b, h, w, d = patches.shape
    assert cls.shape == (b, d) and h == w and len(ids) == b, (cls.shape, patches.shape, len(ids))
    ids = np.asarray(ids, np.int64)
    flat = np.ascontiguousarray(patches.reshape(-1, d), dtype=np.float32)
    g = make_index(FRESH_KINDS["global"], d, None)
    g.add_with_ids(np.ascontiguousarray(cls, dtype=np.float32), ids)
    p = make_index(FRESH_KINDS["patches"], d, flat)
    p.add_with_ids(flat, patch_ids(ids, h))
    indexes = seal_indexes({"global": g, "patches": p}, forced, d, first=False)
    root = Path(root)
    name = f"{prefix}{uuid.uuid4().hex[:12]}.tmp"
    record = write_segment_files(root / name, indexes)
    _fsync_dir(root)
    return {"name": name, **record, "pid": os.getpid(), "host": socket.gethostname()}
