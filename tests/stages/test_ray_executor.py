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

WORDS = ("the river ran past the old mill and the children of the village watched the water turn the wheel "
         "while their parents worked in the fields until the evening bell rang across the valley").split()


def _docs(n: int) -> list[dict]:
    docs = []
    for i in range(n):
        if i % 3 == 0:  # too short for Gopher quality
            text = "Buy now. Click here."
        else:
            sents = [" ".join(WORDS[(i + j) % 7:(i + j) % 7 + 12]).capitalize() + "." for j in range(8)]
            text = "\n".join(" ".join(sents[k:k + 2]) for k in range(0, 8, 2))
        docs.append({"id": f"d{i:03d}", "text": text, "source": "web"})
    return docs


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_heuristics_step_on_ray_matches_local(local_ray, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in _docs(60)))
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
    assert on_ray[0]["reasons"] == local[0]["reasons"] and on_ray[0]["reasons"].get("gopher_quality", 0) >= 20
