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
import functools
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer import catalog
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

JOIN_MIN = 20_000  # a whole pass over at least this many photos takes its candidates from the clustered join


def _search(index, xq: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """k-NN with ``nprobe`` IVF lists for this search only, on a FAISS index or the store's SegmentedIndex."""
    if isinstance(index, SegmentedIndex):
        return index.search(xq, k, nprobe=nprobe)
    ivf = faiss.try_extract_index_ivf(index)
    params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe)) if ivf is not None else None  # the index's own
    return index.search(xq, k, params=params)


def _quantizer(index) -> faiss.Index | None:
    """The coarse quantizer of the (largest) IVF index among ``index``'s parts, for the join's clusters; None: k-means."""
    ivfs = index.ivf_parts() if isinstance(index, SegmentedIndex) else [faiss.try_extract_index_ivf(index)]
    ivfs = [i for i in ivfs if i is not None]
    return max(ivfs, key=lambda i: i.ntotal).quantizer if ivfs else None


def candidate_pairs(index: faiss.Index, ids: np.ndarray, xb: np.ndarray, k: int, min_cosine: float,
                    *, nprobe: int = 64, batch: int = 4096, join: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of ids whose global vectors are among each other's k nearest with cosine >= min_cosine.

    index: the global index (inner product on L2-normalized vectors); ids [n], xb [n, D] its vectors.
    A few photos (an incremental check) are searched in ``index``; a pass over the whole index (``join``; by
    default when it holds JOIN_MIN photos or more) uses join_pairs instead, whose cost grows as n^1.5, not n^2.
    Returns (pairs int64 [m, 2], cosine float32 [m]), sorted, each pair once.
    """
    ids = np.asarray(ids, np.int64)
    assert len(ids) == len(xb), (len(ids), xb.shape)
    if not len(ids) or index.ntotal < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    if (join if join is not None else (len(ids) == index.ntotal and len(ids) >= JOIN_MIN)):
        q, j, cos = join_pairs(xb, k, min_cosine, quantizer=_quantizer(index))
        return _unique_pairs(ids[q], ids[j], cos)
    kk = min(k + 1, int(index.ntotal))  # nprobe (what searches use) is left as it is: the search carries its own
    out_q, out_i, out_d = [], [], []
    for s in range(0, len(ids), batch):
        xq = np.ascontiguousarray(xb[s:s + batch], dtype=np.float32)
        D, I = _search(index, xq, kk, nprobe)
        q = np.repeat(ids[s:s + batch], kk)
        I, D = I.ravel(), D.ravel()
        ok = (I >= 0) & (I != q) & (D >= min_cosine)
        out_q.append(q[ok]), out_i.append(I[ok]), out_d.append(D[ok])
    return _unique_pairs(np.concatenate(out_q), np.concatenate(out_i), np.concatenate(out_d))


def _unique_pairs(a: np.ndarray, b: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b, cosine) found from either side -> sorted pairs (min, max), each once."""
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1).astype(np.int64)
    cos = np.asarray(cos, np.float32)
    if not len(pairs):
        return pairs, cos
    key = pairs[:, 0] * (int(pairs.max()) + 1) + pairs[:, 1]
    _, first = np.unique(key, return_index=True)
    return pairs[first], cos[first]


def join_pairs(xb: np.ndarray, k: int, min_cosine: float, *, quantizer: faiss.Index | None = None,
               probe: int = 3, block: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each vector's k nearest others with cosine >= min_cosine, within the clusters it falls in: an IVF self-join.

    xb [n, D] L2-normalized. The vectors are clustered (``quantizer``: an IVF index's own, else FAISS spherical
    k-means with sqrt(probe * n) centroids, trained on a sample of 64 per centroid) and each vector is compared, by matrix products, with the
    members of its ``probe`` nearest clusters: ~probe * n^1.5 * D operations instead of n^2 * D, and in GEMM rather
    than one query at a time (a per-query IVF scan of the same lists is several times slower). Near-copies fall in
    the same cluster or the next one (scripts/bench_duplicates.py measures the recall against an exact range search).
    Returns rows (q, j, cosine) into xb, at most k per q.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    if quantizer is None:
        nlist = max(1, int(np.sqrt(probe * n)))  # balances the assignment (n * nlist) and the join (probe * n^2 / nlist)
        km = faiss.Kmeans(d, nlist, niter=10, spherical=True, max_points_per_centroid=64, seed=seed)
        km.train(xb)
        quantizer = km.index
    nlist = int(quantizer.ntotal)
    _, A = quantizer.search(xb, min(probe, nlist))  # [n, probe] the nearest clusters of each vector
    home = A[:, 0]  # members: each vector in its nearest cluster; queries: each vector in every probed one
    members = np.argsort(home, kind="stable")
    mb = np.searchsorted(home[members], np.arange(nlist + 1))
    ql = A.ravel()
    queries = np.argsort(ql, kind="stable")
    qb = np.searchsorted(ql[queries], np.arange(nlist + 1))
    queries //= A.shape[1]  # position in A.ravel() -> vector
    out_q, out_j, out_s = [], [], []
    for c in range(nlist):
        mem, qs = members[mb[c]:mb[c + 1]], queries[qb[c]:qb[c + 1]]
        if len(mem) == 0 or len(qs) == 0:
            continue
        xm = xb[mem]
        for s in range(0, len(qs), block):
            q = qs[s:s + block]
            r, c = np.nonzero(xb[q] @ xm.T >= min_cosine)  # few pass: one comparison per product, no sort
            ok = q[r] != mem[c]  # a vector is not its own neighbour
            r, c = r[ok], c[ok]
            out_q.append(q[r]), out_j.append(mem[c]), out_s.append(np.einsum("ij,ij->i", xb[q[r]], xb[mem[c]]))
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    q, j, cos = np.concatenate(out_q), np.concatenate(out_j), np.concatenate(out_s)
    o = np.lexsort((-cos, q))  # each query's k best over its clusters
    q, j, cos = q[o], j[o], cos[o]
    keep = np.arange(len(q)) - np.searchsorted(q, q) < k
    return q[keep], j[keep], cos[keep]


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


@functools.lru_cache(maxsize=8)
def _tables(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the 8 symmetries at once: each own cell's (row, col) in the symmetric view [8, g2] each, and the own
    cell under each view cell [8, g2]."""
    k = np.arange(grid * grid)
    rows, cols, own = [], [], []
    for sym in DIHEDRAL:
        r, c = _to_grid(k // grid, k % grid, grid, sym)
        rows.append(r), cols.append(c)
        r0, c0 = _from_grid(k // grid, k % grid, grid, sym)
        own.append(r0 * grid + c0)
    return np.array(rows), np.array(cols), np.array(own)


def _fit(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares y = s*x + t over the cells ``m`` marks, for each row at once (s = 1 where x has no spread).
    x [M], y and m [S, M] -> s, t [S]."""
    n = np.maximum(m.sum(1), 1)
    mx, my = (m * x).sum(1) / n, (m * y).sum(1) / n
    dx = np.where(m, x - mx[:, None], 0.0)
    var = (dx * dx).sum(1)
    spread = np.where(m, x, -np.inf).max(1) - np.where(m, x, np.inf).min(1)
    flat = spread < 1e-6
    sl = np.where(flat, 1.0, (dx * (y - my[:, None])).sum(1) / np.where(flat, 1.0, var))
    return sl, my - sl * mx


def _agreement(sim: np.ndarray, grid: int, rows: np.ndarray, own: np.ndarray, fy: np.ndarray, fx: np.ndarray,
               tau: float, top: np.ndarray, mid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For S transforms at once, which cells of the rows' photo lie inside the overlap and which of those agree:
    some cell within one of where the transform maps it (in the columns' photo seen through the symmetry whose
    own-cell table is ``own`` [S, g2]) is within ``tau`` of the cell's best match anywhere (so flat regions, where
    many cells tie, agree as they should); ``tau`` is a share of the gap between the best and the median match,
    so photos whose patches are all alike (random weights) do not agree by default.
    sim [g2, g2]; rows [S, g2] the row of sim under each cell of the rows' photo as transform s sees it; fy, fx
    [S, 2] (scale, shift) per axis; top, mid [S, g2] each of those cells' best and median match.
    Returns inside, agree [S, g2] (bool) and the share of the inside cells that agree [S] (NaN where none is)."""
    r = np.repeat(np.arange(grid), grid).astype(np.float64)
    c = np.tile(np.arange(grid), grid).astype(np.float64)
    rb, cb = fy[:, :1] * r + fy[:, 1:], fx[:, :1] * c + fx[:, 1:]  # [S, g2]
    inside = (rb > -0.5) & (rb < grid - 0.5) & (cb > -0.5) & (cb < grid - 0.5)
    rb = np.rint(np.clip(rb, -1, grid)).astype(np.int64)
    cb = np.rint(np.clip(cb, -1, grid)).astype(np.int64)
    sidx = np.arange(len(own))[:, None]
    best = np.full(rb.shape, -np.inf, np.float32)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            view = np.clip(rb + dr, 0, grid - 1) * grid + np.clip(cb + dc, 0, grid - 1)
            best = np.maximum(best, sim[rows, own[sidx, view]])
    agree = inside & (best >= top - tau * (top - mid))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = agree.sum(1) / inside.sum(1)
    return inside, agree, share


def verify(xa: np.ndarray, xb: np.ndarray, grid: int, **kw) -> Match | None:
    """Geometric verification of two photos on their patch grids (see verify_sim).

    xa, xb: [grid*grid, D] patch vectors (row-major cells), L2-normalized (approximately: decoded codes)."""
    g2 = grid * grid
    assert xa.shape == xb.shape and xa.shape[0] == g2, (xa.shape, xb.shape, grid)
    return verify_sim(np.asarray(xa, np.float32) @ np.asarray(xb, np.float32).T, grid, **kw)


def verify_pairs(xa: np.ndarray, xb: np.ndarray, grid: int, *, block: int = 16, workers: int | None = None,
                 **kw) -> list[Match | None]:
    """verify for many pairs at once: xa, xb [m, g2, D] (pair i = xa[i], xb[i]). The similarity matrices are made a
    block of pairs at a time (one batched matmul); blocks run on ``workers`` threads (default: one per core) with
    BLAS held to one thread each (numpy releases the GIL, so the cores verify pairs side by side instead of one
    BLAS call at a time fighting over them)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    assert xa.shape == xb.shape and xa.ndim == 3 and xa.shape[1] == grid * grid, (xa.shape, xb.shape, grid)

    def run(s: int) -> list[Match | None]:
        sims = np.matmul(np.asarray(xa[s:s + block], np.float32), np.asarray(xb[s:s + block], np.float32).transpose(0, 2, 1))
        return [verify_sim(sim, grid, **kw) for sim in sims]

    starts = range(0, len(xa), block)
    with threadpool_limits(1, user_api="blas"):
        if len(starts) <= 1:
            return [m for s in starts for m in run(s)]
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as ex:
            return [m for part in ex.map(run, starts) for m in part]


def verify_sim(sim: np.ndarray, grid: int, *, min_matches: int = 8, tol: float = 1.0, tau: float = 0.1,
               max_scale: float = 4.0, hypotheses: int = 24) -> Match | None:
    """Geometric verification of photo a against photo b from their patch similarity matrix sim [g2, g2].

    Mutual nearest patches are found once. Each of the 8 grid symmetries reinterprets b's cells (all 8 scored at
    once, as arrays with a leading axis of 8); the per-axis scale + shift most mutual matches agree on (within
    ``tol`` cells) is found from pairs of the ``hypotheses`` strongest matches and from each of them alone as a
    pure shift, and refit on its inliers by least squares. The transform is then scored from both sides: the share
    of each photo's overlapping cells whose mapped cell (or a neighbour) is within ``tau`` (of the gap to the
    median) of their best match anywhere in the other photo; the score is the smaller share. Returns the best
    symmetry's Match, or None when fewer than ``min_matches`` mutual matches agree on any transform.
    """
    g2 = grid * grid
    sim = np.asarray(sim, np.float32)
    assert sim.shape == (g2, g2), (sim.shape, grid)
    ia, ib = sim.argmax(1), sim.argmax(0)
    a = np.flatnonzero(ib[ia] == np.arange(g2))  # mutual nearest: a's cell a[i] <-> b's cell ia[a[i]]
    if len(a) < min_matches:
        return None
    b = ia[a]
    s = sim[a, b]
    ra, ca = (a // grid).astype(np.float64), (a % grid).astype(np.float64)
    vr, vc, own = _tables(grid)
    RB, CB = vr[:, b].astype(np.float64), vc[:, b].astype(np.float64)  # b's matched cells in each view [8, M]
    top = np.argsort(-s, kind="stable")[:hypotheses]
    i, j = np.triu_indices(len(top), 1)
    i, j = top[i], top[j]
    ok = (np.abs(ra[j] - ra[i]) >= 1) & (np.abs(ca[j] - ca[i]) >= 1)
    hi, hj = i[ok], j[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        sy, sx = (RB[:, hj] - RB[:, hi]) / (ra[hj] - ra[hi]), (CB[:, hj] - CB[:, hi]) / (ca[hj] - ca[hi])
        valid = (sy > 1 / max_scale) & (sy < max_scale) & (sx > 1 / max_scale) & (sx < max_scale)
        valid &= np.abs(np.log(np.where(valid, sy / sx, 1.0))) < np.log(2.5)  # an aspect change of at most 2.5x
    # the plain-shift hypotheses (scale 1) from every single match, so few matches still give one
    sy = np.concatenate([sy, np.ones((8, len(top)))], 1)
    sx = np.concatenate([sx, np.ones((8, len(top)))], 1)
    valid = np.concatenate([valid, np.ones((8, len(top)), bool)], 1)
    hi = np.concatenate([hi, top])
    ty, tx = RB[:, hi] - sy * ra[hi], CB[:, hi] - sx * ca[hi]  # [8, H]
    f4 = np.float32  # the [8, H, M] inlier test in single precision (cells are small integers): half the memory traffic
    inl = (np.abs(sy.astype(f4)[..., None] * ra.astype(f4) + ty.astype(f4)[..., None] - RB.astype(f4)[:, None]) <= tol) & \
          (np.abs(sx.astype(f4)[..., None] * ca.astype(f4) + tx.astype(f4)[..., None] - CB.astype(f4)[:, None]) <= tol)
    h = np.where(valid, inl.sum(2), -1).argmax(1)
    sel = np.arange(8)
    m = inl[sel, h]  # [8, M]
    fy = np.stack([sy[sel, h], ty[sel, h]], 1)
    fx = np.stack([sx[sel, h], tx[sel, h]], 1)
    live = np.ones(8, bool)
    for _ in range(2):  # refit on the inliers by least squares, kept if it agrees with no fewer
        ny, nx = np.stack(_fit(ra, RB, m), 1), np.stack(_fit(ca, CB, m), 1)
        live &= (1 / max_scale < ny[:, 0]) & (ny[:, 0] < max_scale) & (1 / max_scale < nx[:, 0]) & (nx[:, 0] < max_scale)
        m2 = (np.abs(ny[:, :1] * ra + ny[:, 1:] - RB) <= tol) & (np.abs(nx[:, :1] * ca + nx[:, 1:] - CB) <= tol)
        live &= m2.sum(1) >= m.sum(1)
        m, fy, fx = np.where(live[:, None], m2, m), np.where(live[:, None], ny, fy), np.where(live[:, None], nx, fx)
    n = m.sum(1)
    top_a, mid_a = sim.max(1), np.median(sim, 1)
    top_b, mid_b = sim.max(0), np.median(sim, 0)
    ident = np.broadcast_to(np.arange(g2), (8, g2))
    in_a, agree_a, share_a = _agreement(sim, grid, ident, own, fy, fx, tau, np.broadcast_to(top_a, (8, g2)),
                                        np.broadcast_to(mid_a, (8, g2)))
    # b's side: b's cells in each symmetric view (rows own[k] of sim.T) mapped back into a by the inverse
    with np.errstate(divide="ignore"):
        iy = np.stack([1 / fy[:, 0], -fy[:, 1] / fy[:, 0]], 1)
        ix = np.stack([1 / fx[:, 0], -fx[:, 1] / fx[:, 0]], 1)
    in_b, agree_b, share_b = _agreement(np.ascontiguousarray(sim.T), grid, own, ident, iy, ix, tau, top_b[own], mid_b[own])
    score = np.fmin(share_a, share_b)  # NaN where one side has no cell inside the overlap
    best = None
    for k in range(8):
        if n[k] < min_matches or np.isnan(share_a[k]) or np.isnan(share_b[k]):
            continue
        if best is None or score[k] > score[best] + 1e-9 or (abs(score[k] - score[best]) <= 1e-9 and n[k] > n[best]):
            best = k
    if best is None:
        return None
    k = best
    ok_a = np.flatnonzero(agree_a[k] if agree_a[k].any() else in_a[k])
    ok_bt = np.flatnonzero(agree_b[k] if agree_b[k].any() else in_b[k])
    rbo, cbo = _from_grid(ok_bt // grid, ok_bt % grid, grid, DIHEDRAL[k])
    rr, cc = ok_a // grid, ok_a % grid
    cells_a = (int(cc.min()), int(rr.min()), int(cc.max()) + 1, int(rr.max()) + 1)
    cells_b = (int(cbo.min()), int(rbo.min()), int(cbo.max()) + 1, int(rbo.max()) + 1)
    return Match(float(score[k]), int(n[k]), DIHEDRAL_NAMES[DIHEDRAL[k]], (round(float(fy[k, 0]), 3), round(float(fx[k, 0]), 3)),
                 (round(float(fy[k, 1]), 2), round(float(fx[k, 1]), 2)), cells_a, cells_b, round(float(s[m[k]].mean()), 4))


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


def load_photos(db: sqlite3.Connection, ids: list[int]) -> dict[int, Photo]:
    """Catalog rows of indexed photos, with whether each file is still there as it was indexed."""
    out: dict[int, Photo] = {}
    for s in range(0, len(ids), 500):
        chunk = [int(i) for i in ids[s:s + 500]]
        for i, p, size, mt, h, w, hh in catalog.photo_rows(db, chunk):
            path = os.fsdecode(p)
            try:
                st = os.stat(path)
                present = st.st_size == size
            except OSError:
                present = False
            out[i] = Photo(i, path, w or 0, hh or 0, size, mt, h, present=present)
        for i, n in catalog.exif_counts(db, chunk).items():
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
    """Verification with caches shared by the pairs of one run: patch grids (decoded once, least recently used
    dropped past ``cache_mb``) and pixel digests."""

    def __init__(self, engine, config: DuplicateConfig, *, cache_mb: int = 256):
        self.e, self.cfg = engine, config
        self.grid = engine.manifest.grid
        self._pix: dict[int, str | None] = {}
        self._grids: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cap = max(64, cache_mb * 2**20 // (self.grid**2 * engine.manifest.dim * 4))
        self.decoded = 0  # grids decoded from the patch index (a photo dropped from the cache and needed again counts twice)

    def pixels(self, p: Photo) -> str | None:
        if p.id not in self._pix:
            self._pix[p.id] = pixel_digest(p.path, self.e.config.max_pixels) if p.present else None
        return self._pix[p.id]

    def grids(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Patch grids [g2, D] of photos, from the cache or decoded (all missing ones in one call)."""
        missing = sorted({i for i in ids if i not in self._grids})
        if missing:
            for i, x in zip(missing, self.e.photo_patches(missing)):
                self._grids[i] = x
            self.decoded += len(missing)
        out = {}
        for i in ids:
            self._grids.move_to_end(i)
            out[i] = self._grids[i]
        while len(self._grids) > max(self._cap, len(out)):
            self._grids.popitem(last=False)
        return out

    def links(self, pairs: list[tuple[Photo, Photo]], cosines: list[float], *, block: int = 256) -> list[Link | None]:
        """The verified link of each pair (None: not linked), verified a block of pairs at a time."""
        out: list[Link | None] = []
        for s in range(0, len(pairs), block):
            part, cos = pairs[s:s + block], cosines[s:s + block]
            todo = [n for n, (a, b) in enumerate(part) if not (a.hash and a.hash == b.hash)]
            matches: dict[int, Match | None] = {}
            if todo:
                xp = self.grids([p.id for n in todo for p in part[n]])
                xa = np.stack([xp[part[n][0].id] for n in todo])
                xb = np.stack([xp[part[n][1].id] for n in todo])
                matches = dict(zip(todo, verify_pairs(xa, xb, self.grid, min_matches=self.cfg.min_matches)))
            out += [self._link(a, b, matches.get(n), c) for n, ((a, b), c) in enumerate(zip(part, cos))]
        return out

    def _link(self, a: Photo, b: Photo, m: Match | None, cosine: float) -> Link | None:
        if a.hash and a.hash == b.hash:
            return Link(a.id, b.id, "exact", 1.0, None, cosine)
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
               finder: _Finder | None = None, block: int = 256) -> tuple[list[Link], dict[int, Photo]]:
    """Verified links between indexed photos (``only``: the links of these photos, to any indexed photo)."""
    from indexer.faissio import reconstruct_all

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
    hashed = catalog.same_hash_groups(db)
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
    todo = [(a, b, c) for (a, b), c in zip(pairs.tolist(), cos.tolist()) if a in photos and b in photos]
    found = finder.links([(photos[a], photos[b]) for a, b, _ in todo], [c for _, _, c in todo], block=block)
    links = [lk for lk in found if lk is not None]
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
        via = [p for p in ps if p.id != ref and (min(p.id, ref), max(p.id, ref)) not in by_pair]
        direct = dict(zip((p.id for p in via), finder.links([(photos[ref], p) for p in via], [float("nan")] * len(via))))
        members = []  # a member linked only through others is verified against the keeper directly, for score and box
        for p in ps:
            if p.id == ref:
                members.append(Member(p, 1.0, (0, 0, p.width, p.height), "keep" if keep is not None else "gone"))
                continue
            lk = by_pair.get((min(p.id, ref), max(p.id, ref))) or direct.get(p.id)
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
    new = catalog.indexed_ids(engine.db, since_id)
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
