"""Flows that compose the pretraining stages: tokenizer, IsoFLOP sweep, scaling-law fit, pretraining."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow
from prefect.futures import as_completed

from herd.settings import load_settings
from stages.common import config_hash
from stages.errors import ConfigError
from stages.presets import PretrainingConfig, tiny
from stages.scaling import FitConfig, plan_sweep, write_runs
from stages.evaluation.harness import HarnessConfig
from stages.schedule import AnnealTestConfig, stage_configs
from tasks.common import get_latest, set_latest
from tasks.mix_search import mix_search_fit_task, mix_search_plan_task, mix_search_report_task, proxy_run_task
from tasks.evaluation import benchmark_task
from tasks.pretrain import anneal_compare_task, anneal_test_task, continue_task, pretrain_task
from tasks.progress import report
from tasks.scaling import WORKERS, downstream_check_task, downstream_points_task, fit_task, sweep_run_task
from tasks.tokenizer import tokenize_task, tokenizer_task, trained_tokenizer
from tasks.tracking import parent_run


@flow(name="tokenizer")
def tokenizer_flow(inputs: list[str], output: str | None = None, config: PretrainingConfig = tiny().pretraining,
                   parent_run_id: str | None = None, tokenizer: str | None = None) -> dict:
    """Train the byte-level BPE on the mixed corpus, report compression, and write token shards.

    Args:
        inputs: The mixed corpus: folders or .jsonl(.gz) files.
        output: Folder for the tokenizer (Hugging Face format; default: under $HERD_HOME/store).
        config: The pretraining config; its `tokenizer` and `tokenize` sections are used.
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
        tokenizer: A tokenizer herd trained, to write the shards with instead of training one (the pipeline
            re-tokenizes the mixture the search chose with the tokenizer its proxies used).
    """
    s = load_settings()
    with parent_run("tokenizer", config.tokenizer, parent_run_id) as run_id:
        if tokenizer:
            tok = trained_tokenizer(tokenizer)
        else:
            tok = tokenizer_task(config.tokenizer, inputs, str(s.store), output, run_id)
            report("tokenizer", {"docs": tok["vocab_size"]})
        data = tokenize_task(config.tokenize, tok, inputs, str(s.store), run_id)
        report("tokenize", {})
    set_latest(s.home, tokenizer=tok["path"], tokens=data["path"])
    return {"tokenizer": tok, "tokens": {k: data[k] for k in ("path", "train", "heldout")}}


def _tokens(tokens: str | None) -> dict:
    s = load_settings()
    path = tokens or get_latest(s.home, "tokens")
    if not path:
        raise ValueError("no token shards: run `herd tokenizer train` (or `herd demo`) first, or pass --data")
    man = Path(path) / "manifest.json"
    if not man.is_file():
        raise ConfigError(f"{path}: no token manifest (manifest.json); pass a folder `herd tokenizer train` wrote")
    return {"path": path, "train": str(Path(path) / "train"), "heldout": str(Path(path) / "heldout"),
            "digest": json.loads(man.read_text()).get("key", "")}


def _in_workers(submits: list, width: int, progress) -> list[dict]:
    """Run task submissions in a sliding window of ``width`` at once (one sweep worker, process and core, each);
    results in completion order. ``progress(n)`` after each."""
    rows: list[dict] = []
    running: list = []

    def collect(done) -> None:
        running.remove(done)
        rows.append(done.result())
        progress(len(rows))

    for submit in submits:
        if len(running) >= width:
            collect(next(as_completed(running)))
        running.append(submit())
    for done in as_completed(list(running)):
        collect(done)
    WORKERS.stop_all()
    return rows


@flow(name="scaling-sweep")
def scaling_sweep_flow(config: PretrainingConfig = tiny().pretraining, tokens: str | None = None,
                       output: str | None = None, parent_run_id: str | None = None) -> dict:
    """IsoFLOP sweep: for each budget C, models of several sizes trained on D = C/(6N) tokens, in parallel.

    Args:
        config: The pretraining config; its `sweep`, `sweep_train` and `sweep_workers` are used.
        tokens: Folder of token shards (default: the latest the tokenizer flow wrote).
        output: Folder for runs.csv (default: under $HERD_HOME/store/scaling).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    data = _tokens(tokens)
    with parent_run("scaling-sweep", config.sweep, parent_run_id) as run_id:
        plan = plan_sweep(config.sweep)
        train = config.sweep_train.model_dump(mode="json")
        shape = {"head_dim": config.sweep.head_dim, "aspect": config.sweep.aspect}
        rows = _in_workers([lambda run=run: sweep_run_task.submit(run, train, shape, data, str(s.store), run_id)
                            for run in plan], config.sweep_workers, lambda n: report("sweep", {"docs": n}))
        rows.sort(key=lambda r: (r["C"], r["N"]))
        out = Path(output) if output else s.store / "scaling" / config_hash("sweep", config.sweep, train, data["path"])
        out.mkdir(parents=True, exist_ok=True)
        csv = out / "runs.csv"
        write_runs([(r["N"], r["D"], r["C"], r["loss"]) for r in rows], csv)
        if config.downstream.tasks:  # the two-step prediction's points: each sweep model on the benchmarks
            made_with = json.loads((Path(data["path"]) / "manifest.json").read_text()).get("tokenizer_dir") or \
                get_latest(s.home, "tokenizer")
            downstream_points_task(rows, config.downstream, made_with, str(out), str(s.cache), run_id)
            report("downstream-points", {})
    set_latest(s.home, runs_csv=str(csv))
    return {"runs_csv": str(csv), "runs": rows}


@flow(name="mix-search")
def mix_search_flow(config: PretrainingConfig = tiny().pretraining, tokens: str | None = None,
                    output: str | None = None, parent_run_id: str | None = None) -> dict:
    """Choose the data mixture by experiment (Llama 3; RegMix): small proxies trained on mixtures sampled around
    the token shards' own mixture, a regression from shares to the target, the best predicted mixture, checked by
    a proxy of its own. Writes `shares.json`, which `herd mix --shares auto` reads.

    Args:
        config: The pretraining config; its `mix_search`, `sweep` (the proxy's size), `sweep_train` and
            `sweep_workers` are used.
        tokens: Folder of token shards made from a `herd mix` output (default: the latest the tokenizer flow wrote).
        output: Folder for shares.json and mix_search.png (default: under $HERD_HOME/store/mix_search).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    data = _tokens(tokens)
    cfg = config.mix_search
    if cfg.mixtures < 1:
        raise ValueError("pretraining.mix_search.mixtures is 0: set it (or pass --mixtures) to run the search")
    budget = cfg.budget or min(config.sweep.budgets)
    made_with = json.loads((Path(data["path"]) / "manifest.json").read_text()).get("tokenizer_dir") or \
        get_latest(s.home, "tokenizer")
    shape = {"head_dim": config.sweep.head_dim, "aspect": config.sweep.aspect}
    with parent_run("mix-search", cfg, parent_run_id) as run_id:
        plan = mix_search_plan_task(cfg, data["path"], config.sweep_train.seq_len, budget,
                                    config.sweep.tokens_per_param, config.sweep.min_params)
        report("mix-search-plan", {})

        def proxy(label: str, shares: dict, weights: dict):
            train = config.sweep_train.derive(source_weights=weights, eval_tokens=plan["eval_tokens"]).model_dump(
                mode="json")
            return proxy_run_task.submit(label, shares, plan["run"], train, shape, data, str(s.store), run_id)

        runs = _in_workers([lambda k=k, m=m, w=w: proxy("prior" if k == 0 else str(k), m, w)
                            for k, (m, w) in enumerate(zip(plan["mixtures"], plan["weights"]))],
                           config.sweep_workers, lambda n: report("mix-proxy", {"docs": n}))
        order = {"prior": 0} | {str(k): k for k in range(1, len(plan["mixtures"]))}
        runs.sort(key=lambda r: order[r["label"]])
        doc = mix_search_fit_task(cfg, plan, runs, made_with, str(s.cache), run_id)
        report("mix-search-fit", {})
        chosen = None
        if cfg.validate_choice:
            chosen = proxy("chosen", doc["shares"], doc["weights"]).result()
            WORKERS.stop_all()
        out = output or str(s.store / "mix_search" / config_hash("mix-search", cfg, config.sweep_train, shape,
                                                                 data["path"]))
        res = mix_search_report_task(cfg, doc, chosen, made_with, str(s.cache), out, run_id)
        report("mix-search", {})
    set_latest(s.home, shares=res["path"])
    return res


@flow(name="scaling-fit")
def scaling_fit_flow(runs_csv: str, output: str | None = None, config: FitConfig = tiny().pretraining.fit,
                     budget: float = tiny().pretraining.budget, parent_run_id: str | None = None) -> dict:
    """IsoFLOP (Approach 2) and parametric (Approach 3) fits with bootstrap CIs; recommends N, D for `budget`.

    Args:
        runs_csv: CSV with columns N, D, C, loss (the sweep's runs.csv).
        output: Folder for fit.json and the IsoFLOP figure (default: under $HERD_HOME/store/scaling/fit).
        config: Fit settings (Huber delta, initial-guess grids, L-BFGS, bootstrap confidence intervals).
        budget: Compute budget C in FLOPs to recommend a model size N and token count D for.
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    out = output or str(s.store / "scaling" / "fit" / config_hash("fit", config, budget, Path(runs_csv).read_text()))
    with parent_run("scaling-fit", config, parent_run_id) as run_id:
        fit = fit_task(config, runs_csv, out, budget, run_id)
        report("fit", {})
    set_latest(s.home, fit=str(Path(out) / "fit.json"))
    return {"output": out, **fit}


@flow(name="pretrain")
def pretrain_flow(config: PretrainingConfig = tiny().pretraining, tokens: str | None = None,
                  fit: str | None = None, parent_run_id: str | None = None) -> dict:
    """Pretrain a Llama; size `auto` takes the latest scaling fit's recommendation for `config.budget`. Then
    Llama 3's schedule: each of `config.context_stages` continues the model at a longer context, and the anneal
    (`config.anneal`) ends it with a linear decay to zero and checkpoint averaging; every stage is registered as
    a version of `base` tagged with its stage.

    Args:
        config: The pretraining config; `size`, `budget`, `train` and `nproc` are used.
        tokens: Folder of token shards (default: the latest the tokenizer flow wrote).
        fit: A scaling fit's fit.json, used when `size` is `auto` (default: the latest fit).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    data = _tokens(tokens)
    fit_path = fit or get_latest(s.home, "fit")
    fit_obj = json.loads(Path(fit_path).read_text()) if fit_path and config.size == "auto" else None
    if fit_obj is not None and abs(fit_obj["recommendation"]["C"] - config.budget) > 1e-6 * config.budget:
        raise ValueError(f"the scaling fit at {fit_path} recommends a size for C={fit_obj['recommendation']['C']:.3g}, "
                         f"but pretraining.budget is {config.budget:.3g}: run `herd scaling fit --budget "
                         f"{config.budget:.3g}` or set the budget to match")
    # the tokenizer those shards were made with (their manifest names it), else the latest one trained
    made_with = json.loads((Path(data["path"]) / "manifest.json").read_text()).get("tokenizer_dir")
    tokenizer = {"path": made_with if made_with and Path(made_with).is_dir() else get_latest(s.home, "tokenizer") or ""}
    with parent_run("pretrain", config.train, parent_run_id) as run_id:
        t0 = time.perf_counter()
        res = pretrain_task(config.train, config.size, fit_obj, config.sweep, data, tokenizer, str(s.store),
                            config.nproc, run_id)
        res["wall_s"] = time.perf_counter() - t0
        report("pretrain", {})
        if fit_obj is not None and fit_obj.get("downstream"):  # predicted before it trained, measured now
            res["downstream"] = downstream_check_task(fit_path, res["model_dir"], tokenizer["path"],
                                                      6.0 * res["scaling_params"] * res["tokens"], str(s.cache),
                                                      run_id)
            report("downstream-check", {})
        # Llama 3's schedule: context stages, then the anneal, each continuing the model before it
        main_dir, stages = res["model_dir"], []
        for stage in stage_configs(config.train, config.context_stages, config.anneal, config.stage_probe):
            prev = stages[-1]["model_dir"] if stages else main_dir
            t0 = time.perf_counter()
            stages.append(continue_task(stage, prev, main_dir, data, tokenizer, str(s.store), run_id))
            stages[-1]["wall_s"] = time.perf_counter() - t0
            report(f"pretrain-{stage.name}", {})
    final = stages[-1]["model_dir"] if stages else main_dir
    set_latest(s.home, model=final, main_model=main_dir,
               **({"tokenizer": tokenizer["path"]} if tokenizer["path"] else {}))
    # model_dir: the base model the rest of the recipe starts from; main_model_dir: the main run's
    return {**res, "main_model_dir": main_dir, "model_dir": final, "stages": stages,
            "context_len": stages[-1]["seq_len"] if stages else config.train.seq_len}


@flow(name="anneal-test")
def anneal_test_flow(dataset: str, config: PretrainingConfig = tiny().pretraining,
                     test: AnnealTestConfig = AnnealTestConfig(), benchmarks: HarnessConfig = tiny().benchmarks,
                     model: str | None = None, tokens: str | None = None, parent_run_id: str | None = None) -> dict:
    """Judge a small new dataset as Llama 3 did: anneal a partly trained model with `test.weight` (30%) of the
    anneal drawn from `dataset`, and again without it, then compare the two on the benchmarks.

    Args:
        dataset: JSONL or JSONL.gz file of records with a `text` field.
        config: The pretraining config; its `train` (the anneal's batch and length) and `stage_probe` are used.
        test: The share on the dataset and the anneal both runs share.
        benchmarks: The benchmarks both anneals are scored on.
        model: The model to anneal (default: the latest main pretraining run's, before its context stages and
            anneal).
        tokens: Folder of token shards the rest of the anneal is drawn from (default: the latest tokenized).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    data = _tokens(tokens)
    model_dir = model or get_latest(s.home, "main_model") or get_latest(s.home, "model")
    if not model_dir:
        raise ValueError("no model to anneal: run `herd pretrain` (or `herd demo`) first, or pass --model")
    made_with = json.loads((Path(data["path"]) / "manifest.json").read_text()).get("tokenizer_dir") or \
        get_latest(s.home, "tokenizer")
    with parent_run("anneal-test", test, parent_run_id) as run_id:
        res = anneal_test_task(test, config.train, config.stage_probe, model_dir, data, dataset, made_with,
                               str(s.store), run_id)
        report("anneal-test", {})
        scored = {label: benchmark_task(benchmarks, res[label], f"anneal-{label}", str(s.store), str(s.cache),
                                        run_id, tokenizer=made_with) for label in ("with", "without")}
        report("benchmarks", {})
        deltas = anneal_compare_task(scored["with"]["tasks"], scored["without"]["tasks"], dataset, res)
    return {**res, "deltas": deltas, "benchmarks": {k: v["tasks"] for k, v in scored.items()}}
