"""Scaling laws: plan an IsoFLOP sweep and fit Chinchilla / Llama 3 compute-optimal laws to its runs.

Plan (:func:`plan_sweep`): for every compute budget ``C`` a handful of model sizes ``N``, log-spaced
around a prior optimum (Chinchilla's ``D/N ~ 20`` by default), each trained on ``D = C / (6 N)`` tokens.
Another module maps ``N`` onto a model shape and trains; this one only plans and fits.

Fits, on runs ``(N, D, C, loss)`` (CSV with header ``N,D,C,loss``):

* IsoFLOP (Chinchilla Approach 2, the Llama 3 IsoFLOP figure): per budget a parabola of loss in
  ``ln N``; its vertex gives ``N_opt(C)`` and ``D_opt(C) = C / (6 N_opt)``; power laws
  ``N_opt = G C^a`` and ``D_opt = G' C^b`` by least squares in log space.
* Parametric (Chinchilla Approach 3, as replicated by Besiroglu et al. 2024):
  ``L(N, D) = E + A / N^alpha + B / D^beta`` with parameters ``(e, a, b, alpha, beta) = (ln E, ln A,
  ln B, alpha, beta)``; the predicted log-loss is ``LSE(a - alpha ln N, b - beta ln D, e)`` and the
  objective is the sum of Huber losses (``delta = 1e-3``) of ``ln L - LSE(...)``, minimised by L-BFGS-B
  with the exact gradient from a grid of initialisations; the best optimum is kept and no constant is
  rounded. Compute-optimal exponents: ``a = beta / (alpha + beta)``, ``b = alpha / (alpha + beta)``,
  ``N_opt(C) = G (C / 6)^a`` with ``G = (alpha A / (beta B))^(1 / (alpha + beta))``.
* Bootstrap: runs resampled with replacement within each budget (seeded), both fits repeated,
  percentile intervals reported.

:func:`fit_scaling` writes ``fit.json`` (contract below), ``isoflop.png`` and ``diagnostics.json`` (budgets
left out of the IsoFLOP power law and why, failed fits and bootstrap replicates)::

    {"isoflop": {"a", "b", "budgets": [{"C", "N_opt", "D_opt", "loss_min", "coeffs"}, ...]},
     "parametric": {"E", "A", "B", "alpha", "beta", "a", "b"},
     "ci": {...}, "recommendation": {"C", "N", "D"},
     "downstream": {...}}   # only with the sweep's benchmark points (stages.downstream: Llama 3's two-step method)
"""

from __future__ import annotations

import csv
import logging
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import Field, field_validator, model_validator
from scipy.optimize import minimize

from stages.common import StageConfig, write_json_atomic
from stages.errors import ConfigError, DataValidationError

log = logging.getLogger(__name__)

CSV_COLUMNS = ("N", "D", "C", "loss")
FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D (forward + backward), as in Chinchilla's approaches 2 and 3

# Chinchilla (Hoffmann et al. 2022, Approach 3) constants, for tests and as a documented reference.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


class Run(NamedTuple):
    """One training run of a sweep: parameters, tokens, compute (FLOPs) and final loss."""

    N: float
    D: float
    C: float
    loss: float


# ---------------------------------------------------------------------------------------------
# sweep plan
# ---------------------------------------------------------------------------------------------


class SweepPrior(StrEnum):
    tokens_per_param = "tokens_per_param"  # D/N = r  =>  N = sqrt(C / (6 r))
    power_law = "power_law"  # N = coef * (C / 6)^exponent


class SweepConfig(StageConfig):
    """IsoFLOP sweep plan: budgets, sizes per budget and the prior optimum they centre on."""

    budgets: tuple[float, ...] = Field(
        default=(1e12, 3e12, 1e13, 3e13, 1e14),
        description="Compute budgets C in FLOPs (C = 6 N D); one IsoFLOP curve each.")
    sizes_per_budget: int = Field(default=5, description="Model sizes per budget (>= 3, a parabola needs 3).")
    spread: float = Field(
        default=4.0,
        description="Multiplicative half-width of the size range: sizes span [N*/spread, N*·spread] log-evenly "
                    "around the prior optimum N*.")
    prior: SweepPrior = Field(default=SweepPrior.tokens_per_param,
                              description="How the prior optimum N*(C) is chosen: tokens_per_param | power_law.")
    tokens_per_param: float = Field(default=20.0,
                                    description="Prior D/N ratio (Chinchilla: ~20) for prior=tokens_per_param.")
    prior_coef: float = Field(default=0.6, description="G in N* = G (C/6)^exponent for prior=power_law.")
    prior_exponent: float = Field(default=0.5, description="Exponent in N* = G (C/6)^exponent for prior=power_law.")
    min_params: float = Field(default=1e4,
                              description="Smallest model size allowed; smaller planned sizes are dropped.")
    max_params: float = Field(default=1e10, description="Largest model size allowed; larger planned sizes are dropped.")
    jitter: float = Field(default=0.0,
                          description="Seeded log-uniform jitter of each size, as a fraction of the log step "
                                      "(0 = none).")
    seed: int = Field(default=0, description="Seed of the size jitter (the plan is deterministic given the config).")
    head_dim: int = Field(default=8, ge=1, description="Attention head size of the sweep's model shapes (and of the "
                          "model `size: auto` builds from the fit).")
    aspect: float = Field(default=16.0, gt=0, description="Preferred width per layer (dim / n_layers) of those shapes.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("budgets: name at least one compute budget")
        if any(not math.isfinite(c) or c <= 0 for c in v):
            raise ValueError(f"budgets: every budget must be finite and > 0, got {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"budgets: budgets must be distinct, got {list(v)}")
        return tuple(sorted(v))

    @field_validator("sizes_per_budget")
    @classmethod
    def _sizes(cls, v: int) -> int:
        if v < 3:
            raise ValueError(f"sizes_per_budget: must be >= 3 (a parabola needs 3 points), got {v}")
        return v

    @field_validator("spread")
    @classmethod
    def _spread(cls, v: float) -> float:
        if not v > 1.0:
            raise ValueError(f"spread: must be > 1 (a multiplicative half-width), got {v}")
        return v

    @field_validator("tokens_per_param", "prior_coef", "min_params", "max_params")
    @classmethod
    def _positive(cls, v: float, info: Any) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{info.field_name}: must be finite and > 0, got {v}")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, v: float) -> float:
        if not 0.0 <= v < 0.5:
            raise ValueError(f"jitter: must be in [0, 0.5), got {v}")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> SweepConfig:
        if self.min_params >= self.max_params:
            raise ValueError(f"min_params: must be < max_params ({self.min_params} >= {self.max_params})")
        return self


PRIORS: dict[SweepPrior, Callable[[SweepConfig, float], float]] = {
    SweepPrior.tokens_per_param: lambda cfg, c: math.sqrt(c / (FLOPS_PER_PARAM_TOKEN * cfg.tokens_per_param)),
    SweepPrior.power_law: lambda cfg, c: cfg.prior_coef * (c / FLOPS_PER_PARAM_TOKEN) ** cfg.prior_exponent,
}


def plan_sweep(cfg: SweepConfig) -> list[dict[str, float]]:
    """IsoFLOP plan: ``[{"C", "N", "D"}, ...]`` sorted by budget then size, ``D = C / (6 N)``.

    ``N`` is rounded to a whole parameter count. Sizes outside ``[min_params, max_params]`` are dropped
    (logged); a budget left with fewer than 3 sizes raises :class:`ConfigError`.
    """
    rng = np.random.default_rng(cfg.seed)
    steps = np.linspace(-1.0, 1.0, cfg.sizes_per_budget)
    step = 2.0 / (cfg.sizes_per_budget - 1)
    plan: list[dict[str, float]] = []
    for c in cfg.budgets:
        center = PRIORS[cfg.prior](cfg, c)
        offsets = steps + (rng.uniform(-cfg.jitter, cfg.jitter, size=steps.shape) * step if cfg.jitter else 0.0)
        sizes = sorted({float(round(center * cfg.spread ** o)) for o in offsets})
        kept = [n for n in sizes if cfg.min_params <= n <= cfg.max_params]
        if len(kept) < len(sizes):
            log.info("budget C=%.3g: dropped %d size(s) outside [min_params, max_params]", c, len(sizes) - len(kept))
        if len(kept) < 3:
            raise ConfigError(
                f"min_params/max_params: budget C={c:.3g} keeps only {len(kept)} size(s) in "
                f"[{cfg.min_params:.3g}, {cfg.max_params:.3g}] around N*={center:.3g}; "
                "widen the bounds or change budgets")
        plan.extend({"C": float(c), "N": n, "D": float(c) / (FLOPS_PER_PARAM_TOKEN * n)} for n in kept)
    log.info("planned %d runs over %d budgets", len(plan), len(cfg.budgets))
    return plan


# ---------------------------------------------------------------------------------------------
# runs CSV
# ---------------------------------------------------------------------------------------------


def write_runs(runs: Sequence[Sequence[float]], csv_path: str | Path) -> None:
    """Write runs ``(N, D, C, loss)`` as CSV with header ``N,D,C,loss`` (full float precision)."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in runs:
            w.writerow([repr(float(x)) for x in r])
    os.replace(tmp, path)


def load_runs(csv_path: str | Path) -> list[Run]:
    """Read runs from a CSV with header ``N,D,C,loss`` (any column order; extra columns ignored).

    Every value must be a finite number > 0; errors name the file, line (1 = header) and column.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DataValidationError("runs CSV not found; write it with write_runs or point runs_csv at it",
                                  file=str(path))
    runs: list[Run] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataValidationError("empty file; expected header N,D,C,loss", file=str(path), line=1)
        header = [h.strip() for h in header]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DataValidationError(f"header lacks column(s) {missing}; expected N,D,C,loss, got {header}",
                                      file=str(path), line=1, field=missing[0])
        idx = {c: header.index(c) for c in CSV_COLUMNS}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            values = []
            for col in CSV_COLUMNS:
                if idx[col] >= len(row):
                    raise DataValidationError(f"row has {len(row)} cells, column {col} is missing",
                                              file=str(path), line=lineno, field=col)
                cell = row[idx[col]].strip()
                try:
                    x = float(cell)
                except ValueError:
                    raise DataValidationError(f"not a number: {cell!r}", file=str(path), line=lineno,
                                              field=col) from None
                if not (math.isfinite(x) and x > 0):
                    raise DataValidationError(f"must be finite and > 0, got {cell!r}",
                                              file=str(path), line=lineno, field=col)
                values.append(x)
            runs.append(Run(*values))
    if not runs:
        raise DataValidationError("no runs after the header", file=str(path), line=2)
    return runs


def _as_arrays(runs: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arr = np.asarray([tuple(map(float, r)) for r in runs], dtype=np.float64).reshape(-1, 4)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise DataValidationError("every run's N, D, C and loss must be finite and > 0")
    return arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]


# ---------------------------------------------------------------------------------------------
# fit config
# ---------------------------------------------------------------------------------------------


def _grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    n = int(round((stop - start) / step)) + 1
    return tuple(float(start + i * step) for i in range(n))


class FitConfig(StageConfig):
    """IsoFLOP + parametric (Huber, L-BFGS-B from an init grid) fits and their bootstrap."""

    huber_delta: float = Field(default=1e-3, description="Huber delta on the log-loss residual (Chinchilla: 1e-3).")
    alpha_grid: tuple[float, ...] = Field(default=_grid(0.0, 2.0, 0.5),
                                           description="Initial alphas (Chinchilla: 0..2 step 0.5).")
    beta_grid: tuple[float, ...] = Field(default=_grid(0.0, 2.0, 0.5),
                                          description="Initial betas (Chinchilla: 0..2 step 0.5).")
    e_grid: tuple[float, ...] = Field(default=_grid(-1.0, 1.0, 0.5),
                                       description="Initial e = ln E (Chinchilla: -1..1 step 0.5).")
    a_grid: tuple[float, ...] = Field(default=_grid(0.0, 25.0, 5.0),
                                       description="Initial a = ln A (Chinchilla: 0..25 step 5).")
    b_grid: tuple[float, ...] = Field(default=_grid(0.0, 25.0, 5.0),
                                       description="Initial b = ln B (Chinchilla: 0..25 step 5).")
    max_starts: int = Field(
        default=32,
        description="Run L-BFGS only from the max_starts grid points with the lowest initial objective "
                    "(0 = from every grid point, as Chinchilla: 4500 starts, ~2 min on a CPU core).")
    bootstrap_starts: int = Field(
        default=1,
        description="Starts per bootstrap replicate: the full-data optimum, plus (bootstrap_starts - 1) best grid "
                    "points by initial objective.")
    maxiter: int = Field(default=2000, description="L-BFGS-B iteration cap per start.")
    ftol: float = Field(default=1e-15,
                        description="L-BFGS-B relative objective tolerance (the Huber objective is tiny).")
    gtol: float = Field(default=1e-12, description="L-BFGS-B projected-gradient tolerance.")
    min_sizes: int = Field(default=3, description="Distinct sizes a budget needs to enter the IsoFLOP fit (>= 3).")
    budget_rtol: float = Field(default=1e-6,
                               description="Runs whose C agree within this relative tolerance share a budget.")
    n_boot: int = Field(default=100, description="Bootstrap replicates for confidence intervals (0 = none).")
    ci_level: float = Field(default=0.95, description="Two-sided percentile interval (0.95 -> 2.5/97.5 percentiles).")
    seed: int = Field(default=0, description="Seed of the bootstrap resampling.")

    @field_validator("alpha_grid", "beta_grid", "e_grid", "a_grid", "b_grid")
    @classmethod
    def _nonempty(cls, v: tuple[float, ...], info: Any) -> tuple[float, ...]:
        if not v or any(not math.isfinite(x) for x in v):
            raise ValueError(f"{info.field_name}: must hold at least one finite value, got {list(v)}")
        return v

    @field_validator("huber_delta", "ftol", "gtol", "budget_rtol")
    @classmethod
    def _pos(cls, v: float, info: Any) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{info.field_name}: must be finite and > 0, got {v}")
        return v

    @field_validator("max_starts", "n_boot")
    @classmethod
    def _nonneg(cls, v: int, info: Any) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name}: must be >= 0, got {v}")
        return v

    @field_validator("bootstrap_starts", "maxiter")
    @classmethod
    def _pos_int(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name}: must be >= 1, got {v}")
        return v

    @field_validator("min_sizes")
    @classmethod
    def _min_sizes(cls, v: int) -> int:
        if v < 3:
            raise ValueError(f"min_sizes: a parabola needs >= 3 distinct sizes, got {v}")
        return v

    @field_validator("ci_level")
    @classmethod
    def _level(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"ci_level: must be in (0, 1), got {v}")
        return v

    def init_grid(self) -> np.ndarray:
        """All initialisations as rows ``(e, a, b, alpha, beta)``, in a fixed order."""
        mesh = np.meshgrid(self.e_grid, self.a_grid, self.b_grid, self.alpha_grid, self.beta_grid, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1)


# ---------------------------------------------------------------------------------------------
# IsoFLOP fit (Approach 2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IsoflopFit:
    """Per-budget parabola vertices and the power laws ``N_opt = exp(log_G) C^a``, ``D_opt = exp(log_G_D) C^b``."""

    a: float
    b: float
    log_G: float
    log_G_D: float
    budgets: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # budgets left out, with the reason

    def n_opt(self, C: float) -> float:
        return float(math.exp(self.log_G + self.a * math.log(C)))


def group_budgets(C: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Budget label per run: runs whose C agree within ``rtol`` (relative) share a label (0, 1, ... by C)."""
    order = np.argsort(C, kind="stable")
    labels = np.empty(len(C), dtype=np.int64)
    label, ref = -1, None
    for i in order:
        if ref is None or abs(C[i] - ref) > rtol * ref:
            label, ref = label + 1, C[i]
        labels[i] = label
    return labels


def fit_parabola(N: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """Least-squares ``loss = c2 x^2 + c1 x + c0`` with ``x = ln N``; returns ``(coeffs, N_opt, loss_min)``.

    ``None`` when fewer than 3 distinct sizes or the parabola opens downwards (no minimum).
    """
    x = np.log(N)
    if len(np.unique(x)) < 3:
        return None
    coeffs = np.polyfit(x, loss, 2)
    c2, c1, c0 = coeffs
    if not c2 > 0:
        return None
    x_opt = -c1 / (2.0 * c2)
    return coeffs, float(math.exp(x_opt)), float(c0 - c1 * c1 / (4.0 * c2))


def fit_isoflop(runs: Sequence[Sequence[float]], *, min_sizes: int = 3, budget_rtol: float = 1e-6) -> IsoflopFit:
    """Chinchilla Approach 2 on ``runs`` ``(N, D, C, loss)``.

    A budget enters the power-law regression only when its parabola has a minimum inside the sizes swept
    for it (an edge minimum is an extrapolation, not a measurement). Raises :class:`DataValidationError`
    with fewer than 2 usable budgets.
    """
    N, _D, C, L = _as_arrays(runs)
    labels = group_budgets(C, budget_rtol)
    budgets: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for lab in range(labels.max() + 1):
        m = labels == lab
        c = float(np.exp(np.mean(np.log(C[m]))))
        if len(np.unique(N[m])) < min_sizes:
            log.info("isoflop: budget C=%.3g has %d distinct size(s) < %d, skipped", c, len(np.unique(N[m])), min_sizes)
            continue
        res = fit_parabola(N[m], L[m])
        if res is None:
            log.info("isoflop: budget C=%.3g has no minimum (parabola opens downwards), skipped", c)
            continue
        coeffs, n_opt, loss_min = res
        lo, hi = float(N[m].min()), float(N[m].max())
        if not lo <= n_opt <= hi:  # the vertex is an extrapolation: this budget did not resolve its minimum
            reason = (f"loss minimum outside the swept sizes [{lo:.3g}, {hi:.3g}] (parabola vertex at N={n_opt:.3g}); "
                      f"sweep {'smaller' if n_opt < lo else 'larger'} sizes to bracket it")
            log.info("isoflop: budget C=%.3g skipped: %s", c, reason)
            skipped.append({"C": c, "reason": reason})
            continue
        budgets.append({"C": c, "N_opt": n_opt, "D_opt": c / (FLOPS_PER_PARAM_TOKEN * n_opt), "loss_min": loss_min,
                        "coeffs": [float(x) for x in coeffs]})
    if len(budgets) < 2:
        raise DataValidationError(
            f"isoflop fit needs >= 2 budgets with >= {min_sizes} distinct sizes and a loss minimum, got {len(budgets)}",
            field="C")
    logC = np.log([bud["C"] for bud in budgets])
    a, log_G = np.polyfit(logC, np.log([bud["N_opt"] for bud in budgets]), 1)
    b, log_G_D = np.polyfit(logC, np.log([bud["D_opt"] for bud in budgets]), 1)
    return IsoflopFit(a=float(a), b=float(b), log_G=float(log_G), log_G_D=float(log_G_D), budgets=budgets,
                      skipped=skipped)


# ---------------------------------------------------------------------------------------------
# parametric fit (Approach 3)
# ---------------------------------------------------------------------------------------------


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss, elementwise: ``r^2 / 2`` for ``|r| <= delta``, else ``delta (|r| - delta / 2)``."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    """d huber / d r: ``r`` inside ``[-delta, delta]``, ``delta * sign(r)`` outside."""
    return np.clip(r, -delta, delta)


def parametric_objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                         delta: float = 1e-3) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of ``LSE(a - alpha lnN, b - beta lnD, e) - ln L`` and its exact gradient.

    ``theta = (e, a, b, alpha, beta)``; ``logN, logD, logL``: ``(n,)``. Returns ``(value, grad (5,))``.
    With softmax weights ``w = softmax(t1, t2, t3)`` of the three terms, ``d pred/d(e, a, b, alpha, beta)
    = (w3, w1, w2, -w1 lnN, -w2 lnD)``.
    """
    e, a, b, alpha, beta = theta
    t = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    tmax = t.max(axis=0)
    ex = np.exp(t - tmax)
    s = ex.sum(axis=0)
    pred = tmax + np.log(s)
    r = pred - logL
    value = float(huber(r, delta).sum())
    g = huber_grad(r, delta) / s  # (n,), folds in the softmax denominator
    w1, w2, w3 = ex[0] * g, ex[1] * g, ex[2] * g
    grad = np.array([w3.sum(), w1.sum(), w2.sum(), -(w1 * logN).sum(), -(w2 * logD).sum()])
    return value, grad


def _objective_batch(thetas: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                     delta: float) -> np.ndarray:
    """Objective for many ``theta`` rows at once: ``(k, 5) -> (k,)``."""
    e, a, b, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
    t = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(thetas), len(logN)))])
    pred = np.logaddexp(np.logaddexp(t[0], t[1]), t[2])
    return huber(pred - logL, delta).sum(axis=1)


@dataclass(frozen=True)
class ParametricFit:
    """``L = E + A/N^alpha + B/D^beta`` and its compute-optimal allocation ``N_opt = G (C/6)^a``."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    theta: tuple[float, ...]  # (e, a, b, alpha, beta) as optimised, unrounded

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        _e, la, lb, al, be = self.theta
        return float(math.exp((math.log(al / be) + la - lb) / (al + be)))

    def n_opt(self, C: float) -> float:
        return self.G * (C / FLOPS_PER_PARAM_TOKEN) ** self.a

    def loss(self, N: float, D: float) -> float:
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta


def _minimize_from(starts: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                   cfg: FitConfig) -> tuple[np.ndarray, float] | None:
    best_x, best_f = None, math.inf
    for x0 in starts:
        res = minimize(parametric_objective, x0, args=(logN, logD, logL, cfg.huber_delta), jac=True,
                       method="L-BFGS-B", options={"maxiter": cfg.maxiter, "ftol": cfg.ftol, "gtol": cfg.gtol})
        if np.all(np.isfinite(res.x)) and math.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    return None if best_x is None else (best_x, best_f)


def _ranked_grid(cfg: FitConfig, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, k: int) -> np.ndarray:
    grid = cfg.init_grid()
    if k <= 0 or k >= len(grid):
        return grid
    f0 = _objective_batch(grid, logN, logD, logL, cfg.huber_delta)
    return grid[np.argsort(f0, kind="stable")[:k]]


def _to_fit(x: np.ndarray, f: float) -> ParametricFit | None:
    e, la, lb, al, be = (float(v) for v in x)
    if not (al > 0 and be > 0):
        return None
    if max(e, la, lb, (math.log(al / be) + la - lb) / (al + be)) > 700:  # exp() would overflow: degenerate optimum
        return None
    return ParametricFit(E=math.exp(e), A=math.exp(la), B=math.exp(lb), alpha=al, beta=be, objective=f,
                         theta=(e, la, lb, al, be))


def fit_parametric(runs: Sequence[Sequence[float]], cfg: FitConfig | None = None, *,
                   starts: np.ndarray | None = None) -> ParametricFit | None:
    """Chinchilla Approach 3 on ``runs`` ``(N, D, C, loss)``: best L-BFGS-B optimum over the init grid.

    ``starts`` overrides the initialisations (rows ``(e, a, b, alpha, beta)``). Returns ``None`` when no
    start converges to finite values with ``alpha, beta > 0`` (compute-optimal exponents undefined).
    """
    cfg = cfg or FitConfig()
    N, D, _C, L = _as_arrays(runs)
    if len(N) < 5:
        log.warning("parametric fit needs >= 5 runs for 5 parameters, got %d", len(N))
        return None
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    if starts is None:
        starts = _ranked_grid(cfg, logN, logD, logL, cfg.max_starts)
    best = _minimize_from(starts, logN, logD, logL, cfg)
    fit = None if best is None else _to_fit(*best)
    if fit is None:
        log.info("parametric fit: no start reached finite parameters with alpha, beta > 0")
    return fit


# ---------------------------------------------------------------------------------------------
# bootstrap, recommendation, stage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingFit:
    """Both fits; either is ``None`` when it failed."""

    isoflop: IsoflopFit | None
    parametric: ParametricFit | None


def recommend(fit: ScalingFit, C: float) -> dict[str, float]:
    """Compute-optimal ``{"C", "N", "D"}`` for budget ``C`` (parametric law; IsoFLOP power law as fallback)."""
    if not (math.isfinite(C) and C > 0):
        raise ConfigError(f"target_budget: must be finite and > 0, got {C}")
    if fit.parametric is not None:
        n = fit.parametric.n_opt(C)
    elif fit.isoflop is not None:
        log.warning("recommend: parametric fit unavailable, using the IsoFLOP power law")
        n = fit.isoflop.n_opt(C)
    else:
        raise DataValidationError("recommend: neither the parametric nor the IsoFLOP fit succeeded")
    return {"C": float(C), "N": float(n), "D": float(C / (FLOPS_PER_PARAM_TOKEN * n))}


def _interval(values: list[float], level: float) -> list[float] | None:
    if not values:
        return None
    q = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(np.asarray(values), [q, 100.0 - q])
    return [float(lo), float(hi)]


def bootstrap_ci(runs: Sequence[Sequence[float]], cfg: FitConfig, full: ParametricFit | None = None) -> dict[str, Any]:
    """Percentile intervals of (alpha, beta, a, b) parametric and (a, b) IsoFLOP over ``cfg.n_boot`` resamples.

    Runs are resampled with replacement within each budget (so every IsoFLOP curve keeps its size count),
    from ``np.random.default_rng(cfg.seed)``. Parametric replicates start from the full-data optimum and
    the ``bootstrap_starts - 1`` best grid points. Failed replicates are counted, not hidden.
    """
    N, D, C, L = _as_arrays(runs)
    rows = np.stack([N, D, C, L], axis=1)
    labels = group_budgets(C, cfg.budget_rtol)
    groups = [np.flatnonzero(labels == lab) for lab in range(labels.max() + 1)]
    rng = np.random.default_rng(cfg.seed)
    par: dict[str, list[float]] = {"alpha": [], "beta": [], "a": [], "b": []}
    iso: dict[str, list[float]] = {"a": [], "b": []}
    failed = {"parametric": 0, "isoflop": 0}
    for _ in range(cfg.n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        sample = rows[idx]
        try:
            fi = fit_isoflop(sample, min_sizes=cfg.min_sizes, budget_rtol=cfg.budget_rtol)
            iso["a"].append(fi.a)
            iso["b"].append(fi.b)
        except DataValidationError:
            failed["isoflop"] += 1
        logN, logD, logL = np.log(sample[:, 0]), np.log(sample[:, 1]), np.log(sample[:, 3])
        n_grid = cfg.bootstrap_starts - 1 if full is not None else cfg.bootstrap_starts
        parts = [np.asarray(full.theta)[None, :]] if full is not None else []
        if n_grid > 0:
            parts.append(_ranked_grid(cfg, logN, logD, logL, n_grid))
        starts = np.vstack(parts)
        fp = fit_parametric(sample, cfg, starts=starts)
        if fp is None:
            failed["parametric"] += 1
            continue
        for k in par:
            par[k].append(getattr(fp, k))
    return {
        "level": cfg.ci_level,
        "n_boot": cfg.n_boot,
        "failed": failed,
        "parametric": {k: _interval(v, cfg.ci_level) for k, v in par.items()},
        "isoflop": {k: _interval(v, cfg.ci_level) for k, v in iso.items()},
    }


def plot_isoflop(runs: Sequence[Sequence[float]], iso: IsoflopFit | None, path: str | Path,
                 budget_rtol: float = 1e-6) -> None:
    """Llama 3 style IsoFLOP figure: loss vs N (log x), points and fitted parabola per budget, minima marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, _D, C, L = _as_arrays(runs)
    labels = group_budgets(C, budget_rtol)
    n_lab = int(labels.max()) + 1
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(n_lab, 2)))
    fits = {round(math.log(b["C"]), 6): b for b in (iso.budgets if iso else [])}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for lab in range(n_lab):
        m = labels == lab
        c = float(np.exp(np.mean(np.log(C[m]))))
        ax.scatter(N[m], L[m], color=colors[lab], s=18, zorder=3, label=f"{c:.2g} FLOPs")
        bud = fits.get(round(math.log(c), 6))
        if bud is not None:
            x = np.linspace(np.log(N[m].min()) - 0.2, np.log(N[m].max()) + 0.2, 100)
            ax.plot(np.exp(x), np.polyval(bud["coeffs"], x), color=colors[lab], lw=1.2)
            ax.scatter([bud["N_opt"]], [bud["loss_min"]], color=colors[lab], marker="*", s=120,
                       edgecolor="black", linewidths=0.6, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("Parameters N")
    ax.set_ylabel("Loss")
    title = "IsoFLOP curves"
    if iso is not None:
        title += f"  (N_opt ∝ C^{iso.a:.3f}, D_opt ∝ C^{iso.b:.3f})"
    ax.set_title(title)
    ax.legend(title="Compute budget", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def fit_scaling(cfg: FitConfig, runs_csv: Path, out_dir: Path, target_budget: float,
                downstream_points: Path | None = None) -> dict[str, Any]:
    """Fit both laws to the runs in ``runs_csv``; write ``out_dir/fit.json`` and ``out_dir/isoflop.png``.
    With ``downstream_points`` (the sweep models' benchmark ``bpb`` and accuracy, ``downstream.json``) also
    Llama 3's two-step prediction of the benchmarks at ``target_budget``: ``fit.json``'s ``downstream`` key and
    ``downstream.png``.

    Returns the ``fit.json`` content (shape in the module docstring). A failed fit leaves its numbers as
    ``null`` (parametric) or raises when both fail (nothing to recommend).
    """
    if not (math.isfinite(target_budget) and target_budget > 0):
        raise ConfigError(f"target_budget: must be finite and > 0, got {target_budget}")
    runs = load_runs(runs_csv)
    log.info("fitting scaling laws to %d runs from %s", len(runs), runs_csv)
    try:
        iso = fit_isoflop(runs, min_sizes=cfg.min_sizes, budget_rtol=cfg.budget_rtol)
    except DataValidationError as err:
        log.warning("isoflop fit failed: %s", err)
        iso = None
    for skip in iso.skipped if iso else []:
        log.warning("isoflop: budget C=%.3g left out: %s", skip["C"], skip["reason"])
    par = fit_parametric(runs, cfg)
    if par is None:
        log.warning("parametric fit failed: no start reached finite parameters with alpha, beta > 0")
    fit = ScalingFit(isoflop=iso, parametric=par)
    rec = recommend(fit, target_budget)
    ci = bootstrap_ci(runs, cfg, par)
    keys = ("E", "A", "B", "alpha", "beta", "a", "b")
    result = {
        "isoflop": {"a": iso.a if iso else None, "b": iso.b if iso else None, "budgets": iso.budgets if iso else []},
        "parametric": {k: (float(getattr(par, k)) if par else None) for k in keys},
        "ci": ci,
        "recommendation": rec,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_isoflop(runs, iso, out_dir / "isoflop.png", cfg.budget_rtol)
    # fit.json keeps its contract exactly; what was left out and why goes beside it
    write_json_atomic(out_dir / "diagnostics.json", {"isoflop_skipped": iso.skipped if iso else [],
                                                      "isoflop_failed": iso is None, "parametric_failed": par is None,
                                                      "bootstrap_failed": ci["failed"], "runs": len(runs)})
    if downstream_points is not None and Path(downstream_points).is_file():
        import json

        from stages.downstream import DownstreamFitConfig, plot_two_step, two_step_fit

        d = json.loads(Path(downstream_points).read_text())
        dcfg = DownstreamFitConfig.model_validate(d["config"])
        result["downstream"] = {**two_step_fit(d["points"], d["anchors"], d["chance"], target_budget, dcfg),
                                "anchors": sorted({a["label"] for a in d["anchors"]}),
                                "anchors_missing": d.get("anchors_missing", []), "config": d["config"],
                                "points_file": str(downstream_points)}
        plot_two_step(result["downstream"], d["points"], d["anchors"], out_dir / "downstream.png")
    write_json_atomic(out_dir / "fit.json", result)
    log.info("scaling fit: parametric a=%s b=%s, isoflop a=%s; recommend N=%.3g D=%.3g for C=%.3g",
             result["parametric"]["a"], result["parametric"]["b"], result["isoflop"]["a"], rec["N"], rec["D"], rec["C"])
    return result
