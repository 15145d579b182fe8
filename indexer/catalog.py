"""The catalog (IDX/catalog.sqlite): its schema and connections."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from indexer.faissio import fsync_dir, fsync_file

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

