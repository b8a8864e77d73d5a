"""The report card: rows per stage, CORE, alignment tax against SFT, and the markdown a user reads."""

from __future__ import annotations

import pytest

from stages.evaluation.report import build_report, core_score, headline, render_markdown


def _bench(hs: float, arc: float, bpb: float) -> dict:
    return {"hellaswag": {"n": 100, "shots": 0, "metrics": {"acc": hs - 0.02, "acc_norm": hs, "bpb": bpb,
                                                           "centered_acc": (hs - 0.02 - 0.25) / 0.75},
                          "stderr": {"acc": 0.04}},
            "arc_easy": {"n": 100, "shots": 0, "metrics": {"acc": arc, "acc_norm": arc, "bpb": bpb + 0.1,
                                                          "centered_acc": (arc - 0.25) / 0.75}, "stderr": {}},
            "lambada": {"n": 50, "shots": 0, "metrics": {"acc": 0.1, "bpb": 3.0}, "stderr": {}}}


STAGES = [
    {"stage": "base", "model_dir": "/m/base", "params": 123_456, "tokens": 2_000_000, "wall_s": 300.0,
     "heldout_loss": 3.21, "benchmarks": _bench(0.30, 0.40, 1.9)},
    {"stage": "sft", "model_dir": "/m/sft", "params": 123_456, "tokens": 50_000, "wall_s": 90.0, "heldout_loss": 2.5,
     "benchmarks": _bench(0.31, 0.42, 1.8), "violation_rate": [0.55, 0.4, 0.7], "false_refusal_rate": [0.1, 0.05, 0.15]},
    {"stage": "rlhf-v1", "model_dir": "/m/v1", "params": 123_456, "tokens": None, "wall_s": 40.0, "heldout_loss": None,
     "benchmarks": _bench(0.29, 0.42, 1.85), "judge_win_vs_sft": [0.58, 0.55, 0.61],
     "violation_rate": [0.5, 0.35, 0.65], "false_refusal_rate": [0.12, 0.07, 0.17]},
]


def test_headline_prefers_acc_norm_then_task_metrics():
    assert headline({"acc": 0.1, "acc_norm": 0.2}) == ("acc_norm", 0.2)
    assert headline({"exact_match": 0.3, "bpb": 1.0}) == ("exact_match", 0.3)
    assert headline({"pass@1": 0.05}) == ("pass@1", 0.05)
    assert headline({"bpb": 1.0}) is None


def test_core_is_the_mean_centered_accuracy():
    assert core_score(_bench(0.30, 0.40, 1.9)) == pytest.approx(((0.28 - 0.25) / 0.75 + (0.40 - 0.25) / 0.75) / 2)
    assert core_score({}) is None


def test_alignment_tax_is_the_difference_to_sft():
    rep = build_report(STAGES, run_id="r1", git={"commit": "abc123", "dirty": True}, preset="tiny", wall_s=430.0)
    tax = rep["alignment_tax"]
    assert set(tax) == {"rlhf-v1"}
    assert tax["rlhf-v1"]["hellaswag/acc_norm"] == pytest.approx(-0.02)
    assert tax["rlhf-v1"]["arc_easy/acc_norm"] == pytest.approx(0.0)
    assert tax["rlhf-v1"]["hellaswag/bpb"] == pytest.approx(0.05)
    assert tax["rlhf-v1"]["core"] == pytest.approx(rep["stages"][2]["core"] - rep["stages"][1]["core"])


def test_markdown_card_has_a_row_per_stage_and_every_column():
    rep = build_report(STAGES, run_id="r1", git={"commit": "abc123def4567890", "dirty": True}, preset="tiny",
                       contamination={"hellaswag": {"dropped": 1, "cut": 2}}, wall_s=430.0)
    md = render_markdown(rep)
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = table[0]
    for col in ("hellaswag", "arc_easy", "lambada", "CORE", "held-out loss", "judge win vs SFT", "violations",
                "false refusals", "wall", "params", "tokens"):
        assert col in header
    rows = {ln.split("|")[1].strip(): ln for ln in table[1:4]}
    assert set(rows) == {"base", "sft", "rlhf-v1"}
    assert "30.0 / 1.90" in rows["base"] and "3.210" in rows["base"] and "5.0 min" in rows["base"]
    assert "58.0 [55.0, 61.0]" in rows["rlhf-v1"] and "123k" in rows["base"] and "2M" in rows["base"]
    assert "abc123def456" in md and "dirty" in md
    assert "Alignment tax" in md and "| rlhf-v1 | -2.0 |" in md
    assert "Decontamination" in md and "| hellaswag | 2 | 1 |" in md


def test_the_card_sets_the_downstream_prediction_beside_the_measurement():
    down = {"hellaswag": {"predicted": {"bpb": [1.234, 1.1, 1.4], "acc": [0.27, 0.25, 0.31]},
                          "measured": {"bpb": 1.3, "acc": 0.26}},
            "piqa": {"predicted": {"bpb": [2.0, float("nan"), float("nan")], "acc": [0.5, 0.49, 0.52]},
                     "measured": {"bpb": 2.1, "acc": 0.51}}}
    md = render_markdown(build_report(STAGES, downstream=down))
    assert "Downstream prediction" in md
    assert "| hellaswag | 1.234 [1.100, 1.400] | 1.300 | 27.0 [25.0, 31.0] | 26.0 |" in md
    assert "| piqa | 2.000 | 2.100 | 50.0 [49.0, 52.0] | 51.0 |" in md  # no interval from two budgets
    assert "Downstream prediction" not in render_markdown(build_report(STAGES))
    down["piqa"]["predicted"]["acc"] = None
    assert "| piqa | 2.000 | 2.100 | - (no anchor above chance) | 51.0 |" in render_markdown(
        build_report(STAGES, downstream=down))
