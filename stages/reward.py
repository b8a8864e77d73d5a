"""Reward models (Llama 2, section 3.2.2): helpfulness and safety RMs trained on preference batches.

Each RM is the SFT model's trunk with a scalar regression head (``LlamaForSequenceClassification``,
one label), initialised from the SFT checkpoint, scoring the chat rendering of (prompt, response) at
its last token. Loss: ``-log sigmoid(r(x, y_c) - r(x, y_r) - m(rating))`` with the Table 27 margin
(``stages.losses``). An ``edited`` response (Llama 3) adds the pairs edited > chosen and
edited > rejected, without margin.

Data mix per RM (Llama 2): the safety RM trains on its own category plus about 10% helpfulness pairs
(90/10); the helpfulness RM on all helpfulness pairs plus an equal part of safety pairs
(``other_ratio``). One epoch, AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, cosine to 10% of the
peak, warmup 3% of the steps with a minimum of 5, gradient clipping 1.0.

Evaluation on held-out pairs (a hash of each record's digest, per batch): accuracy overall, per
rating level (Llama 2 Table 8), per batch and per category.

Distributed (``rewards.nproc`` > 1, launched by ``tasks/torchrun_stage.py``): each rank takes its slice of every
step's pairs and gradients are averaged (``parallelism: ddp``) or the model is sharded per decoder layer
(``fsdp``, FSDP2), as in pretraining (``stages.distributed``); rank 0 evaluates and writes the outputs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from stages.common import NULL_SINK, MetricsSink, StageConfig, atomic_dir, read_manifest, write_json_atomic
from stages.device import OnDevice, autocast, model_device, resolve_device
from stages.distributed import Processes, Unsharded, check_pair_processes, clip_grad_norm
from stages.errors import DataValidationError
from stages.losses import margin_for, pair_accuracy, ranking_loss
from stages.model import require_safetensors
from stages.preferences import RATINGS, read_batch, record_from_row
from stages.pretrain import lr_factor

log = logging.getLogger(__name__)


class RMConfig(OnDevice):
    """Optimisation and data mix of one reward model."""

    category: str = Field("helpfulness", pattern="^(helpfulness|safety)$", description="which RM this is")
    other_ratio: float = Field(1.0, ge=0, description="pairs of the other category per pair of this one (Llama 2: "
                               "helpfulness RM equal parts, safety RM 10/90)")
    margin: str = Field("small", pattern="^(small|large|none)$", description="Table 27 margin variant")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (Llama 2: 1e-5; 5e-6 at 70B)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of the peak")
    warmup_fraction: float = Field(0.03, ge=0, lt=1, description="warmup steps as a share of all steps")
    min_warmup_steps: int = Field(5, ge=0, description="at least this many warmup steps")
    batch_pairs: int = Field(512, ge=1, description="pairs per optimizer step (Llama 2: 512 pairs)")
    micro_pairs: int = Field(8, ge=1, description="pairs per forward/backward")
    epochs: float = Field(1.0, gt=0, description="passes over the training pairs (Llama 2: 1; longer overfits)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip")
    max_tokens: int = Field(256, ge=16, description="prompt + response tokens scored (the prompt is cut from the left)")
    heldout_fraction: float = Field(0.15, ge=0, lt=1, description="pairs of every batch held out for evaluation")
    group_by_length: int = Field(0, ge=0, description="optimizer steps per length group: within each run of this "
                                 "many steps the pairs are sorted by length, cut into steps, and the steps shuffled, "
                                 "so a forward pads little (Hugging Face Trainer's group_by_length); 0: random "
                                 "order (Llama 2)")
    num_threads: int = Field(0, ge=0, description="torch threads (0: leave the default)")
    seed: int = Field(0, description="data order and head init")
    parallelism: str = Field("ddp", pattern="^(ddp|fsdp)$", description="with rewards.nproc > 1: 'ddp' replicates "
                             "the model on every process; 'fsdp' shards parameters, gradients and optimizer state per "
                             "decoder layer (FSDP2 fully_shard; with bfloat16: bf16 parameters, fp32 gradient "
                             "reduction)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                           "backward pass: less memory for about a third more compute")


def _rm(category: str, other_ratio: float) -> RMConfig:
    return RMConfig(category=category, other_ratio=other_ratio)


class RewardsConfig(StageConfig):
    """The two reward models (Llama 2 data mixes: helpfulness equal parts, safety 90/10)."""

    helpfulness: RMConfig = Field(default_factory=lambda: _rm("helpfulness", 1.0), description="helpfulness RM")
    safety: RMConfig = Field(default_factory=lambda: _rm("safety", 1.0 / 9.0), description="safety RM")
    nproc: int = Field(1, ge=1, description="processes per reward model; > 1 launches torchrun (each RM's "
                       "parallelism: DDP or FSDP2, on gloo/nccl)")

    @model_validator(mode="after")
    def _processes(self) -> RewardsConfig:
        for name in ("helpfulness", "safety"):
            rm = getattr(self, name)
            check_pair_processes(self.nproc, rm.parallelism, rm.batch_pairs, f"{name}.")
        return self


class Pair(BaseModel):
    prompt: Any
    chosen: str
    rejected: str
    margin: float
    rating: str
    category: str
    batch_id: str
    digest: str
    kind: str = "chosen>rejected"


def _unit(*parts: Any) -> float:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16) / 16**15


def batch_pairs(batch_dir: str | Path, margin: str) -> list[Pair]:
    """Ranked pairs of one stored batch: chosen > rejected with its margin; edited > chosen, edited > rejected."""
    batch_dir = Path(batch_dir)
    out = []
    for row in read_batch(batch_dir):
        rec = record_from_row(row)
        common = dict(prompt=rec.prompt if isinstance(rec.prompt, str) else rec.messages(), rating=rec.rating,
                      category=rec.category, batch_id=batch_dir.name, digest=row["record_sha256"])
        out.append(Pair(chosen=rec.chosen, rejected=rec.rejected, margin=margin_for(rec.rating, margin), **common))
        if rec.edited is not None:
            out.append(Pair(chosen=rec.edited, rejected=rec.chosen, margin=0.0, kind="edited>chosen", **common))
            out.append(Pair(chosen=rec.edited, rejected=rec.rejected, margin=0.0, kind="edited>rejected", **common))
    return out


def split_pairs(pairs: Sequence[Pair], heldout_fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, heldout) by a hash of the record digest: all pairs of one record land on one side."""
    train, held = [], []
    for p in pairs:
        (held if _unit("rm-heldout", seed, p.digest) < heldout_fraction else train).append(p)
    return train, held


def mix_pairs(pairs: Sequence[Pair], cfg: RMConfig) -> list[Pair]:
    """All pairs of ``cfg.category`` plus ``other_ratio`` times as many of the other category (sampled)."""
    own = [p for p in pairs if p.category == cfg.category]
    other = [p for p in pairs if p.category != cfg.category]
    rng = random.Random(f"rm-mix/{cfg.seed}/{cfg.category}")
    k = min(len(other), round(cfg.other_ratio * len(own)))
    mixed = own + rng.sample(other, k)
    rng.shuffle(mixed)
    return mixed


# ---------------------------------------------------------------------------------------------- model


def encode(tok, prompt: Any, response: str, max_tokens: int) -> list[int]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=True,
                                  return_dict=False)
    return list(ids)[-max_tokens:]


def _batch(tok, seqs: list[list[int]], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    pad = tok.pad_token_id
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return ids, mask


def load_reward_model(model_dir: str | Path, *, from_causal_lm: bool = False, seed: int = 0,
                      on: OnDevice | None = None, train: bool = False):
    """``(model, tokenizer)``: a saved RM, or (``from_causal_lm``) a new RM on a causal LM's trunk; on ``on``'s
    device (the CPU without one), cast to its dtype unless it is to be trained (``train``: float32 weights)."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    model_dir = require_safetensors(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal LM's lm_head is expected to be unused, the score head new
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification.from_pretrained(
                model_dir, num_labels=1, local_files_only=True, use_safetensors=True, dtype=torch.float32)
            if from_causal_lm:  # seeded: the same head on every call, and on every process of a torchrun launch
                torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(model.config.hidden_size + 1))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False
    if on is not None:
        model = model.to(device=on.torch_device(), dtype=None if train else on.torch_dtype())
    return model, tok


@torch.no_grad()
def score(model, tok, prompts: Sequence[Any], responses: Sequence[str], max_tokens: int = 256,
          batch_size: int = 16, encoded: dict[tuple[str, str], list[int]] | None = None) -> np.ndarray:
    """Scalar rewards of (prompt, response) pairs, shape (n,). ``encoded``: token ids already known, by
    ``(str(prompt), response)`` (encodings made with the same ``max_tokens``)."""
    model.eval()
    device = model_device(model)
    known = encoded or {}
    seqs = [known.get((str(p), r)) or encode(tok, p, r, max_tokens) for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar length: little padding
    out = np.zeros(len(seqs), dtype=np.float32)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        ids, mask = _batch(tok, [seqs[j] for j in idx], device)
        out[idx] = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().cpu().numpy()
    return out


def evaluate_pairs(model, tok, pairs: Sequence[Pair], max_tokens: int = 256,
                   encoded: dict[tuple[str, str], list[int]] | None = None) -> dict[str, Any]:
    """Accuracy overall, per rating level (Table 8), per batch and per category, on chosen>rejected pairs."""
    pairs = [p for p in pairs if p.kind == "chosen>rejected"]
    if not pairs:
        return {"pairs": 0, "accuracy": None, "by_rating": {}, "by_batch": {}, "by_category": {}}
    rc = score(model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs], max_tokens, encoded=encoded)
    rr = score(model, tok, [p.prompt for p in pairs], [p.rejected for p in pairs], max_tokens, encoded=encoded)
    right = rc > rr

    def acc(sel) -> dict[str, float]:
        idx = [i for i, p in enumerate(pairs) if sel(p)]
        return {"accuracy": float(right[idx].mean()), "pairs": len(idx)} if idx else {"accuracy": None, "pairs": 0}

    return {"pairs": len(pairs), "accuracy": float(right.mean()),
            "by_rating": {r: acc(lambda p, r=r: p.rating == r) for r in RATINGS},
            "by_batch": {b: acc(lambda p, b=b: p.batch_id == b) for b in sorted({p.batch_id for p in pairs})},
            "by_category": {c: acc(lambda p, c=c: p.category == c) for c in sorted({p.category for p in pairs})},
            "mean_margin": float((rc - rr).mean())}


class RMResult(BaseModel):
    model_dir: str
    category: str
    steps: int
    train_pairs: int
    final_loss: float
    heldout: dict[str, Any]
    batches: list[str]


def group_by_length(order: Sequence[Pair], length: Callable[[Pair], int], batch: int, steps: int,
                    rng: random.Random) -> list[Pair]:
    """``order`` with each run of ``steps * batch`` pairs sorted by ``length``, cut into batches of ``batch`` and
    the batches shuffled: every pair is still seen once, and a batch holds pairs of similar length."""
    out: list[Pair] = []
    mega = steps * batch
    for a in range(0, len(order), mega):
        group = sorted(order[a:a + mega], key=length)
        batches = [group[i:i + batch] for i in range(0, len(group), batch)]
        short = batches.pop() if len(batches[-1]) < batch else []  # a partial batch stays last: steps cut by index
        rng.shuffle(batches)
        out.extend(p for b in batches + [short] for p in b)
    return out


def train_reward_model(cfg: RMConfig, init_dir: str | Path, batch_dirs: Sequence[str | Path], out_dir: str | Path,
                       *, sink: MetricsSink = NULL_SINK) -> RMResult:
    """Train one RM from ``init_dir`` (the SFT model folder, with tokenizer) on the stored batches. Under torchrun
    every process calls it: each trains on its slice of every step, rank 0 writes the outputs, all return its
    result."""
    out_dir = Path(out_dir)
    done = read_manifest(out_dir)
    if done is not None and "result" in done:
        return RMResult.model_validate(done["result"])
    procs = Processes.current(cfg.parallelism, fix="set rewards.nproc to 2 or more, or parallelism: ddp")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pairs = [p for d in batch_dirs for p in batch_pairs(d, cfg.margin)]
    train, held = split_pairs(pairs, cfg.heldout_fraction)
    train = mix_pairs(train, cfg)
    held = [p for p in held if p.category == cfg.category]
    if not train:
        raise DataValidationError(f"no training pairs for the {cfg.category} RM in {len(batch_dirs)} batch(es)",
                                  field="category")
    device, dtype = resolve_device(cfg.device, procs.rank), cfg.torch_dtype()

    def fresh():  # float32 weights on this process's device (forwards in dtype under autocast)
        return load_reward_model(init_dir, from_causal_lm=True, seed=cfg.seed)[0].to(device)

    model, tok = load_reward_model(init_dir, from_causal_lm=True, seed=cfg.seed)
    model = model.to(device)
    model.train()
    model, fwd = procs.prepare(model, device, bf16=dtype == torch.bfloat16,
                               activation_checkpointing=cfg.activation_checkpointing)
    total = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_pairs))
    warmup = max(cfg.min_warmup_steps, math.ceil(cfg.warmup_fraction * total))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))
    rng = random.Random(cfg.seed)
    order = [train[i % len(train)] for i in range(total * cfg.batch_pairs)] if cfg.epochs > 1 else list(train)
    if cfg.epochs <= 1:
        rng.shuffle(order)
    encoded: dict[tuple[str, str], list[int]] = {}

    def enc(prompt: Any, response: str) -> list[int]:
        key = (str(prompt), response)
        if key not in encoded:
            encoded[key] = encode(tok, prompt, response, cfg.max_tokens)
        return encoded[key]

    if cfg.group_by_length:
        order = group_by_length(order, lambda p: max(len(enc(p.prompt, p.chosen)), len(enc(p.prompt, p.rejected))),
                                cfg.batch_pairs, cfg.group_by_length, rng)
    losses = []
    for step in range(total):
        batch = order[step * cfg.batch_pairs:(step + 1) * cfg.batch_pairs]
        if not batch:
            break
        loss_sum, acc_sum = 0.0, 0.0
        pieces = procs.micro_batches(batch, cfg.micro_pairs)  # this process's share of the step
        for k, (mb, weight) in enumerate(pieces):
            seqs = [enc(p.prompt, p.chosen) for p in mb] + [enc(p.prompt, p.rejected) for p in mb]
            ids, mask = _batch(tok, seqs, device)
            with procs.sync(fwd, k == len(pieces) - 1):
                with autocast(device, dtype):
                    r = fwd(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
                rc, rr = r[: len(mb)], r[len(mb):]
                margin = torch.tensor([p.margin for p in mb], device=device)
                loss = ranking_loss(rc, rr, margin)
                (loss * weight / len(batch)).backward()  # weight 0: a filler piece (collectives line up)
            if weight:
                loss_sum += float(loss.detach()) * len(mb)
                acc_sum += float(pair_accuracy(rc.detach(), rr.detach())) * len(mb)
        loss_sum, acc_sum = procs.sum([loss_sum, acc_sum], device)
        gnorm = clip_grad_norm(model.parameters(), cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum / len(batch))
        if procs.rank == 0:
            sink.log_metrics({"loss": losses[-1], "train_accuracy": acc_sum / len(batch), "lr": lr,
                              "grad_norm": gnorm}, step + 1)
    final = Unsharded(model, procs, fresh)()  # under FSDP a collective; the weights on rank 0
    result = None
    if procs.rank == 0:
        result = _evaluate_and_save(cfg, final, tok, train, held, encoded, losses, init_dir, batch_dirs, out_dir,
                                    procs.world_size, sink, total)
    return procs.broadcast(result)


def _evaluate_and_save(cfg: RMConfig, model, tok, train: list[Pair], held: list[Pair],
                       encoded: dict[tuple[str, str], list[int]], losses: list[float], init_dir: str | Path,
                       batch_dirs: Sequence[str | Path], out_dir: Path, world_size: int, sink: MetricsSink,
                       total: int) -> RMResult:
    """Held-out accuracy and calibration of the trained RM, then ``out_dir/{model,metrics.json,manifest.json}``."""
    heldout = evaluate_pairs(model, tok, held, cfg.max_tokens, encoded)
    calibration = calibrate(model, tok, train + held, cfg.max_tokens, encoded)
    if heldout["accuracy"] is not None:
        sink.log_metrics({"heldout_accuracy": heldout["accuracy"]}, total)
    result = RMResult(model_dir=str(out_dir / "model"), category=cfg.category, steps=len(losses),
                      train_pairs=len(train), final_loss=losses[-1], heldout=heldout,
                      batches=[Path(d).name for d in batch_dirs])
    with atomic_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / CALIBRATION, calibration)
    write_json_atomic(out_dir / "metrics.json", {"loss_history": losses})
    write_json_atomic(out_dir / "manifest.json", {"stage": "reward_model", "config": cfg.model_dump(mode="json"),
                                                  "init_dir": str(init_dir), "world_size": world_size,
                                                  "result": result.model_dump(mode="json")})
    log.info("%s RM: %d steps on %d pairs, held-out accuracy %s", cfg.category, len(losses), len(train),
             heldout["accuracy"])
    return result


def staleness(rm_dir: str | Path, batch_dir: str | Path, cfg: RMConfig) -> dict[str, Any]:
    """The current RM scored on a new batch before retraining on it (its drop shows the RM is stale)."""
    model, tok = load_reward_model(rm_dir, on=cfg)
    pairs = [p for p in batch_pairs(batch_dir, cfg.margin) if p.category == cfg.category]
    return evaluate_pairs(model, tok, pairs, cfg.max_tokens)


def trained_batches(rm_dir: str | Path) -> list[str] | None:
    """Ids of the batches the RM saved in ``rm_dir`` (``<out_dir>/model``) was trained on, from its stage
    manifest; None when there is no such manifest (an RM herd did not train)."""
    done = read_manifest(Path(rm_dir).parent)
    return list(done["result"]["batches"]) if done and "result" in done else None



# ---------------------------------------------------------------------------------------------- scoring policies

CALIBRATION = "calibration.json"


def calibrate(model, tok, pairs: Sequence[Pair], max_tokens: int = 256,
              encoded: dict[tuple[str, str], list[int]] | None = None) -> dict[str, Any]:
    """Mean and std of the RM's raw scores over the responses it trained and was evaluated on, overall and per
    prompt category.

    A ranking loss fixes only score differences, so a raw score's level is arbitrary: Llama 2's piecewise rule
    (safety score below 0.15) needs a score on a known scale. ``sigmoid((r - mean) / std)`` with the stats of the
    prompt's category puts every RM on one: 0.5 is a typical response to that kind of prompt, 0.15 about 1.7
    std below. Per category matters for the safety gate on helpfulness prompts: the safety RM's data is 90%
    harmful prompts, where answering at all is what it learned to score low.
    """
    seen: dict[tuple[str, str], tuple[Any, str, str]] = {}
    for p in pairs:
        for r in (p.chosen, p.rejected):
            seen.setdefault((str(p.prompt), r), (p.prompt, r, p.category))
    if len(seen) < 2:
        return {"mean": 0.0, "std": 1.0, "responses": len(seen), "by_category": {}}
    prompts, responses, cats = zip(*seen.values())
    raw = score(model, tok, list(prompts), list(responses), max_tokens, encoded=encoded)

    def stats(x: np.ndarray) -> dict[str, float]:
        return {"mean": float(x.mean()), "std": float(max(x.std(), 1e-6)), "responses": int(len(x))}

    cats_arr = np.array(cats)
    by_cat = {c: stats(raw[cats_arr == c]) for c in sorted(set(cats)) if (cats_arr == c).sum() >= 2}
    return {**stats(raw), "by_category": by_cat}


def load_calibration(model_dir: str | Path) -> dict[str, Any]:
    """The RM's saved calibration (identity for an RM saved without one)."""
    path = Path(model_dir) / CALIBRATION
    if not path.is_file():
        return {"mean": 0.0, "std": 1.0, "by_category": {}}
    import json

    return json.loads(path.read_text())


def calibrated(raw: np.ndarray, categories: Sequence[str], cal: dict[str, Any]) -> np.ndarray:
    """``sigmoid((raw - mean) / std)`` with each response's prompt-category stats (overall ones as fallback)."""
    by_cat = cal.get("by_category") or {}
    mean = np.array([by_cat.get(c, cal)["mean"] for c in categories], dtype=np.float64)
    std = np.array([by_cat.get(c, cal)["std"] for c in categories], dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(raw - mean) / std))


class RewardScorer:
    """Llama 2's reward from the two RMs (section 3.2.3): the safety RM's calibrated score for safety
    prompts or when it is below ``threshold``, else the helpfulness RM's; scores in (0, 1)."""

    def __init__(self, helpfulness_dir: str | Path, safety_dir: str | Path, *, max_tokens: int = 256,
                 batch_size: int = 32, threshold: float = 0.15, on: OnDevice | None = None):
        on = on or OnDevice()  # auto: the GPU in bf16 when there is one
        self.models = {c: load_reward_model(d, on=on) for c, d in (("helpfulness", helpfulness_dir),
                                                                    ("safety", safety_dir))}
        self.calibration = {c: load_calibration(d) for c, d in (("helpfulness", helpfulness_dir),
                                                               ("safety", safety_dir))}
        self.max_tokens, self.batch_size, self.threshold = max_tokens, batch_size, threshold

    def scores(self, prompts: Sequence[Any], responses: Sequence[str], categories: Sequence[str]) -> dict[str, np.ndarray]:
        """``{"helpfulness", "safety", "combined"}``: calibrated probabilities, each shape (n,)."""
        from stages.losses import combine_rewards

        out = {}
        for c, (model, tok) in self.models.items():
            raw = score(model, tok, list(prompts), list(responses), self.max_tokens, self.batch_size)
            out[c] = calibrated(raw, categories, self.calibration[c])
        is_safety = torch.tensor([c == "safety" for c in categories])
        out["combined"] = combine_rewards(torch.from_numpy(out["helpfulness"]), torch.from_numpy(out["safety"]),
                                          is_safety, self.threshold).numpy()
        return out

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], categories: Sequence[str]) -> np.ndarray:
        return self.scores(prompts, responses, categories)["combined"]
