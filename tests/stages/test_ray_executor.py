"""The same curation step on a local Ray instance: moving to a Ray cluster is one setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.curation.base import KEPT, ExecutorConfig, ExecutorKind, iter_shard_records, run_filter_step
from stages.curation.filters import HeuristicConfig
from stages.curation.ingest import IngestConfig, ingest

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def _docs() -> list[dict]:
    """Real documents: the evals wheel's c4/openwebtext/wikipedia/quotes/random-word samples."""
    from tests.stages._corpora import text_compression_samples

    return [{"id": f"d{i:03d}", "text": r["text"], "source": "web"} for i, r in enumerate(text_compression_samples())
            if isinstance(r.get("text"), str) and r["text"].strip()][:200]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_heuristics_step_on_ray_matches_local(local_ray, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    ingest(IngestConfig(shards=2), [src], tmp_path / "ingest")
    cfg = HeuristicConfig()
    results = {}
    for kind in (ExecutorKind.local, ExecutorKind.ray):
        out = tmp_path / kind.value
        stats = run_filter_step(lambda: cfg.build(tmp_path / "cache"), tmp_path / "ingest", out,
                                ExecutorConfig(kind=kind, tasks=2, workers=2), "heuristics")
        results[kind] = (stats, sorted(r["id"] for r in iter_shard_records(out / KEPT)))
    local, on_ray = results[ExecutorKind.local], results[ExecutorKind.ray]
    assert on_ray[1] == local[1]
    assert on_ray[0]["reasons"] == local[0]["reasons"]
    assert on_ray[0]["kept"] > 20 and on_ray[0]["reasons"].get("gopher_quality", 0) > 20
