"""Query side: answers over one committed snapshot of an index directory.

The query photo is decoded and embedded by the indexer's own reader and
embedder with the settings recorded in the manifest, so index and query can
never drift apart.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexer.embedder import Embedder, EmbedderConfig
from indexer.errors import DinosearchError
from indexer.reader import DEFAULT_MAX_PIXELS, load_query
from indexer.store import Snapshot, current_snapshot

log = logging.getLogger(__name__)


class UnknownPhoto(DinosearchError):
    """A photo id that is not in the index."""


@dataclass(frozen=True)
class Hit:
    """One ranked result."""

    photo_id: int
    path: str
    score: float  # cosine similarity to the query


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the model recorded in the manifest
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS


Query = str | os.PathLike | bytes | int


class Engine:
    """Read-only search over the live snapshot of ``index_dir``; ``refresh()`` picks up new commits."""

    def __init__(self, index_dir: str | os.PathLike, config: EngineConfig = EngineConfig(), *, embedder: Embedder | None = None):
        self.root = Path(index_dir).expanduser()
        self.config = config
        self._embedder = embedder
        self._lock = threading.Lock()
        self._load(Snapshot.open(self.root))

    def _load(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.manifest = snap.manifest
        self.db = snap.catalog()
        self.global_index = snap.global_index()
        ivf = faiss.try_extract_index_ivf(self.global_index)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by (any) id for the exact re-rank
            ivf.nprobe = min(ivf.nlist, 32)
        if self._embedder is not None:
            self.manifest.check(self._embedder)

    def refresh(self) -> bool:
        """Switch to a newer committed snapshot if there is one; True if switched."""
        live = current_snapshot(self.root)
        if live is None or live == self.snapshot.path:
            return False
        with self._lock:
            self._load(Snapshot.open(self.root))
        return True

    @property
    def embedder(self) -> Embedder:
        """The model that built the index, loaded on first use and checked against the manifest."""
        if self._embedder is None:
            m = self.manifest
            cfg = EmbedderConfig(
                model=self.config.model or m.model, revision=m.revision, resolution=m.resolution,
                device=self.config.device, precision=self.config.precision,
            )
            e = Embedder(cfg)
            m.check(e)
            self._embedder = e
        return self._embedder

    # -- catalog

    def __len__(self) -> int:
        return int(self.global_index.ntotal)

    def path_of(self, photo_ids: list[int]) -> dict[int, str]:
        if not photo_ids:
            return {}
        q = ",".join("?" * len(photo_ids))
        rows = self.db.execute(f"SELECT id, path FROM photos WHERE id IN ({q})", [int(i) for i in photo_ids])
        return {i: os.fsdecode(p) for i, p in rows}

    def photo_vector(self, photo_id: int) -> np.ndarray:
        try:
            return self.global_index.reconstruct(int(photo_id))
        except RuntimeError:
            raise UnknownPhoto(f"photo id {photo_id} is not in the index") from None

    # -- queries

    def embed_query(self, query: Query) -> np.ndarray:
        """CLS vector [D] of a query photo given as path, bytes, or an indexed photo id."""
        if isinstance(query, (int, np.integer)):
            return self.photo_vector(int(query))
        pixels, _ = load_query(query, self.manifest.resolution, self.config.max_pixels)
        return self.embedder.embed(pixels[None]).cls[0]

    def similar(self, query: Query, k: int = 10, *, allowed: set[int] | None = None) -> list[Hit]:
        """Photos most like the query (cosine on CLS), best first; ``allowed`` restricts the candidates."""
        xq = np.ascontiguousarray(self.embed_query(query)[None], dtype=np.float32)
        n = len(self)
        if k <= 0 or n == 0:
            return []
        exact = self.manifest.global_kind == "Flat"
        kk = min(n, k if exact else max(4 * k, 64))
        params = None
        if allowed is not None:
            if not allowed:
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.fromiter(allowed, np.int64)))
        with self._lock:
            D, I = self.global_index.search(xq, kk, params=params)
        ids = I[0][I[0] >= 0]
        scores = D[0][: len(ids)]
        if not exact and len(ids):  # re-rank the candidates on their stored vectors
            xb = np.stack([self.global_index.reconstruct(int(i)) for i in ids])
            scores = xb @ xq[0]
            order = np.argsort(-scores, kind="stable")
            ids, scores = ids[order], scores[order]
        ids, scores = ids[:k], scores[:k]
        paths = self.path_of(ids.tolist())
        return [Hit(int(i), paths.get(int(i), "?"), float(s)) for i, s in zip(ids, scores)]
