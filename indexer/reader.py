"""Reader: find photos in a folder and turn each file into a fixed-size RGB array.

Decoding is the same code for indexed photos and for query photos, so both are
embedded identically. It runs in worker processes during indexing; nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageOps

from indexer.errors import DecodeError, ImageTooLarge, NotAnImage

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener()  # HEIC/HEIF (phone photos); AVIF is native in Pillow

EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .gif .bmp .dib .tif .tiff .heic .heif .hif .avif".split()
)
DEFAULT_MAX_PIXELS = 150_000_000  # declared size above this is refused (decompression bombs)
DEFAULT_MAX_BYTES = 256 * 2**20  # files larger than this are refused before being read
# Pillow's own guard raises at 2x its limit; ours is checked first, on the declared size.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class FileInfo:
    """One photo file as seen by the scan."""

    path: str  # absolute, as found (symlinks are not resolved)
    size: int
    mtime_ns: int


@dataclass
class Decoded:
    """What a worker sends back for one file: pixels, or the reason it failed."""

    path: str
    size: int
    mtime_ns: int
    hash: str | None = None
    width: int = 0  # oriented (EXIF-applied) size of the original photo
    height: int = 0
    pixels: np.ndarray | None = None  # uint8 [res, res, 3]
    large: np.ndarray | None = None  # uint8 [h, w, 3], longest side <= DecodeJob.large_side (for SAM), if asked
    error: str | None = None


def scan(root: str | os.PathLike, errors: list[tuple[str, str]] | None = None) -> Iterator[FileInfo]:
    """Yield the photo files below ``root`` in sorted order.

    Directory symlinks are not followed (no loops); file symlinks are followed.
    Unreadable entries are reported through ``errors`` as (path, reason).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DecodeError(f"not a folder: {root}")

    def onerror(e: OSError) -> None:
        if errors is not None:
            errors.append((e.filename or root, f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() not in EXTENSIONS or name.startswith("._"):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as e:
                if errors is not None:
                    errors.append((path, f"cannot stat: {e.strerror or e} (broken link?)"))
                continue
            yield FileInfo(path, st.st_size, st.st_mtime_ns)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_photo(data: bytes, *, draft_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes to an oriented RGB image.

    Returns the image (possibly downscaled by JPEG draft mode to no less than
    ``draft_size`` on each side) and the oriented full size (width, height).
    Raises DecodeError with the reason for anything that is not a usable photo.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise NotAnImage("not an image, or an unsupported format") from None
    except Exception as e:  # Pillow raises many types for garbage headers
        raise DecodeError(f"corrupt or truncated image header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return img, size


def to_pixels(img: Image.Image, resolution: int) -> np.ndarray:
    """Resize the WHOLE photo (no crop) to resolution x resolution, uint8 [H, W, 3]."""
    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)  # a writable copy (torch refuses read-only arrays)


def to_large(img: Image.Image, side: int) -> np.ndarray:
    """The photo with its aspect kept and its longest side at most ``side``, uint8 [h, w, 3]."""
    w, h = img.size
    s = min(1.0, side / max(w, h))
    if s < 1.0:
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)


def decode_bytes(data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (uint8 [res, res, 3], oriented original (width, height))."""
    img, size = open_photo(data, draft_size=resolution, max_pixels=max_pixels)
    return to_pixels(img, resolution), size


def decode_both(data: bytes, resolution: int, large_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One decode, two sizes: (uint8 [res, res, 3], uint8 [h, w, 3] with longest side <= large_side, (width, height))."""
    img, size = open_photo(data, draft_size=max(resolution, large_side), max_pixels=max_pixels)
    return to_pixels(img, resolution), to_large(img, large_side), size


def read_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole file, refusing anything above ``max_bytes`` before reading it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ImageTooLarge(f"file too large: {size / 2**20:.0f} MiB exceeds the {max_bytes / 2**20:.0f} MiB limit")
        return f.read(max_bytes + 1)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class DecodeJob:
    """Settings a decode worker needs; picklable."""

    resolution: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    large_side: int = 0  # > 0: also return the photo at this longest side (for SAM)


def decode_file(info: FileInfo, job: DecodeJob) -> Decoded:
    """Worker entry point: never raises for a bad file, returns the reason instead."""
    out = Decoded(info.path, info.size, info.mtime_ns)
    try:
        data = read_file(info.path, job.max_bytes)
        out.hash = content_hash(data)
        out.size = len(data)
        if job.large_side:
            out.pixels, out.large, (out.width, out.height) = decode_both(data, job.resolution, job.large_side, job.max_pixels)
        else:
            out.pixels, (out.width, out.height) = decode_bytes(data, job.resolution, job.max_pixels)
    except DecodeError as e:
        out.error = str(e)
    except FileNotFoundError:
        out.error = "file vanished before it could be read"
    except PermissionError:
        out.error = "permission denied"
    except IsADirectoryError:
        out.error = "is a directory"
    except OSError as e:
        out.error = f"cannot read file: {e.strerror or e}"
    except MemoryError:
        out.error = "out of memory while decoding"
    return out


def warm_up() -> None:
    """Run in a fresh decode process so its imports are done before the first photo arrives."""


def load_query(source: str | os.PathLike | bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """A query photo (path or bytes) -> pixels exactly as an indexed photo would get."""
    data = source if isinstance(source, bytes) else read_file(Path(source))
    return decode_bytes(data, resolution, max_pixels)
