"""The Llama architecture as herd builds it: config presets, model factory, parameter/FLOP counting.

The model is Hugging Face ``LlamaForCausalLM`` (pre-norm RMSNorm, SwiGLU, RoPE, GQA) built from a
``ModelConfig``, so anything herd trains loads in any Llama tool. Parallelism, compile and dtype are
applied by the trainer, never here.

Also: packed-sequence document masking (Llama 3): ``packed_inputs`` turns per-token document ids into
a block-diagonal causal 4D mask and position ids that restart at every document start.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from stages.common import StageConfig
from stages.errors import ConfigError, MissingAssetError

log = logging.getLogger(__name__)


ATTN_IMPLEMENTATIONS = ("sdpa", "flex_attention", "eager")


class ModelConfig(StageConfig):
    """Shape of a Llama decoder. Defaults are the ``debug`` flavour (runs in seconds on a CPU)."""

    flavour: str = Field("debug", description="Name of the preset this config came from (informational).")
    dim: int = Field(64, ge=8, description="Hidden size (d_model).")
    n_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Number of query heads; dim must be divisible by it.")
    n_kv_heads: int = Field(2, ge=1, description="Number of key/value heads (grouped-query attention).")
    ffn_hidden: int | None = Field(
        None, description="SwiGLU hidden size; None derives it Llama-style from dim, multiple_of, ffn_dim_multiplier."
    )
    multiple_of: int = Field(32, ge=1, description="Round the derived SwiGLU hidden size up to a multiple of this.")
    ffn_dim_multiplier: float | None = Field(None, description="Optional multiplier on the 8/3*dim SwiGLU width.")
    rope_theta: float = Field(500000.0, gt=0, description="RoPE base frequency (Llama 3: 500000).")
    max_seq_len: int = Field(256, ge=1, description="Maximum sequence length (RoPE table size).")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding and the output projection.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight init.")
    attn_implementation: str = Field(
        "sdpa", description="Attention kernel: 'sdpa' (document mask as a dense 4D bool mask), 'flex_attention' "
                            "(a block-sparse BlockMask: whole blocks across documents are skipped; GPU training, CPU inference only) "
                            "or 'eager'.")

    @field_validator("attn_implementation")
    @classmethod
    def _attn(cls, v: str) -> str:
        if v not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size (Llama's rule: 2/3 of 4*dim, times the multiplier, rounded up)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_flavour(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset shape (see ``FLAVOURS``) with ``overrides`` applied and validated."""
        if name not in FLAVOURS:
            raise ConfigError(f"flavour: unknown model flavour {name!r}; choose one of {sorted(FLAVOURS)}")
        data = {**FLAVOURS[name], "flavour": name, **overrides}
        return cls.model_validate(data)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> ModelConfig:
        """The shape of a saved Llama (its ``config.json``), e.g. a base model to fine-tune."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise MissingAssetError(f"no config.json in {model_dir}: not a saved Hugging Face model folder")
        c = json.loads(path.read_text())
        if c.get("model_type") != "llama":
            raise ConfigError(f"{path}: model_type {c.get('model_type')!r}; herd trains Llama models")
        data = {"flavour": Path(model_dir).name, "dim": c["hidden_size"], "n_layers": c["num_hidden_layers"],
                "n_heads": c["num_attention_heads"],
                "n_kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
                "ffn_hidden": c["intermediate_size"],
                "rope_theta": float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))),
                "max_seq_len": c.get("max_position_embeddings", 2048), "norm_eps": c.get("rms_norm_eps", 1e-5),
                "tie_embeddings": bool(c.get("tie_word_embeddings", False)), **overrides}
        return cls.model_validate(data)

    @classmethod
    def for_params(cls, n: float, *, vocab_size: int = 32000, head_dim: int = 64, aspect: float = 64.0,
                   **overrides: Any) -> ModelConfig:
        """The shape with about ``n`` scaling parameters (``scaling_params``: non-embedding + output head).

        Among shapes within a few percent of ``n`` it prefers dim ~= ``aspect`` * n_layers; head_dim is
        fixed and GQA uses n_kv_heads = n_heads / 4 where it divides. With a small vocabulary and tiny
        budgets the head is a large part of N, so it is counted: C = 6 N D is then the actual matmul
        compute of a step (Chinchilla counted all parameters; Kaplan's non-embedding count misjudges
        small models, Pearce & Song 2024).
        """
        best: tuple[float, ModelConfig] | None = None
        for n_layers in range(1, 49):
            for k in range(1, 129):
                dim = head_dim * k
                ratio = dim / n_layers
                if not aspect / 16 <= ratio <= aspect * 4:
                    continue
                n_heads = dim // head_dim
                n_kv = n_heads // 4 if n_heads % 4 == 0 else n_heads
                cfg = cls.model_validate(
                    {"flavour": f"p{int(n)}", "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
                     "n_kv_heads": n_kv, "multiple_of": min(64, head_dim), **overrides}
                )
                # closest parameter count first; among near-ties prefer the aspect ratio
                err = abs(math.log(scaling_params(cfg, vocab_size) / n)) + 0.1 * abs(math.log(ratio / aspect))
                if best is None or err < best[0]:
                    best = (err, cfg)
        if best is None:
            raise ConfigError(f"no model shape with head_dim={head_dim} and aspect={aspect} fits N={n:.3g}")
        return best[1]


FLAVOURS: dict[str, dict[str, Any]] = {
    # seconds on CPU; unit tests
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256),
    # ~1.6M non-embedding parameters
    "tiny": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, multiple_of=64, max_seq_len=512),
    # ~7.6M non-embedding parameters
    "small": dict(dim=320, n_layers=6, n_heads=5, n_kv_heads=5, multiple_of=64, max_seq_len=1024),
    # ~85M non-embedding (~125M with a 32k vocabulary): GPU benchmarks (GPT-2-small shape, GQA 12/4)
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, multiple_of=256, max_seq_len=2048),
    # Llama-2-7B-shaped (with Llama 3's 8 KV heads)
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=256, max_seq_len=4096),
    # Llama-3-8B-shaped
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
               max_seq_len=8192),
}


def to_hf_config(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(cfg: ModelConfig, vocab_size: int, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` (fp32, CPU), deterministic in ``seed``."""
    from transformers import LlamaForCausalLM

    hf_cfg = to_hf_config(cfg, vocab_size)
    hf_cfg._attn_implementation = cfg.attn_implementation
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_cfg)
    model.config.use_cache = False
    return model


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def require_safetensors(model_dir: str | Path) -> Path:
    """``model_dir`` if it holds ``*.safetensors`` weights; else ``MissingAssetError`` (a folder with only
    ``pytorch_model.bin`` & co. is refused: those are pickles, and loading a pickle runs its code)."""
    model_dir = Path(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        pickled = sorted(p.name for pat in PICKLED_WEIGHTS for p in model_dir.glob(pat))
        found = f" (found {', '.join(pickled)}: pickled weights, never loaded)" if pickled else ""
        raise MissingAssetError(f"no *.safetensors weights in {model_dir}{found}; herd loads models only from "
                                "safetensors: re-save the model with save_pretrained(..., safe_serialization=True)")
    return model_dir


def load_causal_lm(model_dir: str | Path, attn_implementation: str = "sdpa", *, rope_theta: float | None = None,
                   max_seq_len: int | None = None):
    """A saved ``LlamaForCausalLM`` (safetensors only: no pickle), fp32 on CPU, for training or scoring.
    ``rope_theta`` and ``max_seq_len``, where given, replace the saved ones (a longer context, as Llama 3's
    long-context stages raise it): the weights are the same, the rotary table is rebuilt."""
    from transformers import AutoConfig, LlamaForCausalLM

    model_dir = require_safetensors(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if rope_theta is not None:
        rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
        if rope.get("rope_type", "default") == "default":  # scaled RoPE variants keep their own parameters
            rope["rope_theta"] = float(rope_theta)
            config.rope_parameters = rope
    if max_seq_len is not None:
        config.max_position_embeddings = max(int(max_seq_len), config.max_position_embeddings)
    model = LlamaForCausalLM.from_pretrained(model_dir, config=config, local_files_only=True, use_safetensors=True,
                                             dtype=torch.float32, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model


def num_params(cfg: ModelConfig, vocab_size: int, non_embedding: bool = True) -> int:
    """Parameter count, analytically. ``non_embedding`` drops the token embedding and the output head."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    attn = cfg.dim * cfg.dim * 2 + cfg.dim * kv_dim * 2
    ffn = 3 * cfg.dim * cfg.hidden_dim
    block = attn + ffn + 2 * cfg.dim  # two RMSNorm weights
    body = cfg.n_layers * block + cfg.dim  # final norm
    if non_embedding:
        return body
    emb = vocab_size * cfg.dim
    return body + emb + (0 if cfg.tie_embeddings else emb)


def scaling_params(cfg: ModelConfig, vocab_size: int) -> int:
    """N of the scaling laws (C = 6 N D): every weight that takes part in a matmul.

    The non-embedding parameters plus the output projection (dim * vocab, a matmul even when tied); the
    input embedding is a gather and is not counted.
    """
    return num_params(cfg, vocab_size, non_embedding=True) + cfg.dim * vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int) -> float:
    """Training FLOPs per token: 6N + 12 * n_layers * dim * seq_len (Chinchilla / PaLM appendix B).

    N counts every weight that takes part in a matmul: the non-embedding parameters plus the output
    projection (dim * vocab; it is a matmul even when tied). The input embedding is a gather (no FLOPs).
    The attention term counts the full (unmasked) score and value matmuls, as PaLM does.
    """
    return 6.0 * scaling_params(cfg, vocab_size) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (0 if peak unknown)."""
    if peak_flops <= 0:
        return 0.0
    return tokens_per_s * flops_per_token_ / peak_flops


# Dense bf16 peak of common accelerators (FLOP/s, no sparsity).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@functools.lru_cache(maxsize=8)
def measure_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, n: int = 1024,
                       seconds: float = 0.5) -> float:
    """Peak matmul FLOP/s of ``device``: the table for known GPUs, else a square-matmul microbenchmark.

    On CPU the microbenchmark is the best achievable dense matmul rate (AMX for bf16), i.e. an honest
    upper bound for MFU on this machine rather than a datasheet number.
    """
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def packed_inputs(doc_ids: torch.Tensor, *, attn_implementation: str = "sdpa",
                  dtype: torch.dtype = torch.float32) -> tuple[Any, torch.Tensor]:
    """Document-masking inputs for a packed batch (Llama 3).

    Args:
        doc_ids: (B, T) int, the document each token belongs to (equal ids = same document;
            documents are contiguous).

    Returns:
        mask: (B, 1, T, T) block-diagonal causal mask, so attention never crosses a document
            boundary. Bool (True = attend) for sdpa; additive float (0 / dtype min) for eager; for
            flex_attention a ``BlockMask`` of the same predicate (blocks wholly across documents or
            above the diagonal are skipped, not computed and masked). transformers 5.x passes any 4D
            mask or BlockMask through ``create_causal_mask`` unchanged.
        position_ids: (B, T) long, restarting at 0 at every document start.
    """
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    position_ids = idx - start_pos
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        docs = doc_ids

        def document_causal(batch, head, q_idx, kv_idx):
            return (docs[batch, q_idx] == docs[batch, kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document_causal, B=b, H=None, Q_LEN=t, KV_LEN=t, device=doc_ids.device)
        return block_mask, position_ids
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    mask = (same & causal)[:, None]
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=doc_ids.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask, position_ids
