"""The curation flows under a real Prefect server (test harness) with a real MLflow store.

Runs fetch -> curate on the smoke preset and asserts what landed in MLflow (nested runs, params,
metrics, datasets, the registered classifier) and in Prefect (artifacts, cached task states), that a
rerun reuses every stage, and that changing one filter recomputes only it and the steps after it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import mlflow
import pytest

from stages.curation.base import REASONS
from stages.curation.pipeline import STEP_ORDER, enabled_steps
from stages.presets import smoke

pytestmark = pytest.mark.slow


def _lines(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(p, "rt") as fh:
            out += [json.loads(x) for x in fh if x.strip()]
    return out


def _key_dirs(home: Path, step: str) -> set[str]:
    d = home / "store" / "curation" / step
    return {p.name for p in d.iterdir() if not p.name.startswith(".")} if d.exists() else set()


@pytest.fixture(scope="module")
def first_run(prefect_mlflow, tmp_path_factory):
    from flows.curation import curation_flow, data_fetch_flow

    cfg = smoke()
    fetched = data_fetch_flow(cfg.fetch)
    out = tmp_path_factory.mktemp("curated") / "out"
    bad = tmp_path_factory.mktemp("raw") / "broken.jsonl"
    bad.write_text('{"id": "broken-1", "text": "cut off\n{"id": 5}\n')
    result = curation_flow([fetched["path"], str(bad)], str(out), cfg.curation, cfg.fetch)
    return {"home": prefect_mlflow, "fetched": fetched, "out": out, "result": result, "cfg": cfg, "bad": bad}


def test_output_layout_and_nothing_lost(first_run) -> None:
    out = first_run["out"]
    report = json.loads((out / "report.json").read_text())
    kept, rejected = _lines(out / "kept"), _lines(out / "rejected")
    quarantined = (out / "quarantine" / "quarantine.jsonl").read_text().splitlines()
    c = report["counts"]
    assert c["input_lines"] == first_run["fetched"]["docs"] + 2
    assert c["input_lines"] == len(kept) + len(rejected) + len(quarantined)
    assert (c["kept"], c["rejected"], c["quarantined"]) == (len(kept), len(rejected), 2)
    assert {r["reason"] for r in rejected} <= set(REASONS)
    assert all(r["id"] and r["text"] for r in rejected)
    assert {"id", "text", "url", "source", "metadata"} <= set(kept[0])
    # the demo corpus contains non-English fortunes and junk: real drops must happen
    assert report["reasons"].get("language", 0) > 0
    assert sum(report["reasons"].values()) == len(rejected)
    q = [json.loads(x) for x in quarantined]
    assert {(Path(r["file"]).name, r["line"]) for r in q} == {("broken.jsonl", 1), ("broken.jsonl", 2)}


def test_mlflow_has_a_nested_run_per_stage_with_lineage(first_run) -> None:
    runs = mlflow.search_runs(experiment_names=["herd"], output_format="list", max_results=500)
    parents = [r for r in runs if r.info.run_name == "curation"]
    assert parents, "no parent run for the curation flow"
    parent = parents[-1]
    assert parent.data.tags.get("prefect.flow_run_id")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    expected = {"curate/ingest", *(f"curate/{s}" for s in enabled_steps(first_run["cfg"].curation)), "curate/report"}
    assert expected <= set(children), f"missing stage runs: {expected - set(children)}"
    heur = children["curate/heuristics"]
    assert any(k.startswith("gopher") or "." in k for k in heur.data.params), heur.data.params
    assert heur.data.metrics["in"] == heur.data.metrics["kept"] + heur.data.metrics["rejected"]
    ctx = {(i.dataset.name, t.value) for i in heur.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert ("heuristics", "output") in ctx and ("language", "input") in ctx
    # lineage: the report run's output digest equals the curated folder's, its inputs chain back to the raw files
    report_run = children["curate/report"]
    digests = {i.dataset.name: i.dataset.digest for i in report_run.inputs.dataset_inputs}
    assert "curated" in digests and "ingest" in digests
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(report_run.info.run_id)}
    assert {"report.json", "curation_funnel.png"} <= artifacts
    ingest_inputs = {i.dataset.name for i in children["curate/ingest"].inputs.dataset_inputs}
    assert "broken.jsonl" in ingest_inputs


def test_quality_classifier_registered_with_metrics(first_run) -> None:
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='herd-quality-classifier'")
    assert versions
    run = client.get_run(versions[0].run_id)
    assert 0.5 < run.data.metrics["precision"] <= 1.0
    assert 0.5 < run.data.metrics["recall"] <= 1.0


def test_prefect_artifacts_published(first_run) -> None:
    from prefect import get_client

    import anyio

    async def read():
        async with get_client() as client:
            return await client.read_artifacts()

    keys = {a.key for a in anyio.run(read)}
    assert {"curation-report", "curation-heuristics", "data-fetch"} <= keys


def test_rerun_reuses_every_stage_and_one_change_recomputes_only_downstream(first_run) -> None:
    from flows.curation import curation_flow

    home, cfg = first_run["home"], first_run["cfg"]
    before = {s: _key_dirs(home, s) for s in ("ingest", *STEP_ORDER)}
    state = curation_flow([first_run["fetched"]["path"], str(first_run["bad"])], str(first_run["out"]) + "-again",
                          cfg.curation, cfg.fetch, return_state=True)
    assert state.is_completed()
    after = {s: _key_dirs(home, s) for s in ("ingest", *STEP_ORDER)}
    assert before == after, "a rerun with the same config and inputs must not compute anything"
    again = json.loads((Path(str(first_run["out"]) + "-again") / "report.json").read_text())
    assert again["kept_sha256"] == json.loads((first_run["out"] / "report.json").read_text())["kept_sha256"]

    changed = cfg.curation.derive(nsfw=cfg.curation.nsfw.derive(max_badword_density=0.01).model_dump())
    curation_flow([first_run["fetched"]["path"], str(first_run["bad"])], str(first_run["out"]) + "-nsfw", changed,
                  cfg.fetch)
    final = {s: _key_dirs(home, s) for s in ("ingest", *STEP_ORDER)}
    i = STEP_ORDER.index("nsfw")
    for step in ("ingest", *STEP_ORDER[:i]):
        assert final[step] == after[step], f"{step} was recomputed although nothing before it changed"
    for step in STEP_ORDER[i:]:
        if step in enabled_steps(changed):
            assert len(final[step]) == len(after[step]) + 1, f"{step} should have been recomputed"


def test_mix_flow_hits_target_shares_and_records_lineage(first_run, tmp_path: Path) -> None:
    from flows.curation import mix_flow

    cfg = first_run["cfg"].mix.derive(tokens=1_000_000, missing_sources="renormalise")  # smoke has no Q&A source
    res = mix_flow([str(first_run["out"])], str(tmp_path / "mixed"), cfg)
    table = json.loads((tmp_path / "mixed" / "table.json").read_text())
    assert table["sources"] and all(abs(r["realised_share"] - r["target_share"]) <= 0.005 for r in table["sources"])
    assert _lines(tmp_path / "mixed" / "data")
    run = [r for r in mlflow.search_runs(experiment_names=["herd"], output_format="list") if r.info.run_name == "mix"][0]
    ctx = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert ctx == {"input", "output"} and res["output"] == str(tmp_path / "mixed")
