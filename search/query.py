"""One typed query for every search: examples to be like, examples not to be like, filters, k.

The CLI and the HTTP API both build a ``SearchQuery`` (with the parsers below, so a box or a date means
the same on both) and hand it to ``Engine.search``, which plans and answers it. Nothing here touches
an index.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from search.region import BadRegion

Source = str | os.PathLike | bytes | int  # a photo: path, image bytes, or an indexed photo id

EARTH_KM = 6371.0088  # mean Earth radius (IUGG)


class BadQuery(BadRegion):
    """A query whose parts do not go together or a value that cannot be parsed (a BadRegion: the same 422/exit 2)."""


@dataclass(frozen=True)
class Example:
    """One example photo, whole or reduced to a region (box, mask, part) or to an object (objects, point)."""

    source: Source
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in the photo's pixels
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # bool [grid, grid] or an image mask
    part: int | None = None  # part N of the photo's k-means parts (of parts_k)
    parts_k: int = 5
    objects: bool = False  # the photo's main object (or SAM's mask for box / point)
    point: tuple[float, float] | None = None  # a click: SAM's mask under it
    size: tuple[int, int] | None = None  # the photo's (width, height) when the caller already knows it (an upload)

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.box, self.mask, self.part)) > 1:
            raise BadQuery("give one of box, mask, part")
        if self.is_object and (self.mask is not None or self.part is not None):
            raise BadQuery("object search takes a point or a box, not a mask or a part")
        if self.part is not None and not 0 <= self.part < self.parts_k:
            raise BadQuery(f"part must be between 0 and {self.parts_k - 1} (the photo is split into {self.parts_k} parts)")

    @property
    def is_object(self) -> bool:
        return self.objects or self.point is not None

    @property
    def mode(self) -> str:
        """How this example is compared with indexed photos: "objects", "region" or "global"."""
        if self.is_object:
            return "objects"
        return "region" if self.box is not None or self.mask is not None or self.part is not None else "global"


@dataclass(frozen=True)
class Filters:
    """Which photos may be answered. Every given field must hold; a photo without the field never passes."""

    label: str | None = None  # among the photo's top-5 class tags (case-insensitive)
    taken_after: str | None = None  # ISO date or date-time, inclusive (the camera's local time)
    taken_before: str | None = None  # exclusive
    camera: str | None = None  # a case-insensitive substring of "make model"
    near: tuple[float, float, float] | None = None  # lat, lon (degrees), radius km: great-circle distance
    folder: str | None = None  # absolute folder; photos in it or below it

    def __post_init__(self) -> None:
        if self.near is not None:
            lat, lon, km = self.near
            if not (-90 <= lat <= 90 and -180 <= lon <= 180 and km >= 0 and math.isfinite(km)):
                raise BadQuery(f"near must be LAT,LON,KM with -90<=LAT<=90, -180<=LON<=180, KM>=0; got {self.near}")
        if self.taken_after and self.taken_before and self.taken_after >= self.taken_before:
            raise BadQuery(f"taken_after {self.taken_after} is not before taken_before {self.taken_before}")

    @property
    def active(self) -> bool:
        return any(v not in (None, "") for v in (self.label, self.taken_after, self.taken_before, self.camera,
                                                 self.near, self.folder))


@dataclass(frozen=True)
class SearchQuery:
    """Photos like every ``like`` example and unlike every ``unlike`` one, among those ``filters`` pass; ``k`` of them.

    One example and no negatives is the plain search of that example's mode (global, region, objects).
    More is relevance feedback, scored as Engine.search documents.
    """

    like: tuple[Example, ...]
    unlike: tuple[Example, ...] = ()
    filters: Filters = Filters()
    k: int = 10

    def __post_init__(self) -> None:
        if not self.like:
            raise BadQuery("a search needs at least one example to be like")
        if self.k < 1:
            raise BadQuery(f"k must be at least 1, got {self.k}")


# -- parsers shared by the CLI and the HTTP API (each raises BadQuery with what was expected)

def _numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise BadQuery(f"expected {what}, got {text!r}")
    return values


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None or text == "":
        return None
    return _numbers(text, 4, "x0,y0,x1,y1 in pixels of the photo")  # type: ignore[return-value]


def parse_point(text: str | None) -> tuple[float, float] | None:
    if text is None or text == "":
        return None
    return _numbers(text, 2, "x,y in pixels of the photo")  # type: ignore[return-value]


def parse_near(text: str | None) -> tuple[float, float, float] | None:
    if text is None or text == "":
        return None
    return _numbers(text, 3, "LAT,LON,KM (degrees, degrees, kilometres)")  # type: ignore[return-value]


def parse_date(text: str | None, *, end: bool = False) -> str | None:
    """YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] -> the ISO form the catalog keeps ("2021-06-30T00:00:00")."""
    if text is None or text == "":
        return None
    try:
        return dt.datetime.fromisoformat(str(text).strip()).replace(tzinfo=None).isoformat(timespec="seconds")
    except ValueError:
        raise BadQuery(f"expected a date YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS), got {text!r}") from None


_ID = re.compile(r"[0-9]+")
_NUM = r"[-+0-9.eE]+"
_AT = re.compile(rf"^(?P<src>.+)@(?P<at>{_NUM}(?:,{_NUM}){{3}}|object(?:={_NUM}(?:,{_NUM}){{3}})?|point={_NUM},{_NUM}|part=[0-9]+)$")
EXAMPLE_FORMS = ("PHOTO (whole), PHOTO@X0,Y0,X1,Y1 (a region), PHOTO@part=N (part N of 5), PHOTO@object (its main "
                 "object), PHOTO@object=X0,Y0,X1,Y1 (SAM's object in the box), PHOTO@point=X,Y (the object under a click)")


def _split_at(text: str) -> tuple[str, str | None]:
    """``PHOTO@FORM`` -> (PHOTO, FORM); a photo without a form -> (PHOTO, None)."""
    m = _AT.match(text)
    return (m["src"], m["at"]) if m is not None else (text, None)


def _example(source: Source, at: str | None, size: tuple[int, int] | None = None) -> Example:
    """An example from its source and what follows its @ (see EXAMPLE_FORMS)."""
    if at is None:
        return Example(source, size=size)
    kind, _, value = at.partition("=")
    if kind == "object":
        return Example(source, objects=True, box=parse_box(value) if value else None, size=size)
    if kind == "point":
        return Example(source, point=parse_point(value), size=size)
    if kind == "part":
        return Example(source, part=int(value), size=size)
    return Example(source, box=parse_box(at), size=size)


def parse_example(text: str) -> Example:
    """A command-line example: a photo id (only digits: ``42``) or a path (``./42`` names a file called 42), whole or
    with one of EXAMPLE_FORMS after an @ (``B.jpg@10,20,200,180``, ``42@object``, ``42@point=30,40``)."""
    src, at = (text, None) if os.path.exists(text) else _split_at(text)  # a file really named "x@1,2,3,4" stays a file
    return _example(photo_source(src), at)


def parse_id_example(text: str, uploads: list[tuple[bytes, tuple[int, int]]] = ()) -> Example:
    """An HTTP example: an indexed photo id or ``upload:N`` (the N-th uploaded example file, from 0; its bytes and
    size), whole or with one of EXAMPLE_FORMS after an @ (never a path)."""
    src, at = _split_at(str(text))
    if src.startswith("upload:") and _ID.fullmatch(src[7:]):
        n = int(src[7:])
        if n >= len(uploads):
            raise BadQuery(f"{src} names upload {n}, but {len(uploads)} example files were sent (counted from 0)")
        return _example(uploads[n][0], at, uploads[n][1])
    if not _ID.fullmatch(src):
        raise BadQuery(f"expected an indexed photo id or upload:N, optionally with @ and one of {EXAMPLE_FORMS}, got {text!r}")
    return _example(photo_source(src), at)


def photo_source(text: str) -> str | int:
    """Only digits: an indexed photo id; anything else: a path, which must be a file."""
    if _ID.fullmatch(text):
        photo_id = int(text)
        if not 1 <= photo_id < 2**62:
            raise BadQuery(f"photo id {photo_id} is not in the index (ids are 1 and up)")
        return photo_id
    if not os.path.isfile(os.path.expanduser(text)):
        raise BadQuery(f"example photo not found: {text} (a number alone is a photo id; write ./{text} for a file)")
    return os.path.expanduser(text)


def great_circle_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    """Haversine distance in km from (lat0, lon0) to each (lat, lon), all in degrees."""
    p, p0 = np.radians(lat), math.radians(lat0)
    dp, dl = p - p0, np.radians(lon - lon0)
    a = np.sin(dp / 2) ** 2 + np.cos(p) * math.cos(p0) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))
