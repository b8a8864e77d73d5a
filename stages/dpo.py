"""Direct preference optimisation (Llama 3, section 4.1.4) on the stored preference batches.

The policy learns from (prompt, chosen, rejected) pairs directly, without a reward model:
``-log sigmoid(beta ((log pi(y_c) - log pi_0(y_c)) - (log pi(y_r) - log pi_0(y_r))))`` with ``pi_0`` the
frozen initial policy, plus (Llama 3) ``nll_coef`` = 0.2 times the chosen response's per-token NLL.
Llama 3's two changes to DPO are both here: formatting tokens (header markers and end of turn) are
masked out of the log-probs, since they occur in both responses and their opposing pulls destabilise
training, and the NLL term on the chosen response keeps its likelihood from falling. Llama 3 trained
with lr 1e-5 and beta 0.1, mostly on the latest batches (``last_batches``).

The reference log-probs are computed once, before the first update (the same numbers a frozen copy
would give at every step).

Outputs ``out_dir/``: ``model/`` (the new policy), ``metrics.json`` (per-step history) and
``manifest.json`` (last); a complete manifest means the stage already ran and its result is returned.

Distributed (``alignment.dpo.nproc`` > 1, launched by ``tasks/torchrun_stage.py``): the reference log-probs are
computed a share per process and summed; each rank then trains on its slice of every step's pairs with gradients
averaged (``parallelism: ddp``) or the policy sharded per decoder layer (``fsdp``, FSDP2), as in pretraining
(``stages.distributed``); rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from stages.common import NULL_SINK, MetricsSink, config_hash, read_manifest, tree_sha256, write_json_atomic
from stages.device import OnDevice, autocast, model_device, resolve_device
from stages.distributed import Processes, Unsharded, check_pair_processes, clip_grad_norm
from stages.errors import DataValidationError, DivergenceError
from stages.losses import content_mask, dpo_nll_loss, sequence_logps
from stages.policy import PolicyResult, save_policy
from stages.pretrain import lr_factor

log = logging.getLogger(__name__)

PAIR_KINDS = ("chosen>rejected", "edited>chosen", "edited>rejected")
FORMATTING_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")


class DPOConfig(OnDevice):
    """DPO with Llama 3's modifications; defaults are Llama 3's (section 4.1.4) where the paper states them."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate (Llama 3: 1e-5)")
    beta: float = Field(0.1, gt=0, description="DPO beta, the strength of the implicit KL constraint (Llama 3: 0.1)")
    nll_coef: float = Field(0.2, ge=0, description="weight of the chosen response's per-token NLL (Llama 3: 0.2)")
    mask_formatting: bool = Field(True, description="drop header and end-of-turn tokens from the log-probs "
                                  "(Llama 3: masked out of chosen and rejected)")
    kinds: tuple[str, ...] = Field(("chosen>rejected",), description="which pairs to train on: chosen>rejected, "
                                   "and optionally the annotator edits edited>chosen, edited>rejected")
    last_batches: int = Field(0, ge=0, description="use only the most recent N preference batches, 0 = all (Llama 3 "
                              "mostly trains on the latest batches, collected with the best recent models)")
    epochs: float = Field(1.0, gt=0, description="passes over the pairs (not stated by Llama 3)")
    batch_pairs: int = Field(64, ge=1, description="pairs per optimizer step (not stated by Llama 3)")
    micro_pairs: int = Field(4, ge=1, description="pairs per forward/backward (gradient accumulation)")
    max_tokens: int = Field(512, ge=16, description="prompt + response tokens per sequence (the prompt is cut "
                            "from the left)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not stated by Llama 3)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="cosine floor as a fraction of lr after warmup; 1 = "
                                "constant")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip, 0 = off")
    num_threads: int = Field(0, ge=0, description="torch threads (0: leave the default)")
    seed: int = Field(0, description="pair order")
    nproc: int = Field(1, ge=1, description="processes; > 1 launches torchrun (parallelism: DDP or FSDP2, on "
                       "gloo/nccl)")
    parallelism: str = Field("ddp", pattern="^(ddp|fsdp)$", description="with nproc > 1: 'ddp' replicates the policy "
                             "on every process; 'fsdp' shards parameters, gradients and optimizer state per decoder "
                             "layer (FSDP2 fully_shard; with bfloat16: bf16 parameters, fp32 gradient reduction)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                           "backward pass: less memory for about a third more compute")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [k for k in v if k not in PAIR_KINDS]
        if bad or not v:
            raise ValueError(f"kinds: {bad or 'empty'}; choose one or more of {list(PAIR_KINDS)}")
        return v

    @model_validator(mode="after")
    def _processes(self) -> DPOConfig:
        check_pair_processes(self.nproc, self.parallelism, self.batch_pairs)
        return self


def formatting_ids(tok) -> list[int]:
    """Ids of the chat format's header and end-of-turn tokens that the tokenizer has."""
    vocab = tok.get_vocab()
    return [vocab[t] for t in FORMATTING_TOKENS if t in vocab]


def response_tokens(tok, prompt: Any, response: str, max_tokens: int,
                    formatting: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of the chat rendering of ``prompt`` + assistant ``response``; ``mask`` is 1 on the
    response's tokens minus ``formatting`` ids (its end of turn). The prompt is cut from the left."""
    from stages.sft_data import chat_tokens

    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        [{**m, "train": False} for m in prompt]
    ids, mask = chat_tokens(tok, msgs + [{"role": "assistant", "content": response}])
    keep = content_mask(torch.tensor(ids), torch.tensor(mask), list(formatting))
    return ids[-max_tokens:], keep.int().tolist()[-max_tokens:]


def _pad(seqs: Sequence[tuple[list[int], list[int]]], pad: int, device: torch.device | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in seqs], device=device)
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs], device=device)
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in seqs], device=device)
    return ids, attn, mask


def logps(model, seqs: Sequence[tuple[list[int], list[int]]], pad: int, dtype: torch.dtype = torch.float32
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the masked tokens of each sequence and their counts, (N,) each (on the model's device;
    the forward in ``dtype`` under autocast, the log-softmax in float32)."""
    device = model_device(model)
    ids, attn, mask = _pad(seqs, pad, device)
    with autocast(device, dtype):
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return sequence_logps(logits[:, :-1], ids[:, 1:], mask[:, 1:]), mask[:, 1:].sum(dim=1)


def _reference_logps(model, cfg: DPOConfig, policy_dir: str | Path, batch_dir: str | Path,
                     chosen: Sequence[tuple[list[int], list[int]]], rejected: Sequence[tuple[list[int], list[int]]],
                     pad: int, dtype: torch.dtype, cache: Path | None, procs: Processes = Processes()
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's summed log-probs of one batch's chosen and rejected responses, (n,) each. Cached
    under ``cache`` by content (the reference weights, the batch's files and what shapes the numbers: tokens,
    masking, micro-batching, device and dtype), so another DPO run on the same policy and batch (a new beta or
    learning rate, more epochs) reads them instead of running the reference again (as open-instruct does).
    Under torchrun (``procs``, the model not yet sharded) each process scores every ``world_size``-th micro-batch and
    the shares are summed: the same micro-batches, so the same numbers; rank 0 writes the cache."""
    device = model_device(model)
    path = None
    if cache is not None:
        key = config_hash("dpo-reference", tree_sha256(policy_dir, "*.safetensors"), tree_sha256(batch_dir),
                          sorted(cfg.kinds), cfg.max_tokens, cfg.mask_formatting, cfg.micro_pairs, device.type,
                          str(dtype))
        path = cache / key / "logps.npz"
        if path.is_file():
            with np.load(path) as z:
                if len(z["chosen"]) == len(chosen):
                    return torch.from_numpy(z["chosen"]).to(device), torch.from_numpy(z["rejected"]).to(device)
    ref_c, ref_r = torch.zeros(len(chosen), device=device), torch.zeros(len(chosen), device=device)
    with torch.no_grad():
        for n, i in enumerate(range(0, len(chosen), cfg.micro_pairs)):
            if n % procs.world_size != procs.rank:
                continue
            j = slice(i, i + cfg.micro_pairs)
            ref_c[j] = logps(model, chosen[j], pad, dtype)[0]
            ref_r[j] = logps(model, rejected[j], pad, dtype)[0]
    if procs.dist is not None:  # every entry is one process's number, zero on the others
        both = torch.stack([ref_c, ref_r])
        procs.dist.all_reduce(both)
        ref_c, ref_r = both[0], both[1]
    if path is not None and procs.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".logps.tmp.npz")
        np.savez(tmp, chosen=ref_c.cpu().numpy(), rejected=ref_r.cpu().numpy())
        tmp.replace(path)
    return ref_c, ref_r


def dpo(cfg: DPOConfig, policy_dir: str | Path, batch_dirs: Sequence[str | Path], out_dir: str | Path, *,
        sink: MetricsSink = NULL_SINK, ref_cache: str | Path | None = None) -> PolicyResult:
    """Fine-tune the policy in ``policy_dir`` with DPO on the preference batches ``batch_dirs`` (in collection
    order, so ``last_batches`` picks the newest); write ``out_dir/model``. ``ref_cache``: a folder where the
    reference log-probs of each batch are kept by content (:func:`_reference_logps`). Under torchrun every process
    calls it: each trains on its slice of every step, rank 0 writes the outputs, all return its result."""
    from stages.collect import load_policy
    from stages.reward import batch_pairs

    out_dir = Path(out_dir)
    done = read_manifest(out_dir)
    if done is not None and "result" in done:
        return PolicyResult.model_validate(done["result"])
    procs = Processes.current(cfg.parallelism, fix="set alignment.dpo.nproc to 2 or more, or parallelism: ddp")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    used = list(batch_dirs)[-cfg.last_batches:] if cfg.last_batches else list(batch_dirs)
    per_batch = [(d, [p for p in batch_pairs(d, "none") if p.kind in cfg.kinds]) for d in used]
    pairs = [p for _, ps in per_batch for p in ps]
    if not pairs:
        raise DataValidationError(f"no {list(cfg.kinds)} pairs in {len(used)} batch(es)", field="kinds")

    device, dtype = resolve_device(cfg.device, procs.rank), cfg.torch_dtype()

    def fresh():  # float32 weights on this process's device, forwards in dtype under autocast
        policy, tok = load_policy(policy_dir)
        policy.config.use_cache = False
        return policy.to(device), tok

    model, tok = fresh()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    fmt = formatting_ids(tok) if cfg.mask_formatting else []
    chosen = [response_tokens(tok, p.prompt, p.chosen, cfg.max_tokens, fmt) for p in pairs]
    rejected = [response_tokens(tok, p.prompt, p.rejected, cfg.max_tokens, fmt) for p in pairs]

    model.eval()
    refs, at = [], 0  # the frozen reference: the initial policy's log-probs, once per batch file
    for d, ps in per_batch:
        refs.append(_reference_logps(model, cfg, policy_dir, d, chosen[at:at + len(ps)], rejected[at:at + len(ps)],
                                     pad, dtype, Path(ref_cache) if ref_cache is not None else None, procs))
        at += len(ps)
    ref_c, ref_r = torch.cat([c for c, _ in refs]), torch.cat([r for _, r in refs])

    n_train = max(1, math.ceil(cfg.epochs * len(pairs)))  # pair visits: whole epochs, then part of one
    total = math.ceil(n_train / cfg.batch_pairs)
    model.train()
    model, fwd = procs.prepare(model, device, bf16=dtype == torch.bfloat16,
                               activation_checkpointing=cfg.activation_checkpointing)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.min_lr_ratio))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    while len(order) < n_train:  # a fresh shuffle per epoch
        epoch = list(range(len(pairs)))
        rng.shuffle(epoch)
        order += epoch
    order = order[:n_train]
    history: list[dict[str, float]] = []
    for step in range(total):
        batch = order[step * cfg.batch_pairs:(step + 1) * cfg.batch_pairs]
        sums = {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "chosen_nll": 0.0}
        pieces = procs.micro_batches(batch, cfg.micro_pairs)  # this process's share of the step
        for k, (mb, weight) in enumerate(pieces):
            with procs.sync(fwd, k == len(pieces) - 1):
                lp, n = logps(fwd, [chosen[i] for i in mb] + [rejected[i] for i in mb], pad, dtype)
                pi_c, pi_r, n_c = lp[:len(mb)], lp[len(mb):], n[:len(mb)]
                rc, rr = ref_c[mb], ref_r[mb]
                loss = dpo_nll_loss(pi_c, pi_r, rc, rr, n_c, cfg.beta, cfg.nll_coef)
                if not torch.isfinite(loss):
                    raise DivergenceError(f"DPO loss became {float(loss)} at step {step + 1}; lower lr (now {cfg.lr})")
                (loss * weight / len(batch)).backward()  # weight 0: a filler piece (collectives line up)
            if weight:
                with torch.no_grad():
                    margin = cfg.beta * ((pi_c - rc) - (pi_r - rr))
                    sums["loss"] += float(loss) * len(mb)
                    sums["reward_accuracy"] += float((margin > 0).float().sum())
                    sums["reward_margin"] += float(margin.sum())
                    sums["chosen_nll"] += float((-pi_c / n_c.clamp(min=1)).sum())
        sums = dict(zip(sums, procs.sum(list(sums.values()), device)))
        gnorm = clip_grad_norm(model.parameters(), cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {k: v / len(batch) for k, v in sums.items()} | {"lr": lr, "grad_norm": gnorm}
        history.append(row)
        if procs.rank == 0:
            sink.log_metrics(row, step + 1)
        log.info("DPO %d/%d: loss %.4f, reward accuracy %.3f, margin %.4f, chosen NLL %.3f", step + 1, total,
                 row["loss"], row["reward_accuracy"], row["reward_margin"], row["chosen_nll"])

    tail = history[-max(1, len(history) // 10):]
    metrics = {"pairs": float(len(pairs)), "steps": float(len(history)), "loss_first": history[0]["loss"],
               "loss_last": float(np.mean([h["loss"] for h in tail])),
               "reward_accuracy_last": float(np.mean([h["reward_accuracy"] for h in tail])),
               "reward_margin_last": float(np.mean([h["reward_margin"] for h in tail])),
               "chosen_nll_last": float(np.mean([h["chosen_nll"] for h in tail]))}
    final = Unsharded(model, procs, lambda: fresh()[0])()  # under FSDP a collective; the weights on rank 0
    result = None
    if procs.rank == 0:
        final.eval()
        model_dir = save_policy(final, tok, out_dir)
        write_json_atomic(out_dir / "metrics.json", {"history": history})
        result = PolicyResult(model_dir=model_dir, algorithm="dpo", parent_dir=str(policy_dir), metrics=metrics,
                              files={"metrics": str(out_dir / "metrics.json")})
        write_json_atomic(out_dir / "manifest.json", {
            "stage": "dpo", "config": cfg.model_dump(mode="json"), "policy_dir": str(policy_dir),
            "batches": [str(d) for d in used], "world_size": procs.world_size,
            "result": result.model_dump(mode="json")})
        log.info("DPO: %d steps on %d pairs from %d batch(es), loss %.4f -> %.4f, reward accuracy %.3f -> %s",
                 len(history), len(pairs), len(used), metrics["loss_first"], metrics["loss_last"],
                 metrics["reward_accuracy_last"], model_dir)
    return procs.broadcast(result)
