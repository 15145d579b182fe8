"""Runner: wires reader (worker processes) -> embedder (this process) -> writer, and times each stage.

Photos are handled in scan order through a bounded window of decode jobs, so
memory stays flat whatever the folder size and ids are assigned the same way in
a resumed run as in one clean run.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer import catalog
from indexer.classifier import Classifier
from indexer.embedder import Embedder
from indexer.errors import ConfigError, DecodeError
from indexer.faissio import check_kind
from indexer.manifest import Manifest
from indexer.objects import Mask, Segmenter, crop_object, rle_encode
from indexer.pool import DecodePool, decoded_in_order, start_pool
from indexer.reader import (
    DEFAULT_DECODE_TIMEOUT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DecodeJob,
    FileInfo,
    ScanReport,
    content_hash,
    read_file,
    read_meta,
    scan,
)
from indexer.writer import Writer

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class IndexConfig:
    batch_size: int = 16
    workers: int = field(default_factory=default_workers)  # decode processes; 0 decodes in this process
    commit_every: int = 1000  # photos between commits (a crash loses at most this much work)
    commit_seconds: float = 300.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds one file may take to read and decode
    global_kind: str | None = None  # FAISS factory string; None chooses by collection size
    patch_kind: str | None = None
    retry_failed: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Impossible values are refused here, once, not silently changed later."""
        for name, low in (("batch_size", 1), ("workers", 0), ("commit_every", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for kind in (self.global_kind, self.patch_kind):
            if kind is not None:
                check_kind(kind)


@dataclass
class RunStats:
    scanned: int = 0
    unchanged: int = 0
    new: int = 0
    changed: int = 0
    deleted: int = 0
    moved: int = 0  # the same bytes at a new path (moved, renamed): the catalog row follows, nothing is embedded
    indexed: int = 0
    failed: int = 0
    not_images: int = 0  # files the scan passed over: not photos by extension or first bytes (sidecars, videos, text)
    touched: int = 0  # same content, new mtime
    described: int = 0  # indexed photos given metadata from their header alone (an index from before metadata)
    labelled: int = 0  # photos given class tags
    segmented: int = 0  # photos SAM looked at
    objects: int = 0  # objects stored
    commits: int = 0
    seconds: float = 0.0
    longest_pause: float = 0.0  # the longest time between two photos finishing (after the first), and what filled it:
    pause_cause: str = ""  # "commit", "embedding" (a batch through the model), "decoding" (waiting for a photo), "other"
    stage_seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def photos_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0


def index_folder(
    root: str | os.PathLike,
    index_dir: str | os.PathLike,
    embedder: Embedder,
    config: IndexConfig = IndexConfig(),
    *,
    on_commit: Callable[[RunStats], None] | None = None,
    pool: DecodePool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    classifier: Classifier | None = None,
    segmenter: Segmenter | None = None,
    store: str | None = None,
) -> RunStats:
    """Bring the index at ``index_dir`` up to date with the photos below ``root``.

    ``pool`` may be a decode pool from start_pool(), started early (before the model
    loads) so the workers' start-up is hidden; it is shut down here either way.
    ``classifier`` tags every embedded photo from the same decoded pixels, and tags
    photos already in the index that have no tags yet (decoded again, not re-embedded).
    ``segmenter`` finds SAM objects in the same photos (decoded once, at two sizes),
    embeds each masked crop with the backbone and stores them in the object index;
    photos already indexed but not yet segmented are segmented without re-embedding.
    ``store``: URI of an external vector store (milvus://HOST:19530/NAME, milvus-lite:///PATH.db)
    that receives every vector too and serves searches (recorded in the manifest).
    """

    t0 = time.perf_counter()
    stats = RunStats()
    root = str(Path(root).expanduser().absolute())
    if pool is None:
        pool = start_pool(config.workers)
    try:
        return _index(root, index_dir, embedder, config, pool, stats, t0, on_commit, on_progress, classifier, segmenter, store)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def store_objects(embedder: Embedder, writer: Writer, photos: list[tuple[int, np.ndarray, int, int]],
                  found: list[list[Mask]], batch: int = 16) -> int:
    """Masks of photos (id, large pixels, width, height) -> neutral-background crops -> batched backbone
    passes -> the writer's object index, boxes scaled to the photo's own pixels. Returns objects stored."""
    crops = [crop_object(large, m.mask, embedder.config.resolution) for (_, large, _, _), ms in zip(photos, found) for m in ms]
    vectors = np.concatenate([embedder.embed(np.stack(crops[i:i + batch])).cls for i in range(0, len(crops), batch)]) if crops else None
    at = 0
    for (photo_id, large, width, height), ms in zip(photos, found):
        sx, sy = width / large.shape[1], height / large.shape[0]
        objects = [((m.box[0] * sx, m.box[1] * sy, m.box[2] * sx, m.box[3] * sy), m.score, rle_encode(m.mask)) for m in ms]
        writer.set_objects(photo_id, objects, vectors[at:at + len(ms)] if ms else np.zeros((0, writer.manifest.dim), np.float32))
        at += len(ms)
    return at


def _segment(embedder: Embedder, segmenter: Segmenter, writer: Writer, stats: RunStats, batch: int,
             photos: list[tuple[int, np.ndarray, int, int]]) -> None:
    t = time.perf_counter()
    found = [segmenter.automatic(large) for _, large, _, _ in photos]
    t1 = time.perf_counter()
    stats.objects += store_objects(embedder, writer, photos, found, batch)
    stats.segmented += len(photos)
    stats.stage_seconds["segment"] += t1 - t
    stats.stage_seconds["embed_objects"] += time.perf_counter() - t1


def open_writer(index_dir, embedder: Embedder, config: IndexConfig, store: str | None) -> Writer:
    """The index's writer, checked against the model, with its external vector store if it has one."""
    from indexer.snapshot import current_snapshot
    from indexer.vectors import open_store

    manifest = Manifest.for_embedder(embedder, global_kind=config.global_kind, patch_kind=config.patch_kind)
    root = Path(index_dir).expanduser()
    old = Manifest.load_current(root) if root.is_dir() and current_snapshot(root) is not None else None
    if old is not None and store is not None and old.store != store:
        raise ConfigError(f"{root} keeps its vectors in {old.store or 'its own FAISS files'}, not {store}; use a new --index")
    uri = store or (old.store if old is not None else None)
    writer = Writer(index_dir, manifest, vectors=open_store(uri, embedder.dim) if uri else None)
    try:
        if writer.manifest is not manifest:
            writer.manifest.check(embedder)
        writer.manifest.store = uri
        if writer.vectors is not None and writer.vectors.remove_from(writer.manifest.next_id):
            writer.dirty = True  # vectors a killed run sent for photo ids it never committed: gone at the next commit
    except BaseException:
        writer.close()
        raise
    return writer


def sync_catalog(root: str, writer: Writer, stats: RunStats) -> tuple[list[FileInfo], dict]:
    """Scan ``root``, forget the photos gone from it and record the files the scan could not read
    (they take the next ids). Returns the files found and the catalog as it was: path -> row."""
    report = ScanReport()
    files = list(scan(root, report))
    scan_errors = report.errors
    stats.scanned = len(files)
    stats.not_images = sum(report.not_images.values())
    writer.set_not_images(root, dict(report.not_images))
    known = writer.known()
    seen = {f.path for f in files} | {p for p, _ in scan_errors}
    prefix = root.rstrip(os.sep) + os.sep
    gone = {p: v for p, v in known.items() if p.startswith(prefix) and p not in seen}
    for f, old in find_moves([f for f in files if f.path not in known], gone):
        del gone[old]
        photo_id, meta = known[old][0], read_meta(f.path, f.mtime_ns)
        writer.move(photo_id, f.path, f.size, f.mtime_ns)
        writer.set_meta(photo_id, f.path, meta)  # its folder, and a date that may fall back to the mtime
        known[f.path] = (photo_id, f.size, f.mtime_ns, known.pop(old)[3], "indexed")
        stats.moved += 1
    writer.delete([v[0] for v in gone.values()])
    stats.deleted = len(gone)
    for path, reason in scan_errors:
        if path not in known:
            writer.record_failure(writer.allocate_id(), path, 0, 0, None, reason)
            stats.failed += 1
            stats.failures.append((path, reason))
    return files, known


def find_moves(new: list[FileInfo], gone: dict[str, tuple]) -> list[tuple[FileInfo, str]]:
    """New files that hold the very bytes of an indexed photo gone from its path in the same scan: (file, old path)
    pairs. Only files of a gone photo's size are read (and hashed as the decode does); each old path is used once."""
    by_key: dict[tuple[int, str], list[str]] = collections.defaultdict(list)
    for path, (_, size, _, hash_, status) in sorted(gone.items()):
        if status == "indexed" and hash_:
            by_key[size, hash_].append(path)
    sizes = {size for size, _ in by_key}
    moves = []
    for f in new:
        if f.size not in sizes:
            continue
        try:
            olds = by_key.get((f.size, content_hash(read_file(f.path))))
        except (OSError, DecodeError):
            continue  # unreadable now: the decode records why, as for any new file
        if olds:
            moves.append((f, olds.pop(0)))
    return moves


def fill_meta(writer: Writer, root: str, stats: RunStats) -> None:
    """Metadata for photos below ``root`` that were indexed before metadata existed (or by a Ray run):
    read from the head of each file, never re-embedded. Photos decoded in this run got theirs from the decode."""
    prefix = root.rstrip(os.sep) + os.sep
    t = time.perf_counter()
    for photo_id, (path, mtime_ns) in writer.without_meta().items():
        if path.startswith(prefix):
            writer.set_meta(photo_id, path, read_meta(path, mtime_ns))
            stats.described += 1
    stats.stage_seconds["metadata"] += time.perf_counter() - t


def _index(root, index_dir, embedder, config, pool, stats, t0, on_commit, on_progress, classifier, segmenter, store) -> RunStats:
    from tqdm import tqdm

    with open_writer(index_dir, embedder, config, store) as writer:
        files, known = sync_catalog(root, writer, stats)
        need_labels: set[int] = set()
        if classifier is not None:
            if writer.manifest.classifier not in (None, classifier.config.model):
                catalog.clear_labels(writer.db)  # another classifier's tags: every photo is tagged anew
            writer.manifest.classifier = classifier.config.model
            need_labels = writer.unlabelled()
        need_objects: set[int] = set()
        if segmenter is not None:
            settings = segmenter.config.settings()
            if writer.manifest.segmenter not in (None, settings):
                writer.reset_objects()  # another SAM model or settings: every photo is segmented anew
            writer.manifest.segmenter = settings
            need_objects = writer.unsegmented()
        todo: list[FileInfo] = []
        for f in files:
            k = known.get(f.path)
            if k is None:
                stats.new += 1
            elif (k[1], k[2]) == (f.size, f.mtime_ns) and (k[4] == "indexed" or not config.retry_failed):
                stats.unchanged += 1
                if k[0] in need_labels or k[0] in need_objects:
                    todo.append(f)  # decoded again for its tags / objects only
                continue
            else:
                stats.changed += 1
            todo.append(f)
        stats.unchanged -= stats.moved  # a moved photo's new row matched above: counted as moved only

        job = DecodeJob(embedder.config.resolution, config.max_pixels, config.max_bytes,
                        large_side=segmenter.side if segmenter is not None else 0, timeout=config.decode_timeout)
        window = max(2 * config.batch_size, 4 * max(config.workers, 1))
        batch_rows: list[tuple] = []
        batch_pixels: list[np.ndarray] = []
        batch_large: list[tuple[int, np.ndarray, int, int]] = []  # (id, large pixels, width, height) for SAM
        tag_ids: list[int] = []  # photos that only need tags
        tag_pixels: list[np.ndarray] = []
        seg_only: list[tuple[int, np.ndarray, int, int]] = []  # photos that only need objects
        since_commit, last_commit = 0, time.monotonic()

        def tag(ids: list[int], pixels: np.ndarray) -> None:
            t = time.perf_counter()
            writer.set_labels(ids, classifier.classify(pixels))
            stats.stage_seconds["classify"] += time.perf_counter() - t
            stats.labelled += len(ids)

        def flush() -> None:
            if tag_ids:
                tag(list(tag_ids), np.stack(tag_pixels))
                tag_ids.clear()
                tag_pixels.clear()
            if seg_only:
                _segment(embedder, segmenter, writer, stats, config.batch_size, list(seg_only))
                seg_only.clear()
            if not batch_rows:
                return
            t = time.perf_counter()
            px = np.stack(batch_pixels)
            out = embedder.embed(px)
            t1 = time.perf_counter()
            writer.add(batch_rows, out.cls, out.patches)
            stats.stage_seconds["embed"] += t1 - t
            stats.stage_seconds["write"] += time.perf_counter() - t1
            if classifier is not None:
                tag([r[0] for r in batch_rows], px)
            if segmenter is not None:
                _segment(embedder, segmenter, writer, stats, config.batch_size, list(batch_large))
                batch_large.clear()
            stats.indexed += len(batch_rows)
            batch_rows.clear()
            batch_pixels.clear()

        gap: dict[str, float] = collections.defaultdict(float)  # what the time since the last photo finished went to
        last_tick = None

        def tick() -> None:
            """A photo finished (or the run did): the time since the previous one is a pause; keep the longest."""
            nonlocal last_tick
            now = time.perf_counter()
            if last_tick is not None and now - last_tick > stats.longest_pause:
                stats.longest_pause = now - last_tick
                cause = max(gap, key=gap.get, default="other")
                stats.pause_cause = cause if gap.get(cause, 0) >= 0.5 * stats.longest_pause else "other"
            last_tick = now
            gap.clear()

        def commit() -> None:
            nonlocal since_commit, last_commit
            t = time.perf_counter()
            flush()
            gap["embedding"] += time.perf_counter() - t
            t = time.perf_counter()
            if writer.commit() is not None:
                stats.commits += 1
            stats.stage_seconds["commit"] += time.perf_counter() - t
            gap["commit"] += time.perf_counter() - t
            since_commit, last_commit = 0, time.monotonic()
            if on_commit is not None:
                on_commit(stats)

        bar = tqdm(total=len(todo), unit="photo", disable=not config.progress or not todo, desc="indexing", smoothing=0.1)
        results = decoded_in_order(todo, job, pool, window)
        done = 0
        while True:
            t = time.perf_counter()
            d = next(results, None)
            stats.stage_seconds["decode_wait" if done else "first_photo"] += time.perf_counter() - t
            gap["decoding"] += time.perf_counter() - t
            if d is None:
                break
            k = known.get(d.path)
            photo_id = k[0] if k else writer.allocate_id()
            if d.error is not None:
                writer.record_failure(photo_id, d.path, d.size, d.mtime_ns, d.hash, d.error)
                stats.failed += 1
                stats.failures.append((d.path, d.error))
                log.info("skipped %s: %s", d.path, d.error)
            elif k is not None and k[3] == d.hash and k[4] == "indexed":
                if (k[1], k[2]) != (d.size, d.mtime_ns):
                    writer.touch(photo_id, d.size, d.mtime_ns)
                    stats.touched += 1
                if d.meta is not None:  # the same bytes, but a date that falls back to the mtime may change
                    writer.set_meta(photo_id, d.path, d.meta)
                if photo_id in need_labels:
                    tag_ids.append(photo_id)
                    tag_pixels.append(d.pixels)
                if photo_id in need_objects:
                    seg_only.append((photo_id, d.large, d.width, d.height))
                if len(tag_ids) >= config.batch_size or len(seg_only) >= config.batch_size:
                    flush()
            else:
                batch_rows.append((photo_id, d.path, d.size, d.mtime_ns, d.hash, d.width, d.height))
                batch_pixels.append(d.pixels)
                if d.meta is not None:
                    writer.set_meta(photo_id, d.path, d.meta)
                if segmenter is not None:
                    batch_large.append((photo_id, d.large, d.width, d.height))
                if len(batch_rows) >= config.batch_size:
                    t = time.perf_counter()
                    flush()
                    gap["embedding"] += time.perf_counter() - t
            since_commit += 1
            done += 1
            tick()
            bar.update(1)
            if on_progress is not None:
                on_progress(done, len(todo))
            if stats.failed:
                bar.set_postfix(failed=stats.failed, refresh=False)
            if since_commit >= config.commit_every or time.monotonic() - last_commit >= config.commit_seconds:
                commit()
        bar.close()
        fill_meta(writer, root, stats)
        commit()
        if done:
            tick()  # the last batch and the final commit
    stats.seconds = time.perf_counter() - t0
    return stats
