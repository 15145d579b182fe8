"""What the HTTP layer stands on: one Engine (one model per process), index jobs, deletes.

No search logic here: queries go to search.Engine, writes to indexer's runner and Writer.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from api.settings import Settings
from indexer.embedder import Embedder, EmbedderConfig
from indexer.errors import DinosearchError, IndexFormatError
from indexer.runner import IndexConfig, index_folder
from indexer.store import Snapshot, Writer, current_snapshot
from search import Engine, EngineConfig

log = logging.getLogger(__name__)


class NotReady(IndexFormatError):
    """The index has no committed snapshot yet."""


@dataclass
class JobState:
    id: int
    folder: str
    state: str = "queued"
    done: int = 0
    total: int = 0
    indexed: int = 0
    failed: int = 0
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)


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

    def stop(self) -> None:
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout=5)

    # -- engine

    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                model, resolution, recorded = self.settings.model, 224, None
                if current_snapshot(self.settings.index) is not None:  # the index's model, resolution and precision
                    m = Snapshot.open(self.settings.index).manifest
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
                    cfg = EngineConfig(max_pixels=self.settings.max_pixels, store=self.settings.store, nprobe=self.settings.nprobe)
                    self._engine = Engine(self.settings.index, cfg, embedder=emb)
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
        m = Snapshot.open(self.settings.index).manifest
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

    def submit(self, folder: str) -> JobState:
        with self._lock:
            job = JobState(id=len(self.jobs) + 1, folder=folder)
            self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def _run_jobs(self) -> None:
        while (job := self._queue.get()) is not None:
            job.state = "running"

            def progress(done: int, total: int, job: JobState = job) -> None:
                job.done, job.total = done, total

            try:
                cfg = IndexConfig(workers=self.settings.workers, progress=False, commit_every=self.settings.commit_every,
                                  max_pixels=self.settings.max_pixels)
                stats = index_folder(job.folder, self.settings.index, self.embedder(), cfg,
                                     on_commit=lambda _s: self.refresh(), on_progress=progress, **self._extras())
                job.indexed, job.failed, job.state = stats.indexed, stats.failed, "done"
            except Exception as e:  # the job reports it; the server stays up
                log.exception("index job %d failed", job.id)
                job.state, job.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
            finally:
                job.finished.set()
                self.refresh()

    def delete(self, photo_id: int) -> bool:
        engine = self.engine
        if not engine.path_of([photo_id]):
            return False
        with Writer(self.settings.index, engine.manifest, vectors=engine.vectors) as w:  # Milvus too, if it holds them
            w.delete([photo_id])
            w.commit()
        self.refresh()
        return True
