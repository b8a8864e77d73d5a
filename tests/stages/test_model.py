from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from stages.errors import ConfigError
from stages.model import (
    FLAVOURS,
    ModelConfig,
    build_model,
    flops_per_token,
    mfu,
    num_params,
    packed_inputs,
    scaling_params,
)


def test_flavours_and_param_count_match_the_built_model():
    for name in ("debug", "tiny"):
        for tie in (False, True):
            cfg = ModelConfig.from_flavour(name, tie_embeddings=tie)
            model = build_model(cfg, vocab_size=100, seed=0)
            assert sum(p.numel() for p in model.parameters()) == num_params(cfg, 100, non_embedding=False)
    assert 1e6 < num_params(ModelConfig.from_flavour("tiny"), 100) < 2e6
    assert 6e6 < num_params(ModelConfig.from_flavour("small"), 100) < 9e6
    big = ModelConfig.from_flavour("7b")
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads, big.hidden_dim) == (4096, 32, 32, 8, 11008)
    assert ModelConfig.from_flavour("8b").hidden_dim == 14336
    assert set(FLAVOURS) >= {"debug", "tiny", "small", "7b"}


def test_invalid_configs_name_the_field():
    with pytest.raises(ConfigError, match="flavour"):
        ModelConfig.from_flavour("nope")
    with pytest.raises(ValidationError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValidationError, match="attn_implementation"):
        ModelConfig(attn_implementation="flash")


def test_for_params_hits_the_target_counting_the_output_head():
    for n, vocab, head_dim in ((1e7, 32000, 64), (1e8, 32000, 64), (3e4, 1024, 8), (2e5, 1024, 8)):
        cfg = ModelConfig.for_params(n, vocab_size=vocab, head_dim=head_dim)
        assert scaling_params(cfg, vocab) == num_params(cfg, vocab) + cfg.dim * vocab
        assert 0.85 < scaling_params(cfg, vocab) / n < 1.15, (n, cfg)
    # more parameters never means a narrower model with fewer layers
    a, b = (ModelConfig.for_params(n, vocab_size=1024, head_dim=8, aspect=16) for n in (3e4, 3e5))
    assert b.dim >= a.dim and b.n_layers >= a.n_layers


def test_flops_and_mfu_formula():
    cfg = ModelConfig.from_flavour("debug")
    n = num_params(cfg, 100) + cfg.dim * 100
    assert scaling_params(cfg, 100) == n
    assert flops_per_token(cfg, 128, 100) == 6 * n + 12 * cfg.n_layers * cfg.dim * 128
    assert mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)
    assert mfu(1000.0, 1e6, 0.0) == 0.0


def test_build_model_is_deterministic():
    cfg = ModelConfig.from_flavour("debug")
    a, b = build_model(cfg, 50, seed=3), build_model(cfg, 50, seed=3)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_packed_inputs_mask_and_positions():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask, pos = packed_inputs(doc)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False]
    eager_mask, _ = packed_inputs(doc, attn_implementation="eager")
    assert eager_mask.dtype == torch.float32 and eager_mask[0, 0, 3, 0] < -1e30 and eager_mask[0, 0, 3, 2] == 0


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
def test_document_in_a_pack_matches_running_it_alone(impl):
    cfg = ModelConfig.from_flavour("debug", attn_implementation=impl)
    model = build_model(cfg, 100, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 32), generator=g)
    doc = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7, [5] * 4 + [6] * 28])
    mask, pos = packed_inputs(doc, attn_implementation=impl)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        alone = model(input_ids=ids[:1, 10:25]).logits
        alone2 = model(input_ids=ids[1:, 4:]).logits
        unmasked = model(input_ids=ids[:1]).logits
    torch.testing.assert_close(packed[:1, 10:25], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1:, 4:], alone2, atol=1e-5, rtol=0)
    assert (unmasked[:, 10:25] - alone).abs().max() > 1e-3  # without the mask, documents would leak


def test_save_pretrained_roundtrip(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.from_flavour("debug")
    model = build_model(cfg, 64, seed=0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)
