"""Duplicates and same-shot groups: global candidates, patch-level geometric verification, groups, keepers.

Two levels. (1) Candidates: every photo's k nearest neighbours in the global (CLS) index above a cosine
floor — a k-NN search in batches, never an n x n matrix; IVF indexes are searched with ``nprobe`` lists.
(2) Verification of each candidate pair on the stored patch grids (no re-embedding): mutual nearest
patches, then for each of the 8 flips / 90-degree rotations of the second grid, the per-axis scale +
shift (crops, resizes, aspect changes) that most matches agree on (hypotheses from pairs of the strongest
matches, inliers within one cell, refit by least squares). The verified score is the share of the
overlapping cells that agree; the overlap box is given in each photo's pixels.

Pairs with same content hash, or the same decoded pixels (checked only for pairs whose grids verify on the
identity transform at the same size), are ``exact``. Groups: union of exact and edited links (a chain of
edits of one shot is one shot); ``similar`` links (bursts) merge two groups only if every cross pair is
itself a verified link (complete linkage), so a long chain of weak links cannot merge a whole collection.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.errors import DinosearchError
from indexer.segments import SegmentedIndex

log = logging.getLogger(__name__)

KINDS = ("exact", "edited", "similar")


class BadDuplicateQuery(DinosearchError):
    """A malformed duplicates request (unknown kind, threshold outside 0..1)."""


class MoveError(DinosearchError):
    """A move plan or manifest that cannot be used (unreadable manifest, destination inside the collection)."""


@dataclass(frozen=True)
class DuplicateConfig:
    k: int = 16  # neighbours per photo from the global index
    min_cosine: float = 0.5  # CLS cosine floor of a candidate pair
    threshold: float = 0.3  # verified score (share of the overlap that agrees) below which a pair is not linked
    edited: float = 0.6  # verified score from which a link is the same shot (edited), below it a similar shot
    min_matches: int = 8  # mutual nearest patches agreeing on the transform a verified link needs at least
    nprobe: int = 64  # IVF lists searched per photo (see scripts/bench_duplicates.py for recall)
    kind: str | None = None  # only groups of this kind
    pixels: bool = True  # decode files to tell same-pixel copies (exact) from edits

    def __post_init__(self):
        if self.kind is not None and self.kind not in KINDS:
            raise BadDuplicateQuery(f"unknown kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("threshold", "edited", "min_cosine"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise BadDuplicateQuery(f"{name} must be between 0 and 1, got {v:g}")
        if self.k < 1:
            raise BadDuplicateQuery(f"k must be at least 1, got {self.k}")


# ---------------------------------------------------------------- level 1: candidates

def _search(index, xq: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """k-NN with ``nprobe`` IVF lists for this search only, on a FAISS index or the store's SegmentedIndex."""
    if isinstance(index, SegmentedIndex):
        return index.search(xq, k, nprobe=nprobe)
    ivf = faiss.try_extract_index_ivf(index)
    params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe)) if ivf is not None else None  # the index's own
    return index.search(xq, k, params=params)


def candidate_pairs(index: faiss.Index, ids: np.ndarray, xb: np.ndarray, k: int, min_cosine: float,
                    *, nprobe: int = 64, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of ids whose global vectors are among each other's k nearest with cosine >= min_cosine.

    index: the global index (inner product on L2-normalized vectors); ids [n], xb [n, D] its vectors.
    Returns (pairs int64 [m, 2], cosine float32 [m]), sorted, each pair once.
    """
    ids = np.asarray(ids, np.int64)
    assert len(ids) == len(xb), (len(ids), xb.shape)
    if not len(ids) or index.ntotal < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    kk = min(k + 1, int(index.ntotal))  # nprobe (what searches use) is left as it is: the search carries its own
    out_p, out_d = [], []
    for s in range(0, len(ids), batch):
        xq = np.ascontiguousarray(xb[s:s + batch], dtype=np.float32)
        D, I = _search(index, xq, kk, nprobe)
        q = np.repeat(ids[s:s + batch], kk)
        I, D = I.ravel(), D.ravel()
        ok = (I >= 0) & (I != q) & (D >= min_cosine)
        a, b = np.minimum(q[ok], I[ok]), np.maximum(q[ok], I[ok])
        out_p.append(np.stack([a, b], 1))
        out_d.append(D[ok])
    pairs, cos = np.concatenate(out_p), np.concatenate(out_d).astype(np.float32)
    if not len(pairs):
        return pairs, cos
    key = pairs[:, 0] * (int(pairs.max()) + 1) + pairs[:, 1]
    _, first = np.unique(key, return_index=True)
    return pairs[first], cos[first]


# ---------------------------------------------------------------- level 2: verification

# the 8 symmetries of the square grid: (transpose, flip rows, flip cols) applied to the second photo's cells
DIHEDRAL = [(t, fr, fc) for t in (False, True) for fr in (False, True) for fc in (False, True)]
DIHEDRAL_NAMES = {(False, False, False): "none", (False, False, True): "mirror", (False, True, False): "flip",
                  (False, True, True): "rotate 180", (True, False, False): "transpose", (True, True, False): "rotate 90",
                  (True, False, True): "rotate 270", (True, True, True): "anti-transpose"}


@dataclass(frozen=True)
class Match:
    """The verified relation of photo a to photo b on their patch grids."""

    score: float  # share of the overlapping cells whose mutual best matches agree on the transform
    matches: int  # agreeing (inlier) patch pairs
    transform: str  # DIHEDRAL_NAMES of the grid symmetry, e.g. "mirror"
    scale: tuple[float, float]  # (rows, cols) of b's (transformed) grid per cell of a's
    shift: tuple[float, float]
    cells_a: tuple[int, int, int, int]  # overlap in a's grid: col0, row0, col1, row1 (exclusive)
    cells_b: tuple[int, int, int, int]  # the same in b's grid (its own orientation)
    similarity: float  # mean patch cosine of the agreeing matches

    @property
    def identity(self) -> bool:
        """Same framing: no symmetry, scale 1, no shift (within a cell)."""
        return (self.transform == "none" and abs(self.scale[0] - 1) < 0.05 and abs(self.scale[1] - 1) < 0.05
                and abs(self.shift[0]) < 0.5 and abs(self.shift[1]) < 0.5)


def _to_grid(r: np.ndarray, c: np.ndarray, g: int, sym: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Cells (r, c) of a grid seen through a symmetry: transpose, then flip rows, then flip columns."""
    t, fr, fc = sym
    if t:
        r, c = c, r
    if fr:
        r = g - 1 - r
    if fc:
        c = g - 1 - c
    return r, c


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = s*x + t (s = 1 when x has no spread)."""
    if np.ptp(x) < 1e-6:
        return 1.0, float(np.mean(y - x))
    s, t = np.polyfit(x.astype(np.float64), y.astype(np.float64), 1)
    return float(s), float(t)


def _agreement(sim: np.ndarray, grid: int, sym, fy: tuple[float, float], fx: tuple[float, float], tau: float,
               top: np.ndarray, mid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of a inside the overlap, and whether each agrees: some cell of b within one cell of where the
    transform maps it is within ``tau`` of a's best match anywhere in b (so flat regions, where many cells tie,
    agree as they should); ``tau`` is a share of the gap between a's best and its median match, so photos whose
    patches are all alike (random weights) do not agree by default. Returns (cells of a in the overlap, agree [bool], their b cells in b's own grid)."""
    r = np.repeat(np.arange(grid), grid).astype(np.float64)
    c = np.tile(np.arange(grid), grid).astype(np.float64)
    rb, cb = fy[0] * r + fy[1], fx[0] * c + fx[1]
    inside = (rb > -0.5) & (rb < grid - 0.5) & (cb > -0.5) & (cb < grid - 0.5)
    cells = np.flatnonzero(inside)
    rb, cb = np.rint(rb[inside]).astype(int), np.rint(cb[inside]).astype(int)
    best = np.full(len(cells), -np.inf, np.float32)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = np.clip(rb + dr, 0, grid - 1), np.clip(cb + dc, 0, grid - 1)
            r0, c0 = _from_grid(rr, cc, grid, sym)
            best = np.maximum(best, sim[cells, r0 * grid + c0])
    r0, c0 = _from_grid(rb, cb, grid, sym)
    top, mid = top[cells], mid[cells]  # each row's best and median match, computed once per pair
    return cells, best >= top - tau * (top - mid), r0 * grid + c0


def _from_grid(r: np.ndarray, c: np.ndarray, g: int, sym: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of _to_grid: cells seen through a symmetry -> the grid's own cells."""
    t, fr, fc = sym
    if fc:
        c = g - 1 - c
    if fr:
        r = g - 1 - r
    if t:
        r, c = c, r
    return r, c


def verify(xa: np.ndarray, xb: np.ndarray, grid: int, *, min_matches: int = 8, tol: float = 1.0, tau: float = 0.1,
           max_scale: float = 4.0, hypotheses: int = 24) -> Match | None:
    """Geometric verification of two photos on their patch grids.

    xa, xb: [grid*grid, D] patch vectors (row-major cells), L2-normalized (approximately: decoded codes).
    Mutual nearest patches are found once. Each of the 8 grid symmetries reinterprets b's cells; the per-axis
    scale + shift most mutual matches agree on (within ``tol`` cells) is found from pairs of the
    ``hypotheses`` strongest matches and refit on its inliers by least squares. The transform is then scored
    from both sides: the share of each photo's overlapping cells whose mapped cell (or a neighbour) is within
    ``tau`` (of the gap to the median) of their best match anywhere in the other photo; the score is the smaller share. Returns the best
    symmetry's Match, or None when fewer than ``min_matches`` mutual matches agree on any transform.
    """
    g2 = grid * grid
    assert xa.shape == xb.shape and xa.shape[0] == g2, (xa.shape, xb.shape, grid)
    sim = np.asarray(xa, np.float32) @ np.asarray(xb, np.float32).T
    ia, ib = sim.argmax(1), sim.argmax(0)
    a = np.flatnonzero(ib[ia] == np.arange(g2))  # mutual nearest: a's cell a[i] <-> b's cell ia[a[i]]
    if len(a) < min_matches:
        return None
    b = ia[a]
    s = sim[a, b]
    ra, ca = (a // grid).astype(np.float64), (a % grid).astype(np.float64)
    rb0, cb0 = b // grid, b % grid
    top_a, mid_a = sim.max(1), np.median(sim, 1)
    top_b, mid_b = sim.max(0), np.median(sim, 0)
    top = np.argsort(-s, kind="stable")[:hypotheses]
    i, j = np.triu_indices(len(top), 1)
    i, j = top[i], top[j]
    best = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for sym in DIHEDRAL:
            rb, cb = (v.astype(np.float64) for v in _to_grid(rb0, cb0, grid, sym))
            ok = (np.abs(ra[j] - ra[i]) >= 1) & (np.abs(ca[j] - ca[i]) >= 1)
            hi, hj = i[ok], j[ok]
            sy, sx = (rb[hj] - rb[hi]) / (ra[hj] - ra[hi]), (cb[hj] - cb[hi]) / (ca[hj] - ca[hi])
            ok = (sy > 1 / max_scale) & (sy < max_scale) & (sx > 1 / max_scale) & (sx < max_scale)
            ok &= np.abs(np.log(np.where(ok, sy / sx, 1.0))) < np.log(2.5)  # an aspect change of at most 2.5x
            hi, sy, sx = hi[ok], sy[ok], sx[ok]
            # the plain-shift hypotheses (scale 1) from every single match, so few matches still give one
            sy = np.concatenate([sy, np.ones(len(top))])
            sx = np.concatenate([sx, np.ones(len(top))])
            hi = np.concatenate([hi, top])
            ty, tx = rb[hi] - sy * ra[hi], cb[hi] - sx * ca[hi]
            inl = (np.abs(sy[:, None] * ra[None] + ty[:, None] - rb[None]) <= tol) & \
                  (np.abs(sx[:, None] * ca[None] + tx[:, None] - cb[None]) <= tol)
            h = int(inl.sum(1).argmax())
            m = inl[h]
            fy, fx = (float(sy[h]), float(ty[h])), (float(sx[h]), float(tx[h]))
            for _ in range(2):  # refit on the inliers by least squares, kept if it agrees with no fewer
                ny, nx = _fit(ra[m], rb[m]), _fit(ca[m], cb[m])
                if not (1 / max_scale < ny[0] < max_scale and 1 / max_scale < nx[0] < max_scale):
                    break
                m2 = (np.abs(ny[0] * ra + ny[1] - rb) <= tol) & (np.abs(nx[0] * ca + nx[1] - cb) <= tol)
                if m2.sum() < m.sum():
                    break
                m, fy, fx = m2, ny, nx
            n = int(m.sum())
            if n < min_matches:
                continue
            cells_a, agree_a, _ = _agreement(sim, grid, sym, fy, fx, tau, top_a, mid_a)
            inv_y, inv_x = (1 / fy[0], -fy[1] / fy[0]), (1 / fx[0], -fx[1] / fx[0])
            # b's side: b's cells (in the symmetric view) mapped back into a
            own = _view(grid, sym)
            cells_bt, agree_b, _ = _agreement(sim.T[own], grid, _IDENTITY, inv_y, inv_x, tau, top_b[own], mid_b[own])
            if not len(cells_a) or not len(cells_bt):
                continue
            score = min(agree_a.mean(), agree_b.mean())
            mean_sim = float(s[m].mean())
            if best is None or score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and n > best[1]):
                ok_a = cells_a[agree_a] if agree_a.any() else cells_a
                ok_bt = cells_bt[agree_b] if agree_b.any() else cells_bt
                rbo, cbo = _from_grid(ok_bt // grid, ok_bt % grid, grid, sym)
                best = (float(score), n, sym, fy, fx, mean_sim, ok_a, (rbo, cbo))
    if best is None:
        return None
    score, n, sym, fy, fx, mean_sim, ok_a, (rbo, cbo) = best
    rr, cc = ok_a // grid, ok_a % grid
    cells_a = (int(cc.min()), int(rr.min()), int(cc.max()) + 1, int(rr.max()) + 1)
    cells_b = (int(cbo.min()), int(rbo.min()), int(cbo.max()) + 1, int(rbo.max()) + 1)
    return Match(score, n, DIHEDRAL_NAMES[sym], (round(fy[0], 3), round(fx[0], 3)), (round(fy[1], 2), round(fx[1], 2)),
                 cells_a, cells_b, round(mean_sim, 4))


_IDENTITY = (False, False, False)


def _view(grid: int, sym) -> np.ndarray:
    """b's own cell under each cell of its symmetric view (index k of the result = view cell k)."""
    k = np.arange(grid * grid)
    r0, c0 = _from_grid(k // grid, k % grid, grid, sym)
    return r0 * grid + c0


def cells_to_box(cells: tuple[int, int, int, int], size: tuple[int, int], grid: int) -> tuple[int, int, int, int]:
    """Grid cells (col0, row0, col1, row1) -> pixel box (x0, y0, x1, y1) of a photo of size (w, h)."""
    w, h = size
    c0, r0, c1, r1 = cells
    return (int(c0 * w / grid), int(r0 * h / grid), int(np.ceil(c1 * w / grid)), int(np.ceil(r1 * h / grid)))


# ---------------------------------------------------------------- photos, pixels, keepers

@dataclass
class Photo:
    id: int
    path: str
    width: int
    height: int
    bytes: int
    mtime_ns: int
    hash: str | None
    exif: int = 0  # filled EXIF fields, when the catalog records them (0 otherwise)
    present: bool = True  # the file is still there, unchanged in size, since it was indexed

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _exif_counts(db: sqlite3.Connection, ids: list[int]) -> dict[int, int]:
    """EXIF fields each photo's header filled (the catalog's `meta` table: a date from EXIF, not the file's
    mtime; make; model; GPS position; orientation). A catalog from before metadata: {} (the criterion is skipped)."""
    q = ",".join("?" * len(ids))
    sql = (f"SELECT photo_id, (taken_source IS NOT NULL AND taken_source != 'mtime') + (make IS NOT NULL) + "
           f"(model IS NOT NULL) + (lat IS NOT NULL AND lon IS NOT NULL) + (orientation IS NOT NULL) "
           f"FROM meta WHERE photo_id IN ({q})")
    try:
        return dict(db.execute(sql, ids).fetchall())
    except sqlite3.Error:
        return {}


def load_photos(db: sqlite3.Connection, ids: list[int]) -> dict[int, Photo]:
    """Catalog rows of indexed photos, with whether each file is still there as it was indexed."""
    out: dict[int, Photo] = {}
    for s in range(0, len(ids), 500):
        chunk = [int(i) for i in ids[s:s + 500]]
        q = ",".join("?" * len(chunk))
        for i, p, size, mt, h, w, hh in db.execute(
                f"SELECT id, path, size, mtime_ns, hash, width, height FROM photos WHERE status='indexed' AND id IN ({q})", chunk):
            path = os.fsdecode(p)
            try:
                st = os.stat(path)
                present = st.st_size == size
            except OSError:
                present = False
            out[i] = Photo(i, path, w or 0, hh or 0, size, mt, h, present=present)
        for i, n in _exif_counts(db, chunk).items():
            if i in out:
                out[i].exif = int(n)
    return out


def pixel_digest(path: str, max_pixels: int) -> str | None:
    """blake2b of a photo's decoded, oriented RGB pixels at full size (None if it cannot be read)."""
    from indexer.reader import open_photo, read_file

    try:
        img, _ = open_photo(read_file(path), draft_size=0, max_pixels=max_pixels)
    except (DinosearchError, OSError):
        return None
    a = np.asarray(img, np.uint8)
    return hashlib.blake2b(a.tobytes() + repr(a.shape).encode(), digest_size=16).hexdigest()


def choose_keeper(photos: list[Photo]) -> tuple[int | None, list[str]]:
    """The photo to keep: present on disk, then most pixels, then most EXIF fields, then oldest; with the reasons."""
    alive = [p for p in photos if p.present]
    if not alive:
        return None, ["no file of the group is still where it was indexed: re-run `dinosearch index`"]
    best = min(alive, key=lambda p: (-p.pixels, -p.exif, p.mtime_ns, p.id))
    others = [p for p in alive if p.id != best.id]
    reasons = []
    if len(alive) < len(photos):
        reasons.append(f"{len(photos) - len(alive)} file(s) gone or changed since indexing, not offered")
    if others and all(best.pixels > p.pixels for p in others):
        reasons.append(f"most pixels ({best.width}x{best.height})")
    elif others:
        tied = [p for p in others if p.pixels == best.pixels]
        reasons.append(f"most pixels ({best.width}x{best.height}, tied with {len(tied)})")
        tied_exif = [p for p in tied if p.exif == best.exif]
        if tied and len(tied_exif) < len(tied):
            reasons.append(f"most EXIF fields ({best.exif})")
        elif tied_exif:
            reasons.append("oldest" if any(p.mtime_ns > best.mtime_ns for p in tied_exif) else "lowest id")
    return best.id, reasons


# ---------------------------------------------------------------- groups

@dataclass
class Member:
    photo: Photo
    score: float  # verified score against the kept photo (1.0 for the kept photo itself)
    box: tuple[int, int, int, int] | None  # the overlap with the kept photo, in this photo's pixels
    relation: str  # exact / edited / similar / keep, against the kept photo; "linked" if only through others
    transform: str | None = None


@dataclass
class Group:
    kind: str
    keep: int | None
    reasons: list[str]
    members: list[Member] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "keep": self.keep, "reasons": self.reasons, "photos": [
            {"id": m.photo.id, "path": m.photo.path, "width": m.photo.width, "height": m.photo.height,
             "bytes": m.photo.bytes, "score": round(m.score, 4), "box": list(m.box) if m.box else None,
             "relation": m.relation, "transform": m.transform, "present": m.photo.present}
            for m in self.members]}


@dataclass
class Link:
    a: int
    b: int
    kind: str
    score: float
    match: Match | None
    cosine: float


class _Finder:
    """Verification with caches shared by the pairs of one run (patch grids, pixel digests)."""

    def __init__(self, engine, config: DuplicateConfig):
        self.e, self.cfg = engine, config
        self.grid = engine.manifest.grid
        self._pix: dict[int, str | None] = {}

    def pixels(self, p: Photo) -> str | None:
        if p.id not in self._pix:
            self._pix[p.id] = pixel_digest(p.path, self.e.config.max_pixels) if p.present else None
        return self._pix[p.id]

    def link(self, a: Photo, b: Photo, xa: np.ndarray, xb: np.ndarray, cosine: float) -> Link | None:
        if a.hash and a.hash == b.hash:
            return Link(a.id, b.id, "exact", 1.0, None, cosine)
        m = verify(xa, xb, self.grid, min_matches=self.cfg.min_matches)
        if m is None or m.score < self.cfg.threshold:
            return None
        if (self.cfg.pixels and m.identity and m.score >= 0.9 and (a.width, a.height) == (b.width, b.height)
                and self.pixels(a) is not None and self.pixels(a) == self.pixels(b)):
            return Link(a.id, b.id, "exact", m.score, m, cosine)
        return Link(a.id, b.id, "edited" if m.score >= self.cfg.edited else "similar", m.score, m, cosine)


def group_links(links: list[Link]) -> list[list[int]]:
    """Photo id groups: exact/edited links joined transitively; similar links merge two groups only when every
    cross pair is itself linked (complete linkage: a chain of weak links cannot merge everything)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for lk in links:
        find(lk.a), find(lk.b)
        if lk.kind != "similar":
            ra, rb = find(lk.a), find(lk.b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, set[int]] = {}
    for x in list(parent):
        members.setdefault(find(x), set()).add(x)
    linked = {(min(lk.a, lk.b), max(lk.a, lk.b)) for lk in links}
    for lk in sorted((lk for lk in links if lk.kind == "similar"), key=lambda lk: -lk.score):
        ra, rb = find(lk.a), find(lk.b)
        if ra == rb:
            continue
        if all((min(x, y), max(x, y)) in linked for x in members[ra] for y in members[rb]):
            keep, gone = min(ra, rb), max(ra, rb)
            parent[gone] = keep
            members[keep] |= members.pop(gone)
    return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: m[0])


def find_links(engine, config: DuplicateConfig = DuplicateConfig(), *, only: list[int] | None = None,
               finder: _Finder | None = None) -> tuple[list[Link], dict[int, Photo]]:
    """Verified links between indexed photos (``only``: the links of these photos, to any indexed photo)."""
    from indexer.store import reconstruct_all

    gi = engine.global_index
    if gi.ntotal < 2:
        return [], {}
    with engine._lock:
        if only is None:
            ids, xb = reconstruct_all(gi)
        else:
            ids = np.asarray(only, np.int64)
            xb = np.stack([gi.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, engine.manifest.dim), np.float32)
        pairs, cos = candidate_pairs(gi, ids, xb, config.k, config.min_cosine, nprobe=config.nprobe)
    # same content hash: exact whatever the candidate stage found
    db = engine.db
    hashed = db.execute("SELECT hash, group_concat(id) FROM photos WHERE status='indexed' AND hash IS NOT NULL "
                        "GROUP BY hash HAVING count(*) > 1").fetchall()
    extra = []
    want = None if only is None else set(int(i) for i in only)
    for _, group in hashed:
        g = sorted(int(x) for x in group.split(","))
        if want is not None and not want & set(g):
            continue
        extra += [(g[0], y) for y in g[1:]]
    if extra:
        pairs = np.concatenate([pairs, np.asarray(extra, np.int64).reshape(-1, 2)])
        cos = np.concatenate([cos, np.ones(len(extra), np.float32)])
        key = pairs[:, 0] * (int(pairs.max()) + 1) + pairs[:, 1]
        _, first = np.unique(key, return_index=True)
        pairs, cos = pairs[first], cos[first]
    involved = sorted(set(pairs.ravel().tolist()))
    photos = load_photos(db, involved)
    finder = finder or _Finder(engine, config)
    links: list[Link] = []
    for s in range(0, len(pairs), 256):  # patch grids decoded for a block of pairs at a time
        block = pairs[s:s + 256]
        uniq = sorted(set(block.ravel().tolist()) & set(photos))
        if not uniq:
            continue
        xp = dict(zip(uniq, engine.photo_patches(uniq)))
        for (a, b), c in zip(block.tolist(), cos[s:s + 256].tolist()):
            if a in photos and b in photos:
                lk = finder.link(photos[a], photos[b], xp[a], xp[b], c)
                if lk is not None:
                    links.append(lk)
    return links, photos


def build_groups(engine, links: list[Link], photos: dict[int, Photo], config: DuplicateConfig,
                 finder: _Finder | None = None) -> list[Group]:
    """Groups from links: kind, keeper and each member's verified relation to the keeper."""
    by_pair = {(min(lk.a, lk.b), max(lk.a, lk.b)): lk for lk in links}
    grid = engine.manifest.grid
    finder = finder or _Finder(engine, config)
    groups = []
    for ids in group_links(links):
        ps = [photos[i] for i in ids]
        keep, reasons = choose_keeper(ps)
        ref = keep if keep is not None else ids[0]
        xp = dict(zip(ids, engine.photo_patches(ids)))
        members = []
        for p in ps:
            if p.id == ref:
                members.append(Member(p, 1.0, (0, 0, p.width, p.height), "keep" if keep is not None else "gone"))
                continue
            lk = by_pair.get((min(p.id, ref), max(p.id, ref)))
            if lk is None:  # linked through other members: verify against the keeper directly for score and box
                lk = finder.link(photos[ref], p, xp[ref], xp[p.id], float("nan"))  # (no global cosine: not a candidate)
            m = lk.match if lk is not None else None
            box = None
            if m is not None:
                cells = m.cells_b if lk.a == ref else m.cells_a
                box = cells_to_box(cells, (p.width, p.height), grid)
            elif lk is not None and lk.kind == "exact":
                box = (0, 0, p.width, p.height)
            members.append(Member(p, lk.score if lk else 0.0, box, lk.kind if lk else "linked", m.transform if m else None))
        members.sort(key=lambda mm: (mm.photo.id != ref, -mm.score, mm.photo.id))
        # the group's kind is its weakest relation to the kept photo (a member joined only through a chain of
        # exact/edited links is an edit of an edit)
        rel = {mm.relation for mm in members[1:]}
        kind = "similar" if "similar" in rel else "edited" if rel - {"exact"} else "exact"
        groups.append(Group(kind, keep, reasons, members))
    if config.kind is not None:
        groups = [g for g in groups if g.kind == config.kind]
    groups.sort(key=lambda g: (KINDS.index(g.kind), -len(g.members), g.members[0].photo.id))
    return groups


def find_duplicates(engine, config: DuplicateConfig = DuplicateConfig()) -> list[Group]:
    """Every group of duplicates / same-shot / similar photos in the index (an empty list for 0 or 1 photo)."""
    finder = _Finder(engine, config)  # pixel digests shared by both stages
    links, photos = find_links(engine, config, finder=finder)
    return build_groups(engine, links, photos, config, finder)


def duplicates_of(engine, photo_id: int, config: DuplicateConfig = DuplicateConfig()) -> list[Link]:
    """Verified links of one indexed photo to the others, best first (no pass over the whole collection)."""
    from search.engine import UnknownPhoto

    if not engine.photo_size([int(photo_id)]):
        raise UnknownPhoto(f"photo id {photo_id} is not in the index")
    links, _ = find_links(engine, config, only=[int(photo_id)])
    links = [lk for lk in links if photo_id in (lk.a, lk.b)]
    if config.kind is not None:
        links = [lk for lk in links if lk.kind == config.kind]
    return sorted(links, key=lambda lk: (KINDS.index(lk.kind), -lk.score))


def added_links(engine, since_id: int, config: DuplicateConfig = DuplicateConfig()) -> tuple[list[Link], dict[int, Photo]]:
    """Verified links of the photos added since ``since_id`` (ids are allocated in order) to any indexed photo:
    what `index --check-duplicates` reports at add time, at the cost of those photos' candidates only."""
    new = [i for (i,) in engine.db.execute("SELECT id FROM photos WHERE status='indexed' AND id >= ? ORDER BY id", (int(since_id),))]
    if not new:
        return [], {}
    links, photos = find_links(engine, config, only=new)
    fresh = set(new)
    links = [lk for lk in links if lk.a in fresh or lk.b in fresh]
    if config.kind is not None:
        links = [lk for lk in links if lk.kind == config.kind]
    return sorted(links, key=lambda lk: (max(lk.a, lk.b), KINDS.index(lk.kind), -lk.score)), photos


# ---------------------------------------------------------------- moving the copies away (and back)

@dataclass
class MoveReport:
    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to): done, or planned in a dry run
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    manifest: str | None = None


def _free_name(dst: Path) -> Path:
    """dst, or dst with ' (n)' before its suffix: a name nothing holds yet."""
    n, cand = 1, dst
    while cand.exists() or cand.is_symlink():
        cand = dst.with_name(f"{dst.stem} ({n}){dst.suffix}")
        n += 1
    return cand


def _move_no_clobber(src: Path, dst: Path) -> None:
    """Move a file without ever replacing one: a hard link (which refuses an existing name), or across file
    systems a copy into a newly created file; then the source is removed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        with open(src, "rb") as f, open(dst, "xb") as g:  # "x": fails if dst exists
            shutil.copyfileobj(f, g)
            g.flush()
            os.fsync(g.fileno())
        shutil.copystat(src, dst)
    os.unlink(src)


def move_copies(groups: list[Group], dest: str | os.PathLike, *, apply: bool = False) -> MoveReport:
    """Move every non-kept photo of the groups into ``dest`` (one subfolder per group); a dry run unless ``apply``.

    Never overwrites a file, goes on past per-file errors, and writes a manifest (JSON lines, one per move,
    flushed as it goes) for ``undo_moves``. Groups without a keeper present on disk are left alone."""
    dest = Path(dest).expanduser().absolute()
    rep = MoveReport()
    manifest = None
    if apply:
        dest.mkdir(parents=True, exist_ok=True)
        path = _free_name(dest / f"dinosearch-moves-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        manifest = open(path, "x")
        rep.manifest = str(path)
    try:
        for n, g in enumerate(groups, 1):
            if g.keep is None:
                continue
            for m in g.members:
                if m.photo.id == g.keep:
                    continue
                src = Path(m.photo.path)
                if not m.photo.present:
                    rep.errors.append((m.photo.path, "gone or changed since indexing; not moved"))
                    continue
                dst = _free_name(dest / f"group-{n:04d}" / src.name)
                if not apply:
                    rep.moved.append((str(src), str(dst)))
                    continue
                try:
                    _move_no_clobber(src, dst)
                except OSError as e:
                    rep.errors.append((str(src), e.strerror or str(e)))
                    continue
                rep.moved.append((str(src), str(dst)))
                manifest.write(json.dumps({"from": os.fsencode(str(src)).decode("utf-8", "surrogateescape"),
                                           "to": str(dst), "id": m.photo.id, "keep": g.keep, "kind": g.kind}) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
    finally:
        if manifest is not None:
            manifest.close()
    return rep


def undo_moves(manifest: str | os.PathLike) -> MoveReport:
    """Move the files of a move manifest back where they were (never over a file now at that name).
    ``manifest`` may be the --move-to folder: its newest manifest is undone."""
    folder = Path(manifest).expanduser()
    if folder.is_dir():
        found = sorted(folder.glob("dinosearch-moves-*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
        if not found:
            raise MoveError(f"{folder} holds no dinosearch-moves-*.jsonl manifest to undo")
        manifest = found[-1]
    rep = MoveReport(manifest=str(manifest))
    try:
        lines = Path(manifest).expanduser().read_text().splitlines()
    except OSError as e:
        raise MoveError(f"cannot read the move manifest {manifest}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            src, dst = Path(rec["to"]), Path(rec["from"])
        except (ValueError, KeyError, TypeError):
            rep.errors.append((f"{manifest}:{n}", "not a move record"))
            continue
        if dst.exists() or dst.is_symlink():
            rep.errors.append((str(dst), "a file is at that name again; left both alone"))
            continue
        try:
            _move_no_clobber(src, dst)
        except OSError as e:
            rep.errors.append((str(src), e.strerror or str(e)))
            continue
        rep.moved.append((str(src), str(dst)))
    return rep
