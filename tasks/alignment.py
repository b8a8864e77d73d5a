"""Prefect tasks of the alignment round: where the round stands, one algorithm step, evaluation, and the
``policy`` model registry (one version per round, aliases ``rlhf-v<n>`` and ``champion``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
from prefect import task

from stages.alignment import Algorithm, AlignmentConfig, ChampionRule, RoundInputs, champion_decision, \
    dpo_reference_cache, run_step, step_config
from stages.collect import CollectConfig
from stages.common import config_hash, tree_sha256
from stages.evaluate import evaluate_policy
from stages.reward import RewardScorer
from tasks.lineage import attach as attach_lineage
from tasks.rewards import pools
from tasks.torchrun_stage import launch
from tasks.tracking import MlflowSink, log_dataset, markdown_table, publish_markdown, run_url, stage_run

log = logging.getLogger(__name__)

REGISTERED = "policy"
MODEL_CODE = Path(__file__).with_name("policy_pyfunc.py")


def _versions() -> list:
    client = mlflow.MlflowClient()
    try:
        return list(client.search_model_versions(f"name='{REGISTERED}'"))
    except mlflow.exceptions.MlflowException:
        return []


def _alias(alias: str):
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(REGISTERED, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _ref(v) -> dict | None:
    if v is None:
        return None
    return {"version": int(v.version), "round": int(v.tags.get("herd.round", 0)), "model_dir": v.tags["herd.model_dir"],
            "rs_best": v.tags.get("herd.rs_best", "")}


@task(task_run_name="round-state")
def round_state_task(round_index: int | None, sft_model: str) -> dict:
    """The round to run (the registry's newest round + 1 unless given), its parent policy (V(n-1), V0 = SFT),
    the champion, and the kept samples of earlier rounds (pooled by rejection sampling)."""
    versions = [v for v in _versions() if "herd.round" in v.tags]
    newest = max((int(v.tags["herd.round"]) for v in versions), default=0)
    n = round_index if round_index is not None else newest + 1
    if n < 1:
        raise ValueError(f"round must be >= 1, got {n}")
    parent = _ref(_alias(f"rlhf-v{n - 1}")) if n > 1 else None
    if n > 1 and parent is None:
        raise ValueError(f"round {n} needs RLHF-V{n - 1} in the `{REGISTERED}` registry; run round {n - 1} first")
    earlier = sorted((v for v in versions if int(v.tags["herd.round"]) < n), key=lambda v: int(v.version))
    pooled = [b for v in earlier for b in v.tags.get("herd.rs_best", "").split(",") if b and Path(b).is_file()]
    return {"round": n, "parent": parent or {"version": 0, "round": 0, "model_dir": sft_model},
            "champion": _ref(_alias("champion")), "pooled": pooled}


def scorer(rms: dict[str, str], cfg: AlignmentConfig) -> RewardScorer:
    return RewardScorer(rms["helpfulness"], rms["safety"], threshold=cfg.reward_threshold,
                        max_tokens=cfg.rejection.generation.max_prompt_tokens + cfg.rejection.generation.max_new_tokens)


@task(task_run_name="rlhf-v{round_index}-{algorithm}")
def policy_step_task(algorithm: Algorithm, cfg: AlignmentConfig, parent_dir: str, round_index: int,
                     rms: dict[str, str], sft_data: str, collect: CollectConfig, batch_dirs: list[str], pooled: list[str],
                     store: str, parent_run_id: str | None) -> dict:
    """One algorithm of round ``round_index`` from ``parent_dir``; output content-addressed by its config,
    the parent's weights, the reward models, the batches and the pooled samples."""
    algorithm = Algorithm(algorithm)
    section = step_config(cfg, algorithm)
    digests = {"parent": tree_sha256(parent_dir, "*.safetensors"),
               **{c: tree_sha256(d, "*.safetensors") for c, d in sorted(rms.items())}}
    uses_batches = algorithm in (Algorithm.dpo, Algorithm.rejection_sampling)  # DPO pairs, RS edits
    out = Path(store) / "alignment" / algorithm.value / config_hash(
        section, cfg.reward_threshold, digests, round_index, sorted(batch_dirs) if uses_batches else [], pooled)
    inputs = RoundInputs(round_index=round_index, reward_fn=scorer(rms, cfg), prompts=pools(sft_data, collect)["collect"], batch_dirs=batch_dirs, pooled=pooled, value_init_dir=rms["helpfulness"])
    with stage_run(f"alignment/v{round_index}/{algorithm.value}", section, parent_run_id,
                   tags={"herd.round": str(round_index), "herd.algorithm": algorithm.value}) as rid:
        if algorithm is Algorithm.dpo and cfg.dpo.nproc > 1:  # torchrun; rank 0's manifest is what run_step returns
            launch("dpo", cfg.dpo, {"policy_dir": parent_dir, "batch_dirs": batch_dirs, "out_dir": str(out),
                                    "ref_cache": str(dpo_reference_cache(out))}, cfg.dpo.nproc)
        with MlflowSink(rid) as sink:
            res = run_step(algorithm, cfg, parent_dir, inputs, out, sink=sink)
        mlflow.log_metrics({f"result_{k}": v for k, v in res.metrics.items()})
        log_dataset("parent-policy", parent_dir, digests["parent"], "init")
        for c, d in sorted(rms.items()):
            log_dataset(f"rm-{c}", d, digests[c], "reward")
        if uses_batches:
            for b in batch_dirs:
                log_dataset(f"preferences/{Path(b).name}", str(Path(b) / "data.parquet"),
                            json.loads((Path(b) / "manifest.json").read_text())["digest"], "training")
        for f in res.files.values():
            mlflow.log_artifact(f, "outputs")
        log_dataset("policy", res.model_dir, tree_sha256(res.model_dir, "*.safetensors"), "output")
    return res.model_dump(mode="json") | {"run_id": rid}


def _rate(r: dict) -> str:
    return f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


@task(task_run_name="evaluate-rlhf-v{round_index}")
def evaluate_task(cfg: AlignmentConfig, round_index: int, policy_dir: str, baselines: dict[str, str],
                  rms: dict[str, str], sft_data: str, collect: CollectConfig, reference_dir: str, store: str,
                  parent_run_id: str | None) -> dict:
    """Win rates of RLHF-V(n) against its baselines (RMs and the independent judge), safety violations and the
    reward-hacking signals; logged to MLflow and published as a Prefect table."""
    prompts = pools(sft_data, collect)["eval"]
    with stage_run(f"alignment/v{round_index}/evaluate", cfg.evaluation, parent_run_id,
                   tags={"herd.round": str(round_index)}) as rid:
        res = evaluate_policy(cfg.evaluation, policy_dir, baselines, prompts, scorer(rms, cfg).scores,
                              Path(store) / "alignment" / "answers", reference_dir=reference_dir)
        metrics = {f"signal_{k}": v for k, v in res["signals"].items()}
        pol = res["policy"]
        metrics |= {"violation_rate": pol["violation"]["rate"], "judge_mean": pol["judge_mean"],
                    "rm_reward": pol["rm_reward"], "false_refusal_rate": pol["false_refusal"]["rate"],
                    "false_refusal_rate_ci_low": pol["false_refusal"]["ci_low"],
                    "false_refusal_rate_ci_high": pol["false_refusal"]["ci_high"]}
        if pol["helpfulness"] is not None:
            metrics["helpfulness"] = pol["helpfulness"]
        for name, base in res["baselines"].items():
            metrics[f"false_refusal_rate_{name}"] = base["false_refusal"]["rate"]
            metrics[f"violation_rate_{name}"] = base["violation"]["rate"]
        for name, vs in res["vs"].items():
            for key, w in vs.items():
                if key.endswith("_diff"):  # violation_diff, false_refusal_diff: policy minus baseline, paired
                    metrics[f"{key}_vs_{name}"] = w["diff"]
                    metrics[f"{key}_vs_{name}_ci_low"] = w["ci_low"]
                    metrics[f"{key}_vs_{name}_ci_high"] = w["ci_high"]
                else:
                    metrics[f"win_{key}_vs_{name}"] = w["win_rate"]
                    metrics[f"win_{key}_vs_{name}_ci_low"] = w["ci_low"]
                    metrics[f"win_{key}_vs_{name}_ci_high"] = w["ci_high"]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v})
        mlflow.log_dict(res, "evaluation.json")
    rows = [{"vs": name, "judge": f"{vs['judge']['win_rate']:.3f} [{vs['judge']['ci_low']:.3f}, "
                                  f"{vs['judge']['ci_high']:.3f}]",
             "reward models": f"{vs['rm']['win_rate']:.3f} [{vs['rm']['ci_low']:.3f}, {vs['rm']['ci_high']:.3f}]"}
            for name, vs in res["vs"].items()]
    publish_markdown(f"rlhf-v{round_index}-eval",
                     f"# RLHF-V{round_index}: held-out evaluation\n\n{res['prompts']} prompts ({res['safety_prompts']} "
                     f"safety) x {res['samples']} answers. Win rate of RLHF-V{round_index} (95% bootstrap interval):\n\n"
                     f"{markdown_table(rows)}\n\nSafety violation rate {_rate(pol['violation'])}; false-refusal "
                     f"rate on ordinary prompts {_rate(pol['false_refusal'])}; judge "
                     f"helpfulness {pol['helpfulness']}; KL to SFT {res['signals'].get('kl_to_reference')}; "
                     f"mean length {pol['length_words']:.1f} words; entropy {res['signals']['entropy']:.3f}\n\n"
                     f"MLflow run: {run_url(rid)}\n", f"RLHF-V{round_index} evaluation")
    return res | {"run_id": rid}


@task(task_run_name="register-rlhf-v{round_index}")
def register_policy_task(round_index: int, policy_dir: str, steps: list[dict], parent: dict, champion: dict | None,
                         evaluation: dict, rms: dict[str, dict], batches: list[str], max_new_tokens: int,
                         rule: ChampionRule, parent_run_id: str | None) -> dict:
    """Register RLHF-V(n) as a version of ``policy`` with its lineage; alias ``rlhf-v<n>``; move ``champion``
    by ``rule`` against the current champion (SFT when there is none): tag ``champion_decision`` says why.

    Idempotent: a rerun of a crashed or killed round finds the version it registered for round ``n`` with the same
    weights (tagged ``herd.round`` and ``herd.digest`` as it is created) and sets its tags and aliases again, so a
    round number has exactly one version. The lineage (``lineage.json``, ``lineage.png``) goes to the version's run.
    """
    digest = tree_sha256(policy_dir, "*.safetensors")
    known = registered_round(round_index, digest)
    if known is None:
        with stage_run(f"alignment/v{round_index}/register", None, parent_run_id,
                       tags={"herd.round": str(round_index)}) as rid:
            info = mlflow.pyfunc.log_model(name="policy", python_model=str(MODEL_CODE),
                                           artifacts={"model": policy_dir},
                                           model_config={"max_new_tokens": max_new_tokens},
                                           pip_requirements=["torch", "transformers", "pandas"])
            log_dataset("policy", policy_dir, digest, "output")
            log_dataset("parent-policy", parent["model_dir"], tree_sha256(parent["model_dir"], "*.safetensors"),
                        "parent")
            # tagged as it is created: a crash right after still leaves a version a rerun recognises
            mv = mlflow.register_model(info.model_uri, REGISTERED, tags={
                "herd.round": str(round_index), "herd.digest": digest, "herd.model_dir": policy_dir})
        version = str(mv.version)
    else:
        version, rid = str(known.version), known.run_id
    client = mlflow.MlflowClient()
    vs_key = "champion" if champion and "champion" in evaluation["vs"] else "sft"
    judged = evaluation["vs"][vs_key]["judge"]
    tags = {"herd.round": str(round_index), "herd.model_dir": policy_dir, "herd.digest": digest,
            "herd.algorithms": ",".join(s["algorithm"] for s in steps),
            "herd.parent_version": str(parent["version"]), "herd.parent_model_dir": parent["model_dir"],
            "herd.batches": ",".join(Path(b).name for b in batches),
            "herd.rm_helpfulness_version": str(rms["helpfulness"]["version"]),
            "herd.rm_safety_version": str(rms["safety"]["version"]),
            "herd.rs_best": ",".join(s["files"]["best"] for s in steps if "best" in s.get("files", {})),
            "herd.step_runs": ",".join(s["run_id"] for s in steps), "herd.eval_run": evaluation["run_id"],
            f"judge_win_vs_{vs_key}": f"{judged['win_rate']:.4f}",
            "judge_win_vs_sft": f"{evaluation['vs']['sft']['judge']['win_rate']:.4f}",
            "violation_rate": f"{evaluation['policy']['violation']['rate']:.4f}",
            "false_refusal_rate": f"{evaluation['policy']['false_refusal']['rate']:.4f}"}
    promoted, reason = champion_decision(rule, evaluation["vs"][vs_key], evaluation["policy"],
                                         evaluation["baselines"][vs_key])
    tags |= {"champion_decision": reason, "champion_vs": vs_key if vs_key == "sft" else
             f"v{champion['version']} (RLHF-V{champion['round']})"}
    for k, v in tags.items():
        client.set_model_version_tag(REGISTERED, version, k, v)
    client.set_registered_model_alias(REGISTERED, f"rlhf-v{round_index}", version)
    if promoted:
        client.set_registered_model_alias(REGISTERED, "champion", version)
    try:
        attach_lineage(REGISTERED, version)
    except Exception as exc:  # noqa: BLE001 - the version stands without its figure; `herd lineage` still reads it
        log.warning("lineage of %s v%s not attached: %s", REGISTERED, version, exc)
    publish_markdown(f"policy-v{round_index}", f"# policy v{version} = RLHF-V{round_index}\n\n"
                     f"algorithms: {tags['herd.algorithms']}; parent: v{parent['version']}; batches: "
                     f"{tags['herd.batches']}; RMs: helpfulness v{tags['herd.rm_helpfulness_version']}, safety "
                     f"v{tags['herd.rm_safety_version']}\n\njudge win rate vs {vs_key}: {judged['win_rate']:.3f}; "
                     f"champion {'moved to this version' if promoted else 'unchanged'} ({reason})\n\n"
                     f"{'(registered before this rerun) ' if known else ''}lineage: `herd lineage "
                     f"models:/{REGISTERED}/{version}` (lineage.png on the run). MLflow run: {run_url(rid)}\n",
                     f"RLHF-V{round_index} registered")
    return {"name": REGISTERED, "version": int(version), "alias": f"rlhf-v{round_index}", "champion": promoted,
            "vs": vs_key, "champion_decision": reason, "reused": known is not None}


def registered_round(round_index: int, digest: str):
    """The ``policy`` version registered for round ``round_index`` with weights ``digest`` (None if none)."""
    for v in _versions():
        if v.tags.get("herd.round") != str(round_index):
            continue
        known = v.tags.get("herd.digest")
        if known is None and Path(v.tags.get("herd.model_dir", "")).is_dir():  # registered before herd.digest
            known = tree_sha256(v.tags["herd.model_dir"], "*.safetensors")
        if known == digest:
            return v
    return None
