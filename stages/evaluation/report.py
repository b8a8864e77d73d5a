"""The report card: one table of a pipeline run, a row per model stage (base, SFT, RLHF-V1..V(n)).

Columns: each benchmark's headline score (``acc_norm`` for multiple choice, ``acc`` for LAMBADA,
``exact_match`` for GSM8K, ``pass@1`` for HumanEval; in percent) with its ``bpb`` beside it, ``CORE`` (the
mean centred accuracy over the multiple-choice tasks, DCLM's aggregate, in percent), the held-out loss, the
alignment numbers (judge win rate against SFT, safety violation rate, false-refusal rate, each with its 95%
interval) and the stage's wall time, parameters and tokens. The alignment tax is each policy's benchmark
delta against SFT. ``report.json`` holds every number; ``render_markdown`` prints the card.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HEADLINE = ("acc_norm", "exact_match", "pass@1", "acc")


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    for m in HEADLINE:
        if m in metrics:
            return m, metrics[m]
    return None


def compare_benchmarks(treated: dict[str, Any], control: dict[str, Any], z: float = 1.96) -> dict[str, dict]:
    """Per task, ``treated - control`` of the headline metric and of bpb, each ``[delta, low, high]`` (a normal
    interval from the two runs' bootstrap stderrs, ``z`` 1.96: 95%), for the tasks both were scored on."""
    out: dict[str, dict] = {}
    for task, t in treated.items():
        c = control.get(task)
        if not c:
            continue
        row: dict[str, Any] = {}
        h, hc = headline(t["metrics"]), headline(c["metrics"])
        for key, a, b in ((h[0] if h else None, h[1] if h else None, hc[1] if hc else None),
                          ("bpb", t["metrics"].get("bpb"), c["metrics"].get("bpb"))):
            if key is None or a is None or b is None or (h and hc and key != "bpb" and h[0] != hc[0]):
                continue
            se = ((t.get("stderr") or {}).get(key, 0.0) ** 2 + (c.get("stderr") or {}).get(key, 0.0) ** 2) ** 0.5
            d = a - b
            row[key] = [d, d - z * se, d + z * se]
        if row:
            out[task] = row
    return out


def core_score(tasks: dict[str, Any]) -> float | None:
    """Mean ``centered_acc`` over the tasks that have one (DCLM's CORE aggregate)."""
    vals = [t["metrics"]["centered_acc"] for t in tasks.values() if "centered_acc" in t["metrics"]]
    return sum(vals) / len(vals) if vals else None


def build_report(stages: Sequence[dict[str, Any]], *, run_id: str | None = None, git: dict | None = None,
                 preset: str | None = None, contamination: dict | None = None, wall_s: float | None = None,
                 downstream: dict | None = None, mixture: dict | None = None) -> dict[str, Any]:
    """``report.json``: the stages as given (each ``{"stage", "model_dir", "params", "tokens", "wall_s",
    "heldout_loss", "benchmarks": {task: {"n", "shots", "metrics", "stderr"}}, "judge_win_vs_sft",
    "violation_rate", "false_refusal_rate"}``, the alignment numbers as ``[value, ci_low, ci_high]``), plus
    ``core`` per stage and the alignment tax (benchmark deltas against the SFT stage). ``downstream``: the
    two-step prediction of the main run's benchmarks against what it measured, ``{task: {"predicted": {"bpb":
    [v, lo, hi], "acc": [...]}, "measured": {"bpb", "acc"}}}``. ``mixture``: the mixture search's result
    (``shares``, ``prior``, ``predicted``, ``measured``, ``prior_measured``, ``spearman_loo``, ``proxies``)."""
    rows = []
    for st in stages:
        row = dict(st)
        row["core"] = core_score(st.get("benchmarks") or {})
        rows.append(row)
    sft = next((r for r in rows if r["stage"] == "sft"), None)
    tax: dict[str, dict[str, float]] = {}
    if sft is not None:
        for r in rows:
            if not r["stage"].startswith("rlhf"):
                continue
            deltas: dict[str, float] = {}
            for task, t in (r.get("benchmarks") or {}).items():
                base = (sft.get("benchmarks") or {}).get(task)
                h, hb = headline(t["metrics"]), headline(base["metrics"]) if base else None
                if h and hb and h[0] == hb[0]:
                    deltas[f"{task}/{h[0]}"] = h[1] - hb[1]
                if base and "bpb" in t["metrics"] and "bpb" in base["metrics"]:
                    deltas[f"{task}/bpb"] = t["metrics"]["bpb"] - base["metrics"]["bpb"]
            if r["core"] is not None and sft["core"] is not None:
                deltas["core"] = r["core"] - sft["core"]
            tax[r["stage"]] = deltas
    return {"run_id": run_id, "preset": preset, "git": git or {}, "wall_s": wall_s, "stages": rows,
            "alignment_tax": tax, "contamination": contamination or {}, "downstream": downstream or {},
            "mixture": mixture or {}}


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def _ci(v: Sequence[float] | None, pct: bool = False) -> str:
    if not v:
        return "-"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.2f}")
    return f"{f(v[0])} [{f(v[1])}, {f(v[2])}]"


def _human(n: float | None) -> str:
    if not n:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report card as markdown: the main table, the alignment tax, contamination, provenance."""
    rows = report["stages"]
    tasks: list[str] = []
    for r in rows:
        for t in (r.get("benchmarks") or {}):
            if t not in tasks:
                tasks.append(t)
    cols = ["stage"] + tasks + ["CORE", "held-out loss", "judge win vs SFT", "violations", "false refusals",
                                 "wall", "params", "tokens"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["stage"]]
        for t in tasks:
            res = (r.get("benchmarks") or {}).get(t)
            if not res:
                cells.append("-")
                continue
            h = headline(res["metrics"])
            bpb = res["metrics"].get("bpb")
            cells.append(f"{_pct(h[1]) if h else '-'}" + (f" / {bpb:.2f}" if bpb is not None else ""))
        cells.append(_pct(r.get("core")))
        hl = r.get("heldout_loss")
        cells.append("-" if hl is None else f"{hl:.3f}")
        cells.append(_ci(r.get("judge_win_vs_sft"), pct=True))
        cells.append(_ci(r.get("violation_rate"), pct=True))
        cells.append(_ci(r.get("false_refusal_rate"), pct=True))
        w = r.get("wall_s")
        cells.append("-" if w is None else f"{w / 60:.1f} min" if w >= 60 else f"{w:.0f} s")
        cells.append(_human(r.get("params")))
        cells.append(_human(r.get("tokens")))
        out.append("| " + " | ".join(cells) + " |")
    metric_names = {t: (headline(res["metrics"]) or ("-",))[0] for r in rows for t, res in (r.get("benchmarks") or {}).items()}
    legend = ", ".join(f"{t} {m}" for t, m in metric_names.items())
    n_items = {t: res["n"] for r in rows for t, res in (r.get("benchmarks") or {}).items()}
    git = report.get("git") or {}
    lines = ["# herd report card", ""]
    lines.append(f"Run `{report.get('run_id') or '-'}`, preset `{report.get('preset') or '-'}`, commit "
                 f"`{git.get('commit', '-')[:12]}`{' (dirty tree)' if git.get('dirty') else ''}"
                 + (f", {report['wall_s'] / 60:.1f} min in all" if report.get("wall_s") else "") + ".")
    lines += ["", *out, ""]
    lines.append(f"Benchmark cells: score in % / bits per byte of the gold answer ({legend}); items per task: "
                 + ", ".join(f"{t} {n}" for t, n in n_items.items()) + ". CORE: mean centred accuracy "
                 "(acc - chance) / (1 - chance) over the multiple-choice tasks, in %. Alignment columns: rate in % "
                 "[95% bootstrap interval].")
    tax = report.get("alignment_tax") or {}
    if tax:
        lines += ["", "## Alignment tax (difference to SFT)", ""]
        keys = [k for k in next(iter(tax.values())).keys()]
        show = [k for k in keys if not k.endswith("/bpb")]
        lines.append("| stage | " + " | ".join(show) + " |")
        lines.append("|" + "---|" * (len(show) + 1))
        for st, d in tax.items():
            lines.append(f"| {st} | " + " | ".join(f"{100 * d[k]:+.1f}" if k in d else "-" for k in show) + " |")
        lines.append("")
        lines.append("Points of the headline metric (and of CORE); negative is a tax.")
    mix = report.get("mixture") or {}
    if mix:
        lines += ["", "## Data mixture (chosen by proxy experiments)", ""]
        lines.append("| source | prior | chosen |")
        lines.append("|---|---|---|")
        for src, v in mix["shares"].items():
            lines.append(f"| {src} | {100 * mix['prior'].get(src, 0.0):.1f} | {100 * v:.1f} |")
        lines.append("")
        meas = "-" if mix.get("measured") is None else f"{mix['measured']:.4f}"
        lines.append(f"Shares in % of tokens. {len(mix.get('proxies') or [])} proxy models, one per mixture sampled "
                     f"around the prior; a regression on log-shares (leave-one-out Spearman "
                     f"{mix['spearman_loo']:.2f}) chose the mixture. Target, lower is better: the prior's proxy "
                     f"{mix['prior_measured']:.4f}; the chosen mixture's {mix['predicted']:.4f} predicted, {meas} "
                     "measured by its own proxy.")
    down = report.get("downstream") or {}
    if down:
        lines += ["", "## Downstream prediction (Llama 3's two-step method)", ""]
        lines.append("| benchmark | predicted bpb | measured bpb | predicted acc_norm | measured acc_norm |")
        lines.append("|---|---|---|---|---|")

        def iv(v: Sequence[float], pct: bool) -> str:
            f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
            return f(v[0]) + (f" [{f(v[1])}, {f(v[2])}]" if v[1] == v[1] else "")

        for task, d in down.items():
            p, m = d["predicted"], d["measured"]
            acc = iv(p["acc"], True) if p.get("acc") else "- (no anchor above chance)"
            lines.append(f"| {task} | {iv(p['bpb'], False)} | {m['bpb']:.3f} | {acc} | {100 * m['acc']:.1f} |")
        lines.append("")
        lines.append("Predicted before the main run from the IsoFLOP sweep's models (bpb of the gold answer against "
                     "compute, then a sigmoid from bpb to accuracy anchored by stronger models; 90% intervals), "
                     "measured on the same items after it.")
    cont = report.get("contamination") or {}
    if cont:
        lines += ["", "## Decontamination of the training corpus", ""]
        ckeys = sorted({k for v in cont.values() if isinstance(v, dict) for k, x in v.items()
                        if isinstance(x, (int, float)) and k != "items"})  # counts; item ids stay in report.json
        lines.append("| benchmark | " + " | ".join(ckeys) + " |")
        lines.append("|" + "---|" * (len(ckeys) + 1))
        for b, v in cont.items():
            if isinstance(v, dict):
                lines.append(f"| {b} | " + " | ".join(str(v.get(k, "-")) for k in ckeys) + " |")
    return "\n".join(lines) + "\n"
