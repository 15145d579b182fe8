"""Read side of the segmented store: one kind of vectors (global, patches or objects) over several immutable
segment files, searched one segment at a time and merged.

A vector is live when the catalog says its photo's vectors are in that segment (table ``vec`` for global and
patch vectors, ``objvec`` for objects); every other vector in a segment is a tombstone, masked at search time
by a FAISS ID selector (IDSelectorNot over the dead ids). Nothing is ever deleted from a segment file.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from indexer.hugepages import on_huge_pages

HNSW_EF_SEARCH = 64  # candidates an HNSW segment's search keeps: recall@10 0.996 at 1M in 0.40 ms (scripts/bench_search.py)
HNSW_EF_MAX = 256  # the most a filtered search raises it to (see SegmentedIndex.search): at 1M with 5% passing,
# 256 kept recall@10 0.967 in 1.7 ms, 1024 0.988 in 5.7 ms (scripts/bench_filters.py)
HNSW_SCAN_EQUIVALENT = 16_384  # photos scored exactly in the time of one filtered HNSW search (scripts/bench_filters.py)
FLAT_SCAN_SHARE = 32  # a filtered search of an exact segment of n vectors takes as long as scoring n/32 photos
# exactly (it tests every id against the selector; at 1M: ~4 ms with 0.1% passing, scripts/bench_filters.py)
BITMAP_SHARE = 64  # a restriction to ids of one vector per photo (global) naming at least 1/64 of the id range is
# a bitmap over the range (a few numpy passes) rather than a hash set of the ids (built per id, per query)


def only_ids(index: faiss.Index, ids: np.ndarray | None = None, *, exclude: np.ndarray | None = None,
             nprobe: int | None = None, bitmap: np.ndarray | None = None, ef: int | None = None) -> faiss.SearchParameters | None:
    """Search parameters that restrict ``index`` to ``ids`` (or to the ids set in ``bitmap``: bit i of byte i >> 3
    for id i, least significant first, as np.packbits(..., bitorder="little") makes it) and/or keep ``exclude`` out
    (an IVF index takes its own parameter type, which must carry its nprobe: SearchParametersIVF's default of 1
    would replace the index's; an HNSW one takes ``ef``, its efSearch for this search)."""
    sel = None
    if bitmap is not None:
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        sel.keep_bitmap = bitmap  # FAISS reads the array in place
    elif ids is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64))
    elif exclude is not None and len(exclude):
        inner = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, np.int64))
        sel = faiss.IDSelectorNot(inner)
        sel.keep_inner = inner
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(index, faiss.IndexIVF):
        if sel is None and nprobe is None:
            return None
        params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe or ivf.nprobe))
        if sel is not None:
            params.sel = sel
    elif _hnsw(index) is not None and ef is not None:
        params = faiss.SearchParametersHNSW(efSearch=ef)  # IndexIDMap2 hands it on, its selector translated
        if sel is not None:
            params.sel = sel
    elif sel is None:
        return None
    else:
        params = faiss.SearchParameters(sel=sel)
    params.keep_alive = sel  # the SWIG object must outlive the search
    return params


@dataclass
class Part:
    """One segment's file of one kind: its index, all the ids it holds and which of them are dead."""

    seg: int
    index: faiss.Index
    ids: np.ndarray  # every vector id in the file, sorted
    dead: np.ndarray  # ids whose photo's live vectors are elsewhere (or gone), sorted
    record: dict | None = None  # the file's size and checksum as its commit recorded them
    resident: bool = False  # read whole into memory (else its flat codes are a file mapping)
    huge: str | None = None  # what the kernel said to huge pages for its vectors and graph (hugepages.on_huge_pages)
    _rows: tuple[np.ndarray, np.ndarray] | None | bool = False  # (float32 storage, row of each id), None: coded

    def rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """For float32 storage (Flat, HNSW over Flat): the index's own vectors [n, d] as a numpy view (no copy)
        and the row of each id (an array by id, -1 where absent), made on first use; None for coded storage
        (SQ, PQ) and IVF lists, which FAISS decodes. A gather in numpy reads a scan plan's thousands of
        vectors ~10x faster than IndexIDMap2.reconstruct_batch's one virtual call and hash lookup per id."""
        if self._rows is False:
            self._rows = None
            inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap2) else None
            if isinstance(inner, faiss.IndexHNSW):
                inner = faiss.downcast_index(inner.storage)
            if isinstance(inner, faiss.IndexFlat) and inner.ntotal:
                xb = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)
                id_map = faiss.vector_to_array(self.index.id_map)
                row_of = np.full(int(id_map.max()) + 1, -1, np.int64)
                row_of[id_map] = np.arange(len(id_map))
                self._rows = (xb, row_of)
        return self._rows

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The storage rows of ``ids`` (int64, non-negative) in a float part (see rows()); KeyError for an id this
        file does not hold."""
        row_of = self.rows()[1]
        row = row_of[np.minimum(ids, len(row_of) - 1)]
        if (row < 0).any() or (ids >= len(row_of)).any():
            raise KeyError(f"ids {ids[:5].tolist()} are not all in segment {self.seg}")
        return row

    def take_over(self, old: Part) -> None:
        """Keep what an earlier commit's Part of this same file made (its id -> row table, its huge pages)."""
        self._rows, self.huge = old._rows, old.huge

    def to_huge_pages(self) -> str:
        """Back the arrays a search reads at random with huge pages: the float vectors (a scan plan's rows, an HNSW
        walk's distances) and an HNSW graph's neighbour lists. Records and returns the kernel's answer for the first
        of them ("huge", "refused: ...", see hugepages.on_huge_pages), "none" for coded storage without a graph."""
        arrays = []
        if (rows := self.rows()) is not None:
            arrays.append(rows[0])
        if (inner := _hnsw(self.index)) is not None:
            nb = inner.hnsw.neighbors
            if nb.size():
                arrays.append(faiss.rev_swig_ptr(nb.data(), nb.size()))
        outcomes = [on_huge_pages(a) for a in arrays]
        self.huge = outcomes[0] if outcomes else "none"
        return self.huge


class SegmentedIndex:
    """The live vectors of one kind across segments, with the parts of a FAISS index the query side uses:
    ``ntotal``, ``d``, ``search``, ``reconstruct``, ``reconstruct_batch``, ``ids``."""

    def __init__(self, parts: list[Part], d: int, per_photo: int, where: np.ndarray):
        """``where[photo id]``: the segment holding the photo's live vectors of this kind (0: none)."""
        self.parts, self.d, self.per_photo, self.where = parts, d, per_photo, where
        self.ntotal = sum(len(p.ids) - len(p.dead) for p in parts)
        self.exact = all(_is_exact(p.index) for p in parts)
        self.float_scores = all(_float_storage(p.index) for p in parts)  # scores are the stored vectors' own: no re-rank
        self.hnsw = any(_hnsw(p.index) is not None for p in parts)
        self._live: dict[int, np.ndarray] = {}  # per segment: the photos whose live vectors it holds (bool by photo id)
        for p in parts:
            ivf = faiss.try_extract_index_ivf(p.index)
            if ivf is not None:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by (any) id
            if (inner := _hnsw(p.index)) is not None:
                inner.hnsw.efSearch = HNSW_EF_SEARCH

    def set_nprobe(self, nprobe: int) -> None:
        for p in self.parts:
            ivf = faiss.try_extract_index_ivf(p.index)
            if ivf is not None:
                ivf.nprobe = min(ivf.nlist, nprobe)

    def probe_reads(self) -> float:
        """What a filtered search costs per query, in photos scored exactly in the same time: the IVF parts' probed
        share of their lists (at their nprobe), each HNSW part HNSW_SCAN_EQUIVALENT, each exact part its size /
        FLAT_SCAN_SHARE. A filter passing fewer photos than this is as cheap to score exactly (Engine.global_plan)."""
        reads = 0.0
        for p in self.parts:
            ivf = faiss.try_extract_index_ivf(p.index)
            if ivf is not None:
                reads += p.index.ntotal * min(ivf.nprobe, ivf.nlist) / max(1, ivf.nlist)
            elif _hnsw(p.index) is not None:
                reads += HNSW_SCAN_EQUIVALENT
            else:
                reads += len(p.ids) / FLAT_SCAN_SHARE
        return reads

    def ivf_parts(self) -> list[faiss.IndexIVF]:
        return [ivf for p in self.parts if (ivf := faiss.try_extract_index_ivf(p.index)) is not None]

    def _segment_of(self, ids: np.ndarray) -> np.ndarray:
        photo = np.asarray(ids, np.int64) // self.per_photo
        ok = (photo >= 0) & (photo < len(self.where))
        out = np.zeros(len(photo), np.int64)
        out[ok] = self.where[photo[ok]]
        return out

    def live_in(self, seg: int) -> np.ndarray:
        """bool by photo id: the photos whose live vectors segment ``seg`` holds (made once per snapshot)."""
        if seg not in self._live:
            self._live[seg] = self.where == seg
        return self._live[seg]

    def search(self, xq: np.ndarray, k: int, *, ids: np.ndarray | None = None, mask: np.ndarray | None = None,
               nprobe: int | None = None, share: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over the live vectors (``ids``: only these; ``mask``: only the photos set in this
        bool array by photo id, for a per-photo kind), each segment searched with its tombstones masked, the
        results merged (faiss.ResultHeap). A restriction becomes a FAISS selector per segment: the photos of it
        live there, as an IDSelectorBitmap when they are many of a per-photo kind (see BITMAP_SHARE), else an
        IDSelectorBatch. ``share``: the fraction of photos the restriction passes; an HNSW part then keeps
        HNSW_EF_SEARCH / share candidates (at most HNSW_EF_MAX), as the graph walk meets that many that fail."""
        xq = np.ascontiguousarray(xq, np.float32)
        heap = faiss.ResultHeap(len(xq), k, keep_max=True) if len(self.parts) > 1 else None
        ef = None if share is None else int(min(HNSW_EF_MAX, HNSW_EF_SEARCH / max(share, 1e-9)))
        wide = mask is not None or (ids is not None and self.per_photo == 1 and len(ids) * BITMAP_SHARE >= len(self.where))
        if wide:  # one bool per photo id: a segment's restriction is the photos that pass AND live in it
            assert self.per_photo == 1, "a photo mask restricts one vector per photo"
            if mask is not None and len(mask) == len(self.where):
                passing = mask
            elif mask is not None:
                passing = np.zeros(len(self.where), bool)
                m = min(len(mask), len(passing))
                passing[:m] = mask[:m]
            else:
                passing = np.zeros(len(self.where), bool)
                ids = np.asarray(ids, np.int64)
                passing[ids[(ids >= 0) & (ids < len(passing))]] = True
        elif ids is not None:
            segs = self._segment_of(ids)
        for p in self.parts:
            if wide:
                mine = passing if len(self.parts) == 1 else passing & self.live_in(p.seg)  # one part: all live there
                n = int(np.count_nonzero(mine))
                params = only_ids(p.index, nprobe=nprobe, bitmap=np.packbits(mine, bitorder="little"), ef=ef) if n else None
            elif ids is not None:
                mine = np.asarray(ids, np.int64)[segs == p.seg]
                n = len(mine)
                params = only_ids(p.index, mine, nprobe=nprobe, ef=ef) if n else None
            else:
                params = only_ids(p.index, exclude=p.dead, nprobe=nprobe)
                n = len(p.ids) - len(p.dead)
            kk = min(k, n)
            if kk <= 0:
                continue
            D, I = p.index.search(xq, kk, params=params)
            if heap is None and kk == k:  # one segment: its answer is the answer (no heap to fill and sort)
                return D, I
            if heap is None:
                heap = faiss.ResultHeap(len(xq), k, keep_max=True)
            heap.add_result(np.ascontiguousarray(D, np.float32), np.ascontiguousarray(I, np.int64))
        if heap is None:  # nothing to search
            return np.full((len(xq), k), np.finfo(np.float32).min, np.float32), np.full((len(xq), k), -1, np.int64)
        heap.finalize()
        return heap.D, heap.I

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of live ids (from whichever segment holds each); KeyError for an id that is not live."""
        ids = np.asarray(ids, np.int64)
        segs = self._segment_of(ids)
        if (segs == 0).any():
            raise KeyError(f"ids {ids[segs == 0][:5].tolist()} are not in the index")
        if len(self.parts) == 1 and (rows := self.parts[0].rows()) is not None:  # one float segment: one gather
            return rows[0][self.parts[0].rows_of(ids)]
        out = np.empty((len(ids), self.d), np.float32)
        by_seg = {p.seg: p for p in self.parts}
        for s in np.unique(segs):
            at = np.flatnonzero(segs == s)
            p = by_seg.get(int(s))
            if p is None:
                raise KeyError(f"segment {int(s)} is not in the index")
            if (rows := p.rows()) is not None:
                out[at] = rows[0][p.rows_of(ids[at])]
            else:
                out[at] = p.index.reconstruct_batch(ids[at])
        return out

    def inner_products(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        """q [d] against the stored vectors of live ids: the scan plan's scores. One float segment is read in place
        (faiss.fvec_inner_products_by_idx: no gathered copy of the rows, ~25% faster at 10k of 1M rows here)."""
        ids = np.asarray(ids, np.int64)
        if len(self.parts) == 1 and (rows := self.parts[0].rows()) is not None and len(ids):
            if (self._segment_of(ids) == 0).any():
                raise KeyError(f"ids {ids[:5].tolist()} are not all in the index")
            xb, row = rows[0], self.parts[0].rows_of(ids)
            q = np.ascontiguousarray(q, np.float32)
            out = np.empty(len(ids), np.float32)
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(xb),
                                             faiss.swig_ptr(np.ascontiguousarray(row)), self.d, 1, len(ids))
            return out
        return self.reconstruct_batch(ids) @ np.asarray(q, np.float32)

    def reconstruct(self, i: int) -> np.ndarray:
        return self.reconstruct_batch(np.array([i], np.int64))[0]

    def ids(self) -> np.ndarray:
        """Every live id, sorted."""
        live = [np.setdiff1d(p.ids, p.dead, assume_unique=True) for p in self.parts]
        return np.sort(np.concatenate(live)) if live else np.zeros(0, np.int64)


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _float_storage(index: faiss.Index) -> bool:
    """The index keeps float32 vectors (Flat, HNSW over Flat, IVF over Flat): the scores it returns are exact."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _is_exact(index: faiss.Index) -> bool:
    """Flat (or scalar-quantised) storage scanned whole: no candidate can be missed."""
    return faiss.try_extract_index_ivf(index) is None and _hnsw(index) is None
