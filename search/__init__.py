"""Index on disk -> answers (the read side of dinosearch)."""

from search.engine import Engine, EngineConfig, Hit, PhotoInfo, SearchResult, UnknownLabel, UnknownPhoto
from search.query import BadQuery, Example, Filters, SearchQuery

__all__ = ["BadQuery", "Engine", "EngineConfig", "Example", "Filters", "Hit", "PhotoInfo", "SearchQuery", "SearchResult",
           "UnknownLabel", "UnknownPhoto"]
