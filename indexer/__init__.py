"""Photos -> DINOv2 features -> FAISS indexes on disk (the write side of dinosearch)."""

from indexer.errors import (
    DinosearchError,
    IndexBusy,
    IndexFormatError,
    ModelMismatch,
    WeightsUnavailable,
)

__all__ = [
    "DinosearchError",
    "IndexBusy",
    "IndexFormatError",
    "ModelMismatch",
    "WeightsUnavailable",
]
