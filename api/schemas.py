"""Request and response models of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Result(BaseModel):
    id: int
    path: str
    score: float
    width: int | None = None
    height: int | None = None
    box: list[int] | None = Field(None, description="region search: x0, y0, x1, y1 of the match in the photo's pixels")
    heat: list[list[float]] | None = Field(None, description="region search: best match per cell of the photo's patch grid")
    object_id: int | None = Field(None, description="object search: the matching object (box is its box)")
    mask: dict | None = Field(None, description="object search: its mask as COCO RLE {size: [h, w], counts}, column-major")


class QueryObject(BaseModel):
    box: list[int] = Field(description="x0, y0, x1, y1 of the query's object in the query photo's pixels")
    mask: dict | None = Field(None, description="its SAM mask as COCO RLE (None for a stored object)")


class SearchResponse(BaseModel):
    mode: str = Field(description="global, region, objects, or feedback (several examples or unlike examples)")
    query_size: list[int] = Field(description="width, height of the query photo")
    grid: int
    query_object: QueryObject | None = None
    results: list[Result]


class PhotoOut(BaseModel):
    id: int
    path: str
    width: int | None = None
    height: int | None = None
    taken: str | None = Field(None, description="date taken, ISO 8601 in the camera's local time")
    taken_source: str | None = Field(None, description="DateTimeOriginal, DateTime or mtime (the file's)")
    make: str | None = None
    model: str | None = None
    lat: float | None = None
    lon: float | None = None


class Tag(BaseModel):
    label: str
    prob: float


class PhotoDetail(PhotoOut):
    tags: list[Tag] = Field(default_factory=list, description="the classifier's top-5 at index time (none without one)")


class PhotoPage(BaseModel):
    total: int = Field(description="photos that pass the filters")
    offset: int
    photos: list[PhotoOut]


class ObjectOut(BaseModel):
    id: int
    box: list[int]
    score: float
    mask: dict


class PartsResponse(BaseModel):
    k: int
    grid: int
    size: list[int]
    labels: list[list[int]]


class PartPhotoOut(BaseModel):
    id: int
    path: str
    patches: int
    box: list[int]


class CollectionPartOut(BaseModel):
    part: int
    patches: int
    photos: list[PartPhotoOut]


class Stats(BaseModel):
    snapshot: str
    model: str
    precision: str
    resolution: int
    grid: int
    photos_indexed: int
    photos_failed: int
    global_kind: str
    patch_kind: str
    classifier: str | None = None
    segmenter: str | None = None
    objects: int = 0
    max_k: int = Field(description="the most results a search may ask for (k)")


class JobRequest(BaseModel):
    folder: str = Field(min_length=1, max_length=4096,  # PATH_MAX
                        description="absolute path of a folder on the server's disk to index (recursively)")
    check_duplicates: bool = Field(False, description="when done, list the photos the job added that duplicate indexed ones")


class JobDuplicate(BaseModel):
    id: int = Field(description="a photo the job added")
    duplicate_of: int = Field(description="the indexed photo it duplicates (or another the job added)")
    kind: str
    score: float


class Job(BaseModel):
    id: int
    folder: str
    state: str = Field(description="queued, running, cancelling, done, failed or cancelled")
    stage: str | None = Field(None, description="while running: scanning (the folder), indexing (photos read / total), "
                                                "duplicates (checking what it added)")
    done: int = Field(0, description="photos read (decoded and embedded, or found unchanged) of total")
    total: int = Field(0, description="photos to read (new or changed; known once the folder is scanned)")
    indexed: int = Field(0, description="photos committed so far: searchable now")
    failed: int = 0
    error: str | None = None
    duplicates: list[JobDuplicate] = Field(default_factory=list, description="with check_duplicates, once done")


class Deleted(BaseModel):
    id: int
    deleted: bool


class LabelCount(BaseModel):
    label: str
    photos: int


class DuplicatePhoto(BaseModel):
    id: int
    path: str = Field(description="the file's name (the id addresses the photo)")
    width: int
    height: int
    bytes: int
    score: float = Field(description="verified score against the kept photo: share of the overlap whose patches agree")
    box: list[int] | None = Field(None, description="x0, y0, x1, y1 of the overlap with the kept photo, in this photo's pixels")
    relation: str = Field(description="keep, exact, edited, similar, or linked (only through other members)")
    transform: str | None = Field(None, description="grid symmetry to the kept photo: none, mirror, rotate 90, ...")
    present: bool = Field(description="the file is still where it was indexed, with the same size")


class DuplicateGroup(BaseModel):
    kind: str = Field(description="exact, edited or similar")
    keep: int | None = Field(description="the photo to keep (None when no file of the group is still on disk)")
    reasons: list[str]
    photos: list[DuplicatePhoto]


class DuplicatesPage(BaseModel):
    total: int = Field(description="groups matching the filters")
    offset: int
    limit: int
    groups: list[DuplicateGroup]


class PhotoDuplicate(BaseModel):
    id: int
    path: str
    width: int
    height: int
    bytes: int
    kind: str
    score: float
    transform: str | None = None
    box: list[int] | None = Field(None, description="the overlap in this (the other) photo's pixels")


class PhotoDuplicates(BaseModel):
    id: int
    duplicates: list[PhotoDuplicate]


class MoveGroup(BaseModel):
    keep: int = Field(description="the photo to keep (a member of the group, still on disk)")
    photos: list[int] = Field(min_length=2, max_length=10_000, description="the group's photos as reviewed: all but keep are moved")


class MoveRequest(BaseModel):
    folder: str = Field(min_length=1, max_length=4096, description="an existing folder on the server's disk (absolute; "
                                                                   "below --allowed-root if the server has any)")
    groups: list[MoveGroup] = Field(min_length=1, max_length=10_000)
    apply: bool = Field(False, description="false: a dry run that lists what would move")


class MoveOut(BaseModel):
    source: str = Field(description="the file's name")
    to: str = Field(description="where it goes, relative to the folder (group-NNNN/name)")


class MoveError(BaseModel):
    path: str
    reason: str


class MoveResponse(BaseModel):
    applied: bool
    moved: list[MoveOut]
    errors: list[MoveError]
    manifest: str | None = Field(None, description="the manifest's name in the folder (undo: dinosearch duplicates IDX --undo)")
