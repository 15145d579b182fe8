"""Indexing on a Ray cluster: the indexer's own roles inside a Ray Data pipeline.

    file list (driver)  -> blocks of {id, path, size, mtime}; new photos' ids handed out here, in scan order
    decode (CPU tasks)  -> reader.decode_file, exactly as the local decode workers
    embed (actor pool)  -> one Embedder per actor (GPU actors where there are GPUs), which also writes each
                           batch's vectors as a segment staged in the index folder (writer.write_staged_segment)
    commit (driver)     -> the Writer adopts the staged segments: catalog rows + a manifest naming them, one
                           transaction, as a local run's commit

The driver scans and compares with the catalog and hands each new photo the next id in scan order before
dispatch; results come back in scan order and the manifest's ``next_id`` moves only over photos whose rows the
driver has taken, so a run killed between commits, then resumed, hands out the same ids again: every photo gets
the id a clean run gives it. Segments staged for a killed run are never named and the next writer removes them.
No vector crosses to the driver, except for an external store (Milvus), which the driver writes. Failed tasks are
retried by Ray (``max_retries``; actors are restarted). Photos and the index folder must be at the same path on
every node (shared storage).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from indexer import catalog
from indexer.embedder import Embedder, EmbedderConfig
from indexer.errors import ConfigError
from indexer.reader import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodeJob, FileInfo, decode_file
from indexer.runner import IndexConfig, RunStats, fill_meta, open_writer, sync_catalog
from indexer.writer import Writer, write_staged_segment

log = logging.getLogger(__name__)

SEGMENT_PHOTOS = 256  # photos an embedding actor writes as one segment at most (fewer with a smaller --commit-every)


def _decode_batch(batch: dict, job: DecodeJob) -> dict:
    """Ray Data CPU task: decode a block of files (bad files come back with their reason)."""
    n = len(batch["id"])
    res = job.resolution
    out = {k: batch[k] for k in ("id", "path", "tags_only", "new")}
    out.update(size=np.zeros(n, np.int64), mtime_ns=np.zeros(n, np.int64), hash=np.empty(n, object),
               width=np.zeros(n, np.int64), height=np.zeros(n, np.int64), error=np.empty(n, object),
               pixels=np.zeros((n, res, res, 3), np.uint8))
    for j in range(n):
        d = decode_file(FileInfo(str(batch["path"][j]), int(batch["size"][j]), int(batch["mtime_ns"][j])), job)
        out["size"][j], out["mtime_ns"][j], out["hash"][j] = d.size, d.mtime_ns, d.hash or ""
        out["error"][j] = d.error or ""
        if d.error is None:
            out["width"][j], out["height"][j], out["pixels"][j] = d.width, d.height, d.pixels
    return out


class _EmbedActor:
    """Ray Data actor: one model (and classifier, if asked) per actor, loaded once, fed whole batches. It writes
    each batch's vectors as a segment staged in the index folder (``write``: root, the writer's staging prefix,
    forced kinds) and sends back only the segment's record: the vectors cross to the driver only for an external
    store, which the driver writes (``write["vectors"]``)."""

    def __init__(self, config: EmbedderConfig, threads: int, write: dict, classifier: str | None = None, chunk: int = 16):
        import torch

        torch.set_num_threads(max(1, threads))
        self.embedder = Embedder(config)
        self.chunk, self.write = max(1, chunk), write
        self.classifier = None
        if classifier is not None:
            from indexer.classifier import Classifier, ClassifierConfig

            self.classifier = Classifier(ClassifierConfig(model=classifier), device=self.embedder.device,
                                         precision=self.embedder.precision)

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]])
        embed = ok & ~np.asarray(batch["tags_only"], bool)  # photos already indexed only want their tags
        n, e, c = len(ok), self.embedder, self.chunk
        cls = np.zeros((n, e.dim), np.float32)
        patches = np.zeros((n, e.grid, e.grid, e.dim), np.float32)
        todo = np.flatnonzero(embed)
        for i in range(0, len(todo), c):  # the model sees batches of --batch-size; a segment holds the whole call
            out = e.embed(batch["pixels"][todo[i:i + c]])
            cls[todo[i:i + c]], patches[todo[i:i + c]] = out.cls, out.patches
        tags = np.full(n, "", object)
        if self.classifier is not None and ok.any():
            good = np.flatnonzero(ok)
            for i in range(0, len(good), c):
                for j, t in zip(good[i:i + c], self.classifier.classify(batch["pixels"][good[i:i + c]])):
                    tags[j] = json.dumps(t)
        rest = {k: v for k, v in batch.items() if k != "pixels"}
        w, seg = self.write, np.full(n, "", object)
        if len(todo):
            record = write_staged_segment(w["root"], w["prefix"], np.asarray(batch["id"], np.int64)[todo], cls[todo],
                                          patches[todo], tuple(w["forced"]))
            seg[todo] = json.dumps(record)
        if w["vectors"]:  # an external store: the driver sends them on to it (see DESIGN.md)
            return rest | {"cls": cls, "patches": patches, "tags": tags, "seg": seg}
        return rest | {"tags": tags, "seg": seg}


def _ray_init(address: str, num_cpus: int | None) -> None:
    """Start a cluster of this machine ("local": always a new one, never a stale cluster file's address) or
    connect to a running one ("auto": RAY_ADDRESS or `ray start` on this machine; HOST:PORT; ray://HOST:10001)."""
    import ray

    if ray.is_initialized():
        return
    if address == "local":
        for attempt in (1, 2):  # Ray waits a fixed 30 s for its raylet to register; on a busy small machine it may not
            try:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
                return
            except Exception as e:  # Ray raises a bare Exception for it
                if "timed out during startup" not in str(e):
                    raise
                ray.shutdown()  # stops what did start, so the second attempt begins clean
                if attempt == 2:
                    raise ConfigError("--ray local: Ray's local cluster did not start within its 30 s, twice (the machine "
                                      "is busy?); try again, or index without --ray") from None
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:  # Ray's own words are several lines naming its flags, not ours
        where = ("no running Ray cluster was found (RAY_ADDRESS is not set and `ray start --head` was not run on this machine)"
                 if address == "auto" else f"cannot reach the Ray cluster at {address} ({str(e).strip().splitlines()[0][:160]})")
        raise ConfigError(f"--ray {address}: {where}; start one with `ray start --head` (or set RAY_ADDRESS=HOST:6379), "
                          f"or use --ray local for a cluster of this machine") from None


def pool_shape(total_cpus: float, workers: int, gpus: int) -> tuple[float, float]:
    """CPUs per embedding actor and per decode task. Decoding always keeps CPUs for itself: an actor
    pool that takes every CPU starves the read/decode tasks and the pipeline hangs."""
    decode = max(0.5, total_cpus * 0.25)
    if gpus:
        return 1.0, decode  # GPU actors need a core each to feed the GPU
    return max(0.25, (total_cpus - decode) / workers), decode


def index_folder_ray(
    root: str | os.PathLike,
    index_dir: str | os.PathLike,
    embedder: Embedder,
    config: IndexConfig = IndexConfig(),
    *,
    address: str = "local",
    num_workers: int = 2,
    num_cpus: int | None = None,
    on_commit: Callable[[RunStats], None] | None = None,
    store: str | None = None,
    classifier: str | None = None,
) -> RunStats:
    """Bring the index at ``index_dir`` up to date with ``root`` using Ray for decoding and embedding.

    ``embedder`` is the driver's copy, used for the manifest (model, fingerprint); the actors load
    the same model from ``embedder.config``. ``address`` is "local" (a cluster of this machine,
    ``num_cpus`` CPUs) or a Ray address ("auto", "ray://head:10001"). ``classifier`` (hub id or
    directory) tags photos inside the actors, from the same pixels; indexed photos without tags are
    decoded and tagged without re-embedding.
    """

    if num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {num_workers}")
    t0 = time.perf_counter()
    stats = RunStats()
    root = str(Path(root).expanduser().absolute())
    _ray_init(address, num_cpus)
    with open_writer(index_dir, embedder, config, store) as writer:
        files, known = sync_catalog(root, writer, stats)
        need_labels: set[int] = set()
        if classifier is not None:
            if writer.manifest.classifier not in (None, classifier):
                catalog.clear_labels(writer.db)  # another classifier's tags: every photo is tagged anew
            writer.manifest.classifier = classifier
            need_labels = writer.unlabelled()
        items: list[dict] = []
        next_id = writer.manifest.next_id  # new photos' ids, handed out in scan order; taken as they come back
        for f in files:
            k = known.get(f.path)
            if k is not None and (k[1], k[2]) == (f.size, f.mtime_ns) and (k[4] == "indexed" or not config.retry_failed):
                stats.unchanged += 1
                if k[0] in need_labels:
                    items.append({"id": k[0], "path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "tags_only": True,
                                  "new": False})
                continue
            if k is None:
                stats.new += 1
                next_id += 1
            else:
                stats.changed += 1
            items.append({"id": k[0] if k else next_id - 1, "path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                          "tags_only": False, "new": k is None})
        stats.unchanged -= stats.moved  # a moved photo's new row matched above: counted as moved only
        if items:
            _run_pipeline(items, writer, embedder, config, stats, num_workers, on_commit, known, classifier)
        fill_meta(writer, root, stats)  # Ray tasks send pixels only: new and changed photos' headers are read here
        writer.commit()
        stats.commits += 1
    stats.seconds = time.perf_counter() - t0
    return stats


def _run_pipeline(items, writer: Writer, embedder: Embedder, config: IndexConfig, stats: RunStats, num_workers: int,
                  on_commit, known, classifier: str | None) -> None:
    import ray
    import ray.data
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # commits follow scan order, as in a local run
    ctx.enable_progress_bars = False
    total = float(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor_cpus, decode_cpus = pool_shape(total, num_workers, gpus)
    job = DecodeJob(embedder.config.resolution, DEFAULT_MAX_PIXELS if config.max_pixels is None else config.max_pixels,
                    config.max_bytes or DEFAULT_MAX_BYTES)
    actor_cfg = EmbedderConfig(model=embedder.config.model, revision=embedder.config.revision,
                               resolution=embedder.config.resolution, device="cuda" if gpus else "cpu",
                               precision=embedder.precision)
    b = config.batch_size
    seg_batch = max(b, min(config.commit_every, SEGMENT_PHOTOS))  # photos per worker-written segment
    write = {"root": str(writer.root), "prefix": writer.staging_prefix, "forced": list(writer.manifest.kinds_forced),
             "vectors": writer.vectors is not None}
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // b, 4 * num_workers)))
    ds = ds.map_batches(_decode_batch, fn_kwargs={"job": job}, batch_size=b, batch_format="numpy",
                        num_cpus=decode_cpus, max_retries=3)
    ds = ds.map_batches(_EmbedActor, fn_constructor_kwargs={"config": actor_cfg, "threads": max(1, math.ceil(actor_cpus)),
                                                           "classifier": classifier, "chunk": b, "write": write},
                        batch_size=seg_batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=actor_cpus,
                        num_gpus=1 if gpus else 0, max_restarts=2, max_task_retries=3)
    bar = tqdm(total=len(items), unit="photo", disable=not config.progress, desc="indexing (ray)", smoothing=0.1)
    since = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):  # whole worker batches
        for j in np.flatnonzero(batch["new"]):  # in scan order: the ids handed out before dispatch
            got = writer.allocate_id()
            assert got == batch["id"][j], (got, batch["id"][j])
        ok = [j for j, e in enumerate(batch["error"]) if e == ""]
        for j, e in enumerate(batch["error"]):
            if e != "":
                pid, path = int(batch["id"][j]), str(batch["path"][j])
                writer.record_failure(pid, path, int(batch["size"][j]), int(batch["mtime_ns"][j]), batch["hash"][j] or None, e)
                stats.failed += 1
                stats.failures.append((path, e))
        tagged = [j for j in ok if batch["tags"][j] != ""]
        if tagged:
            writer.set_labels([int(batch["id"][j]) for j in tagged], [[tuple(t) for t in json.loads(batch["tags"][j])] for j in tagged])
            stats.labelled += len(tagged)
        by_seg: dict[str, list[int]] = {}
        for j in ok:
            if batch["tags_only"][j]:
                continue
            path, pid = str(batch["path"][j]), int(batch["id"][j])
            k = known.get(path)
            if k is not None and k[3] == batch["hash"][j] and k[4] == "indexed":  # same bytes, new mtime
                writer.touch(pid, int(batch["size"][j]), int(batch["mtime_ns"][j]))
                stats.touched += 1
                continue
            by_seg.setdefault(batch["seg"][j], []).append(j)
        for record, keep in by_seg.items():  # the worker wrote these photos' vectors as one staged segment
            rows = [(int(batch["id"][j]), str(batch["path"][j]), int(batch["size"][j]), int(batch["mtime_ns"][j]), batch["hash"][j],
                     int(batch["width"][j]), int(batch["height"][j])) for j in keep]
            vectors = (batch["cls"][keep], batch["patches"][keep]) if "cls" in batch else None
            writer.adopt(rows, json.loads(record), vectors)
            writer.clear_meta([r[0] for r in rows])  # a changed photo's metadata is read again (fill_meta)
            stats.indexed += len(rows)
        n = len(batch["id"])
        since += n
        bar.update(n)
        if since >= config.commit_every:
            writer.commit()
            stats.commits += 1
            since = 0
            if on_commit is not None:
                on_commit(stats)
    bar.close()
