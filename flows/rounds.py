"""The weekly alignment round (Llama 2 section 3.2.3): new preferences in, a better policy out.

ingest the inbox -> RM staleness on the new batches, retrain both RMs -> RLHF-V(n) from V(n-1) by the
round's algorithms -> evaluate against V(n-1), SFT and the champion -> register ``policy`` v(n) ->
collect the next batch to annotate from V(n).
"""

from __future__ import annotations

from prefect import flow

from flows.alignment import preference_collect_flow, reward_models_flow
from herd.settings import load_settings
from stages.alignment import AlignmentConfig
from stages.collect import PreferenceLoopConfig
from stages.evaluation.harness import HarnessConfig
from stages.presets import tiny
from stages.preferences import batch_dirs
from stages.reward import RewardsConfig
from tasks.alignment import evaluate_task, policy_step_task, register_policy_task, round_state_task
from tasks.common import get_latest, set_latest
from tasks.evaluation import benchmark_task
from tasks.progress import report
from tasks.tracking import parent_run


@flow(name="alignment-round")
def alignment_round_flow(config: AlignmentConfig = tiny().alignment, rewards: RewardsConfig = tiny().rewards,
                         preferences: PreferenceLoopConfig = tiny().preferences, round: int | None = None,  # noqa: A002
                         benchmarks: HarnessConfig = tiny().benchmarks, parent_run_id: str | None = None) -> dict:
    """One alignment round: ingest new preference batches, retrain the reward models, produce RLHF-V(n) with the
    scheduled algorithms (rejection sampling, PPO, DPO), evaluate it against V(n-1), SFT and the champion, register it
    as `policy` (alias rlhf-v<n>; `champion` when `config.champion`'s rule says so: the judge's win interval above
    50% and no significant rise in safety violations or false refusals) and collect the next batch from it.
    ``round`` defaults to the registry's newest round + 1.

    Args:
        config: The alignment schedule (algorithms per round), rejection sampling, PPO, DPO, evaluation and the
            champion rule.
        rewards: The helpfulness and safety reward-model configs.
        preferences: How the next batch is collected and (simulated) annotated.
        round: Round n to run (default: the `policy` registry's newest round + 1).
        benchmarks: Standard benchmarks scored on RLHF-V(n) (the report card's row; `limit` items per task).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    sft_model, sft_data = get_latest(s.home, "sft_model"), get_latest(s.home, "sft_data")
    if not sft_model or not sft_data:
        raise ValueError("no SFT model: run `herd sft` (or `herd demo`) before an alignment round")
    with parent_run("alignment-round", config, parent_run_id) as run_id:
        state = round_state_task(round, sft_model)
        n, parent = state["round"], state["parent"]
        rms = reward_models_flow(rewards, sft_model, parent_run_id=run_id)
        report("reward-models", {})
        rm_dirs = {c: m["model_dir"] for c, m in rms["reward_models"].items()}
        batches = [str(d) for d in batch_dirs(s.preferences)]
        policy, steps = parent["model_dir"], []
        for algorithm in config.algorithms(n):
            step = policy_step_task(algorithm, config, policy, n, rm_dirs, sft_data, preferences.collect, batches,
                                    state["pooled"], str(s.store), run_id)
            steps.append(step)
            policy = step["model_dir"]
            report(f"v{n}-{algorithm.value}", {})
        baselines = {"previous": parent["model_dir"], "sft": sft_model}
        champion = state["champion"]
        if champion and champion["model_dir"] not in baselines.values():
            baselines["champion"] = champion["model_dir"]
        baselines = {k: v for k, v in baselines.items() if not (k == "previous" and n == 1)}
        evaluation = evaluate_task(config, n, policy, baselines, rm_dirs, sft_data, preferences.collect, sft_model,
                                   str(s.store), run_id)
        if champion and "champion" not in evaluation["vs"]:  # the champion is SFT or the previous version
            key = "previous" if champion["model_dir"] == parent["model_dir"] else "sft"
            evaluation["vs"]["champion"] = evaluation["vs"][key]
            evaluation["baselines"]["champion"] = evaluation["baselines"][key]
        report("evaluate", {})
        bench = benchmark_task(benchmarks, policy, f"rlhf-v{n}", str(s.store), str(s.cache), run_id)
        report("benchmarks", {})
        registered = register_policy_task(n, policy, steps, parent, champion, evaluation, rms["reward_models"],
                                          batches, config.evaluation.generation.max_new_tokens, config.champion,
                                          run_id)
        set_latest(s.home, policy=policy, policy_round=str(n))
        collected = None
        if config.collect_next:
            collected = preference_collect_flow(preferences, policy, parent_run_id=run_id)
            report("collect-next", {})
    return {"round": n, "policy": policy, "parent": parent, "algorithms": [st["algorithm"] for st in steps],
            "steps": [{"algorithm": st["algorithm"], "metrics": st["metrics"]} for st in steps],
            "registered": registered,
            "evaluation": {k: evaluation[k] for k in ("policy", "baselines", "vs", "signals", "prompts")},
            "benchmarks": {k: bench[k] for k in ("tasks", "output", "run_id")},
            "reward_models": {c: {"version": m["version"], "heldout_accuracy": m["heldout"]["accuracy"]}
                              for c, m in rms["reward_models"].items()},
            "staleness": {c: [{"batch_id": x["batch_id"], "accuracy": x["accuracy"]} for x in v]
                          for c, v in rms["staleness"].items()},
            "collected": collected and {"batch_index": collected["batch_index"],
                                        "pairs_file": collected["pairs"]["pairs_file"]}}
