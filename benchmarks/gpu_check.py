"""The GPU check: herd's stages run directly (no Prefect, MLflow or datatrove; only torch, transformers, numpy,
safetensors, tokenizers and pydantic), each against a naive baseline in the same run, and one table to paste.

    python benchmarks/gpu_check.py [--model DIR] [--device auto|cuda|cpu] [--out DIR] [--quick]

1. pretraining: the ``125m`` flavour at sequence 2048 with document masking (flex-attention block masks, bf16
   autocast, torch.compile on CUDA), tokens/s and MFU against the measured bf16 matmul peak; baseline: a plain
   eager fp32 loop (``benchmarks/pretrain.py``'s) on the same model and data;
2. a reward-model epoch, a DPO epoch and a rejection-sampling pass on SmolLM2-135M (``--model``: a Llama folder
   with its tokenizer; the imported ``smollm2-135m`` by default; a folder without weights gets a random model of its
   config's shape, which times the same), examples/s and generated tokens/s; baselines: the same stage in float32
   with one example per forward, and ``generate`` one prompt at a time.

``--quick`` shrinks everything (the ``debug`` flavour, a tiny tokenizer and model, a few examples) so the CPU tests
run the whole script in seconds. The table goes to stdout and, as JSON, to ``<out>/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.pretrain import plain_loop, synthetic_split  # noqa: E402
from stages.collect import GenerationConfig, generate, load_policy  # noqa: E402
from stages.device import OnDevice, resolve_device  # noqa: E402
from stages.dpo import DPOConfig, dpo  # noqa: E402
from stages.model import ModelConfig, flops_per_token, measure_peak_flops  # noqa: E402
from stages.policy import chat_prompt_ids  # noqa: E402
from stages.preferences import ingest_file  # noqa: E402
from stages.pretrain import PretrainConfig, pretrain  # noqa: E402
from stages.reward import RMConfig, train_reward_model  # noqa: E402

TOPICS = ["the water cycle", "how a bicycle gear works", "why the sky is blue", "the French revolution",
          "photosynthesis", "prime numbers", "how vaccines work", "the rules of chess", "plate tectonics",
          "the history of paper", "how a compiler works", "the moon's phases"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ 1. pretraining


def check_pretrain(device: torch.device, quick: bool, tmp: Path) -> dict:
    flavour, seq, micro, steps, vocab = ("debug", 64, 2, 3, 512) if quick else ("125m", 2048, 8, 30, 32768)
    cuda = device.type == "cuda"
    model_cfg = ModelConfig.from_flavour(flavour, max_seq_len=seq,
                                         attn_implementation="flex_attention" if cuda else "sdpa")
    data = synthetic_split(tmp / "pretrain-data", seq * micro * (steps + 3) + 1, vocab)
    peak = measure_peak_flops(device.type, torch.bfloat16, n=4096 if cuda else 512, seconds=2.0 if cuda else 0.3)
    cfg = PretrainConfig(seq_len=seq, batch_tokens=seq * micro, micro_batch_size=micro, steps=steps + 1, bf16=cuda,
                         compile=cuda, log_every=10**6, shuffle=False, peak_flops=peak, device=device.type)
    res, wall = timed(device, lambda: pretrain(cfg, model_cfg, data, None, tmp / "pretrain-out"))
    base = plain_loop(model_cfg.derive(attn_implementation="sdpa"), vocab, data, seq, micro, max(2, steps // 3),
                      device.type)
    fpt = flops_per_token(model_cfg, seq, vocab)
    return {"stage": f"pretrain {flavour}, seq {seq}, document masking", "unit": "tokens/s",
            "herd": res.tokens_per_s, "naive": base, "note": f"MFU {res.mfu:.1%} of {peak / 1e12:.3g} TFLOP/s bf16 "
            f"(naive {base * fpt / peak:.1%}); {res.num_params / 1e6:.1f}M params; wall {wall:.0f} s incl. compile"}


# ------------------------------------------------------------------ 2. SmolLM2-135M: RM, DPO, rejection sampling


def tiny_tokenizer_model(tmp: Path) -> Path:
    """--quick: a byte-level BPE on the topic sentences and a random debug Llama, saved as a policy folder."""
    from transformers import AutoTokenizer

    from stages.model import build_model
    from stages.tokenizer import TokenizerConfig, train_tokenizer

    data = tmp / "tok-data"
    data.mkdir(parents=True)
    with gzip.open(data / "00000.jsonl.gz", "wt") as fh:
        for i in range(200):
            fh.write(json.dumps({"id": f"d{i}", "text": f"Explain {TOPICS[i % 12]} in a few words, please.",
                                 "source": "qa"}) + "\n")
    out = tmp / "quick-model"
    train_tokenizer(TokenizerConfig(vocab_size=400), [tmp / "tok-data"], out)
    vocab = len(AutoTokenizer.from_pretrained(str(out), local_files_only=True))
    build_model(ModelConfig.from_flavour("debug"), vocab, seed=0).save_pretrained(out)
    return out


def smol_model(model_dir: Path, tmp: Path) -> tuple[Path, str]:
    """The model folder to run: as given, or (no weights carried) a random model of its config's shape."""
    if any(model_dir.glob("*.safetensors")):
        return model_dir, "weights"
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out = tmp / "random-smol"
    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).save_pretrained(out)
    return out, "random init, same shape"


def preference_batch(n: int, tmp: Path) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        good = f"Here is a short explanation of {t}. " + "It follows from a few simple ideas. " * (1 + i % 5)
        bad = "I do not know. " * (1 + i % 3)
        rows.append({"id": f"g{i}", "prompt": f"Explain {t}, version {i}.", "chosen": good, "rejected": bad,
                     "edited": None, "rating": ("significantly_better", "better", "slightly_better")[i % 3],
                     "category": "helpfulness", "annotator_id": "gpu-check"})
    src = tmp / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(ingest_file(src, tmp / "batches", batch_id="gpu-check")[1])


def naive_generate(model, tok, prompts: list[str], max_new: int, device: torch.device) -> tuple[int, float]:
    """``generate`` one prompt at a time (float32, the model's own KV cache): generated tokens and seconds."""
    stop = [t for t in (tok.get_vocab().get("<|eot_id|>"), tok.eos_token_id) if t is not None and t >= 0]
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        ids = torch.tensor([chat_prompt_ids(tok, p, 192)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=50, top_p=0.95, max_new_tokens=max_new, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0])
        row = out[0, ids.shape[1]:].tolist()
        n += next((k for k, t in enumerate(row) if t in stop), len(row))
    sync(device)
    return n, time.perf_counter() - t0


def check_alignment(device: torch.device, quick: bool, model_dir: Path, tmp: Path) -> list[dict]:
    n_pairs, naive_pairs, k, n_prompts, max_new = (16, 4, 2, 4, 8) if quick else (512, 64, 8, 32, 128)
    batch = preference_batch(n_pairs, tmp)
    dev = device.type
    rows = []
    rm_cfg = RMConfig(device=dev, batch_pairs=64, micro_pairs=16, max_tokens=256, heldout_fraction=0.05,
                      group_by_length=4, epochs=1.0)
    res, s = timed(device, lambda: train_reward_model(rm_cfg, model_dir, [batch], tmp / "rm"))
    naive_batch = preference_batch(naive_pairs, tmp / "naive")
    res0, s0 = timed(device, lambda: train_reward_model(
        rm_cfg.derive(dtype="float32", micro_pairs=1, group_by_length=0), model_dir, [naive_batch], tmp / "rm0"))
    rows.append({"stage": "reward model, one epoch", "unit": "pairs/s", "herd": res.train_pairs / s,
                 "naive": res0.train_pairs / s0, "note": f"{res.train_pairs} pairs, micro 16, grouped by length; "
                 f"naive fp32, one pair per forward"})
    dpo_cfg = DPOConfig(device=dev, batch_pairs=64, micro_pairs=16, max_tokens=256)
    d, s = timed(device, lambda: dpo(dpo_cfg, model_dir, [batch], tmp / "dpo"))
    d0, s0 = timed(device, lambda: dpo(dpo_cfg.derive(dtype="float32", micro_pairs=1), model_dir, [naive_batch],
                                       tmp / "dpo0"))
    rows.append({"stage": "DPO, one epoch", "unit": "pairs/s", "herd": d.metrics["pairs"] / s,
                 "naive": d0.metrics["pairs"] / s0, "note": "reference log-probs once per batch; naive fp32, one "
                 "pair per forward"})
    on = OnDevice(device=dev)
    model, tok = load_policy(model_dir, on)
    prompts = [f"Explain {TOPICS[i % 12]} to a child, version {i}." for i in range(n_prompts)]
    gen_cfg = GenerationConfig(max_new_tokens=max_new, batch_size=min(256, n_prompts * k))
    generate(model, tok, prompts[:2], temperature=1.0, cfg=gen_cfg)  # warm up
    (_, stats), _ = timed(device, lambda: generate(model, tok, [p for p in prompts for _ in range(k)],
                                                   temperature=1.0, cfg=gen_cfg))
    base, _ = load_policy(model_dir, OnDevice(device=dev, dtype="float32"))
    n0, s0 = naive_generate(base, tok, prompts[: max(2, n_prompts // 8)], max_new, device)
    rows.append({"stage": f"rejection-sampling pass, {n_prompts} prompts x {k}", "unit": "generated tokens/s",
                 "herd": stats["tokens_per_s"], "naive": n0 / s0, "note": f"batch {gen_cfg.batch_size}, KV cache, "
                 f"{on.torch_dtype()}; naive generate, one prompt at a time, fp32"})
    if not quick:  # generation.compile: static-shape steps, CUDA graphs; against the eager loop just measured
        c_cfg = gen_cfg.derive(compile=True)
        _, c_warm = timed(device, lambda: generate(model, tok, [p for p in prompts for _ in range(k)],
                                                   temperature=1.0, cfg=c_cfg))  # traces and captures the graphs
        (_, c_stats), _ = timed(device, lambda: generate(model, tok, [p for p in prompts for _ in range(k)],
                                                         temperature=1.0, cfg=c_cfg))
        rows.append({"stage": "the same pass, generation.compile", "unit": "generated tokens/s",
                     "herd": c_stats["tokens_per_s"], "naive": stats["tokens_per_s"],
                     "note": f"static cache + torch.compile (CUDA graphs), against herd's eager loop; first pass "
                     f"with compiling {c_warm:.0f} s"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="SmolLM2-135M folder (default $HERD_HOME/models/smollm2-135m)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.environ.get("OUT") or ".")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU test of the script itself")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    home = Path(os.environ.get("HERD_HOME", ROOT / ".herd"))
    rows: list[dict] = []
    failures: list[str] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        def alignment() -> list[dict]:
            if args.quick:
                model, kind = tiny_tokenizer_model(tmp), "quick: tiny tokenizer and model"
            else:
                model, kind = smol_model(Path(args.model or home / "models" / "smollm2-135m"), tmp)
            found = check_alignment(device, args.quick, model, tmp)
            for r in found:
                r["note"] += f"; model: {kind}"
            return found

        for name, fn in (("pretrain", lambda: [check_pretrain(device, args.quick, tmp)]), ("alignment", alignment)):
            try:
                got = fn()
                rows += got
                for r in got:
                    print(f"{r['stage']}: herd {r['herd']:.1f} {r['unit']}, naive {r['naive']:.1f}", flush=True)
            except Exception:  # noqa: BLE001  (one part failing must not lose the others' numbers)
                failures.append(f"{name}: {traceback.format_exc()}")
                print(failures[-1], file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = f"{'stage':<48}{'unit':>20}{'herd':>12}{'naive':>12}{'ratio':>8}  note"
    print(f"\ndevice: {name}, torch {torch.__version__}; {time.perf_counter() - t_all:.0f} s in all")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['stage']:<48}{r['unit']:>20}{r['herd']:>12.1f}{r['naive']:>12.1f}{r['herd'] / r['naive']:>7.2f}x"
              f"  {r['note']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows,
                                                    "failures": failures}, indent=1))
    if failures:
        sys.exit(f"{len(failures)} part(s) failed: " + ", ".join(f.split(':')[0] for f in failures))


if __name__ == "__main__":
    main()
