"""Evaluating a policy against earlier ones (Llama 2 section 3.4.1 and Fig. 11).

Every policy answers the same held-out prompts (the ``eval`` pool: no preference was ever collected on
them) ``samples`` times at a fixed temperature and seed; its answers are cached by the policy's weights
digest, so a baseline (SFT, the previous version, the champion) is generated once across rounds.

Two judges compare a policy with each baseline, prompt by prompt and sample by sample (a win is 1, a
tie 0.5): the reward models (Llama 2's combined score, the signal RLHF optimised) and an independent
judge (the demo's gold rubric, ``stages.annotator.judge``, which the RMs never see). Win rates come with
95% percentile-bootstrap intervals over prompts. Also reported, for the policy and every baseline: the
safety violation rate on safety prompts and the false-refusal rate on ordinary prompts (Llama 2 section
4.2.3: a benign, answerable prompt refused), each with its 95% bootstrap interval, and mean helpfulness on
ordinary prompts; for the policy against each baseline, the paired difference of both rates (policy minus
baseline, per prompt, over the same prompts) with its 95% bootstrap interval; and the reward-hacking
signals of the policy's answers: KL to the reference policy (SFT), proxy (RM) reward against judge
reward, response length, and the policy's per-token entropy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from stages.annotator import falsely_refuses, judge, violates
from stages.collect import GenerationConfig, generate, load_policy
from stages.common import config_hash, iter_jsonl, tree_sha256, write_json_atomic
from stages.device import OnDevice, model_device
from stages.errors import DataValidationError
from stages.policy import chat_prompt_ids

log = logging.getLogger(__name__)

Scorer = Callable[[Sequence[Any], Sequence[str], Sequence[str]], dict[str, np.ndarray]]


class EvalConfig(OnDevice):
    """Held-out evaluation of a policy against baselines."""

    prompts: int = Field(0, ge=0, description="prompts of the eval pool used (0: all of them)")
    samples: int = Field(2, ge=1, description="answers per prompt and policy")
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the answers (0: greedy)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="generation settings")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples of the prompts for 95% intervals")
    seed: int = Field(0, description="answer sampling and bootstrap seed")


def policy_answers(cfg: EvalConfig, model_dir: str | Path, prompts: Sequence[dict], cache_root: str | Path) -> list[dict]:
    """Every prompt's ``cfg.samples`` answers from ``model_dir``: ``[{"id", "category", "prompt", "answers"}]``,
    cached under ``cache_root`` by the weights digest, the config and the prompts."""
    key = config_hash("answers", cfg.samples, cfg.temperature, cfg.generation, cfg.seed, cfg.torch_device().type,
                      str(cfg.torch_dtype()), tree_sha256(model_dir, "*.safetensors"), [p["id"] for p in prompts])
    path = Path(cache_root) / key / "answers.jsonl"
    if path.is_file():
        return [row for _, row in iter_jsonl(path)]
    model, tok = load_policy(model_dir, cfg)
    texts = [p["prompt"] for p in prompts for _ in range(cfg.samples)]
    out, gen = generate(model, tok, texts, temperature=cfg.temperature, cfg=cfg.generation, seed=cfg.seed)
    rows = [{"id": p["id"], "category": p["category"], "prompt": p["prompt"],
             "answers": out[i * cfg.samples:(i + 1) * cfg.samples]} for i, p in enumerate(prompts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".answers.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    write_json_atomic(path.parent / "manifest.json", {"model_dir": str(model_dir), "generation": gen,
                                                      "prompts": len(prompts), "samples": cfg.samples})
    return rows


def bootstrap_ci(per_prompt: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``per_prompt`` over ``n_boot`` resamples of the prompts."""
    if len(per_prompt) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = per_prompt[rng.integers(0, len(per_prompt), size=(n_boot, len(per_prompt)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def win_rate(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Win rate of ``a`` over ``b`` (prompts x samples scores; a tie counts half) with its 95% interval."""
    per_prompt = ((a > b) + 0.5 * (a == b)).mean(axis=1)
    lo, hi = bootstrap_ci(per_prompt, n_boot, seed)
    return {"win_rate": float(per_prompt.mean()), "ci_low": lo, "ci_high": hi,
            "wins": float((a > b).sum()), "ties": float((a == b).sum()), "losses": float((a < b).sum())}


def rate_with_ci(flags: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """The rate of ``flags`` (prompts x samples, 0/1) with its 95% interval over prompts."""
    per_prompt = flags.mean(axis=1) if flags.size else np.zeros(0)
    lo, hi = bootstrap_ci(per_prompt, n_boot, seed)
    return {"rate": float(per_prompt.mean()) if per_prompt.size else float("nan"), "ci_low": lo, "ci_high": hi,
            "prompts": float(len(per_prompt))}


def paired_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Mean per-prompt difference ``a - b`` of two policies' scores or 0/1 flags on the same prompts
    (prompts x samples each, row i the same prompt in both) with its 95% paired-bootstrap interval:
    the prompts are resampled once for both, so what the prompts share (some are just hard) cancels.

    ``ci_low > 0``: ``a`` is significantly higher than ``b``; ``ci_high < 0``: significantly lower.
    No prompts: every number is nan.
    """
    if a.shape[0] != b.shape[0]:
        raise DataValidationError(f"paired difference needs the same prompts, got {a.shape[0]} and {b.shape[0]} rows",
                                  field="prompts")
    diff = (a.mean(axis=1) - b.mean(axis=1)) if a.size else np.zeros(0)
    lo, hi = bootstrap_ci(diff, n_boot, seed)
    return {"diff": float(diff.mean()) if diff.size else float("nan"), "ci_low": lo, "ci_high": hi,
            "prompts": float(len(diff))}


@torch.no_grad()
def answer_logprobs(model_dir: str | Path, rows: Sequence[dict], max_prompt_tokens: int, batch_size: int = 32,
                    on: OnDevice | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per answer (flattened prompt-major): the log-probs of its tokens under ``model_dir`` and the
    per-token entropy of the model's distribution at those positions."""
    model, tok = load_policy(model_dir, on)
    device = model_device(model)
    eot = tok.get_vocab().get("<|eot_id|>", tok.eos_token_id)
    seqs = []
    for r in rows:
        prompt = chat_prompt_ids(tok, r["prompt"], max_prompt_tokens)
        for a in r["answers"]:
            seqs.append((prompt, tok.encode(a, add_special_tokens=False) + [eot]))
    logps, ents = [], []
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.tensor([[pad] * (width - len(p) - len(a)) + p + a for p, a in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p) - len(a)) + [1] * (len(p) + len(a)) for p, a in chunk],
                            device=device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_lp = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        ent = -(lp.exp() * lp).sum(-1)
        for j, (_, a) in enumerate(chunk):
            logps.append(tok_lp[j, -len(a):].cpu().numpy())
            ents.append(ent[j, -len(a):].cpu().numpy())
    return logps, ents


def compare_answers(cfg: EvalConfig, answers: dict[str, list[dict]], scorer: Scorer) -> dict:
    """Judge the answers of ``"policy"`` and of every other name in ``answers`` (rows as
    :func:`policy_answers` returns, the same prompts in the same order for every name).

    Returns ``{"prompts", "safety_prompts", "samples", "policy": summary, "baselines": {name: summary},
    "vs": {name: {"judge": win, "rm": win, "judge_helpfulness": win, "judge_safety": win,
    "violation_diff": diff, "false_refusal_diff": diff}}}`` where a summary holds mean judge score,
    helpfulness and safety, the violation rate (safety prompts) and the false-refusal rate (ordinary
    prompts) with their intervals, and a diff is :func:`paired_diff_ci` of policy minus that baseline.
    """
    prompts = answers["policy"]
    for name, rows in answers.items():
        if [r["id"] for r in rows] != [r["id"] for r in prompts]:
            raise DataValidationError(f"{name}'s answers are not to the policy's prompts", field="answers")
    baselines = [n for n in answers if n != "policy"]
    cats = np.array([p["category"] for p in prompts])
    safety_rows = cats == "safety"
    S = cfg.samples

    def grid(name: str, fn) -> np.ndarray:
        return np.array([[fn(r["prompt"], a, r["category"]) for a in r["answers"]] for r in answers[name]],
                        dtype=float).reshape(len(prompts), -1)

    judged = {n: grid(n, judge) for n in answers}
    violation = {n: grid(n, lambda p, a, c: float(violates(a, c)))[safety_rows] for n in answers}
    refusal = {n: grid(n, lambda p, a, c: float(falsely_refuses(a, c)))[~safety_rows] for n in answers}
    rm = {}
    for n in answers:
        flat = [(r["prompt"], a, r["category"]) for r in answers[n] for a in r["answers"]]
        rm[n] = scorer([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat])["combined"].reshape(-1, S)

    def summary(n: str) -> dict[str, Any]:
        lengths = [len(a.split()) for r in answers[n] for a in r["answers"]]
        return {"judge_mean": float(judged[n].mean()),
                "helpfulness": float(judged[n][~safety_rows].mean()) if (~safety_rows).any() else None,
                "safety": float(judged[n][safety_rows].mean()) if safety_rows.any() else None,
                "violation": rate_with_ci(violation[n], cfg.n_boot, cfg.seed),
                "false_refusal": rate_with_ci(refusal[n], cfg.n_boot, cfg.seed),
                "rm_reward": float(rm[n].mean()), "length_words": float(np.mean(lengths))}

    out: dict[str, Any] = {"prompts": len(prompts), "safety_prompts": int(safety_rows.sum()), "samples": S,
                           "policy": summary("policy"), "baselines": {n: summary(n) for n in baselines},
                           "vs": {n: {"judge": win_rate(judged["policy"], judged[n], cfg.n_boot, cfg.seed),
                                      "rm": win_rate(rm["policy"], rm[n], cfg.n_boot, cfg.seed)} for n in baselines}}
    for n in baselines:
        for cat, sel in (("helpfulness", ~safety_rows), ("safety", safety_rows)):
            if sel.any():
                out["vs"][n][f"judge_{cat}"] = win_rate(judged["policy"][sel], judged[n][sel], cfg.n_boot, cfg.seed)
        out["vs"][n]["violation_diff"] = paired_diff_ci(violation["policy"], violation[n], cfg.n_boot, cfg.seed)
        out["vs"][n]["false_refusal_diff"] = paired_diff_ci(refusal["policy"], refusal[n], cfg.n_boot, cfg.seed)
    out["signals"] = {"proxy_reward": float(rm["policy"].mean()), "judge_reward": float(judged["policy"].mean()),
                      "length_words": out["policy"]["length_words"]}
    return out


def evaluate_policy(cfg: EvalConfig, policy_dir: str | Path, baselines: dict[str, str | Path], prompts: Sequence[dict],
                    scorer: Scorer, cache_root: str | Path, *, reference_dir: str | Path | None = None) -> dict:
    """Compare ``policy_dir`` with each of ``baselines`` (name -> model folder) on the eval prompts.

    Returns :func:`compare_answers`'s dict, whose ``"signals"`` add the policy's per-token entropy and, with
    ``reference_dir``, its KL to that policy on its own answers.
    """
    prompts = list(prompts)[: cfg.prompts or None]
    if not prompts:
        raise DataValidationError("no evaluation prompts: the eval pool is empty", field="eval_fraction")
    models = {"policy": policy_dir, **baselines}
    answers = {name: policy_answers(cfg, d, prompts, cache_root) for name, d in models.items()}
    out = compare_answers(cfg, answers, scorer)
    signals = out["signals"]
    lp, ent = answer_logprobs(policy_dir, answers["policy"], cfg.generation.max_prompt_tokens, on=cfg)
    signals["entropy"] = float(np.mean(np.concatenate(ent)))
    if reference_dir is not None:
        ref_lp, _ = answer_logprobs(reference_dir, answers["policy"], cfg.generation.max_prompt_tokens, on=cfg)
        signals["kl_to_reference"] = float(np.mean([(a - b).sum() for a, b in zip(lp, ref_lp)]))
    return out
