"""Query side: answers over one committed snapshot of an index directory.

The query photo is decoded and embedded by the indexer's own reader and
embedder with the settings recorded in the manifest, so index and query can
never drift apart.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer import catalog
from indexer.embedder import Embedder, EmbedderConfig
from indexer.errors import DinosearchError, IndexFormatError
from indexer.manifest import MAX_OBJECTS
from indexer.objects import Mask, Segmenter, SegmenterConfig, crop_object
from indexer.reader import DEFAULT_MAX_PIXELS, decode_both, load_query, read_file
from indexer.segments import SegmentedIndex, only_ids  # noqa: F401  (only_ids re-exported: searches restricted to ids)
from indexer.snapshot import Snapshot, live_generation
from search.columns import Columns
from search.query import BadQuery, Example, Filters, SearchQuery, great_circle_km
from search.region import BadRegion, box_to_mask, late_interaction, late_interaction_scores, localize, pixel_mask_to_grid

log = logging.getLogger(__name__)


class UnknownPhoto(DinosearchError):
    """A photo id that is not in the index."""


class UnknownLabel(DinosearchError):
    """A label filter that no photo's tags contain (a typo, or an index without tags)."""


@dataclass(frozen=True)
class Hit:
    """One ranked result."""

    photo_id: int
    path: str
    score: float  # cosine similarity to the query (region: mean over query patches of their best match)
    box: tuple[int, int, int, int] | None = None  # region results: where the match is, in the photo's pixels
    heat: np.ndarray | None = field(default=None, repr=False, compare=False)  # [grid, grid] best match per cell
    object_id: int | None = None  # object results: the matching SAM object (box above is its box)
    mask: dict | None = field(default=None, repr=False, compare=False)  # its mask, COCO RLE at mask["size"]


@dataclass(frozen=True)
class QueryObject:
    """The object a query photo was reduced to: its vector, mask and box (in the query photo's pixels)."""

    vector: np.ndarray
    mask: Mask | None  # None for a stored object of an indexed photo
    box: tuple[int, int, int, int]
    size: tuple[int, int]  # the query photo's (width, height)


@dataclass(frozen=True)
class Parts:
    """k-means parts of one photo: a label per patch."""

    labels: np.ndarray  # int [grid, grid]
    centers: np.ndarray  # [k, D], L2-normalized
    size: tuple[int, int]  # the photo's (width, height)


@dataclass(frozen=True)
class PartPhoto:
    photo_id: int
    path: str
    patches: int  # how many of the photo's patches belong to the part
    box: tuple[int, int, int, int]  # where, in the photo's pixels


@dataclass(frozen=True)
class CollectionPart:
    part: int
    size: int  # patches assigned to it in the sample
    photos: list[PartPhoto]  # where it covers most patches, best first
    center: np.ndarray = field(repr=False, compare=False, default=None)  # [D], L2-normalized: a region query by itself


@dataclass(frozen=True)
class SearchResult:
    """The answer to a SearchQuery: its mode, hits, and the first example's size (and object, for object search)."""

    mode: str  # "global", "region", "objects" (one example) or "feedback" (several, or negatives)
    hits: list[Hit]
    query_size: tuple[int, int]  # (width, height) of the first like example
    query_object: QueryObject | None = None


@dataclass(frozen=True)
class PhotoInfo:
    """One catalog row with its metadata (None where the photo's header did not say)."""

    photo_id: int
    path: str
    width: int | None
    height: int | None
    taken: str | None
    taken_source: str | None
    make: str | None
    model: str | None
    lat: float | None
    lon: float | None
    folder: str | None


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the model recorded in the manifest
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    nprobe: int = 32  # IVF lists visited per query (global and patch index); see scripts/bench_search.py
    store: str | None = None  # external vector store URI; None: the one the manifest names, if any
    resident: bool = False  # global segments read whole into memory on huge pages: a server's choice (each query
    # reads them at random: HNSW 0.28 -> 0.23 ms, a 10k-photo scan 4.0 -> 2.8 ms at 1M photos, scripts/bench_filters.py;
    # loading costs ~3 s per GB once, a commit's unchanged segments are kept). False: mapped from the files, paged in
    # as read (a one-shot CLI search of a large index starts at once).


Query = str | os.PathLike | bytes | int
class Passing:
    """The photos a filter lets through, as the filter made them: a bool mask by photo id (what a global search's
    FAISS bitmap selector reads) or their sorted ids (a narrow date range's, Columns.narrow), the count, and the
    other form made only when a plan needs it."""

    def __init__(self, mask: np.ndarray | None = None, *, ids: np.ndarray | None = None, size: int = 0):
        """Either ``mask`` or ``ids`` (sorted, unique, each < ``size``: the mask's length)."""
        self._mask, self._ids, self.size = mask, ids, len(mask) if mask is not None else size
        self.count = int(np.count_nonzero(mask)) if mask is not None else len(ids)

    def __len__(self) -> int:
        return self.count

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            self._mask = np.zeros(self.size, bool)
            self._mask[self._ids] = True
        return self._mask

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.flatnonzero(self._mask).astype(np.int64)
        return self._ids


Allowed = Passing | np.ndarray | set[int] | None  # photos a search may return: a filter's Passing, sorted unique
# int64 ids (as filter_ids gives them) or any collection of ids; None: every photo


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids sorted ascending, so ties go to the lower id, as a stable sort of all would give them), in
    order, without sorting all: the k-th best score is found by partition, and only those at least as good sorted."""
    if len(ids) > k > 0:
        kth = np.partition(-scores, k - 1)[k - 1]
        keep = np.flatnonzero(-scores <= kth)  # ties with the k-th included, then cut after the sort
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def as_ids(allowed: Allowed) -> np.ndarray | None:
    """An allowed set as sorted unique int64 ids (an array is taken to be so already: filter_ids' are)."""
    if isinstance(allowed, Passing):
        return allowed.ids
    if allowed is None or isinstance(allowed, np.ndarray):
        return None if allowed is None else np.asarray(allowed, np.int64)
    return np.array(sorted({int(i) for i in allowed}), np.int64)


@functools.cache
def _numpy_blas_on_one_thread() -> None:
    """numpy's own BLAS (a pthreads OpenBLAS) to one thread, once per process. A query's numpy products are small
    (late interaction over 32 photos: ~100 MFLOP), and after each one its idle threads spin on the cores that the
    FAISS search of the next query needs for its OpenMP threads: region search at 10k photos took 32 ms with
    numpy's 2 threads, 19 ms with 1 (scripts/bench_search.py). FAISS's own BLAS (built on OpenMP) is left alone."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # scikit-learn's dependency: present wherever the project is installed
        return
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and "numpy" in str(lib.filepath):
            lib.set_num_threads(1)


class Engine:
    """Read-only search over the live snapshot of ``index_dir``; ``refresh()`` picks up new commits."""

    def __init__(self, index_dir: str | os.PathLike, config: EngineConfig = EngineConfig(), *, embedder: Embedder | None = None):
        _numpy_blas_on_one_thread()
        self.root = Path(index_dir).expanduser()
        self.config = config
        self._embedder = embedder
        self._segmenter: Segmenter | None = None
        self._lock = threading.Lock()
        self._columns_lock = threading.Lock()
        self.vectors = None
        self._load(Snapshot.open(self.root))

    def _global_index(self, snap: Snapshot) -> SegmentedIndex:
        """``snap``'s global vectors, taking over the segments this engine holds that are still live."""
        return snap.global_index(resident=self.config.resident, reuse=getattr(self, "global_index", None))

    def _load(self, snap: Snapshot, global_index: SegmentedIndex | None = None) -> None:
        """Switch to ``snap`` (its global vectors as loaded already, or loaded here)."""
        global_index = self._global_index(snap) if global_index is None else global_index
        self._patch_index = None
        self._object_index = None
        self._columns: tuple[sqlite3.Connection, Columns] | None = None  # this commit's filterable fields (and the
        # catalog they were read from), read on the first filter
        old = getattr(self, "snapshot", None)
        self.snapshot = snap
        self.manifest = snap.manifest
        self.db = snap.catalog()
        self.global_index = global_index
        uri = self.config.store or self.manifest.store
        if uri and self.vectors is None:  # Milvus (or another store) answers the vector searches
            from indexer.vectors import open_store

            self.vectors = open_store(uri, self.manifest.dim)
        self.global_index.set_nprobe(self.config.nprobe)
        if self._embedder is not None:
            self.manifest.check(self._embedder)
        if old is not None:
            old.close()  # its read transaction ends: the catalog's WAL can be checkpointed past it

    def refresh(self) -> bool:
        """Switch to a newer committed snapshot if there is one; True if switched."""
        live = live_generation(self.root)
        if live is None or live == self.manifest.gen:
            return False
        snap = Snapshot.open(self.root)
        try:  # read and check the new segments before taking the lock: searches go on meanwhile
            global_index = self._global_index(snap)
            with self._lock:
                if snap.manifest.gen <= self.manifest.gen:  # another thread switched to this commit or a newer one
                    snap.close()
                    return False
                self._load(snap, global_index)
        except BaseException:
            snap.close()
            raise
        return True

    @property
    def embedder(self) -> Embedder:
        """The model that built the index, loaded on first use and checked against the manifest."""
        if self._embedder is None:
            m = self.manifest
            cfg = EmbedderConfig(
                model=self.config.model or m.model, revision=m.revision, resolution=m.resolution,
                device=self.config.device, precision=self.config.precision, index_precision=m.precision,
            )
            e = Embedder(cfg)
            m.check(e)
            self._embedder = e
        return self._embedder

    @property
    def patch_index(self) -> faiss.Index:
        """The patch index, loaded on first use (global-only users never pay for it)."""
        if self._patch_index is None:
            idx = self._lazy(lambda: self.snapshot.patch_index())
            idx.set_nprobe(self.config.nprobe)
            self._patch_index = idx
        return self._patch_index

    def _lazy(self, load):
        """Load a part of the snapshot on first use; if compaction has since removed its segments (this engine's
        commit is two or more behind), switch to the live commit and load it from there."""
        try:
            return load()
        except IndexFormatError:
            if live_generation(self.root) in (None, self.manifest.gen):
                raise
            self._load(Snapshot.open(self.root))  # not refresh(): callers may hold self._lock already
            return load()

    @property
    def columns(self) -> Columns:
        """The catalog's filterable fields as numpy columns, read once per commit (this engine's read transaction
        keeps them true until refresh())."""
        cached = self._columns
        if cached is None or cached[0] is not self.db:
            with self._columns_lock:
                db = self.db
                cached = self._columns
                if cached is None or cached[0] is not db:  # never another commit's, even if refresh() ran meanwhile
                    cached = self._columns = (db, Columns.read(db))
        return cached[1]

    @property
    def object_index(self) -> faiss.Index:
        """SAM objects' vectors, loaded on first use."""
        if self._object_index is None:
            self._object_index = self._lazy(lambda: self.snapshot.object_index())
        return self._object_index

    @property
    def segmenter(self) -> Segmenter:
        """The SAM model (and settings) that made the index's objects, loaded on first use."""
        if self._segmenter is None:
            settings = self.manifest.segmenter
            if not settings:
                raise DinosearchError(f"{self.root} has no objects: index it with `dinosearch index FOLDER --index {self.root} --objects`")
            e = self.embedder
            self._segmenter = Segmenter(SegmenterConfig(**settings), device=e.device, precision=e.precision)
        return self._segmenter

    # -- catalog

    def __len__(self) -> int:
        return int(self.global_index.ntotal)

    def path_of(self, photo_ids: list[int]) -> dict[int, str]:
        if not photo_ids:
            return {}
        return catalog.paths_of(self.db, photo_ids)

    def photos_with_label(self, label: str) -> set[int]:
        """Photos with ``label`` among their class tags (case-insensitive)."""
        return catalog.photos_with_label(self.db, label)

    def labels_of(self, photo_ids: list[int]) -> dict[int, list[tuple[str, float]]]:
        out: dict[int, list[tuple[str, float]]] = {}
        for i, lab, p in catalog.labels_of(self.db, photo_ids):
            out.setdefault(i, []).append((lab, p))
        return out

    def label_counts(self, limit: int = 50) -> list[tuple[str, int]]:
        """Most frequent top-1 tags: (label, photos)."""
        return catalog.label_counts(self.db, limit)

    def _allowed(self, allowed: Allowed, label: str | None) -> Passing | np.ndarray | None:
        """``allowed`` as sorted ids (a Passing as it is), narrowed to the photos tagged ``label`` (UnknownLabel if
        none is)."""
        if label is None:
            return allowed if isinstance(allowed, Passing) else as_ids(allowed)
        ids = as_ids(allowed)
        tagged = self._select(Filters(label=label)).ids
        return tagged if ids is None else np.intersect1d(tagged, ids)

    def _unknown_label(self, label: str) -> None:
        """Raise UnknownLabel for a label no photo carries, naming the tags near it."""
        labels = catalog.label_names(self.db)
        if not labels:
            raise UnknownLabel(f"no photo has class tags, so --label {label!r} matches nothing: "
                               f"tag the index with `dinosearch index FOLDER --index {self.root} --classify`")
        by_lower = {lab.lower(): lab for lab in labels}
        near = [by_lower[m] for m in difflib.get_close_matches(label.lower(), by_lower, n=5, cutoff=0.5)]
        near = near or [lab for lab, _ in self.label_counts(5)]
        raise UnknownLabel(f"no photo is tagged {label!r}; tags near it: {', '.join(near)} (`dinosearch info` lists the common ones)")

    # -- filters and browsing (the catalog's meta table, filled by the indexer from each photo's header)

    def _check_filters(self, f: Filters) -> None:
        """UnknownLabel for a label no photo carries; BadQuery for a metadata filter on a catalog without metadata."""
        cols = self.columns
        if f.label and not len(cols.label_codes(f.label)):
            self._unknown_label(f.label)
        meta = any(v not in (None, "") for v in (f.taken_after, f.taken_before, f.camera, f.near, f.folder))
        if meta and not cols.meta:
            raise BadQuery(f"{self.root} was indexed before photo metadata existed: run `dinosearch index FOLDER "
                           f"--index {self.root}` once (it reads each photo's header, no re-embedding)")

    def _select(self, f: Filters) -> Passing:
        """The indexed photos ``f`` lets through (numpy over this commit's columns): a narrow date range's sorted ids
        (Columns.narrow), else the mask over every photo id."""
        self._check_filters(f)
        cols = self.columns
        ids = cols.narrow(f)
        return Passing(cols.mask(f)) if ids is None else Passing(ids=ids, size=len(cols.indexed))

    def filter_passing(self, f: Filters) -> Passing | None:
        """The indexed photos ``f`` lets through as a Passing (a mask; ids on demand), or None when it filters
        nothing (every photo). Evaluated in numpy over the commit's columns (see search/columns.py), the same rows
        browse's SQL selects."""
        if not f.active:
            return None
        passing = self._select(f)
        return None if passing.count >= len(self) else passing  # every photo passes: no selector to build and check

    def _near(self, rows: list[tuple], f: Filters, lat_at: int, lon_at: int) -> list[tuple]:
        if not f.near or not rows:
            return rows
        lat, lon, km = f.near
        d = great_circle_km(np.array([r[lat_at] for r in rows], float), np.array([r[lon_at] for r in rows], float), lat, lon)
        return [r for r, ok in zip(rows, d <= km) if ok]

    def filter_ids(self, f: Filters) -> np.ndarray | None:
        """filter_passing's photos as sorted int64 ids (None: every photo)."""
        passing = self.filter_passing(f)
        return None if passing is None else passing.ids

    def browse(self, f: Filters = Filters(), *, sort: str = "taken", order: str = "asc", offset: int = 0,
               limit: int = 100) -> tuple[int, list[PhotoInfo]]:
        """A page of the indexed photos ``f`` lets through, without a query: (how many pass, the page).
        ``sort``: taken (photos without a date last, whatever the order), added (indexing order) or path."""
        if sort not in catalog.BROWSE_ORDER:
            raise BadQuery(f"sort must be one of {', '.join(catalog.BROWSE_ORDER)}, got {sort!r}")
        if order not in ("asc", "desc"):
            raise BadQuery(f"order must be asc or desc, got {order!r}")
        if offset < 0 or limit < 0:
            raise BadQuery(f"offset and limit must be >= 0, got {offset}, {limit}")
        self._check_filters(f)
        if f.near:
            rows = self._near(catalog.browse_all(self.db, f, sort, order), f, 8, 9)
            total, rows = len(rows), rows[offset:offset + limit]
        else:
            total, rows = catalog.browse_page(self.db, f, sort, order, offset, limit)
        return total, self._infos(rows)

    def photo_info(self, photo_id: int) -> PhotoInfo | None:
        """One indexed photo's catalog row and metadata (None if no indexed photo has this id)."""
        rows = catalog.photo_info(self.db, photo_id)
        return self._infos(rows)[0] if rows else None

    @staticmethod
    def _infos(rows) -> list[PhotoInfo]:
        return [PhotoInfo(i, os.fsdecode(p), w, h, *rest[:6], os.fsdecode(rest[6]) if rest[6] is not None else None)
                for i, p, w, h, *rest in rows]

    def photo_size(self, photo_ids: list[int]) -> dict[int, tuple[int, int]]:
        if not photo_ids:
            return {}
        return catalog.sizes_of(self.db, photo_ids)

    def photo_patches(self, photo_ids: list[int] | np.ndarray) -> np.ndarray:
        """Stored patch vectors of photos: [n, grid*grid, D] (decoded from the patch index)."""
        g2 = self.manifest.grid**2
        pid = np.asarray(photo_ids, np.int64)
        ids = (pid[:, None] * g2 + np.arange(g2)[None, :]).ravel()
        try:
            if self.vectors is not None:
                xb = self.vectors.get("patches", ids)
            else:
                with self._lock:
                    xb = self.patch_index.reconstruct_batch(ids)
        except (RuntimeError, KeyError):
            raise UnknownPhoto(f"photo ids {sorted(set(pid.tolist()))[:5]} are not all in the index") from None
        return xb.reshape(len(pid), g2, self.manifest.dim)

    def objects_of(self, photo_ids: list[int]) -> dict[int, list[dict]]:
        """Stored SAM objects of photos: {photo id: [{id, box, score, mask}], best first}."""
        if not photo_ids:
            return {}
        out: dict[int, list[dict]] = {}
        for oid, pid, x0, y0, x1, y1, score, mask in catalog.objects_of(self.db, photo_ids):
            out.setdefault(pid, []).append({"id": oid, "box": (round(x0), round(y0), round(x1), round(y1)),
                                            "score": score, "mask": json.loads(mask)})
        return out

    def object_count(self) -> int:
        return catalog.object_count(self.db)

    def photo_vector(self, photo_id: int) -> np.ndarray:
        try:
            return self.global_index.reconstruct(int(photo_id))
        except (RuntimeError, KeyError):
            raise UnknownPhoto(f"photo id {photo_id} is not in the index") from None

    # -- queries

    def embed_query(self, query: Query) -> np.ndarray:
        """CLS vector [D] of a query photo given as path, bytes, or an indexed photo id."""
        if isinstance(query, (int, np.integer)):
            return self.photo_vector(int(query))
        pixels, _ = load_query(query, self.manifest.resolution, self.config.max_pixels)
        return self.embedder.embed(pixels[None]).cls[0]

    def query_patches(self, query: Query) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch grid [grid, grid, D] of a query photo (path, bytes or indexed id) and its (width, height)."""
        g = self.manifest.grid
        if isinstance(query, (int, np.integer)):
            size = self.photo_size([int(query)]).get(int(query))
            if size is None:
                raise UnknownPhoto(f"photo id {query} is not in the index")
            return self.photo_patches([int(query)])[0].reshape(g, g, -1), size
        pixels, size = load_query(query, self.manifest.resolution, self.config.max_pixels)
        return self.embedder.embed(pixels[None]).patches[0], size

    def query_object(self, query: Query, *, point: tuple[float, float] | None = None,
                     box: tuple[float, float, float, float] | None = None) -> QueryObject:
        """Reduce a query photo to one object: SAM's mask at ``point`` or for ``box`` (the query photo's
        pixels), else its main object; cropped with the background neutralised and embedded.
        An indexed photo id without a prompt gives its best stored object."""
        if point is not None and box is not None:
            raise BadRegion("give a point or a box, not both")
        if isinstance(query, (int, np.integer)):
            if point is None and box is None:
                objs = self.objects_of([int(query)]).get(int(query))
                if not objs:
                    if int(query) not in self.photo_size([int(query)]):
                        raise UnknownPhoto(f"photo id {query} is not in the index")
                    raise BadRegion(f"photo {query} has no stored objects; give a point or a box")
                best = max(objs, key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) * o["score"])
                with self._lock:
                    v = self.object_index.reconstruct(int(best["id"]))
                return QueryObject(v, None, best["box"], self.photo_size([int(query)])[int(query)])
            path = self.path_of([int(query)]).get(int(query))
            if path is None:
                raise UnknownPhoto(f"photo id {query} is not in the index")
            query = path
        seg = self.segmenter
        data = query if isinstance(query, bytes) else read_file(Path(query))
        _, large, (w, h) = decode_both(data, self.manifest.resolution, seg.side, self.config.max_pixels)
        sx, sy = large.shape[1] / w, large.shape[0] / h  # query photo pixels -> the decode SAM sees
        if point is not None:
            x, y = point
            if not (0 <= x < w and 0 <= y < h):
                raise BadRegion(f"point {x:g},{y:g} is outside the {w}x{h} photo")
            m = seg.from_point(large, min(x * sx, large.shape[1] - 1), min(y * sy, large.shape[0] - 1))
        elif box is not None:
            x0, y0, x1, y1 = box
            if not (x1 > x0 and y1 > y0):
                raise BadRegion(f"box {box} is empty: expected x0,y0,x1,y1 with x1 > x0 and y1 > y0")
            m = seg.from_box(large, (x0 * sx, y0 * sy, x1 * sx, y1 * sy))
        else:
            m = seg.main_object(large)
        if m is None:
            raise BadRegion("SAM found no object there; click inside an object or draw a tighter box")
        crop = crop_object(large, m.mask, self.manifest.resolution)
        v = self.embedder.embed(crop[None]).cls[0]
        bx = m.box
        return QueryObject(v, m, (int(bx[0] / sx), int(bx[1] / sy), int(np.ceil(bx[2] / sx)), int(np.ceil(bx[3] / sy))), (w, h))

    def objects(self, query: Query, k: int = 10, *, point: tuple[float, float] | None = None,
                box: tuple[float, float, float, float] | None = None, allowed: Allowed = None,
                label: str | None = None) -> list[Hit]:
        """Photos holding an object like the query's (see query_object), one hit per photo with its best object."""
        qo = self.query_object(query, point=point, box=box)
        return self.objects_by_vector(qo.vector, k, allowed=self._allowed(allowed, label))

    def objects_by_vector(self, v: np.ndarray, k: int = 10, *, allowed: Allowed = None) -> list[Hit]:
        """Object search for one vector [D]: each photo once, with its best-matching object's box and mask."""
        index = self.object_index
        n = int(index.ntotal)
        allowed = as_ids(allowed)
        if k <= 0 or n == 0 or (allowed is not None and not len(allowed)):
            return []
        xq = np.ascontiguousarray(np.asarray(v, np.float32)[None])
        only = None
        if allowed is not None:
            lo = allowed * MAX_OBJECTS
            only = (lo[:, None] + np.arange(MAX_OBJECTS)).ravel()
        kk = min(n, max(8 * k, 64))
        while True:  # widen until k distinct photos are found (a photo may hold many similar objects)
            if self.vectors is not None:
                D, I = self.vectors.search("objects", xq, kk, photos=allowed)
            else:
                with self._lock:
                    D, I = index.search(xq, kk, ids=only)
            ok = I[0] >= 0
            ids, scores = I[0][ok], D[0][ok]
            best: dict[int, tuple[float, int]] = {}
            for i, s in zip(ids.tolist(), scores.tolist()):
                best.setdefault(i // MAX_OBJECTS, (s, i))
            if len(best) >= k or kk >= n:
                break
            kk = min(n, kk * 4)
        top = sorted(best.items(), key=lambda t: (-t[1][0], t[0]))[:k]
        pids = [p for p, _ in top]
        paths, objs = self.path_of(pids), self.objects_of(pids)
        hits = []
        for p, (s, oid) in top:
            o = next((o for o in objs.get(p, []) if o["id"] == oid), None)
            hits.append(Hit(p, paths.get(p, "?"), float(s), o["box"] if o else None, object_id=oid, mask=o["mask"] if o else None))
        return hits

    def region(
        self, query: Query, k: int = 10, *, box: tuple[float, float, float, float] | None = None,
        mask: np.ndarray | None = None, allowed: Allowed = None, candidates: int | None = None,
        patch_k: int = 64, label: str | None = None,
    ) -> list[Hit]:
        """Photos that contain a region of the query photo, each with where it matched.

        The region is ``box`` (x0, y0, x1, y1 in the query photo's pixels), or ``mask``
        (bool [grid, grid] over its patch grid, or an image mask the photo's size), or the
        whole photo. Every query patch searches the patch index; photos found are
        re-ranked by exact late interaction over all their stored patches.
        """
        grid = self.manifest.grid
        patches, size = self.query_patches(query)
        if box is not None and mask is not None:
            raise BadRegion("give a box or a mask, not both")
        if box is not None:
            qmask = box_to_mask(box, size, grid)
        elif mask is not None:
            m = np.asarray(mask)
            qmask = m.astype(bool) if m.shape == (grid, grid) else pixel_mask_to_grid(m, grid)
        else:
            qmask = np.ones((grid, grid), bool)
        xq = np.ascontiguousarray(patches[qmask], dtype=np.float32)
        return self.region_by_vectors(xq, k, qcells=np.flatnonzero(qmask), allowed=self._allowed(allowed, label),
                                      candidates=candidates, patch_k=patch_k)

    def region_by_vectors(
        self, xq: np.ndarray, k: int = 10, *, qcells: np.ndarray | None = None, allowed: Allowed = None,
        candidates: int | None = None, patch_k: int = 64,
    ) -> list[Hit]:
        """Region search for query patch vectors xq [m, D] (L2-normalized); ``qcells`` their cells in the query grid."""
        grid = self.manifest.grid
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        assert xq.ndim == 2 and xq.shape[1] == self.manifest.dim, f"expected [m, {self.manifest.dim}] query patches, got {xq.shape}"
        n = len(self)
        if k <= 0 or n == 0:
            return []
        n_cand = min(n, candidates or max(3 * k, 32))
        allowed = as_ids(allowed)
        if allowed is not None and len(allowed) <= n_cand:
            cand = allowed  # few enough to score them all exactly
        elif n_cand >= n:
            cand = np.array(catalog.indexed_ids(self.db), np.int64)
        else:
            if self.vectors is not None:
                D, I = self.vectors.search("patches", xq, patch_k, photos=allowed)
            else:
                only = None
                if allowed is not None:  # inside the search: every patch found belongs to a photo the filter passes
                    g2 = grid * grid
                    only = (allowed[:, None] * g2 + np.arange(g2)).ravel()
                with self._lock:
                    D, I = self.patch_index.search(xq, min(patch_k, self.patch_index.ntotal), ids=only)
            valid = (I >= 0).ravel()
            qrow = np.repeat(np.arange(len(xq)), I.shape[1])[valid]
            photo, d = (I.ravel() // (grid * grid))[valid], D.ravel()[valid]
            if allowed is not None:
                ok = np.isin(photo, allowed)
                qrow, photo, d = qrow[ok], photo[ok], d[ok]
            order = np.argsort(-d, kind="stable")  # keep, per (query patch, photo), the best match
            qrow, photo, d = qrow[order], photo[order], d[order]
            _, first = np.unique(qrow * (int(photo.max(initial=0)) + 1) + photo, return_index=True)
            uphoto, inv = np.unique(photo[first], return_inverse=True)
            approx = np.bincount(inv, weights=d[first])  # sum over query patches of their best match
            cand = uphoto[np.lexsort((uphoto, -approx))][:n_cand].astype(np.int64)
            if allowed is not None and len(cand) < min(k, len(allowed)):  # the probe missed photos the filter passes:
                rest = np.setdiff1d(allowed, cand)  # scored exactly too (sorted), up to the candidate count
                cand = np.concatenate([cand, rest[: n_cand - len(cand)]])
        if len(cand) == 0:
            return []
        score, sim = late_interaction_scores(xq, self.photo_patches(cand))
        top = np.lexsort((cand, -score))[:k]  # best first, ties by id
        ids = [int(cand[j]) for j in top]
        paths, sizes = self.path_of(ids), self.photo_size(ids)
        hits = []
        for j, p in zip(top, ids):
            box_p, heat = localize(sim[j], grid, sizes.get(p, (self.manifest.resolution,) * 2), qcells)
            hits.append(Hit(p, paths.get(p, "?"), min(float(score[j]), 1.0), box_p, heat))  # ranked unclipped, reported as a cosine
        return hits

    def parts(self, query: Query, k: int = 5, *, seed: int = 0) -> Parts:
        """k-means over one photo's patch features: a part label per patch."""
        from sklearn.cluster import KMeans

        patches, size = self.query_patches(query)
        g, d = patches.shape[0], patches.shape[-1]
        x = patches.reshape(-1, d).astype(np.float32)
        k = max(1, min(k, len(x)))
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
        centers = km.cluster_centers_.astype(np.float32)
        faiss.normalize_L2(centers)
        return Parts(km.labels_.reshape(g, g).astype(np.int32), centers, size)

    def collection_parts(self, k: int = 64, *, sample: int = 200_000, per_part: int = 5, seed: int = 0) -> list[CollectionPart]:
        """Recurring parts of the collection: mini-batch k-means over a sample of stored patches."""
        from sklearn.cluster import MiniBatchKMeans

        g2 = self.manifest.grid**2
        with self._lock:
            ids = self.patch_index.ids()
        if len(ids) == 0:
            return []
        rng = np.random.default_rng(seed)
        if len(ids) > sample:
            ids = np.sort(rng.choice(ids, sample, replace=False))
        with self._lock:
            x = self.patch_index.reconstruct_batch(ids)
        k = max(1, min(k, len(x)))
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3).fit(x)
        labels = km.labels_
        centers = km.cluster_centers_.astype(np.float32)
        faiss.normalize_L2(centers)
        photos, cells = ids // g2, ids % g2
        uniq, pidx = np.unique(photos, return_inverse=True)
        counts = np.zeros((k, len(uniq)), np.int64)
        np.add.at(counts, (labels, pidx), 1)
        top = np.argsort(-counts, axis=1, kind="stable")[:, :per_part]
        want = sorted({int(uniq[j]) for j in top.ravel()})
        paths, sizes = self.path_of(want), self.photo_size(want)
        grid = self.manifest.grid
        out = []
        for part in range(k):
            members = []
            for j in top[part]:
                if counts[part, j] == 0:
                    break
                p = int(uniq[j])
                sel = cells[(pidx == j) & (labels == part)]
                rows, cols = sel // grid, sel % grid
                w, h = sizes.get(p, (self.manifest.resolution,) * 2)
                box = (int(cols.min() * w / grid), int(rows.min() * h / grid),
                       int(np.ceil((cols.max() + 1) * w / grid)), int(np.ceil((rows.max() + 1) * h / grid)))
                members.append(PartPhoto(p, paths.get(p, "?"), int(counts[part, j]), box))
            out.append(CollectionPart(part, int((labels == part).sum()), members, centers[part]))
        out.sort(key=lambda c: -c.size)
        return out

    def similar(self, query: Query, k: int = 10, *, allowed: Allowed = None, label: str | None = None) -> list[Hit]:
        """Photos most like the query (cosine on CLS), best first; ``allowed`` / ``label`` restrict the candidates."""
        return self.similar_by_vector(self.embed_query(query), k, allowed=allowed, label=label)

    def similar_by_vector(self, v: np.ndarray, k: int = 10, *, allowed: Allowed = None,
                          label: str | None = None) -> list[Hit]:
        """Global search for one CLS vector [D]."""
        xq = np.ascontiguousarray(np.asarray(v, np.float32)[None])
        n = len(self)
        if k <= 0 or n == 0:
            return []
        if self.vectors is not None:  # exact search in the store, the tag filtered next to the vectors
            D, I = self.vectors.search("global", xq, k, photos=as_ids(allowed), tag=label)
            ok = I[0] >= 0
            ids, scores = I[0][ok], D[0][ok]
            paths = self.path_of(ids.tolist())
            return [Hit(int(i), paths.get(int(i), "?"), float(s)) for i, s in zip(ids, scores)]
        allowed = self._allowed(allowed, label)
        if allowed is not None and not len(allowed):
            return []
        plan = self.global_plan(allowed)
        exact = plan == "flat" or self.global_index.float_scores  # no candidate to re-score on stored vectors
        kk = min(n, k if exact else max(4 * k, 64))
        if plan == "scan":
            ids, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        else:
            mask = allowed.mask if isinstance(allowed, Passing) else None
            only = None if allowed is None or mask is not None else allowed
            with self._lock:
                D, I = self.global_index.search(xq, kk, ids=only, mask=mask,
                                                share=None if allowed is None else len(allowed) / n)
            ids = I[0][I[0] >= 0]
            scores = D[0][: len(ids)]
        if allowed is not None and len(ids) < min(k, len(allowed)):  # a scan, or a probe missed photos that pass:
            ids = as_ids(allowed)  # score every one of them exactly, so k that exist are returned
            try:
                with self._lock:
                    scores = self.global_index.inner_products(ids, xq[0])
            except (RuntimeError, KeyError):
                raise UnknownPhoto(f"photo ids {ids[:5].tolist()} are not all in the index") from None
            ids, scores = top_k(ids, scores, k)
        elif not exact and len(ids):  # re-rank the candidates on their stored vectors
            scores = self.global_index.inner_products(ids, xq[0])
            order = np.argsort(-scores, kind="stable")
            ids, scores = ids[order], scores[order]
        ids, scores = ids[:k], scores[:k]
        paths = self.path_of(ids.tolist())
        return [Hit(int(i), paths.get(int(i), "?"), float(s)) for i, s in zip(ids, scores)]

    SCAN_MAX = 4096  # a filter passing at most this many photos has them scored exactly, whatever the index (see
    # global_plan)

    def global_plan(self, allowed: Allowed) -> str:
        """How a global search runs: "flat" (exact segments; a filter is a FAISS ID selector inside them), "ivf" or
        "hnsw" (an approximate index; a filter is an ID selector inside the probe or the graph walk, and the photos
        that pass are scored exactly if it finds fewer than k), or "scan": a filter that passes no more photos than
        the search would cost anyway (SegmentedIndex.probe_reads: an IVF's probed lists, an HNSW walk's equivalent,
        an exact segment's selector test of every id; at least SCAN_MAX). Those photos are scored exactly, which is
        exact and no slower, where a probe would meet only the few of them that lie in its lists, a graph walk
        would pass through mostly photos the filter rejects, and a flat search would test every id."""
        if self.vectors is not None:
            return "flat"
        plan = "flat" if self.global_index.exact else "hnsw" if self.global_index.hnsw else "ivf"
        if allowed is None:
            return plan
        return "scan" if len(allowed) <= self.scan_limit() else plan

    def scan_limit(self) -> float:
        """The most photos a filter may pass for the scan plan (see global_plan)."""
        return max(self.SCAN_MAX, self.global_index.probe_reads())

    # -- one query model: plan and answer a SearchQuery

    def search(self, q: SearchQuery) -> SearchResult:
        """Answer a typed query (see search.query): filters first, as the set of photos the vector searches may
        return (a FAISS ID selector, so a filter never leaves fewer than k hits when k photos pass); then one example
        alone is the search of its mode, and several, or any negative, is relevance feedback:

            pos(x) = max over like examples e of sim(e, x)     neg(x) = max over unlike examples e of sim(e, x)
            score(x) = pos(x)                   if pos(x) > neg(x)  (x is nearer to a wanted example)
                       pos(x) - neg(x) - 2      otherwise           (nearer to an unwanted one: after all others)

        sim is the cosine of CLS vectors for a whole-photo example, late interaction (region search's score)
        for a region example, and for an object example the cosine of the photo's best stored object (-1 for a
        photo without objects): all on the cosine scale, so the kinds mix. Each hit says where it matched as the
        like example it is nearest to sees it: a region's box and heat map, an object's box and mask.

        A negative draws a boundary (the nearest example decides,
        as a 1-nearest-neighbour classifier of the user's labels) instead of being subtracted with a weight: a
        weighted penalty also sinks a wanted example's own copies whenever a negative looks like it, while the
        boundary keeps each positive's copies at the top (sim 1) and sends each negative's copies below every
        photo on the wanted side. Candidates are the union of each like example's own nearest photos (max(4k, 64)
        each, inside the filter: an object example's are the photos of its nearest objects), scored exactly.
        """
        allowed = self.filter_passing(q.filters)
        first = q.like[0]
        if len(q.like) == 1 and not q.unlike:
            return self._search_one(first, q.k, allowed)
        pos = [self._scorer(e) for e in q.like]
        neg = [self._scorer(e) for e in q.unlike]
        qo = pos[0].query_object
        n = len(self)
        if n == 0 or (allowed is not None and not len(allowed)):
            return SearchResult("feedback", [], self.example_size(first), qo)
        kk = min(n, max(4 * q.k, 64))
        cand = np.unique(np.concatenate([sc.candidates(kk, allowed) for sc in pos]))
        if len(cand) == 0:
            return SearchResult("feedback", [], self.example_size(first), qo)
        ps = np.array([sc.score(cand) for sc in pos])  # [like examples, candidates]
        p = ps.max(0)
        score = p
        if neg:
            m = np.max([sc.score(cand) for sc in neg], axis=0)
            score = np.where(p > m, p, p - m - 2)
        order = np.lexsort((cand, -score))[: q.k]
        ids = cand[order].tolist()
        paths = self.path_of(ids)
        best = ps[:, order].argmax(0)  # the like example each hit is nearest to says where it matched
        hits = [pos[b].hit(int(i), paths.get(int(i), "?"), min(float(score[j]), 1.0))  # ranked unclipped, reported as a cosine
                for i, j, b in zip(ids, order, best)]
        return SearchResult("feedback", hits, self.example_size(first), qo)

    def example_size(self, e: Example) -> tuple[int, int]:
        """(width, height) of an example photo: the catalog's for an id, else read from its header."""
        if e.size is not None:
            return e.size
        if isinstance(e.source, (int, np.integer)):
            size = self.photo_size([int(e.source)]).get(int(e.source))
            if size is None:
                raise UnknownPhoto(f"photo id {e.source} is not in the index")
            return size
        from indexer.reader import open_photo

        data = e.source if isinstance(e.source, bytes) else read_file(Path(e.source))
        return open_photo(data, draft_size=64, max_pixels=self.config.max_pixels)[1]

    def _region_mask(self, e: Example) -> tuple[np.ndarray | None, tuple[int, int] | None]:
        """The example's region as a mask (a part is computed here), and the photo's size if it was learnt."""
        if e.part is not None:
            parts = self.parts(e.source, e.parts_k)
            return parts.labels == e.part, parts.size
        return e.mask, None

    def _search_one(self, e: Example, k: int, allowed: Passing | None) -> SearchResult:
        if e.mode == "objects":
            qo = self.query_object(e.source, point=e.point, box=e.box)
            return SearchResult("objects", self.objects_by_vector(qo.vector, k, allowed=allowed), qo.size, qo)
        if e.mode == "region":
            mask, size = self._region_mask(e)
            hits = self.region(e.source, k, box=e.box, mask=mask, allowed=allowed)
            return SearchResult("region", hits, size or self.example_size(e))
        return SearchResult("global", self.similar(e.source, k, allowed=allowed), self.example_size(e))

    def _scorer(self, e: Example) -> _Scorer:
        if e.mode == "objects":
            qo = self.query_object(e.source, point=e.point, box=e.box)
            return _Scorer(self, qo.vector, None, objects=True, query_object=qo)
        if e.mode == "global":
            return _Scorer(self, self.embed_query(e.source), None)
        mask, _ = self._region_mask(e)
        patches, size = self.query_patches(e.source)
        grid = self.manifest.grid
        if e.box is not None:
            qmask = box_to_mask(e.box, size, grid)
        else:
            m = np.asarray(mask)
            qmask = m.astype(bool) if m.shape == (grid, grid) else pixel_mask_to_grid(m, grid)
        return _Scorer(self, None, np.ascontiguousarray(patches[qmask], dtype=np.float32), qcells=np.flatnonzero(qmask))

    def best_objects(self, v: np.ndarray, photo_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each photo, the cosine of its stored object most like ``v`` [D] and that object's id
        (-1 and -1 for a photo without objects)."""
        pid = np.asarray(photo_ids, np.int64)
        rows = np.array(catalog.object_photos(self.db, pid.tolist())
                        if len(pid) else [], np.int64).reshape(-1, 2)
        score, best = np.full(len(pid), -1.0, np.float32), np.full(len(pid), -1, np.int64)
        if len(rows) == 0:
            return score, best
        if self.vectors is not None:
            x = self.vectors.get("objects", rows[:, 0])
        else:
            with self._lock:
                x = self.object_index.reconstruct_batch(rows[:, 0])
        s = x @ np.asarray(v, np.float32)
        sorter = np.argsort(pid)
        slot = sorter[np.searchsorted(pid, rows[:, 1], sorter=sorter)]  # each object's photo, as a position in photo_ids
        order = np.lexsort((-s, slot))  # per photo, its best object first
        first = order[np.r_[True, slot[order][1:] != slot[order][:-1]]]
        score[slot[first]], best[slot[first]] = s[first], rows[first, 0]
        return score, best

    def global_vectors(self, photo_ids: np.ndarray) -> np.ndarray:
        """Stored CLS vectors [n, D] of indexed photos."""
        ids = np.asarray(photo_ids, np.int64)
        try:
            if self.vectors is not None:
                return self.vectors.get("global", ids)
            with self._lock:
                return self.global_index.reconstruct_batch(ids) if len(ids) else np.zeros(  # one C++ loop: the scan
                    (0, self.manifest.dim), np.float32)  # plan reads up to SCAN_MAX vectors per query
        except (RuntimeError, KeyError):
            raise UnknownPhoto(f"photo ids {sorted(set(ids.tolist()))[:5]} are not all in the index") from None


@dataclass
class _Scorer:
    """One feedback example: its nearest photos, its similarity to any photo, and where it matched in one.

    A whole photo scores by CLS cosine, a region by late interaction, an object by its cosine to the photo's best
    stored object (a photo without objects scores -1 against it): all on the cosine scale, so they mix."""

    engine: Engine
    vector: np.ndarray | None  # [D] whole-photo or object example
    patches: np.ndarray | None  # [m, D] region example
    qcells: np.ndarray | None = None  # the region's cells in its photo's grid
    objects: bool = False  # ``vector`` is an object's: compared with the photos' stored objects
    query_object: QueryObject | None = None

    def candidates(self, k: int, allowed: Allowed) -> np.ndarray:
        e = self.engine
        if self.objects:
            hits = e.objects_by_vector(self.vector, k, allowed=allowed)
        elif self.vector is not None:
            hits = e.similar_by_vector(self.vector, k, allowed=allowed)
        else:
            hits = e.region_by_vectors(self.patches, k, allowed=allowed)
        return np.array([h.photo_id for h in hits], np.int64)

    def score(self, ids: np.ndarray) -> np.ndarray:
        e = self.engine
        if self.objects:
            return e.best_objects(self.vector, ids)[0]
        if self.vector is not None:
            return e.global_vectors(ids) @ np.asarray(self.vector, np.float32)
        xp = e.photo_patches(ids)
        return late_interaction_scores(self.patches, xp)[0].astype(np.float32)

    def hit(self, photo_id: int, path: str, score: float) -> Hit:
        """A result this example ranked, with where it matched: the region's box and heat, or the best object."""
        e = self.engine
        if self.objects:
            _, (oid,) = e.best_objects(self.vector, np.array([photo_id]))
            o = next((o for o in e.objects_of([photo_id]).get(photo_id, []) if o["id"] == oid), None)
            if o is None:
                return Hit(photo_id, path, score)
            return Hit(photo_id, path, score, o["box"], object_id=int(oid), mask=o["mask"])
        if self.patches is None:
            return Hit(photo_id, path, score)
        _, sim = late_interaction(self.patches, e.photo_patches([photo_id])[0])
        size = e.photo_size([photo_id]).get(photo_id, (e.manifest.resolution,) * 2)
        box, heat = localize(sim, e.manifest.grid, size, self.qcells)
        return Hit(photo_id, path, score, box, heat)
