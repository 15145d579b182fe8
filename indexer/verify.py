"""Check an index directory: the catalog (with the live manifest in it), every segment file and the tombstones
(the catalog's vec / objvec rows) against each other.

FAISS files are opened in a child process first, so a file corrupted in a way
that crashes the reader is reported by name instead of taking the caller down.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer import catalog
from indexer.catalog import CATALOG_FILE
from indexer.errors import DinosearchError, IndexFormatError
from indexer.faissio import file_digest, index_ids, read_index
from indexer.manifest import GLOBAL_FILE, MAX_OBJECTS, OBJECT_FILE, PATCH_FILE, Manifest
from indexer.snapshot import seg_name
from indexer.writer import Writer


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


def _catalog_problems(db: sqlite3.Connection, m: Manifest, where: str) -> list[str]:
    """The catalog against itself: SQLite's check, ids below next_id, vec/objvec rows only for photos that have
    vectors, and only naming live segments."""
    problems = []
    if not catalog.integrity_ok(db):
        problems.append(f"{where} fails SQLite's integrity check")
    top = catalog.max_photo_id(db)
    if top is not None and top >= m.next_id:
        problems.append(f"manifest next_id {m.next_id} is not above the largest photo id {top}")
    live = {s["seg"] for s in m.segments}
    for table, f in (("vec", GLOBAL_FILE), ("objvec", OBJECT_FILE)):
        orphan = catalog.orphan_rows(db, table)
        if orphan[0]:
            problems.append(f"{where}: {orphan[0]} {table} rows name photos without vectors (e.g. {orphan[1]})")
        segs = catalog.live_segments(db, table)
        holding = {s["seg"] for s in m.segments if f in s["files"]}
        if segs - holding:
            problems.append(f"{where}: {table} names segments the live manifest does not hold {sorted(segs - holding)[:5]} "
                            f"(live: {sorted(live)[:5]})")
    missing = catalog.without_vectors(db)
    if missing[0]:
        problems.append(f"{where}: {missing[0]} indexed photos have no vectors recorded (e.g. {missing[1]})")
    return problems


def _live(path: Path, seg: int, where: np.ndarray, per_photo: int, damaged: set[Path], problems: list[str]) -> np.ndarray | None:
    """The live ids of one segment file (checked in a child process first), or None if it cannot be read."""
    why = _safe_to_read(path) if path.is_file() else f"{path} is missing"
    if why:
        problems.append(why)
        return None
    if path in damaged:
        return None
    ids = index_ids(read_index(path))
    uniq = np.unique(ids)
    if len(uniq) != len(ids):
        problems.append(f"{path} has {len(ids) - len(uniq)} duplicate ids")
    photo = uniq // per_photo
    ok = photo < len(where)
    live = np.zeros(len(uniq), bool)
    live[ok] = where[photo[ok]] == seg
    return uniq[live]


def _index_problems(root: Path) -> tuple[list[str], dict[str, int], Manifest | None, set[int]]:
    """(problems, counts, the live manifest, the segments with a damaged or unreadable file)."""
    problems: list[str] = []
    bad: set[int] = set()
    counts: dict[str, int] = {}
    path = root / CATALOG_FILE
    try:
        db = catalog.open_read(root)  # one commit's view, whatever a writer does meanwhile
        row = next(iter(catalog.latest_manifests(db)), None)
    except sqlite3.DatabaseError as e:
        return [f"{path} is not a readable catalog: {e}"], counts, None, bad
    if row is None:
        return [f"{path} holds no commit"], counts, None, bad
    try:
        m = Manifest.from_json(row, str(path))
    except IndexFormatError as e:
        return [str(e)], counts, None, bad
    try:
        problems += _catalog_problems(db, m, str(path))
        rows = catalog.photo_status(db)
        indexed = np.array(sorted(i for i, s in rows if s == "indexed"), np.int64)
        counts.update(photos_indexed=len(indexed), photos_failed=sum(s == "failed" for _, s in rows), segments=len(m.segments))
        object_rows = np.array(sorted(catalog.object_ids(db)), np.int64)
        where = {table: catalog.segment_of(db, table, m.next_id) for table in ("vec", "objvec")}
        db.close()
    except sqlite3.DatabaseError as e:
        return problems + [f"{path} is not a readable catalog: {e}"], counts, m, bad
    damaged: set[Path] = set()  # files that differ from the commit: checked in a child only, never read here
    for s in m.segments:
        for name, want in s["files"].items():
            f = root / seg_name(s["seg"]) / name
            if f.is_file() and file_digest(f) != want:
                damaged.add(f)
                bad.add(s["seg"])
                problems.append(f"{f} differs from what was committed (size {f.stat().st_size}, expected {want['size']}; "
                                f"checksum mismatch): the file was changed or damaged after the commit")
    g2 = m.grid * m.grid
    for name, table, per_photo, want in ((GLOBAL_FILE, "vec", 1, indexed), (PATCH_FILE, "vec", g2, indexed),
                                         (OBJECT_FILE, "objvec", MAX_OBJECTS, object_rows)):
        got, whole = [], True
        for s in m.segments:
            if name not in s["files"]:
                continue
            live = _live(root / seg_name(s["seg"]) / name, s["seg"], where[table], per_photo, damaged, problems)
            if live is None:
                whole = False
                bad.add(s["seg"])
                continue
            got.append(live)
        if not whole:
            continue
        ids = np.sort(np.concatenate(got)) if got else np.zeros(0, np.int64)
        counts[name] = len(ids)
        if name == OBJECT_FILE:
            if not np.array_equal(ids, want):
                problems.append(f"{root} has {len(ids)} live object vectors; the catalog lists {len(want)} objects "
                                f"({len(np.setdiff1d(want, ids))} without a vector, {len(np.setdiff1d(ids, want))} not in the catalog)")
            continue
        photos = np.unique(ids // per_photo)
        if len(ids) != per_photo * len(want) or not np.array_equal(photos, want):
            missing, extra = np.setdiff1d(want, photos), np.setdiff1d(photos, want)
            problems.append(
                f"{root} has {len(ids)} live {name} vectors for {len(photos)} photos; the catalog has {len(want)} indexed photos "
                f"({len(missing)} without vectors, e.g. {missing[:3].tolist()}; {len(extra)} not in the catalog, e.g. {extra[:3].tolist()})"
            )
    return problems, counts, m, bad


def _store_problems(root: Path, repair: bool) -> tuple[list[str], list[str]]:
    """The external vector store (Milvus) against the catalog: vectors of photos the catalog does not hold as indexed
    (left by a run killed before its commit), indexed photos without vectors, and each collection's index kind
    against the one its size calls for. ``repair`` deletes the former and rebuilds an index of the wrong kind."""
    from indexer.vectors import KINDS, kinds_agree, open_store

    try:
        m = Manifest.load_current(root)
        if not m.store:
            return [], []
        db = catalog.connect_ro(root)
        indexed = np.array(catalog.indexed_ids(db), np.int64)
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
    for kind in KINDS:  # each collection's index kind against the one its size calls for
        have, want = store.index_kind(kind), store.wanted_kind(kind)
        if kinds_agree(have, want):
            continue
        if repair:
            store.fit_index(kind)
            repaired.append(f"rebuilt the {kind} index of {m.store} as {store.index_kind(kind)} (it was {have})")
        else:
            problems.append(f"{m.store}: the {kind} collection's index is {have}, its {store.count(kind)} vectors call for "
                            f"{want} (--repair rebuilds it)")
    if repaired:
        store.flush()
    return problems, repaired


def verify(root: str | os.PathLike, *, repair: bool = False) -> Report:
    """Check the live commit; with ``repair``, fix what is safe to fix: remove unfinished segments, convert a
    format-1 index, and drop a damaged segment (its photos leave the catalog, so the next run embeds them again)."""
    root = Path(root).expanduser()
    report = Report()
    if not root.is_dir():
        report.problems.append(f"no index directory at {root}")
        return report
    if repair and ((root / "CURRENT").is_file() and not (root / CATALOG_FILE).exists()):
        Writer(root, None).close()  # converts in place
        report.repaired.append(f"converted {root} from whole snapshots (format 1) to segments (format 2)")
    if not (root / CATALOG_FILE).is_file():
        report.problems.append(f"{root / CATALOG_FILE} is missing: not a dinosearch index (or an old one: --repair converts it)")
        return report
    problems, report.counts, m, bad = _index_problems(root)
    report.snapshot = f"gen-{m.gen:06d}" if m else None
    report.problems += problems
    named = {s["seg"] for s in m.segments} if m else set()
    leftovers = sorted(p for p in root.glob("seg-*") if p.name.endswith(".tmp") or (m and int(p.name[4:10]) > m.gen))
    if leftovers:
        msg = f"unfinished segment(s) left by an interrupted commit: {', '.join(p.name for p in leftovers)}"
        if repair:
            with Writer(root, None):  # the writer removes them (under the lock: never a live writer's segment)
                pass
            report.repaired.append("removed " + msg)
        else:
            report.problems.append(msg + " (--repair or the next run removes them)")
    bad = sorted(bad & named)
    if repair and bad:
        with Writer(root, None) as w:
            photos = catalog.photos_in_segments(w.db, "vec", bad)
            objs = catalog.photos_in_segments(w.db, "objvec", bad)
            w.delete(photos)
            w.forget_objects(objs)
            w.manifest.segments = [s for s in w.manifest.segments if s["seg"] not in bad]
            w.dirty = True
            w.commit()
        report.repaired.append(f"dropped damaged segment(s) {', '.join(seg_name(s) for s in bad)}: {len(photos)} photos left the "
                               f"catalog and {len(objs)} photos their objects; the next `index` run embeds them again")
        problems, report.counts, m, _ = _index_problems(root)
        report.snapshot, report.problems = f"gen-{m.gen:06d}" if m else None, problems
    elif repair and leftovers:
        report.problems = [p for p in report.problems if not p.startswith("unfinished segment(s)")]
    if m is not None:  # after any repair: the store is checked against the catalog that stays live
        problems, repaired = _store_problems(root, repair)
        report.problems += problems
        report.repaired += repaired
    return report
