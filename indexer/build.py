"""build-index: compact every segment into one sealed segment per kind, sized for the collection, beyond what
fits in memory.

Kind by vector count and a memory budget (the order autofaiss follows): exact
while the raw vectors fit and the collection is small, IVF-Flat while the raw
vectors fit, else IVF-PQ with the largest code that fits.

IVF kinds are built the way FAISS's on-disk demo does it: train the coarse
quantizer (and PQ) on a sample, fill shards in parallel (each a copy of the
trained empty index, written to disk), then merge the shards' inverted lists
into one ``.ivfdata`` file with ``faiss.contrib.ondisk.merge_ondisk``. The
merged index is committed as a new segment (indexer.compact) and its lists are
memory-mapped when searched: serving needs memory for the coarse centroids, not
for the lists.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.compact import compact
from indexer.errors import ConfigError
from indexer.faissio import index_ids, make_index
from indexer.segments import SegmentedIndex
from indexer.snapshot import Snapshot

log = logging.getLogger(__name__)

EXACT_MAX = 1_000_000  # above this many vectors exact search is too slow per query even if it fits


def parse_memory(text: str) -> int:
    """'8GB', '512MiB', '2e9' -> bytes."""
    m = re.fullmatch(r"\s*([\d.eE+]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"memory budget must look like 8GB, 512MB or 2e9 (bytes), got {text!r}")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def plan_kind(n: int, dim: int, memory: int) -> str:
    """FAISS factory string for n vectors of dim within ``memory`` bytes (vectors + ids + lists)."""
    nlist = 1 << min(16, max(4, round(math.log2(4 * math.sqrt(max(n, 1))))))
    raw = n * (dim * 4 + 8)
    if raw <= memory and n <= EXACT_MAX:
        return "Flat"
    if raw + nlist * dim * 4 <= memory:
        return f"IVF{nlist},Flat"
    for m in (dim // 2, dim // 4, dim // 8, dim // 16, 16, 8):
        if m and dim % m == 0 and n * (m + 8) + nlist * dim * 4 <= memory:
            return f"IVF{nlist},PQ{m}"
    need = n * (8 + 8) + nlist * dim * 4
    raise ConfigError(f"{n} vectors of dim {dim} do not fit in {memory / 2**30:.2f} GiB even as 8-byte PQ codes "
                      f"(about {need / 2**30:.2f} GiB needed); raise --memory")


@dataclass
class BuildReport:
    kinds: dict[str, str] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    shard_seconds: dict[str, list[float]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)


def _vectors(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of ``ids`` (decoded for compressed kinds)."""
    if isinstance(index, SegmentedIndex):
        return index.reconstruct_batch(ids)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.type != faiss.DirectMap.Hashtable:  # reconstruct by any id
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index.reconstruct_batch(ids)


def build_sharded(source: faiss.Index, kind: str, dim: int, out_dir: Path, name: str, *, shards: int = 4,
                  workers: int = 2, sample: int = 256 * 1024, chunk: int = 65536, seed: int = 0) -> tuple[faiss.Index, list[float]]:
    """Rebuild ``source`` as ``kind``: train on a sample, fill ``shards`` in parallel, merge on disk.

    Returns the merged index (on-disk inverted lists in out_dir/name.ivfdata for IVF kinds;
    an in-memory index otherwise) and each shard's fill time.
    """
    from faiss.contrib.ondisk import merge_ondisk

    ids = np.sort(index_ids(source))
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(ids, min(sample, len(ids)), replace=False)) if len(ids) else ids
    trained = make_index(kind, dim, _vectors(source, train_ids) if len(train_ids) else None)
    if faiss.try_extract_index_ivf(trained) is None:  # exact/SQ kinds: one piece, in memory
        for i in range(0, len(ids), chunk):
            trained.add_with_ids(_vectors(source, ids[i:i + chunk]), ids[i:i + chunk])
        return trained, []
    parts = np.array_split(ids, max(1, min(shards, len(ids))))
    work = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=out_dir.parent))
    try:
        def fill(j: int) -> tuple[str, float]:
            t = time.perf_counter()
            shard = faiss.clone_index(trained)
            part = parts[j]
            for i in range(0, len(part), chunk):
                shard.add_with_ids(_vectors(source, part[i:i + chunk]), part[i:i + chunk])
            path = work / f"shard-{j:04d}.faiss"
            faiss.write_index(shard, str(path))
            return str(path), time.perf_counter() - t

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # FAISS releases the GIL while adding
            done = list(pool.map(fill, range(len(parts))))
        merged = faiss.clone_index(trained)
        merge_ondisk(merged, [p for p, _ in done], str(out_dir / f"{name}.ivfdata"))
        return merged, [s for _, s in done]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_index(index_dir: str | os.PathLike, *, kind: str | None = None, patch_kind: str | None = None,
                memory: int = 8 * 2**30, shards: int = 4, workers: int = 2) -> BuildReport:
    """Compact every segment of ``index_dir`` into one sealed segment per kind, the kinds by size and memory budget,
    IVF kinds filled in shards and merged on disk."""
    report = BuildReport()
    root = Path(index_dir).expanduser().absolute()
    snap = Snapshot.open(root)
    n = snap.global_index().ntotal
    m = snap.manifest
    snap.close()
    if n == 0:
        raise ConfigError(f"{root} holds no vectors yet: index a folder first")
    counts = {"global": n, "patches": n * m.grid * m.grid}
    kinds = {k: forced or plan_kind(counts[k], m.dim, memory // 2)  # the budget is shared by the two indexes
             for k, forced in (("global", kind), ("patches", patch_kind))}

    def builder(source, k, dim, out_dir, name):
        index, shard_s = build_sharded(source, k, dim, out_dir, name, shards=shards, workers=workers)
        report.shard_seconds[name] = shard_s
        return index

    r = compact(root, everything=True, kinds=kinds, builder=builder, force=True)
    for k, name in (("global", "global"), ("patches", "patches")):
        report.kinds[name], report.vectors[name], report.seconds[name] = kinds[k], r.vectors.get(k, 0), r.seconds.get(k, 0.0)
        report.shard_seconds.setdefault(name, [])
        if f"{name}.ivfdata" in r.bytes:
            report.bytes[name] = r.bytes[f"{name}.ivfdata"]
    return report
