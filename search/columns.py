"""The catalog's filterable fields as numpy columns, and a Filters evaluated over them as a mask of photo ids.

Read once per commit an Engine holds (its read transaction keeps the rows still), so a filtered query costs a few
numpy passes over arrays indexed by photo id instead of listing the passing photos in SQL each time. Strings
are category codes: a camera substring or a folder prefix is tested once per distinct string, then the codes are
looked up; dates are codes into their sorted distinct values, so a range is two binary searches. The semantics
are the SQL's (``indexer.catalog.filter_sql``, which ``Engine.browse`` still uses): a photo without the field never
passes, text comparisons fold ASCII case only (SQLite's lower() and NOCASE).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

import numpy as np

from indexer import catalog
from search.query import Filters, great_circle_km


def _codes(values: list) -> tuple[np.ndarray, list]:
    """Category codes (-1 for None) and the distinct values, in order of first appearance."""
    seen: dict = {}
    codes = np.fromiter((-1 if v is None else seen.setdefault(v, len(seen)) for v in values), np.int32, len(values))
    return codes, list(seen)


def _ascii_lower(s: str) -> bytes:
    """SQLite's lower() / NOCASE: ASCII letters only (bytes.lower folds nothing else)."""
    return s.encode("utf-8", "surrogatepass").lower()


@dataclass
class Columns:
    """Every field a Filters tests, per photo id (arrays of length max id + 1)."""

    indexed: np.ndarray  # bool: status 'indexed'
    meta: bool  # the catalog has the meta table (an index from before it answers metadata filters with an error)
    has_meta: np.ndarray  # bool: the photo has a meta row
    taken: np.ndarray  # int32 code into taken_values, -1 unknown
    taken_values: np.ndarray  # sorted distinct ISO dates (str)
    camera: np.ndarray  # int32 code into cameras, -1 without a make or a model
    cameras: list[bytes]  # distinct ASCII-lowered "make model" (either may be empty)
    lat: np.ndarray  # float64, NaN unknown
    lon: np.ndarray
    folder: np.ndarray  # int32 code into folders, -1 without a meta row
    folders: list[bytes]  # distinct os.fsencode'd folders
    label_photo: np.ndarray  # int64: one row per (photo, top-5 tag) ...
    label_code: np.ndarray  # int32: ... its tag, a code into labels
    labels: list[str]

    @classmethod
    def read(cls, db: sqlite3.Connection) -> Columns:
        ids, status = [], []
        for i, s in catalog.photo_status(db):
            ids.append(i)
            status.append(s == "indexed")
        top = max(ids, default=0) + 1
        indexed = np.zeros(top, bool)
        indexed[np.array(ids, np.int64)] = status
        tables = catalog.tables(db)
        rows = catalog.meta_columns(db) if "meta" in tables else []
        pid, taken, make, model, lat, lon, folder = (list(c) for c in zip(*rows)) if rows else ([],) * 7
        pid = np.array(pid, np.int64)
        keep = pid < top  # a meta row always has its photo; guard the arrays anyway

        def column(values, dtype, fill):
            out = np.full(top, fill, dtype)
            out[pid[keep]] = np.asarray(values, dtype)[keep]
            return out

        has_meta = column(np.ones(len(pid), bool), bool, False)
        known = np.array([t is not None for t in taken], bool)
        uniq, inv = np.unique(np.array([t for t in taken if t is not None], str), return_inverse=True)
        tcode = np.full(len(taken), -1, np.int32)
        tcode[known] = inv.reshape(-1)
        cam, cameras = _codes([None if mk is None and md is None else _ascii_lower(f"{mk or ''} {md or ''}")
                               for mk, md in zip(make, model)])
        fold, folders = _codes([bytes(f) for f in folder])
        labels = catalog.photo_labels(db) if "labels" in tables else []
        lcode, names = _codes([lab for _, lab in labels])
        return cls(indexed, "meta" in tables, has_meta, column(tcode, np.int32, -1), uniq, column(cam, np.int32, -1),
                   cameras, column(np.array([np.nan if v is None else v for v in lat], float), float, np.nan),
                   column(np.array([np.nan if v is None else v for v in lon], float), float, np.nan),
                   column(fold, np.int32, -1), folders, np.array([p for p, _ in labels], np.int64), lcode, names)

    def label_codes(self, label: str) -> np.ndarray:
        """Codes of the stored tags equal to ``label`` but for ASCII case (SQLite's NOCASE)."""
        want = _ascii_lower(label)
        return np.array([c for c, lab in enumerate(self.labels) if _ascii_lower(lab) == want], np.int32)

    def mask(self, f: Filters) -> np.ndarray:
        """bool [max id + 1]: the indexed photos ``f`` lets through."""
        ok = self.indexed.copy()
        if f.label:
            tagged = np.zeros(len(ok), bool)
            rows = self.label_photo[np.isin(self.label_code, self.label_codes(f.label))]
            tagged[rows[rows < len(ok)]] = True
            ok &= tagged
        if any(v not in (None, "") for v in (f.taken_after, f.taken_before, f.camera, f.near, f.folder)):
            ok &= self.has_meta
        if f.taken_after or f.taken_before:
            lo = np.searchsorted(self.taken_values, f.taken_after, "left") if f.taken_after else 0
            hi = np.searchsorted(self.taken_values, f.taken_before, "left") if f.taken_before else len(self.taken_values)
            # lo <= taken < hi in one comparison: taken - lo as unsigned wraps unknown (-1) and earlier dates high
            ok &= (self.taken - np.int32(lo)).view(np.uint32) < np.uint32(max(0, hi - lo))
        if f.camera:
            needle = _ascii_lower(f.camera)
            ok &= np.isin(self.camera, [c for c, s in enumerate(self.cameras) if needle in s])
        if f.folder:
            top = os.fsencode(os.path.abspath(os.path.expanduser(f.folder))).rstrip(b"/") or b"/"
            below = top if top == b"/" else top + b"/"
            ok &= np.isin(self.folder, [c for c, s in enumerate(self.folders) if s == top or s.startswith(below)])
        if f.near:
            lat, lon, km = f.near
            band = km / 111.0 + 0.01  # as the SQL's latitude band (1 degree >= 110.5 km)
            at = np.flatnonzero(ok & (np.abs(self.lat - lat) <= band) & ~np.isnan(self.lon))
            ok[:] = False
            ok[at[great_circle_km(self.lat[at], self.lon[at], lat, lon) <= km]] = True
        return ok
