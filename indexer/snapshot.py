"""Snapshots: a committed, read-only view of an index directory, the live generation, and the in-place
conversion of a format-1 index."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer import catalog
from indexer.catalog import CATALOG_FILE
from indexer.errors import IndexFormatError
from indexer.faissio import file_digest, fsync_dir, fsync_file, index_ids, read_index, read_index_mapped
from indexer.manifest import (
    FORMAT_VERSION,
    GLOBAL_FILE,
    KIND_FIELD,
    KIND_FILES,
    MANIFEST_FILE,
    MAX_OBJECTS,
    OBJECT_FILE,
    Manifest,
)
from indexer.segments import Part, SegmentedIndex

log = logging.getLogger(__name__)


def seg_name(seg: int) -> str:
    return f"seg-{seg:06d}"


def format1_snapshot(root: Path) -> Path | None:
    """The live snapshot of an index still in format 1 (snap-N/ + CURRENT, no root catalog), else None."""
    cur = root / "CURRENT"
    if (root / CATALOG_FILE).exists() or not cur.is_file():
        return None
    snap = root / cur.read_text().strip()
    if not snap.name.startswith("snap-") or not snap.is_dir():
        raise IndexFormatError(f"{cur} points at '{snap.name}', which is not a snapshot in {root}")
    return snap


def live_generation(root: str | os.PathLike) -> int | None:
    """The generation of an index directory's live commit; None if nothing was committed (0: a format-1 index,
    which the next writer converts)."""
    root = Path(root).expanduser()
    if format1_snapshot(root) is not None:
        return 0
    if not (root / CATALOG_FILE).is_file():
        return None
    try:
        db = catalog.connect_ro(root)
        try:
            gen = catalog.live_gen(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise IndexFormatError(f"{root / CATALOG_FILE} is not a readable catalog: {e}") from None
    return gen


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
        if format1_snapshot(root) is not None:
            raise IndexFormatError(f"{root} is in the old snapshot format (1): run `dinosearch verify {root} --repair` (or any "
                                   f"`dinosearch index ... --index {root}`) once to convert it in place, no re-embedding")
        if not (root / CATALOG_FILE).is_file():
            raise IndexFormatError(f"{root} has no committed snapshot yet: not a dinosearch index, or its first run has not committed")
        try:
            db = catalog.open_read(root)
            row = next(iter(catalog.latest_manifests(db)), None)
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{root / CATALOG_FILE} is corrupt: {e}") from None
        if row is None:
            db.close()
            raise IndexFormatError(f"{root} has no committed snapshot yet: not a dinosearch index, or its first run has not committed")
        return cls(root, Manifest.from_json(row, str(root / CATALOG_FILE)), db)

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
        want = self._record(seg, name)
        if want is not None and path.is_file():
            if path.stat().st_size != want["size"] or file_digest(path) != want:
                raise IndexFormatError(f"{path} is corrupt or truncated: it differs from what was committed (size or checksum); "
                                       f"`dinosearch verify --repair` drops it (its photos are indexed again by the next run)")
        return path

    def _where(self, table: str) -> np.ndarray:
        return catalog.segment_of(self.db, table, self.manifest.next_id)

    def _segmented(self, kind: str, table: str, per_photo: int, *, resident: bool = False,
                   reuse: SegmentedIndex | None = None) -> SegmentedIndex:
        """The live vectors of one kind. ``resident``: read each file whole into memory on huge pages (a server's
        choice: faster random reads, see indexer/hugepages.py) instead of mapping its flat codes. ``reuse``: an
        earlier commit's SegmentedIndex of this kind: a segment it holds that this commit names with the same
        recorded size and checksum (segments are immutable) is taken over as loaded, not read and checked again."""
        where = self._where(table)
        known = {p.seg: p for p in reuse.parts} if reuse is not None else {}
        parts = []
        for seg, path in self.segment_files(kind):
            record = self._record(seg, path.name)
            old = known.get(seg)
            if old is not None and record is not None and old.record == record and old.resident == resident:
                index, ids = old.index, old.ids
            else:
                old = None
                path = self.checked(seg, path.name)
                index = read_index(path) if resident else read_index_mapped(path)  # mapped: need not fit in RAM
                ids = np.sort(index_ids(index))
            photo = ids // per_photo
            ok = photo < len(where)
            live = np.zeros(len(ids), bool)
            live[ok] = where[photo[ok]] == seg
            part = Part(seg, index, ids, ids[~live], record=record, resident=resident)
            if old is not None:
                part.take_over(old)
            elif resident:
                part.to_huge_pages()
            parts.append(part)
        return SegmentedIndex(parts, self.manifest.dim, per_photo, where)

    def _record(self, seg: int, name: str) -> dict | None:
        """What the manifest recorded of a segment's file at commit (size, checksum)."""
        return next((s["files"].get(name) for s in self.manifest.segments if s["seg"] == seg), None)

    def global_index(self, *, resident: bool = False, reuse: SegmentedIndex | None = None) -> SegmentedIndex:
        return self._segmented("global", "vec", 1, resident=resident, reuse=reuse)

    def patch_index(self) -> SegmentedIndex:
        return self._segmented("patches", "vec", self.manifest.grid**2)

    def object_index(self) -> SegmentedIndex:
        """SAM objects' vectors (empty when the index has none)."""
        return self._segmented("objects", "objvec", MAX_OBJECTS)


def convert_format1(root: Path, snap: Path) -> None:
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
        fsync_file(f)
    fsync_dir(seg)
    tmp = root / (CATALOG_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    m.format_version, m.gen, m.files = FORMAT_VERSION, 1, {}
    m.segments = [{"seg": 1, "files": files, "kinds": {k: getattr(m, KIND_FIELD[k]) for k, f in KIND_FILES.items()
                                                       if f in files}}] if files else []
    catalog.copy_format1(snap / CATALOG_FILE, tmp, m.to_json(), vectors=GLOBAL_FILE in files, objects=OBJECT_FILE in files)
    fsync_file(tmp)
    os.replace(tmp, root / CATALOG_FILE)
    fsync_dir(root)
    (root / "CURRENT").unlink()
    for s in root.glob("snap-*"):
        shutil.rmtree(s, ignore_errors=True)
    log.warning("converted %s in place from whole snapshots (format 1) to segments (format 2); nothing re-embedded", root)

