"""Rejection-sampling fine-tuning (Llama 2 section 3.2.3; Llama 3 section 4.2.2).

For each prompt, sample K responses from the current policy at a raised temperature, score them with
the reward models, keep the best, and fine-tune the policy on the kept (prompt, best) pairs with the
SFT machinery (answer tokens only). Llama 2 found T in 1.2-1.3 best for K >= 10 and pooled the best
samples of all earlier iterations to avoid regressions; Llama 3 used K = 10-30. Here pooled candidates
(earlier rounds' kept samples, and the annotators' edited responses of the preference batches) are
rescored by the current reward models next to the new samples, and each prompt keeps its best.

The spread of rewards among one prompt's samples is the improvement RS can deliver; the stage logs
max-minus-median reward per prompt (Llama 2 Fig. 7) alongside the mean and best reward.

Outputs ``out_dir/``: ``samples.jsonl`` (every sample and its scores), ``best.jsonl`` (the kept
sample per prompt: what later rounds pool), ``finetune_set.jsonl`` (what was fine-tuned on), ``finetune/`` (``stages.sft`` output, its ``model/`` is
the new policy) and ``manifest.json`` (last).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from stages.collect import GenerationConfig, generate, load_policy
from stages.common import NULL_SINK, MetricsSink, iter_jsonl, read_manifest, write_json_atomic
from stages.device import OnDevice
from stages.errors import DataValidationError
from stages.policy import PolicyResult, RewardFn
from stages.pretrain import PretrainConfig
from stages.sft import SFTConfig, sft
from stages.sft_data import SFTTokenizeConfig

log = logging.getLogger(__name__)


def _rs_train_defaults() -> PretrainConfig:
    # the SFT recipe (Llama 2: lr 2e-5, weight decay 0.1, cosine), scaled for small models in presets
    return PretrainConfig(lr=2e-5, warmup_steps=2, seq_len=512, batch_tokens=8192, micro_batch_size=4,
                          weight_decay=0.1, log_every=10, eval_tokens=16_384)


class RejectionConfig(OnDevice):
    """Rejection-sampling fine-tuning: K samples per prompt, the RM-best one kept, SFT on the kept set."""

    k: int = Field(10, ge=2, description="samples per prompt (Llama 3: 10-30; Llama 2 up to 30 at 70B)")
    temperature: float = Field(1.2, gt=0, description="sampling temperature (Llama 2: 1.2-1.3 best for K >= 10)")
    prompts: int = Field(512, ge=1, description="prompts sampled per round from the collect pool")
    safety_share: float = Field(0.3, ge=0, le=1, description="share of safety prompts among them")
    pool_previous: bool = Field(True, description="earlier rounds' kept samples join the candidates, rescored by the "
                                "current RMs (Llama 2 pooled all prior iterations' top samples to avoid regressions)")
    pool_edits: bool = Field(True, description="the annotators' edited responses of the preference batches join the "
                             "candidates too (human-written answers, kept when the RMs rank them best)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="generation settings")
    tokenize: SFTTokenizeConfig = Field(default_factory=lambda: SFTTokenizeConfig(heldout_fraction=0.05),
                                        description="chat rendering of the kept samples")
    train: PretrainConfig = Field(default_factory=_rs_train_defaults, description="fine-tuning optimiser and loop")
    epochs: float = Field(2.0, gt=0, description="passes over the kept samples (the SFT recipe: 2)")
    seed: int = Field(0, description="prompt draw and sampling seed (combined with the round)")


def draw_round_prompts(pool: Sequence[dict], n: int, safety_share: float, seed: str) -> list[dict]:
    """``n`` prompts of the pool, ``safety_share`` of them safety prompts (as many as there are)."""
    rng = random.Random(seed)
    safety = sorted((p for p in pool if p["category"] == "safety"), key=lambda p: p["id"])
    helpful = sorted((p for p in pool if p["category"] != "safety"), key=lambda p: p["id"])
    n_s = min(len(safety), round(n * safety_share))
    return rng.sample(safety, n_s) + rng.sample(helpful, min(len(helpful), n - n_s))


def _conversation(row: dict) -> dict:
    return {"id": f"rs/{row['id']}", "source": f"rs-{row['category']}", "license": "generated",
            "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]}


def annotator_edits(batch_dirs: Sequence[str | Path]) -> list[dict]:
    """The annotators' edited responses of stored preference batches (``{"id", "prompt", "category", "response"}``):
    human-written answers that rejection sampling may keep when the reward models rank them best."""
    from stages.preferences import read_batch, record_from_row

    out = []
    for d in batch_dirs:
        for row in read_batch(Path(d)):
            rec = record_from_row(row)
            if rec.edited is not None and isinstance(rec.prompt, str):
                out.append({"id": f"edit/{row['record_sha256'][:12]}", "prompt": rec.prompt, "category": rec.category,
                            "response": rec.edited})
    return out


def rejection_sample(cfg: RejectionConfig, policy_dir: str | Path, reward_fn: RewardFn, prompts: Sequence[dict],
                     out_dir: str | Path, *, pooled: Sequence[str | Path] = (), edits: Sequence[dict] = (),
                     round_index: int = 0, sink: MetricsSink = NULL_SINK) -> PolicyResult:
    """Sample ``cfg.k`` responses per prompt from ``policy_dir``, keep the best by ``reward_fn``, fine-tune.

    ``prompts``: the pool to draw from (``{"id", "prompt", "category"}``). The kept samples of earlier rounds
    (``pooled``: their ``best.jsonl`` files; with ``cfg.pool_previous``) and annotators' edited responses
    (``edits``; with ``cfg.pool_edits``) join the candidates: every candidate is scored by the current reward models, and each prompt
    keeps its best, so a new sample replaces an older one only when the current RMs prefer it.
    """
    out_dir = Path(out_dir)
    done = read_manifest(out_dir)
    if done is not None and "result" in done:
        return PolicyResult.model_validate(done["result"])
    drawn = draw_round_prompts(prompts, cfg.prompts, cfg.safety_share, f"rs/{cfg.seed}/{round_index}")
    if not drawn:
        raise DataValidationError("no prompts to sample: the collect pool is empty", field="prompts")
    model, tok = load_policy(policy_dir, cfg)  # sampling; the fine-tuning runs where cfg.train.device says
    texts = [p["prompt"] for p in drawn for _ in range(cfg.k)]
    responses, gen = generate(model, tok, texts, temperature=cfg.temperature, cfg=cfg.generation,
                              seed=cfg.seed * 1000 + round_index)
    del model
    categories = [p["category"] for p in drawn for _ in range(cfg.k)]
    rewards = np.asarray(reward_fn(texts, responses, categories), dtype=np.float64).reshape(len(drawn), cfg.k)
    gain = rewards.max(axis=1) - np.median(rewards, axis=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    candidates: dict[str, list[dict]] = {}
    with open(out_dir / ".samples.jsonl.tmp", "w") as fh:
        for i, p in enumerate(drawn):
            for j in range(cfg.k):
                row = {"id": p["id"], "prompt": p["prompt"], "category": p["category"], "round": round_index,
                       "source": f"sample-{j}", "response": responses[i * cfg.k + j], "reward": float(rewards[i, j])}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                candidates.setdefault(p["prompt"], []).append(row)
    (out_dir / ".samples.jsonl.tmp").replace(out_dir / "samples.jsonl")
    (out_dir / "best.jsonl").write_text("".join(
        json.dumps(max(candidates[p["prompt"]], key=lambda r: r["reward"]), ensure_ascii=False) + "\n" for p in drawn))
    earlier: list[dict] = []
    if cfg.pool_previous or cfg.pool_edits:
        seen = {(r["prompt"], r["response"]) for rows in candidates.values() for r in rows}
        rows = [{**r, "source": f"round-{r.get('round')}"} for f in pooled for _, r in iter_jsonl(f)] \
            if cfg.pool_previous else []
        for row in rows + ([{**e, "source": "edit"} for e in edits] if cfg.pool_edits else []):
            if (row["prompt"], row["response"]) not in seen:
                seen.add((row["prompt"], row["response"]))
                earlier.append(row)
        if earlier:
            scores = reward_fn([r["prompt"] for r in earlier], [r["response"] for r in earlier],
                               [r["category"] for r in earlier])
            for r, sc in zip(earlier, np.asarray(scores, dtype=np.float64)):
                candidates.setdefault(r["prompt"], []).append({**r, "reward": float(sc)})
    train_rows = {prompt: max(rows, key=lambda r: r["reward"]) for prompt, rows in candidates.items()}
    train_set = sorted(train_rows.values(), key=lambda r: r["id"])
    (out_dir / "finetune_set.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_set))
    convs = [_conversation(r) for r in train_set]
    metrics = {"prompts": float(len(drawn)), "samples": float(len(responses)), "reward_mean": float(rewards.mean()),
               "reward_best_mean": float(rewards.max(axis=1).mean()),
               "reward_median_mean": float(np.median(rewards, axis=1).mean()),
               "max_minus_median": float(gain.mean()), "finetune_examples": float(len(convs)),
               "pooled_candidates": float(len(earlier)),
               "kept_from_earlier": float(sum(r["source"].startswith("round-") for r in train_set)),
               "kept_edits": float(sum(r["source"] == "edit" for r in train_set)),
               "generated_tokens_per_s": gen["tokens_per_s"], "generated_tokens": gen["tokens"],
               "response_chars_mean": float(np.mean([len(r) for r in responses]))}
    for cat in sorted(set(categories)):
        rows = [i for i, p in enumerate(drawn) if p["category"] == cat]
        metrics[f"max_minus_median_{cat}"] = float(gain[rows].mean())
        metrics[f"reward_best_mean_{cat}"] = float(rewards[rows].max(axis=1).mean())
    sink.log_metrics(metrics, round_index)
    log.info("RS round %d: %d prompts x %d samples at %.0f tokens/s; reward mean %.3f, best %.3f, max-median %.3f; "
             "fine-tuning on %d examples", round_index, len(drawn), cfg.k, gen["tokens_per_s"], metrics["reward_mean"],
             metrics["reward_best_mean"], metrics["max_minus_median"], len(convs))
    ft = sft(SFTConfig(tokenize=cfg.tokenize, train=cfg.train, epochs=cfg.epochs), policy_dir, policy_dir, convs,
             out_dir / "finetune", sink=sink)
    metrics |= {"finetune_steps": float(ft.steps), "finetune_final_loss": ft.train.final_loss}
    if ft.train.heldout_loss is not None:
        metrics["finetune_heldout_loss"] = ft.train.heldout_loss
    result = PolicyResult(model_dir=ft.model_dir, algorithm="rejection_sampling", parent_dir=str(policy_dir),
                          metrics=metrics, files={"samples": str(out_dir / "samples.jsonl"),
                                                  "best": str(out_dir / "best.jsonl"),
                                                  "finetune_set": str(out_dir / "finetune_set.jsonl")})
    write_json_atomic(out_dir / "manifest.json", {"stage": "rejection_sampling", "config": cfg.model_dump(mode="json"),
                                                  "round": round_index, "result": result.model_dump(mode="json")})
    return result
