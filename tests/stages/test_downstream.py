"""Llama 3's two-step downstream prediction: both fits recover planted parameters, and the prediction's
intervals cover the planted truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.downstream import (
    DownstreamFitConfig,
    fit_power_law,
    fit_sigmoid,
    predict_power_law,
    sigmoid_acc,
    two_step_fit,
)

A, ALPHA, K, B0, CHANCE = 40.0, 0.12, 6.0, 1.1, 0.25


def _planted(seed: int = 0, noise_bpb: float = 0.01, noise_acc: float = 0.01):
    """Sweep points at 5 budgets x 4 sizes: the compute-optimal one (lowest loss) on the planted power law, the
    others above it; accuracy on the planted sigmoid; plus two strong anchors."""
    rng = np.random.default_rng(seed)
    points = []
    for c in np.geomspace(1e15, 1e19, 5):
        for j, excess in enumerate((0.0, 0.05, 0.1, 0.2)):
            bpb = A * c ** -ALPHA * (1 + excess) * math.exp(rng.normal(0, noise_bpb))
            acc = float(sigmoid_acc(bpb, K, B0, CHANCE, 1.0)) + rng.normal(0, noise_acc)
            points.append({"C": float(c), "N": j, "task": "t", "bpb": bpb, "acc": acc, "loss": 3.0 + excess})
    anchors = [{"name": f"a{b}", "task": "t", "bpb": b, "acc": float(sigmoid_acc(b, K, B0, CHANCE, 1.0))}
               for b in (0.5, 0.7)]
    return points, anchors


def test_the_power_law_recovers_planted_parameters_and_its_interval_covers_the_truth():
    c = np.geomspace(1e15, 1e19, 6)
    rng = np.random.default_rng(1)
    bpb = A * c ** -ALPHA * np.exp(rng.normal(0, 0.01, len(c)))
    fit = fit_power_law(c, bpb)
    assert fit["alpha"] == pytest.approx(ALPHA, abs=0.005) and fit["A"] == pytest.approx(A, rel=0.15)
    v, lo, hi = predict_power_law(fit, 1e21, 0.9)
    truth = A * 1e21 ** -ALPHA
    assert lo < truth < hi and v == pytest.approx(truth, rel=0.03)
    exact = fit_power_law([1e15, 1e17], [A * 1e15 ** -ALPHA, A * 1e17 ** -ALPHA])  # two points: a line, no interval
    assert exact["alpha"] == pytest.approx(ALPHA) and math.isnan(predict_power_law(exact, 1e21, 0.9)[1])


def test_the_sigmoid_recovers_planted_parameters():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.4, 2.0, 60)
    y = sigmoid_acc(x, K, B0, CHANCE, 1.0) + rng.normal(0, 0.01, len(x))
    f = fit_sigmoid(x, y, CHANCE, 1.0)
    assert f["k"] == pytest.approx(K, rel=0.1) and f["b0"] == pytest.approx(B0, abs=0.02) and f["rmse"] < 0.02


def test_two_step_fit_predicts_the_planted_bpb_and_accuracy_at_a_larger_budget():
    points, anchors = _planted()
    target = 1e21
    fit = two_step_fit(points, anchors, {"t": CHANCE}, target, DownstreamFitConfig(n_boot=100))
    t = fit["tasks"]["t"]
    assert [p["C"] for p in t["optimal"]] == sorted({p["C"] for p in points})  # lowest loss per budget
    assert all(p["N"] == 0 for p in t["optimal"])
    assert t["step1"]["alpha"] == pytest.approx(ALPHA, abs=0.01)
    assert t["step2"]["k"] == pytest.approx(K, rel=0.15) and t["step2"]["b0"] == pytest.approx(B0, abs=0.05)
    true_bpb = A * target ** -ALPHA
    true_acc = float(sigmoid_acc(true_bpb, K, B0, CHANCE, 1.0))
    v, lo, hi = t["prediction"]["bpb"]
    assert lo < true_bpb < hi and v == pytest.approx(true_bpb, rel=0.05)
    av, alo, ahi = t["prediction"]["acc"]
    assert alo <= true_acc <= ahi and av == pytest.approx(true_acc, abs=0.03)
    assert t["step2"]["anchors"] == 2 and t["step2"]["points"] == 20


def test_without_a_point_above_chance_the_accuracy_is_not_read_off_the_sigmoid():
    """Small models alone sit at chance (why Llama 3 anchored with Llama 2): step 1 still predicts bpb, step 2 gives
    no accuracy and says why."""
    points, _ = _planted()
    rng = np.random.default_rng(4)
    flat = [{**p, "acc": CHANCE + rng.normal(0, 0.01)} for p in points]
    t = two_step_fit(flat, [], {"t": CHANCE}, 1e21, DownstreamFitConfig(n_boot=20))["tasks"]["t"]
    assert t["prediction"]["acc"] is None and "anchor" in t["acc_note"]
    assert t["prediction"]["bpb"][0] == pytest.approx(A * 1e21 ** -ALPHA, rel=0.05)
