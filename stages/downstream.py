"""Predicting downstream results from the scaling sweep: Llama 3's two-step method.

Llama 3 (section 3.2.1) forecast its flagship's benchmark accuracy before training it, in two steps:

1. the normalised negative log-likelihood of the correct answer, here bits per byte of the gold continuation
   (``bpb``, tokenizer-free), of the compute-optimal model at each sweep budget, against training compute:
   a power law, ``bpb(C) = A * C^-alpha`` (a line in log-log), fitted by least squares;
2. accuracy against that log-likelihood: a sigmoid from chance to ``ceiling``,
   ``acc(bpb) = chance + (ceiling - chance) / (1 + exp(k * (bpb - b0)))``, fitted on every sweep model plus
   stronger anchor models (Llama 3 anchored with Llama 2; herd by default with the imported SmolLM2-135M),
   since small models alone sit at chance.

``two_step_fit`` fits both per task and predicts the main run's ``bpb`` and accuracy at its compute with
intervals: step 1's prediction interval (ordinary least squares, t distribution) combined with a bootstrap of
step 2's sweep points (the anchors in every replicate). ``score_models`` measures the points (the in-loop probe's scorer, a fixed seeded item sample).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from stages.common import StageConfig

log = logging.getLogger(__name__)


class DownstreamFitConfig(StageConfig):
    """Llama 3's two-step prediction of benchmark results from the sweep."""

    tasks: tuple[str, ...] = Field(("hellaswag", "arc_easy", "piqa"), description="benchmarks to predict "
                                   "(multiple choice; accuracy is acc_norm)")
    items: int = Field(100, ge=1, description="items per benchmark (a fixed seeded sample, the same for every model)")
    anchors: tuple[str, ...] = Field(("models/smollm2-135m",), description="stronger model folders that anchor the "
                                     "sigmoid (relative: from $HERD_HOME; a missing one is skipped and listed)")
    ceiling: float = Field(1.0, gt=0, le=1, description="accuracy the sigmoid rises to")
    n_boot: int = Field(200, ge=0, description="bootstrap replicates of the sigmoid fit (0: none)")
    level: float = Field(0.9, gt=0, lt=1, description="interval level of the predictions")
    seed: int = Field(0, description="bootstrap and item-sample seed")


# ---------------------------------------------------------------------------------------------- step 1


def fit_power_law(compute: Sequence[float], bpb: Sequence[float]) -> dict[str, Any]:
    """``log bpb = log A - alpha log C`` by least squares: ``{"A", "alpha", "n", "resid_sd", "cov"}`` (the
    covariance of (intercept, slope) in natural-log space, for prediction intervals)."""
    x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(bpb, float))
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError(f"a power law needs bpb at two or more compute budgets (got {n})")
    X = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = n - 2
    s2 = float(resid @ resid / dof) if dof > 0 else float("nan")
    cov = s2 * np.linalg.inv(X.T @ X) if dof > 0 else np.full((2, 2), np.nan)
    return {"A": float(math.exp(coef[0])), "alpha": float(-coef[1]), "n": n, "resid_sd": math.sqrt(s2) if dof > 0
            else None, "cov": cov.tolist(), "mean_log_c": float(x.mean())}


def predict_power_law(fit: dict[str, Any], compute: float, level: float) -> tuple[float, float, float]:
    """bpb at ``compute`` with its ``level`` prediction interval (log-space OLS, t with n - 2 degrees of freedom;
    no interval, (v, nan, nan), from two points)."""
    from scipy import stats

    lc = math.log(compute)
    mean = math.log(fit["A"]) - fit["alpha"] * lc
    if fit["resid_sd"] is None:
        return math.exp(mean), float("nan"), float("nan")
    cov = np.asarray(fit["cov"])
    g = np.array([1.0, lc])
    se = math.sqrt(float(g @ cov @ g) + fit["resid_sd"] ** 2)
    t = float(stats.t.ppf(0.5 + level / 2, fit["n"] - 2))
    return math.exp(mean), math.exp(mean - t * se), math.exp(mean + t * se)


# ---------------------------------------------------------------------------------------------- step 2


def sigmoid_acc(bpb: np.ndarray | float, k: float, b0: float, chance: float, ceiling: float) -> np.ndarray:
    """``chance + (ceiling - chance) / (1 + exp(k (bpb - b0)))``: accuracy falls from ceiling to chance as bpb rises."""
    z = np.clip(k * (np.asarray(bpb, float) - b0), -60, 60)
    return chance + (ceiling - chance) / (1.0 + np.exp(z))


def fit_sigmoid(bpb: Sequence[float], acc: Sequence[float], chance: float, ceiling: float,
                start: dict[str, float] | None = None) -> dict[str, float]:
    """k > 0 and b0 by least squares on accuracy, from a grid of starts (or from ``start``, a previous fit)."""
    from scipy.optimize import least_squares

    x, y = np.asarray(bpb, float), np.asarray(acc, float)
    if len(x) < 2:
        raise ValueError("a sigmoid needs two or more (bpb, accuracy) points")

    def resid(p):
        return sigmoid_acc(x, math.exp(p[0]), p[1], chance, ceiling) - y

    best = None
    starts = [(start["k"], start["b0"])] if start else [(k0, b) for k0 in (0.5, 2.0, 8.0)
                                                        for b in np.quantile(x, [0.1, 0.5, 0.9])]
    for k0, b_start in starts:
        x0 = [min(max(math.log(k0), -4.5), 5.2), min(max(float(b_start), -9.0), 19.0)]
        r = least_squares(resid, x0=x0, method="trf", bounds=([-4.6, -10.0], [5.3, 20.0]))  # k in [0.01, 200]
        if best is None or r.cost < best.cost:
            best = r
    return {"k": float(math.exp(best.x[0])), "b0": float(best.x[1]), "rmse": float(math.sqrt(2 * best.cost / len(x)))}


# ---------------------------------------------------------------------------------------------- both


def two_step_fit(points: Sequence[dict], anchors: Sequence[dict], chance: dict[str, float], target_c: float,
                 cfg: DownstreamFitConfig) -> dict[str, Any]:
    """Fit both steps per task and predict at ``target_c``.

    Args:
        points: sweep models, ``{"C", "N", "task", "bpb", "acc", "loss"}`` (``loss``: the sweep's held-out loss;
            the compute-optimal model of each budget is the one with the lowest).
        anchors: stronger models, ``{"name", "task", "bpb", "acc"}`` (step 2 only: their compute is not the sweep's).
        chance: each task's chance accuracy.
        target_c: the main run's compute (6 N D).

    Returns ``{"target_C", "tasks": {task: {"step1", "step2", "prediction": {"bpb": [v, lo, hi],
    "acc": [v, lo, hi] or None}, "optimal": [...]}}}``; accuracy is None (with an ``acc_note``) where no point
    lies clearly above chance on these items: the sigmoid cannot be placed.
    """
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, Any] = {"target_C": float(target_c), "level": cfg.level, "tasks": {}}
    for task in sorted({p["task"] for p in points}):
        pts = [p for p in points if p["task"] == task]
        best: dict[float, dict] = {}
        for p in pts:  # the compute-optimal model of each budget
            if p["C"] not in best or p["loss"] < best[p["C"]]["loss"]:
                best[p["C"]] = p
        opt = [best[c] for c in sorted(best)]
        step1 = fit_power_law([p["C"] for p in opt], [p["bpb"] for p in opt])
        bpb_hat, bpb_lo, bpb_hi = predict_power_law(step1, target_c, cfg.level)
        anc = [a for a in anchors if a["task"] == task]
        xs = np.array([p["bpb"] for p in pts] + [a["bpb"] for a in anc])
        ys = np.array([p["acc"] for p in pts] + [a["acc"] for a in anc])
        ch = chance[task]
        step2 = fit_sigmoid(xs, ys, ch, cfg.ceiling)
        acc_hat = float(sigmoid_acc(bpb_hat, step2["k"], step2["b0"], ch, cfg.ceiling))
        lo = hi = float("nan")
        # the sigmoid rises from chance through points above it; with none clearly above (2 binomial standard errors
        # of chance on these items) its midpoint and slope are anyone's guess, and so is an accuracy read off it
        floor = 2 * math.sqrt(ch * (1 - ch) / cfg.items)
        identified = bool(np.any(ys - ch > floor))
        if cfg.n_boot and len(xs) >= 3 and identified:
            from scipy import stats

            # step 1's uncertainty: bpb drawn from its predictive t distribution (log space); step 2's: refits on
            # resampled points
            sd = (math.log(bpb_hi) - math.log(bpb_hat)) / float(stats.t.ppf(0.5 + cfg.level / 2, step1["n"] - 2)) \
                if math.isfinite(bpb_hi) else 0.0
            draws = []
            n_pts = len(pts)
            for _ in range(cfg.n_boot):  # the sweep's points resampled; the anchors, few and far, kept in every replicate
                idx = np.concatenate([rng.integers(0, n_pts, n_pts), np.arange(n_pts, len(xs))])
                if np.ptp(xs[idx]) == 0:
                    continue
                f = fit_sigmoid(xs[idx], ys[idx], ch, cfg.ceiling, start=step2)
                b = bpb_hat * math.exp(sd * float(rng.standard_t(max(1, step1["n"] - 2))) if sd else 0.0)
                draws.append(float(sigmoid_acc(b, f["k"], f["b0"], ch, cfg.ceiling)))
            if draws:
                lo, hi = (float(v) for v in np.quantile(draws, [0.5 - cfg.level / 2, 0.5 + cfg.level / 2]))
        out["tasks"][task] = {
            "step1": {k: step1[k] for k in ("A", "alpha", "n", "resid_sd")},
            "step2": {**step2, "chance": ch, "ceiling": cfg.ceiling, "points": len(pts), "anchors": len(anc)},
            "optimal": [{k: p[k] for k in ("C", "N", "bpb", "acc")} for p in opt],
            "prediction": {"bpb": [bpb_hat, bpb_lo, bpb_hi], "acc": [acc_hat, lo, hi] if identified else None},
            **({} if identified else {"acc_note": f"no model is more than {floor:.3f} above chance ({ch:.3f}) on "
                                                  "these items, so accuracy cannot be read off the sigmoid: add a "
                                                  "stronger anchor (herd models import smollm2-135m)"}),
        }
    return out


def plot_two_step(fit: dict[str, Any], points: Sequence[dict], anchors: Sequence[dict], path: Path,
                  measured: dict[str, dict] | None = None) -> None:
    """Per task: bpb against compute (step 1) and accuracy against bpb (step 2), the prediction marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(fit["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6.5), squeeze=False)
    for j, task in enumerate(tasks):
        t = fit["tasks"][task]
        pts = [p for p in points if p["task"] == task]
        ax = axes[0][j]
        ax.scatter([p["C"] for p in pts], [p["bpb"] for p in pts], s=12, c="0.6", label="sweep")
        opt = t["optimal"]
        ax.scatter([p["C"] for p in opt], [p["bpb"] for p in opt], s=20, c="C0", label="compute-optimal")
        cs = np.geomspace(min(p["C"] for p in pts), fit["target_C"] * 1.5, 50)
        ax.plot(cs, t["step1"]["A"] * cs ** -t["step1"]["alpha"], c="C0")
        v, lo, hi = t["prediction"]["bpb"]
        ax.errorbar([fit["target_C"]], [v], yerr=[[v - lo], [hi - v]] if math.isfinite(lo) else None, fmt="s",
                    c="C3", label="predicted")
        if measured and task in measured:
            ax.scatter([fit["target_C"]], [measured[task]["bpb"]], marker="*", s=80, c="k", label="measured")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("bpb of the gold answer")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        anc = [a for a in anchors if a["task"] == task]
        ax.scatter([p["bpb"] for p in pts], [p["acc"] for p in pts], s=12, c="0.6", label="sweep")
        if anc:
            ax.scatter([a["bpb"] for a in anc], [a["acc"] for a in anc], s=30, c="C2", label="anchors")
        s2 = t["step2"]
        xs = np.linspace(min([p["bpb"] for p in pts] + [a["bpb"] for a in anc]) * 0.9,
                         max(p["bpb"] for p in pts) * 1.1, 100)
        ax.plot(xs, sigmoid_acc(xs, s2["k"], s2["b0"], s2["chance"], s2["ceiling"]), c="C0")
        if t["prediction"]["acc"] is not None:
            av, alo, ahi = t["prediction"]["acc"]
            ax.errorbar([v], [av], yerr=[[av - alo], [ahi - av]] if math.isfinite(alo) else None, fmt="s", c="C3")
        if measured and task in measured:
            ax.scatter([measured[task]["bpb"]], [measured[task]["acc"]], marker="*", s=80, c="k")
        ax.set_xlabel("bpb of the gold answer")
        ax.set_ylabel("accuracy (acc_norm)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- measuring


def score_models(models: Sequence[tuple[str, str | Path, str | Path]], cfg: DownstreamFitConfig,
                 cache_dir: str | Path, device=None) -> tuple[list[dict], dict[str, float]]:
    """``bpb`` and accuracy (acc_norm) of each ``(label, model_dir, tokenizer_dir)`` on ``cfg.tasks`` (the same
    seeded items for every model). Returns ``[{"label", "task", "bpb", "acc"}]`` and each task's chance."""
    import torch

    from stages.evaluation.benchmarks import load_task
    from stages.evaluation.harness import choice_loglikelihoods, mc_metrics, sample_items
    from stages.model import load_causal_lm

    device = device or torch.device("cpu")
    tasks = [load_task(n, Path(cache_dir)) for n in cfg.tasks]
    samples = [(t.name, sample_items([i for i in t.items if i.n_choices > 0], cfg.items, 1234 + cfg.seed, t.name),
                t.chance) for t in tasks]
    from transformers import AutoTokenizer

    out = []
    for label, model_dir, tok_dir in models:
        model = load_causal_lm(model_dir).to(device).eval()
        model.config.use_cache = True
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        with torch.no_grad():
            for name, items, chance in samples:
                lls, greedy = choice_loglikelihoods(model, tok, items, [""] * len(items), batch_tokens=8192,
                                                    max_length=max_length, device=device)
                m, _, _ = mc_metrics(items, lls, greedy, chance, 2, cfg.seed)
                out.append({"label": label, "task": name, "bpb": m["bpb"], "acc": m.get("acc_norm", m["acc"])})
    return out, {t.name: t.chance for t in tasks}
