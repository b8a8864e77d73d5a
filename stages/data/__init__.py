"""Demo corpus fetching: the source registry (``sources``) and ``fetch_corpus`` (``fetch``)."""

from stages.data.fetch import (
    DEMO_SOURCES,
    PYPI_SOURCES,
    FetchConfig,
    FetchedSource,
    FetchResult,
    SkippedSource,
    fetch_corpus,
    smoke_fetch,
    tiny_fetch,
)
from stages.data.sources import SOURCES, SourceLabel, SourceSpec, describe_sources

__all__ = [
    "DEMO_SOURCES",
    "PYPI_SOURCES",
    "SOURCES",
    "FetchConfig",
    "FetchResult",
    "FetchedSource",
    "SkippedSource",
    "SourceLabel",
    "SourceSpec",
    "describe_sources",
    "fetch_corpus",
    "smoke_fetch",
    "tiny_fetch",
]
