"""Collecting the next batch to annotate: prompts, two sampled responses each, batched generation.

As Llama 2 did, each prompt gets two responses from two model variants or two sampling temperatures;
the pairs are written in the format annotators fill in (``pairs.jsonl``: ``{"id", "prompt",
"responses": [a, b], "category", "variants"}``); an annotator (human, or ``stages.annotator``) turns
each pair into a preference record.

Prompts: helpfulness prompts are the first user turns of the SFT conversations, safety prompts the
project's harmful requests (``stages/assets/safety_prompts.jsonl``, distinct from the SFT refusal
demonstrations). Each prompt is assigned once, by a hash of its text, to the ``collect`` pool or the
``eval`` pool; evaluation never uses a prompt preferences were collected on.

Generation (:func:`generate`) is batched with left padding and the KV cache, and stops at
end-of-turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from stages.annotator import AnnotatorConfig
from stages.common import StageConfig, atomic_dir, iter_jsonl, write_json_atomic
from stages.device import OnDevice
from stages.errors import DataValidationError, MissingAssetError
from stages.policy import chat_prompt_ids
from stages.sampling import sample

log = logging.getLogger(__name__)

SAFETY_PROMPTS = Path(__file__).resolve().parent / "assets" / "safety_prompts.jsonl"


def _unit(*parts: Any) -> float:
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return int(h[:15], 16) / 16**15


def prompt_pools(conversations: Sequence[dict], eval_fraction: float, seed: int = 0) -> dict[str, list[dict]]:
    """``{"collect": [...], "eval": [...]}`` of ``{"id", "prompt", "category"}``, disjoint by prompt text."""
    prompts: dict[str, dict] = {}
    for c in conversations:
        if c.get("source") in ("safety", "gatt"):
            continue
        first = next((m["content"] for m in c["messages"] if m["role"] == "user"), None)
        if first and len(first) <= 600:
            prompts.setdefault(first, {"id": f"h/{c['id']}", "prompt": first, "category": "helpfulness"})
    if not SAFETY_PROMPTS.is_file():
        raise MissingAssetError(f"safety prompts not found at {SAFETY_PROMPTS}")
    for line, row in iter_jsonl(SAFETY_PROMPTS):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataValidationError("must be a non-empty string", file=str(SAFETY_PROMPTS), line=line, field="prompt")
        prompts.setdefault(row["prompt"], {"id": f"s/{row['id']}", "prompt": row["prompt"], "category": "safety"})
    pools: dict[str, list[dict]] = {"collect": [], "eval": []}
    for text in sorted(prompts):
        pools["eval" if _unit("eval-pool", seed, text) < eval_fraction else "collect"].append(prompts[text])
    return pools


class GenerationConfig(StageConfig):
    max_new_tokens: int = Field(48, ge=1, description="tokens generated per response")
    top_k: int = Field(50, ge=0, description="sample among the k most likely tokens (0: all); 50 is Hugging Face "
                       "generate's default")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling")
    batch_size: int = Field(16, ge=1, description="prompts per generate call (left-padded, KV cache)")
    max_prompt_tokens: int = Field(192, ge=8, description="longer prompts keep their last tokens")
    compile: bool = Field(False, description="decode steps with static shapes under torch.compile (CUDA graphs on "
                          "a GPU, where per-step launch costs dominate small batches); on a CPU compiling costs more "
                          "than it saves")


def load_policy(model_dir: str | Path, on: OnDevice | None = None, *, train: bool = False):
    """``(model, tokenizer)`` of a saved chat model folder (safetensors + tokenizer), ready to generate, on ``on``'s
    device (the CPU without one): cast to its dtype, or (``train``) kept float32 for training under autocast."""
    from transformers import AutoTokenizer

    from stages.model import load_causal_lm

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = load_causal_lm(model_dir).eval()
    model.config.use_cache = True
    if on is not None:
        model = model.to(device=on.torch_device(), dtype=None if train else on.torch_dtype())
    return model, tok


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str | list[dict]], *, temperature: float, cfg: GenerationConfig,
             seed: int = 0) -> tuple[list[str], dict[str, float]]:
    """Sample one response per prompt (in batches of prompts of similar length, answers in the prompts' order).
    Returns the texts and ``{"tokens", "seconds", "tokens_per_s"}``."""
    eot = tok.get_vocab().get("<|eot_id|>")  # herd's end of turn; other templates end turns with their eos
    stop = [t for t in (eot, tok.eos_token_id) if t is not None and t >= 0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    outs: list[str] = [""] * len(prompts)
    n_tokens, t0 = 0, time.perf_counter()
    torch.manual_seed(seed)
    rows = [chat_prompt_ids(tok, p, cfg.max_prompt_tokens) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of like lengths: little left padding
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        for j, toks in zip(idx, sample(model, [rows[j] for j in idx], max_new_tokens=cfg.max_new_tokens,
                                       temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=stop, pad=pad,
                                       compile=cfg.compile)):
            n_tokens += len(toks)
            outs[j] = tok.decode(toks, skip_special_tokens=True).strip()
    seconds = time.perf_counter() - t0
    return outs, {"tokens": float(n_tokens), "seconds": seconds, "tokens_per_s": n_tokens / max(seconds, 1e-9)}


class CollectConfig(OnDevice):
    """How the next batch to annotate is produced."""

    prompts: int = Field(200, ge=1, description="prompts per batch (drawn from the collect pool)")
    safety_share: float = Field(0.3, ge=0, le=1, description="share of safety prompts in a batch")
    temperatures: tuple[float, float] = Field((0.7, 1.2), description="sampling temperature of response a and b")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="share of prompts reserved for evaluation")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="generation settings")
    seed: int = Field(0, description="prompt sampling and generation seed")


class PreferenceLoopConfig(StageConfig):
    """Collecting preference batches from the current policy and labelling them (simulated annotator)."""

    collect: CollectConfig = Field(default_factory=CollectConfig, description="prompts and sampling")
    annotator: AnnotatorConfig = Field(default_factory=AnnotatorConfig,
                                         description="the simulated annotator (demo and tests)")
    batches: int = Field(2, ge=1, description="batches the demo collects before training the reward models")


def draw_prompts(pool: Sequence[dict], cfg: CollectConfig, batch_index: int) -> list[dict]:
    """``cfg.prompts`` prompts for batch ``batch_index``: the safety share, then helpfulness, seeded by the index."""
    import random

    rng = random.Random(f"{cfg.seed}/{batch_index}")
    safety = [p for p in pool if p["category"] == "safety"]
    helpful = [p for p in pool if p["category"] == "helpfulness"]
    n_s = min(len(safety), round(cfg.prompts * cfg.safety_share))
    n_h = min(len(helpful), cfg.prompts - n_s)
    return rng.sample(safety, n_s) + rng.sample(helpful, n_h)


def collect_pairs(cfg: CollectConfig, model_dir: str | Path, pool: Sequence[dict], out_dir: str | Path,
                  batch_index: int) -> dict:
    """Write ``out_dir/pairs.jsonl`` (the file annotators fill in) and ``manifest.json`` (last)."""
    model, tok = load_policy(model_dir, cfg)
    prompts = draw_prompts(pool, cfg, batch_index)
    texts = [p["prompt"] for p in prompts]
    a, stats_a = generate(model, tok, texts, temperature=cfg.temperatures[0], cfg=cfg.generation,
                          seed=cfg.seed * 1000 + batch_index)
    b, stats_b = generate(model, tok, texts, temperature=cfg.temperatures[1], cfg=cfg.generation,
                          seed=cfg.seed * 1000 + batch_index + 500)
    tokens = stats_a["tokens"] + stats_b["tokens"]
    seconds = stats_a["seconds"] + stats_b["seconds"]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "pairs.jsonl", "w") as fh:
            for p, ra, rb in zip(prompts, a, b):
                fh.write(json.dumps({"id": f"b{batch_index}/{p['id']}", "prompt": p["prompt"], "responses": [ra, rb],
                                     "category": p["category"],
                                     "variants": [f"T={cfg.temperatures[0]}", f"T={cfg.temperatures[1]}"]},
                                    ensure_ascii=False) + "\n")
        manifest = {"model_dir": str(model_dir), "batch_index": batch_index, "pairs": len(prompts),
                    "safety": sum(p["category"] == "safety" for p in prompts), "generated_tokens": tokens,
                    "tokens_per_s": tokens / max(seconds, 1e-9), "config": cfg.model_dump(mode="json")}
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("collected %d pairs from %s at %.0f generated tokens/s -> %s", len(prompts), model_dir,
             manifest["tokens_per_s"], out_dir)
    return manifest


def annotate_file(pairs_file: str | Path, out_file: str | Path, cfg) -> dict:
    """Run the simulated annotator over ``pairs_file``; write an export (preference records, JSONL)."""
    from stages.annotator import annotate

    records = [annotate(pair, cfg) for _, pair in iter_jsonl(pairs_file)]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out_file)
    ratings: dict[str, int] = {}
    for r in records:
        ratings[r["rating"]] = ratings.get(r["rating"], 0) + 1
    return {"records": len(records), "ratings": ratings, "edited": sum(r["edited"] is not None for r in records),
            "file": str(out_file)}
