"""Write the hostile and broken input corpus kept in tests/data/hostile/.

    python scripts/make_hostile_corpus.py [OUT]

Each file is named for what it is. Things git cannot keep (permissions, broken
symlinks, symlink loops, FIFOs, sockets, a file that vanishes mid-run, non-UTF-8
names) are made by the tests themselves, with the functions at the bottom of this file.
The camera RAWs are DNGs written here byte by byte (a 12-bit RGGB mosaic and an
embedded preview): no camera file can be redistributed, and LibRaw reads these.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pillow_heif
import pillow_jxl  # noqa: F401  (JPEG XL)
from PIL import Image

pillow_heif.register_heif_opener()

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech101-sample" / "images" / "airplanes__image_0001.jpg"

# file name -> True if it must index, False if it must be recorded as failed,
# None if the scan must pass it over as not an image (counted, not in the catalog)
EXPECT: dict[str, bool | None] = {}


def _put(out: Path, name: str, data: bytes, ok: bool | None) -> None:
    (out / name).write_bytes(data)
    EXPECT[name] = ok


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


_FMT = {1: "B", 2: "B", 3: "H", 4: "I", 5: "I", 10: "i"}  # BYTE, ASCII, SHORT, LONG, RATIONAL (pairs), SRATIONAL


def _tiff_ifd(buf: bytearray, entries: dict, next_ifd: int = 0) -> int:
    """Append one little-endian TIFF directory (tag -> (type, values)) to ``buf``; returns its offset."""
    if len(buf) % 2:
        buf += b"\0"
    at = len(buf)
    extra = at + 2 + 12 * len(entries) + 4
    table, blobs = struct.pack("<H", len(entries)), b""
    for tag in sorted(entries):
        typ, vals = entries[tag]
        data = vals if isinstance(vals, bytes) else struct.pack(f"<{len(vals)}{_FMT[typ]}", *vals)
        count = len(data) // {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 10: 8}[typ]
        if len(data) <= 4:
            table += struct.pack("<HHI", tag, typ, count) + data.ljust(4, b"\0")
        else:
            table += struct.pack("<HHII", tag, typ, count, extra + len(blobs))
            blobs += data + b"\0" * (len(data) % 2)
    buf += table + struct.pack("<I", next_ifd) + blobs
    return at


def make_dng(scene: np.ndarray, preview: Image.Image | None, orientation: int = 1) -> bytes:
    """A DNG: ``scene`` (uint8 RGB, even sides) as a 12-bit RGGB sensor mosaic, ``preview`` as its embedded JPEG."""
    h, w = scene.shape[:2]
    s = scene.astype(np.uint16) * 16
    cfa = np.empty((h, w), np.uint16)
    cfa[0::2, 0::2], cfa[0::2, 1::2], cfa[1::2, 0::2], cfa[1::2, 1::2] = s[0::2, 0::2, 0], s[0::2, 1::2, 1], s[1::2, 0::2, 1], s[1::2, 1::2, 2]
    buf = bytearray(b"II*\0\0\0\0\0")
    raw_at = len(buf)
    buf += cfa.tobytes()
    raw_ifd = _tiff_ifd(buf, {254: (4, [0]), 256: (4, [w]), 257: (4, [h]), 258: (3, [16]), 259: (3, [1]), 262: (3, [32803]),
                              273: (4, [raw_at]), 277: (3, [1]), 278: (4, [h]), 279: (4, [cfa.nbytes]), 284: (3, [1]),
                              33421: (3, [2, 2]), 33422: (1, [0, 1, 1, 2]), 50714: (4, [0]), 50717: (4, [4095])})
    if preview is None:  # a tiny uncompressed RGB thumbnail, as some cameras write
        preview = Image.fromarray(scene).resize((max(1, w // 8), max(1, h // 8)))
        pdata, ptags = preview.tobytes(), {259: (3, [1]), 262: (3, [2])}
    else:
        b = io.BytesIO()
        preview.save(b, "JPEG", quality=85)
        pdata, ptags = b.getvalue(), {259: (3, [7]), 262: (3, [6])}
    prev_at = len(buf)
    buf += pdata
    pw, ph = preview.size
    ifd0 = _tiff_ifd(buf, ptags | {
        254: (4, [1]), 256: (4, [pw]), 257: (4, [ph]), 258: (3, [8, 8, 8]), 273: (4, [prev_at]), 274: (3, [orientation]),
        277: (3, [3]), 278: (4, [ph]), 279: (4, [len(pdata)]), 284: (3, [1]), 271: (2, b"Dinosearch\0"), 272: (2, b"TestCam\0"),
        330: (4, [raw_ifd]), 50706: (1, [1, 4, 0, 0]), 50707: (1, [1, 1, 0, 0]), 50708: (2, b"Dinosearch TestCam\0"),
        50721: (10, [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]), 50728: (5, [1, 1, 1, 1, 1, 1])})
    buf[4:8] = struct.pack("<I", ifd0)
    return bytes(buf)


def _two_colours(w: int, h: int) -> np.ndarray:
    """Red left half, blue right half: where each ends up shows the orientation applied."""
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = (220, 30, 30), (30, 30, 220)
    return a


def make(out: Path) -> dict[str, bool | None]:
    out.mkdir(parents=True, exist_ok=True)
    photo = Image.open(SAMPLE).convert("RGB")
    jpg, png = _enc(photo, "JPEG", quality=90), _enc(photo, "PNG")
    _put(out, "ok_photo.jpg", jpg, True)
    _put(out, "truncated.jpg", jpg[: len(jpg) // 3], False)
    _put(out, "truncated.png", png[: len(png) // 3], False)
    _put(out, "zero_bytes.jpg", b"", False)
    _put(out, "text_named.jpg", b"this is a text file, not a photo\n", False)
    _put(out, "bomb_50000x50000.png", _png_bomb(50_000, 50_000), False)
    _put(out, "tiny_1x1.png", _enc(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), True)
    _put(out, "thin_1x20000.png", _enc(Image.new("RGB", (1, 20000), (30, 200, 30)), "PNG"), True)
    _put(out, "cmyk.jpg", _enc(photo.convert("CMYK"), "JPEG", quality=90), True)
    _put(out, "gray_16bit.png", _enc(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), "PNG"), True)
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    _put(out, "palette_transparent.png", _enc(pal, "PNG", transparency=0), True)
    frames = [photo.rotate(a) for a in (0, 90, 180)]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    _put(out, "animated.gif", b.getvalue(), True)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        _put(out, f"exif_orientation_{o}.jpg", _enc(photo, "JPEG", quality=85, exif=exif), True)
    _put(out, "heic_photo.heic", _enc(photo, "HEIF"), True)
    _put(out, "webp_photo.webp", _enc(photo, "WEBP"), True)
    # the formats read by content (issue 11): names that lie, multi-frame files, JPEG XL, JPEG 2000, PNM, RAW
    small = photo.resize((photo.width // 2, photo.height // 2))
    for ext in ("png", "bmp", "jp2"):
        _put(out, f"jpeg_named.{ext}", jpg, True)
    _put(out, "jpeg_no_extension", jpg, True)
    _put(out, "jpeg2000.jp2", _enc(small, "JPEG2000"), True)
    _put(out, "jpegxl.jxl", _enc(small, "JXL"), True)
    _put(out, "color.ppm", _enc(small, "PPM"), True)
    _put(out, "gray.pgm", _enc(small.convert("L"), "PPM"), True)
    _put(out, "bilevel.pbm", _enc(small.convert("1"), "PPM"), True)
    _put(out, "any.pnm", _enc(small, "PPM"), True)
    frames = [small.rotate(a) for a in (0, 90, 180)]
    _put(out, "animated.apng", _enc(frames[0], "PNG", save_all=True, append_images=frames[1:]), True)
    _put(out, "animated.webp", _enc(frames[0], "WEBP", save_all=True, append_images=frames[1:]), True)
    _put(out, "multipage.tiff", _enc(frames[0].copy(), "TIFF", save_all=True, append_images=frames[1:]), True)
    _put(out, "stereo.mpo", _enc(frames[0].copy(), "MPO", save_all=True, append_images=frames[1:2], quality=85), True)
    scene = _two_colours(128, 96)
    _put(out, "raw_preview_rotated.dng", make_dng(scene, photo.resize((1024, 683)), orientation=6), True)
    raw = make_dng(scene, None, orientation=8)
    _put(out, "raw_sensor_rotated.dng", raw, True)
    _put(out, "raw_truncated.dng", raw[: len(raw) // 2], False)
    _put(out, "text_named.nef", b"this is not a Nikon RAW\n", False)
    # not images: passed over by extension or, without one, by their first bytes
    _put(out, "sidecar.xmp", b'<x:xmpmeta xmlns:x="adobe:ns:meta/"></x:xmpmeta>\n', None)
    _put(out, "clip.mov", b"\0\0\0\x14ftypqt  \0\0\0\0qt  ", None)
    _put(out, "notes.txt", b"holiday 2024\n", None)
    _put(out, "README", b"not a photo, no extension\n", None)
    return dict(EXPECT)


# -- what git cannot keep: made by the tests in a temporary copy


def add_runtime_cases(folder: Path) -> dict[str, bool | None]:
    """Broken symlink, symlink loop, unreadable file, non-UTF-8 name, FIFOs, a socket and a device named
    like photos. Returns name -> must index (None: passed over as not an image)."""
    import socket

    cases: dict[str, bool | None] = {}
    os.mkfifo(folder / "pipe.jpg")  # opening it would block until a writer comes: never opened
    cases["pipe.jpg"] = False
    os.mkfifo(folder / "pipe_no_extension")  # not sniffed either
    cases["pipe_no_extension"] = None
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(folder / "socket.jpg"))  # the file stays after close
    sock.close()
    cases["socket.jpg"] = False
    (folder / "device.jpg").symlink_to("/dev/zero")  # endless bytes
    cases["device.jpg"] = False
    (folder / "broken_link.jpg").symlink_to(folder / "does_not_exist.jpg")
    cases["broken_link.jpg"] = False
    (folder / "loop").mkdir()
    (folder / "loop" / "again").symlink_to(folder, target_is_directory=True)  # never followed
    denied = folder / "unreadable.jpg"
    denied.write_bytes((folder / "ok_photo.jpg").read_bytes())
    os.chmod(denied, 0)
    cases["unreadable.jpg"] = os.geteuid() == 0  # root reads it anyway
    raw = os.fsencode(str(folder)) + b"/caf\xe9_latin1.jpg"  # not UTF-8
    with open(raw, "wb") as f:
        f.write((folder / "ok_photo.jpg").read_bytes())
    cases[os.fsdecode(b"caf\xe9_latin1.jpg")] = True
    return cases


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "data" / "hostile"
    for name, ok in sorted(make(target).items()):
        print(f"{'indexes' if ok else 'skipped' if ok is None else 'fails  '}  {name}")
