"""The curation chain: step order, the config that composes every step's config, and the registry.

Each step is a content-addressed stage: its output folder is named by
``config_hash(step name, step config, parent key)``, the parent key being the previous step's (the
ingest key hashes the ingest config and the input files' digests). Changing one filter's config
therefore recomputes only that step and the ones after it. A step whose input holds no documents does
not run; it passes an empty result on (see :func:`run_step`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from stages.common import StageConfig, config_hash, tree_sha256
from stages.curation.base import KEPT, REJECTED, ExecutorConfig, run_filter_step, shard_files, write_step_stats
from stages.curation.dedup import (
    ExactDedupConfig,
    MinHashConfig,
    SemanticDedupConfig,
    exact_dedup,
    minhash_dedup,
    semantic_dedup,
)
from stages.curation.decontam import DecontamConfig, benchmark_index, decontaminate
from stages.curation.filters import HeuristicConfig, LanguageConfig, NsfwConfig, PiiConfig, UrlFilterConfig
from stages.curation.ingest import IngestConfig
from stages.curation.quality import QualityConfig, quality_filter

log = logging.getLogger(__name__)


class CurationConfig(StageConfig):
    """Every curation step's config, in pipeline order. Each step has an ``enabled`` switch."""

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="input validation and sharding")
    url: UrlFilterConfig = Field(default_factory=UrlFilterConfig, description="1. UT1 adult URL blocklist")
    language: LanguageConfig = Field(default_factory=LanguageConfig, description="2. fastText lid.176 language ID")
    heuristics: HeuristicConfig = Field(default_factory=HeuristicConfig,
                                        description="3. Gopher quality + repetition, C4, FineWeb rules (code rules for code)")
    nsfw: NsfwConfig = Field(default_factory=NsfwConfig, description="4. bad-word density / weighted phrases")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="5. redact e-mails, IPs, phone numbers")
    exact_dedup: ExactDedupConfig = Field(default_factory=ExactDedupConfig, description="6a. exact dedup")
    near_dedup: MinHashConfig = Field(default_factory=MinHashConfig, description="6b. MinHash-LSH fuzzy dedup")
    semantic_dedup: SemanticDedupConfig = Field(default_factory=SemanticDedupConfig,
                                                description="6c. embedding-based semantic dedup")
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig,
                                          description="7. benchmark decontamination: cut evaluation 13-grams "
                                                      "(+200 characters either side) out of documents")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="8. fastText quality classifier")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig,
                                     description="datatrove executor: local (default), ray or slurm")


STEP_ORDER = ("url", "language", "heuristics", "nsfw", "pii", "exact_dedup", "near_dedup", "semantic_dedup",
              "decontaminate", "quality")


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides its config and folders.

    ``extra["benchmark_texts"]``: ``(task, item_id, text)`` items the decontaminate step uses instead of
    the standard benchmarks (tests; a held-out set of your own).
    """

    cache_dir: Path
    classifier_path: Path | None = None
    extra: dict = field(default_factory=dict)


StepFn = Callable[[CurationConfig, Path, Path, StepContext], dict]


def _filter(name: str) -> StepFn:
    def run(cfg: CurationConfig, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
        sub = getattr(cfg, name)
        return run_filter_step(lambda: sub.build(ctx.cache_dir), in_dir, out_dir, cfg.executor, name)

    return run


def _quality(cfg: CurationConfig, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    if ctx.classifier_path is None:
        raise ValueError("the quality step needs a trained classifier (StepContext.classifier_path)")
    return quality_filter(cfg.quality, ctx.classifier_path, in_dir, out_dir, cfg.executor)


def _decontaminate(cfg: CurationConfig, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    texts = ctx.extra.get("benchmark_texts")
    bench = texts if texts is not None else benchmark_index(cfg.decontaminate, ctx.cache_dir)
    return decontaminate(cfg.decontaminate, bench, in_dir, out_dir)


STEPS: dict[str, StepFn] = {
    "url": _filter("url"),
    "language": _filter("language"),
    "heuristics": _filter("heuristics"),
    "nsfw": _filter("nsfw"),
    "pii": _filter("pii"),
    "exact_dedup": lambda cfg, i, o, ctx: exact_dedup(cfg.exact_dedup, i, o),
    "near_dedup": lambda cfg, i, o, ctx: minhash_dedup(cfg.near_dedup, i, o, cfg.executor),
    "semantic_dedup": lambda cfg, i, o, ctx: semantic_dedup(cfg.semantic_dedup, i, o,
                                                            cache_dir=ctx.cache_dir / "embeddings"),
    "decontaminate": _decontaminate,
    "quality": _quality,
}


def enabled_steps(cfg: CurationConfig) -> list[str]:
    return [name for name in STEP_ORDER if getattr(getattr(cfg, name), "enabled", True)]


def ingest_key(cfg: CurationConfig, input_digest: str) -> str:
    return config_hash("ingest", cfg.ingest, input_digest)


def prepare_assets(cfg: CurationConfig, cache_dir: Path) -> dict[str, str]:
    """Fetch optional assets the enabled steps use (once, cached) and return a digest per step whose
    output depends on them, so the step's content address changes when its assets do."""
    digests: dict[str, str] = {}
    if cfg.nsfw.enabled and cfg.nsfw.e2guardian_dir is None:
        from stages.curation.assets import fetch_e2guardian

        lists = fetch_e2guardian(cache_dir)
        digests["nsfw"] = tree_sha256(lists) if lists else "no-e2guardian"
    if cfg.decontaminate.enabled:  # the benchmark items' digest: a changed benchmark set recomputes the step
        digests["decontaminate"] = benchmark_index(cfg.decontaminate, cache_dir).digest
    return digests


def step_key(cfg: CurationConfig, name: str, parent_key: str, classifier_digest: str | None = None,
             assets: dict[str, str] | None = None) -> str:
    parts = [name, getattr(cfg, name), parent_key]
    if name == "quality":
        parts.append(classifier_digest or "")
    if assets and name in assets:
        parts.append(assets[name])
    return config_hash(*parts)


def has_documents(folder: Path) -> bool:
    """Whether any shard in ``folder`` holds a non-blank line (reads at most up to the first one)."""
    import gzip

    for path in shard_files(folder):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            if any(line.strip() for line in fh):
                return True
    return False


def pass_empty(name: str, in_dir: Path, out_dir: Path) -> dict:
    """The result of a step whose input holds no documents: empty ``kept/`` and ``rejected/``, and stats saying so."""
    (out_dir / KEPT).mkdir(parents=True, exist_ok=True)
    (out_dir / REJECTED).mkdir(parents=True, exist_ok=True)
    return write_step_stats(name, in_dir, out_dir, 0.0, {"skipped": "no documents in the input: an earlier step "
                                                                    "kept none"})


def run_step(name: str, cfg: CurationConfig, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    """Run step ``name`` on ``in_dir/kept`` into ``out_dir``. A step whose input holds no documents (an earlier
    step kept none) does not run: it passes an empty result on (:func:`pass_empty`), so a run where everything
    is rejected or quarantined still ends with an empty ``kept/`` and every document in ``rejected/``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not has_documents(in_dir / KEPT):
        log.info("curation step %s: no documents in %s; passing an empty result on", name, in_dir / KEPT)
        return pass_empty(name, in_dir, out_dir)
    return STEPS[name](cfg, in_dir, out_dir, ctx)
