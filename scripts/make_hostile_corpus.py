"""Write the hostile and broken input corpus kept in tests/data/hostile/.

    python scripts/make_hostile_corpus.py [OUT]

Each file is named for what it is. Things git cannot keep (permissions, broken
symlinks, symlink loops, a file that vanishes mid-run, non-UTF-8 names) are made
by the tests themselves, with the functions at the bottom of this file.
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
from PIL import Image

pillow_heif.register_heif_opener()

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech101-sample" / "images" / "airplanes__image_0001.jpg"

# file name -> True if it must index, False if it must be recorded as failed
EXPECT: dict[str, bool] = {}


def _put(out: Path, name: str, data: bytes, ok: bool) -> None:
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


def make(out: Path) -> dict[str, bool]:
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
    return dict(EXPECT)


# -- what git cannot keep: made by the tests in a temporary copy


def add_runtime_cases(folder: Path) -> dict[str, bool]:
    """Broken symlink, symlink loop, unreadable file, non-UTF-8 name. Returns name -> must index."""
    cases: dict[str, bool] = {}
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
        print(f"{'indexes' if ok else 'fails  '}  {name}")
