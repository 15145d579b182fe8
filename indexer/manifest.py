"""The manifest: everything needed to query an index the way it was built, and the names of the files it lists."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.errors import IndexFormatError, ModelMismatch
from indexer.faissio import choose_kind

if TYPE_CHECKING:
    from indexer.embedder import Embedder

FORMAT_VERSION = 2  # 1: whole snapshots (snap-N/ + CURRENT), converted in place by the next writer
GLOBAL_FILE, PATCH_FILE, MANIFEST_FILE = "global.faiss", "patches.faiss", "manifest.json"
OBJECT_FILE = "objects.faiss"
MAX_OBJECTS = 256  # per photo; object id = photo id * MAX_OBJECTS + rank

KIND_FILES = {"global": GLOBAL_FILE, "patches": PATCH_FILE, "objects": OBJECT_FILE}
KIND_FIELD = {"global": "global_kind", "patches": "patch_kind", "objects": "object_kind"}  # the manifest's kind of fresh segments


@dataclass
class Manifest:
    """Everything needed to query an index the way it was built."""

    model: str
    model_type: str
    revision: str | None
    dim: int
    patch_size: int
    num_registers: int
    resolution: int
    grid: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str
    fingerprint: list[float]  # CLS of a fixed synthetic photo (see Embedder.fingerprint)
    global_kind: str = "Flat"
    patch_kind: str = "SQ8"
    kinds_forced: tuple[str | None, str | None] = (None, None)
    next_id: int = 1
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)  # format 1 only (its snapshot's files)
    gen: int = 0  # the commit that wrote this manifest
    segments: list[dict] = field(default_factory=list)  # live segments: {seg, kinds: {kind: factory}, files: {name: digest}}
    classifier: str | None = None  # the model that made the labels, if any
    segmenter: dict | None = None  # the SAM model and settings that made the objects, if any
    store: str | None = None  # URI of an external vector store (Milvus) that also holds the vectors and serves them
    object_kind: str = "Flat"
    not_images: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> extension -> files its last scan passed over
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @classmethod
    def load(cls, path: Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> Manifest:
        """A format-1 snapshot's manifest.json (read only to convert it)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise IndexFormatError(f"{path} is missing: not a dinosearch index") from None
        except OSError as e:
            raise IndexFormatError(f"{path} is unreadable: {e}") from None
        return cls.from_json(text, str(path), versions=versions)

    @classmethod
    def from_json(cls, text: str, where: str, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise IndexFormatError(f"{where} is unreadable: {e}") from None
        if data.get("format_version") not in versions:
            raise IndexFormatError(
                f"{where}: index format {data.get('format_version')!r}, this dinosearch reads format {FORMAT_VERSION}; rebuild the index"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise IndexFormatError(f"{where}: malformed manifest ({e})") from None

    @classmethod
    def load_current(cls, root: str | os.PathLike) -> Manifest:
        """The live manifest of an index directory (a format-1 index's too: the writer converts it)."""
        from indexer.snapshot import Snapshot, format1_snapshot  # the snapshot module reads manifests

        root = Path(root).expanduser()
        old = format1_snapshot(root)
        if old is not None:
            return cls.load(old / MANIFEST_FILE, versions=(1,))
        snap = Snapshot.open(root)
        snap.close()
        return snap.manifest

    @classmethod
    def for_embedder(cls, e: Embedder, *, global_kind: str | None = None, patch_kind: str | None = None) -> Manifest:
        return cls(
            model=e.config.model, model_type=e.model_type, revision=e.config.revision, dim=e.dim,
            patch_size=e.patch_size, num_registers=e.num_registers, resolution=e.config.resolution,
            grid=e.grid, mean=e.mean, std=e.std, precision=e.precision,
            fingerprint=[round(float(v), 6) for v in e.fingerprint()],
            global_kind=global_kind or choose_kind(0, e.dim, patches=False),
            patch_kind=patch_kind or choose_kind(0, e.dim, patches=True),
            kinds_forced=(global_kind, patch_kind),
        )

    def check(self, e: Embedder) -> None:
        """Raise ModelMismatch unless ``e`` embeds exactly like the model that built this index."""
        built = f"{self.model} ({self.model_type}, dim {self.dim}, patch {self.patch_size}, {self.resolution}px)"
        given = f"{e.config.model} ({e.model_type}, dim {e.dim}, patch {e.patch_size}, {e.config.resolution}px)"
        if (self.model_type, self.dim, self.patch_size, self.resolution) != (e.model_type, e.dim, e.patch_size, e.config.resolution):
            raise ModelMismatch(f"index was built with {built} but the model given is {given}; use the same --model or a new --index")
        ref = np.asarray(self.fingerprint, np.float32)
        cos = float(ref @ e.fingerprint() / (np.linalg.norm(ref) + 1e-12))
        if cos < 0.99:
            raise ModelMismatch(
                f"index was built with {self.model} but {e.config.model} embeds differently (fingerprint cosine {cos:.3f}): "
                f"other weights or preprocessing; use the model that built the index or a new --index"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def not_images_total(self) -> dict[str, int]:
        """Files passed over as not photos, by extension, over the indexed folders (one inside another counted once)."""
        roots = [r for r in self.not_images if not any(r.startswith(o.rstrip(os.sep) + os.sep) for o in self.not_images)]
        total: dict[str, int] = {}
        for r in roots:
            for ext, n in self.not_images[r].items():
                total[ext] = total.get(ext, 0) + n
        return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))

