"""Decoding: every format and mode a photo collection holds, and every way a file can be bad."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from indexer.errors import DecodeError
from indexer.reader import DecodeJob, FileInfo, decode_bytes, decode_file, open_photo, scan

RES = 56


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def _gradient(w: int = 120, h: int = 80) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], -1).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF", "AVIF"])
def test_formats_decode_to_rgb(fmt):
    img = _gradient()
    pixels, size = decode_bytes(_encode(img, fmt), RES)
    assert pixels.shape == (RES, RES, 3) and pixels.dtype == np.uint8
    assert size == (120, 80)
    # the whole photo is kept: left edge dark red channel, right edge bright
    assert pixels[:, :4, 0].mean() < 40 and pixels[:, -4:, 0].mean() > 200


def test_gif_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:])
    pixels, _ = decode_bytes(b.getvalue(), RES)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("CMYK", (30, 30), (0, 255, 255, 0)), (255, 0, 0)),  # pure red in CMYK
        (lambda: Image.new("LA", (30, 30), (0, 0)), (255, 255, 255)),  # fully transparent -> white
        (lambda: Image.new("RGBA", (30, 30), (0, 0, 255, 255)), (0, 0, 255)),
        (lambda: Image.new("L", (30, 30), 100), (100, 100, 100)),
        (lambda: Image.new("1", (30, 30), 1), (255, 255, 255)),
    ],
)
def test_modes_convert(make, expected):
    img = make()
    fmt = "TIFF" if img.mode == "CMYK" else "PNG"
    pixels, _ = decode_bytes(_encode(img, fmt), RES)
    assert np.abs(pixels.reshape(-1, 3).mean(0) - expected).max() <= 2


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (30, 30), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.info["transparency"] = 0
    pixels, _ = decode_bytes(_encode(img, "PNG", transparency=0), RES)
    assert pixels.min() >= 250  # index 0 (black) is transparent -> white background


def test_16bit_png_scales_to_8bit():
    a = np.full((20, 20), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I")
    pixels, _ = decode_bytes(_encode(img, "PNG"), RES)
    assert abs(int(pixels.mean()) - 127) <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    img = Image.new("RGB", (60, 30), "blue")
    img.paste((255, 0, 0), (0, 0, 20, 30))  # a red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(img, "JPEG", exif=exif, quality=95)
    out, size = open_photo(data)
    swapped = orientation in (5, 6, 7, 8)
    assert size == ((30, 60) if swapped else (60, 30))
    assert out.size == size
    a = np.asarray(out)
    red = a[..., 0] > 128
    # where the red band ends up is what the orientation says
    band_side = {1: "left", 2: "right", 3: "right", 4: "left", 5: "top", 6: "top", 7: "bottom", 8: "bottom"}[orientation]
    h, w = red.shape
    region = {"left": red[:, : w // 4], "right": red[:, -w // 4 :], "top": red[: h // 4], "bottom": red[-h // 4 :]}[band_side]
    assert region.mean() > 0.9, (orientation, band_side)


def test_jpeg_draft_downscales_large_photos():
    big = _gradient(4000, 3000)
    data = _encode(big, "JPEG", quality=85)
    img, size = open_photo(data, draft_size=224)
    assert size == (4000, 3000)
    assert 224 <= min(img.size) and img.size[0] <= 1000  # decoded at 1/4 or 1/8 scale, not 12 MP


def _png_bomb(w: int, h: int) -> bytes:
    """A tiny PNG that declares w x h pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, I am not a photo\n", "not an image"),
        (_png_bomb(100_000, 100_000), "too large"),
        (_encode(_gradient(), "JPEG")[:300], "truncated"),
        (_encode(_gradient(), "PNG")[:200], "truncated"),
    ],
)
def test_bad_bytes_raise_clear_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_bytes(data, RES)


def test_decode_file_reports_instead_of_raising(tmp_path):
    missing = FileInfo(str(tmp_path / "gone.jpg"), 10, 0)
    assert decode_file(missing, DecodeJob(RES)).error == "file vanished before it could be read"
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * 2048)
    d = decode_file(FileInfo(str(big), 2048, 0), DecodeJob(RES, max_bytes=1024))
    assert d.pixels is None and "file too large" in d.error


def test_scan_finds_photos_recursively_sorted_and_reports_broken_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ["z.JPG", "a/b/x.heic", "a/y.png", "notes.txt", "a/._x.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "dead.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)  # not followed
    errors: list = []
    found = [f.path[len(str(tmp_path)) + 1 :] for f in scan(tmp_path, errors)]
    assert found == ["z.JPG", "a/y.png", "a/b/x.heic"]
    assert [(p.endswith("dead.jpg"), "broken link" in r) for p, r in errors] == [(True, True)]
