"""Pretraining throughput: herd's trainer path (torch.compile + bf16 autocast, packed documents with
document masking) vs a plain eager fp32 PyTorch loop over the same ``LlamaForCausalLM``, same batch,
same process, side by side. MFU from ``stages.model.flops_per_token`` over the peak bf16 matmul rate
of this machine, measured with a square-matmul microbenchmark (``measure_peak_flops``).

    .venv/bin/python benchmarks/pretrain.py [--flavour small] [--seq-len 256] [--micro-batch 8]
        [--steps 30] [--vocab 8192] [--threads 2] [--attn sdpa|flex_attention] [--device cpu|cuda]

The first compile takes ~90 s on a 2-core CPU (cached afterwards); the timed steps exclude it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.model import ModelConfig, build_model, flops_per_token, measure_peak_flops, mfu  # noqa: E402
from stages.pretrain import PretrainConfig, pretrain  # noqa: E402


def synthetic_split(path: Path, n_tokens: int, vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, 800, size=n_tokens // 300 + 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets <= n_tokens]
    n = int(offsets[-1])
    path.mkdir(parents=True, exist_ok=True)
    rng.integers(0, vocab, size=n, dtype=np.uint16).tofile(path / "tokens.bin")
    np.save(path / "doc_offsets.npy", offsets.astype(np.int64))
    np.save(path / "doc_sources.npy", np.asarray(["bench"] * (len(offsets) - 1)))
    (path / "manifest.json").write_text(f'{{"dtype": "uint16", "vocab_size": {vocab}}}')
    return path


def plain_loop(model_cfg: ModelConfig, vocab: int, data: Path, seq_len: int, batch: int, steps: int,
               device: str = "cpu") -> float:
    """Eager fp32 baseline: model(input_ids, labels).loss, AdamW, clip; returns tokens/s (first step excluded)."""
    model = build_model(model_cfg, vocab, seed=0).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    tokens = np.memmap(data / "tokens.bin", dtype=np.uint16, mode="r")
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()
        start = step * batch * seq_len
        x = torch.from_numpy(np.asarray(tokens[start : start + batch * seq_len], dtype=np.int64)).view(batch, seq_len)
        x = x.to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            loss.item()  # synchronise so the timing covers the work
    return steps * batch * seq_len / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavour", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", help="herd path's document-masked attention: sdpa (dense 4D mask) or "
                   "flex_attention (block-sparse BlockMask)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (a `gpu` run: ~125M model, e.g. --flavour 125m)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model_cfg = ModelConfig.from_flavour(args.flavour, max_seq_len=args.seq_len)
    batch_tokens = args.seq_len * args.micro_batch
    fpt = flops_per_token(model_cfg, args.seq_len, args.vocab)
    peak = measure_peak_flops(args.device, torch.bfloat16, n=2048, seconds=2.0)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_split(Path(tmp) / "train", batch_tokens * (args.steps + 2) + 1, args.vocab)
        base_tps = plain_loop(model_cfg, args.vocab, data, args.seq_len, args.micro_batch, args.steps, args.device)
        cfg = PretrainConfig(
            seq_len=args.seq_len, batch_tokens=batch_tokens, micro_batch_size=args.micro_batch, steps=args.steps + 1,
            bf16=True, compile=True, log_every=10_000, num_threads=args.threads, peak_flops=peak, shuffle=False,
            device=args.device,
        )
        t0 = time.perf_counter()
        res = pretrain(cfg, model_cfg.derive(attn_implementation=args.attn), data, None, Path(tmp) / "out")
        wall = time.perf_counter() - t0

    print(f"model {args.flavour}: {res.num_params / 1e6:.2f}M params, seq_len {args.seq_len}, batch {args.micro_batch}, "
          f"{fpt / 1e6:.1f} MFLOP/token; {args.device} peak bf16 {peak / 1e12:.3f} TFLOP/s")
    print(f"{'path':<34}{'tokens/s':>12}{'MFU':>9}")
    print(f"{'plain eager fp32 loop':<34}{base_tps:>12.0f}{mfu(base_tps, fpt, peak):>9.2%}")
    print(f"{'herd pretrain (compile + bf16, ' + args.attn + ')':<34}{res.tokens_per_s:>12.0f}{res.mfu:>9.2%}")
    print(f"ratio herd / plain: {res.tokens_per_s / base_tps:.2f}x   (herd wall incl. compile {wall:.0f} s)")


if __name__ == "__main__":
    main()
