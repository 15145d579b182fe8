"""Reader: find photos in a folder and turn each file into a fixed-size RGB array.

Decoding is the same code for indexed photos and for query photos, so both are
embedded identically. It runs in worker processes during indexing; nothing here
imports torch.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pillow_heif
import pillow_jxl  # noqa: F401  (registers JPEG XL with Pillow)
import rawpy
from PIL import Image, ImageOps

from indexer.errors import DecodeError, ImageTooLarge, NotAnImage

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener()  # HEIC/HEIF (phone photos); AVIF is native in Pillow

# The scan picks files by extension (fast); decoding goes by content, whatever the extension says.
PHOTO_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .mpo .png .apng .webp .gif .bmp .dib .tif .tiff .heic .heif .hif .avif .jxl "
    ".jp2 .j2k .jpf .jpx .pnm .pgm .ppm .pbm".split()
)
RAW_EXTENSIONS = frozenset(  # camera RAW, decoded by LibRaw (rawpy)
    ".dng .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .orf .rw2 .raf .pef .srw .rwl .3fr .iiq .erf .mrw .x3f".split()
)
EXTENSIONS = PHOTO_EXTENSIONS | RAW_EXTENSIONS
RAW_PREVIEW_MIN_SIDE = 1024  # a RAW's embedded preview is used when its longest side is at least this (and the draft size)
DEFAULT_MAX_PIXELS = 150_000_000  # declared size above this is refused (decompression bombs)
DEFAULT_MAX_BYTES = 256 * 2**20  # files larger than this are refused before being read
DEFAULT_DECODE_TIMEOUT = 60.0  # seconds; a file on a stalled network mount is given up after this
# Pillow's own guard raises at 2x its limit; ours is checked first, on the declared size.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class FileInfo:
    """One photo file as seen by the scan."""

    path: str  # absolute, as found (symlinks are not resolved)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class PhotoMeta:
    """What a photo's header says about it: when, with what camera, where. Any field may be unknown (None)."""

    taken: str | None = None  # ISO 8601 local time of the camera's clock ("2021-06-30T14:05:09"), no zone
    taken_source: str | None = None  # "DateTimeOriginal", "DateTime" or "mtime" (the file's, in this machine's zone)
    make: str | None = None
    model: str | None = None
    lat: float | None = None  # degrees, north positive
    lon: float | None = None  # degrees, east positive
    orientation: int | None = None  # EXIF orientation 1..8


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
    meta: PhotoMeta | None = None  # EXIF date, camera, GPS (read from the same bytes; never the reason a photo fails)


# First bytes of the formats read (for files without an extension); ISO-BMFF brands are checked apart.
_MAGIC = (
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
    b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51",
    b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00",
)
_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis", b"crx "}


def looks_like_image(head: bytes) -> bool:
    """Cheap magic-number check on a file's first 16 bytes: could one of the formats read hold this?"""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in _BRANDS:
        return True
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # BMP: two reserved words are zero
        return True
    if head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in (b" ", b"\t", b"\r", b"\n"):  # PNM
        return True
    return any(head.startswith(m) for m in _MAGIC)


@dataclass
class ScanReport:
    """What a scan found besides photos: files it could not read (failures) and files it passed over."""

    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): recorded as failed
    not_images: collections.Counter = field(default_factory=collections.Counter)  # extension ("" for none) -> count


def _kind(mode: int) -> str:
    return ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode) else "directory" if stat.S_ISDIR(mode) else "special file")


def _sniff(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return looks_like_image(f.read(16))
    except OSError:
        return False


def scan(root: str | os.PathLike, report: ScanReport | None = None) -> Iterator[FileInfo]:
    """Yield the photo files below ``root`` in sorted order.

    A photo is a regular file with an image or RAW extension, or without an extension
    but with an image's first bytes. Other files are counted in ``report.not_images`` by
    extension. Photo-named entries that cannot be read (broken link, FIFO, socket,
    device) and unlistable folders go to ``report.errors`` as (path, reason); nothing is
    ever opened that is not a regular file, so a FIFO cannot hang the scan.
    Directory symlinks are not followed (no loops); file symlinks are followed.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DecodeError(f"not a folder: {root}")
    report = report if report is not None else ScanReport()

    def onerror(e: OSError) -> None:
        report.errors.append((e.filename or root, f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            ext = os.path.splitext(name)[1].lower()
            if name.startswith("._") or (ext and ext not in EXTENSIONS):  # AppleDouble, sidecars, videos, text
                report.not_images[ext] += 1
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as e:
                if ext:
                    report.errors.append((path, f"cannot stat: {e.strerror or e} (broken link?)"))
                else:
                    report.not_images[ext] += 1
                continue
            if not stat.S_ISREG(st.st_mode) or (not ext and not _sniff(path)):
                if ext:
                    report.errors.append((path, f"not a regular file ({_kind(st.st_mode)}): never opened"))
                else:
                    report.not_images[ext] += 1
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


_RAW_MAGIC = (b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")


def _camera_raw(data: bytes, img: Image.Image | None) -> bool:
    """Does the content say camera RAW? RAF/ORF/RW2/CR3 by their magic; TIFF-based ones (DNG, CR2, NEF,
    ARW, PEF, ...) by a DNGVersion tag, a Canon CR2 header, a CFA/linear-raw photometric, or a camera
    Make with a reduced-size first image or sub-images (a plain TIFF, even a 16-bit one, has none of these)."""
    if data.startswith(_RAW_MAGIC) or (data[4:8] == b"ftyp" and data[8:12] == b"crx "):
        return True
    if img is None or img.format != "TIFF":
        return False
    tags = img.tag_v2
    return (50706 in tags or data[8:10] == b"CR" or tags.get(262) in (32803, 34892)
            or (271 in tags and (330 in tags or tags.get(254) == 1)))


def _flip(a: np.ndarray, flip: int) -> np.ndarray:
    """Apply LibRaw's orientation code (sizes.flip: bit 1 mirror columns, 2 mirror rows, 4 transpose) as postprocess does."""
    if flip & 2:
        a = a[::-1]
    if flip & 1:
        a = a[:, ::-1]
    if flip & 4:
        a = a.transpose(1, 0, 2)
    return np.ascontiguousarray(a)


class NotCameraRaw(DecodeError):
    """LibRaw does not know the file as a RAW (a TIFF that only looked like one)."""


def _raw_preview(raw, need: int) -> Image.Image | None:
    """The RAW's embedded preview as stored (not yet oriented), if its longest side is at least ``need``."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        img = Image.open(io.BytesIO(thumb.data))  # its own EXIF orientation is ignored: the RAW's applies
        return img if max(img.size) >= need else None
    a = thumb.data
    if a.ndim != 3 or max(a.shape[:2]) < need:
        return None
    a = (a >> 8 if a.dtype == np.uint16 else a).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a[..., :3] if a.shape[2] >= 3 else a[..., 0]))


def open_raw(data: bytes, *, draft_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a camera RAW with LibRaw: its embedded preview when that is large enough (longest side
    >= max(RAW_PREVIEW_MIN_SIDE, draft_size)), else a half-size demosaic with the camera's white balance.
    The RAW's orientation (sizes.flip) is applied either way. Returns (RGB image, oriented full size)."""
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sz = raw.sizes
            w, h = sz.width, sz.height
            if w <= 0 or h <= 0:
                raise DecodeError(f"invalid image size {w}x{h}")
            if w * h > max_pixels:
                raise ImageTooLarge(f"too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
            size = (h, w) if sz.flip & 4 else (w, h)
            try:
                preview = _raw_preview(raw, max(RAW_PREVIEW_MIN_SIDE, draft_size))
                if preview is not None:
                    if draft_size:
                        preview.draft("RGB", (draft_size, draft_size))
                    return Image.fromarray(_flip(np.asarray(_to_rgb(preview)), sz.flip)), size
            except (OSError, ValueError, SyntaxError) as e:  # a broken preview: decode the sensor data instead
                log.info("RAW preview unreadable (%s), decoding the sensor data", e)
            return Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True)), size  # postprocess applies flip
    except DecodeError:
        raise
    except rawpy.LibRawFileUnsupportedError as e:
        raise NotCameraRaw(f"not a camera RAW that LibRaw knows ({e})") from None
    except rawpy.LibRawError as e:
        raise DecodeError(f"camera RAW that LibRaw cannot read ({type(e).__name__}: {e})") from None
    except MemoryError:
        raise
    except Exception as e:
        raise DecodeError(f"corrupt camera RAW ({type(e).__name__}: {e})") from None


def open_photo(data: bytes, *, draft_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes to an oriented RGB image, by content whatever the file was called.

    Returns the image (possibly decoded at reduced size, no less than ``draft_size`` on
    each side: JPEG DCT scaling, a RAW's preview) and the oriented full size (width,
    height). Multi-frame files (GIF, APNG, MPO, WebP, TIFF) give their first frame.
    Raises DecodeError with the reason for anything that is not a usable photo.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        if _camera_raw(data, None):
            return open_raw(data, draft_size=draft_size, max_pixels=max_pixels)
        raise NotAnImage("not an image, or an unsupported format") from None
    except Exception as e:  # Pillow raises many types for garbage headers
        raise DecodeError(f"corrupt or truncated image header ({type(e).__name__}: {e})") from None
    if _camera_raw(data, img):
        try:
            return open_raw(data, draft_size=draft_size, max_pixels=max_pixels)
        except NotCameraRaw as e:  # a TIFF that only looked like a RAW: Pillow reads it
            log.info("%s; decoding it as a TIFF", e)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    if draft_size and img.format in ("JPEG", "MPO"):
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
    """Read a whole regular file, refusing anything above ``max_bytes`` before reading it.

    Opened non-blocking and checked with fstat, so a FIFO, socket or device put in a
    photo's place after the scan is refused at once instead of blocking forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError(f"not a regular file ({_kind(st.st_mode)}): never read")
        if st.st_size > max_bytes:
            raise ImageTooLarge(f"file too large: {st.st_size / 2**20:.0f} MiB exceeds the {max_bytes / 2**20:.0f} MiB limit")
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
    timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds a file may take (read + decode) before it is given up as failed


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
        out.meta = photo_meta(data, info.mtime_ns)
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


# EXIF tags (Pillow's ExifTags numbers): IFD0, the Exif sub-IFD and the GPS sub-IFD.
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_EXIF_IFD, _GPS_IFD, _DATETIME_ORIGINAL = 0x8769, 0x8825, 0x9003
_EXIF_DATE = re.compile(r"\s*(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


def exif_date(value) -> str | None:
    """An EXIF date ("2021:06:30 14:05:09") -> ISO "2021-06-30T14:05:09"; None for blanks and impossible dates."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    m = _EXIF_DATE.match(str(value)) if value is not None else None
    if m is None:
        return None
    try:
        return dt.datetime(*map(int, m.groups())).isoformat()
    except ValueError:  # "0000:00:00 00:00:00", month 13
        return None


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None:
        return None
    value = str(value).replace("\x00", "").strip()
    return value or None


def gps_degrees(dms, ref) -> float | None:
    """EXIF (degrees, minutes, seconds) rationals and an N/S/E/W ref -> signed degrees (S and W negative)."""
    try:
        d, m, s = (float(v) for v in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if not np.isfinite(value):
        return None
    ref = _text(ref)
    return -value if ref is not None and ref[:1].upper() in ("S", "W") else value


def photo_meta(data: bytes, mtime_ns: int | None = None) -> PhotoMeta:
    """Date taken, camera and GPS position from a photo's EXIF (reads only its header, never decodes pixels).

    The date is DateTimeOriginal, else DateTime, else the file's mtime (``mtime_ns``, in this
    machine's time zone), and says which. Broken or missing EXIF gives unknown fields, never an error."""
    fields: dict = {}
    try:
        with Image.open(io.BytesIO(data)) as img:
            if "exif" not in img.info and img.format != "TIFF":  # e.g. a PNG: its getexif() would decode every pixel
                raise ValueError(f"no EXIF block in the {img.format} header")
            exif = img.getexif()
            sub = exif.get_ifd(_EXIF_IFD)
            gps = exif.get_ifd(_GPS_IFD)
            for source, value in (("DateTimeOriginal", sub.get(_DATETIME_ORIGINAL)), ("DateTime", exif.get(_DATETIME))):
                taken = exif_date(value)
                if taken is not None:
                    fields.update(taken=taken, taken_source=source)
                    break
            fields.update(make=_text(exif.get(_MAKE)), model=_text(exif.get(_MODEL)))
            o = exif.get(_ORIENTATION)
            if isinstance(o, int) and 1 <= o <= 8:
                fields["orientation"] = o
            lat, lon = gps_degrees(gps.get(2), gps.get(1)), gps_degrees(gps.get(4), gps.get(3))
            if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
                fields.update(lat=lat, lon=lon)
    except Exception as e:  # a broken header or EXIF block: the photo itself may still decode
        log.debug("no EXIF: %s", e)
    if "taken" not in fields and mtime_ns is not None:
        fields.update(taken=dt.datetime.fromtimestamp(mtime_ns / 1e9).replace(microsecond=0).isoformat(), taken_source="mtime")
    return PhotoMeta(**fields)


META_HEAD_BYTES = 1 << 20  # EXIF sits in a photo's first 64 KiB (JPEG APP1); a RAW or TIFF may put it further


def read_meta(path: str | os.PathLike, mtime_ns: int | None = None) -> PhotoMeta:
    """Metadata of a photo on disk from the head of its file (for indexed photos that have none yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return photo_meta(b"", mtime_ns)
            head = f.read(META_HEAD_BYTES)
    except OSError:
        head = b""
    return photo_meta(head, mtime_ns)
