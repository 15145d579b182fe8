"""Index on disk -> answers (the read side of dinosearch)."""

from search.engine import Engine, EngineConfig, Hit, UnknownLabel, UnknownPhoto

__all__ = ["Engine", "EngineConfig", "Hit", "UnknownLabel", "UnknownPhoto"]
