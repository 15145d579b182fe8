"""FAISS index kinds and files: which kind for how many vectors, making, reading and listing indexes, and the
checksums and fsyncs that make a written file durable."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from pathlib import Path

import faiss
import numpy as np

from indexer.errors import ConfigError, IndexFormatError
from indexer.segments import SegmentedIndex

GLOBAL_FLAT_MAX = 200_000  # exact search below this many photos
PATCH_SQ8_MAX = 65_536  # 8-bit scalar quantized, scanned whole, below this many patch vectors (~256 photos)
PATCH_IVF_SQ8_MAX = 600_000  # then IVF over SQ8 codes; above, IVF over PQ codes (56 bytes a patch at d=384)


def choose_kind(n: int, dim: int, *, patches: bool) -> str:
    """FAISS factory string for n vectors: exact/SQ8 while small, IVF above (nlist ~ sqrt(n), a power of 2)."""
    nlist = 1 << max(4, round(math.log2(math.sqrt(max(n, 1)))))
    if patches:
        if n <= PATCH_SQ8_MAX:
            return "SQ8"
        if n <= PATCH_IVF_SQ8_MAX:
            return f"IVF{nlist},SQ8"
        return f"IVF{nlist},PQ{dim // 8}"
    if n <= GLOBAL_FLAT_MAX:
        return "Flat"
    return f"IVF{nlist},Flat"


HNSW_M = 32  # neighbours per HNSW node (FAISS's usual default)
HNSW_EF_CONSTRUCTION = 80  # candidates kept while linking a node (FAISS's default 40 left recall@10 at 0.93 at 1M with
# efSearch 128, scripts/bench_search.py; 80 doubles the build, which runs in compaction, off the indexing path)


def seal_kind(n: int, dim: int, kind: str) -> str:
    """FAISS factory string of a sealed (compacted) segment of n vectors of ``kind`` (global, patches, objects):
    global and object vectors exact while small, then HNSW (never removed from: deletes are tombstones);
    patches by choose_kind, so an IVF's list count grows with the data at each compaction."""
    if kind == "patches":
        return choose_kind(n, dim, patches=True)
    return "Flat" if n <= GLOBAL_FLAT_MAX else f"HNSW{HNSW_M}"


def check_kind(kind: str) -> None:
    """Refuse a FAISS factory string that does not parse or cannot delete vectors (HNSW, NSG): the indexer
    replaces changed photos and removes deleted ones, so such a kind would fail on the first later run."""
    try:
        index = faiss.IndexIDMap2(faiss.index_factory(64, kind, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError as e:
        raise ConfigError(f"bad FAISS index kind {kind!r}: {str(e).strip().splitlines()[-1]}") from None
    try:
        index.remove_ids(faiss.IDSelectorBatch(np.zeros(1, np.int64)))
    except RuntimeError:
        raise ConfigError(f"index kind {kind!r} cannot delete vectors (FAISS has no remove_ids for it), and a re-run "
                          f"deletes changed and removed photos: use Flat, SQ8, IVFn,Flat, IVFn,SQ8 or IVFn,PQm") from None


def make_index(kind: str, dim: int, train: np.ndarray | None) -> faiss.Index:
    """An empty ID-mapped inner-product index of ``kind``, trained on ``train`` if it needs it."""
    try:
        inner = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"bad FAISS index kind {kind!r}: {str(e).splitlines()[0]}") from None
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if isinstance(inner, faiss.IndexScalarQuantizer):
        inner.sq.rangestat = faiss.ScalarQuantizer.RS_minmax
        inner.sq.rangestat_arg = 0.2  # headroom beyond the training range for later photos
    if not inner.is_trained:
        if train is None or len(train) == 0:
            raise ConfigError(f"index kind {kind!r} needs training vectors")
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            # faiss-gpu: train the coarse k-means on the GPUs; the index itself stays a CPU index on disk
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        try:
            inner.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as e:
            raise ConfigError(f"cannot train index kind {kind!r} on {len(train)} vectors ({str(e).strip().splitlines()[-1][:160]}); "
                              f"use a smaller IVF list count, or leave the kind to dinosearch") from None
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(inner.nlist, 32)
        return inner  # IVF carries ids itself
    return faiss.IndexIDMap2(inner)


def index_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an index made by make_index (the live ones of a SegmentedIndex)."""
    if isinstance(index, SegmentedIndex):
        return index.ids()
    if isinstance(index, faiss.IndexIDMap2) or isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    out = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy() for i in range(ivf.nlist) if invlists.list_size(i)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def reconstruct_all(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of everything in the index (exact for Flat, decoded for compressed kinds)."""
    ids = index_ids(index)
    if len(ids) == 0:
        return ids, np.zeros((0, index.d), np.float32)
    if isinstance(index, SegmentedIndex):
        return ids, index.reconstruct_batch(ids)
    if isinstance(index, faiss.IndexIVF):
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        xb = index.reconstruct_batch(ids)
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        return ids, xb
    return ids, index.index.reconstruct_n(0, index.ntotal)


def on_disk_lists(index: faiss.Index):
    """The OnDiskInvertedLists of an IVF index merged by build-index, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    il = faiss.downcast_InvertedLists(ivf.invlists)
    return il if isinstance(il, faiss.OnDiskInvertedLists) else None


@contextlib.contextmanager
def _stdout_to_stderr():
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_index_mapped(path: Path) -> faiss.Index:
    """Read an index with flat codes memory-mapped (Flat, SQ, PQ storage): its vectors need not fit in RAM."""
    if not path.is_file():
        raise IndexFormatError(f"{path} is missing")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return read_index(path)  # kinds FAISS cannot map (IVF with lists in memory): read whole


def read_index(path: Path, *, mmap: bool = False) -> faiss.Index:
    if not path.is_file():
        raise IndexFormatError(f"{path} is missing")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            if not path.with_suffix(".ivfdata").is_file():
                raise
            # build-index's .ivfdata lies beside its index file; the directory moved since: look for it there
            # (FAISS says so on stdout, which belongs to the CLI's output: sent to stderr meanwhile)
            with _stdout_to_stderr():
                index = faiss.read_index(str(path), flags | faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:
        raise IndexFormatError(f"{path} is corrupt or truncated: {str(e).splitlines()[0][:200]}") from None
    except MemoryError:  # a damaged header can ask for any size; under a memory limit FAISS says std::bad_alloc
        raise IndexFormatError(f"{path} is corrupt or truncated: reading it asks for more memory than this process may have "
                               f"(a damaged header?)") from None
    return index  # read_index already returns the concrete class (downcasting again would drop ownership)


def file_digest(path: Path) -> dict[str, int | str]:
    """Size and blake2b of a file, recorded in the manifest so `verify` catches any corruption."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"size": path.stat().st_size, "blake2b": h.hexdigest()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


TRAIN_SAMPLE = 65_536  # vectors a trained kind learns from (bounded: training time must not grow with the data)


def kind_of(index: faiss.Index) -> str:
    """A short description of an index's kind for the manifest (the factory string it was made from)."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    if ivf is not None:
        codes = faiss.downcast_index(ivf)
        if isinstance(codes, faiss.IndexIVFPQ):
            return f"IVF{ivf.nlist},PQ{codes.pq.M}"
        if isinstance(codes, faiss.IndexIVFScalarQuantizer):
            return f"IVF{ivf.nlist},SQ8"
        return f"IVF{ivf.nlist},Flat"
    if isinstance(inner, faiss.IndexScalarQuantizer):
        return "SQ8"
    if isinstance(inner, faiss.IndexHNSW):
        return f"HNSW{inner.hnsw.nb_neighbors(1)}"
    return "Flat"

