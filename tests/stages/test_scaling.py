"""Scaling laws: sweep plan, IsoFLOP and parametric fits on runs generated from known constants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from stages.errors import ConfigError, DataValidationError
from stages.scaling import (
    FitConfig,
    ParametricFit,
    ScalingFit,
    SweepConfig,
    SweepPrior,
    bootstrap_ci,
    fit_isoflop,
    fit_parabola,
    fit_parametric,
    fit_scaling,
    huber,
    load_runs,
    parametric_objective,
    plan_sweep,
    recommend,
    write_runs,
)

# Chinchilla-like constants the synthetic runs are drawn from.
E, A, B, ALPHA, BETA = 1.7, 400.0, 410.0, 0.34, 0.28
A_TRUE, B_TRUE = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)


def true_loss(N, D):
    return E + A / np.asarray(N) ** ALPHA + B / np.asarray(D) ** BETA


def synthetic_runs(noise: float = 0.005, seed: int = 0):
    plan = plan_sweep(SweepConfig(budgets=(1e17, 1e18, 1e19, 1e20, 1e21), sizes_per_budget=7, spread=6.0,
                                  max_params=1e12))
    rng = np.random.default_rng(seed)
    return [(p["N"], p["D"], p["C"], float(true_loss(p["N"], p["D"]) * math.exp(rng.normal(0.0, noise))))
            for p in plan]


@pytest.fixture(scope="module")
def runs():
    return synthetic_runs()


@pytest.fixture(scope="module")
def quick_cfg():
    return FitConfig(n_boot=20)


# ------------------------------------------------------------------ plan


def test_plan_sweep_isoflop_grid():
    cfg = SweepConfig(budgets=(1e13, 1e12, 1e14), sizes_per_budget=5, spread=4.0)
    plan = plan_sweep(cfg)
    assert len(plan) == 15
    assert [p["C"] for p in plan[::5]] == [1e12, 1e13, 1e14]  # sorted budgets
    for p in plan:
        assert p["D"] == pytest.approx(p["C"] / (6 * p["N"]), rel=1e-12)
        assert p["N"] == round(p["N"])
    first = plan[:5]
    center = math.sqrt(1e12 / (6 * 20))  # D/N = 20
    assert first[2]["N"] == pytest.approx(center, abs=1)
    assert first[0]["N"] == pytest.approx(center / 4, abs=1) and first[-1]["N"] == pytest.approx(center * 4, abs=1)
    ratios = np.diff(np.log([p["N"] for p in first]))
    assert np.allclose(ratios, ratios[0], atol=1e-3)  # log-spaced
    assert plan_sweep(cfg) == plan  # deterministic


def test_plan_sweep_power_law_prior_and_bounds():
    cfg = SweepConfig(budgets=(1e12,), prior=SweepPrior.power_law, prior_coef=0.6, prior_exponent=0.5)
    mid = plan_sweep(cfg)[2]["N"]
    assert mid == pytest.approx(0.6 * (1e12 / 6) ** 0.5, abs=1)
    clipped = plan_sweep(cfg.derive(max_params=mid * 1.01))
    assert max(p["N"] for p in clipped) <= mid * 1.01 and len(clipped) == 3
    with pytest.raises(ConfigError, match="min_params/max_params"):
        plan_sweep(cfg.derive(max_params=mid * 0.99))


def test_plan_sweep_jitter_is_seeded():
    cfg = SweepConfig(jitter=0.3, seed=1)
    assert plan_sweep(cfg) == plan_sweep(cfg)
    assert plan_sweep(cfg) != plan_sweep(cfg.derive(seed=2))


@pytest.mark.parametrize("field,value", [("sizes_per_budget", 2), ("spread", 1.0), ("budgets", ()),
                                         ("budgets", (1e12, -1.0)), ("min_params", 0.0), ("jitter", 0.7)])
def test_sweep_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SweepConfig().derive(**{field: value})
    with pytest.raises(ValidationError, match="min_params"):
        SweepConfig(min_params=1e9, max_params=1e8)


@pytest.mark.parametrize("field,value", [("n_boot", -1), ("huber_delta", 0.0), ("alpha_grid", ()), ("min_sizes", 2),
                                         ("ci_level", 1.0), ("bootstrap_starts", 0)])
def test_fit_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        FitConfig().derive(**{field: value})


def test_default_grid_is_chinchillas():
    cfg = FitConfig()
    assert cfg.alpha_grid == (0.0, 0.5, 1.0, 1.5, 2.0) == cfg.beta_grid
    assert cfg.e_grid == (-1.0, -0.5, 0.0, 0.5, 1.0)
    assert cfg.a_grid == (0.0, 5.0, 10.0, 15.0, 20.0, 25.0) == cfg.b_grid
    assert cfg.init_grid().shape == (4500, 5)


# ------------------------------------------------------------------ CSV


def test_csv_roundtrip_is_exact(tmp_path, runs):
    path = tmp_path / "runs.csv"
    write_runs(runs, path)
    assert path.read_text().splitlines()[0] == "N,D,C,loss"
    assert [tuple(r) for r in load_runs(path)] == [tuple(r) for r in runs]


@pytest.mark.parametrize("text,line,field", [
    ("N,D,loss\n1,2,3\n", 1, "C"),
    ("N,D,C,loss\n1,2,3,4\n1,2,x,4\n", 3, "C"),
    ("N,D,C,loss\n1,2,3,4\n5,6,7,-1\n", 3, "loss"),
    ("N,D,C,loss\n1,nan,3,4\n", 2, "D"),
    ("N,D,C,loss\n1,2\n", 2, "C"),
])
def test_load_runs_errors_name_file_line_column(tmp_path, text, line, field):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataValidationError) as info:
        load_runs(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert "bad.csv" in str(err) and f"line {line}" in str(err) and repr(field) in str(err)


def test_load_runs_missing_and_empty(tmp_path):
    with pytest.raises(DataValidationError, match="not found"):
        load_runs(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("N,D,C,loss\n")
    with pytest.raises(DataValidationError, match="no runs"):
        load_runs(tmp_path / "empty.csv")


# ------------------------------------------------------------------ IsoFLOP


def test_parabola_vertex_exact():
    N = np.exp(np.array([10.0, 11.0, 12.0, 13.0]))
    loss = 0.5 * (np.log(N) - 11.5) ** 2 + 2.0
    coeffs, n_opt, loss_min = fit_parabola(N, loss)
    assert math.log(n_opt) == pytest.approx(11.5, abs=1e-9) and loss_min == pytest.approx(2.0, abs=1e-9)
    assert fit_parabola(N, -loss) is None  # no minimum
    assert fit_parabola(N[:2], loss[:2]) is None


def test_isoflop_recovers_exponents(runs):
    iso = fit_isoflop(runs)
    assert len(iso.budgets) == 5
    assert set(iso.budgets[0]) == {"C", "N_opt", "D_opt", "loss_min", "coeffs"}
    assert iso.a == pytest.approx(A_TRUE, abs=0.03)
    assert iso.b == pytest.approx(B_TRUE, abs=0.03)
    assert iso.a + iso.b == pytest.approx(1.0, abs=1e-9)  # D_opt = C / (6 N_opt)
    for bud in iso.budgets:  # vertex near the true optimum of L(N, C/(6N))
        grid = np.exp(np.linspace(np.log(bud["N_opt"]) - 3, np.log(bud["N_opt"]) + 3, 4001))
        n_true = grid[np.argmin(true_loss(grid, bud["C"] / (6 * grid)))]
        assert abs(math.log(bud["N_opt"] / n_true)) < 0.25


def test_isoflop_skips_a_budget_whose_minimum_is_not_bracketed(runs):
    budgets = sorted({r[2] for r in runs})
    c = budgets[-1]
    n_true = fit_isoflop(runs).budgets[-1]["N_opt"]
    # the largest budget swept only below its optimum: the parabola's vertex would be an extrapolation
    below = [(n, c / (6 * n), c, float(true_loss(n, c / (6 * n)))) for n in (n_true / 16, n_true / 8, n_true / 4)]
    iso = fit_isoflop([r for r in runs if r[2] != c] + below)
    assert [b["C"] for b in iso.budgets] == pytest.approx(budgets[:-1])
    assert iso.a == pytest.approx(A_TRUE, abs=0.05)


def test_isoflop_needs_two_budgets(runs):
    one_budget = [r for r in runs if r[2] == runs[0][2]]
    with pytest.raises(DataValidationError, match="2 budgets"):
        fit_isoflop(one_budget)


# ------------------------------------------------------------------ parametric


def test_huber_values():
    r = np.array([0.0, 5e-4, -5e-4, 2e-3, -3e-3])
    assert np.allclose(huber(r, 1e-3), [0.0, 1.25e-7, 1.25e-7, 1e-3 * (2e-3 - 5e-4), 1e-3 * (3e-3 - 5e-4)])


@pytest.mark.parametrize("theta", [(0.5, 6.0, 6.1, 0.34, 0.28), (0.0, 5.0, 10.0, 0.5, 1.0), (-1.0, 2.0, 3.0, 0.1, 0.2)])
@pytest.mark.parametrize("delta", [1e-3, 10.0])  # linear and quadratic Huber branches
def test_gradient_matches_finite_differences(runs, theta, delta):
    arr = np.asarray(runs)
    logN, logD, logL = np.log(arr[:, 0]), np.log(arr[:, 1]), np.log(arr[:, 3])
    theta = np.asarray(theta, dtype=np.float64)
    _, grad = parametric_objective(theta, logN, logD, logL, delta)
    h = 1e-6
    fd = np.array([(parametric_objective(theta + h * e, logN, logD, logL, delta)[0]
                    - parametric_objective(theta - h * e, logN, logD, logL, delta)[0]) / (2 * h) for e in np.eye(5)])
    assert np.allclose(grad, fd, rtol=1e-5, atol=1e-9 * max(1.0, np.abs(fd).max()))


def test_objective_is_zero_at_truth_without_noise():
    arr = np.asarray(synthetic_runs(noise=0.0))
    logN, logD, logL = np.log(arr[:, 0]), np.log(arr[:, 1]), np.log(arr[:, 3])
    value, grad = parametric_objective(np.array([math.log(E), math.log(A), math.log(B), ALPHA, BETA]),
                                       logN, logD, logL)
    assert value < 1e-25 and np.abs(grad).max() < 1e-12


def test_parametric_recovers_constants(runs, quick_cfg):
    fit = fit_parametric(runs, quick_cfg)
    assert isinstance(fit, ParametricFit)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.03)
    assert fit.beta == pytest.approx(BETA, abs=0.03)
    assert fit.a == pytest.approx(A_TRUE, abs=0.02)
    assert fit.b == pytest.approx(B_TRUE, abs=0.02)
    assert fit.E == pytest.approx(E, abs=0.1)
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta))
    assert fit.G == pytest.approx(g, rel=1e-12)
    # the closed-form N_opt minimises the fitted loss along the IsoFLOP line
    C = 1e20
    grid = np.exp(np.linspace(np.log(fit.n_opt(C)) - 1, np.log(fit.n_opt(C)) + 1, 20001))
    best = grid[np.argmin([fit.loss(n, C / (6 * n)) for n in grid])]
    assert best == pytest.approx(fit.n_opt(C), rel=1e-3)


def test_parametric_noiseless_is_exact():
    fit = fit_parametric(synthetic_runs(noise=0.0), FitConfig(max_starts=8))
    assert fit.alpha == pytest.approx(ALPHA, abs=1e-4) and fit.beta == pytest.approx(BETA, abs=1e-4)
    assert fit.E == pytest.approx(E, rel=1e-3) and fit.A == pytest.approx(A, rel=1e-2)


def test_parametric_fails_gracefully():
    assert fit_parametric([(1e6, 1e7, 6e13, 3.0)] * 4) is None  # fewer runs than parameters


def test_recommend_parametric_and_fallback(runs, quick_cfg):
    iso = fit_isoflop(runs)
    par = fit_parametric(runs, quick_cfg)
    rec = recommend(ScalingFit(isoflop=iso, parametric=par), 1e22)
    assert set(rec) == {"C", "N", "D"} and rec["N"] == pytest.approx(par.n_opt(1e22))
    assert rec["D"] == pytest.approx(1e22 / (6 * rec["N"]))
    fallback = recommend(ScalingFit(isoflop=iso, parametric=None), 1e22)
    assert fallback["N"] == pytest.approx(iso.n_opt(1e22))
    assert abs(math.log(fallback["N"] / rec["N"])) < 0.5  # both laws agree within ~1.6x at 10x the largest budget
    with pytest.raises(DataValidationError):
        recommend(ScalingFit(None, None), 1e22)
    with pytest.raises(ConfigError, match="target_budget"):
        recommend(ScalingFit(iso, par), -1.0)


def test_bootstrap_ci_covers_truth_and_is_seeded(runs, quick_cfg):
    par = fit_parametric(runs, quick_cfg)
    ci = bootstrap_ci(runs, quick_cfg, par)
    assert ci["failed"] == {"parametric": 0, "isoflop": 0}
    for k, truth in (("alpha", ALPHA), ("beta", BETA), ("a", A_TRUE), ("b", B_TRUE)):
        lo, hi = ci["parametric"][k]
        assert lo <= getattr(par, k) <= hi and hi - lo < 0.1
        assert lo - 0.02 <= truth <= hi + 0.02
    for k in ("a", "b"):
        lo, hi = ci["isoflop"][k]
        assert lo < hi
    assert bootstrap_ci(runs, quick_cfg, par) == ci
    assert bootstrap_ci(runs, quick_cfg.derive(seed=1), par) != ci


# ------------------------------------------------------------------ stage


def test_fit_scaling_contract_png_determinism(tmp_path, runs, quick_cfg):
    csv_path = tmp_path / "runs.csv"
    write_runs(runs, csv_path)
    out = fit_scaling(quick_cfg, csv_path, tmp_path / "out", target_budget=1e22)
    on_disk = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert on_disk == json.loads(json.dumps(out))
    assert set(on_disk) == {"isoflop", "parametric", "ci", "recommendation"}
    assert set(on_disk["isoflop"]) == {"a", "b", "budgets"}
    assert set(on_disk["parametric"]) == {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert set(on_disk["recommendation"]) == {"C", "N", "D"}
    assert all(set(b) == {"C", "N_opt", "D_opt", "loss_min", "coeffs"} for b in on_disk["isoflop"]["budgets"])
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert diag["isoflop_skipped"] == [] and diag["runs"] == len(runs) and not diag["parametric_failed"]
    assert set(on_disk["ci"]["parametric"]) == {"alpha", "beta", "a", "b"}
    assert set(on_disk["ci"]["isoflop"]) == {"a", "b"}
    assert on_disk["parametric"]["alpha"] == pytest.approx(ALPHA, abs=0.03)
    png = tmp_path / "out" / "isoflop.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    again = fit_scaling(quick_cfg, csv_path, tmp_path / "out2", target_budget=1e22)
    assert again == out
    assert (tmp_path / "out2" / "fit.json").read_bytes() == (tmp_path / "out" / "fit.json").read_bytes()


def test_fit_scaling_rejects_bad_target(tmp_path, runs, quick_cfg):
    csv_path = tmp_path / "runs.csv"
    write_runs(runs, csv_path)
    with pytest.raises(ConfigError, match="target_budget"):
        fit_scaling(quick_cfg, csv_path, tmp_path / "out", target_budget=0.0)


def test_a_degenerate_optimum_is_a_failed_fit_not_an_overflow():
    from stages.scaling import _to_fit

    # a bootstrap replicate of the demo's sweep drove ln A past exp()'s range (OverflowError before)
    assert _to_fit(np.array([1.2, 900.0, 16.0, 0.2, 1.3]), 0.0) is None
    assert _to_fit(np.array([1.2, 2.4, 16.0, -0.2, 1.3]), 0.0) is None
    ok = _to_fit(np.array([0.5, 6.0, 6.1, 0.34, 0.28]), 0.0)
    assert ok is not None and ok.E == pytest.approx(math.exp(0.5))
