"""Tokenizer -> IsoFLOP sweep -> scaling fit -> pretraining (size auto), under a Prefect test server
with a real MLflow store, on the smoke preset."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from stages.presets import smoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(prefect_mlflow, tmp_path_factory):
    from flows.curation import data_fetch_flow
    from flows.pretraining import pretrain_flow, scaling_fit_flow, scaling_sweep_flow, tokenizer_flow

    cfg = smoke()
    fetched = data_fetch_flow(cfg.fetch)
    files = sorted(str(p) for p in Path(fetched["path"]).glob("*.jsonl.gz"))
    out = tmp_path_factory.mktemp("pretraining")
    p = cfg.pretraining
    tok = tokenizer_flow(files, str(out / "tokenizer"), p)
    sweep = scaling_sweep_flow(p, tok["tokens"]["path"])
    fit = scaling_fit_flow(sweep["runs_csv"], str(out / "fit"), p.fit, p.budget)
    model = pretrain_flow(p)  # size auto: the latest fit and tokens, recorded by the flows above
    return {"tok": tok, "sweep": sweep, "fit": fit, "model": model, "out": out, "cfg": cfg, "home": prefect_mlflow}


def _runs(name: str):
    return [r for r in mlflow.search_runs(experiment_names=["herd"], output_format="list", max_results=1000)
            if r.info.run_name == name]


def test_tokenizer_reports_compression_and_loads_offline(chain) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chain["tok"]["tokenizer"]["path"], local_files_only=True)
    assert len(tok) == chain["cfg"].pretraining.tokenizer.vocab_size
    comp = chain["tok"]["tokenizer"]["compression"]
    assert comp["all"]["chars_per_token"] > 1.5 and {"web", "code"} <= set(comp)
    run = _runs("tokenizer/train")[-1]
    assert run.data.metrics["chars_per_token_all"] == pytest.approx(comp["all"]["chars_per_token"])


def test_sweep_and_fit_contract(chain) -> None:
    rows = chain["sweep"]["runs"]
    assert len(rows) == 9 and all(r["loss"] > 0 for r in rows)
    assert Path(chain["sweep"]["runs_csv"]).read_text().splitlines()[0] == "N,D,C,loss"
    fit = json.loads((chain["out"] / "fit" / "fit.json").read_text())
    assert set(fit) >= {"isoflop", "parametric", "ci", "recommendation"}
    assert set(fit["isoflop"]) >= {"a", "b", "budgets"} and set(fit["recommendation"]) == {"C", "N", "D"}
    assert set(fit["parametric"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert fit["recommendation"]["C"] == chain["cfg"].pretraining.budget
    assert (chain["out"] / "fit" / "isoflop.png").stat().st_size > 10_000
    assert len(_runs("scaling/fit")) >= 1
    assert sum(r.info.run_name.startswith("sweep/") for r in mlflow.search_runs(
        experiment_names=["herd"], output_format="list", max_results=1000)) >= 9


def test_pretrain_auto_takes_the_recommendation_and_logs_everything(chain) -> None:
    model, fit = chain["model"], chain["fit"]
    n_rec = fit["recommendation"]["N"]
    assert model["size"] == "auto" and 0.7 * n_rec <= model["scaling_params"] <= 1.4 * n_rec
    assert model["heldout_loss"] and model["heldout_loss_by_source"]
    run = _runs("pretrain/train")[-1]
    assert {"final_loss", "heldout_loss", "tokens_per_s", "mfu"} <= set(run.data.metrics)
    assert any(k.startswith("heldout_loss_") for k in run.data.metrics)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"samples.md", "model"} <= arts
    assert (Path(model["model_dir"]) / "model.safetensors").exists()


def test_pretraining_logs_downstream_bpb_curves_next_to_the_loss(chain) -> None:
    """OLMo's in-loop downstream evaluation: benchmark bpb every `downstream_every` steps and at the end."""
    run = _runs("pretrain/train")[-1]
    client = mlflow.MlflowClient()
    train = chain["cfg"].pretraining.train
    for task in train.downstream_tasks:
        hist = client.get_metric_history(run.info.run_id, f"downstream/{task}/bpb")
        steps = sorted(m.step for m in hist)
        assert len(steps) >= 2 and all(s % train.downstream_every == 0 for s in steps[:-1]), (task, steps)
        assert all(0 < m.value < 50 for m in hist)
    assert client.get_metric_history(run.info.run_id, "downstream/hellaswag/acc_norm")


def test_the_pretrained_model_is_scored_with_its_separate_tokenizer(chain) -> None:
    """herd's base models keep their tokenizer apart: the pipeline's benchmarks name it."""
    from stages.errors import ConfigError
    from stages.evaluation.harness import HarnessConfig
    from tasks.evaluation import benchmark_task

    home, model, tok = chain["home"], chain["model"]["model_dir"], chain["tok"]["tokenizer"]["path"]
    cfg = HarnessConfig(tasks="piqa,lambada", limit=4)
    res = benchmark_task.fn(cfg, model, "base", str(home / "store"), str(home / "cache"), None, tokenizer=tok)
    assert set(res["tasks"]) == {"piqa", "lambada"} and res["tasks"]["piqa"]["metrics"]["bpb"] > 0
    with pytest.raises(ConfigError, match="tokenizer"):
        benchmark_task.fn(cfg, model, "base", str(home / "store"), str(home / "cache"), None)


def test_the_schedule_after_the_main_run_is_registered_stage_by_stage(chain) -> None:
    """Llama 3's schedule in the smoke preset: main (seq_len 64) -> ctx-128 -> anneal. Each stage continues the one
    before, logs its measurements and is a version of `base` tagged with its stage; the flow's model is the
    anneal's average, its last weights kept beside it."""
    model, p = chain["model"], chain["cfg"].pretraining
    stages = model["stages"]
    assert [s["stage"] for s in stages] == ["ctx-128", "anneal"] and model["context_len"] == 128
    assert model["model_dir"] == stages[-1]["model_dir"] != model["main_model_dir"]
    ctx, anneal = stages
    assert ctx["seq_len"] == 128 and set(ctx["position_loss"]["after"]) == {"0-31", "32-63", "64-95", "96-127"}
    assert set(ctx["position_loss"]["before"]) == set(ctx["position_loss"]["after"])
    assert isinstance(ctx["passed"], bool) and ctx["short_loss"] > 0 and ctx["main_short_loss"] > 0
    assert anneal["averaged"] == p.anneal.average_last and Path(anneal["last_model_dir"]).is_dir()
    assert json.loads((Path(model["model_dir"]) / "config.json").read_text())["max_position_embeddings"] == 128
    client = mlflow.MlflowClient()
    versions = {v.tags.get("herd.stage"): v for v in client.search_model_versions("name='base'")
                if v.tags.get("herd.model_dir") in (model["main_model_dir"], ctx["model_dir"], anneal["model_dir"])}
    assert set(versions) == {"main", "ctx-128", "anneal"}
    assert versions["anneal"].tags["herd.parent_model_dir"] == ctx["model_dir"]
    assert versions["ctx-128"].tags["herd.parent_model_dir"] == model["main_model_dir"]
    run = _runs("pretrain/ctx-128")[-1]
    assert {"short_loss", "main_short_loss", "position_loss_after/96-127", "position_loss_before/0-31"} <= set(
        run.data.metrics)
    assert "positions.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    arun = _runs("pretrain/anneal")[-1]
    assert {"heldout_loss", "heldout_loss_last", "short_loss_last"} <= set(arun.data.metrics)


def test_the_sweep_predicts_the_main_run_s_benchmarks_and_the_run_checks_them(chain) -> None:
    """Llama 3's two-step method: every sweep model scored on the benchmarks, fit.json's `downstream` key (the
    contract's other keys unchanged) predicting bpb and accuracy for the budget with intervals, and the main
    run measured on the same items afterwards."""
    p = chain["cfg"].pretraining
    points = json.loads((Path(chain["sweep"]["runs_csv"]).parent / "downstream.json").read_text())
    assert len(points["points"]) == 9 * len(p.downstream.tasks) and points["anchors_missing"] == list(
        p.downstream.anchors)  # no SmolLM2 imported in this home: listed, not scored
    assert all(0 < pt["bpb"] < 50 and 0 <= pt["acc"] <= 1 for pt in points["points"])
    fit = json.loads((chain["out"] / "fit" / "fit.json").read_text())
    assert set(fit) == {"isoflop", "parametric", "ci", "recommendation", "downstream"}
    down = fit["downstream"]
    assert set(down["tasks"]) == set(p.downstream.tasks) and down["target_C"] == p.budget
    for task, t in down["tasks"].items():
        v, lo, hi = t["prediction"]["bpb"]
        assert v > 0 and len(t["optimal"]) == 3 and t["step1"]["alpha"] == t["step1"]["alpha"]
        acc = t["prediction"]["acc"]  # the smoke sweep's models sit at chance and no anchor is imported here
        assert (acc is None and "anchor" in t["acc_note"]) or 0 <= acc[0] <= 1
    measured = chain["model"]["downstream"]
    assert set(measured) == set(p.downstream.tasks)
    assert down["measured"]["model_dir"] == chain["model"]["main_model_dir"]
    assert {t: m["bpb"] for t, m in down["measured"]["tasks"].items()} == {t: m["measured"]["bpb"]
                                                                            for t, m in measured.items()}
    assert (chain["out"] / "fit" / "downstream.png").stat().st_size > 10_000
    run = _runs("scaling/downstream-check")[-1]
    assert {f"{t}_bpb_predicted" for t in p.downstream.tasks} <= set(run.data.metrics)


def test_an_anneal_test_compares_anneals_with_and_without_a_dataset(chain, tmp_path) -> None:
    """`herd anneal-test`'s flow on the chain's main model: both anneals from it, benchmarked, the differences with
    intervals; an MLflow run with the dataset as an input."""
    from flows.pretraining import anneal_test_flow
    from stages.schedule import AnnealConfig, AnnealTestConfig

    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps({"text": f"Question {i}: why do llamas hum? Answer: llamas hum to keep in "
                                                f"touch with the herd, and they hum more when they are worried."})
                            + "\n" for i in range(40)))
    cfg = chain["cfg"]
    test = AnnealTestConfig(anneal=AnnealConfig(tokens=2048, average_last=2))
    res = anneal_test_flow(str(data), cfg.pretraining, test, cfg.benchmarks)
    assert res["dataset_docs"] == 40 and 0.25 < res["share"] < 0.35
    assert set(res["deltas"]) == set(res["benchmarks"]["with"]) and res["deltas"]
    for task, d in res["deltas"].items():
        key = next(k for k in d if k != "bpb")
        v, lo, hi = d[key]
        assert lo <= v <= hi
        w, wo = res["benchmarks"]["with"][task]["metrics"], res["benchmarks"]["without"][task]["metrics"]
        assert v == pytest.approx(w[key] - wo[key])
    run = _runs("pretrain/anneal-test")[-1]
    assert {"with_heldout_loss", "without_heldout_loss", "dataset_share"} <= set(run.data.metrics)
    assert "dataset" in {d.dataset.name for d in run.inputs.dataset_inputs}
