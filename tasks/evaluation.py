"""Prefect task for the standard benchmarks: score a model, log it to MLflow, publish a markdown artifact.

MLflow: metrics ``eval/<task>/<metric>`` (and ``.../<metric>_stderr``; ``pass@1`` is logged as ``pass_at_1``,
since MLflow metric names cannot hold ``@``), ``results.json`` as an artifact, the model and every benchmark
file as input datasets with their digests.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task

from stages.evaluation.harness import HarnessConfig
from stages.evaluation.run import results_table, run_benchmarks
from tasks.progress import report_items
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run


def metric_key(task_name: str, metric: str) -> str:
    return f"eval/{task_name}/{metric.replace('@', '_at_')}"


def benchmark_metrics(results: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, t in results["tasks"].items():
        for m, v in t["metrics"].items():
            out[metric_key(name, m)] = float(v)
            se = t["stderr"].get(m)
            if se is not None and se == se:
                out[metric_key(name, m) + "_stderr"] = float(se)
    return out


@task(task_run_name="benchmarks-{label}")
def benchmark_task(cfg: HarnessConfig, model_dir: str, label: str, store: str, cache: str,
                   parent_run_id: str | None, model_name: str | None = None, tokenizer: str | None = None) -> dict:
    """Score ``model_dir`` (the stage ``label``: base, sft, rlhf-v1, ...) on ``cfg.tasks``; ``tokenizer`` is the
    tokenizer's folder when the model folder has none."""
    with stage_run(f"benchmarks/{label}", cfg, parent_run_id, tags={"herd.eval.stage": label,
                                                                  "herd.model_dir": model_dir}) as rid:
        res = run_benchmarks(cfg, model_dir, cache, store, model_name=model_name or model_dir,
                             progress=lambda t, d, n: report_items(f"{label} {t}", d, n), tokenizer_dir=tokenizer)
        log_dataset(f"model-{label}", model_dir, _digest(model_dir), "input")
        for name, src in res.get("benchmarks", {}).items():
            log_dataset(f"benchmark-{name}", src["uri"], src.get("items_sha256") or src.get("sha256", ""), "eval",
                        rows=src.get("items"))
        mlflow.log_metrics(benchmark_metrics(res))
        mlflow.log_dict({k: v for k, v in res.items() if k not in ("output", "cached")}, "results.json")
        mlflow.set_tag("herd.eval.output", res["output"])
    rows = results_table(res)
    secs = sum(t["seconds"] for t in res.get("timing", {}).values())
    publish_markdown(f"benchmarks-{label}".lower().replace("_", "-"),
                     f"# Benchmarks: {label}\n\nModel `{model_dir}`, {res['device']['device']} "
                     f"{res['device']['dtype']}, {secs:.0f} s{' (cached)' if res.get('cached') else ''}.\n\n"
                     f"{markdown_table(rows)}\n\nMLflow run: {run_url(rid)}\n", f"Benchmarks of {label}")
    return res | {"run_id": rid, "label": label}


def _digest(model_dir: str) -> str:
    from stages.common import tree_sha256

    return tree_sha256(Path(model_dir), "*.safetensors")
