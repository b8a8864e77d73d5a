"""Batched sampling from a Llama policy: the decode loop of preference collection, rejection sampling and the
held-out evaluation.

The model's own modules (embeddings, RMSNorms, projections, rotary embedding, MLPs, head) run in a lean loop over a
preallocated KV cache: the prompt batch (left-padded) once, then one token per step. Sampling follows Hugging Face
``generate``: logits / temperature, then top-k, then top-p (nucleus) over what top-k kept, then a multinomial draw;
temperature 0 is greedy. A row stops at its first stop token; the batch stops when every row has.

Why not ``model.generate``: for the small policies herd trains on a CPU, a decode step is mostly fixed cost (a
causal mask and cache bookkeeping per step, logits processors over the whole vocabulary, a multinomial draw over
it); this loop does the same arithmetic with less of it (``benchmarks/generation.py`` measures both).
``tests/stages/test_sampling.py`` checks its logits against the model's forward and its greedy output against
``generate``.

``compile=True`` (``generation.compile``, meant for GPUs) runs each decode step with static shapes: the cache's
capacity rounded up to a multiple of 64 and the batch to a power of two, the new token written at a position given
as a tensor, attention over the whole cache under a mask of written positions. Every step then has the same shapes,
so ``torch.compile`` traces it once per (batch, capacity) bucket and, on CUDA, replays it as a CUDA graph
(``mode="reduce-overhead"``): the per-step launch cost that dominates small-batch decoding on a GPU goes away. The
outputs are the eager loop's (tested on the CPU, where compiling costs more than it saves).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _attention(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer on ``h`` (B, L, dim) at cache positions ``start .. start+L-1``; writes its keys and values
    into the caches; ``mask`` (B, 1, L, start+L) says which cached positions each query sees."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    b, n, _ = h.shape
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache[:, :, start:start + n] = k
    v_cache[:, :, start:start + n] = v
    keys, values = k_cache[:, :, :start + n], v_cache[:, :, :start + n]
    if n == 1:  # one new token: two small matmuls beat the fused kernel's fixed cost
        groups = q.shape[1] // keys.shape[1]
        qg = q.reshape(b, keys.shape[1], groups, hd)  # query heads grouped by the key/value head they share
        scores = (qg @ keys.transpose(-1, -2)) * attn.scaling  # (B, kv heads, group, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        o = (scores.softmax(-1) @ values).reshape(b, -1, 1, hd)
    else:
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])
    h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _static_attention(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, at: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer on one new token per row (``h``: (B, 1, dim)) written at cache position ``at`` (a (1,)
    tensor), attending over the whole cache under ``mask`` (B, 1, 1, capacity): static shapes for every step."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    b = h.shape[0]
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, 1, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache.index_copy_(2, at, k)
    v_cache.index_copy_(2, at, v)
    kv_heads = k_cache.shape[1]
    qg = q.reshape(b, kv_heads, -1, hd)
    scores = (qg @ k_cache.transpose(-1, -2)) * attn.scaling  # (B, kv heads, group, capacity)
    scores = scores.masked_fill(~mask, float("-inf"))
    o = (scores.softmax(-1) @ v_cache).reshape(b, -1, 1, hd)
    h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _static_step(model, k: list[torch.Tensor], v: list[torch.Tensor], seen: torch.Tensor, ids: torch.Tensor,
                 positions: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """One decode step with static shapes (see the module doc): the last position's logits (B, vocab)."""
    llama = model.model
    seen.index_fill_(1, at, True)
    mask = seen[:, None, None, :]
    h = llama.embed_tokens(ids)
    cos, sin = llama.rotary_emb(h, positions)
    for i, layer in enumerate(llama.layers):
        h = _static_attention(layer, h, cos, sin, k[i], v[i], at, mask)
    return model.lm_head(llama.norm(h[:, -1]))


_COMPILED: dict[str, object] = {}


def _compiled_step(device: torch.device):
    """``_static_step`` compiled once per process and device type (CUDA graphs on GPUs)."""
    key = device.type
    if key not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        _COMPILED[key] = torch.compile(_static_step, mode=mode, dynamic=False)
    return _COMPILED[key]


class KVDecoder:
    """A ``LlamaForCausalLM`` run step by step over a preallocated cache of ``capacity`` positions."""

    def __init__(self, model, batch: int, capacity: int):
        self.model, self.llama = model, model.model
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, cfg.num_key_value_heads, capacity, hd)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.llama.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.llama.layers]
        self.seen = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # real (not padding) positions
        self.length = 0

    def forward(self, ids: torch.Tensor, real: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (B, L) at the next cache positions; ``real`` (B, L) marks non-padding tokens,
        ``positions`` (B, L) their rotary positions. Returns the last position's logits (B, vocab)."""
        b, n = ids.shape
        start = self.length
        self.seen[:, start:start + n] = real
        end = start + n
        # a query sees real cached keys up to itself, and always itself (a padding query then attends to something)
        causal = torch.ones(n, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        own = torch.zeros(n, end, dtype=torch.bool, device=ids.device)
        own[torch.arange(n), torch.arange(start, end)] = True
        mask = ((causal & self.seen[:, None, :end]) | own)[:, None]
        h = self.llama.embed_tokens(ids)
        cos, sin = self.llama.rotary_emb(h, positions)
        for i, layer in enumerate(self.llama.layers):
            h = _attention(layer, h, cos, sin, self.k[i], self.v[i], start, mask)
        self.length = end
        return self.model.lm_head(self.llama.norm(h[:, -1]))

    def step(self, ids: torch.Tensor, positions: torch.Tensor, compiled: bool) -> torch.Tensor:
        """Append one token per row (``ids``, ``positions``: (B, 1)); the logits (B, vocab). ``compiled``: the
        static-shape step under ``torch.compile`` instead of :meth:`forward`."""
        if not compiled:
            return self.forward(ids, torch.ones_like(ids, dtype=torch.bool), positions)
        at = torch.tensor([self.length], device=ids.device)
        if ids.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = _compiled_step(ids.device)(self.model, self.k, self.v, self.seen, ids, positions, at)
        self.length += 1
        return logits.clone()


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, index)``: the sampling distribution of each row over the tokens ``index`` it may draw, as
    ``generate`` builds it: logits / temperature, top-k, then top-p over what top-k kept (tokens whose cumulative
    probability, in ascending order, stays <= 1 - top_p are dropped; the most likely always stays)."""
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        scores, index = scores.topk(top_k, dim=-1)  # descending
    else:
        scores, index = scores.sort(dim=-1, descending=True)
    if top_p < 1.0:
        ascending = scores.softmax(-1).flip(-1).cumsum(-1)
        drop = (ascending <= 1 - top_p).flip(-1)
        drop[..., 0] = False
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1), index


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Next token per row (B,): a multinomial draw from :func:`distribution`; greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs, index = distribution(logits, temperature, top_k, top_p)
    return index.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


@torch.no_grad()
def sample(model, rows: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, top_k: int = 50,
           top_p: float = 1.0, stop: Sequence[int] = (), pad: int = 0, compile: bool = False) -> list[list[int]]:
    """Continue each prompt of ``rows`` (token ids) by up to ``max_new_tokens`` tokens; each row's output ends
    before its first stop token (the stop token is not included). ``compile``: static-shape decode steps under
    ``torch.compile`` (see the module doc)."""
    if not rows:
        return []
    n_rows = len(rows)
    if compile:  # static shapes: the batch up to a power of two (repeated rows, dropped at the end), capacity to 64s
        rows = list(rows) + [rows[-1]] * ((1 << (n_rows - 1).bit_length()) - n_rows)
    device = next(model.parameters()).device
    b, width = len(rows), max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    capacity = width + max_new_tokens
    dec = KVDecoder(model, b, -(-capacity // 64) * 64 if compile else capacity)
    logits = dec.forward(ids, real, positions)
    nxt_pos = positions[:, -1:] + 1
    stop_t = torch.tensor(list(stop) or [-1], device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        tok = pick(logits, temperature, top_k, top_p)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out.append(tok)
        done = done | torch.isin(tok, stop_t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = dec.step(tok[:, None], nxt_pos, compile)
        nxt_pos = nxt_pos + 1
    gen = torch.stack(out, 1).tolist()[:n_rows]
    stops = set(stop)
    result = []
    for row in gen:
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result
