"""Scoring a causal LM on standard benchmarks, as lm-eval-harness scores them, with less recomputation.

Multiple choice (``MCItem``) is scored by the log-likelihood of each choice's continuation given its
context. Requests are tokenised as lm-eval-harness does (trailing spaces of the context move to the
continuation; the continuation's tokens are those of ``context + continuation`` after the context's
tokens), so both see the same token sequences. Unlike the harness, which runs every ``context +
continuation`` in full, the context of an item is run once and its KV cache reused for every choice:
items are grouped by context, contexts are left-padded and run in a batch (only the last position's
logits are computed), the cache rows are repeated once per choice, and the continuations of the chunk run
in further batched forwards, longest first, in runs of similar length (so a short continuation is not
padded to the chunk's longest). Chunks are sorted by context length and sized by a token budget.

Metrics per task (``results.json``, the contract other tools read)::

    {"model": str, "tasks": {"<task>": {"n": int, "shots": int, "metrics": {"<metric>": float},
                                        "stderr": {"<metric>": float}}}}

- ``acc``: the highest-likelihood choice is the gold one (for LAMBADA: the gold word is the greedy output);
- ``acc_norm``: the same with each log-likelihood divided by the choice's length in characters
  (lm-eval-harness' and lighteval's normalisation);
- ``bpb``: bits per UTF-8 byte of the gold continuation (total bits over total bytes), the signal small
  models give while accuracy sits at chance;
- ``centered_acc``: DCLM's ``(acc - chance) / (1 - chance)``;
- ``exact_match`` (GSM8K: the final number of the greedy answer equals the reference) and ``pass@1``
  (HumanEval: the greedy completion passes the unit tests in the sandbox).

Standard errors: binomial (the sample standard deviation of the per-item 0/1 scores over sqrt(n), as the
harness reports) for accuracies; a seeded bootstrap over items for ``bpb``; ``centered_acc``'s is ``acc``'s
scaled by ``1 / (1 - chance)``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from stages.common import StageConfig
from stages.errors import ConfigError
from stages.evaluation.items import GenItem, MCItem

log = logging.getLogger(__name__)

LN2 = math.log(2.0)

Progress = Callable[[str, int, int], None]  # (task, done, total)


def _no_progress(task: str, done: int, total: int) -> None:
    return None


class HarnessConfig(StageConfig):
    """How a model is scored on the benchmarks (``herd eval``; the pipeline's per-stage evaluation)."""

    tasks: str = Field("core", description="'core' (the log-likelihood tasks), 'chat' (GSM8K, HumanEval), 'all', or "
                                           "task names separated by commas (hellaswag,arc_easy,...)")
    limit: int = Field(0, ge=0, description="items per task (a seeded sample, kept in file order); 0: every item")
    shots: int | None = Field(None, ge=0, description="few-shot examples in front of each multiple-choice item; "
                                                      "None: each task's default (0; GSM8K's prompt holds its 8)")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="generative tasks through the tokenizer's chat template: 'auto' = when the tokenizer has "
                            "one; multiple choice is always scored on plain text, as the harness does")
    batch_tokens: int = Field(8192, ge=256, description="token budget of one forward (rows x padded length)")
    max_new_tokens: int = Field(256, ge=1, description="greedy tokens generated per generative item")
    gen_batch_size: int = Field(8, ge=1, description="prompts per generate call (left-padded, KV cache)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': cuda when present, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="'auto': bfloat16 on cuda, float32 on cpu")
    seed: int = Field(1234, description="seed of the --limit sample, the few-shot draws and the bpb bootstrap")
    n_boot: int = Field(200, ge=10, description="bootstrap resamples for the bpb standard error")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def sample_items(items: Sequence[Any], limit: int, seed: int, task: str) -> list[Any]:
    """``limit`` items drawn with a seed (0: all), returned in their original order."""
    if not limit or limit >= len(items):
        return list(items)
    idx = sorted(random.Random(f"{seed}/{task}").sample(range(len(items)), limit))
    return [items[i] for i in idx]


# --------------------------------------------------------------------------------------------------- tokenising


def encode_pair(tok, context: str, continuation: str, prefix: list[int]) -> tuple[list[int], list[int]]:
    """lm-eval-harness' ``_encode_pair``: trailing spaces move from the context to the continuation; the
    continuation's tokens are what ``context + continuation`` tokenises to after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = prefix + tok.encode(context + continuation, add_special_tokens=False)
    ctx = prefix + tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def bos_prefix(tok) -> list[int]:
    """``[bos]`` when the tokenizer puts one in front of text by default (the model was trained so), else
    nothing (lm-eval-harness' default for causal models without an explicit BOS)."""
    bos = tok.bos_token_id
    if bos is None:
        return []
    probe = tok.encode("a", add_special_tokens=True)
    return [bos] if probe and probe[0] == bos else []


# --------------------------------------------------------------------------------------------------- log-likelihood


@dataclass
class _Group:
    item: int  # index of the item
    ctx: list[int]
    conts: list[tuple[int, list[int]]]  # (choice index, tokens)


@torch.no_grad()
def choice_loglikelihoods(model, tok, items: Sequence[MCItem], prefixes: Sequence[str], *, batch_tokens: int,
                          max_length: int, device: torch.device, progress: Callable[[int], None] | None = None
                          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per item: the summed log-likelihood of each choice's continuation, and whether each continuation is
    the model's greedy output (every token the argmax)."""
    bos = bos_prefix(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    groups: list[_Group] = []
    for i, (item, pre) in enumerate(zip(items, prefixes)):
        by_ctx: dict[str, _Group] = {}
        for c, (ctx_text, cont_text) in enumerate(zip(item.contexts, item.continuations)):
            ctx_ids, cont_ids = encode_pair(tok, pre + ctx_text, cont_text, bos)
            if not cont_ids:
                raise ConfigError(f"item {item.id}: choice {c} tokenises to no continuation tokens")
            key = " ".join(map(str, ctx_ids))
            g = by_ctx.get(key)
            if g is None:
                g = by_ctx[key] = _Group(i, ctx_ids, [])
                groups.append(g)
            g.conts.append((c, cont_ids))
    for g in groups:  # left-truncate contexts that would not fit with their longest continuation
        longest = max(len(t) for _, t in g.conts)
        keep = max(1, max_length - longest)
        if len(g.ctx) > keep:
            g.ctx = g.ctx[-keep:]
    lls = [np.zeros(it.n_choices) for it in items]
    greedy = [np.zeros(it.n_choices, dtype=bool) for it in items]
    # by context length: a chunk's contexts pad little; its continuations are re-sorted in _score_chunk
    order = sorted(range(len(groups)), key=lambda k: (-len(groups[k].ctx), -max(len(t) for _, t in groups[k].conts)))
    done_items: set[int] = set()
    pos = 0
    while pos < len(order):
        # grow the chunk while rows x (context + continuation width) stays within the budget
        chunk = [order[pos]]
        g0 = groups[order[pos]]
        width = len(g0.ctx) + max(len(t) for _, t in g0.conts)
        rows = len(g0.conts)
        while pos + len(chunk) < len(order):
            nxt = groups[order[pos + len(chunk)]]
            w = max(width, len(nxt.ctx) + max(len(t) for _, t in nxt.conts))
            if (rows + len(nxt.conts)) * w > batch_tokens:
                break
            rows += len(nxt.conts)
            width = w
            chunk.append(order[pos + len(chunk)])
        pos += len(chunk)
        _score_chunk(model, [groups[k] for k in chunk], lls, greedy, pad, device)
        if progress is not None:
            new = {groups[k].item for k in chunk} - done_items
            done_items |= new
            progress(len(new))
    return lls, greedy


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# a forward's fixed cost in tokens' worth of compute: cpu measured (SmolLM2-135M, 2 threads: ~0.1 s a forward at
# ~600 tokens/s); cuda an estimate (a small batch costs about what a full one does)
_RUN_OVERHEAD = {"cpu": 64, "cuda": 1024}


def _length_batches(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Positions of ``lengths`` (sorted longest first) cut into consecutive runs, each padded to its first (longest)
    length, minimising ``sum(overhead + rows * longest)`` over the runs: few long runs where lengths are alike, a
    new run where padding would cost more than another forward. Exact (dynamic programming over the cut points)."""
    n = len(lengths)
    if n == 0:
        return []
    lens = np.asarray(lengths, dtype=np.float64)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # best[j]: rows 0..j-1; the last run is i..j-1, padded to lens[i]
        costs = best[:j] + overhead + (j - np.arange(j)) * lens[:j]
        start[j] = int(np.argmin(costs))
        best[j] = costs[start[j]]
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(list(range(int(start[j]), j)))
        j = int(start[j])
    return runs[::-1]


def _score_chunk(model, chunk: list[_Group], lls: list[np.ndarray], greedy: list[np.ndarray], pad: int,
                 device: torch.device) -> None:
    """One chunk: its contexts in one left-padded forward (only the last position's logits are computed), then the
    continuations' remaining tokens, longest first, in runs of similar length (``_length_batches``), each on a copy
    of its rows of the contexts' KV cache (a run is padded to its own longest continuation, not the chunk's)."""
    import copy

    G = len(chunk)
    W = max(len(g.ctx) for g in chunk)
    ctx = torch.full((G, W), pad, dtype=torch.long)
    ctx_mask = torch.zeros((G, W), dtype=torch.long)
    for r, g in enumerate(chunk):
        ctx[r, W - len(g.ctx):] = torch.tensor(g.ctx)
        ctx_mask[r, W - len(g.ctx):] = 1
    ctx, ctx_mask = ctx.to(device), ctx_mask.to(device)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ctx, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True, logits_to_keep=1)
    last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (G, V): predicts each continuation's first token
    rows = [(r, c, t) for r, g in enumerate(chunk) for c, t in g.conts]
    first = torch.tensor([t[0] for _, _, t in rows], device=device)
    src = torch.tensor([r for r, _, _ in rows], device=device)
    sums = last[src, first].double().cpu().numpy()
    hits = (last[src].argmax(-1) == first).cpu().numpy()
    rest = sorted((k for k in range(len(rows)) if len(rows[k][2]) > 1), key=lambda k: -len(rows[k][2]))
    runs = _length_batches([len(rows[k][2]) - 1 for k in rest], _RUN_OVERHEAD.get(device.type, 64))
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.2 renamed it
    for n_run, run in enumerate(runs):
        ks = [rest[j] for j in run]
        sub = cache if n_run == len(runs) - 1 else copy.deepcopy(cache)
        sub.batch_select_indices(src[ks])
        R, C = len(ks), len(rows[ks[0]][2]) - 1
        inp = torch.full((R, C), pad, dtype=torch.long)
        tgt = torch.zeros((R, C), dtype=torch.long)
        cmask = torch.zeros((R, C), dtype=torch.long)
        for i, k in enumerate(ks):
            t = rows[k][2]
            inp[i, :len(t) - 1] = torch.tensor(t[:-1])
            tgt[i, :len(t) - 1] = torch.tensor(t[1:])
            cmask[i, :len(t) - 1] = 1
        inp, tgt, cmask = inp.to(device), tgt.to(device), cmask.to(device)
        rmask = ctx_mask[src[ks]]
        full_mask = torch.cat([rmask, torch.ones_like(cmask)], dim=1)  # padding at the end is never read
        pos = rmask.sum(-1, keepdim=True) + torch.arange(C, device=device).unsqueeze(0)
        logits = model(input_ids=inp, attention_mask=full_mask, position_ids=pos, use_cache=True,
                       **{_cache_kwarg(model): sub}).logits.float()
        # log p(target) = logit - logsumexp, without materialising the (R, C, V) log-softmax
        lp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        hit = (logits.argmax(-1) == tgt) | ~cmask.bool()
        sums[ks] += (lp * cmask).sum(-1).double().cpu().numpy()
        hits[ks] &= hit.all(-1).cpu().numpy()
    for k, (r, c, _) in enumerate(rows):
        it = chunk[r].item
        lls[it][c] = sums[k]
        greedy[it][c] = hits[k]


# --------------------------------------------------------------------------------------------------- metrics


def binomial_stderr(x: np.ndarray) -> float:
    """lm-eval-harness' ``mean_stderr``: sample standard deviation over sqrt(n)."""
    n = len(x)
    return float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def bpb_with_stderr(nll_nats: np.ndarray, n_bytes: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Bits per byte (total bits over total bytes) and its bootstrap standard error over items."""
    total = float(nll_nats.sum() / LN2 / max(n_bytes.sum(), 1))
    if len(nll_nats) < 2:
        return total, float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll_nats), size=(n_boot, len(nll_nats)))
    boots = nll_nats[idx].sum(1) / LN2 / np.maximum(n_bytes[idx].sum(1), 1)
    return total, float(boots.std(ddof=1))


def mc_metrics(items: Sequence[MCItem], lls: Sequence[np.ndarray], greedy: Sequence[np.ndarray], chance: float,
               n_boot: int, seed: int) -> tuple[dict[str, float], dict[str, float], list[dict]]:
    """Task metrics and stderrs from per-choice log-likelihoods, plus one record per item."""
    acc, acc_norm, nll, nbytes, records = [], [], [], [], []
    multi = all(it.n_choices > 1 for it in items)
    for it, ll, gr in zip(items, lls, greedy):
        gold_text = it.continuations[it.gold]
        nll.append(-ll[it.gold])
        nbytes.append(len(gold_text.encode("utf-8")))
        if multi:
            norm = np.array([len(t) for t in (it.norm_texts or [c.lstrip(" ") for c in it.continuations])], dtype=float)
            a = float(np.argmax(ll) == it.gold)
            an = float(np.argmax(ll / np.maximum(norm, 1)) == it.gold)
        else:
            a = an = float(gr[it.gold])
        acc.append(a)
        acc_norm.append(an)
        records.append({"id": it.id, "gold": it.gold, "loglikelihoods": [round(float(v), 4) for v in ll], "acc": a,
                        "acc_norm": an})
    acc_a, accn_a = np.array(acc), np.array(acc_norm)
    bpb, bpb_se = bpb_with_stderr(np.array(nll), np.array(nbytes, dtype=float), n_boot, seed)
    metrics = {"acc": float(acc_a.mean()), "bpb": bpb}
    stderr = {"acc": binomial_stderr(acc_a), "bpb": bpb_se}
    if multi:
        metrics["acc_norm"] = float(accn_a.mean())
        stderr["acc_norm"] = binomial_stderr(accn_a)
    if 0 < chance < 1:
        metrics["centered_acc"] = (metrics["acc"] - chance) / (1 - chance)
        stderr["centered_acc"] = stderr["acc"] / (1 - chance)
    return metrics, stderr, records


# --------------------------------------------------------------------------------------------------- generation


_NUM = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
    """GSM8K's answer of a response: the number after 'The answer is' / '####' if present, else the last number."""
    for pat in (r"answer is\s*\$?(-?[\d,]*\.?\d+)", r"####\s*\$?(-?[\d,]*\.?\d+)"):
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            return _norm_number(m[-1])
    nums = _NUM.findall(text)
    return _norm_number(nums[-1]) if nums else None


def _norm_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


def use_chat(tok, mode: str) -> bool:
    if mode == "on":
        if not getattr(tok, "chat_template", None):
            raise ConfigError("chat_template: 'on' but the model's tokenizer has no chat template; use 'off'")
        return True
    return mode == "auto" and bool(getattr(tok, "chat_template", None))


def gen_prompt_ids(tok, item: GenItem, chat: bool, max_length: int, max_new: int) -> list[int]:
    if chat and item.messages:
        msgs = [{"role": r, "content": c} for r, c in item.messages]
        ids = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
    else:
        ids = bos_prefix(tok) + tok.encode(item.prompt, add_special_tokens=False)
    return ids[-max(1, max_length - max_new):]


@torch.no_grad()
def greedy_generate(model, tok, prompts: Sequence[list[int]], stop: Sequence[Sequence[str]], *, max_new_tokens: int,
                    batch_size: int, device: torch.device, progress: Callable[[int], None] | None = None
                    ) -> tuple[list[str], dict[str, float]]:
    """Greedy continuations of token-id prompts, batched (sorted by length, left-padded, KV cache), each cut at
    its first stop string or end of turn."""
    eot = tok.get_vocab().get("<|eot_id|>")
    stops = sorted({t for t in (eot, tok.eos_token_id, tok.get_vocab().get("<|im_end|>")) if t is not None and t >= 0})
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs: list[str] = [""] * len(prompts)
    n_tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        strings = sorted({x for i in idx for x in stop[i] if x})
        kwargs: dict[str, Any] = {"stop_strings": strings, "tokenizer": tok} if strings else {}
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stops or None, pad_token_id=pad, use_cache=True, top_p=None, top_k=None,
                             temperature=None, **kwargs)
        for row, i in zip(out[:, width:].tolist(), idx):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            n_tokens += cut
            outs[i] = truncate_at_stop(tok.decode(row[:cut], skip_special_tokens=True), stop[i])
        if progress is not None:
            progress(len(idx))
    seconds = time.perf_counter() - t0
    return outs, {"generated_tokens": float(n_tokens), "seconds": seconds,
                  "tokens_per_s": n_tokens / max(seconds, 1e-9)}


_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def humaneval_program(item: GenItem, completion: str, chat: bool) -> str:
    """The program to run: the prompt and its completion (or, from a chat answer, its code block when that
    defines the function itself), then the tests and ``check(entry_point)``."""
    body = item.prompt + completion
    if chat:
        m = _CODE_BLOCK.search(completion)
        code = m.group(1) if m else completion
        if f"def {item.entry_point}" in code:
            imports = "".join(ln + "\n" for ln in item.prompt.splitlines() if ln.startswith(("import ", "from ")))
            body = imports + code
        else:
            body = item.prompt + code
    return f"{body}\n\n{item.test}\n\ncheck({item.entry_point})\n"


# --------------------------------------------------------------------------------------------------- a whole run


def fewshot_prefixes(task, items: Sequence[Any], shots: int, seed: int) -> list[str]:
    """The text in front of each item: the task's description and ``shots`` solved examples drawn (seeded per
    item) from the task's few-shot pool, never the item itself."""
    head = f"{task.description}{task.fewshot_sep}" if task.description else ""
    if shots == 0:
        return [head] * len(items)
    out = []
    for it in items:
        # MMLU draws from the item's own subject; other tasks from their whole pool
        pool = list(task.fewshot_pool(it)) if hasattr(task, "fewshot_pool") else list(task.fewshot)
        if shots > len(pool):
            raise ConfigError(f"shots: {task.name} has {len(pool)} few-shot examples, fewer than --shots {shots}")
        rng = random.Random(f"{seed}/{task.name}/{it.id}")
        cand = [ex for ex in rng.sample(pool, min(len(pool), shots + 1)) if ex.id != it.id][:shots]
        out.append(head + "".join(ex.example() + task.fewshot_sep for ex in cand))
    return out


def evaluate_model(cfg: HarnessConfig, model_dir: str | Path, tasks: Sequence[Any], *, model_name: str | None = None,
                   progress: Progress = _no_progress, run_programs: Callable[[list[str]], list[bool]] | None = None,
                   tokenizer_dir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """Score the model in ``model_dir`` on ``tasks`` (``stages.evaluation.benchmarks.Task``).

    Returns ``results`` (the ``results.json`` shape, plus ``timing``) and the per-item records by task.
    ``run_programs`` runs HumanEval programs (the sandbox) and says which passed. ``tokenizer_dir`` is the
    tokenizer's folder when the model folder has none (herd's pretrained base models keep theirs apart).
    """
    from transformers import AutoTokenizer

    from stages.model import load_causal_lm

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir), local_files_only=True)
    model = load_causal_lm(model_dir).to(device=device, dtype=dtype).eval()
    model.config.use_cache = True
    max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    chat = use_chat(tok, cfg.chat_template)
    results: dict[str, Any] = {"model": model_name or str(model_dir), "tasks": {}}
    records: dict[str, list[dict]] = {}
    timing: dict[str, dict[str, float]] = {}
    for task in tasks:
        items = sample_items(task.items, cfg.limit, cfg.seed, task.name)
        t0 = time.perf_counter()
        done = [0]

        def tick(n: int, _task=task.name, _total=len(items)) -> None:
            done[0] += n
            progress(_task, done[0], _total)

        if task.kind == "mc":
            shots = 0 if cfg.shots is None else cfg.shots
            prefixes = fewshot_prefixes(task, items, shots, cfg.seed)
            lls, greedy = choice_loglikelihoods(model, tok, items, prefixes, batch_tokens=cfg.batch_tokens,
                                                max_length=max_length, device=device, progress=tick)
            metrics, stderr, recs = mc_metrics(items, lls, greedy, task.chance, cfg.n_boot, cfg.seed)
            extra: dict[str, float] = {}
        else:
            shots = task.default_shots if hasattr(task, "default_shots") else 0
            metrics, stderr, recs, extra = _score_generative(cfg, model, tok, task, items, chat, max_length, device,
                                                             tick, run_programs)
        seconds = time.perf_counter() - t0
        results["tasks"][task.name] = {"n": len(items), "shots": shots, "metrics": metrics, "stderr": stderr}
        records[task.name] = recs
        timing[task.name] = {"seconds": seconds, "items_per_s": len(items) / max(seconds, 1e-9), **extra}
        log.info("%s: %s (%d items, %.1f s)", task.name,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), len(items), seconds)
    results["timing"] = timing
    results["config"] = cfg.model_dump(mode="json")
    results["device"] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "chat_template": chat}
    return results, records


def _score_generative(cfg: HarnessConfig, model, tok, task, items: list[GenItem], chat: bool, max_length: int,
                      device: torch.device, tick: Callable[[int], None],
                      run_programs: Callable[[list[str]], list[bool]] | None):
    prompts = [gen_prompt_ids(tok, it, chat, max_length, cfg.max_new_tokens) for it in items]
    stops = [tuple(it.stop) for it in items]
    outs, gen = greedy_generate(model, tok, prompts, stops, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.gen_batch_size, device=device, progress=tick)
    # bpb of the reference answer given the plain prompt: a signal even where exact match is 0
    golds = [MCItem(id=it.id, contexts=(it.prompt,), continuations=(it.gold,), gold=0) for it in items]
    lls, _ = choice_loglikelihoods(model, tok, golds, [""] * len(golds), batch_tokens=cfg.batch_tokens,
                                   max_length=max_length, device=device)
    nll = np.array([-ll[0] for ll in lls])
    nbytes = np.array([len(it.gold.encode("utf-8")) for it in items], dtype=float)
    bpb, bpb_se = bpb_with_stderr(nll, nbytes, cfg.n_boot, cfg.seed)
    recs: list[dict] = []
    if all(it.kind == "gsm8k" for it in items):
        em = []
        for it, o in zip(items, outs):
            pred = extract_number(o)
            em.append(float(pred is not None and pred == _norm_number(it.target)))
            recs.append({"id": it.id, "output": o, "prediction": pred, "target": it.target, "exact_match": em[-1]})
        arr = np.array(em)
        metrics = {"exact_match": float(arr.mean()), "bpb": bpb}
        stderr = {"exact_match": binomial_stderr(arr), "bpb": bpb_se}
    else:
        if run_programs is None:
            raise ConfigError(f"{task.name}: running generated code needs the sandbox (run_programs)")
        programs = [humaneval_program(it, o, chat) for it, o in zip(items, outs)]
        passed = run_programs(programs)
        arr = np.array([float(p) for p in passed])
        for it, o, p in zip(items, outs, passed):
            recs.append({"id": it.id, "completion": o, "passed": bool(p)})
        metrics = {"pass@1": float(arr.mean()), "bpb": bpb}
        stderr = {"pass@1": binomial_stderr(arr), "bpb": bpb_se}
    return metrics, stderr, recs, {"generated_tokens_per_s": gen["tokens_per_s"]}
