"""Region geometry and late-interaction scoring: numpy in, numpy out.

A region of the query photo is a boolean mask over its patch grid. A photo's
score for a region is late interaction (ColBERT's MaxSim): for every query
patch its best match among the photo's patches, averaged over query patches.
"""

from __future__ import annotations

import numpy as np

from indexer.errors import DinosearchError


class BadRegion(DinosearchError):
    """A box or mask that selects nothing of the photo, or is malformed."""


def box_to_mask(box: tuple[float, float, float, float], size: tuple[int, int], grid: int) -> np.ndarray:
    """Box (x0, y0, x1, y1) in photo pixels -> bool [grid, grid]: cells whose centre lies in the box.

    A box smaller than a cell selects the cell under its centre.
    """
    w, h = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise BadRegion(f"box {box} is empty: expected x0 < x1 and y0 < y1 (pixels of the photo)")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise BadRegion(f"box {box} lies outside the {w}x{h} photo")
    cx = (np.arange(grid) + 0.5) * w / grid
    cy = (np.arange(grid) + 0.5) * h / grid
    mask = (cy[:, None] >= y0) & (cy[:, None] < y1) & (cx[None, :] >= x0) & (cx[None, :] < x1)
    if not mask.any():
        r = min(grid - 1, max(0, int((y0 + y1) / 2 * grid / h)))
        c = min(grid - 1, max(0, int((x0 + x1) / 2 * grid / w)))
        mask[r, c] = True
    return mask


def pixel_mask_to_grid(mask: np.ndarray, grid: int, threshold: float = 0.5) -> np.ndarray:
    """A mask the size of the photo (any dtype, nonzero = in) -> bool [grid, grid] by area coverage."""
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., -1] if m.shape[-1] in (2, 4) else m.max(-1)  # alpha, or any channel
    if m.ndim != 2:
        raise BadRegion(f"mask must be a 2-D image, got shape {m.shape}")
    cover = np.asarray(Image.fromarray((m > 0).astype(np.float32)).resize((grid, grid), Image.Resampling.BOX))
    out = cover >= threshold
    if not out.any():
        if cover.max() <= 0:
            raise BadRegion("mask selects nothing")
        out = cover == cover.max()
    return out


def late_interaction(xq: np.ndarray, xp: np.ndarray) -> tuple[float, np.ndarray]:
    """Score of one photo for a region.

    xq: [m, D] query patches; xp: [n, D] the photo's patches (n = grid*grid).
    Returns the mean over query patches of their best similarity, and the
    similarity matrix [m, n]. Stored patches are decoded from quantized codes, so
    their norms are not exactly 1 and a score may pass 1 by a hair: rank by it as it
    is (clipping would tie the best), clip only what is reported.
    """
    sim = xq @ xp.T
    return float(sim.max(1).mean()), sim


def late_interaction_scores(xq: np.ndarray, xp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """late_interaction for many photos at once: xq [m, D], xp [c, n, D] -> (scores [c], similarities [c, m, n]),
    one matrix product (all the photos' patches against the query's) instead of one small product per photo; the
    similarities are views for localize."""
    c, n, d = xp.shape
    sim = (xp.reshape(c * n, d) @ xq.T).reshape(c, n, len(xq))
    return sim.max(1).mean(1), sim.transpose(0, 2, 1)


def localize(
    sim: np.ndarray, grid: int, size: tuple[int, int], qcells: np.ndarray | None = None
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Where a region matched in a photo: (box in its pixels, heat map [grid, grid]).

    heat[cell] is the best similarity of any query patch to that cell. Each query
    patch points at its best cell; with the query cells known (``qcells``, flat
    indices into the query grid), the matches that agree on one shift (within a
    cell and a half of the median shift) are kept, so stray matches elsewhere in
    the photo do not stretch the box. Otherwise the better three quarters are kept.
    """
    w, h = size
    heat = sim.max(0).reshape(grid, grid).astype(np.float32)
    best_cell = sim.argmax(1)
    rows, cols = best_cell // grid, best_cell % grid
    keep = sim.max(1) >= np.quantile(sim.max(1), 0.25)
    if qcells is not None and len(qcells) == len(best_cell):
        dr, dc = rows - qcells // grid, cols - qcells % grid
        agree = (np.abs(dr - np.median(dr)) <= 1.5) & (np.abs(dc - np.median(dc)) <= 1.5)
        if agree.sum() * 2 >= len(agree):
            keep = agree
    rows, cols = rows[keep], cols[keep]
    box = (
        int(cols.min() * w / grid), int(rows.min() * h / grid),
        int(np.ceil((cols.max() + 1) * w / grid)), int(np.ceil((rows.max() + 1) * h / grid)),
    )
    return box, heat
