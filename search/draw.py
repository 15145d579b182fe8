"""Pictures of answers: part overlays, heat maps and match boxes drawn on photos."""

from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw

from indexer.reader import open_photo, read_file


def palette(k: int) -> np.ndarray:
    """k well-separated RGB colours, uint8 [k, 3]."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 0.95)] for i in range(k)], np.uint8)


def load_photo(path: str | os.PathLike) -> Image.Image:
    """The photo as a person sees it (EXIF orientation applied, RGB, full size)."""
    img, _ = open_photo(read_file(path))
    return img


def parts_overlay(img: Image.Image, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Colour each patch of ``img`` by its part label (int [grid, grid])."""
    colours = palette(int(labels.max()) + 1)[labels]
    layer = Image.fromarray(colours, "RGB").resize(img.size, Image.Resampling.NEAREST)
    return Image.blend(img.convert("RGB"), layer, alpha)


def heat_overlay(img: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Red where ``heat`` (float [grid, grid]) is high, relative to its own range."""
    h = heat.astype(np.float32)
    h = (h - h.min()) / (np.ptp(h) + 1e-6)
    rgb = np.stack([h * 255, h * 40, (1 - h) * 60], -1).astype(np.uint8)
    layer = Image.fromarray(rgb, "RGB").resize(img.size, Image.Resampling.BILINEAR)
    return Image.blend(img.convert("RGB"), layer, alpha)


def draw_box(img: Image.Image, box: tuple[int, int, int, int], colour: str = "#ff2d2d") -> Image.Image:
    out = img.convert("RGB").copy()
    width = max(2, round(min(out.size) / 120))
    ImageDraw.Draw(out).rectangle(box, outline=colour, width=width)
    return out
