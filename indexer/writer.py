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
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from indexer import catalog
from indexer.catalog import CATALOG_FILE
from indexer.errors import ConfigError, IndexBusy, IndexFormatError, IndexWriteError
from indexer.faissio import TRAIN_SAMPLE, file_digest, fsync_dir, fsync_file, kind_of, make_index, reconstruct_all
from indexer.manifest import GLOBAL_FILE, KIND_FILES, MAX_OBJECTS, OBJECT_FILE, Manifest
from indexer.snapshot import convert_format1, format1_snapshot, seg_name

if TYPE_CHECKING:
    from indexer.reader import PhotoMeta

log = logging.getLogger(__name__)


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
            old = format1_snapshot(self.root)
            if old is not None:
                convert_format1(self.root, old)
            fresh = not (self.root / CATALOG_FILE).exists()
            if fresh:
                catalog.create_catalog(self.root)
            self.db = catalog.connect_writer(self.root)
            row = None if fresh else next(iter(catalog.latest_manifests(self.db)), None)
        except sqlite3.DatabaseError as e:
            self._unlock()
            raise IndexFormatError(f"{self.root / CATALOG_FILE} is not a readable catalog: {e}") from None
        except BaseException:
            self._unlock()
            raise
        if row is None and manifest is None:
            self.close()
            raise IndexFormatError(f"{self.root} has no committed snapshot yet: index a folder first")
        self.manifest = Manifest.from_json(row, str(self.root / CATALOG_FILE)) if row else manifest
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
        for text in catalog.latest_manifests(self.db, 2):
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
        return catalog.known(self.db)

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
        catalog.set_labels(self.db, photo_ids, labels)
        if self.vectors is not None:
            self.vectors.set_tags(photo_ids, [[lab for lab, _ in tags] for tags in labels])
        self.dirty = True

    def unlabelled(self) -> set[int]:
        """Indexed photos with no class tags."""
        return catalog.unlabelled(self.db)

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
            if self.vectors is not None:
                self.vectors.add("objects", ids, np.full(len(ids), int(photo_id), np.int64), vectors)
            catalog.add_objects(self.db, photo_id, self.next_seg, ids, objects)
        catalog.mark_segmented(self.db, photo_id)
        self.dirty = True

    # -- metadata

    def set_meta(self, photo_id: int, path: str, meta: PhotoMeta) -> None:
        """Replace what is known of a photo's date, camera, position (and its folder, from ``path``)."""
        catalog.set_meta(self.db, photo_id, path, meta)
        self.dirty = True

    def clear_meta(self, photo_ids: list[int]) -> None:
        catalog.clear_meta(self.db, photo_ids)
        self.dirty = True

    def without_meta(self) -> dict[int, tuple[str, int]]:
        """Indexed photos with no metadata row yet (an index from before metadata): id -> (path, mtime_ns)."""
        return catalog.without_meta(self.db)

    def unsegmented(self) -> set[int]:
        """Indexed photos SAM has not looked at yet."""
        return catalog.unsegmented(self.db)

    def reset_objects(self) -> None:
        """Forget every object (another SAM model or settings: all photos are segmented anew)."""
        if self.vectors is not None:
            self.vectors.clear("objects")
        catalog.reset_objects(self.db)  # every object segment is dead: the next commit drops them
        self.object_index = None
        self.dirty = True

    def forget_objects(self, photo_ids: list[int]) -> None:
        """Forget photos' objects (they count as not segmented: the next run with --objects segments them again)."""
        self._remove_objects(photo_ids)
        self.dirty = True

    def _remove_objects(self, photo_ids: list[int]) -> None:
        if not photo_ids:
            return
        ids = catalog.remove_objects(self.db, photo_ids)
        if ids and self.object_index is not None:
            self.object_index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
        if ids and self.vectors is not None:
            self.vectors.remove_photos(photo_ids, kinds=("objects",))

    def record_failure(self, photo_id: int, path: str, size: int, mtime_ns: int, hash_: str | None, error: str) -> None:
        catalog.clear_labels(self.db, [photo_id])
        catalog.clear_meta(self.db, [photo_id])
        self._remove_objects([photo_id])
        self._remove_vectors([photo_id])
        self._upsert(photo_id, path, size, mtime_ns, hash_, None, None, "failed", error)

    def move(self, photo_id: int, path: str, size: int, mtime_ns: int) -> None:
        """The same bytes found at another path (a moved or renamed photo): the row follows, id and vectors stay."""
        catalog.move_photo(self.db, photo_id, path, size, mtime_ns)
        self.dirty = True

    def touch(self, photo_id: int, size: int, mtime_ns: int) -> None:
        """Same content, new mtime: update the catalog only."""
        catalog.touch_photo(self.db, photo_id, size, mtime_ns)
        self.dirty = True

    def _upsert(self, photo_id, path, size, mtime_ns, hash_, width, height, status, error) -> None:
        catalog.upsert_photo(self.db, photo_id, path, size, mtime_ns, hash_, width, height, status, error)
        self.dirty = True

    def delete(self, photo_ids: Iterable[int]) -> None:
        ids = [int(i) for i in photo_ids]
        if not ids:
            return
        self._remove_vectors(ids)
        for i in range(0, len(ids), 500):
            self._remove_objects(ids[i:i + 500])
        catalog.delete_photos(self.db, ids)
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
        catalog.drop_vec(self.db, ids.tolist())
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
        replaced = catalog.indexed_among(self.db, ids.tolist())
        self._remove_vectors(replaced)
        self._remove_objects(replaced)  # a changed photo's objects are made again (or stay gone without --objects)
        self.global_index.add_with_ids(np.ascontiguousarray(cls, dtype=np.float32), ids)
        self.patch_index.add_with_ids(flat, self._patch_ids(ids))
        catalog.set_vec(self.db, ids, self.next_seg)
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
        fsync_dir(self.root)
        if GLOBAL_FILE in record["files"]:
            catalog.move_segments(self.db, "vec", inputs, seg)
        if OBJECT_FILE in record["files"]:
            catalog.move_segments(self.db, "objvec", inputs, seg)
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
        fsync_dir(self.root)
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
            named = [s["seg"] for s in m.segments]
            live = catalog.live_segments(self.db, "vec", named)
            live_obj = catalog.live_segments(self.db, "objvec", named)
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
            catalog.add_commit(self.db, gen, m.to_json(), keep_from=prev)  # the previous commit's row stays
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
        replaced = catalog.indexed_among(self.db, ids.tolist())
        self._remove_vectors(replaced)
        self._remove_objects(replaced)
        catalog.set_vec(self.db, ids, seg)
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
            fsync_dir(self.root)
        return out


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
        fsync_file(folder / f)
        files[f] = file_digest(folder / f)
    fsync_dir(folder)
    return {"files": files, "kinds": {k: kind_of(i) for k, i in indexes.items()}}


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
    fsync_dir(root)
    return {"name": name, **record, "pid": os.getpid(), "host": socket.gethostname()}
