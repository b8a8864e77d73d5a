"""Prefect tasks of the mixture search (``herd mix-search``): plan, one proxy per mixture (in the sweep's
workers), the regression, and the chosen mixture's own proxy with ``shares.json``."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task

from stages.common import file_sha256
from stages.downstream import DownstreamFitConfig, score_models
from stages.mix_search import MixSearchConfig, plan_search, summarize_search, with_chosen_proxy, write_shares
from tasks.scaling import train_in_worker
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run


@task(task_run_name="mix-search-plan")
def mix_search_plan_task(cfg: MixSearchConfig, tokens_dir: str, seq_len: int, budget: float, tokens_per_param: float,
                         min_params: float) -> dict:
    return plan_search(cfg, tokens_dir, seq_len, budget, tokens_per_param, min_params)


@task(task_run_name="mix-proxy-{label}")
def proxy_run_task(label: str, shares: dict, run: dict, train: dict, shape: dict, data: dict, store: str,
                   parent_run_id: str | None) -> dict:
    """One proxy: the sweep's smallest model trained on ``shares`` (window weights in ``train``)."""
    out, res = train_in_worker(run, train, shape, data, store)
    with stage_run(f"mix-search/proxy-{label}", None, parent_run_id):
        mlflow.log_params({f"share_{s}": round(v, 4) for s, v in shares.items()} | {"N": res["N"], "D": res["tokens"]})
        mlflow.log_metrics({"loss": res["loss"]} | {f"loss_{s}": v for s, v in res.get("loss_by_source", {}).items()})
        log_dataset("tokens-train", data["train"], data.get("digest", ""), "input")
    return {"label": label, "model_dir": str(out / "train" / "model"), "loss": res["loss"],
            "loss_by_source": res.get("loss_by_source", {}), "N": res["N"], "tokens": res["tokens"]}


def _bpb(cfg: MixSearchConfig, proxies: list[dict], tokenizer_dir: str, cache: str) -> list[dict]:
    """Each proxy with its benchmark bpb (the same seeded items for all)."""
    if not cfg.tasks:
        return [{**p, "bpb": {}} for p in proxies]
    scored, _ = score_models([(p["model_dir"], p["model_dir"], tokenizer_dir) for p in proxies],
                             DownstreamFitConfig(tasks=cfg.tasks, items=cfg.items, seed=cfg.seed), cache)
    return [{**p, "bpb": {s["task"]: s["bpb"] for s in scored if s["label"] == p["model_dir"]}} for p in proxies]


@task(task_run_name="mix-search-fit")
def mix_search_fit_task(cfg: MixSearchConfig, plan: dict, proxies: list[dict], tokenizer_dir: str, cache: str,
                        parent_run_id: str | None) -> dict:
    """Score the proxies, fit the regression, choose the mixture (``shares.json`` less the chosen proxy)."""
    with stage_run("mix-search/fit", cfg, parent_run_id):
        doc = summarize_search(cfg, plan, _bpb(cfg, proxies, tokenizer_dir, cache))
        mlflow.log_metrics({"spearman_loo": doc["spearman_loo"], "predicted": doc["predicted"],
                            "prior_predicted": doc["prior_predicted"], "prior_measured": doc["prior_measured"]}
                           | {f"share_{s}": v for s, v in doc["shares"].items()})
    return doc


@task(task_run_name="mix-search-report")
def mix_search_report_task(cfg: MixSearchConfig, doc: dict, chosen: dict | None, tokenizer_dir: str, cache: str,
                           out_dir: str, parent_run_id: str | None) -> dict:
    """Measure the chosen mixture's proxy, write ``shares.json`` and ``mix_search.png``, publish the table."""
    with stage_run("mix-search/chosen", cfg, parent_run_id) as rid:
        if chosen is not None:
            doc = with_chosen_proxy(cfg, doc, _bpb(cfg, [chosen], tokenizer_dir, cache)[0])
            mlflow.log_metrics({"measured": doc["measured"], "beats_prior": float(doc["beats_prior"])})
        path = write_shares(Path(out_dir), doc)
        mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(Path(out_dir) / "mix_search.png"))
        log_dataset("mixture-table", doc["mixture_table"], file_sha256(doc["mixture_table"]), "input")
    rows = [{"source": s, "prior": f"{doc['prior'][s]:.3f}", "chosen": f"{doc['shares'][s]:.3f}",
             "cap": f"{doc['caps'][s]:.3f}"} for s in doc["shares"]]
    measured = "not trained" if doc["measured"] is None else f"{doc['measured']:.4f}"
    publish_markdown("mix-search", f"# Mixture chosen by experiment\n\n{markdown_table(rows)}\n\n"
                     f"{len(doc['proxies'])} proxies (N={doc['proxy_run']['N']:,}, C={doc['proxy_run']['C']:.2g}); "
                     f"leave-one-out Spearman {doc['spearman_loo']:.2f}. Target (lower is better): prior "
                     f"{doc['prior_measured']:.4f} measured; chosen {doc['predicted']:.4f} predicted, {measured} "
                     f"measured.\n\n`{path}`\n\nMLflow run: {run_url(rid)}\n", "the mixture chosen by experiment")
    return {**doc, "path": str(path)}
