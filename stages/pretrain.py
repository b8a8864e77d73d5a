"""Llama pretraining: packed documents with document masking, AdamW + warmup/cosine, exact resume, DDP.

``pretrain(cfg, model_cfg, data_dir, heldout_dir, out_dir)`` trains a ``LlamaForCausalLM`` on a
tokenised split (``tokens.bin`` + ``doc_offsets.npy`` + ``doc_sources.npy``) and writes
``out_dir/model`` (``save_pretrained``), ``metrics.json`` and ``manifest.json`` (last). Checkpoints
go to ``out_dir/checkpoints/step_N`` (atomic); a rerun resumes from the newest one and reproduces the
uninterrupted loss curve exactly (same device, fp32).

Distributed: the caller (``tasks/torchrun_pretrain.py``) initialises ``torch.distributed``; here each
rank takes its contiguous slice of every global batch and gradients are averaged by DDP, or, with
``parallelism: fsdp``, the model is sharded per decoder layer (FSDP2) and gradients reduce-scattered
(``stages.distributed``, shared with the reward-model and DPO trainers).
"""

from __future__ import annotations

import json
import logging
import os
import math
import pickle
import random
import re
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator

from stages.common import NULL_SINK, MetricsSink, StageConfig, atomic_dir, config_hash, read_manifest, write_json_atomic
from stages.device import resolve_device
from stages.distributed import Processes, Unsharded, clip_grad_norm, enable_activation_checkpointing, load_optim_state, \
    optim_state, shard
from stages.errors import ConfigError, DataValidationError, DivergenceError
from stages.model import (
    ModelConfig,
    build_model,
    flops_per_token,
    load_causal_lm,
    measure_peak_flops,
    mfu,
    packed_inputs,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class PretrainConfig(StageConfig):
    """Optimisation and loop settings (Llama 2/3 recipe defaults)."""

    lr: float = Field(3e-4, gt=0, description="Peak learning rate (after warmup).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to this fraction of the peak lr.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-5, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices only, not norms).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 disables).")
    seq_len: int = Field(128, ge=2, description="Tokens per packed sequence.")
    batch_tokens: int = Field(1024, ge=1, description="Global batch size in tokens (all ranks, all micro-batches).")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward on one rank.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; None derives it from max_tokens.")
    max_tokens: int = Field(100_000, ge=1, description="Training tokens when steps is None (steps = max_tokens // batch_tokens).")
    bf16: bool = Field(False, description="bf16 autocast for forward/backward (weights and optimizer stay fp32).")
    compile: bool = Field(False, description="torch.compile the model.")
    log_every: int = Field(10, ge=1, description="Log metrics to the sink every N steps.")
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps (0: only at the end).")
    eval_tokens: int = Field(65_536, ge=1, description="Held-out tokens scored per evaluation (from the split's start).")
    downstream_every: int = Field(0, ge=0, description="In-loop downstream evaluation (OLMo): benchmark bpb and "
                                  "acc_norm every N steps and at the end (0: off; single-process runs: torchrun runs skip it).")
    downstream_tasks: tuple[str, ...] = Field(("hellaswag", "arc_easy", "piqa"),
                                              description="Benchmarks of the in-loop downstream evaluation.")
    downstream_items: int = Field(100, ge=1, description="Items per benchmark in the in-loop evaluation (a fixed "
                                  "seeded sample).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only when stopped early).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    seed: int = Field(0, description="Seeds model init, data order and all RNGs.")
    shuffle: bool = Field(True, description="Shuffle the order of packed windows (per epoch, seeded).")
    num_threads: int = Field(0, ge=0, description="torch intra-op threads (0: leave torch's default).")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="'auto' (cuda if available, else cpu), "
                        "'cpu' or 'cuda' (an error without one).")
    parallelism: str = Field("ddp", pattern="^(ddp|fsdp)$", description="under torchrun: 'ddp' replicates the model "
                             "on every process; 'fsdp' shards parameters, gradients and optimizer state per decoder "
                             "layer (FSDP2 fully_shard; with bf16: bf16 parameters, fp32 gradient reduction).")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                           "backward pass: less memory for about a third more compute.")
    peak_flops: float = Field(0.0, ge=0, description="Hardware peak FLOP/s for MFU; 0 measures it (GPU table or matmul benchmark).")
    schedule: str = Field("cosine", pattern="^(cosine|linear)$", description="Learning-rate decay after warmup, to "
                          "min_lr_ratio: 'cosine', or 'linear' (Llama 3's annealing: linear to min_lr_ratio 0).")
    average_last: int = Field(0, ge=0, description="Checkpoint averaging (Polyak, as Llama 3 did over its annealing): "
                              "the final model is the mean of this many weight snapshots, evenly spaced and ending "
                              "at the last step (0 or 1: the last weights). The last weights' held-out loss is "
                              "reported next to the average's.")
    source_weights: dict[str, float] = Field(default_factory=dict, description="Upsampling by source (Llama 3's "
                                             "anneal on high-quality data): a packed window whose main document comes "
                                             "from a named source is drawn this many times as often (others: 1). "
                                             "Empty: every window once per epoch, in a seeded shuffle.")
    batch_ramp: list[tuple[int, int]] = Field(default_factory=list, description="Llama 3's batch-size ramp: "
                                              "[tokens_seen, batch_tokens] pairs in increasing order; from the step "
                                              "that starts with at least tokens_seen tokens trained, the global "
                                              "batch is batch_tokens (before the first: batch_tokens above).")
    long_doc_weight: float = Field(1.0, gt=0, description="Upsampling of long documents (Llama 3's long-context "
                                   "stages): a window that one document fills at least half of is drawn this many "
                                   "times as often. 1: no upsampling.")

    @model_validator(mode="after")
    def _batch(self) -> PretrainConfig:
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens={self.batch_tokens} must be a multiple of seq_len={self.seq_len}")
        if self.sequences_per_batch % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} must divide the global batch of "
                f"{self.sequences_per_batch} sequences (batch_tokens / seq_len)"
            )
        if self.steps is None and self.max_tokens < self.batch_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is below one batch (batch_tokens={self.batch_tokens})")
        at = -1
        for i, (seen, bt) in enumerate(self.batch_ramp):
            if seen <= at:
                raise ValueError(f"batch_ramp[{i}]: tokens_seen={seen} must exceed the previous step's ({at})")
            if bt % self.seq_len or (bt // self.seq_len) % self.micro_batch_size or bt <= 0:
                raise ValueError(f"batch_ramp[{i}]: batch_tokens={bt} must be a positive multiple of seq_len x "
                                 f"micro_batch_size ({self.seq_len} x {self.micro_batch_size})")
            at = seen
        return self

    @model_validator(mode="after")
    def _weights(self) -> PretrainConfig:
        bad = [k for k, v in self.source_weights.items() if not v > 0]
        if bad:
            raise ValueError(f"source_weights[{bad[0]!r}] must be > 0 (a source to leave out belongs in the mix, not "
                             f"here)")
        return self

    @property
    def weighted(self) -> bool:
        """Whether windows are drawn by weight (with replacement) instead of once per epoch."""
        return bool(self.source_weights) or self.long_doc_weight != 1.0

    @property
    def sequences_per_batch(self) -> int:
        return self.batch_tokens // self.seq_len

    def batch_at(self, tokens_seen: int) -> int:
        """Global batch in tokens of the step that starts after ``tokens_seen`` training tokens (the ramp)."""
        bt = self.batch_tokens
        for seen, ramp_bt in self.batch_ramp:
            if tokens_seen >= seen:
                bt = ramp_bt
        return bt

    def tokens_before(self, step: int) -> int:
        """Training tokens in the first ``step`` optimizer steps."""
        if not self.batch_ramp:
            return step * self.batch_tokens
        seen = 0
        for _ in range(step):
            seen += self.batch_at(seen)
        return seen

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if not self.batch_ramp:
            return self.max_tokens // self.batch_tokens
        steps, seen = 0, 0
        while seen + self.batch_at(seen) <= self.max_tokens:
            seen += self.batch_at(seen)
            steps += 1
        return steps

    def grad_accum_steps(self, world_size: int = 1, batch_tokens: int | None = None) -> int:
        """Micro-batches per optimizer step on each rank (for a batch of ``batch_tokens``: default the first)."""
        bt = batch_tokens or self.batch_tokens
        per_rank, rem = divmod(bt // self.seq_len, world_size * self.micro_batch_size)
        if rem or per_rank == 0:
            raise ConfigError(
                f"micro_batch_size={self.micro_batch_size} x world_size={world_size} must divide the global batch "
                f"of {bt // self.seq_len} sequences (batch_tokens={bt} / seq_len={self.seq_len})"
            )
        return per_rank


class PretrainResult(BaseModel):
    completed: bool
    averaged: int = 0  # weight snapshots averaged into the final model (average_last); 0: the last weights
    heldout_loss_last: float | None = None  # with averaging: the last weights' held-out loss (heldout_loss: the mean's)
    last_model_dir: str | None = None  # with averaging: the last weights, saved beside the mean (model_dir)
    steps: int
    tokens: int
    final_loss: float
    heldout_loss: float | None
    heldout_loss_by_source: dict[str, float]
    tokens_per_s: float
    mfu: float
    flops_per_token: float
    peak_mem_mb: float
    num_params: int
    vocab_size: int
    model_dir: str | None
    metrics_path: str | None
    checkpoint_dir: str | None


# ---------------------------------------------------------------------------------------------- data


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    """Read-only memory map of a flat binary file (an empty file is an empty array; mmap refuses those)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenSplit:
    """Reader of a tokenised split: ``tokens.bin`` (uint16/uint32), ``doc_offsets.npy``, ``doc_sources.npy``."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        manifest = read_manifest(self.dir) or {}
        shard = self.dir / "shard.json"  # stages/tokenizer.py: dtype per split, vocab in the parent manifest
        if shard.is_file():
            manifest = {**json.loads(shard.read_text()), **manifest}
        if "vocab_size" not in manifest and (read_manifest(self.dir.parent) or {}).get("vocab_size"):
            manifest["vocab_size"] = read_manifest(self.dir.parent)["vocab_size"]
        offsets_path = self.dir / "doc_offsets.npy"
        if not offsets_path.is_file():
            raise DataValidationError("missing; point data_dir at a tokenised split folder", file=str(offsets_path))
        self.offsets = np.load(offsets_path).astype(np.int64)
        dtype = manifest.get("dtype")
        if dtype is None:
            vocab = manifest.get("vocab_size")
            dtype = "uint32" if vocab is not None and vocab > 65536 else "uint16"
        self.tokens = _memmap(self.dir / "tokens.bin", np.dtype(dtype))
        if len(self.tokens) != self.offsets[-1]:
            raise DataValidationError(
                f"tokens.bin holds {len(self.tokens)} {dtype} tokens but doc_offsets ends at {self.offsets[-1]}",
                file=str(self.dir / "tokens.bin"), field="dtype",
            )
        src_path = self.dir / "doc_sources.npy"
        sources = np.load(src_path) if src_path.is_file() else np.zeros(len(self.offsets) - 1)  # no pickled arrays
        names_path = self.dir / "sources.json"  # doc_sources may index a list of source names
        if names_path.is_file() and np.issubdtype(np.asarray(sources).dtype, np.integer):
            names = json.loads(names_path.read_text())
            sources = [names[int(i)] for i in sources]
        self.sources = np.asarray([str(s) for s in sources])
        self.vocab_size = manifest.get("vocab_size")
        mask_path = self.dir / "loss_mask.bin"  # SFT: 1 where the token is scored (answers), 0 elsewhere
        self.loss_mask = _memmap(mask_path, np.dtype(np.uint8)) if mask_path.is_file() else None
        if self.loss_mask is not None and len(self.loss_mask) != len(self.tokens):
            raise DataValidationError(f"loss_mask.bin has {len(self.loss_mask)} entries for {len(self.tokens)} tokens",
                                      file=str(mask_path))

    def __len__(self) -> int:
        return len(self.tokens)

    def max_token(self) -> int:
        return int(self.tokens.max()) if len(self.tokens) else 0

    def n_windows(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Packed windows of ``seq_len + 1`` tokens starting at ``starts``.

        Returns (input_ids (B,T) int64, labels (B,T) int64 with IGNORE_INDEX where the target belongs to
        another document than its input or, with a loss mask, is not scored; doc_index (B,T+1) int64).
        """
        pos = starts[:, None] + np.arange(seq_len + 1)[None, :]
        toks = np.asarray(self.tokens[pos.ravel()], dtype=np.int64).reshape(pos.shape)
        docs = np.searchsorted(self.offsets, pos, side="right") - 1
        labels = toks[:, 1:].copy()
        labels[docs[:, 1:] != docs[:, :-1]] = IGNORE_INDEX
        if self.loss_mask is not None:
            labels[np.asarray(self.loss_mask[pos[:, 1:].ravel()]).reshape(labels.shape) == 0] = IGNORE_INDEX
        return toks[:, :-1], labels, docs


class DataOrder:
    """Deterministic global order of packed windows: global sequence g -> window start offset."""

    def __init__(self, n_windows: int, seq_len: int, seed: int, shuffle: bool):
        if n_windows <= 0:
            raise DataValidationError(f"split too short for one sequence of seq_len={seq_len}", field="seq_len")
        self.n, self.seq_len, self.seed, self.shuffle = n_windows, seq_len, seed, shuffle
        self._perm: dict[int, np.ndarray] = {}

    def starts(self, g0: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(g0, g0 + count)):
            epoch, j = divmod(g, self.n)
            if self.shuffle:
                if epoch not in self._perm:
                    self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
                j = int(self._perm[epoch][j])
            out[i] = j * self.seq_len
        return out


def main_documents(split: TokenSplit, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each packed window ``j`` (tokens ``j*seq_len .. j*seq_len+seq_len``): the document holding most of its
    tokens (the earlier one on a tie) and how many tokens of the window it holds."""
    n = split.n_windows(seq_len)
    lo = np.arange(n, dtype=np.int64) * seq_len
    hi = lo + seq_len  # exclusive
    off = split.offsets
    first = np.searchsorted(off, lo, side="right") - 1
    last = np.searchsorted(off, hi - 1, side="right") - 1
    piece_first = np.minimum(off[first + 1], hi) - lo
    piece_last = hi - np.maximum(off[last], lo)
    best_len, best_doc = piece_first.copy(), first.copy()
    lengths = np.diff(off)
    middle = np.flatnonzero(last - first >= 2)  # whole documents strictly inside a window
    for w in middle:  # rare at long lengths: documents shorter than a window
        docs = np.arange(first[w] + 1, last[w])
        k = int(docs[np.argmax(lengths[docs])])
        if lengths[k] > best_len[w]:
            best_len[w], best_doc[w] = lengths[k], k
    take = (last != first) & (piece_last > best_len)
    best_len[take], best_doc[take] = piece_last[take], last[take]
    return best_doc, best_len


def window_weights(split: TokenSplit, seq_len: int, source_weights: dict[str, float],
                   long_doc_weight: float) -> np.ndarray:
    """Draw weight of each packed window: the source weight of the document holding most of the window's tokens,
    times ``long_doc_weight`` when that document fills at least half of the window (a document long enough to
    teach the new context length)."""
    best_doc, best_len = main_documents(split, seq_len)
    weights = np.ones(len(best_doc), dtype=np.float64)
    if source_weights:
        by_source = np.array([source_weights.get(str(s), 1.0) for s in split.sources], dtype=np.float64)
        weights *= by_source[best_doc]
    if long_doc_weight != 1.0:
        weights[best_len * 2 >= seq_len] *= long_doc_weight
    return weights


class WeightedOrder:
    """Deterministic global order of packed windows drawn with replacement by weight: global sequence g ->
    window start. Draws come in seeded blocks, so any g is recomputed the same way after a resume."""

    BLOCK = 4096

    def __init__(self, weights: np.ndarray, seq_len: int, seed: int):
        if len(weights) == 0:
            raise DataValidationError(f"split too short for one sequence of seq_len={seq_len}", field="seq_len")
        self.p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.seq_len, self.seed = seq_len, seed
        self._block: tuple[int, np.ndarray] | None = None

    def starts(self, g0: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(g0, g0 + count)):
            b, j = divmod(g, self.BLOCK)
            if self._block is None or self._block[0] != b:
                rng = np.random.default_rng([self.seed, 0x77, b])
                self._block = (b, rng.choice(len(self.p), size=self.BLOCK, p=self.p))
            out[i] = int(self._block[1][j]) * self.seq_len
        return out


# ---------------------------------------------------------------------------------------------- loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) int64 target ids, ``IGNORE_INDEX`` (-100) where not scored.

    Returns:
        (loss_sum, n_tokens): scalar fp32 sum of CE over scored tokens, scalar int64 count of them.
    """
    v = logits.shape[-1]
    loss_sum = F.cross_entropy(logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


class CausalLMWithLoss(torch.nn.Module):
    """``model`` plus its summed next-token loss in one forward, so ``torch.compile`` fuses the output head,
    the fp32 cast and the cross-entropy instead of materialising (B, T, V) fp32 logits in eager mode.
    Holds no parameters of its own: ``model``'s state dict is unchanged."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, labels) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return causal_lm_loss(logits, labels)[0]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE: logits (B, T, V), labels (B, T) -> (B, T) fp32, 0 where labels == IGNORE_INDEX."""
    v = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").reshape(labels.shape)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str = "cosine") -> float:
    """Linear warmup to 1, then cosine (or, ``schedule="linear"``, linear) decay to ``min_lr_ratio`` at
    ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def average_steps(total_steps: int, n: int) -> list[int]:
    """The steps whose weights :class:`PretrainConfig`'s ``average_last`` averages: ``n`` evenly spaced, ending at
    ``total_steps`` (fewer when the run is shorter)."""
    if n <= 1:
        return []
    gap = max(1, total_steps // n)
    return sorted({total_steps - j * gap for j in range(n) if total_steps - j * gap >= 1})


def _snapshot(model, path: Path) -> None:
    """Weights only (tied tensors once), written atomically."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def load_average(model, snapshots: Sequence[Path]) -> None:
    """Load the mean of the weight ``snapshots`` (float64 sums) into ``model``."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    for f in snapshots:
        for k, v in load_file(str(f)).items():
            total[k] = total[k] + v.double() if k in total else v.double()
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    mean = {k: (v / len(snapshots)).to(dtypes.get(k, torch.float32)) for k, v in total.items()}
    missing, unexpected = model.load_state_dict(mean, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # saved once, as the embedding
    if unexpected or set(missing) - tied:
        raise ConfigError(f"weight snapshots {snapshots[0].parent} do not match the model: missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")


# ---------------------------------------------------------------------------------------------- helpers


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so a checkpoint loads with ``torch.load(weights_only=True)``
    (numpy's state is an ndarray, which that loader refuses: its keys are stored as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _save_checkpoint(out_dir: Path, step: int, model, optim_state: dict, scheduler, extra: dict, keep: int) -> Path:
    """``model``: an unsharded module holding the weights; ``optim_state``: ``stages.distributed.optim_state``'s FQN-keyed state, so a
    checkpoint resumes under any process count and either parallelism."""
    from safetensors.torch import save_model

    target = out_dir / "checkpoints" / f"step_{step}"
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": _rng_state(), **extra},
            tmp / "state.pt",
        )
    for _, old in _checkpoints(out_dir)[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint step %d -> %s", step, target)
    return target


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, split: TokenSplit, cfg: PretrainConfig, attn_impl: str, device: torch.device) -> tuple[float, dict[str, float]]:
    """Held-out loss over the first ``cfg.eval_tokens`` tokens, overall and per source (document masking on)."""
    n = min(split.n_windows(cfg.seq_len), max(1, cfg.eval_tokens // cfg.seq_len))
    if n == 0:
        return float("nan"), {}
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    starts_all = np.arange(n, dtype=np.int64) * cfg.seq_len
    for i in range(0, n, cfg.micro_batch_size):
        ids, labels, docs = split.windows(starts_all[i : i + cfg.micro_batch_size], cfg.seq_len)
        ids_t = torch.from_numpy(ids).to(device)
        labels_t = torch.from_numpy(labels).to(device)
        mask, pos = packed_inputs(torch.from_numpy(docs[:, :-1]).to(device), attn_implementation=attn_impl)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(input_ids=ids_t, attention_mask=mask, position_ids=pos).logits
        tl = token_losses(logits, labels_t).cpu().numpy()
        src = split.sources[docs[:, 1:]]
        valid = labels != IGNORE_INDEX
        for s in np.unique(src[valid]):
            sel = valid & (src == s)
            sums[s] = sums.get(s, 0.0) + float(tl[sel].sum())
            counts[s] = counts.get(s, 0) + int(sel.sum())
    model.train(was_training)
    total = sum(counts.values())
    overall = sum(sums.values()) / total if total else float("nan")
    return overall, {s: sums[s] / counts[s] for s in sorted(sums)}


# ---------------------------------------------------------------------------------------------- stage


def pretrain(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    data_dir: str | Path,
    heldout_dir: str | Path | None,
    out_dir: str | Path,
    *,
    sink: MetricsSink = NULL_SINK,
    rank: int = 0,
    world_size: int = 1,
    resume: bool = True,
    stop_after_steps: int | None = None,
    init_model_dir: str | Path | None = None,
    downstream=None,
) -> PretrainResult:
    """Train a Llama on ``data_dir`` and write ``out_dir/{model,metrics.json,manifest.json}``.

    ``stop_after_steps`` stops (with a checkpoint) after that many optimizer steps in total; a later call
    with ``resume=True`` continues from the newest checkpoint. A complete ``manifest.json`` short-circuits.
    ``init_model_dir`` starts from a saved ``LlamaForCausalLM`` (safetensors; SFT from a base model)
    instead of a fresh init; ``model_cfg`` must describe it (``ModelConfig.from_pretrained``).
    ``downstream`` (a ``stages.evaluation.probe.DownstreamProbe``) is called on rank 0 every
    ``downstream.every`` steps and at the end; its benchmark metrics go to ``sink`` next to the loss.
    """
    out_dir = Path(out_dir)
    done = read_manifest(out_dir)
    if resume and done is not None and "result" in done:
        log.info("pretrain: %s already complete", out_dir)
        return PretrainResult.model_validate(done["result"])
    procs = Processes.current(cfg.parallelism, fix="set pretraining.nproc to 2 or more, or parallelism: ddp")
    dist, fsdp = procs.dist, procs.fsdp
    if dist is not None:
        rank, world_size = procs.rank, procs.world_size
    for bt in {cfg.batch_tokens, *(b for _, b in cfg.batch_ramp)}:  # every batch size divides over the ranks
        cfg.grad_accum_steps(world_size, bt)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds ModelConfig.max_seq_len={model_cfg.max_seq_len}")
    device = resolve_device(cfg.device, rank)

    if device.type == "cpu" and model_cfg.attn_implementation == "flex_attention":
        raise ConfigError("attn_implementation 'flex_attention' has no backward pass on CPU in this torch; use 'sdpa' "
                          "for CPU training (flex_attention is for GPUs)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    train = TokenSplit(data_dir)
    if train.n_windows(cfg.seq_len) <= 0:
        raise DataValidationError(
            f"{len(train)} tokens in {len(train.offsets) - 1} documents: too few for one training sequence of "
            f"seq_len={cfg.seq_len} (it needs {cfg.seq_len + 1} tokens); tokenize more text or lower seq_len",
            file=str(data_dir), field="seq_len")
    heldout = TokenSplit(heldout_dir) if heldout_dir is not None else None
    vocab = train.vocab_size or max(train.max_token(), heldout.max_token() if heldout else 0) + 1
    if cfg.weighted:
        order = WeightedOrder(window_weights(train, cfg.seq_len, cfg.source_weights, cfg.long_doc_weight),
                              cfg.seq_len, cfg.seed)
    else:
        order = DataOrder(train.n_windows(cfg.seq_len), cfg.seq_len, cfg.seed, cfg.shuffle)
    total_steps = cfg.total_steps

    def fresh_model():
        if init_model_dir is None:
            return build_model(model_cfg, vocab, seed=cfg.seed)
        # continued pretraining may raise the context and RoPE theta (Llama 3's long-context stages)
        return load_causal_lm(init_model_dir, model_cfg.attn_implementation, rope_theta=model_cfg.rope_theta,
                              max_seq_len=model_cfg.max_seq_len)

    raw_model = fresh_model()
    if init_model_dir is not None:
        if raw_model.config.vocab_size < vocab:
            raise ConfigError(f"the model in {init_model_dir} has {raw_model.config.vocab_size} token ids but the data "
                              f"uses ids up to {vocab - 1}: tokenize with that model's tokenizer")
        vocab = raw_model.config.vocab_size
    raw_model = raw_model.to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    model_key = config_hash(model_cfg, vocab)
    step, data_pos, history = 0, 0, []
    ckpts = _checkpoints(out_dir) if resume else []
    state = None
    if ckpts:  # every rank reads the whole checkpoint: it resumes under any process count and parallelism
        from safetensors.torch import load_model

        ck_step, ck_dir = ckpts[-1]
        try:  # tensors and plain values only: a checkpoint folder can never run code
            state = torch.load(ck_dir / "state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(f"checkpoint {ck_dir / 'state.pt'} holds more than tensors and plain values (written "
                              f"by an older herd?) and is not loaded: delete {ck_dir} or use resume=False. "
                              f"({str(exc).splitlines()[0]})") from None
        if state.get("model_key") != model_key:
            raise ConfigError(f"checkpoint {ck_dir} was written for another model/vocab; use a fresh out_dir or resume=False")
        load_model(raw_model, str(ck_dir / "model.safetensors"), device=str(device))
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(raw_model)
    if fsdp:
        shard(raw_model, cfg.bf16)
    raw_model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=(device.type == "cuda" and not fsdp) or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule)
    )
    if state is not None:
        load_optim_state(optimizer, raw_model, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, data_pos, history = state["step"], state["data_position"], list(state["loss_history"])
        log.info("resumed from %s (step %d, data position %d)", ck_dir, step, data_pos)

    model = CausalLMWithLoss(raw_model)
    if dist is not None and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(model) if cfg.compile else model

    fpt = flops_per_token(model_cfg, cfg.seq_len, vocab)
    peak = cfg.peak_flops or measure_peak_flops(device.type, torch.bfloat16 if cfg.bf16 else torch.float32)
    attn_impl = model_cfg.attn_implementation
    target_steps = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
    t_window, tok_window = time.perf_counter(), 0
    t_steady, tok_steady, steady_from = None, 0, step + 1
    last_loss = history[-1] if history else float("nan")
    # under FSDP, rank 0's CPU copy with all the weights: checkpoints and the final model are written from it
    unsharded = Unsharded(raw_model, procs, fresh_model)

    def save(at_step: int) -> Path | None:
        weights, opt_state = unsharded(), optim_state(optimizer, raw_model, fsdp)
        if rank != 0:
            return None
        return _save_checkpoint(
            out_dir, at_step, weights, opt_state, scheduler,
            {"step": at_step, "data_position": data_pos, "loss_history": history, "model_key": model_key},
            cfg.keep_checkpoints,
        )

    avg_steps = set(average_steps(total_steps, cfg.average_last))
    avg_dir = out_dir / "average"

    seen = cfg.tokens_before(step)  # training tokens so far (the batch-size ramp reads it)
    while step < target_steps:
        g0 = data_pos
        batch_tokens = cfg.batch_at(seen)
        n_seq = batch_tokens // cfg.seq_len
        per_rank, accum = n_seq // world_size, cfg.grad_accum_steps(world_size, batch_tokens)
        ids, labels, docs = train.windows(order.starts(g0, n_seq), cfg.seq_len)
        n_valid = int((labels != IGNORE_INDEX).sum())  # global count: identical on every rank
        lo = rank * per_rank
        loss_sum_local = torch.zeros((), device=device)
        for k in range(accum):
            sl = slice(lo + k * cfg.micro_batch_size, lo + (k + 1) * cfg.micro_batch_size)
            ids_t = torch.from_numpy(ids[sl]).to(device)
            labels_t = torch.from_numpy(labels[sl]).to(device)
            mask, pos = packed_inputs(torch.from_numpy(docs[sl, :-1]).to(device), attn_implementation=attn_impl)
            # reduce the gradients once, after the last micro-batch (FSDP: reduce-scatter)
            with procs.sync(raw_model if fsdp else model, k == accum - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss_sum = fwd(ids_t, mask, pos, labels_t)
                # DDP and FSDP average gradients over ranks; scale so the result is the global token mean.
                (loss_sum * (world_size / max(1, n_valid))).backward()
            loss_sum_local += loss_sum.detach()
        if dist is not None:
            dist.all_reduce(loss_sum_local)
        loss = loss_sum_local.item() / max(1, n_valid)
        if not math.isfinite(loss):
            raise DivergenceError(
                f"loss is {loss} at step {step + 1}; lower PretrainConfig.lr (now {cfg.lr}) or raise warmup_steps"
            )
        grad_norm = clip_grad_norm(raw_model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        data_pos += n_seq
        seen += batch_tokens
        history.append(loss)
        last_loss = loss
        tok_window += batch_tokens
        if step == steady_from:
            t_steady = time.perf_counter()  # excludes the first step (compile, warm caches)
        elif t_steady is not None:
            tok_steady += batch_tokens

        if rank == 0 and (step % cfg.log_every == 0 or step == target_steps):
            now = time.perf_counter()
            tps = tok_window / max(now - t_window, 1e-9)
            metrics = {
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "mfu": mfu(tps, fpt, peak),
                "peak_mem_mb": _peak_mem_mb(device), "tokens": float(seen),
            }
            sink.log_metrics(metrics, step)
            log.info("step %d loss %.4f lr %.2e gnorm %.3f tok/s %.0f", step, loss, lr, grad_norm, tps)
            t_window, tok_window = now, 0
        if heldout is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and (
                rank == 0 or fsdp):  # a sharded model's forward needs every rank
            h, _ = evaluate(raw_model, heldout, cfg, attn_impl, device)
            if rank == 0:
                sink.log_metrics({"heldout_loss": h}, step)
        if downstream is not None and downstream.due(step) and step < total_steps and rank == 0:
            sink.log_metrics(downstream(raw_model, device), step)
        if step in avg_steps:  # a snapshot for the average (on disk: a resumed run keeps the earlier ones)
            weights = unsharded()
            if rank == 0:
                _snapshot(weights, avg_dir / f"step-{step:08d}.safetensors")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < target_steps:
            save(step)

    if t_steady is not None and tok_steady:
        tokens_per_s = tok_steady / max(time.perf_counter() - t_steady, 1e-9)
    else:
        tokens_per_s = 0.0
    common = dict(
        steps=step, tokens=seen, final_loss=last_loss, tokens_per_s=tokens_per_s,
        mfu=mfu(tokens_per_s, fpt, peak), flops_per_token=fpt, peak_mem_mb=_peak_mem_mb(device),
        num_params=n_params, vocab_size=vocab,
    )
    if step < total_steps:  # stopped early: checkpoint so a later call resumes exactly here
        ck = save(step)
        if dist is not None:
            dist.barrier()
        return PretrainResult(completed=False, heldout_loss=None, heldout_loss_by_source={}, model_dir=None,
                              metrics_path=None, checkpoint_dir=str(ck) if ck else None, **common)

    h_loss, h_by_src = (None, {})
    if heldout is not None and (rank == 0 or fsdp):
        h_loss, h_by_src = evaluate(raw_model, heldout, cfg, attn_impl, device)
        if rank != 0:
            h_loss, h_by_src = None, {}
    final = unsharded()  # under FSDP a collective: rank 0's copy with every weight
    h_last, probe_model = None, raw_model
    if avg_steps and rank == 0:  # the final model is the snapshots' mean; the last weights' loss is kept beside it
        with atomic_dir(out_dir / "last") as tmp:  # and the last weights themselves, to benchmark against the mean
            final.save_pretrained(tmp, safe_serialization=True)
        final = final.to(device)
        load_average(final, [avg_dir / f"step-{s:08d}.safetensors" for s in sorted(avg_steps)])
        h_last, probe_model = h_loss, final
        if heldout is not None:
            h_loss, h_by_src = evaluate(final, heldout, cfg, attn_impl, device)
    if rank == 0 and h_loss is not None:
        extra = {"heldout_loss_last": h_last} if h_last is not None else {}
        sink.log_metrics({"heldout_loss": h_loss, **extra, **{f"heldout_loss/{s}": v for s, v in h_by_src.items()}},
                         step)
    if downstream is not None and downstream.every and rank == 0:
        sink.log_metrics(downstream(probe_model, device), step)
    result = PretrainResult(
        completed=True, heldout_loss=h_loss, heldout_loss_by_source=h_by_src,
        model_dir=str(out_dir / "model"), metrics_path=str(out_dir / "metrics.json"), checkpoint_dir=None,
        heldout_loss_last=h_last, averaged=len(avg_steps), last_model_dir=str(out_dir / "last") if avg_steps else None,
        **common,
    )
    if rank == 0:
        with atomic_dir(out_dir / "model") as tmp:
            final.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(out_dir / "metrics.json", {"loss_history": history, **result.model_dump(mode="json")})
        write_json_atomic(
            out_dir / "manifest.json",
            {"stage": "pretrain", "config": cfg.model_dump(mode="json"), "model_config": model_cfg.model_dump(mode="json"),
             "world_size": world_size, "result": result.model_dump(mode="json")},
        )
    if dist is not None:
        dist.barrier()
    return result


def load_loss_history(out_dir: str | Path) -> list[float]:
    """The per-step training loss of a finished run (from ``metrics.json``)."""
    return json.loads((Path(out_dir) / "metrics.json").read_text())["loss_history"]
