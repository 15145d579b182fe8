"""The FastAPI app: routes over search.Engine and the indexer, errors as JSON, a web page.

Run it with `dinosearch serve IDX`. Only indexed photos are ever served: a request
names a photo by its id, never by a path. (No `from __future__ import annotations`
here: FastAPI must see the Annotated aliases built inside create_app.)
"""


import asyncio
import errno
import hmac
import io
import ipaddress
import logging
import os
import socket
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.duplicate_routes import router as duplicates_router
from api.duplicate_routes import write_router as duplicates_write_router
from api.files import PhotoGone, read_indexed
from api.service import (
    BadFolder,
    Busy,
    FolderForbidden,
    JobFinished,
    Service,
    UnknownJob,
    check_folder,
)
from api.settings import Settings
from api.uploads import check_upload
from indexer import catalog
from indexer.errors import (
    DecodeError,
    DinosearchError,
    ImageTooLarge,
    IndexBusy,
    IndexFormatError,
    IndexWriteError,
    ModelMismatch,
    NotAnImage,
)
from indexer.reader import open_photo
from search import Example, Filters, Hit, SearchQuery, UnknownPhoto
from search.duplicates import BadDuplicateQuery, MoveError
from search.query import EXAMPLE_FORMS, parse_box, parse_date, parse_id_example, parse_near, parse_point
from search.region import BadRegion

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

PhotoId = Annotated[int, PathParam(ge=1, le=2**62, description="id of an indexed photo")]


def shown(path: str) -> str:
    """A file name fit for JSON: bytes that are not UTF-8 become U+FFFD (the id is what addresses the photo)."""
    return os.fsencode(Path(path).name).decode("utf-8", "replace")


# Error types -> HTTP status, first match wins (subclasses before their bases); never by message text.
STATUS: list[tuple[type[DinosearchError], int]] = [
    (UnknownPhoto, 404), (UnknownJob, 404), (PhotoGone, 410),
    (BadRegion, 422), (BadFolder, 422), (FolderForbidden, 403), (BadDuplicateQuery, 422), (MoveError, 422),
    (ModelMismatch, 409), (IndexBusy, 409), (JobFinished, 409),
    (ImageTooLarge, 413), (NotAnImage, 415), (DecodeError, 400),
    (Busy, 503), (IndexFormatError, 503),  # NotReady is an IndexFormatError
]
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def _status(e: DinosearchError) -> int:
    if isinstance(e, IndexWriteError):  # the server's own disk: read-only is a conflict, full is 507
        return 409 if e.errno in READ_ONLY else 507
    return next((code for kind, code in STATUS if isinstance(e, kind)), 400)


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def host_names(bind: str, extra: tuple[str, ...] = ()) -> tuple[frozenset[str], bool]:
    """The Host names a server bound to ``bind`` answers, and whether any IP-address literal is fine too.

    A loopback bind answers its loopback names; a bind to every interface (0.0.0.0, ::) answers this machine's
    names and any IP literal (a DNS-rebinding page always sends a DNS name, never a literal: a literal Host
    means the page itself came from that address); ``extra`` (--allowed-host) adds names."""
    names = {h.strip().strip("[]").lower().rstrip(".") for h in (bind, *extra) if h.strip()}
    try:
        ip = ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        ip = None
    if bind == "localhost" or (ip is not None and ip.is_loopback):
        names |= LOOPBACK
    any_ip = ip is not None and ip.is_unspecified
    if any_ip:
        names |= LOOPBACK | {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names), any_ip


def _host_of(value: str) -> str | None:
    """The name part of a Host header ('[::1]:8000' -> '::1'), or None if it is malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = (v[1:end], v[end + 1:]) if end > 0 else ("", "")
    else:
        name, sep, port = v.partition(":")
        rest = sep + port
    if not name or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
        return None
    return name.rstrip(".")


class HostCheck:
    """Answer only requests whose Host header names this server (against DNS rebinding: a web page whose name
    is re-pointed at 127.0.0.1 would otherwise read the collection through the visitor's browser); others get
    421 with a JSON detail before any route runs."""

    def __init__(self, app, names: frozenset[str], any_ip: bool = False):
        self.app, self.names, self.any_ip = app, names, any_ip

    def allowed(self, host: str | None) -> bool:
        if host in self.names:
            return True
        if self.any_ip and host is not None:
            try:
                ipaddress.ip_address(host)
                return True
            except ValueError:
                return False
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        raw = dict(scope["headers"]).get(b"host")
        host = _host_of(raw.decode("latin-1")) if raw is not None else None
        if self.allowed(host):
            return await self.app(scope, receive, send)
        shown_host = (raw or b"").decode("latin-1")[:100]
        response = JSONResponse({"detail": f"this server does not answer to Host {shown_host!r}; it answers to "
                                           f"{', '.join(sorted(self.names))} (serve --allowed-host NAME adds one)"}, 421)
        await response(scope, receive, send)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes before it is read (by its Content-Length, or while it streams),
    and one that stalls for ``timeout`` seconds (an abandoned or trickled upload does not hold the server)."""

    def __init__(self, app, limit: int, timeout: float = 30.0):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": f"request too large: {int(declared)} bytes, the limit is {self.limit}"}, 413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise HTTPException(408, f"upload stalled: no data for {self.timeout:g} s") from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request too large: over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def create_app(settings: Settings, *, service: Service | None = None) -> FastAPI:
    svc = service or Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start()  # the model loads here, once, not at import
        yield
        svc.stop()

    # Swagger UI and ReDoc from assets the fastapi-offline wheel ships (served under /static-offline-docs):
    # /docs and /redoc work without a network, and their versions move with a pip upgrade, not by hand
    app = FastAPIOffline(title="dinosearch", version="0.1.0", lifespan=lifespan,
                  description="Image similarity search on DINOv2 features: whole photos, regions, parts.")
    app.state.service = svc
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024,  # + multipart framing
                       timeout=settings.upload_timeout)
    app.add_middleware(HostCheck, *host_names(settings.host, settings.allowed_hosts))  # added last: runs first

    @app.exception_handler(DinosearchError)
    async def dinosearch_error(request: Request, e: DinosearchError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Busy) else None
        return JSONResponse({"detail": str(e)}, status_code=_status(e), headers=headers)

    def get_service() -> Service:
        return svc

    Svc = Annotated[Service, Depends(get_service)]

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.token is None:
            raise HTTPException(403, "write routes are disabled: start the server with DINOSEARCH_TOKEN set")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer $DINOSEARCH_TOKEN'")

    Writer = Annotated[None, Depends(require_token)]

    async def read_upload(request: Request, image: UploadFile) -> tuple[bytes, tuple[int, int]]:
        """The uploaded bytes and the photo's oriented size, after its header passed the pixel limits."""
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"upload too large: the limit is {settings.max_upload_bytes} bytes")
        size = check_upload(data, max_upload_pixels=settings.max_upload_pixels, max_pixels=settings.max_pixels)
        return data, size

    def decoded_upload(svc: Service, fn, *args):
        """Run ``fn`` (which decodes an upload) in one of the service's few decode slots."""
        with svc.decode_slot():
            return fn(*args)

    def results(svc: Service, hits: list[Hit]) -> list[schemas.Result]:
        sizes = svc.engine.photo_size([h.photo_id for h in hits])
        return [schemas.Result(
            id=h.photo_id, path=shown(h.path), score=round(h.score, 6),
            width=sizes.get(h.photo_id, (None, None))[0], height=sizes.get(h.photo_id, (None, None))[1],
            box=list(h.box) if h.box else None,
            heat=np.round(h.heat, 4).tolist() if h.heat is not None else None,
            object_id=h.object_id, mask=h.mask,
        ) for h in hits]

    def run_search(svc: Service, first: Example, k: int, like: list[str], unlike: list[str],
                   filters: Filters, uploads: list[tuple[bytes, tuple[int, int]]] = ()) -> schemas.SearchResponse:
        """Build the typed query (search.query) and let the Engine plan and answer it."""
        engine = svc.engine

        def checked(e: Example) -> Example:
            if e.is_object and isinstance(e.source, int) and (e.point is not None or e.box is not None):
                return replace(e, source=read_indexed(engine.db, e.source)[0])  # SAM decodes it: the checked bytes
            return e

        q = SearchQuery(tuple(checked(e) for e in (first, *(parse_id_example(t, uploads) for t in like))),
                        unlike=tuple(checked(parse_id_example(t, uploads)) for t in unlike), filters=filters, k=k)
        r = engine.search(q)
        qo = None
        if r.query_object is not None:
            from indexer.objects import rle_encode

            m = r.query_object.mask
            qo = schemas.QueryObject(box=list(r.query_object.box), mask=rle_encode(m.mask) if m is not None else None)
        return schemas.SearchResponse(mode=r.mode, query_size=list(r.query_size), grid=engine.manifest.grid,
                                      results=results(svc, r.hits), query_object=qo)

    def example(source, box: str | None, part: int | None, parts_k: int, objects: bool, point: str | None,
                size: tuple[int, int] | None = None) -> Example:
        return Example(source, box=parse_box(box), part=part, parts_k=parts_k, objects=objects, point=parse_point(point),
                       size=size)

    def filter_params(label: Annotated[str | None, Query(max_length=200, description="only photos with this class tag")] = None,
                      taken_after: Annotated[str | None, Query(max_length=40, description="only photos taken on or after this date (YYYY-MM-DD[THH:MM:SS])")] = None,
                      taken_before: Annotated[str | None, Query(max_length=40, description="only photos taken before this date")] = None,
                      camera: Annotated[str | None, Query(max_length=200, description="camera make or model contains this (any case)")] = None,
                      near: Annotated[str | None, Query(max_length=100, description="LAT,LON,KM: taken within KM km (great-circle)")] = None,
                      folder: Annotated[str | None, Query(max_length=4096, description="only photos in this folder or below it")] = None,
                      ) -> Filters:
        return Filters(label=label, taken_after=parse_date(taken_after), taken_before=parse_date(taken_before),
                       camera=camera, near=parse_near(near), folder=folder)

    FilterParams = Annotated[Filters, Depends(filter_params)]
    forms = "ID or upload:N (the N-th `examples` file of POST /search, from 0), whole or as " + EXAMPLE_FORMS.replace("PHOTO", "ID")
    Like = Annotated[list[str], Query(max_length=64, description=f"also like these photos (repeatable): {forms}")]
    Unlike = Annotated[list[str], Query(max_length=64, description=f"not like these photos (repeatable): {forms}")]

    K = Annotated[int, Query(ge=1, le=settings.max_k, description="number of results")]
    Box = Annotated[str | None, Query(description="region search: x0,y0,x1,y1 in pixels of the query photo")]
    Part = Annotated[int | None, Query(ge=0, description="region search: this part of the query photo")]
    PartsK = Annotated[int, Query(ge=2, le=16, description="how many parts the photo is split into")]
    Objects = Annotated[bool, Query(description="object search: the query's main object (or SAM's mask for box/point) "
                                                "against every indexed object")]
    Point = Annotated[str | None, Query(description="object search: x,y of a click in the query photo (SAM point prompt)")]

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/stats", response_model=schemas.Stats)
    def stats(svc: Svc) -> schemas.Stats:
        """What the index holds."""
        e = svc.engine
        counts = catalog.status_counts(e.db)
        m = e.manifest
        return schemas.Stats(snapshot=e.snapshot.name, model=m.model, precision=m.precision, resolution=m.resolution,
                             grid=m.grid, photos_indexed=counts.get("indexed", 0), photos_failed=counts.get("failed", 0),
                             global_kind=m.global_kind, patch_kind=m.patch_kind, classifier=m.classifier,
                             segmenter=(m.segmenter or {}).get("model"), objects=e.object_count(), max_k=settings.max_k)

    @app.post("/search", response_model=schemas.SearchResponse)
    async def search_upload(request: Request, svc: Svc, image: Annotated[UploadFile, File(description="the query photo")],
                            filters: FilterParams, k: K = 10, box: Box = None, part: Part = None, parts_k: PartsK = 5,
                            objects: Objects = False, point: Point = None, like: Like = [],  # noqa: B006 (FastAPI copies it)
                            unlike: Unlike = [],  # noqa: B006
                            examples: Annotated[list[UploadFile], File(description=(
                                "more example photos, named by like/unlike as upload:0, upload:1, ..."))] = [],  # noqa: B006
                            ) -> schemas.SearchResponse:
        """Photos like an uploaded photo (global), containing a region of it (box or part), or holding an object
        like one of its objects (objects / point), with where; like/unlike add examples (relevance feedback): indexed
        photos by id, or uploaded ``examples`` files, each whole, a region, a part or an object."""
        data, size = await read_upload(request, image)
        uploads = [await read_upload(request, f) for f in examples]
        first = example(data, box, part, parts_k, objects, point, size)
        return await run_in_threadpool(decoded_upload, svc, run_search, svc, first, k, like, unlike, filters, uploads)

    @app.get("/photos/{photo_id}/similar", response_model=schemas.SearchResponse)
    def search_by_id(photo_id: PhotoId, svc: Svc, filters: FilterParams, k: K = 10, box: Box = None, part: Part = None,
                     parts_k: PartsK = 5, objects: Objects = False, point: Point = None,
                     like: Like = [], unlike: Unlike = []) -> schemas.SearchResponse:  # noqa: B006
        """Photos like an indexed photo, containing a region of it, or holding one of its objects; like/unlike add
        indexed examples (relevance feedback)."""
        return run_search(svc, example(photo_id, box, part, parts_k, objects, point), k, like, unlike, filters)

    @app.get("/photos", response_model=schemas.PhotoPage)
    def browse(svc: Svc, filters: FilterParams,
               sort: Annotated[Literal["taken", "added", "path"], Query(description="taken (undated last), added or path")] = "taken",
               order: Annotated[Literal["asc", "desc"], Query()] = "asc",
               offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
               limit: Annotated[int, Query(ge=0, le=1000)] = 100) -> schemas.PhotoPage:
        """A page of the indexed photos with their date, camera and place, sorted and filtered, without a query."""
        total, page = svc.engine.browse(filters, sort=sort, order=order, offset=offset, limit=limit)
        return schemas.PhotoPage(total=total, offset=offset, photos=[photo_out(p) for p in page])

    def photo_out(p, model=schemas.PhotoOut, **extra):
        return model(id=p.photo_id, path=shown(p.path), width=p.width, height=p.height, taken=p.taken,
                     taken_source=p.taken_source, make=p.make, model=p.model, lat=p.lat, lon=p.lon, **extra)

    @app.get("/photos/{photo_id}/info", response_model=schemas.PhotoDetail)
    def photo_info(photo_id: PhotoId, svc: Svc) -> schemas.PhotoDetail:
        """One indexed photo's file name, size, date taken, camera, place and tags (the page's detail view)."""
        p = svc.engine.photo_info(photo_id)
        if p is None:
            raise UnknownPhoto(f"photo id {photo_id} is not in the index")
        tags = [schemas.Tag(label=lab, prob=round(prob, 4)) for lab, prob in svc.engine.labels_of([photo_id]).get(photo_id, [])]
        return photo_out(p, schemas.PhotoDetail, tags=tags)

    @app.get("/photos/{photo_id}/objects", response_model=list[schemas.ObjectOut])
    def objects_of(photo_id: PhotoId, svc: Svc) -> list[schemas.ObjectOut]:
        """The SAM objects stored for an indexed photo (box and mask each, best first)."""
        photo_path(svc, photo_id)
        return [schemas.ObjectOut(id=o["id"], box=list(o["box"]), score=round(o["score"], 6), mask=o["mask"])
                for o in svc.engine.objects_of([photo_id]).get(photo_id, [])]

    @app.get("/labels", response_model=list[schemas.LabelCount])
    def labels(svc: Svc, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[schemas.LabelCount]:
        """Class tags of the collection (top-1 per photo) with how many photos carry each."""
        return [schemas.LabelCount(label=lab, photos=n) for lab, n in svc.engine.label_counts(limit)]

    @app.post("/parts", response_model=schemas.PartsResponse)
    async def parts_upload(request: Request, svc: Svc, image: Annotated[UploadFile, File()], k: PartsK = 5) -> schemas.PartsResponse:
        """The parts of an uploaded photo: a k-means label per patch."""
        data, _ = await read_upload(request, image)
        p = await run_in_threadpool(decoded_upload, svc, svc.engine.parts, data, k)
        return schemas.PartsResponse(k=k, grid=int(p.labels.shape[0]), size=list(p.size), labels=p.labels.tolist())

    @app.get("/photos/{photo_id}/parts", response_model=schemas.PartsResponse)
    def parts_by_id(photo_id: PhotoId, svc: Svc, k: PartsK = 5) -> schemas.PartsResponse:
        """The parts of an indexed photo."""
        p = svc.engine.parts(photo_id, k)
        return schemas.PartsResponse(k=k, grid=int(p.labels.shape[0]), size=list(p.size), labels=p.labels.tolist())

    @app.get("/parts", response_model=list[schemas.CollectionPartOut])
    def collection_parts(svc: Svc, k: Annotated[int, Query(ge=2, le=256)] = 16) -> list[schemas.CollectionPartOut]:
        """Recurring parts of the collection, each with the photos where it covers most patches."""
        return [schemas.CollectionPartOut(part=c.part, patches=c.size, photos=[
            schemas.PartPhotoOut(id=p.photo_id, path=shown(p.path), patches=p.patches, box=list(p.box)) for p in c.photos])
            for c in svc.engine.collection_parts(k)]

    def photo_path(svc: Service, photo_id: int) -> str:
        path = svc.engine.path_of([photo_id]).get(photo_id)
        if path is None:
            raise UnknownPhoto(f"photo id {photo_id} is not in the index")
        return path

    @app.get("/photos/{photo_id}", response_class=Response, responses={404: {}, 410: {}})
    def photo(photo_id: PhotoId, svc: Svc) -> Response:
        """The original file of an indexed photo: only while its bytes are those that were indexed (else 410)."""
        data, media_type, digest = read_indexed(svc.engine.db, photo_id)
        return Response(data, media_type=media_type, headers={"ETag": f'"{digest}"', "X-Content-Type-Options": "nosniff"})

    @app.get("/photos/{photo_id}/thumb", response_class=Response, responses={404: {}, 410: {}})
    def thumb(photo_id: PhotoId, svc: Svc, size: Annotated[int, Query(ge=32, le=1024)] = 256) -> Response:
        """A JPEG thumbnail (EXIF orientation applied) of an indexed photo, made from its checked bytes."""
        data, _, digest = read_indexed(svc.engine.db, photo_id)
        try:
            img, _ = open_photo(data, draft_size=size)
        except DecodeError as e:  # the very bytes that were indexed: only a changed decoder could get here
            raise PhotoGone(f"photo {photo_id} cannot be decoded any more: {e}") from None
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600", "ETag": f'"{digest}-{size}"'})

    @app.delete("/photos/{photo_id}", response_model=schemas.Deleted)
    def delete_photo(photo_id: PhotoId, svc: Svc, _: Writer) -> schemas.Deleted:
        """Remove a photo from the index (not from the disk)."""
        if not svc.delete(photo_id):
            raise UnknownPhoto(f"photo id {photo_id} is not in the index")
        return schemas.Deleted(id=photo_id, deleted=True)

    @app.post("/index/jobs", response_model=schemas.Job, status_code=202)
    def add_folder(req: schemas.JobRequest, svc: Svc, _: Writer) -> schemas.Job:
        """Index (or update) a folder of the server's disk in the background; searches go on meanwhile.
        The folder must be absolute, an existing directory, and below --allowed-root if the server has any."""
        return job_out(svc.submit(check_folder(req.folder, settings.allowed_roots), check_duplicates=req.check_duplicates))

    @app.delete("/index/jobs/{job_id}", response_model=schemas.Job, status_code=202)
    def cancel_job(job_id: Annotated[int, PathParam(ge=1, le=2**62)], svc: Svc, _: Writer) -> schemas.Job:
        """Cancel a queued job, or stop a running one at its next photo ('cancelling', then 'cancelled');
        what it committed stays in the index."""
        return job_out(svc.cancel(job_id))

    def job_out(j) -> schemas.Job:
        return schemas.Job(id=j.id, folder=j.folder, state=j.state, stage=j.stage, done=j.done, total=j.total, indexed=j.indexed,
                           failed=j.failed, error=j.error, duplicates=j.duplicates)

    @app.get("/index/jobs/{job_id}", response_model=schemas.Job)
    def job(job_id: Annotated[int, PathParam(ge=1, le=2**62)], svc: Svc) -> schemas.Job:
        """Progress of an index job."""
        if job_id not in svc.jobs:
            raise UnknownJob(f"no job {job_id}")
        return job_out(svc.jobs[job_id])

    @app.get("/index/jobs", response_model=list[schemas.Job])
    def jobs(svc: Svc) -> list[schemas.Job]:
        """All index jobs of this server process."""
        return [job_out(j) for j in svc.jobs.values()]

    app.include_router(duplicates_router)
    app.include_router(duplicates_write_router, dependencies=[Depends(require_token)])

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
