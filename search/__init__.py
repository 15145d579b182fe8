"""Index on disk -> answers (the read side of dinosearch)."""

from search.engine import Engine, EngineConfig, Hit, UnknownPhoto

__all__ = ["Engine", "EngineConfig", "Hit", "UnknownPhoto"]
