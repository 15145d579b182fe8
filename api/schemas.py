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


class SearchResponse(BaseModel):
    mode: str = Field(description="global or region")
    query_size: list[int] = Field(description="width, height of the query photo")
    grid: int
    results: list[Result]


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


class JobRequest(BaseModel):
    folder: str = Field(description="folder on the server's disk to index (recursively)")


class Job(BaseModel):
    id: int
    folder: str
    state: str = Field(description="queued, running, done or failed")
    done: int = 0
    total: int = 0
    indexed: int = 0
    failed: int = 0
    error: str | None = None


class Deleted(BaseModel):
    id: int
    deleted: bool


class LabelCount(BaseModel):
    label: str
    photos: int
