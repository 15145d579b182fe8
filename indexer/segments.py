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

HNSW_EF_SEARCH = 128  # candidates an HNSW segment's search keeps (recall against speed: scripts/bench_search.py)
BITMAP_SHARE = 64  # a restriction to ids of one vector per photo (global) naming at least 1/64 of the id range is
# a bitmap over the range (a few numpy passes) rather than a hash set of the ids (built per id, per query)


def only_ids(index: faiss.Index, ids: np.ndarray | None = None, *, exclude: np.ndarray | None = None,
             nprobe: int | None = None, bitmap: np.ndarray | None = None) -> faiss.SearchParameters | None:
    """Search parameters that restrict ``index`` to ``ids`` (or to the ids set in ``bitmap``: bit i of byte i >> 3
    for id i, least significant first, as np.packbits(..., bitorder="little") makes it) and/or keep ``exclude`` out
    (an IVF index takes its own parameter type, which must carry its nprobe: SearchParametersIVF's default of 1
    would replace the index's)."""
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


class SegmentedIndex:
    """The live vectors of one kind across segments, with the parts of a FAISS index the query side uses:
    ``ntotal``, ``d``, ``search``, ``reconstruct``, ``reconstruct_batch``, ``ids``."""

    def __init__(self, parts: list[Part], d: int, per_photo: int, where: np.ndarray):
        """``where[photo id]``: the segment holding the photo's live vectors of this kind (0: none)."""
        self.parts, self.d, self.per_photo, self.where = parts, d, per_photo, where
        self.ntotal = sum(len(p.ids) - len(p.dead) for p in parts)
        self.exact = all(_is_exact(p.index) for p in parts)
        for p in parts:
            ivf = faiss.try_extract_index_ivf(p.index)
            if ivf is not None:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by (any) id
            inner = faiss.downcast_index(p.index.index) if isinstance(p.index, faiss.IndexIDMap2) else None
            if isinstance(inner, faiss.IndexHNSW):
                inner.hnsw.efSearch = HNSW_EF_SEARCH

    def set_nprobe(self, nprobe: int) -> None:
        for p in self.parts:
            ivf = faiss.try_extract_index_ivf(p.index)
            if ivf is not None:
                ivf.nprobe = min(ivf.nlist, nprobe)

    def ivf_parts(self) -> list[faiss.IndexIVF]:
        return [ivf for p in self.parts if (ivf := faiss.try_extract_index_ivf(p.index)) is not None]

    def _segment_of(self, ids: np.ndarray) -> np.ndarray:
        photo = np.asarray(ids, np.int64) // self.per_photo
        ok = (photo >= 0) & (photo < len(self.where))
        out = np.zeros(len(photo), np.int64)
        out[ok] = self.where[photo[ok]]
        return out

    def search(self, xq: np.ndarray, k: int, *, ids: np.ndarray | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over the live vectors (``ids``: only these), each segment searched with its
        tombstones masked, the results merged (faiss.ResultHeap). ``ids`` become a FAISS selector per segment: those
        of them live there, as an IDSelectorBitmap when they are many of a per-photo kind (see BITMAP_SHARE), else
        an IDSelectorBatch."""
        xq = np.ascontiguousarray(xq, np.float32)
        heap = faiss.ResultHeap(len(xq), k, keep_max=True)
        wide = ids is not None and self.per_photo == 1 and len(ids) * BITMAP_SHARE >= len(self.where)
        if wide:  # one bool per photo id: a segment's restriction is the photos that pass AND live in it
            ids = np.asarray(ids, np.int64)
            passing = np.zeros(len(self.where), bool)
            passing[ids[(ids >= 0) & (ids < len(passing))]] = True
        elif ids is not None:
            segs = self._segment_of(ids)
        for p in self.parts:
            if wide:
                mine = passing & (self.where == p.seg)
                n = int(np.count_nonzero(mine))
                params = only_ids(p.index, nprobe=nprobe, bitmap=np.packbits(mine, bitorder="little")) if n else None
            elif ids is not None:
                mine = np.asarray(ids, np.int64)[segs == p.seg]
                n = len(mine)
                params = only_ids(p.index, mine, nprobe=nprobe) if n else None
            else:
                params = only_ids(p.index, exclude=p.dead, nprobe=nprobe)
                n = len(p.ids) - len(p.dead)
            kk = min(k, n)
            if kk <= 0:
                continue
            D, I = p.index.search(xq, kk, params=params)
            heap.add_result(np.ascontiguousarray(D, np.float32), np.ascontiguousarray(I, np.int64))
        heap.finalize()
        return heap.D, heap.I

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of live ids (from whichever segment holds each); KeyError for an id that is not live."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        segs = self._segment_of(ids)
        if (segs == 0).any():
            raise KeyError(f"ids {ids[segs == 0][:5].tolist()} are not in the index")
        by_seg = {p.seg: p for p in self.parts}
        for s in np.unique(segs):
            at = np.flatnonzero(segs == s)
            p = by_seg.get(int(s))
            if p is None:
                raise KeyError(f"segment {int(s)} is not in the index")
            out[at] = p.index.reconstruct_batch(ids[at])
        return out

    def reconstruct(self, i: int) -> np.ndarray:
        return self.reconstruct_batch(np.array([i], np.int64))[0]

    def ids(self) -> np.ndarray:
        """Every live id, sorted."""
        live = [np.setdiff1d(p.ids, p.dead, assume_unique=True) for p in self.parts]
        return np.sort(np.concatenate(live)) if live else np.zeros(0, np.int64)


def _is_exact(index: faiss.Index) -> bool:
    """Flat (or scalar-quantised) storage scanned whole: no candidate can be missed."""
    if faiss.try_extract_index_ivf(index) is not None:
        return False
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return not isinstance(inner, faiss.IndexHNSW)
