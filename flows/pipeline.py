"""The end-to-end pipeline: every stage flow, composed (what `make demo` and `herd demo` run)."""

from __future__ import annotations

import json
import time

import numpy as np
from pathlib import Path

from prefect import flow

from flows.alignment import preference_collect_flow, reward_models_flow, sft_base, sft_flow
from flows.curation import curation_flow, data_fetch_flow, mix_flow
from flows.rounds import alignment_round_flow
from flows.pretraining import mix_search_flow, pretrain_flow, scaling_fit_flow, scaling_sweep_flow, tokenizer_flow
from herd.settings import load_settings
from stages.presets import PipelineConfig, tiny
from tasks.evaluation import benchmark_task
from tasks.progress import report
from tasks.report import report_task
from tasks.tracking import parent_run


@flow(name="herd-pipeline")
def pipeline_flow(config: PipelineConfig = tiny()) -> dict:
    """The end-to-end pipeline: fetch -> curate -> mix -> tokenizer -> IsoFLOP sweep -> fit -> pretrain -> SFT ->
    (collect a preference batch -> annotate -> ingest -> retrain the reward models) per batch -> alignment rounds
    (RLHF-V1..V(n): retrain the RMs, rejection sampling / PPO / DPO, evaluate, register, collect the next batch).

    Args:
        config: Every stage's config (fetch, curation, mix, pretraining, sft, preferences, rewards, alignment).
    """
    s = load_settings()
    t_start = time.perf_counter()
    clock = {"t": t_start}

    def lap() -> float:  # seconds since the previous lap: each model stage's wall time
        now = time.perf_counter()
        dt, clock["t"] = now - clock["t"], now
        return dt

    def bench(model_dir: str, label: str, run_id: str, tokenizer: str | None = None) -> dict:
        res = benchmark_task(config.benchmarks, model_dir, label, str(s.store), str(s.cache), run_id,
                             tokenizer=tokenizer)
        report(f"benchmarks-{label}", {})
        return res["tasks"]

    with parent_run("herd-pipeline", config) as run_id:
        fetched = curated = mixed = tok = fit = model = search = None
        if config.sft.base != "pretrained":  # the recipe from a given base model (`herd models import NAME`): SFT on
            base_dir, base_tok = sft_base(config.sft, None, None)  # it, then the alignment half; no corpus, no pretraining
            params = _folder_params(base_dir)
            stages = [{"stage": "base", "model_dir": base_dir, "params": params, "tokens": None, "heldout_loss": None,
                       "wall_s": lap(), "benchmarks": bench(base_dir, "base", run_id, base_tok)}]
            tuned = sft_flow(config.sft, base_dir, base_tok, parent_run_id=run_id)
        else:
            fetched = data_fetch_flow(config.fetch, parent_run_id=run_id)
            curated = curation_flow([fetched["path"]], str(s.home / "curated" / config.name), config.curation,
                                    config.fetch, parent_run_id=run_id)
            mixed = mix_flow([curated["output"] + "/kept"], str(s.home / "mixed" / config.name), config.mix,
                             parent_run_id=run_id)
            p = config.pretraining
            tok = tokenizer_flow([mixed["output"]], str(s.home / "tokenizer" / config.name), p, parent_run_id=run_id)
            if p.mix_search.mixtures:  # Llama 3: the mixture chosen by proxies, re-sampled and re-tokenized with
                search = mix_search_flow(p, tok["tokens"]["path"], parent_run_id=run_id)  # the proxies' tokenizer
                mixed = mix_flow([curated["output"] + "/kept"], str(s.home / "mixed" / f"{config.name}-auto"),
                                 config.mix.derive(shares=search["shares"]), parent_run_id=run_id)
                tok = {**tokenizer_flow([mixed["output"]], None, p, parent_run_id=run_id,
                                        tokenizer=tok["tokenizer"]["path"]), "tokenizer": tok["tokenizer"]}
            if p.size == "auto":  # size from the scaling laws: IsoFLOP sweep, then the fit's recommendation
                sweep = scaling_sweep_flow(p, tok["tokens"]["path"], parent_run_id=run_id)
                fit = scaling_fit_flow(sweep["runs_csv"], str(s.home / "scaling" / config.name), p.fit, p.budget,
                                       parent_run_id=run_id)
            lap()
            model = pretrain_flow(p, tok["tokens"]["path"], str(Path(fit["output"]) / "fit.json") if fit else None,
                                  parent_run_id=run_id)
            params = model.get("total_params") or model["num_params"]
            lap()
            stages = _pretraining_rows(model, params, lambda d, label: bench(d, label, run_id, tok["tokenizer"]["path"]))
            tuned = sft_flow(config.sft, model["model_dir"], tok["tokenizer"]["path"], parent_run_id=run_id)
        stages.append({"stage": "sft", "model_dir": tuned["model_dir"], "params": params,
                       "tokens": _sft_tokens(tuned), "heldout_loss": tuned["heldout_loss"], "wall_s": lap(),
                       "benchmarks": bench(tuned["model_dir"], "sft", run_id)})
        rounds = []
        for k in range(config.preferences.batches):  # the weekly loop: collect, annotate, ingest, retrain RMs
            preference_collect_flow(config.preferences, tuned["model_dir"], batch_index=k + 1, parent_run_id=run_id)
            rounds.append(reward_models_flow(config.rewards, tuned["model_dir"], parent_run_id=run_id))
        lap()
        aligned = []
        for _ in range(config.alignment.rounds):  # RLHF-V1..V(n), each one weekly round
            a = alignment_round_flow(config.alignment, config.rewards, config.preferences,
                                     benchmarks=config.benchmarks, parent_run_id=run_id)
            aligned.append(a)
            stages.append(_round_stage(a, params, lap()))
        if aligned:  # SFT's alignment numbers: the first round's baseline
            base_sft = aligned[0]["evaluation"]["baselines"].get("sft") or {}
            next(r for r in stages if r["stage"] == "sft").update(
                violation_rate=_rate(base_sft.get("violation")), false_refusal_rate=_rate(base_sft.get("false_refusal")))
        card = report_task(stages, run_id, config.name, _contamination(curated["output"]) if curated else {},
                           time.perf_counter() - t_start, str(s.home), (model or {}).get("downstream"),
                           _search_summary(search) if search else None)
        report("report-card", {})
    return {"fetch": {"path": fetched["path"], "docs": fetched["docs"]} if fetched else None, "curation": curated,
            "mix": {k: mixed[k] for k in ("output", "key")} if mixed else None,
            "mix_search": _search_summary(search) if search else None,
            "tokenizer": {"path": tok["tokenizer"]["path"], "compression": tok["tokenizer"]["compression"]} if tok
            else None,
            "scaling": {k: fit[k] for k in ("output", "isoflop", "parametric", "ci", "recommendation")} if fit else None,
            "pretrain": {k: model[k] for k in ("size", "num_params", "scaling_params", "tokens", "final_loss",
                                               "heldout_loss", "heldout_loss_by_source", "tokens_per_s", "mfu",
                                               "model_dir", "main_model_dir", "context_len", "stages")}
                         | {"downstream": model.get("downstream")}
            if model else None,
            "base_model": next(r["model_dir"] for r in stages if r["stage"] == "base"),
            "sft": {k: tuned[k] for k in ("model_dir", "steps", "final_loss", "heldout_loss", "tokens")},
            "reward_rounds": [{"batches": r["batches"], "new_batches": r["new_batches"],
                               "staleness": {c: [{"batch_id": x["batch_id"], "accuracy": x["accuracy"]} for x in v]
                                             for c, v in r["staleness"].items()},
                               "reward_models": {c: {"version": m["version"], "heldout_accuracy": m["heldout"]["accuracy"],
                                                     "by_rating": {k: v["accuracy"] for k, v in
                                                                   m["heldout"]["by_rating"].items()}}
                                                 for c, m in r["reward_models"].items()}} for r in rounds],
            "alignment": [round_summary(a) for a in aligned],
            "report": {"path": card["path"], "markdown": card["markdown"]}}


def _search_summary(search: dict) -> dict:
    keys = ("path", "shares", "prior", "predicted", "measured", "prior_predicted", "prior_measured", "spearman_loo",
            "beats_prior", "proxy_run", "tokens")
    return {k: search.get(k) for k in keys} | {"proxies": [{"shares": r["shares"], "target": r["target"]}
                                                           for r in search["proxies"]]}


def _pretraining_rows(model: dict, params: int, bench) -> list[dict]:
    """Report-card rows of pretraining: the main run and each stage after it (context stages; the anneal's last
    weights beside their average), each benchmarked, ending with ``base``: the model the recipe goes on from.
    Held-out loss is at the main run's sequence length in every row (a longer window lowers it by itself)."""
    stages = model.get("stages") or []
    rows = []
    if stages:
        rows.append({"stage": "main", "model_dir": model["main_model_dir"], "params": params,
                     "tokens": model["tokens"], "heldout_loss": model["heldout_loss"], "wall_s": model.get("wall_s"),
                     "benchmarks": bench(model["main_model_dir"], "main")})
        for st in stages[:-1]:
            rows.append({"stage": st["stage"], "model_dir": st["model_dir"], "params": params, "tokens": st["tokens"],
                         "heldout_loss": st["short_loss"], "wall_s": st.get("wall_s"),
                         "benchmarks": bench(st["model_dir"], st["stage"])})
        last = stages[-1]
        if last.get("last_model_dir"):
            label = f"{last['stage']}-last"
            rows.append({"stage": label, "model_dir": last["last_model_dir"], "params": params,
                         "tokens": last["tokens"], "heldout_loss": last["short_loss_last"], "wall_s": None,
                         "benchmarks": bench(last["last_model_dir"], label)})
    tokens = model["tokens"] + sum(st["tokens"] for st in stages)
    rows.append({"stage": "base", "model_dir": model["model_dir"], "params": params, "tokens": tokens,
                 "heldout_loss": stages[-1]["short_loss"] if stages else model["heldout_loss"],
                 "wall_s": (stages[-1] if stages else model).get("wall_s"),
                 "benchmarks": bench(model["model_dir"], "base")})
    return rows


def _rate(r: dict | None) -> list[float] | None:
    return [r["rate"], r["ci_low"], r["ci_high"]] if r and "rate" in r else None


def _round_stage(a: dict, params: int, wall_s: float) -> dict:
    ev = a["evaluation"]
    judge = ev["vs"]["sft"]["judge"] if "sft" in ev["vs"] else None
    return {"stage": f"rlhf-v{a['round']}", "model_dir": a["policy"], "params": params, "tokens": None,
            "heldout_loss": None, "wall_s": wall_s, "benchmarks": a["benchmarks"]["tasks"],
            "judge_win_vs_sft": [judge["win_rate"], judge["ci_low"], judge["ci_high"]] if judge else None,
            "violation_rate": _rate(ev["policy"].get("violation")),
            "false_refusal_rate": _rate(ev["policy"].get("false_refusal")),
            "algorithms": a["algorithms"], "champion": a["registered"].get("champion")}


def _folder_params(model_dir: str) -> int:
    """Parameters of a saved model, from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                shape = h.get_slice(key).get_shape()
                n += int(np.prod(shape)) if shape else 1
    return n


def _sft_tokens(tuned: dict) -> int | None:
    train = (tuned.get("tokens") or {}).get("train") or {}
    n = train.get("tokens") or train.get("scored_tokens")
    return int(n) if n else None


def _contamination(curated: str) -> dict:
    path = Path(curated) / "report.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("contamination") or {}


def round_summary(r: dict) -> dict:
    """The numbers of one alignment round the demo prints: win rates, safety violations, KL."""
    ev = r["evaluation"]
    return {"round": r["round"], "algorithms": r["algorithms"], "policy_version": r["registered"]["version"],
            "champion": r["registered"]["champion"], "reward_models": r["reward_models"],
            "win_rates": {vs: {j: [round(w[j]["win_rate"], 3), round(w[j]["ci_low"], 3), round(w[j]["ci_high"], 3)]
                               for j in ("judge", "rm")} for vs, w in ev["vs"].items()},
            "violation_rate": round(ev["policy"]["violation"]["rate"], 3),
            "false_refusal_rate": round(ev["policy"]["false_refusal"]["rate"], 3),
            "helpfulness": ev["policy"]["helpfulness"], "signals": {k: round(v, 3) for k, v in ev["signals"].items()},
            "steps": r["steps"]}
