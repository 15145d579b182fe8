"""Compaction: merge segments into one sealed segment per kind, leaving their tombstoned vectors behind.

The work (reading the live vectors, training, filling the new index, writing its files) runs against a
committed Snapshot without the writer's lock, so an indexing run goes on meanwhile; only the swap takes the
lock: rename the new segment into place, point the catalog's vec/objvec rows that still name an input segment
at it, and commit a manifest without the inputs. A photo replaced or deleted while the compaction ran no
longer names an input segment, so its copy in the new segment is a tombstone like any other.

Kinds of a sealed segment by size: global and object vectors exact up to GLOBAL_FLAT_MAX, then HNSW (FAISS
cannot remove from HNSW, and does not need to: deletes are tombstones); patches SQ8, then IVF over SQ8 and
IVF-PQ codes with nlist ~ sqrt(n) (faissio.choose_kind), so nlist grows with the data at every compaction.
Trained kinds learn from a bounded sample (faissio.TRAIN_SAMPLE).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.faissio import TRAIN_SAMPLE, file_digest, fsync_dir, fsync_file, kind_of, make_index, seal_kind
from indexer.manifest import KIND_FILES
from indexer.segments import SegmentedIndex
from indexer.snapshot import Snapshot
from indexer.writer import Writer

log = logging.getLogger(__name__)

SMALL = 50_000  # global vectors below which a segment is merged with the others (a fresh, small segment)
DEAD_SHARE = 0.2  # a larger segment is rewritten once this share of its vectors are tombstones

Builder = Callable[[SegmentedIndex, str, int, Path, str], faiss.Index]


@dataclass
class CompactReport:
    inputs: list[int] = field(default_factory=list)  # segments merged
    seg: int | None = None  # the new segment (None: nothing to do)
    kinds: dict[str, str] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)  # live vectors kept
    dropped: dict[str, int] = field(default_factory=dict)  # tombstoned vectors left behind
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    shard_seconds: dict[str, list[float]] = field(default_factory=dict)


def pick_inputs(snap: Snapshot, everything: bool) -> list[int]:
    """Segments worth merging: every small one and every one with many tombstones (all with ``everything``);
    nothing when that would only rewrite one clean segment."""
    g = snap.global_index()
    segs = [s["seg"] for s in snap.manifest.segments]
    if everything:
        return segs if len(segs) > 1 or any(len(p.dead) for p in g.parts) else []
    size = {p.seg: (len(p.ids), len(p.dead)) for p in g.parts}
    out = [s for s in segs if size.get(s, (0, 0))[0] < SMALL or size[s][1] > DEAD_SHARE * size[s][0]]
    return out if len(out) > 1 or any(size.get(s, (0, 0))[1] for s in out) else []


def _restricted(index: SegmentedIndex, segs: set[int]) -> SegmentedIndex:
    return SegmentedIndex([p for p in index.parts if p.seg in segs], index.d, index.per_photo, index.where)


def _build(source: SegmentedIndex, kind: str, dim: int, chunk: int = 65_536) -> faiss.Index:
    """``source``'s live vectors as a new index of ``kind``, trained on a bounded sample."""
    ids = source.ids()
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(ids, min(TRAIN_SAMPLE, len(ids)), replace=False))
    needs = not faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT).is_trained or kind.startswith("SQ")
    index = make_index(kind, dim, source.reconstruct_batch(train) if needs else None)
    for i in range(0, len(ids), chunk):
        index.add_with_ids(source.reconstruct_batch(ids[i:i + chunk]), ids[i:i + chunk])
    return index


def compact(root: str | os.PathLike, *, everything: bool = False, kinds: dict[str, str] | None = None,
            builder: Builder | None = None, wait: float = 600.0, force: bool = False) -> CompactReport:
    """Merge segments of ``root`` (see pick_inputs; ``force``: every segment, even one clean one) into one sealed
    segment per kind and switch to it.
    ``kinds``: forced factory strings by kind; ``builder(source, kind, dim, out_dir, name)`` builds one kind's
    index in out_dir (build-index's on-disk merge), else it is built in memory."""
    root = Path(root).expanduser().absolute()
    report = CompactReport()
    snap = Snapshot.open(root)
    try:
        inputs = [s["seg"] for s in snap.manifest.segments] if force else pick_inputs(snap, everything)
        if not inputs:
            return report
        report.inputs = inputs
        work = root / f"compact-{os.getpid()}.tmp"  # not seg-*: a running writer's clean-up leaves it alone
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        m = snap.manifest
        files, made = {}, {}
        try:
            for kind, load in (("global", snap.global_index), ("patches", snap.patch_index), ("objects", snap.object_index)):
                src = _restricted(load(), set(inputs))
                if not src.parts:
                    continue
                n = src.ntotal
                report.dropped[kind] = sum(len(p.dead) for p in src.parts)
                if n == 0:
                    continue
                k = (kinds or {}).get(kind) or seal_kind(n, m.dim, kind)
                t = time.perf_counter()
                name = KIND_FILES[kind]
                if builder is not None and kind != "objects":
                    index = builder(src, k, m.dim, work, name.removesuffix(".faiss"))
                else:
                    index = _build(src, k, m.dim)
                faiss.write_index(index, str(work / name))
                report.seconds[kind] = time.perf_counter() - t
                report.kinds[kind], report.vectors[kind] = kind_of(index), n
                made[kind] = report.kinds[kind]
            for f in sorted(work.iterdir()):
                fsync_file(f)
                files[f.name] = file_digest(f)
                report.bytes[f.name] = f.stat().st_size
            fsync_dir(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        snap.close()
    with Writer(root, None, wait=wait) as w:
        seg = w.next_seg
        report.seg = seg
        w.replace_segments(inputs, work, {"seg": seg, "files": files, "kinds": made})
    log.info("compacted segments %s of %s into seg %d", inputs, root, seg)
    return report
