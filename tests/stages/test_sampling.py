"""The decode loop herd samples with (``stages.sampling``) against the model's own forward and ``generate``: the
same logits at every step on left-padded batches, the same greedy tokens, and the same sampling distribution
(temperature, top-k, top-p) as Hugging Face's logits warpers."""

from __future__ import annotations

import pytest
import torch

from stages.model import ModelConfig, build_model
from stages.sampling import KVDecoder, distribution, sample


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=1, ffn_hidden=88, max_seq_len=128)
    m = build_model(cfg, vocab_size=97, seed=3).eval()
    with torch.no_grad():  # a trained model's weights are not all near zero: make the logits spread
        for p in m.parameters():
            p.mul_(8.0 if p.dim() >= 2 else 1.0)
    return m


def _rows() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]


def test_cached_steps_give_the_models_logits(model):
    rows, extra = _rows(), [[7, 9, 4], [1, 2, 3], [50, 60, 70], [8, 8, 8]]
    width = max(len(r) for r in rows)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)
    dec = KVDecoder(model, len(rows), width + len(extra[0]))
    got = [dec.forward(ids, real, pos)]
    for j in range(len(extra[0])):
        step = torch.tensor([[e[j]] for e in extra])
        got.append(dec.forward(step, torch.ones(len(rows), 1, dtype=torch.bool), pos[:, -1:] + 1 + j))
    with torch.no_grad():
        for r, (row, more) in enumerate(zip(rows, extra)):  # each row alone, unpadded, through the model's forward
            full = model(input_ids=torch.tensor([row + more])).logits[0]
            for j in range(len(more) + 1):
                torch.testing.assert_close(got[j][r], full[len(row) - 1 + j], rtol=1e-4, atol=1e-4)


def test_greedy_matches_generate(model):
    rows = _rows()
    ours = sample(model, rows, max_new_tokens=12, temperature=0.0, stop=[5], pad=0)
    for row, out in zip(rows, ours):
        ref = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, eos_token_id=[5], pad_token_id=0)[0, len(row):].tolist()
        cut = next((k for k, t in enumerate(ref) if t == 5), len(ref))
        assert out == ref[:cut]
    assert any(len(o) < 12 for o in ours) or all(5 not in o for o in ours)


def test_compiled_static_steps_give_the_eager_loops_tokens_and_logits(model):
    """The static-shape decode step (``generation.compile``: for CUDA graphs) against the eager loop: the same logits
    at every step for three rows (the batch padded to four, the cache rounded to 64 positions), compiled and not."""
    from stages import sampling

    rows = _rows()[:3]
    width = max(len(r) for r in rows)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)
    extra = torch.tensor([[7, 9, 4], [1, 2, 3], [50, 60, 70]])
    with torch.no_grad():
        eager, static = KVDecoder(model, 3, width + 3), KVDecoder(model, 3, 64)
        want, got = [eager.forward(ids, real, pos)], [static.forward(ids, real, pos)]
        for j in range(3):
            p = pos[:, -1:] + 1 + j
            want.append(eager.forward(extra[:, j:j + 1], torch.ones(3, 1, dtype=torch.bool), p))
            got.append(sampling._static_step(model, static.k, static.v, static.seen, extra[:, j:j + 1], p,
                                             torch.tensor([static.length])))
            static.length += 1
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    greedy = sample(model, rows, max_new_tokens=10, temperature=0.0, stop=[5], pad=0)
    assert sample(model, rows, max_new_tokens=10, temperature=0.0, stop=[5], pad=0, compile=True) == greedy


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 0.95), (0.7, 50, 0.95), (1.2, 0, 0.9), (1.0, 10, 1.0)])
def test_distribution_is_generates(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = warpers(None, logits.clone()).softmax(-1)
    probs, index = distribution(logits, temperature, top_k, top_p)
    ours = torch.zeros_like(ref).scatter_(-1, index, probs)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_draws_follow_the_distribution(model):
    """Many draws of one step: token frequencies match the distribution within sampling error."""
    torch.manual_seed(0)
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2)) * 2
    from stages.sampling import pick

    draws = torch.stack([pick(logits, 1.0, 20, 0.9) for _ in range(20_000)]).squeeze(-1)
    probs, index = distribution(logits, 1.0, 20, 0.9)
    freq = torch.bincount(draws, minlength=40).float() / len(draws)
    expected = torch.zeros(40).scatter_(0, index[0], probs[0])
    assert (freq - expected).abs().max() < 0.01
    assert freq[expected == 0].sum() == 0
