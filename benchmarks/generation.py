"""Generation throughput for rejection sampling: herd's batched sampler (left-padded batches, a preallocated KV
cache, ``stages.collect.generate`` over ``stages.sampling``) against Hugging Face ``generate`` on the same batches
(left-padded, KV cache: what herd used before) and naive one-prompt-at-a-time ``generate``, on the same model and
prompts, side by side. Tokens counted are those generated up to each response's end of turn.

    .venv/bin/python benchmarks/generation.py [--model DIR] [--prompts 64] [--batch-size 32]
        [--max-new-tokens 48] [--temperature 1.0] [--threads 2]

``--model`` defaults to the latest SFT model of ``$HERD_HOME`` (run ``make demo`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stages.collect import GenerationConfig, generate, load_policy, prompt_pools  # noqa: E402
from stages.sft_data import read_conversations  # noqa: E402


def naive(model, tok, prompts, cfg: GenerationConfig, temperature: float, seed: int) -> tuple[int, float]:
    """One prompt per generate call (no batching); returns (generated tokens, seconds)."""
    stop = [t for t in (tok.get_vocab().get("<|eot_id|>"), tok.eos_token_id) if t is not None]
    torch.manual_seed(seed)
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        ids = {k: v[:, -cfg.max_prompt_tokens:] for k, v in ids.items()}
        out = model.generate(**ids, do_sample=True, temperature=temperature, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                             use_cache=True)
        toks = out[0, ids["input_ids"].shape[1]:].tolist()
        n += next((k for k, t in enumerate(toks) if t in stop), len(toks))
    return n, time.perf_counter() - t0


def batched_generate(model, tok, prompts, cfg: GenerationConfig, temperature: float, seed: int) -> tuple[int, float]:
    """Hugging Face ``generate`` on herd's batches (left-padded, KV cache, same sampling settings)."""
    from stages.policy import chat_prompt_ids

    stop = [t for t in (tok.get_vocab().get("<|eot_id|>"), tok.eos_token_id) if t is not None and t >= 0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    torch.manual_seed(seed)
    n, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), cfg.batch_size):
        ids = [chat_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in prompts[i:i + cfg.batch_size]]
        width = max(len(x) for x in ids)
        out = model.generate(input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
                             attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
                             do_sample=temperature > 0, temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=stop, pad_token_id=pad, use_cache=True)
        for row in out[:, width:].tolist():
            n += next((k for k, t in enumerate(row) if t in stop), len(row))
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    home = Path(os.environ.get("HERD_HOME", ROOT / ".herd"))
    latest = json.loads((home / "latest.json").read_text()) if (home / "latest.json").exists() else {}
    model_dir = args.model or latest.get("sft_model")
    if not model_dir or not latest.get("sft_data"):
        sys.exit("no SFT model: run `make demo` (or `herd sft`) first, or pass --model")
    model, tok = load_policy(model_dir)
    prompts = [x["prompt"] for x in prompt_pools(read_conversations(Path(latest["sft_data"])), 0.2)["collect"]]
    prompts = prompts[: args.prompts]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    generate(model, tok, prompts[:4], temperature=args.temperature, cfg=cfg)  # warm up
    _, stats = generate(model, tok, prompts, temperature=args.temperature, cfg=cfg, seed=0)
    batched_generate(model, tok, prompts[:4], cfg, args.temperature, seed=0)  # warm up
    n_hf, s_hf = batched_generate(model, tok, prompts, cfg, args.temperature, seed=0)
    n_naive, s_naive = naive(model, tok, prompts, cfg, args.temperature, seed=0)
    naive_tps, hf_tps = n_naive / s_naive, n_hf / s_hf
    params = sum(x.numel() for x in model.parameters())
    print(f"model {model_dir} ({params / 1e6:.2f}M params), {len(prompts)} prompts, <= {args.max_new_tokens} new "
          f"tokens, T={args.temperature}, {args.threads} threads")
    print(f"{'path':<40}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'naive generate, one prompt at a time':<40}{n_naive:>8}{s_naive:>9.2f}{naive_tps:>10.0f}")
    print(f"{f'herd batched (batch {args.batch_size}, KV cache)':<40}{int(stats['tokens']):>8}"
          f"{stats['seconds']:>9.2f}{stats['tokens_per_s']:>10.0f}")
    print(f"{f'generate batched (batch {args.batch_size}, KV cache)':<40}{n_hf:>8}{s_hf:>9.2f}{hf_tps:>10.0f}")
    print(f"ratio herd / naive: {stats['tokens_per_s'] / naive_tps:.2f}x; herd / batched generate: "
          f"{stats['tokens_per_s'] / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
