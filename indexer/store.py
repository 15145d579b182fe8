"""Writer and on-disk format: one index directory of atomic snapshots.

    IDX/CURRENT              name of the live snapshot, switched by os.replace
    IDX/lock                 flock held by the single writer
    IDX/snap-000007/         one complete snapshot, never modified once named
        manifest.json        how the index was built (model, resolution, kinds, ...)
        catalog.sqlite       photos: path, size, mtime, hash, size, status, error
        global.faiss         CLS vectors, id = photo id
        patches.faiss        patch vectors, id = photo id * h*w + row*w + col
        objects.faiss        SAM object crops' CLS vectors, id = photo id * 256 + rank (catalog table objects)

A commit writes a new snapshot beside the old one (``snap-N.tmp``), fsyncs it,
renames it and then switches CURRENT; a reader that resolved CURRENT earlier
keeps a complete snapshot (the previous one is kept until the next commit).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from indexer.errors import ConfigError, IndexBusy, IndexFormatError, IndexWriteError, ModelMismatch

if TYPE_CHECKING:
    from indexer.embedder import Embedder
    from indexer.reader import PhotoMeta

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
"""


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
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)
    classifier: str | None = None  # the model that made the labels, if any
    segmenter: dict | None = None  # the SAM model and settings that made the objects, if any
    store: str | None = None  # URI of an external vector store (Milvus) that also holds the vectors and serves them
    object_kind: str = "Flat"
    not_images: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> extension -> files its last scan passed over
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise IndexFormatError(f"{path} is missing: not a dinosearch index") from None
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{path} is unreadable: {e}") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: index format {data.get('format_version')!r}, this dinosearch reads format {FORMAT_VERSION}; rebuild the index"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise IndexFormatError(f"{path}: malformed manifest ({e})") from None

    @classmethod
    def load_current(cls, root: str | os.PathLike) -> Manifest:
        """The manifest of an index directory's live snapshot."""
        snap = current_snapshot(Path(root))
        if snap is None:
            raise IndexFormatError(f"{root} has no committed snapshot: index a folder first")
        return cls.load(snap / MANIFEST_FILE)

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


def _family(kind: str) -> str:
    return re.sub(r"IVF\d+", "IVF", kind)


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
    """All ids stored in an index made by make_index."""
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


def to_memory(index: faiss.Index) -> faiss.Index:
    """Copy on-disk inverted lists into memory, so a writer never changes a committed snapshot's .ivfdata."""
    il = on_disk_lists(index)
    if il is None:
        return index
    ivf = faiss.extract_index_ivf(index)
    mem = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in range(ivf.nlist):
        n = il.list_size(i)
        if n:
            mem.add_entries(i, n, il.get_ids(i), il.get_codes(i))
    ivf.replace_invlists(mem, True)
    mem.this.disown()
    return index


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


def current_snapshot(root: Path) -> Path | None:
    """The live snapshot directory of an index, or None if nothing was committed."""
    cur = root / "CURRENT"
    if not cur.exists():
        return None
    name = cur.read_text().strip()
    snap = root / name
    if not name.startswith("snap-") or not snap.is_dir():
        raise IndexFormatError(f"{cur} points at '{name}', which is not a snapshot in {root}")
    return snap


@dataclass
class Snapshot:
    """A committed, read-only view of an index directory."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | os.PathLike) -> Snapshot:
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise IndexFormatError(f"{root} is a file, not an index directory")
        if not root.is_dir():
            raise IndexFormatError(f"no index at {root} (run `dinosearch index FOLDER --index {root}` first)")
        snap = current_snapshot(root)
        if snap is None:
            raise IndexFormatError(f"{root} has no committed snapshot yet: not a dinosearch index, or its first run has not committed")
        return cls(snap, Manifest.load(snap / MANIFEST_FILE))

    def catalog(self) -> sqlite3.Connection:
        """Read-only connection to the snapshot's catalog."""
        path = self.path / CATALOG_FILE
        if not path.is_file():
            raise IndexFormatError(f"{path} is missing")
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
            db.execute("SELECT count(*) FROM photos").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{path} is corrupt: {e}") from None
        return db

    def checked(self, name: str) -> Path:
        """The path of one of the snapshot's files, after checking it against the size and checksum the manifest
        recorded at commit: a damaged file is never handed to FAISS in this process (a damaged header can make
        FAISS allocate without bound). Costs one read of the file (blake2b ~0.8 GB/s), which also warms the cache."""
        path = self.path / name
        want = (self.manifest.files or {}).get(name)
        if want is not None and path.is_file():
            if path.stat().st_size != want["size"] or file_digest(path) != want:
                raise IndexFormatError(f"{path} is corrupt or truncated: it differs from what was committed (size or checksum); "
                                       f"`dinosearch verify --repair` switches back to the last snapshot that checks out")
        return path

    def global_index(self) -> faiss.Index:
        return read_index(self.checked(GLOBAL_FILE))

    def patch_index(self) -> faiss.Index:
        return read_index(self.checked(PATCH_FILE))

    def object_index(self) -> faiss.Index:
        """SAM objects' vectors (an empty index for snapshots written before objects existed)."""
        if not (self.path / OBJECT_FILE).is_file():
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.manifest.dim))
        return read_index(self.checked(OBJECT_FILE))


class Writer:
    """The single writer of an index directory: catalog + indexes in memory, committed as snapshots."""

    def __init__(self, root: str | os.PathLike, manifest: Manifest, *, vectors=None, load_indexes: bool = True):
        """``vectors``: an external VectorStore (indexer.vectors) kept in step with every change.
        ``load_indexes=False``: the global and patch indexes are not loaded (build-index replaces them)."""
        self.vectors = vectors
        self._replacing = not load_indexes
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise IndexFormatError(f"{self.root} is a file, not an index directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / "lock", "a+")
        except OSError as e:
            raise IndexWriteError(f"cannot write to the index {self.root}: {e.strerror or e} (a read-only folder or disk?)",
                                  errno=e.errno) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise IndexBusy(f"another dinosearch process is writing {self.root}; wait for it to finish") from None
        self._clean()
        snap = current_snapshot(self.root)
        self.db = sqlite3.connect(":memory:")
        if snap is None:
            self.manifest = manifest
            self.db.executescript(SCHEMA)
            self.global_index: faiss.Index | None = None
            self.patch_index: faiss.Index | None = None
            self.object_index: faiss.Index | None = None
        else:
            old = Snapshot(snap, Manifest.load(snap / MANIFEST_FILE))
            src = old.catalog()
            src.backup(self.db)
            src.close()
            self.db.executescript(SCHEMA)  # tables added since the snapshot was written
            self.manifest = old.manifest
            self.global_index = to_memory(old.global_index()) if load_indexes else None
            self.patch_index = to_memory(old.patch_index()) if load_indexes else None
            self.object_index = old.object_index()
            if self.global_index is not None and self.global_index.ntotal == 0:  # built on the first add, with its kind
                self.global_index = self.patch_index = None
            if self.object_index.ntotal == 0:
                self.object_index = None
        self.dirty = False

    # -- lifecycle

    def close(self) -> None:
        self.db.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _snapshots(self) -> list[Path]:
        return sorted(p for p in self.root.glob("snap-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def _clean(self) -> None:
        """Remove unfinished snapshots, and committed ones older than the previous one."""
        for tmp in self.root.glob("snap-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        live = current_snapshot(self.root)
        snaps = self._snapshots()
        if live is None:
            for s in snaps:  # named but never made current: a crash between rename and switch
                shutil.rmtree(s, ignore_errors=True)
            return
        keep = {live}
        older = [s for s in snaps if s.name < live.name]
        if older:
            keep.add(older[-1])
        for s in snaps:
            if s not in keep:
                shutil.rmtree(s, ignore_errors=True)

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
                kind = self.manifest.object_kind
                self.manifest.object_kind = kind = "Flat" if kind.startswith("IVF") else kind
                self.object_index = make_index(kind, self.manifest.dim, vectors)
            self.object_index.add_with_ids(vectors, ids)
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
        self.object_index = None
        self.dirty = True

    def _remove_objects(self, photo_ids: list[int]) -> None:
        if not photo_ids:
            return
        q = ",".join("?" * len(photo_ids))
        ids = [i for (i,) in self.db.execute(f"SELECT id FROM objects WHERE photo_id IN ({q})", [int(i) for i in photo_ids])]
        self.db.execute(f"DELETE FROM objects WHERE photo_id IN ({q})", [int(i) for i in photo_ids])
        self.db.execute(f"DELETE FROM segmented WHERE photo_id IN ({q})", [int(i) for i in photo_ids])
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
        g = self.manifest.grid * self.manifest.grid
        return (np.asarray(photo_ids, np.int64)[:, None] * g + np.arange(g, dtype=np.int64)[None, :]).ravel()

    def _remove_vectors(self, photo_ids: list[int]) -> None:
        if self.global_index is None or not photo_ids:
            return
        ids = np.asarray(photo_ids, np.int64)
        self.global_index.remove_ids(faiss.IDSelectorBatch(ids))
        self.patch_index.remove_ids(faiss.IDSelectorBatch(self._patch_ids(ids)))
        if self.vectors is not None:
            self.vectors.remove_photos(ids.tolist(), kinds=("global", "patches"))

    def add(self, rows: list[tuple[int, str, int, int, str, int, int]], cls: np.ndarray, patches: np.ndarray) -> None:
        """Add (or replace) photos: rows of (id, path, size, mtime_ns, hash, width, height), CLS [B, D], patches [B, h, w, D]."""
        m = self.manifest
        b = len(rows)
        assert cls.shape == (b, m.dim) and patches.shape == (b, m.grid, m.grid, m.dim), (cls.shape, patches.shape)
        ids = np.array([r[0] for r in rows], np.int64)
        flat = np.ascontiguousarray(patches.reshape(-1, m.dim), dtype=np.float32)
        if self.global_index is None:  # IVF kinds are trained at commit, on everything added by then
            m.global_kind = "Flat" if m.global_kind.startswith("IVF") else m.global_kind
            m.patch_kind = "SQ8" if m.patch_kind.startswith("IVF") else m.patch_kind
            self.global_index = make_index(m.global_kind, m.dim, cls)
            self.patch_index = make_index(m.patch_kind, m.dim, flat)
        q = ",".join("?" * b)
        replaced = [i for (i,) in self.db.execute(f"SELECT id FROM photos WHERE status='indexed' AND id IN ({q})", ids.tolist())]
        self._remove_vectors(replaced)  # only changed photos: a removal scans the whole index
        self._remove_objects(replaced)  # a changed photo's objects are made again (or stay gone without --objects)
        self.global_index.add_with_ids(np.ascontiguousarray(cls, dtype=np.float32), ids)
        self.patch_index.add_with_ids(flat, self._patch_ids(ids))
        if self.vectors is not None:  # upserts: a resumed run re-sending a photo leaves one copy
            self.vectors.add("global", ids, ids, cls)
            self.vectors.add("patches", self._patch_ids(ids), np.repeat(ids, m.grid * m.grid), flat)
        for r in rows:
            self._upsert(*r, "indexed", None)

    def _refit_kinds(self) -> None:
        """Rebuild an index whose size has outgrown its kind, or that is not yet of its forced kind."""
        m = self.manifest
        for attr, patches, forced, field_ in (("global_index", False, m.kinds_forced[0], "global_kind"),
                                              ("patch_index", True, m.kinds_forced[1], "patch_kind"),
                                              ("object_index", False, None, "object_kind")):
            index = getattr(self, attr)
            if index is None or index.ntotal == 0:
                continue
            kind = forced or choose_kind(index.ntotal, m.dim, patches=patches)
            current = getattr(m, field_)
            if kind == current or (not forced and _family(kind) == _family(current)):  # a trained IVF keeps its nlist
                continue
            log.info("rebuilding %s: %d vectors, %s -> %s", attr, index.ntotal, current, kind)
            ids, xb = reconstruct_all(index)
            sample = xb[np.random.default_rng(0).permutation(len(xb))[: 256 * 1024]]
            new = make_index(kind, m.dim, sample)
            new.add_with_ids(xb, ids)
            setattr(self, attr, new)
            setattr(m, field_, kind)

    # -- commit

    def begin_snapshot(self) -> Path:
        """A new, empty snapshot directory (``snap-N.tmp``) for files made outside the writer (build-index)."""
        snaps = self._snapshots()
        number = int(snaps[-1].name.split("-")[1]) + 1 if snaps else 1
        tmp = self.root / f"snap-{number:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def _write_snapshot(self, tmp: Path, name: str, prepared: bool = False) -> Path:
        if not prepared:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.manifest.updated = time.time()
        empty = faiss.IndexIDMap2(faiss.IndexFlatIP(self.manifest.dim))  # nothing indexed yet
        faiss.write_index(self.global_index or empty, str(tmp / GLOBAL_FILE))
        faiss.write_index(self.patch_index or empty, str(tmp / PATCH_FILE))
        faiss.write_index(self.object_index or empty, str(tmp / OBJECT_FILE))
        dst = sqlite3.connect(tmp / CATALOG_FILE)
        self.db.commit()
        self.db.backup(dst)
        dst.close()
        extra = sorted(p.name for p in tmp.glob("*.ivfdata"))  # on-disk inverted lists of build-index
        self.manifest.files = {f: file_digest(tmp / f) for f in (GLOBAL_FILE, PATCH_FILE, OBJECT_FILE, CATALOG_FILE, *extra)}
        (tmp / MANIFEST_FILE).write_text(self.manifest.to_json())
        for f in (GLOBAL_FILE, PATCH_FILE, OBJECT_FILE, CATALOG_FILE, MANIFEST_FILE, *extra):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        final = self.root / name
        os.replace(tmp, final)
        cur_tmp = self.root / "CURRENT.tmp"
        cur_tmp.write_text(name + "\n")
        _fsync_file(cur_tmp)
        os.replace(cur_tmp, self.root / "CURRENT")
        _fsync_dir(self.root)
        return final

    def commit(self, *, prepared: Path | None = None) -> Path | None:
        """Write everything as a new snapshot and switch CURRENT to it atomically.

        ``prepared``: a directory from begin_snapshot() already holding extra files (kept, not recreated)."""
        if not self.dirty and current_snapshot(self.root) is not None and prepared is None:
            return None
        if self._replacing and (self.global_index is None or self.patch_index is None):
            raise IndexWriteError("a writer opened without its indexes must be given new ones before a commit")
        self._refit_kinds()
        if prepared is not None:
            tmp, name = prepared, prepared.name.removesuffix(".tmp")
        else:
            snaps = self._snapshots()
            number = int(snaps[-1].name.split("-")[1]) + 1 if snaps else 1
            name = f"snap-{number:06d}"
            tmp = self.root / f"{name}.tmp"
        if self.vectors is not None:
            self.vectors.flush()  # the store holds everything the snapshot will name
        try:
            final = self._write_snapshot(tmp, name, prepared is not None)
        except (OSError, RuntimeError, sqlite3.Error) as e:  # FAISS reports write errors as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            code = getattr(e, "errno", None)
            e = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:200]
            live = current_snapshot(self.root)
            kept = f"the last committed snapshot ({live.name}) is intact" if live else "nothing had been committed yet"
            raise IndexWriteError(f"could not write a new snapshot in {self.root}: {e}; {kept}; "
                                  f"free space (or lift the limit) and run again to resume", errno=code) from None
        self.dirty = False
        self._clean()
        return final
