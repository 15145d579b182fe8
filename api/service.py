"""What the HTTP layer stands on: one Engine (one model per process), index jobs, deletes.

No search logic here: queries go to search.Engine, writes to indexer's runner and Writer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from api.settings import Settings
from indexer.embedder import Embedder, EmbedderConfig
from indexer.errors import DinosearchError, IndexFormatError, IndexWriteError
from indexer.manifest import Manifest
from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import current_snapshot
from indexer.writer import Writer
from search import Engine, EngineConfig

log = logging.getLogger(__name__)


class NotReady(IndexFormatError):
    """The index has no committed snapshot yet."""


class Busy(DinosearchError):
    """Every decode slot stayed taken for the whole wait (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message)
        self.retry_after = retry_after


class BadFolder(DinosearchError):
    """A folder given to an index job that is not an existing, readable directory (HTTP 422)."""


class FolderForbidden(DinosearchError):
    """A folder outside --allowed-root, or one the server may not read (HTTP 403)."""


class UnknownJob(DinosearchError):
    """No index job with this id in this server process (HTTP 404)."""


class JobFinished(DinosearchError):
    """The job has already ended: nothing to cancel (HTTP 409)."""


class JobCancelled(DinosearchError):
    """Raised inside a running job at its next photo once it is cancelled; committed work stays."""


def check_folder(folder: str, allowed_roots: tuple = ()) -> str:
    """The folder an index job may index: absolute, an existing directory the server can read, and below one of
    ``allowed_roots`` (after resolving symlinks) if any are set. Returns it normalised ('..' and '//' folded,
    symlinks kept, so catalog paths are those a CLI run on the same folder records)."""
    if not os.path.isabs(folder) or "\0" in folder:
        raise BadFolder(f"the folder must be an absolute path on the server, got {folder[:200]!r}")
    path = os.path.normpath(folder)
    try:
        st = os.stat(path)
        real = os.path.realpath(path, strict=True)
    except OSError as e:
        why = {errno.ENOENT: "no such folder on the server", errno.ENOTDIR: "a part of it is not a folder",
               errno.ENAMETOOLONG: "the name is too long", errno.ELOOP: "too many levels of symbolic links"}
        if e.errno in (errno.EACCES, errno.EPERM):
            raise FolderForbidden(f"the server may not read {path[:200]}: {e.strerror}") from None
        raise BadFolder(f"cannot index {path[:200]}: {why.get(e.errno, e.strerror)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BadFolder(f"not a folder: {path[:200]}")
    if allowed_roots:
        roots = [os.path.realpath(r) for r in allowed_roots]
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise FolderForbidden(f"{path[:200]} is outside the folders this server may index ({', '.join(roots)}; "
                                  f"serve --allowed-root)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise FolderForbidden(f"the server may not read {path[:200]}: permission denied")
    return path


def write_error(e: OSError, index) -> IndexWriteError:
    """An OSError met while opening the index for writing, as the typed error the HTTP layer maps by errno."""
    return IndexWriteError(f"cannot write the index at {index}: {e.strerror or e}", errno=e.errno)


@dataclass
class JobState:
    id: int
    folder: str
    state: str = "queued"
    stage: str | None = None  # while running: scanning, indexing, duplicates
    done: int = 0
    total: int = 0
    indexed: int = 0  # committed so far (searchable), then the run's total
    failed: int = 0
    error: str | None = None
    check_duplicates: bool = False  # when done: list the photos it added that duplicate indexed ones
    duplicates: list[dict] = field(default_factory=list)  # {id, duplicate_of, kind, score}
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._engine: Engine | None = None
        self._embedder: Embedder | None = None
        self._classifier = None
        self._lock = threading.Lock()
        self.jobs: dict[int, JobState] = {}
        self._queue: queue.Queue[JobState | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run_jobs, name="index-jobs", daemon=True)
        self._decodes = threading.BoundedSemaphore(max(1, settings.max_decodes))
        self._watching = threading.Event()  # set: the watchers stop
        self._watchers: list[threading.Thread] = []
        self._compactor: threading.Thread | None = None
        self._checked = 0.0
        self._stopping = threading.Event()

    @contextlib.contextmanager
    def decode_slot(self) -> Iterator[None]:
        """One of ``max_decodes`` slots for decoding and searching an upload; waits up to ``decode_wait`` s."""
        if not self._decodes.acquire(timeout=self.settings.decode_wait):
            raise Busy(f"busy: {self.settings.max_decodes} uploads are being decoded; try again in a moment",
                       retry_after=max(1, round(self.settings.decode_wait)))
        try:
            yield
        finally:
            self._decodes.release()

    # -- lifecycle

    def start(self) -> None:
        if current_snapshot(self.settings.index) is not None:
            try:
                _ = self.engine  # load the model now, once, and check it against the manifest
            except DinosearchError as e:  # e.g. a model mismatch: every request says so (409), the server stays up
                log.error("%s", e)
        if not self._worker.is_alive():  # idempotent: a lifespan may run more than once per app
            self._worker = threading.Thread(target=self._run_jobs, name="index-jobs", daemon=True)
            self._worker.start()
        if self.settings.watch and not any(t.is_alive() for t in self._watchers):
            self._watching.clear()
            self._watchers = [threading.Thread(target=self._watch, args=(str(f),), name=f"watch {f}", daemon=True)
                              for f in self.settings.watch]
            for t in self._watchers:
                t.start()
        if self.settings.compact_every > 0 and (self._compactor is None or not self._compactor.is_alive()):
            self._stopping.clear()
            self._compactor = threading.Thread(target=self._compact_loop, name="compact", daemon=True)
            self._compactor.start()

    def stop(self) -> None:
        self._stopping.set()
        self._watching.set()
        for t in self._watchers:
            t.join(timeout=5)
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout=5)

    def _watch(self, folder: str) -> None:
        """Keep the index in step with ``folder``: an index job now, then one per burst of changes, one at a time."""
        from indexer.watch import WatchConfig, watch_folder

        def run(where: str) -> None:
            job = self.submit(where)
            while not job.finished.wait(0.5):
                if self._watching.is_set():
                    return

        try:
            watch_folder(folder, run, self._watching, WatchConfig(interval=self.settings.watch_interval),
                         ignore=(str(self.settings.index.absolute()),), initial=True)
        except Exception:  # the server stays up; searches go on without the watch
            log.exception("watching %s failed; the index is no longer kept in step with it", folder)

    def _compact_loop(self) -> None:
        """Merge small segments now and then; a running index job keeps the writer's lock, so a merge then waits
        for the next round (the work is redone on the newer commit)."""
        from indexer.compact import compact

        while not self._stopping.wait(self.settings.compact_every):
            if current_snapshot(self.settings.index) is None:
                continue
            try:
                r = compact(self.settings.index, wait=5.0)
            except DinosearchError as e:  # busy, or a segment that cannot be read: said, and tried again later
                log.warning("background compaction: %s", e)
                continue
            if r.seg is not None:
                log.info("compacted segments %s into seg-%06d", r.inputs, r.seg)
                self.refresh()

    # -- engine

    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                model, resolution, recorded = self.settings.model, 224, None
                if current_snapshot(self.settings.index) is not None:  # the index's model, resolution and precision
                    m = Manifest.load_current(self.settings.index)
                    model, resolution, recorded = model or m.model, m.resolution, m.precision
                self._embedder = Embedder(EmbedderConfig(model=model or "facebook/dinov2-small", resolution=resolution,
                                                         device=self.settings.device, precision=self.settings.precision,
                                                         index_precision=recorded))
            return self._embedder

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if current_snapshot(self.settings.index) is None:
                raise NotReady(f"the index at {self.settings.index} is empty: add photos first (POST /index/jobs)")
            emb = self.embedder()
            with self._lock:
                if self._engine is None:
                    cfg = EngineConfig(max_pixels=self.settings.max_pixels, store=self.settings.store, nprobe=self.settings.nprobe,
                                       resident=True)  # a server's queries read its global vectors at random
                    self._engine = Engine(self.settings.index, cfg, embedder=emb)
        elif time.monotonic() - self._checked > 1.0:  # follow commits of other processes (a CLI run, compaction)
            self._checked = time.monotonic()
            self._engine.refresh()
        return self._engine

    def refresh(self) -> None:
        """Switch searches to the newest committed snapshot."""
        if self._engine is not None:
            self._engine.refresh()

    # -- writes

    def _extras(self) -> dict:
        """The index's own classifier and SAM settings, so a job's new photos get tags and objects like the rest."""
        if current_snapshot(self.settings.index) is None:
            return {}
        m = Manifest.load_current(self.settings.index)
        out = {}
        if m.classifier:
            from indexer.classifier import Classifier, ClassifierConfig

            if self._classifier is None or self._classifier.config.model != m.classifier:
                emb = self.embedder()
                self._classifier = Classifier(ClassifierConfig(model=m.classifier), device=emb.device, precision=emb.precision)
            out["classifier"] = self._classifier
        if m.segmenter:
            out["segmenter"] = self.engine.segmenter
        return out

    def submit(self, folder: str, *, check_duplicates: bool = False) -> JobState:
        with self._lock:
            job = JobState(id=len(self.jobs) + 1, folder=folder, check_duplicates=check_duplicates)
            self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def cancel(self, job_id: int) -> JobState:
        """Cancel a queued job (it never starts) or a running one (it stops at its next photo; what it
        committed stays, the rest of its folder is indexed by the next job on it)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise UnknownJob(f"no job {job_id}")
            if job.state not in ("queued", "running"):
                raise JobFinished(f"job {job_id} has already ended ({job.state})")
            job.cancel.set()
            job.state = "cancelled" if job.state == "queued" else "cancelling"
        return job

    def _run_jobs(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.cancel.is_set():
                    job.state = "cancelled"
                    job.finished.set()
                    continue
                job.state, job.stage = "running", "scanning"

            def progress(done: int, total: int, job: JobState = job) -> None:
                job.done, job.total, job.stage = done, total, "indexing"
                if job.cancel.is_set():
                    raise JobCancelled(f"job {job.id} cancelled after {done} of {total} photos")

            try:
                # ids are allocated in order: the job's photos are those from the next id on
                since = Manifest.load_current(self.settings.index).next_id if current_snapshot(self.settings.index) else 1
                cfg = IndexConfig(workers=self.settings.workers, progress=False, commit_every=self.settings.commit_every,
                                  max_pixels=self.settings.max_pixels)
                stats = index_folder(job.folder, self.settings.index, self.embedder(), cfg,
                                     on_commit=lambda s, job=job: self._committed(job, s), on_progress=progress,
                                     **self._extras())
                if job.check_duplicates:
                    job.stage = "duplicates"
                    self.refresh()
                    job.duplicates = self._added_duplicates(since)
                job.indexed, job.failed, job.state = stats.indexed, stats.failed, "done"
            except JobCancelled:
                job.state = "cancelled"
            except Exception as e:  # the job reports it; the server stays up
                log.exception("index job %d failed", job.id)
                job.state, job.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
            finally:
                job.stage = None
                job.finished.set()
                self.refresh()

    def _committed(self, job: JobState, stats) -> None:
        """A job's commit: searches switch to it, and its counts say what is searchable now (not only at the end)."""
        job.indexed, job.failed = stats.indexed, stats.failed
        self.refresh()

    def _added_duplicates(self, since: int) -> list[dict]:
        """Photos a job added (ids from ``since``) that duplicate indexed ones: their candidates only, no full pass."""
        from search.duplicates import added_links

        links, _ = added_links(self.engine, since)
        return [{"id": lk.b, "duplicate_of": lk.a, "kind": lk.kind, "score": round(lk.score, 4)} for lk in links]

    def delete(self, photo_id: int) -> bool:
        engine = self.engine
        if not engine.path_of([photo_id]):
            return False
        try:
            with Writer(self.settings.index, engine.manifest, vectors=engine.vectors) as w:  # Milvus too, if it holds them
                w.delete([photo_id])
                w.commit()
        except OSError as e:  # opening the writer: a read-only or foreign-owned index directory
            raise write_error(e, self.settings.index) from None
        self.refresh()
        return True
