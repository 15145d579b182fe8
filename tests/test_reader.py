"""Decoding: every format and mode a photo collection holds, and every way a file can be bad."""

from __future__ import annotations

import io
import os
import socket
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from indexer.errors import DecodeError
from indexer.reader import DecodeJob, FileInfo, ScanReport, decode_bytes, decode_file, looks_like_image, open_photo, scan

sys.path.insert(0, str(REPO / "scripts"))

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
    for rel in ["z.JPG", "a/b/x.heic", "a/y.png", "notes.txt", "a/._x.jpg", "a/b/IMG_1.CR3", "a/IMG_1.xmp", "clip.mov"]:
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "a" / "photo").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)  # a JPEG without an extension: sniffed
    (tmp_path / "a" / "LICENSE").write_bytes(b"MIT License\n")  # no extension, not an image
    (tmp_path / "dead.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)  # not followed
    report = ScanReport()
    found = [f.path[len(str(tmp_path)) + 1 :] for f in scan(tmp_path, report)]
    assert found == ["z.JPG", "a/photo", "a/y.png", "a/b/IMG_1.CR3", "a/b/x.heic"]
    assert [(p.endswith("dead.jpg"), "broken link" in r) for p, r in report.errors] == [(True, True)]
    assert report.not_images == {".txt": 1, ".jpg": 1, ".xmp": 1, ".mov": 1, "": 1}  # ._x.jpg is AppleDouble metadata


def within(seconds: float, fn, *args):
    """Run fn in a thread; fail (instead of hanging the suite) if it has not returned in time."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s"
    return out[0]


def _special_files(folder: Path) -> None:
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(folder / "pipe")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(folder / "socket.png"))
    s.close()
    (folder / "zero.jpg").symlink_to("/dev/zero")


def test_scan_never_opens_fifos_sockets_or_devices(tmp_path):
    _special_files(tmp_path)
    (tmp_path / "ok.jpg").write_bytes(_encode(_gradient(), "JPEG"))
    report = ScanReport()
    found = within(10, lambda: list(scan(tmp_path, report)))
    assert [os.path.basename(f.path) for f in found] == ["ok.jpg"]
    reasons = {os.path.basename(p): r for p, r in report.errors}
    assert reasons == {"pipe.jpg": "not a regular file (FIFO): never opened", "socket.png": "not a regular file (socket): never opened",
                       "zero.jpg": "not a regular file (device): never opened"}
    assert report.not_images == {"": 1}  # the FIFO without an extension is not sniffed


def test_decode_refuses_special_files_put_in_a_photos_place(tmp_path):
    """A FIFO or device that appears after the scan: refused at once, never read (a read would block or never end)."""
    _special_files(tmp_path)
    job = DecodeJob(RES)
    for name, reason in [("pipe.jpg", "not a regular file (FIFO)"), ("zero.jpg", "not a regular file (device)"),
                         ("socket.png", "cannot read file: No such device or address")]:
        d = within(10, decode_file, FileInfo(str(tmp_path / name), 0, 0), job)
        assert d.pixels is None and d.error.startswith(reason), (name, d.error)


def test_formats_read_by_content_whatever_the_name(tmp_path):
    jpeg = _encode(_gradient(), "JPEG", quality=95)
    for name in ["photo.png", "photo.bmp", "photo.jp2", "photo.nef", "photo"]:
        (tmp_path / name).write_bytes(jpeg)
        d = decode_file(FileInfo(str(tmp_path / name), 0, 0), DecodeJob(RES))
        assert d.error is None and (d.width, d.height) == (120, 80), (name, d.error)


def _frames(fmt: str, **kw) -> bytes:
    colours = ["red", "blue", "green"]
    frames = [Image.new("RGB", (40, 30), c) for c in colours]
    b = io.BytesIO()
    frames[0].save(b, format=fmt, save_all=True, append_images=frames[1:], **kw)
    return b.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF", "MPO"])  # PNG with frames is APNG
def test_multi_frame_files_give_their_first_frame(fmt):
    data = _frames(fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    pixels, size = decode_bytes(data, RES)
    assert size == (40, 30)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50  # red, the first frame


# -- camera RAW: DNGs written byte by byte by the corpus script (a 12-bit RGGB mosaic + an embedded preview)

def _scene(w: int = 128, h: int = 96) -> np.ndarray:
    from make_hostile_corpus import _two_colours

    return _two_colours(w, h)


def _red_side(img: Image.Image) -> str:
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape[:2]
    red = a[..., 0] - a[..., 2]
    sides = {"left": red[:, : w // 4], "right": red[:, -w // 4 :], "top": red[: h // 4], "bottom": red[-h // 4 :]}
    return max(sides, key=lambda k: sides[k].mean())


# where the red (left) half of the stored picture must end up for each EXIF orientation
RED_SIDE = {1: "left", 2: "right", 3: "right", 4: "left", 5: "top", 6: "top", 7: "bottom", 8: "bottom"}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_sensor_data_decoded_half_size_and_oriented(orientation):
    from make_hostile_corpus import make_dng

    img, size = open_photo(make_dng(_scene(), None, orientation), draft_size=RES)
    swapped = orientation in (5, 6, 7, 8)
    assert size == ((96, 128) if swapped else (128, 96))
    assert img.size == ((48, 64) if swapped else (64, 48))  # LibRaw half-size demosaic, not the 16x12 thumbnail
    assert _red_side(img) == RED_SIDE[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_large_preview_used_and_oriented_like_the_raw(orientation):
    from make_hostile_corpus import make_dng

    preview = Image.fromarray(_scene(1200, 800))
    data = make_dng(_scene()[:, ::-1].copy(), preview, orientation)  # the sensor says the opposite: we must see the preview
    img, size = open_photo(data, draft_size=RES)
    swapped = orientation in (5, 6, 7, 8)
    assert size == ((96, 128) if swapped else (128, 96))  # the RAW's own size
    assert img.size == ((100, 150) if swapped else (150, 100))  # the 1200x800 preview, JPEG-drafted to 1/8 (>= RES), turned
    assert _red_side(img) == RED_SIDE[orientation]


def test_raw_small_preview_is_not_enough():
    from make_hostile_corpus import make_dng

    data = make_dng(_scene(), Image.fromarray(_scene(400, 300)[:, ::-1].copy()), 1)  # under RAW_PREVIEW_MIN_SIDE
    img, _ = open_photo(data, draft_size=RES)
    assert img.size == (64, 48) and _red_side(img) == "left"  # from the sensor


def test_plain_16bit_tiff_is_not_taken_for_a_raw():
    """LibRaw would open a 16-bit grey TIFF as a 'raw': only camera TIFFs go to it."""
    a = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (32, 1))
    img, size = open_photo(_encode(Image.fromarray(a), "TIFF"))
    assert size == (64, 32) and np.asarray(img)[:, -1].mean() > 250


@pytest.mark.parametrize("data, reason", [
    (b"this is not a Nikon RAW\n", "not an image"),
    (b"FUJIFILMCCD-RAW 0201FF383501" + b"\0" * 200, "LibRaw"),  # RAF magic, no RAF inside
])
def test_bad_raws_raise_clear_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_bytes(data, RES)


@pytest.mark.parametrize("fmt", ["JXL", "JPEG2000", "PPM"])
def test_more_formats_decode(fmt):
    pixels, size = decode_bytes(_encode(_gradient(), fmt), RES)
    assert size == (120, 80) and pixels[:, :4, 0].mean() < 40 and pixels[:, -4:, 0].mean() > 200


def test_looks_like_image_magic():
    for fmt in ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "HEIF", "AVIF", "JXL", "JPEG2000", "PPM"]:
        assert looks_like_image(_encode(_gradient(), fmt)[:16]), fmt
    for data in [b"", b"hello", b"\0\0\0\x14ftypqt  ", b"<?xml version", b"PK\x03\x04", b"BMW service notes", b"P1: plan"]:
        assert not looks_like_image(data)
