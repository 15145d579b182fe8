"""What an upload may cost before it is decoded: its header decides.

A photo's cost is set by its pixels, not its bytes: a 420 KB all-zero 12000x12000 PNG inflates to 432 MB
of RGB and takes seconds to decode. Baseline JPEGs are decoded at reduced size (libjpeg's DCT scaling, which
Pillow exposes as ``draft``: 1/8 of each side, streamed row by row), so they are allowed up to the indexer's
pixel limit. Every other format is decoded whole — Pillow cannot decode PNG, WebP, GIF, TIFF, BMP or HEIF
at reduced size (``Image.reduce`` works on decoded pixels, too late to save anything) — and so is a
progressive JPEG in memory terms (libjpeg keeps every DCT coefficient of the whole image: measured 836 MB for
a 12000x12000 one even with draft). Those are refused above the upload pixel limit, from the header alone.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from indexer.errors import DecodeError, ImageTooLarge, NotAnImage


def reducible(img: Image.Image) -> bool:
    """True if the decoder can decode this image at reduced size with bounded memory (baseline JPEG)."""
    return img.format == "JPEG" and not img.info.get("progressive") and not img.info.get("progression")


def check_upload(data: bytes, *, max_upload_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Read only the header of an uploaded photo; refuse it (ImageTooLarge) if decoding it would cost more
    than the limits allow. Returns its oriented size (width, height), as the decoder would report it."""
    if not data:
        raise DecodeError("empty upload: send the photo as the multipart field 'image'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise NotAnImage("not an image, or an unsupported format") from None
    except Exception as e:  # Pillow raises many types for garbage headers
        raise DecodeError(f"corrupt or truncated image header ({type(e).__name__}: {e})") from None
    w, h = img.size
    limit = max_pixels if reducible(img) else max_upload_pixels
    if w * h > limit:
        what = "" if limit == max_pixels else (f" for a {img.format} upload (serve --max-upload-megapixels; baseline "
                                               f"JPEGs, decoded at reduced size, may have up to {max_pixels / 1e6:.0f} MP)")
        raise ImageTooLarge(f"too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {limit / 1e6:.0f} MP limit{what}")
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
