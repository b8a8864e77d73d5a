"""The data mixture, chosen by experiment (Llama 3 section 3.1.2; RegMix, Liu et al. 2024).

Llama 3 "trained small models on a data mix and used that to predict the performance of a large model trained on
that mix". RegMix makes the method a regression, and herd follows it:

1. **Sample** K mixtures around the prior (the Llama 1 table by default): Dirichlet draws with
   ``alpha = c * n_sources * prior``, the concentration ``c`` log-uniform in ``concentration`` per draw (RegMix
   samples with a range of concentrations, so the draws cover mixes near the prior and far from it). The prior
   itself is mixture 0. Every mixture respects ``max_epochs``: no source repeats more often than that in the
   mixture's token budget (a share above ``max_epochs * source_tokens / budget`` is out of bounds; the prior is
   always in).
2. **Train** one small proxy per mixture: the same model size (from the sweep's smallest budget), tokenizer,
   token budget and seed. A proxy draws windows of the prior mixture's token shards by source weight
   (``proxy_source_weights``), so it sees the sampled shares without re-tokenising.
3. **Measure** each proxy's target, lower is better: a weighted sum of benchmark ``bpb`` and held-out loss per
   source (``MixSearchConfig.target``).
4. **Regress** the target on the mixture: ridge regression linear in log-shares,
   ``target ~ b + sum_s a_s * log(share_s + eps)`` (diminishing returns per source, the shape RegMix's linear
   and Data Mixing Laws' exponential fits share). Its cross-validated quality is the Spearman rank correlation
   of leave-one-out predictions with the measured targets.
5. **Choose**: predict the target over a dense sample of in-bounds mixtures from the same distribution and take
   the mean of the ``top`` best (RegMix averages its top 100; a single argmin follows the regression's noise).
6. **Validate**: a proxy trained on the chosen mixture, measured like the others, against the prior's proxy.

The stage's pure parts are here; the proxies train in the sweep's workers (``tasks``), and ``write_shares``
writes ``shares.json`` and ``mix_search.png``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from stages.common import StageConfig, write_json_atomic
from stages.errors import ConfigError, DataValidationError

log = logging.getLogger(__name__)


class MixSearchConfig(StageConfig):
    """Llama 3's mixture experiment: proxies on sampled mixtures, a regression, the best predicted mixture."""

    mixtures: int = Field(0, ge=0, description="K: mixtures sampled around the prior, one proxy model each (the "
                          "prior gets one more). 0: no search; the configured shares stand")
    concentration: tuple[float, float] = Field((0.3, 3.0), description="range of the Dirichlet concentration c "
                                               "(log-uniform per draw; alpha = c * n_sources * prior): small c "
                                               "draws far from the prior, large c near it")
    budget: float | None = Field(None, description="a proxy's compute C (FLOPs, 6ND); None: the sweep's smallest "
                                 "budget")
    tasks: tuple[str, ...] = Field(("hellaswag", "arc_easy", "piqa"), description="benchmarks whose bpb enters "
                                   "the target (the evaluation issue's core multiple-choice tasks)")
    items: int = Field(100, ge=1, description="items per benchmark (a fixed seeded sample, the same for every proxy)")
    target: dict[str, float] = Field(default_factory=lambda: {"bpb": 1.0, "loss": 1.0}, description="the target, "
                                     "lower is better: a weighted sum of 'bpb' (mean over tasks), 'bpb/<task>', "
                                     "'loss' (held-out loss, mean over sources) and 'loss/<source>'")
    ridge: float = Field(0.05, ge=0, description="ridge penalty of the regression (per mixture; on centred "
                         "log-share features)")
    eps: float = Field(1e-3, gt=0, description="floor inside log(share + eps): a source at share 0 is finite")
    grid: int = Field(20_000, ge=100, description="mixtures sampled to search the regression's optimum")
    top: int = Field(100, ge=1, description="the chosen mixture is the mean of this many best predicted")
    max_epochs: float = Field(4.0, gt=0, description="a mixture may repeat no source more than this many times in the "
                              "mixture's token budget (Muennighoff et al.: up to ~4 epochs cost little)")
    validate_choice: bool = Field(True, description="train a proxy on the chosen mixture and measure it")
    seed: int = Field(0, description="seed of the mixture draws (the proxies train with the sweep's seed)")

    @field_validator("concentration")
    @classmethod
    def _conc(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"concentration={list(v)}: need 0 < low <= high")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("target: name at least one term ('bpb', 'loss', 'bpb/<task>', 'loss/<source>')")
        for k, w in v.items():
            head = k.split("/", 1)[0]
            if head not in ("bpb", "loss") or k.count("/") > 1 or k.endswith("/"):
                raise ValueError(f"target: unknown term {k!r}; terms are 'bpb', 'loss', 'bpb/<task>', 'loss/<source>'")
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"target[{k!r}]={w}: weights must be finite and >= 0")
        if not any(w > 0 for w in v.values()):
            raise ValueError("target: at least one weight must be > 0")
        return v


# ---------------------------------------------------------------------------------------------- mixtures


def share_caps(sources: Sequence[str], source_tokens: dict[str, float], budget_tokens: float, max_epochs: float,
               prior: dict[str, float]) -> np.ndarray:
    """Per source, the largest share that repeats it at most ``max_epochs`` times in ``budget_tokens`` (at least
    the prior's share, so the prior is always in bounds; 1 where the source's size is unknown)."""
    caps = []
    for s in sources:
        have = source_tokens.get(s)
        cap = 1.0 if have is None else min(1.0, max_epochs * float(have) / max(float(budget_tokens), 1.0))
        caps.append(max(cap, prior.get(s, 0.0)))
    return np.asarray(caps, dtype=np.float64)


def sample_mixtures(prior: dict[str, float], n: int, concentration: tuple[float, float], seed: int,
                    caps: np.ndarray | None = None, floor: float = 1e-6) -> np.ndarray:
    """``n`` mixtures (rows over ``prior``'s sources, in its order) drawn around ``prior``: Dirichlet with
    ``alpha = c * n_sources * prior``, ``c`` log-uniform in ``concentration``; draws above ``caps`` are redrawn.
    Shares are floored at ``floor`` (a Dirichlet with small alpha can underflow to 0) and renormalised."""
    names = list(prior)
    p = np.asarray([prior[k] for k in names], dtype=np.float64)
    if np.any(p <= 0):
        zero = [k for k in names if prior[k] <= 0]
        raise ConfigError(f"mixture search: the prior gives {zero} share 0; drop them from mix.shares or give them "
                          "a share to search around")
    rng = np.random.default_rng([seed, 0x6D78])
    lo, hi = math.log(concentration[0]), math.log(concentration[1])
    out = np.empty((n, len(names)))
    got, tries = 0, 0
    while got < n:
        need = n - got
        c = np.exp(rng.uniform(lo, hi, size=(need * 4, 1)))
        draws = rng.gamma(c * len(names) * p)
        draws = np.maximum(draws / np.maximum(draws.sum(1, keepdims=True), 1e-300), floor)
        draws /= draws.sum(1, keepdims=True)
        if caps is not None:
            draws = draws[np.all(draws <= caps + 1e-12, axis=1)]
        take = draws[:need]
        out[got:got + len(take)] = take
        got += len(take)
        tries += 1
        if tries > 1000:
            raise ConfigError(f"mixture search: fewer than {n} of {4000 * n} draws repeat no source more than "
                              "max_epochs times; raise max_epochs or the mixture's source sizes")
    return out


def window_shares(sources_of_windows: np.ndarray) -> dict[str, float]:
    """Share of packed windows per source (a window counts for the source of the document holding most of it)."""
    names, counts = np.unique(np.asarray(sources_of_windows, dtype=str), return_counts=True)
    total = counts.sum()
    return {str(k): float(c) / total for k, c in zip(names, counts)}


def proxy_source_weights(shares: dict[str, float], split_shares: dict[str, float]) -> dict[str, float]:
    """Window draw weights (``PretrainConfig.source_weights``) that make a run on a split whose windows come from
    the sources in ``split_shares`` see ``shares``: ``w_s = shares_s / split_shares_s``, scaled to a mean of 1.
    A source the split lacks cannot be given a share."""
    missing = sorted(s for s, v in shares.items() if v > 0 and split_shares.get(s, 0.0) <= 0)
    if missing:
        raise ConfigError(f"mixture search: the token shards hold no window of {missing}; the mixture cannot give "
                          "them a share")
    w = {s: shares.get(s, 0.0) / split_shares[s] for s in split_shares if split_shares[s] > 0}
    floor = 1e-9  # PretrainConfig wants weights > 0: an unshared source is drawn (almost) never
    mean = sum(w.values()) / len(w)
    return {s: max(v / mean, floor) for s, v in w.items()}


# ---------------------------------------------------------------------------------------------- target


def mixture_target(cfg: MixSearchConfig, bpb: dict[str, float], loss_by_source: dict[str, float],
                   sources: Sequence[str]) -> float:
    """The proxy's target (lower is better): ``sum_k w_k * term_k`` over ``cfg.target``, where ``bpb`` is the mean
    over ``cfg.tasks`` and ``loss`` the mean held-out loss over ``sources`` (those the held-out windows cover)."""
    total = 0.0
    for k, w in cfg.target.items():
        if w == 0:
            continue
        head, _, name = k.partition("/")
        table = bpb if head == "bpb" else loss_by_source
        # 'loss' averages the sources the held-out windows cover (the same for every proxy: one held-out split)
        names = [name] if name else (list(cfg.tasks) if head == "bpb" else [x for x in sources if x in table] or
                                     list(sources))
        missing = [x for x in names if x not in table]
        if missing:
            raise ConfigError(f"mixture search: target term {k!r} needs {head} of {missing}, which the proxy did not "
                              f"report (it has {sorted(table)})")
        total += w * float(np.mean([table[x] for x in names]))
    return total


# ---------------------------------------------------------------------------------------------- regression


def _features(X: np.ndarray, eps: float) -> np.ndarray:
    return np.log(np.asarray(X, dtype=np.float64) + eps)


def fit_regression(X: np.ndarray, y: np.ndarray, ridge: float, eps: float) -> dict[str, Any]:
    """Ridge regression of ``y`` on ``log(X + eps)``, features centred (the intercept unpenalised), penalty
    ``ridge * n``. Returns ``{"intercept", "coef"}`` (per source, natural-log features)."""
    F, y = _features(X, eps), np.asarray(y, dtype=np.float64)
    mu, ym = F.mean(0), y.mean()
    Fc = F - mu
    A = Fc.T @ Fc + ridge * len(y) * np.eye(F.shape[1])
    coef = np.linalg.lstsq(A, Fc.T @ (y - ym), rcond=None)[0]
    return {"intercept": float(ym - mu @ coef), "coef": coef.tolist(), "eps": eps}


def predict(model: dict[str, Any], X: np.ndarray) -> np.ndarray:
    return model["intercept"] + _features(np.atleast_2d(X), model["eps"]) @ np.asarray(model["coef"])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy import stats

    if len(a) < 3:
        return float("nan")
    r = stats.spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def loo_predictions(X: np.ndarray, y: np.ndarray, ridge: float, eps: float) -> np.ndarray:
    """Each mixture's target predicted by the regression fitted on all the others."""
    n = len(y)
    out = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        out[i] = predict(fit_regression(X[keep], y[keep], ridge, eps), X[i:i + 1])[0]
    return out


def choose_mixture(cfg: MixSearchConfig, model: dict[str, Any], prior: dict[str, float],
                   caps: np.ndarray | None) -> tuple[np.ndarray, float]:
    """The mean of the ``cfg.top`` in-bounds mixtures (of ``cfg.grid`` sampled like the proxies') with the lowest
    predicted target, and the prediction there. In bounds stays in bounds: the caps are linear, so their
    feasible set is convex."""
    grid = sample_mixtures(prior, cfg.grid, cfg.concentration, cfg.seed + 1, caps)
    pred = predict(model, grid)
    best = np.argsort(pred, kind="stable")[:min(cfg.top, len(grid))]
    chosen = grid[best].mean(0)
    chosen /= chosen.sum()
    return chosen, float(predict(model, chosen)[0])


def search_summary(cfg: MixSearchConfig, sources: Sequence[str], X: np.ndarray, y: np.ndarray,
                   prior: dict[str, float], caps: np.ndarray | None) -> dict[str, Any]:
    """Fit, cross-validate and choose: ``{"chosen", "predicted", "predicted_prior", "spearman_loo",
    "loo_predictions", "regression"}`` (shares keyed by source)."""
    if len(y) < len(sources) + 2:
        raise ConfigError(f"mixture search: {len(y)} proxies cannot fit a regression on {len(sources)} sources; set "
                          f"mixtures to at least {len(sources) + 1}")
    model = fit_regression(X, y, cfg.ridge, cfg.eps)
    loo = loo_predictions(X, y, cfg.ridge, cfg.eps)
    chosen, pred = choose_mixture(cfg, model, prior, caps)
    p = np.asarray([prior[s] for s in sources])
    return {"chosen": {s: float(v) for s, v in zip(sources, chosen)}, "predicted": pred,
            "predicted_prior": float(predict(model, p)[0]), "spearman_loo": spearman(loo, y),
            "loo_predictions": loo.tolist(), "regression": {"model": "ridge, linear in log(share + eps)",
                                                            "sources": list(sources), **model}}


# ---------------------------------------------------------------------------------------------- the search


def mixture_table(tokens_dir: str | Path) -> dict[str, Any]:
    """The ``table.json`` of the mixture a token-shard folder was made from (its manifest names the mixture's
    ``data/`` files; the table sits beside ``data/``)."""
    import json

    man_path = Path(tokens_dir) / "manifest.json"
    if not man_path.is_file():
        raise ConfigError(f"{man_path}: no token manifest; run `herd tokenizer train` on a mixture first")
    inputs = json.loads(man_path.read_text()).get("inputs") or []
    for f in inputs:
        table = Path(f).parent.parent / "table.json"
        if table.is_file():
            return {**json.loads(table.read_text()), "path": str(table)}
    raise ConfigError(f"{man_path}: the token shards were not made from a `herd mix` output (no table.json beside "
                      f"{inputs[:1] or 'its inputs'}); the search needs the mixture's shares and source sizes")


def proxy_size(budget: float, tokens_per_param: float, min_params: float) -> int:
    """The compute-optimal size at ``budget`` under the sweep's prior ratio ``D/N = tokens_per_param``
    (``C = 6ND``): ``N = sqrt(C / (6 * tokens_per_param))``, at least ``min_params``."""
    return int(max(round(math.sqrt(budget / (6.0 * tokens_per_param))), min_params))


def plan_search(cfg: MixSearchConfig, tokens_dir: str | Path, seq_len: int, budget: float, tokens_per_param: float,
                min_params: float) -> dict[str, Any]:
    """Everything the proxies need, decided before any trains: the prior (the token shards' mixture), the window
    share of each source in the shards, the per-source caps, the K + 1 mixtures (the prior first) and each one's
    window weights, the proxy's ``run`` (``{"C", "N"}``) and ``eval_tokens`` (the held-out split's size)."""
    from stages.pretrain import TokenSplit, main_documents

    table = mixture_table(tokens_dir)
    split = TokenSplit(Path(tokens_dir) / "train")
    best_doc, _ = main_documents(split, seq_len)
    split_shares = window_shares(split.sources[best_doc])
    prior = {r["source"]: float(r["target_share"]) for r in table["sources"]
             if r.get("target_share", 0) > 0 and split_shares.get(r["source"], 0) > 0}
    if len(prior) < 2:
        raise ConfigError(f"mixture search: the mixture {table['path']} has {len(prior)} source(s) with windows in the "
                          "token shards; there is no mixture to choose")
    total = sum(prior.values())
    prior = {k: v / total for k, v in prior.items()}
    sources = list(prior)
    sizes = {r["source"]: float(r["source_tokens"]) for r in table["sources"] if "source_tokens" in r}
    caps = share_caps(sources, sizes, float(table["tokens_budget"]), cfg.max_epochs, prior)
    X = sample_mixtures(prior, cfg.mixtures, cfg.concentration, cfg.seed, caps)
    mixtures = [dict(prior)] + [{s: float(v) for s, v in zip(sources, row)} for row in X]
    return {"sources": sources, "prior": prior, "split_shares": split_shares, "table": table["path"],
            "tokens": str(tokens_dir),
            "caps": {s: float(c) for s, c in zip(sources, caps)}, "mixtures": mixtures,
            "weights": [proxy_source_weights(m, split_shares) for m in mixtures],
            "run": {"C": float(budget), "N": proxy_size(budget, tokens_per_param, min_params)},
            # every proxy scores the whole held-out split: the target's per-source losses need every source
            "eval_tokens": max(len(TokenSplit(Path(tokens_dir) / "heldout")), 1)}


def summarize_search(cfg: MixSearchConfig, plan: dict[str, Any], proxies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Targets of the measured proxies (each ``{"bpb": {task: v}, "loss_by_source": {...}}``, in ``plan``'s
    mixture order, the prior first), the regression and the chosen mixture: ``shares.json`` less the chosen
    mixture's own proxy (``with_chosen_proxy`` adds it)."""
    sources = plan["sources"]
    rows = []
    for m, p in zip(plan["mixtures"], proxies):
        rows.append({"shares": m, "target": mixture_target(cfg, p["bpb"], p["loss_by_source"], sources),
                     **{k: p[k] for k in ("bpb", "loss_by_source", "loss", "model_dir") if k in p}})
    X = np.asarray([[r["shares"][s] for s in sources] for r in rows])
    y = np.asarray([r["target"] for r in rows])
    caps = np.asarray([plan["caps"][s] for s in sources])
    summ = search_summary(cfg, sources, X, y, plan["prior"], caps)
    return {"shares": summ["chosen"], "weights": proxy_source_weights(summ["chosen"], plan["split_shares"]),
            "prior": plan["prior"], "predicted": summ["predicted"], "measured": None,
            "prior_predicted": summ["predicted_prior"], "prior_measured": rows[0]["target"],
            "spearman_loo": summ["spearman_loo"], "loo_predictions": summ["loo_predictions"],
            "beats_prior": None, "best_proxy": int(np.argmin(y)), "proxies": rows, "chosen_proxy": None,
            "regression": summ["regression"], "caps": plan["caps"], "split_shares": plan["split_shares"],
            "proxy_run": plan["run"], "mixture_table": plan["table"], "tokens": plan["tokens"],
            "config": cfg.model_dump(mode="json")}


def with_chosen_proxy(cfg: MixSearchConfig, doc: dict[str, Any], proxy: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the chosen mixture's proxy measured: its target (``measured``) against the prior's."""
    target = mixture_target(cfg, proxy["bpb"], proxy["loss_by_source"], list(doc["prior"]))
    return {**doc, "measured": target, "beats_prior": bool(target < doc["prior_measured"]),
            "chosen_proxy": {"target": target, **{k: proxy[k] for k in ("bpb", "loss_by_source", "loss", "model_dir")
                                                  if k in proxy}}}


def read_shares(path: str | Path) -> dict[str, float]:
    """The chosen shares of a ``shares.json`` (a one-line error naming the file when it is not one)."""
    import json

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        shares = {str(k): float(v) for k, v in doc["shares"].items()}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such shares.json; run `herd mix-search` (or `herd demo`) first") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataValidationError(f"not a mixture search's shares.json ({type(exc).__name__}: {exc}); it needs a "
                                  "'shares' object of source -> share", file=str(path), field="shares") from None
    total = sum(shares.values())
    if not shares or abs(total - 1.0) > 1e-3 or any(v < 0 for v in shares.values()):
        raise DataValidationError(f"'shares' must be non-negative and sum to 1 (got {total:.6f})", file=str(path),
                                  field="shares")
    return {k: v / total for k, v in shares.items()}


# ---------------------------------------------------------------------------------------------- outputs


def write_shares(out_dir: Path, doc: dict[str, Any]) -> Path:
    """``shares.json`` (the contract ``herd mix --shares auto`` reads: ``shares`` sums to 1) and its figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_mix_search(doc, out_dir / "mix_search.png")
    path = out_dir / "shares.json"
    write_json_atomic(path, doc)
    return path


def plot_mix_search(doc: dict[str, Any], path: Path) -> None:
    """Left: each proxy's measured target against its leave-one-out prediction (the prior and the chosen mixture
    marked). Right: prior and chosen shares per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = doc["proxies"]
    meas = [r["target"] for r in runs]
    loo = doc["loo_predictions"]
    a.scatter(loo, meas, s=22, color="tab:blue", label="proxies (leave-one-out)")
    a.scatter([loo[0]], [meas[0]], s=60, facecolors="none", edgecolors="black", label="prior (Llama 1 shares)")
    if doc.get("measured") is not None:
        a.scatter([doc["predicted"]], [doc["measured"]], marker="*", s=140, color="tab:red", label="chosen")
    lim = [min(loo + meas), max(loo + meas)]
    a.plot(lim, lim, color="grey", lw=0.8, ls="--")
    a.set_xlabel("predicted target")
    a.set_ylabel("measured target")
    a.set_title(f"regression, leave-one-out Spearman {doc['spearman_loo']:.2f}")
    a.legend(fontsize=8)
    names = list(doc["shares"])
    x = np.arange(len(names))
    b.bar(x - 0.2, [doc["prior"][k] for k in names], 0.4, label="prior")
    b.bar(x + 0.2, [doc["shares"][k] for k in names], 0.4, label="chosen")
    b.set_xticks(x, names)
    b.set_ylabel("share of tokens")
    b.set_title("mixture")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
