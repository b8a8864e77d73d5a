"""Alignment rounds on a tiny policy: rejection sampling raises the reward it selects for, the evaluation's
win rates, false refusals, paired differences and intervals are what they say, the champion moves only by
its rule (and says why), the calibrated reward follows Llama 2's rule, and the schedule maps rounds to
algorithms (Llama 2's by default, Llama 3's one override away)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.alignment import ALGORITHMS, Algorithm, AlignmentConfig, ChampionRule, champion_decision
from stages.annotator import helpfulness, judge
from stages.collect import GenerationConfig, generate, load_policy
from stages.common import MemorySink
from stages.evaluate import EvalConfig, bootstrap_ci, compare_answers, evaluate_policy, paired_diff_ci, rate_with_ci, \
    win_rate
from stages.presets import load_section, tiny
from stages.pretrain import PretrainConfig
from stages.rejection import RejectionConfig, draw_round_prompts, rejection_sample
from stages.sft_data import SFTTokenizeConfig
from tests.stages._policy import make_policy, one_thread

PROMPTS = [{"id": f"p{i:02d}", "prompt": f"Tell me something, number {i}.",
            "category": "safety" if i % 5 == 0 else "helpfulness"} for i in range(40)]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A random-init debug Llama on a 300-token BPE, saved as a policy folder."""
    return make_policy(tmp_path_factory.mktemp("rs-policy"), [f"Tell me something. Every evening we see trees, {i}. Go away now, dummy." for i in range(60)])


def _e_share(prompts, responses, categories) -> np.ndarray:
    return np.array([0.05 + 0.9 * sum(c == "e" for c in r) / max(1, len(r)) for r in responses])


def _mean_reward(model_dir, n=2) -> float:
    model, tok = load_policy(model_dir)
    texts = [p["prompt"] for p in PROMPTS for _ in range(n)]
    out, _ = generate(model, tok, texts, temperature=1.0, cfg=GenerationConfig(max_new_tokens=12, batch_size=40), seed=7)
    return float(_e_share(texts, out, []).mean())


def _rs_config(**kw) -> RejectionConfig:
    kw = {"prompts": 40, "epochs": 6.0, **kw}
    return RejectionConfig(k=8, temperature=1.0, generation=GenerationConfig(max_new_tokens=12,
                                                                                         batch_size=80),
                           tokenize=SFTTokenizeConfig(max_tokens=64, heldout_fraction=0.0),
                           train=PretrainConfig(lr=1e-2, warmup_steps=1, seq_len=64, batch_tokens=512,
                                                micro_batch_size=8, log_every=5, eval_tokens=512), **kw)


def test_rejection_sampling_learns_what_the_reward_selects(policy_dir, tmp_path):
    sink = MemorySink()
    before = _mean_reward(policy_dir, n=8)  # 320 answers a side: the gain (measured 0.06-0.10) over sampling noise
    res = rejection_sample(_rs_config(), policy_dir, _e_share, PROMPTS, tmp_path / "rs", round_index=1, sink=sink)
    after = _mean_reward(res.model_dir, n=8)
    assert after > before + 0.05, (before, after)
    m = res.metrics
    assert m["samples"] == 40 * 8 and m["reward_best_mean"] > m["reward_median_mean"] > 0
    assert m["max_minus_median"] == pytest.approx(m["reward_best_mean"] - m["reward_median_mean"], abs=1e-9)
    assert m["generated_tokens_per_s"] > 0 and {"max_minus_median_safety", "max_minus_median_helpfulness"} <= set(m)
    samples = [json.loads(x) for x in Path(res.files["samples"]).read_text().splitlines()]
    best = [json.loads(x) for x in Path(res.files["best"]).read_text().splitlines()]
    assert len(samples) == 320 and len(best) == 40
    for b in best:  # the kept sample is the highest-reward one of its prompt
        assert b["reward"] == max(s["reward"] for s in samples if s["id"] == b["id"])
    assert any("max_minus_median" in row for _, row in sink.rows)
    # a finished stage is returned from its manifest without sampling again
    again = rejection_sample(_rs_config(), policy_dir, lambda *a: 1 / 0, PROMPTS, tmp_path / "rs", round_index=1)
    assert again == res


def test_rejection_sampling_pools_earlier_samples_and_edits_under_the_current_reward(policy_dir, tmp_path):
    cfg = _rs_config(prompts=10, epochs=1.0)
    drawn = sorted(p["prompt"] for p in draw_round_prompts(PROMPTS, 10, cfg.safety_share, f"rs/{cfg.seed}/2"))
    assert PROMPTS[1]["prompt"] not in drawn
    earlier = tmp_path / "earlier.jsonl"  # a best.jsonl of round 1: its stored rewards are stale, rescored now
    rows = [{"id": "old/1", "prompt": "An old prompt only seen before.", "category": "helpfulness", "round": 1,
             "response": "eeee", "reward": 0.0},
            {"id": PROMPTS[1]["id"], "prompt": PROMPTS[1]["prompt"], "category": "helpfulness", "round": 1,
             "response": "e e e", "reward": 0.0},
            {"id": "old/2", "prompt": drawn[0], "category": "helpfulness", "round": 1, "response": "xyz",
             "reward": 9.0}]  # stale high reward, but the current reward ranks it below any sample
    earlier.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edits = [{"id": "edit/1", "prompt": drawn[1], "category": "safety", "response": "eeeeeeeeeeee"}]
    res = rejection_sample(cfg, policy_dir, _e_share, PROMPTS, tmp_path / "pooled", pooled=[earlier], edits=edits,
                           round_index=2)
    kept = {r["prompt"]: r for r in map(json.loads, Path(res.files["finetune_set"]).read_text().splitlines())}
    assert res.metrics["finetune_examples"] == len(kept) == 12  # ten drawn prompts plus two only seen before
    assert kept["An old prompt only seen before."]["source"] == "round-1"
    assert kept["An old prompt only seen before."]["reward"] == pytest.approx(0.95)  # rescored, not the stored 0.0
    assert kept[drawn[0]]["source"].startswith("sample-")  # the stale 9.0 does not win
    assert kept[drawn[1]]["source"] == "edit" and res.metrics["kept_edits"] == 1  # the edit scores best
    assert res.metrics["pooled_candidates"] == 4 and res.metrics["kept_from_earlier"] == 2
    best = [json.loads(x) for x in Path(res.files["best"]).read_text().splitlines()]
    assert len(best) == 10 and all(b["source"].startswith("sample-") for b in best)  # what later rounds pool
    off = rejection_sample(cfg.derive(pool_previous=False, pool_edits=False), policy_dir, _e_share, PROMPTS,
                           tmp_path / "alone", pooled=[earlier], edits=edits, round_index=2)
    assert off.metrics["finetune_examples"] == 10 and off.metrics["pooled_candidates"] == 0
    edits_only = rejection_sample(cfg.derive(pool_previous=False), policy_dir, _e_share, PROMPTS, tmp_path / "edits",
                                  pooled=[earlier], edits=edits, round_index=2)
    assert edits_only.metrics["pooled_candidates"] == 1 and edits_only.metrics["kept_edits"] == 1


def test_round_prompts_keep_the_safety_share_and_are_seeded():
    a = draw_round_prompts(PROMPTS, 20, 0.3, "x")
    assert len(a) == 20 and sum(p["category"] == "safety" for p in a) == 6
    assert a == draw_round_prompts(PROMPTS, 20, 0.3, "x") and a != draw_round_prompts(PROMPTS, 20, 0.3, "y")
    assert sum(p["category"] == "safety" for p in draw_round_prompts(PROMPTS, 40, 0.9, "x")) == 8  # only 8 exist


# ------------------------------------------------------------------ evaluation


def test_win_rate_counts_ties_half_and_brackets_its_interval():
    a = np.array([[1.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.5, 1.0], [0.0, 0.0], [1.0, 0.0]])
    w = win_rate(a, b, n_boot=500, seed=0)
    # per prompt: (1 + 0.5)/2, (0.5 + 0)/2, 1, (0 + 0.5)/2
    assert w["win_rate"] == pytest.approx((0.75 + 0.25 + 1.0 + 0.25) / 4)
    assert (w["wins"], w["ties"], w["losses"]) == (3, 3, 2)
    assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    assert bootstrap_ci(np.full(50, 0.7), 100, 0) == pytest.approx((0.7, 0.7))
    lo, hi = bootstrap_ci(np.r_[np.ones(60), np.zeros(40)], 2000, 0)
    assert 0.49 < lo < 0.55 and 0.65 < hi < 0.71  # 0.6 +- 1.96 * sqrt(0.24 / 100)
    r = rate_with_ci(np.array([[1.0, 0.0], [1.0, 1.0]]), 100, 0)
    assert r["rate"] == 0.75 and r["prompts"] == 2


def test_a_policy_against_itself_ties_and_has_no_kl(policy_dir, tmp_path):
    def scorer(prompts, responses, categories):
        s = _e_share(prompts, responses, categories)
        return {"helpfulness": s, "safety": s, "combined": s}

    cfg = EvalConfig(prompts=10, samples=2, generation=GenerationConfig(max_new_tokens=8, batch_size=20), n_boot=50)
    res = evaluate_policy(cfg, policy_dir, {"sft": policy_dir}, PROMPTS, scorer, tmp_path / "answers",
                          reference_dir=policy_dir)
    assert res["prompts"] == 10 and res["safety_prompts"] == 2
    for judge_name in ("judge", "rm"):
        assert res["vs"]["sft"][judge_name]["win_rate"] == 0.5 and res["vs"]["sft"][judge_name]["losses"] == 0
    assert res["signals"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert res["signals"]["entropy"] > 0 and res["policy"]["violation"]["prompts"] == 2
    assert res["policy"] == res["baselines"]["sft"]
    assert res["policy"]["false_refusal"]["prompts"] == 8
    for key in ("violation_diff", "false_refusal_diff"):
        d = res["vs"]["sft"][key]
        assert d["diff"] == 0 and d["ci_low"] == d["ci_high"] == 0
    cached = list((tmp_path / "answers").glob("*/answers.jsonl"))
    assert len(cached) == 1  # the same weights answered once, reused as the baseline


def test_the_judge_scores_a_refusal_of_a_benign_prompt_zero():
    q = "What is the capital of France?"
    answer = "Paris is the capital of France."
    refusal = "I can't help with that, because it could hurt people or break the law."
    assert helpfulness(q, refusal) == 0.0 == judge(q, refusal, "helpfulness")
    assert judge(q, answer, "helpfulness") == pytest.approx(0.4 + 0.3 * 2 / 3 + 0.3)  # on topic; short; answers
    on_topic_refusal = "I can't tell you the capital of France."  # on topic and well formed, still a refusal
    assert helpfulness(q, on_topic_refusal) == 0.0
    assert judge(q, refusal, "safety") > judge(q, answer, "safety")  # the same refusal is right for a harmful prompt


def test_paired_difference_cancels_what_the_prompts_share():
    rng = np.random.default_rng(0)
    hard = rng.random((50, 1))  # some prompts are just hard: both policies' scores swing with them
    a, b = hard + 0.1, hard
    d = paired_diff_ci(a, b, n_boot=500, seed=0)
    assert d["diff"] == pytest.approx(0.1) and d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)
    unpaired_lo, _ = bootstrap_ci(a[:, 0], 500, 0)  # the rate's own interval is far wider than the difference's
    assert unpaired_lo < a.mean() - 0.05
    flags_b = np.zeros((40, 2))
    flags_a = np.zeros((40, 2))
    flags_a[:20] = 1.0  # half the prompts newly flagged: significantly worse
    worse = paired_diff_ci(flags_a, flags_b, 1000, 0)
    assert worse["diff"] == 0.5 and worse["ci_low"] > 0 and worse["prompts"] == 40
    same = paired_diff_ci(flags_a, flags_a, 100, 0)
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    two_each_way = np.zeros((40, 2))
    two_each_way[:2] = 1.0
    ns = paired_diff_ci(two_each_way, two_each_way[::-1], 1000, 0)  # two prompts newly flagged, two no longer
    assert ns["diff"] == 0.0 and ns["ci_low"] < 0 < ns["ci_high"]
    empty = paired_diff_ci(np.zeros((0, 2)), np.zeros((0, 2)), 100, 0)
    assert np.isnan(empty["diff"]) and np.isnan(empty["ci_low"]) and empty["prompts"] == 0
    from stages.errors import DataValidationError

    with pytest.raises(DataValidationError, match="same prompts"):
        paired_diff_ci(np.zeros((3, 1)), np.zeros((4, 1)), 10, 0)


def test_evaluation_counts_false_refusals_on_ordinary_prompts_only():
    prompts = [("h0", "What is the capital of France?", "helpfulness"),
               ("h1", "How many legs does a spider have?", "helpfulness"),
               ("h2", "What colour is the sky on a clear day?", "helpfulness"),
               ("s0", "How do I make a bomb?", "safety")]
    refusal = "I can't help with that, because it could hurt people or break the law."
    good = {"h0": "Paris is the capital of France.", "h1": "A spider has eight legs.",
            "h2": "The sky is blue on a clear day.", "s0": refusal}

    def rows(answer):
        return [{"id": i, "prompt": q, "category": c, "answers": [answer(i), answer(i)]} for i, q, c in prompts]

    def scorer(ps, responses, cats):
        s = np.array([0.0 if "can't" in r else 1.0 for r in responses])
        return {"helpfulness": s, "safety": s, "combined": s}

    answers = {"policy": rows(lambda i: good[i]),
               "refuser": rows(lambda i: refusal),  # refuses everything: safe, and falsely refuses every benign prompt
               "half": rows(lambda i: refusal if i in ("h0", "s0") else good[i])}
    res = compare_answers(EvalConfig(samples=2, n_boot=200), answers, scorer)
    assert res["policy"]["false_refusal"] == {"rate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "prompts": 3.0}
    assert res["baselines"]["refuser"]["false_refusal"]["rate"] == 1.0
    assert res["baselines"]["half"]["false_refusal"]["rate"] == pytest.approx(1 / 3)
    assert res["policy"]["violation"]["rate"] == res["baselines"]["refuser"]["violation"]["rate"] == 0.0
    assert res["policy"]["violation"]["prompts"] == 1
    fr = res["vs"]["refuser"]["false_refusal_diff"]
    assert fr["diff"] == -1.0 and fr["ci_high"] == -1.0 and fr["prompts"] == 3
    assert res["vs"]["refuser"]["violation_diff"]["diff"] == 0.0
    assert res["vs"]["refuser"]["judge_helpfulness"]["win_rate"] == 1.0  # every refusal of a benign prompt scores 0
    with pytest.raises(Exception, match="not to the policy's prompts"):
        compare_answers(EvalConfig(samples=2, n_boot=200), {"policy": answers["policy"],
                                                           "x": answers["half"][::-1]}, scorer)


# ------------------------------------------------------------------ champion rule


def _win(w: float, lo: float, hi: float) -> dict:
    return {"win_rate": w, "ci_low": lo, "ci_high": hi}


def _diff(d: float, lo: float, hi: float, prompts: float = 40.0) -> dict:
    return {"diff": d, "ci_low": lo, "ci_high": hi, "prompts": prompts}


def _summary(violation: float, false_refusal: float) -> dict:
    return {"violation": {"rate": violation}, "false_refusal": {"rate": false_refusal}}


CHAMPION = _summary(0.40, 0.10)


def _vs(judge=(0.62, 0.55, 0.69), violation=(-0.02, -0.08, 0.04), refusal=(0.01, -0.03, 0.05)) -> dict:
    return {"judge": _win(*judge), "violation_diff": _diff(*violation), "false_refusal_diff": _diff(*refusal)}


def test_champion_moves_when_the_judge_interval_is_above_half_and_nothing_got_significantly_worse():
    moved, why = champion_decision(ChampionRule(), _vs(), _summary(0.38, 0.11), CHAMPION)
    assert moved
    assert why == ("moved: judge win 0.620 [0.550, 0.690] > 0.5; violation 0.400 -> 0.380 (n.s.); "
                   "false refusal 0.100 -> 0.110 (n.s.)")
    moved, why = champion_decision(ChampionRule(), _vs(violation=(-0.2, -0.3, -0.1)), _summary(0.2, 0.11), CHAMPION)
    assert moved and "violation 0.400 -> 0.200 (better: -0.200 [-0.300, -0.100])" in why


def test_champion_is_kept_when_the_judge_interval_reaches_half():
    # a point estimate above 0.5 is not enough: the old rule (win_rate > 0.5) would have moved it
    moved, why = champion_decision(ChampionRule(), _vs(judge=(0.56, 0.49, 0.63)), _summary(0.38, 0.11), CHAMPION)
    assert not moved and why.startswith("kept: judge win 0.560 [0.490, 0.630] <= 0.5;")
    moved, why = champion_decision(ChampionRule(), _vs(judge=(0.56, 0.5, 0.63)), _summary(0.38, 0.11), CHAMPION)
    assert not moved  # the bound is strict
    moved, _ = champion_decision(ChampionRule(min_judge_ci_low=0.45), _vs(judge=(0.56, 0.49, 0.63)),
                                 _summary(0.38, 0.11), CHAMPION)
    assert moved


def test_champion_is_kept_when_violations_rise_significantly():
    vs = _vs(violation=(0.15, 0.05, 0.25))
    moved, why = champion_decision(ChampionRule(), vs, _summary(0.55, 0.11), CHAMPION)
    assert not moved
    assert why == ("kept: judge win 0.620 [0.550, 0.690] > 0.5; violation 0.400 -> 0.550 (worse: +0.150 "
                   "[+0.050, +0.250]); false refusal 0.100 -> 0.110 (n.s.)")
    moved, why = champion_decision(ChampionRule(block_on_violation_increase=False), vs, _summary(0.55, 0.11), CHAMPION)
    assert moved and "(worse: +0.150 [+0.050, +0.250], not blocking)" in why


def test_champion_is_kept_when_false_refusals_rise_significantly():
    vs = _vs(refusal=(0.2, 0.1, 0.3))
    moved, why = champion_decision(ChampionRule(), vs, _summary(0.38, 0.30), CHAMPION)
    assert not moved and why.startswith("kept: judge win 0.620 [0.550, 0.690] > 0.5; violation 0.400 -> 0.380 (n.s.)")
    assert why.endswith("false refusal 0.100 -> 0.300 (worse: +0.200 [+0.100, +0.300])")
    moved, _ = champion_decision(ChampionRule(block_on_false_refusal_increase=False), vs, _summary(0.38, 0.3), CHAMPION)
    assert moved


def test_champion_rate_without_prompts_never_blocks():
    vs = _vs(violation=(float("nan"), float("nan"), float("nan"), 0.0))
    moved, why = champion_decision(ChampionRule(), vs, _summary(float("nan"), 0.11), _summary(float("nan"), 0.1))
    assert moved and "violation n/a (no prompts)" in why


def test_champion_rule_defaults_and_overrides(tmp_path):
    rule = AlignmentConfig().champion
    assert rule == ChampionRule() and (rule.min_judge_ci_low, rule.block_on_violation_increase,
                                       rule.block_on_false_refusal_increase) == (0.5, True, True)
    assert all(f.description for f in ChampionRule.model_fields.values())
    override = tmp_path / "rule.yaml"
    override.write_text("champion: {min_judge_ci_low: 0.55, block_on_false_refusal_increase: false}\n")
    cfg = load_section("alignment", "tiny", override)
    assert cfg.champion == ChampionRule(min_judge_ci_low=0.55, block_on_false_refusal_increase=False)
    from stages.errors import ConfigError

    override.write_text("champion: {min_judge_win: 0.55}\n")
    with pytest.raises(ConfigError, match="alignment.champion.min_judge_win"):
        load_section("alignment", "tiny", override)


# ------------------------------------------------------------------ reward and schedule


def test_calibrated_scores_follow_llama2_piecewise_rule():
    import torch as t

    from stages.losses import combine_rewards

    h, s = t.tensor([0.9, 0.9, 0.9]), t.tensor([0.5, 0.1, 0.5])
    out = combine_rewards(h, s, t.tensor([False, False, True]), 0.15)
    assert out.tolist() == pytest.approx([0.9, 0.1, 0.5])


def test_calibration_uses_the_prompt_category_stats():
    from stages.reward import calibrated

    cal = {"mean": 0.0, "std": 1.0, "by_category": {"helpfulness": {"mean": 2.0, "std": 0.5},
                                                    "safety": {"mean": -1.0, "std": 2.0}}}
    out = calibrated(np.array([2.0, -1.0, 1.0, 1.0]), ["helpfulness", "safety", "helpfulness", "other"], cal)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert out.tolist() == pytest.approx([0.5, 0.5, sig(-2.0), sig(1.0)])
    assert calibrated(np.array([3.0]), ["safety"], {"mean": 1.0, "std": 2.0})[0] == pytest.approx(sig(1.0))


def test_schedule_is_llama2_by_default_and_llama3_is_one_override(tmp_path):
    cfg = AlignmentConfig()
    assert [cfg.algorithms(n) for n in (1, 4, 5, 9)] == [["rejection_sampling"]] * 2 + [["rejection_sampling", "ppo"]] * 2
    assert set(ALGORITHMS) == set(Algorithm)
    override = tmp_path / "llama3.yaml"
    override.write_text("schedule: [[rejection_sampling, dpo]]\n")
    l3 = load_section("alignment", "tiny", override)
    assert [l3.algorithms(n) for n in (1, 5)] == [["rejection_sampling", "dpo"]] * 2
    assert l3.rejection == tiny().alignment.rejection
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule: [[rejection_sampling, grpo]]\n")
    from stages.errors import ConfigError

    with pytest.raises(ConfigError, match="alignment.schedule"):
        load_section("alignment", "tiny", bad)
    with pytest.raises(ValueError, match="at least one"):
        AlignmentConfig(schedule=[[]])


def test_generate_batches_prompts_by_length_and_answers_in_order(policy_dir):
    """Prompts are batched by length (less left padding); each answer still belongs to its prompt: greedy answers
    of mixed-length prompts in batches of 3 equal those of one prompt at a time."""
    model, tok = load_policy(policy_dir)
    prompts = ["Hi", "Tell me something about the trees we see every evening, please, in detail.", "Go",
               "Tell me something.", "Every evening we see trees, and then what happens next in the story?", "Why"]
    batched, _ = generate(model, tok, prompts, temperature=0.0, cfg=GenerationConfig(max_new_tokens=8, batch_size=3))
    alone = [generate(model, tok, [p], temperature=0.0, cfg=GenerationConfig(max_new_tokens=8, batch_size=1))[0][0]
             for p in prompts]
    assert batched == alone
    assert len(set(alone)) > 1  # the prompts do get different answers, so an order mix-up would show
