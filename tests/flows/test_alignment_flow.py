"""SFT -> collect a batch -> simulated annotation -> inbox ingest -> reward models, twice (the weekly
loop), then three alignment rounds (rejection sampling; rejection sampling + PPO; DPO), under a Prefect
test server with a real MLflow store and registry, on the smoke preset."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from stages.presets import smoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A small base Llama and its tokenizer (trained on chat-like text), as a user's model folder would be."""
    from tests.ui._prepare import base_model

    return base_model(tmp_path_factory.mktemp("align-base"))


@pytest.fixture(scope="module")
def loop(prefect_mlflow, base):
    from flows.alignment import preference_collect_flow, reward_models_flow, sft_flow

    cfg = smoke()
    tuned = sft_flow(cfg.sft, str(base[0]), str(base[1]))
    rounds = []
    for k in (1, 2):
        collected = preference_collect_flow(cfg.preferences, tuned["model_dir"], batch_index=k)
        rounds.append((collected, reward_models_flow(cfg.rewards, tuned["model_dir"])))
    return {"sft": tuned, "rounds": rounds, "cfg": cfg, "home": prefect_mlflow}


def test_sft_trains_on_answers_and_saves_a_chat_model(loop):
    sft = loop["sft"]
    assert sft["tokens"]["train"]["scored_tokens"] < sft["tokens"]["train"]["tokens"]
    assert {"sharegpt", "evals", "python_faq", "safety", "gatt"} <= set(sft["data"]["sources"])
    assert "unclear" in sft["data"]["sources"]["sharegpt"]["license"]  # recorded as such
    model_dir = Path(sft["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    run = [r for r in mlflow.search_runs(experiment_names=["herd"], output_format="list")
           if r.info.run_name == "sft/train"][-1]
    assert "final_loss" in run.data.metrics and run.inputs.dataset_inputs


def test_collected_pairs_are_annotated_into_the_inbox(loop):
    collected, _ = loop["rounds"][0]
    pairs = [json.loads(x) for x in Path(collected["pairs"]["pairs_file"]).read_text().splitlines()]
    n = loop["cfg"].preferences.collect.prompts
    assert len(pairs) == n and all(len(p["responses"]) == 2 for p in pairs)
    assert {p["category"] for p in pairs} == {"helpfulness", "safety"}
    exported = [json.loads(x) for x in Path(collected["annotated"]["file"]).read_text().splitlines()]
    assert len(exported) == n and {r["annotator_id"] for r in exported} == {"sim-rubric-v1"}
    assert collected["pairs"]["tokens_per_s"] > 0


def test_reward_models_are_retrained_registered_and_traceable_to_batches(loop):
    (_, first), (_, second) = loop["rounds"]
    assert len(first["batches"]) == 1 and len(second["batches"]) == 2 and second["new_batches"]
    assert first["staleness"] == {"helpfulness": [], "safety": []}  # nothing to be stale against yet
    for cat in ("helpfulness", "safety"):
        st = second["staleness"][cat]
        assert len(st) == 1 and st[0]["batch_id"] == second["new_batches"][0] and st[0]["pairs"] > 0
        rm = second["reward_models"][cat]
        assert rm["registered"] == f"rm-{cat}" and rm["version"] == first["reward_models"][cat]["version"] + 1
        assert rm["batches"] == second["batches"]
        client = mlflow.MlflowClient()
        version = client.get_model_version(f"rm-{cat}", str(rm["version"]))
        assert version.tags["herd.batches"] == ",".join(second["batches"])
        run = client.get_run(version.run_id)
        names = {d.dataset.name for d in run.inputs.dataset_inputs}
        assert {f"preferences/{b}" for b in second["batches"]} <= names and "sft-model" in names
        assert (Path(rm["model_dir"]) / "model.safetensors").is_file()


# ------------------------------------------------------------------ alignment rounds


@pytest.fixture(scope="module")
def rounds(loop):
    from flows.rounds import alignment_round_flow

    cfg = loop["cfg"]
    return [alignment_round_flow(cfg.alignment, cfg.rewards, cfg.preferences, benchmarks=cfg.benchmarks)
            for _ in range(cfg.alignment.rounds)]


def test_rounds_run_the_schedule_and_chain_policies(rounds, loop):
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["algorithms"] for r in rounds] == [["rejection_sampling"], ["rejection_sampling", "ppo"], ["dpo"]]
    assert rounds[0]["parent"]["model_dir"] == loop["sft"]["model_dir"]
    for prev, nxt in zip(rounds, rounds[1:]):
        assert nxt["parent"]["model_dir"] == prev["policy"] and nxt["parent"]["round"] == prev["round"]
    rs = rounds[0]["steps"][0]["metrics"]
    assert rs["max_minus_median"] >= 0 and rs["generated_tokens_per_s"] > 0
    ppo = rounds[1]["steps"][1]["metrics"]
    assert ppo["iterations"] == loop["cfg"].alignment.ppo.iterations and ppo["kl_last"] == ppo["kl_last"]
    assert rounds[2]["steps"][0]["metrics"]["pairs"] > 0
    for r in rounds:
        assert (Path(r["policy"]) / "model.safetensors").is_file()


def test_each_round_ingests_retrains_and_collects_the_next_batch(rounds, loop):
    # the pipeline's two batches are in before round 1; every round collects one more for the next round
    for r in rounds:
        assert r["collected"] is not None and Path(r["collected"]["pairs_file"]).is_file()
    assert [len(r["staleness"]["helpfulness"]) for r in rounds] == [0, 1, 1]
    # round 1 has no new batch: the RMs trained on the same batches are reused, not registered again
    last = loop["rounds"][-1][1]["reward_models"]["safety"]["version"]
    assert [r["reward_models"]["safety"]["version"] for r in rounds] == [last, last + 1, last + 2]


def test_evaluation_reports_win_rates_with_intervals_and_signals(rounds):
    for r in rounds:
        ev = r["evaluation"]
        assert set(ev["vs"]) >= ({"sft"} if r["round"] == 1 else {"sft", "previous"})
        for vs in ev["vs"].values():
            for judge in ("judge", "rm"):
                w = vs[judge]
                assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
        assert 0 <= ev["policy"]["violation"]["rate"] <= 1
        for summary in (ev["policy"], *ev["baselines"].values()):  # false refusals of ordinary prompts
            fr = summary["false_refusal"]
            assert 0 <= fr["ci_low"] <= fr["rate"] <= fr["ci_high"] <= 1 and fr["prompts"] > 0
        for vs in ev["vs"].values():  # paired differences, policy minus baseline, on the same prompts
            for key in ("violation_diff", "false_refusal_diff"):
                assert -1 <= vs[key]["ci_low"] <= vs[key]["diff"] <= vs[key]["ci_high"] <= 1
        assert {"kl_to_reference", "entropy", "proxy_reward", "judge_reward", "length_words"} <= set(ev["signals"])


def test_every_round_scores_its_policy_on_the_core_benchmarks(rounds, loop):
    from stages.evaluation.benchmarks import SUITES

    cfg = loop["cfg"].benchmarks
    client = mlflow.MlflowClient()
    for r in rounds:
        tasks = r["benchmarks"]["tasks"]
        assert set(tasks) == set(SUITES["core"]) and all(t["n"] == cfg.limit for t in tasks.values())
        results = json.loads((Path(r["benchmarks"]["output"]) / "results.json").read_text())
        assert results["tasks"] == tasks and results["model"] == r["policy"]
        run = client.get_run(r["benchmarks"]["run_id"])
        assert run.data.tags["herd.eval.stage"] == f"rlhf-v{r['round']}" and run.data.tags["herd.model_dir"] == r["policy"]
        assert run.data.metrics["eval/hellaswag/acc_norm"] == pytest.approx(tasks["hellaswag"]["metrics"]["acc_norm"])
        assert run.data.metrics["eval/lambada/bpb"] > 0


def test_policy_versions_carry_their_lineage_and_aliases(rounds, loop):
    client = mlflow.MlflowClient()
    for r in rounds:
        reg = r["registered"]
        v = client.get_model_version_by_alias("policy", f"rlhf-v{r['round']}")
        assert int(v.version) == reg["version"] and v.tags["herd.round"] == str(r["round"])
        assert v.tags["herd.model_dir"] == r["policy"] and v.tags["herd.algorithms"] == ",".join(r["algorithms"])
        assert v.tags["herd.parent_model_dir"] == r["parent"]["model_dir"]
        assert v.tags["herd.rm_safety_version"] == str(r["reward_models"]["safety"]["version"])
        assert len(v.tags["herd.batches"].split(",")) == 2 + r["round"] - 1
        steps = [client.get_run(x) for x in v.tags["herd.step_runs"].split(",")]
        names = {d.dataset.name for s in steps for d in s.inputs.dataset_inputs}
        assert {"parent-policy", "rm-helpfulness", "rm-safety", "policy"} <= names
    # the champion moved exactly when the rule says so (judge interval above 0.5, no significant rise in violations
    # or false refusals against the champion of the time), and each version's tag says why it did or did not
    from stages.alignment import champion_decision

    rule = loop["cfg"].alignment.champion
    moved = [r["round"] for r in rounds if r["registered"]["champion"]]
    if moved:
        champion = client.get_model_version_by_alias("policy", "champion")
        assert champion.tags["herd.round"] == str(moved[-1])
    else:
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias("policy", "champion")
    for i, r in enumerate(rounds):
        ev, reg = r["evaluation"], r["registered"]
        key = reg["vs"]
        assert key == ("champion" if any(x["registered"]["champion"] for x in rounds[:i]) else "sft")
        decision = champion_decision(rule, ev["vs"][key], ev["policy"], ev["baselines"][key])
        assert (reg["champion"], reg["champion_decision"]) == decision
        tag = client.get_model_version("policy", str(reg["version"])).tags["champion_decision"]
        assert tag == reg["champion_decision"]
        assert tag.startswith("moved: judge win " if reg["champion"] else "kept: judge win ")
        assert "; violation " in tag and "; false refusal " in tag
        assert reg["champion"] <= (ev["vs"][key]["judge"]["ci_low"] > rule.min_judge_ci_low)


def test_a_round_needs_its_predecessor(rounds):
    from flows.rounds import alignment_round_flow

    with pytest.raises(ValueError, match="RLHF-V8"):
        alignment_round_flow(round=9)


def test_a_registered_policy_is_scored_by_its_alias(rounds, tmp_path):
    from flows.evaluation import benchmarks_flow
    from stages.errors import ConfigError
    from stages.evaluation.harness import HarnessConfig

    res = benchmarks_flow("models:/policy@rlhf-v2", HarnessConfig(tasks="arc_easy,lambada", limit=4),
                          output=str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["model"] == "models:/policy@rlhf-v2" and set(written["tasks"]) == {"arc_easy", "lambada"}
    assert res["tasks"]["arc_easy"]["n"] == 4
    assert mlflow.MlflowClient().get_run(res["run_id"]).data.tags["herd.model_dir"] == rounds[1]["policy"]
    with pytest.raises(ConfigError, match="models:/policy@nope"):
        benchmarks_flow("models:/policy@nope", HarnessConfig(tasks="arc_easy", limit=2))
