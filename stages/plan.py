"""A pretraining run on paper: per-GPU memory, throughput and days, before any GPU is rented.

``plan(cfg)`` sizes a model flavour (``stages.model.FLAVOURS``) trained with AdamW in bf16 mixed precision on
``nproc`` GPUs, data-parallel (``ddp``: every GPU holds everything) or fully sharded (``fsdp``: FSDP2's
``fully_shard`` per decoder layer, i.e. ZeRO-3):

- **Model states**, 16 bytes per parameter (ZeRO, Rajbhandari et al. 2020): fp32 weights (4), fp32 gradients (4;
  FSDP2 reduces in fp32) and AdamW's two fp32 moments (8). ``fsdp`` divides them by ``nproc`` and adds the bf16
  copies of the layers being gathered (the current one and the one prefetched: 2 x 2 bytes x a layer's weights,
  plus the embedding and head, gathered at the ends).
- **Activations** per token, bf16, with a fused attention kernel (no ``seq x seq`` scores kept; Korthikanti et al.
  2022 count the same tensors for GPT without it), what one decoder layer keeps for its backward:
  the block input and the RMSNorm output in front of attention (2 x dim), the rotated query, key and value
  (dim + 2 x kv_dim), the attention output (dim) and the attention kernel's fp32 log-sum-exp (n_heads, 4 bytes),
  the residual and the RMSNorm output in front of the MLP (2 x dim), SwiGLU's gate and up projections, the SiLU
  output and their product (4 x hidden_dim); so ``2 * (6 dim + 2 kv_dim + 4 hidden) + 4 n_heads`` bytes per token
  and layer. Plus the logits in bf16 and their fp32 copy for the loss (``6 x vocab`` bytes per token).
  With activation checkpointing each layer keeps only its input (2 x dim) and one layer's full set is live
  during its recomputation.
- **Throughput** from the same FLOPs per token the trainer reports MFU with (``stages.model.flops_per_token``):
  tokens/s per GPU = MFU x peak / FLOPs per token; checkpointing recomputes the forward (a third more hardware
  FLOPs for the same model FLOPs), so at a fixed hardware utilisation it runs at 3/4 of the rate.

Fragmentation, the CUDA context, communication buffers and temporary buffers are not counted: the report keeps a
margin (``headroom``) and says whether the total fits the GPU.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stages.common import StageConfig
from stages.errors import ConfigError
from stages.model import FLAVOURS, GPU_PEAK_FLOPS, ModelConfig, flops_per_token, num_params

GIB = 1024**3


class PlanConfig(StageConfig):
    """What to size: a model flavour, the cluster and the run."""

    flavour: str = Field("8b", description=f"model shape, one of {sorted(FLAVOURS)}")
    n_kv_heads: int | None = Field(None, ge=1, description="key/value heads, if not the flavour's (Llama 2 7B: 32)")
    vocab_size: int = Field(128_256, ge=1, description="vocabulary (Llama 3: 128,256; Llama 2: 32,000)")
    seq_len: int = Field(8192, ge=1, description="tokens per sequence")
    micro_batch: int = Field(1, ge=1, description="sequences per GPU per forward/backward")
    nproc: int = Field(8, ge=1, description="GPUs")
    parallelism: str = Field("fsdp", pattern="^(ddp|fsdp)$", description="ddp: replicated; fsdp: sharded (ZeRO-3)")
    gpu: str = Field("H100", description=f"accelerator, for its bf16 dense peak: one of {sorted(GPU_PEAK_FLOPS)}")
    gpu_memory_gib: float = Field(80.0, gt=0, description="memory of one GPU, GiB")
    mfu: float = Field(0.4, gt=0, le=1, description="assumed model FLOPs utilisation")
    tokens: float = Field(15e12, gt=0, description="training tokens (Llama 3: 15T)")
    headroom: float = Field(0.1, ge=0, lt=1, description="share of GPU memory kept free (allocator, buffers)")

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"flavour: unknown model flavour {self.flavour!r}; choose one of {sorted(FLAVOURS)}")
        if self.gpu not in GPU_PEAK_FLOPS:
            raise ConfigError(f"gpu: unknown accelerator {self.gpu!r}; choose one of {sorted(GPU_PEAK_FLOPS)}")
        if self.parallelism == "fsdp" and self.nproc == 1:
            raise ConfigError("parallelism: fsdp shards over several GPUs; with nproc 1 use parallelism: ddp (or "
                              "set nproc > 1)")
        return self


def activation_bytes_per_token_layer(m: ModelConfig) -> int:
    """Bytes one decoder layer keeps per token for its backward (bf16, fused attention; see the module doc)."""
    kv_dim = m.n_kv_heads * m.head_dim
    return 2 * (6 * m.dim + 2 * kv_dim + 4 * m.hidden_dim) + 4 * m.n_heads


def plan(cfg: PlanConfig) -> dict[str, Any]:
    """Per-GPU memory (GiB) with and without activation checkpointing, tokens/s and days for ``cfg.tokens``."""
    m = ModelConfig.from_flavour(cfg.flavour, **({"n_kv_heads": cfg.n_kv_heads} if cfg.n_kv_heads else {}))
    params = num_params(m, cfg.vocab_size, non_embedding=False)
    emb = cfg.vocab_size * m.dim
    layer = (num_params(m, cfg.vocab_size) - m.dim) // m.n_layers
    states = 16 * params
    if cfg.parallelism == "fsdp":
        states = states / cfg.nproc + 2 * 2 * layer + 2 * emb * (1 if m.tie_embeddings else 2)
    tokens_per_gpu = cfg.micro_batch * cfg.seq_len
    per_layer = activation_bytes_per_token_layer(m) * tokens_per_gpu
    logits = 6 * cfg.vocab_size * tokens_per_gpu
    act_full = m.n_layers * per_layer + logits
    act_ckpt = m.n_layers * 2 * m.dim * tokens_per_gpu + per_layer + logits
    fpt = flops_per_token(m, cfg.seq_len, cfg.vocab_size)
    peak = GPU_PEAK_FLOPS[cfg.gpu]
    tps = cfg.mfu * peak / fpt
    usable = cfg.gpu_memory_gib * (1 - cfg.headroom)

    def run(act: float, rate: float) -> dict[str, Any]:
        total = (states + act) / GIB
        return {"activations_gib": act / GIB, "total_gib": total, "fits": total <= usable,
                "tokens_per_s_per_gpu": rate, "tokens_per_s": rate * cfg.nproc,
                "days": cfg.tokens / (rate * cfg.nproc) / 86400}

    return {"config": cfg.model_dump(mode="json"), "params": params, "layer_params": layer,
            "flops_per_token": fpt, "peak_flops": peak, "usable_gib": usable,
            "model_states_gib": states / GIB,
            "activation_bytes_per_token_layer": activation_bytes_per_token_layer(m),
            "no_checkpointing": run(act_full, tps),
            "checkpointing": run(act_ckpt, tps * 3 / 4)}


def render(p: dict[str, Any]) -> str:
    """The plan as a short table."""
    c = p["config"]
    lines = [f"{c['flavour']}: {p['params'] / 1e9:.2f}B parameters (vocab {c['vocab_size']:,}), "
             f"{p['flops_per_token'] / 1e9:.1f} GFLOPs per token at seq {c['seq_len']}; {c['nproc']} x {c['gpu']} "
             f"({c['gpu_memory_gib']:g} GiB, {p['usable_gib']:.0f} usable), {c['parallelism']}, micro batch "
             f"{c['micro_batch']}, MFU {c['mfu']:.0%}",
             f"model states (weights, gradients, AdamW; bf16 mixed precision): {p['model_states_gib']:.1f} GiB per GPU",
             f"{'':<26}{'activations':>12}{'total':>9}{'fits':>6}{'tokens/s/GPU':>14}{'days for ' + format(c['tokens'], '.3g') + ' tokens':>24}"]
    for name in ("no_checkpointing", "checkpointing"):
        r = p[name]
        lines.append(f"{name.replace('_', ' '):<26}{r['activations_gib']:>10.1f} G{r['total_gib']:>7.1f} G"
                     f"{'yes' if r['fits'] else 'no':>6}{r['tokens_per_s_per_gpu']:>14,.0f}{r['days']:>24.1f}")
    return "\n".join(lines)
