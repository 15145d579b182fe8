"""Check an index directory: manifest, catalog and every FAISS file against each other.

FAISS files are opened in a child process first, so a file corrupted in a way
that crashes the reader is reported by name instead of taking the caller down.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import DinosearchError, IndexFormatError
from indexer.store import (
    CATALOG_FILE,
    GLOBAL_FILE,
    MANIFEST_FILE,
    OBJECT_FILE,
    PATCH_FILE,
    Manifest,
    file_digest,
    index_ids,
    read_index,
)


@dataclass
class Report:
    snapshot: str | None = None
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _probe(path: str, answer) -> None:
    try:
        read_index(Path(path))
    except IndexFormatError as e:  # a clean refusal (also a damaged header asking for more memory than allowed)
        answer.send(str(e))
        raise SystemExit(3) from None
    except MemoryError:
        answer.send(f"{path} is corrupt: reading it asks for more memory than this process may have")
        raise SystemExit(3) from None


def _safe_to_read(path: Path) -> str | None:
    """None if FAISS reads the file in a child process; else why not, in the child's words. The parent never
    reads a file the child could not (that is what crashed or exhausted memory in the child)."""
    ctx = multiprocessing.get_context("spawn")
    theirs, ours = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_probe, args=(str(path), ours))
    p.start()
    ours.close()
    p.join(600)
    if p.exitcode == 0:
        return None
    if p.exitcode is None:
        p.kill()
        p.join()
        return f"{path} could not be read: the FAISS reader did not finish in 600 s"
    if p.exitcode < 0:
        return f"{path} is corrupt: the FAISS reader crashed on it (signal {-p.exitcode})"
    try:
        if theirs.poll():
            return theirs.recv()
    except (EOFError, OSError):
        pass
    return f"{path} could not be read (the reader exited with code {p.exitcode})"


def _snapshot_problems(snap: Path) -> tuple[list[str], dict[str, int]]:
    problems: list[str] = []
    counts: dict[str, int] = {}
    try:
        m = Manifest.load(snap / MANIFEST_FILE)
    except IndexFormatError as e:
        return [str(e)], counts
    try:
        db = sqlite3.connect(f"file:{snap / CATALOG_FILE}?mode=ro", uri=True)
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            problems.append(f"{snap / CATALOG_FILE} fails SQLite's integrity check")
        rows = db.execute("SELECT id, status FROM photos").fetchall()
        has_objects = db.execute("SELECT 1 FROM sqlite_master WHERE name='objects'").fetchone() is not None
        object_rows = np.array(sorted(i for (i,) in db.execute("SELECT id FROM objects")) if has_objects else [], np.int64)
        db.close()
    except sqlite3.DatabaseError as e:
        return problems + [f"{snap / CATALOG_FILE} is not a readable catalog: {e}"], counts
    indexed = np.array(sorted(i for i, s in rows if s == "indexed"), np.int64)
    counts.update(photos_indexed=len(indexed), photos_failed=sum(s == "failed" for _, s in rows))
    if rows and max(i for i, _ in rows) >= m.next_id:
        problems.append(f"manifest next_id {m.next_id} is not above the largest photo id {max(i for i, _ in rows)}")
    damaged: set[str] = set()  # files that differ from the commit: checked in a child only, never read here
    for name, want in m.files.items():
        path = snap / name
        if path.is_file() and file_digest(path) != want:
            damaged.add(name)
            problems.append(f"{path} differs from what was committed (size {path.stat().st_size}, expected {want['size']}; "
                            f"checksum mismatch): the file was changed or damaged after the commit")
    g2 = m.grid * m.grid
    for name, per_photo in ((GLOBAL_FILE, 1), (PATCH_FILE, g2)):
        path = snap / name
        why = _safe_to_read(path) if path.is_file() else f"{path} is missing"
        if why:
            problems.append(why)
            continue
        if name in damaged:
            continue
        index = read_index(path)
        if index.d != m.dim:
            problems.append(f"{path} holds {index.d}-dim vectors, the manifest says {m.dim}")
        ids = index_ids(index)
        counts[name] = len(ids)
        uniq = np.unique(ids)
        if len(uniq) != len(ids):
            problems.append(f"{path} has {len(ids) - len(uniq)} duplicate ids")
        photos = np.unique(uniq // per_photo)
        if len(ids) != per_photo * len(indexed) or not np.array_equal(photos, indexed):
            missing = np.setdiff1d(indexed, photos)
            extra = np.setdiff1d(photos, indexed)
            problems.append(
                f"{path} has {len(ids)} vectors for {len(photos)} photos; the catalog has {len(indexed)} indexed photos "
                f"({len(missing)} without vectors, e.g. {missing[:3].tolist()}; {len(extra)} not in the catalog, e.g. {extra[:3].tolist()})"
            )
    path = snap / OBJECT_FILE
    if path.is_file():
        why = _safe_to_read(path)
        if why:
            problems.append(why)
        elif OBJECT_FILE not in damaged:
            ids = np.sort(index_ids(read_index(path)))
            counts[OBJECT_FILE] = len(ids)
            if not np.array_equal(ids, object_rows):
                problems.append(f"{path} has {len(ids)} object vectors; the catalog lists {len(object_rows)} objects "
                                f"({len(np.setdiff1d(object_rows, ids))} without a vector, {len(np.setdiff1d(ids, object_rows))} not in the catalog)")
    return problems, counts


def _store_problems(snap: Path, repair: bool) -> tuple[list[str], list[str]]:
    """The external vector store (Milvus) against the catalog: vectors of photos the catalog does not hold as indexed
    (left by a run killed before its commit) and indexed photos without vectors. ``repair`` deletes the former."""
    from indexer.vectors import open_store

    try:
        m = Manifest.load(snap / MANIFEST_FILE)
        if not m.store:
            return [], []
        db = sqlite3.connect(f"file:{snap / CATALOG_FILE}?mode=ro", uri=True)
        indexed = np.array(sorted(i for (i,) in db.execute("SELECT id FROM photos WHERE status='indexed'")), np.int64)
        db.close()
        store = open_store(m.store, m.dim)
    except (IndexFormatError, sqlite3.DatabaseError):
        return [], []  # already reported by the snapshot's own check
    except DinosearchError as e:
        return [f"the vector store {m.store} cannot be opened: {e}"], []
    problems, repaired = [], []
    for kind in ("global", "patches"):
        held = store.photo_ids(kind)
        ghosts, missing = np.setdiff1d(held, indexed), np.setdiff1d(indexed, held)
        if len(ghosts) and repair:
            store.remove_photos(ghosts.tolist(), kinds=(kind,))
            repaired.append(f"removed the {kind} vectors of {len(ghosts)} photos not in the catalog from {m.store}")
        elif len(ghosts):
            problems.append(f"{m.store} holds {kind} vectors of {len(ghosts)} photos the catalog does not have, e.g. "
                            f"{ghosts[:3].tolist()} (left by a run killed before its commit; --repair removes them)")
        if len(missing):
            problems.append(f"{m.store} has no {kind} vectors for {len(missing)} indexed photos, e.g. {missing[:3].tolist()} "
                            f"(index the folder again with a new --index to rebuild the store)")
    if repaired:
        store.flush()
    return problems, repaired


def verify(root: str | os.PathLike, *, repair: bool = False) -> Report:
    """Check the live snapshot; with ``repair``, fix what is safe to fix (never deletes committed photos)."""
    root = Path(root).expanduser()
    report = Report()
    if not root.is_dir():
        report.problems.append(f"no index directory at {root}")
        return report
    leftovers = sorted(p for p in root.glob("snap-*.tmp"))
    cur = root / "CURRENT"
    name = cur.read_text().strip() if cur.is_file() else None
    snaps = sorted(p for p in root.glob("snap-*") if p.is_dir() and not p.name.endswith(".tmp"))
    live = root / name if name else None
    if live is None or not live.is_dir():
        report.problems.append(f"{cur} is missing or points at a snapshot that does not exist ({name!r})")
        live = None
    else:
        report.snapshot = live.name
        problems, report.counts = _snapshot_problems(live)
        report.problems += problems
    if leftovers:
        msg = f"unfinished snapshot(s) left by an interrupted commit: {', '.join(p.name for p in leftovers)}"
        if repair:
            for p in leftovers:
                shutil.rmtree(p, ignore_errors=True)
            report.repaired.append("removed " + msg)
        else:
            report.problems.append(msg + " (--repair removes them)")
    if repair and report.problems:
        # fall back to the newest older snapshot that checks out whole
        for snap in reversed(snaps):
            if live is not None and snap.name >= live.name:
                continue
            problems, counts = _snapshot_problems(snap)
            if not problems:
                tmp = root / "CURRENT.tmp"
                tmp.write_text(snap.name + "\n")
                os.replace(tmp, cur)
                report.repaired.append(f"CURRENT switched back to {snap.name}, the newest snapshot that checks out "
                                       f"(work committed after it must be indexed again)")
                report.snapshot, report.counts, report.problems = snap.name, counts, []
                break
    if report.snapshot is not None:  # after any switch back: the store is checked against the catalog that stays live
        problems, repaired = _store_problems(root / report.snapshot, repair)
        report.problems += problems
        report.repaired += repaired
    return report
