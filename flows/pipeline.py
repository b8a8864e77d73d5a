"""The end-to-end pipeline: every stage flow, composed (what `make demo` and `herd demo` run)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.alignment import preference_collect_flow, reward_models_flow, sft_flow
from flows.curation import curation_flow, data_fetch_flow, mix_flow
from flows.rounds import alignment_round_flow
from flows.pretraining import pretrain_flow, scaling_fit_flow, scaling_sweep_flow, tokenizer_flow
from herd.settings import load_settings
from stages.presets import PipelineConfig, tiny
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
    with parent_run("herd-pipeline", config) as run_id:
        fetched = data_fetch_flow(config.fetch, parent_run_id=run_id)
        curated = curation_flow([fetched["path"]], str(s.home / "curated" / config.name), config.curation, config.fetch,
                                parent_run_id=run_id)
        mixed = mix_flow([curated["output"] + "/kept"], str(s.home / "mixed" / config.name), config.mix,
                         parent_run_id=run_id)
        p = config.pretraining
        tok = tokenizer_flow([mixed["output"]], str(s.home / "tokenizer" / config.name), p, parent_run_id=run_id)
        fit = None
        if p.size == "auto":  # size from the scaling laws: IsoFLOP sweep, then the fit's recommendation
            sweep = scaling_sweep_flow(p, tok["tokens"]["path"], parent_run_id=run_id)
            fit = scaling_fit_flow(sweep["runs_csv"], str(s.home / "scaling" / config.name), p.fit, p.budget,
                                   parent_run_id=run_id)
        model = pretrain_flow(p, tok["tokens"]["path"], str(Path(fit["output"]) / "fit.json") if fit else None,
                              parent_run_id=run_id)
        tuned = sft_flow(config.sft, model["model_dir"], tok["tokenizer"]["path"], parent_run_id=run_id)
        rounds = []
        for k in range(config.preferences.batches):  # the weekly loop: collect, annotate, ingest, retrain RMs
            preference_collect_flow(config.preferences, tuned["model_dir"], batch_index=k + 1, parent_run_id=run_id)
            rounds.append(reward_models_flow(config.rewards, tuned["model_dir"], parent_run_id=run_id))
        aligned = [alignment_round_flow(config.alignment, config.rewards, config.preferences, parent_run_id=run_id)
                   for _ in range(config.alignment.rounds)]  # RLHF-V1..V(n), each one weekly round
    return {"fetch": {"path": fetched["path"], "docs": fetched["docs"]}, "curation": curated,
            "mix": {k: mixed[k] for k in ("output", "key")},
            "tokenizer": {"path": tok["tokenizer"]["path"], "compression": tok["tokenizer"]["compression"]},
            "scaling": {k: fit[k] for k in ("output", "isoflop", "parametric", "ci", "recommendation")} if fit else None,
            "pretrain": {k: model[k] for k in ("size", "num_params", "scaling_params", "tokens", "final_loss", "heldout_loss",
                                               "heldout_loss_by_source", "tokens_per_s", "mfu", "model_dir")},
            "sft": {k: tuned[k] for k in ("model_dir", "steps", "final_loss", "heldout_loss", "tokens")},
            "reward_rounds": [{"batches": r["batches"], "new_batches": r["new_batches"],
                               "staleness": {c: [{"batch_id": x["batch_id"], "accuracy": x["accuracy"]} for x in v]
                                             for c, v in r["staleness"].items()},
                               "reward_models": {c: {"version": m["version"], "heldout_accuracy": m["heldout"]["accuracy"],
                                                     "by_rating": {k: v["accuracy"] for k, v in
                                                                   m["heldout"]["by_rating"].items()}}
                                                 for c, m in r["reward_models"].items()}} for r in rounds],
            "alignment": [round_summary(a) for a in aligned]}


def round_summary(r: dict) -> dict:
    """The numbers of one alignment round the demo prints: win rates, safety violations, KL."""
    ev = r["evaluation"]
    return {"round": r["round"], "algorithms": r["algorithms"], "policy_version": r["registered"]["version"],
            "champion": r["registered"]["champion"], "reward_models": r["reward_models"],
            "win_rates": {vs: {j: [round(w[j]["win_rate"], 3), round(w[j]["ci_low"], 3), round(w[j]["ci_high"], 3)]
                               for j in ("judge", "rm")} for vs, w in ev["vs"].items()},
            "violation_rate": round(ev["policy"]["violation"]["rate"], 3),
            "helpfulness": ev["policy"]["helpfulness"], "signals": {k: round(v, 3) for k, v in ev["signals"].items()},
            "steps": r["steps"]}
