"""HTTP routes of duplicate groups: GET /duplicates (paged, filtered), GET /photos/{id}/duplicates, and
POST /duplicates/move (write_router: the app adds its token check)."""

from __future__ import annotations

import os
import threading
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam

from api import schemas
from search.duplicates import (
    BadDuplicateQuery,
    DuplicateConfig,
    Group,
    cells_to_box,
    duplicates_of,
    find_duplicates,
    load_photos,
    move_copies,
)

router = APIRouter(tags=["duplicates"])
write_router = APIRouter(tags=["duplicates"])
_lock = threading.Lock()

Kind = Annotated[str | None, Query(pattern="^(exact|edited|similar)$", description="only groups (links) of this kind")]
Threshold = Annotated[float, Query(ge=0.0, le=1.0, description="verified score a pair needs to be linked (default 0.3)")]


def _name(path: str) -> str:
    from api.app import shown  # one rule for every route: file names only, never the folders

    return shown(path)


def _groups(request: Request, cfg: DuplicateConfig) -> list[Group]:
    """All groups of the live snapshot for these settings, computed once per snapshot (a pass over the collection)."""
    engine = request.app.state.service.engine
    key = (str(engine.root), engine.snapshot.name, cfg)
    cache = request.app.state.__dict__.setdefault("duplicates_cache", {})
    with _lock:
        if key not in cache:
            cache.clear()  # only the live snapshot's groups are kept
            cache[key] = find_duplicates(engine, cfg)
        return cache[key]


@router.get("/duplicates", response_model=schemas.DuplicatesPage)
def duplicates(request: Request, kind: Kind = None, threshold: Threshold = 0.3,
               offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> schemas.DuplicatesPage:
    """Groups of exact copies, edited copies and similar shots, each with the photo to keep; paged."""
    groups = _groups(request, DuplicateConfig(kind=kind, threshold=threshold))
    page = []
    for g in groups[offset:offset + limit]:
        d = g.to_dict()
        for p in d["photos"]:
            p["path"] = _name(p["path"])
        page.append(schemas.DuplicateGroup(**d))
    return schemas.DuplicatesPage(total=len(groups), offset=offset, limit=limit, groups=page)


@router.get("/photos/{photo_id}/duplicates", response_model=schemas.PhotoDuplicates)
def photo_duplicates(request: Request, photo_id: Annotated[int, PathParam(ge=1, le=2**62)], kind: Kind = None,
                     threshold: Threshold = 0.3) -> schemas.PhotoDuplicates:
    """The photos that duplicate one indexed photo (verified links only, best first), without a pass over the collection."""
    engine = request.app.state.service.engine
    links = duplicates_of(engine, photo_id, DuplicateConfig(kind=kind, threshold=threshold))
    others = [lk.b if lk.a == photo_id else lk.a for lk in links]
    photos = load_photos(engine.db, others)
    out = []
    for lk, o in zip(links, others):
        p = photos.get(o)
        if p is None:
            continue
        box = None
        if lk.match is not None:
            box = list(cells_to_box(lk.match.cells_b if lk.a == photo_id else lk.match.cells_a, (p.width, p.height),
                                    engine.manifest.grid))
        elif lk.kind == "exact":
            box = [0, 0, p.width, p.height]
        out.append(schemas.PhotoDuplicate(id=o, path=_name(p.path), width=p.width, height=p.height, bytes=p.bytes,
                                          kind=lk.kind, score=round(lk.score, 4),
                                          transform=lk.match.transform if lk.match else None, box=box))
    return schemas.PhotoDuplicates(id=photo_id, duplicates=out)


def reviewed(groups: list[Group], asked: list[schemas.MoveGroup]) -> list[Group]:
    """The groups as a person reviewed them: each asked group must lie inside one found group (a changed index is
    a clear error, never a move of something not shown), keeping the chosen photo and only the listed members."""
    out = []
    for n, a in enumerate(asked, 1):
        ids = set(a.photos)
        if a.keep not in ids:
            raise BadDuplicateQuery(f"group {n}: keep {a.keep} is not one of its photos")
        found = next((g for g in groups if ids <= {m.photo.id for m in g.members}), None)
        if found is None:
            raise BadDuplicateQuery(f"group {n}: photos {sorted(ids)} are not one group of the index now; reload the groups")
        members = [m for m in found.members if m.photo.id in ids]
        if not next(m for m in members if m.photo.id == a.keep).photo.present:
            raise BadDuplicateQuery(f"group {n}: the photo to keep ({a.keep}) is gone or changed since indexing")
        out.append(Group(found.kind, a.keep, ["chosen"], members))
    return out


@write_router.post("/duplicates/move", response_model=schemas.MoveResponse)
def move(request: Request, req: schemas.MoveRequest) -> schemas.MoveResponse:
    """Move every photo but the kept one of each reviewed group into FOLDER/group-NNNN/ (a dry run unless apply):
    never over a file, a manifest for undo; the index is not changed (index the folders again afterwards)."""
    from api.service import check_folder

    settings = request.app.state.service.settings
    dest = check_folder(req.folder, settings.allowed_roots)
    rep = move_copies(reviewed(_groups(request, DuplicateConfig()), req.groups), dest, apply=req.apply)
    return schemas.MoveResponse(
        applied=req.apply, manifest=_name(rep.manifest) if rep.manifest else None,
        moved=[schemas.MoveOut(source=_name(a), to=os.path.relpath(b, dest)) for a, b in rep.moved],
        errors=[schemas.MoveError(path=_name(a), reason=r) for a, r in rep.errors])
