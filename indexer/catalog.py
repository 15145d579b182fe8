"""The catalog (IDX/catalog.sqlite): its schema, its connections and every query the other modules run.

The one module with SQL in it. Each function is one query (or one change made of a few statements), named for
what it answers; the writer's functions run inside the writer's open transaction, the readers' inside the
snapshot's read transaction. Paths are stored as bytes (os.fsencode).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.faissio import fsync_dir, fsync_file

if TYPE_CHECKING:
    from indexer.reader import PhotoMeta
    from search.query import Filters

CATALOG_FILE = "catalog.sqlite"

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


def connect_ro(root: Path) -> sqlite3.Connection:
    path = root / CATALOG_FILE
    # autocommit mode: the reader opens its own read transaction (BEGIN) and keeps it while it reads one commit
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)


def open_read(root: Path) -> sqlite3.Connection:
    """A read-only connection inside its own read transaction: every query on it sees one commit."""
    db = connect_ro(root)
    db.execute("BEGIN")
    return db


def create_catalog(root: Path) -> None:
    """A new, empty catalog, made beside its name and renamed into place: a reader polling a new index sees either
    no catalog or one with every table (never a file whose schema is still being written)."""
    tmp = root / (CATALOG_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    db.execute("PRAGMA journal_mode=WAL")  # kept in the file's header
    db.executescript(SCHEMA)
    db.close()  # checkpoints and removes its WAL
    fsync_file(tmp)
    os.replace(tmp, root / CATALOG_FILE)
    fsync_dir(root)


def connect_writer(root: Path) -> sqlite3.Connection:
    """The writer's connection: WAL, a commit durable when it returns, tables added since the catalog was written."""
    db = sqlite3.connect(root / CATALOG_FILE, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns
    db.executescript(SCHEMA)  # tables added since the catalog was written
    return db


def tables(db: sqlite3.Connection) -> set[str]:
    """The catalog's tables (an old catalog lacks some)."""
    return {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _rows(db: sqlite3.Connection, sql: str, args: list) -> list[tuple]:
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # a catalog from before class tags / objects existed
        return []


def _marks(n: int) -> str:
    return ",".join("?" * n)


# ---------------------------------------------------------------- commits


def latest_manifests(db: sqlite3.Connection, n: int = 1) -> list[str]:
    """The manifest JSON of the newest ``n`` commits, newest first (the first is the live manifest)."""
    return [text for (text,) in db.execute("SELECT manifest FROM commits ORDER BY gen DESC LIMIT ?", (n,))]


def live_gen(db: sqlite3.Connection) -> int | None:
    return db.execute("SELECT max(gen) FROM commits").fetchone()[0]


def add_commit(db: sqlite3.Connection, gen: int, manifest: str, *, keep_from: int | None = None) -> None:
    """Insert the new manifest (the live one once the transaction commits); keep only the previous commit's
    (``keep_from``: its generation, when generations skip numbers: segments adopted from Ray workers)."""
    db.execute("INSERT INTO commits (gen, manifest, time) VALUES (?,?,?)", (gen, manifest, time.time()))
    db.execute("DELETE FROM commits WHERE gen < ?", (gen - 1 if keep_from is None else keep_from,))


def copy_format1(src: Path, dst: Path, manifest: str, *, vectors: bool, objects: bool) -> None:
    """A format-1 snapshot's catalog ``src`` as a format-2 catalog at ``dst``: every indexed photo's vectors
    (``vectors``) and objects (``objects``) in segment 1, and one commit (generation 1) with ``manifest``."""
    old = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    db = sqlite3.connect(dst)
    old.backup(db)
    old.close()
    db.executescript(SCHEMA)
    with db:
        if vectors:
            db.execute("INSERT INTO vec (photo_id, seg) SELECT id, 1 FROM photos WHERE status='indexed'")
        if objects:
            db.execute("INSERT INTO objvec (photo_id, seg) SELECT DISTINCT photo_id, 1 FROM objects")
        db.execute("INSERT INTO commits (gen, manifest, time) VALUES (1, ?, ?)", (manifest, time.time()))
    db.close()


# ---------------------------------------------------------------- where live vectors are (vec, objvec)

SEG_TABLES = ("vec", "objvec")  # global and patch vectors; object vectors


def segment_of(db: sqlite3.Connection, table: str, size: int) -> np.ndarray:
    """photo id -> the segment holding its live vectors (0: none), at least ``size`` long."""
    assert table in SEG_TABLES, table
    rows = np.array(db.execute(f"SELECT photo_id, seg FROM {table}").fetchall(), np.int64).reshape(-1, 2)
    where = np.zeros(max(size, int(rows[:, 0].max(initial=0)) + 1), np.int64)
    where[rows[:, 0]] = rows[:, 1]
    return where


def live_segments(db: sqlite3.Connection, table: str, among: list[int] | None = None) -> set[int]:
    """The segments holding some live vectors (``among``: which of these do, one indexed probe each instead of a
    pass over every photo's row: a commit's cost must not grow with the collection)."""
    assert table in SEG_TABLES, table
    if among is not None:
        return {s for s in among if db.execute(f"SELECT 1 FROM {table} WHERE seg=? LIMIT 1", (s,)).fetchone()}
    return {s for (s,) in db.execute(f"SELECT DISTINCT seg FROM {table}")}


def photos_in_segments(db: sqlite3.Connection, table: str, segs: list[int]) -> list[int]:
    assert table in SEG_TABLES, table
    return [i for (i,) in db.execute(f"SELECT photo_id FROM {table} WHERE seg IN ({_marks(len(segs))})", segs)]


def set_vec(db: sqlite3.Connection, photo_ids: Iterable[int], seg: int) -> None:
    db.executemany("INSERT OR REPLACE INTO vec (photo_id, seg) VALUES (?,?)", [(int(i), seg) for i in photo_ids])


def drop_vec(db: sqlite3.Connection, photo_ids: list[int]) -> None:
    """Forget where photos' vectors are (what a segment holds of them becomes a tombstone)."""
    for i in range(0, len(photo_ids), 500):
        chunk = photo_ids[i:i + 500]
        db.execute(f"DELETE FROM vec WHERE photo_id IN ({_marks(len(chunk))})", chunk)


def move_segments(db: sqlite3.Connection, table: str, inputs: list[int], seg: int) -> None:
    """Compaction: the live vectors of segments ``inputs`` are now in ``seg``."""
    assert table in SEG_TABLES, table
    db.execute(f"UPDATE {table} SET seg=? WHERE seg IN ({_marks(len(inputs))})", [seg, *inputs])


# ---------------------------------------------------------------- photos


def known(db: sqlite3.Connection) -> dict[str, tuple[int, int, int, str | None, str]]:
    """path -> (id, size, mtime_ns, hash, status) for every photo in the catalog."""
    rows = db.execute("SELECT path, id, size, mtime_ns, hash, status FROM photos")
    return {os.fsdecode(p): (i, s, m, h, st) for p, i, s, m, h, st in rows}


def upsert_photo(db: sqlite3.Connection, photo_id, path, size, mtime_ns, hash_, width, height, status, error) -> None:
    db.execute(
        "INSERT OR REPLACE INTO photos (id, path, size, mtime_ns, hash, width, height, status, error, updated) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)",
        (photo_id, os.fsencode(path), size, mtime_ns, hash_, width, height, status, error, time.time()),
    )


def move_photo(db: sqlite3.Connection, photo_id: int, path: str, size: int, mtime_ns: int) -> None:
    db.execute("UPDATE photos SET path=?, size=?, mtime_ns=? WHERE id=?", (os.fsencode(path), size, mtime_ns, photo_id))


def touch_photo(db: sqlite3.Connection, photo_id: int, size: int, mtime_ns: int) -> None:
    db.execute("UPDATE photos SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, photo_id))


def delete_photos(db: sqlite3.Connection, photo_ids: list[int]) -> None:
    """Photos' rows, tags and metadata (their objects and vectors are removed apart)."""
    db.executemany("DELETE FROM photos WHERE id=?", [(i,) for i in photo_ids])
    db.executemany("DELETE FROM labels WHERE photo_id=?", [(i,) for i in photo_ids])
    db.executemany("DELETE FROM meta WHERE photo_id=?", [(i,) for i in photo_ids])


def indexed_among(db: sqlite3.Connection, photo_ids: list[int]) -> list[int]:
    """Those of ``photo_ids`` that are indexed photos."""
    return [i for (i,) in db.execute(f"SELECT id FROM photos WHERE status='indexed' AND id IN ({_marks(len(photo_ids))})",
                                     photo_ids)]


def indexed_ids(db: sqlite3.Connection, since: int = 0) -> list[int]:
    """Indexed photos with ids from ``since`` on, in id order (ids are allocated in scan order from 1)."""
    return [i for (i,) in db.execute("SELECT id FROM photos WHERE status='indexed' AND id >= ? ORDER BY id", (int(since),))]


def photo_status(db: sqlite3.Connection) -> list[tuple[int, str]]:
    """(id, status) of every photo."""
    return db.execute("SELECT id, status FROM photos").fetchall()


def status_counts(db: sqlite3.Connection) -> dict[str, int]:
    """status -> photos."""
    return dict(db.execute("SELECT status, count(*) FROM photos GROUP BY status").fetchall())


def failed_photos(db: sqlite3.Connection) -> list[tuple[bytes, str]]:
    """(path, error) of the photos that could not be indexed, by path."""
    return db.execute("SELECT path, error FROM photos WHERE status='failed' ORDER BY path").fetchall()


def indexed_paths(db: sqlite3.Connection) -> list[tuple[int, bytes]]:
    """(id, path) of every indexed photo."""
    return db.execute("SELECT id, path FROM photos WHERE status='indexed'").fetchall()


def paths_of(db: sqlite3.Connection, photo_ids: list[int]) -> dict[int, str]:
    rows = db.execute(f"SELECT id, path FROM photos WHERE id IN ({_marks(len(photo_ids))})", [int(i) for i in photo_ids])
    return {i: os.fsdecode(p) for i, p in rows}


def sizes_of(db: sqlite3.Connection, photo_ids: list[int]) -> dict[int, tuple[int, int]]:
    """photo id -> (width, height)."""
    rows = db.execute(f"SELECT id, width, height FROM photos WHERE id IN ({_marks(len(photo_ids))})", [int(i) for i in photo_ids])
    return {i: (w, h) for i, w, h in rows}


def photo_file(db: sqlite3.Connection, photo_id: int) -> tuple[bytes, int, str | None, str] | None:
    """(path as bytes, size, hash, status) of a photo, or None."""
    return db.execute("SELECT path, size, hash, status FROM photos WHERE id = ?", (int(photo_id),)).fetchone()


def photo_rows(db: sqlite3.Connection, photo_ids: list[int]) -> list[tuple]:
    """(id, path, size, mtime_ns, hash, width, height) of those of ``photo_ids`` (at most 500) that are indexed photos."""
    return db.execute(f"SELECT id, path, size, mtime_ns, hash, width, height FROM photos WHERE status='indexed' "
                      f"AND id IN ({_marks(len(photo_ids))})", photo_ids).fetchall()


def same_hash_groups(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(hash, comma-separated ids) of every content hash two or more indexed photos share."""
    return db.execute("SELECT hash, group_concat(id) FROM photos WHERE status='indexed' AND hash IS NOT NULL "
                      "GROUP BY hash HAVING count(*) > 1").fetchall()


# ---------------------------------------------------------------- class tags


def set_labels(db: sqlite3.Connection, photo_ids: list[int], labels: list[list[tuple[str, float]]]) -> None:
    """Replace the class tags of photos (top-k (label, probability), best first)."""
    clear_labels(db, photo_ids)
    db.executemany("INSERT INTO labels (photo_id, rank, label, prob) VALUES (?,?,?,?)",
                   [(int(i), r, lab, p) for i, tags in zip(photo_ids, labels) for r, (lab, p) in enumerate(tags)])


def clear_labels(db: sqlite3.Connection, photo_ids: list[int] | None = None) -> None:
    """Forget the class tags of photos (of every photo when None: another classifier's)."""
    if photo_ids is None:
        db.execute("DELETE FROM labels")
    else:
        db.executemany("DELETE FROM labels WHERE photo_id=?", [(int(i),) for i in photo_ids])


def unlabelled(db: sqlite3.Connection) -> set[int]:
    """Indexed photos with no class tags."""
    return {i for (i,) in db.execute("SELECT id FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM labels)")}


def photos_with_label(db: sqlite3.Connection, label: str) -> set[int]:
    """Photos with ``label`` among their class tags (case-insensitive)."""
    return {i for (i,) in _rows(db, "SELECT DISTINCT photo_id FROM labels WHERE label = ? COLLATE NOCASE", [label])}


def labels_of(db: sqlite3.Connection, photo_ids: list[int]) -> list[tuple[int, str, float]]:
    """(photo id, label, probability) of photos' tags, by photo and rank."""
    return _rows(db, f"SELECT photo_id, label, prob FROM labels WHERE photo_id IN ({_marks(len(photo_ids))}) ORDER BY photo_id, rank",
                 [int(i) for i in photo_ids])


def label_counts(db: sqlite3.Connection, limit: int) -> list[tuple[str, int]]:
    """Most frequent top-1 tags: (label, photos)."""
    return _rows(db, "SELECT label, count(*) AS n FROM labels WHERE rank = 0 GROUP BY label ORDER BY n DESC, label LIMIT ?", [limit])


def label_names(db: sqlite3.Connection) -> list[str]:
    """Every distinct tag."""
    return [lab for (lab,) in _rows(db, "SELECT DISTINCT label FROM labels", [])]


def photo_labels(db: sqlite3.Connection) -> list[tuple[int, str]]:
    """(photo id, label) of every tag."""
    return db.execute("SELECT photo_id, label FROM labels").fetchall()


# ---------------------------------------------------------------- objects


def add_objects(db: sqlite3.Connection, photo_id: int, seg: int, ids: Iterable[int],
                objects: list[tuple[tuple[float, float, float, float], float, dict]]) -> None:
    """A photo's SAM objects (box, score, RLE mask), their vectors in segment ``seg``."""
    db.execute("INSERT OR REPLACE INTO objvec (photo_id, seg) VALUES (?,?)", (int(photo_id), seg))
    db.executemany(
        "INSERT INTO objects (id, photo_id, x0, y0, x1, y1, score, mask) VALUES (?,?,?,?,?,?,?,?)",
        [(int(i), int(photo_id), *map(float, box), float(score), json.dumps(rle, separators=(",", ":")))
         for i, (box, score, rle) in zip(ids, objects)])


def mark_segmented(db: sqlite3.Connection, photo_id: int) -> None:
    db.execute("INSERT OR REPLACE INTO segmented (photo_id) VALUES (?)", (int(photo_id),))


def unsegmented(db: sqlite3.Connection) -> set[int]:
    """Indexed photos SAM has not looked at yet."""
    return {i for (i,) in db.execute("SELECT id FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM segmented)")}


def remove_objects(db: sqlite3.Connection, photo_ids: list[int]) -> list[int]:
    """Forget photos' objects (they count as not segmented; their object vectors become tombstones): the object ids."""
    q, args = _marks(len(photo_ids)), [int(i) for i in photo_ids]
    ids = [i for (i,) in db.execute(f"SELECT id FROM objects WHERE photo_id IN ({q})", args)]
    db.execute(f"DELETE FROM objects WHERE photo_id IN ({q})", args)
    db.execute(f"DELETE FROM segmented WHERE photo_id IN ({q})", args)
    db.execute(f"DELETE FROM objvec WHERE photo_id IN ({q})", args)  # tombstones
    return ids


def reset_objects(db: sqlite3.Connection) -> None:
    """Forget every object (every object segment is dead: the next commit drops them)."""
    db.execute("DELETE FROM objects")
    db.execute("DELETE FROM segmented")
    db.execute("DELETE FROM objvec")


def object_ids(db: sqlite3.Connection) -> list[int]:
    return [i for (i,) in db.execute("SELECT id FROM objects")]


def objects_of(db: sqlite3.Connection, photo_ids: list[int]) -> list[tuple]:
    """(id, photo id, x0, y0, x1, y1, score, mask JSON) of photos' objects, by id."""
    return _rows(db, f"SELECT id, photo_id, x0, y0, x1, y1, score, mask FROM objects WHERE photo_id IN ({_marks(len(photo_ids))}) "
                 f"ORDER BY id", [int(i) for i in photo_ids])


def object_photos(db: sqlite3.Connection, photo_ids: list[int]) -> list[tuple[int, int]]:
    """(object id, photo id) of photos' objects."""
    return _rows(db, f"SELECT id, photo_id FROM objects WHERE photo_id IN ({_marks(len(photo_ids))})", [int(i) for i in photo_ids])


def object_count(db: sqlite3.Connection) -> int:
    rows = _rows(db, "SELECT count(*) FROM objects", [])
    return int(rows[0][0]) if rows else 0


# ---------------------------------------------------------------- metadata


def set_meta(db: sqlite3.Connection, photo_id: int, path: str, meta: PhotoMeta) -> None:
    """Replace what is known of a photo's date, camera, position (and its folder, from ``path``)."""
    db.execute(
        "INSERT OR REPLACE INTO meta (photo_id, taken, taken_source, make, model, lat, lon, orientation, folder) "
        "VALUES (?,?,?,?,?,?,?,?,?)",
        (int(photo_id), meta.taken, meta.taken_source, meta.make, meta.model, meta.lat, meta.lon, meta.orientation,
         os.fsencode(os.path.dirname(path))))


def clear_meta(db: sqlite3.Connection, photo_ids: list[int]) -> None:
    db.executemany("DELETE FROM meta WHERE photo_id=?", [(int(i),) for i in photo_ids])


def without_meta(db: sqlite3.Connection) -> dict[int, tuple[str, int]]:
    """Indexed photos with no metadata row yet (an index from before metadata): id -> (path, mtime_ns)."""
    return {i: (os.fsdecode(p), m) for i, p, m in db.execute(
        "SELECT id, path, mtime_ns FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM meta)")}


def meta_columns(db: sqlite3.Connection) -> list[tuple]:
    """(photo id, taken, make, model, lat, lon, folder) of every metadata row."""
    return db.execute("SELECT photo_id, taken, make, model, lat, lon, folder FROM meta").fetchall()


def exif_counts(db: sqlite3.Connection, photo_ids: list[int]) -> dict[int, int]:
    """EXIF fields each photo's header filled (a date from EXIF, not the file's mtime; make; model; GPS position;
    orientation). A catalog from before metadata: {}."""
    sql = (f"SELECT photo_id, (taken_source IS NOT NULL AND taken_source != 'mtime') + (make IS NOT NULL) + "
           f"(model IS NOT NULL) + (lat IS NOT NULL AND lon IS NOT NULL) + (orientation IS NOT NULL) "
           f"FROM meta WHERE photo_id IN ({_marks(len(photo_ids))})")
    try:
        return dict(db.execute(sql, photo_ids).fetchall())
    except sqlite3.Error:
        return {}


# ---------------------------------------------------------------- checks (verify)


def integrity_ok(db: sqlite3.Connection) -> bool:
    """SQLite's quick_check."""
    return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def max_photo_id(db: sqlite3.Connection) -> int | None:
    return db.execute("SELECT max(id) FROM photos").fetchone()[0]


def orphan_rows(db: sqlite3.Connection, table: str) -> tuple[int, int | None]:
    """(count, smallest photo id) of ``table`` rows naming photos without vectors: vec rows of photos not indexed,
    objvec rows of photos SAM has not looked at."""
    assert table in SEG_TABLES, table
    what = "photos p WHERE p.status='indexed'" if table == "vec" else "segmented p"
    return db.execute(f"SELECT count(*), min(v.photo_id) FROM {table} v WHERE v.photo_id NOT IN "
                      f"(SELECT {'p.id' if table == 'vec' else 'p.photo_id'} FROM {what})").fetchone()


def without_vectors(db: sqlite3.Connection) -> tuple[int, int | None]:
    """(count, smallest id) of indexed photos with no vec row."""
    return db.execute("SELECT count(*), min(id) FROM photos WHERE status='indexed' AND id NOT IN (SELECT photo_id FROM vec)").fetchone()


# ---------------------------------------------------------------- browsing (photos p LEFT JOIN meta m)

BROWSE_ORDER = {"taken": "m.taken IS NULL, m.taken", "added": "p.id", "path": "p.path"}


def filter_sql(f: Filters) -> tuple[str, list]:
    """WHERE clause over photos p LEFT JOIN meta m for every filter but the distance (checked in numpy)."""
    conds, args = ["p.status = 'indexed'"], []
    if f.label:
        conds.append("p.id IN (SELECT photo_id FROM labels WHERE label = ? COLLATE NOCASE)")
        args.append(f.label)
    if f.taken_after:
        conds.append("m.taken >= ?")
        args.append(f.taken_after)
    if f.taken_before:
        conds.append("m.taken < ?")
        args.append(f.taken_before)
    if f.camera:
        conds.append("coalesce(m.make, m.model) IS NOT NULL AND "  # without a camera, never (not even for " ")
                     "instr(lower(coalesce(m.make, '') || ' ' || coalesce(m.model, '')), lower(?)) > 0")
        args.append(f.camera)
    if f.folder:
        top = os.fsencode(os.path.abspath(os.path.expanduser(f.folder))).rstrip(b"/") or b"/"
        below = top if top == b"/" else top + b"/"
        conds.append("(m.folder = ? OR substr(m.folder, 1, ?) = ?)")
        args += [top, len(below), below]
    if f.near:
        lat, _, km = f.near
        band = km / 111.0 + 0.01  # degrees of latitude the radius can span (1 degree >= 110.5 km)
        conds.append("m.lat BETWEEN ? AND ? AND m.lon IS NOT NULL")
        args += [lat - band, lat + band]
    return " AND ".join(conds), args


def _info_columns(db: sqlite3.Connection) -> tuple[bool, str, str]:
    """(whether the catalog has metadata, the PhotoInfo columns after p.id, p.path, p.width, p.height, the join)."""
    has_meta = "meta" in tables(db)
    cols = ("m.taken, m.taken_source, m.make, m.model, m.lat, m.lon, m.folder" if has_meta
            else "NULL, NULL, NULL, NULL, NULL, NULL, NULL")
    return has_meta, cols, "LEFT JOIN meta m ON m.photo_id = p.id" if has_meta else ""


def _browse_sql(db: sqlite3.Connection, f: Filters, sort: str, order: str) -> tuple[str, str, list]:
    where, args = filter_sql(f)
    has_meta, cols, join = _info_columns(db)
    keys = BROWSE_ORDER[sort] if has_meta or sort != "taken" else "p.id"
    direction = "DESC" if order == "desc" else "ASC"
    by = ", ".join(f"{c} {direction}" if not c.endswith("IS NULL") else c for c in keys.split(", "))
    sql = f"SELECT p.id, p.path, p.width, p.height, {cols} FROM photos p {join} WHERE {where} ORDER BY {by}, p.id {direction}"
    return sql, f"SELECT count(*) FROM photos p {join} WHERE {where}", args


def browse_all(db: sqlite3.Connection, f: Filters, sort: str, order: str) -> list[tuple]:
    """Every info row (id, path, width, height, taken, taken_source, make, model, lat, lon, folder) ``f``'s SQL
    lets through, sorted (``sort``: a BROWSE_ORDER key; photos without a date last whatever the order)."""
    sql, _, args = _browse_sql(db, f, sort, order)
    return db.execute(sql, args).fetchall()


def browse_page(db: sqlite3.Connection, f: Filters, sort: str, order: str, offset: int, limit: int) -> tuple[int, list[tuple]]:
    """(how many rows ``f``'s SQL lets through, the page of them at ``offset``), rows as browse_all's."""
    sql, count, args = _browse_sql(db, f, sort, order)
    total = db.execute(count, args).fetchone()[0]
    return total, db.execute(f"{sql} LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()


def photo_info(db: sqlite3.Connection, photo_id: int) -> list[tuple]:
    """One indexed photo's info row (as browse_all's), or none."""
    _, cols, join = _info_columns(db)
    return db.execute(f"SELECT p.id, p.path, p.width, p.height, {cols} FROM photos p {join} "
                      "WHERE p.id = ? AND p.status = 'indexed'", [photo_id]).fetchall()
