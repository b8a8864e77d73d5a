"""A real pretrained Llama that ships in a package (SmolLM2-135M-Instruct, GGUF) imported as a plain
Hugging Face folder (the session-wide ``smollm2`` fixture of tests/conftest.py), and fine-tuned by herd's SFT
through its own (ChatML) chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.pretrain import PretrainConfig
from stages.sft import SFTConfig, sft
from stages.sft_data import SFTTokenizeConfig, chat_tokens

pytestmark = pytest.mark.slow


def test_imported_model_reloads_from_safetensors_and_answers(smollm2):
    import torch
    from transformers import AutoTokenizer

    from stages.model import ModelConfig, load_causal_lm

    cfg = ModelConfig.from_pretrained(smollm2)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (9, 3, 100000.0)
    assert not list(smollm2.glob("*.gguf")) and (smollm2 / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    model = load_causal_lm(smollm2).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_sft_fine_tunes_a_users_base_model_with_its_own_template(smollm2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    msgs = [{"role": "user", "content": "Name a llama fact."}, {"role": "assistant", "content": "Llamas hum."}]
    ids, mask = chat_tokens(tok, msgs)  # ChatML: answer tokens are still found exactly
    assert tok.decode([i for i, m in zip(ids, mask) if m]).startswith("Llamas hum.")
    convs = [{"id": f"c{i}", "source": "qa", "license": "test", "messages": msgs} for i in range(8)]
    cfg = SFTConfig(train=PretrainConfig(lr=1e-5, warmup_steps=0, seq_len=64, batch_tokens=128, micro_batch_size=2,
                                         log_every=1, eval_tokens=128),
                    tokenize=SFTTokenizeConfig(heldout_fraction=0.0, max_tokens=64), epochs=1.0)
    res = sft(cfg, smollm2, smollm2, convs, tmp_path / "sft")
    hist = json.loads((tmp_path / "sft" / "train" / "metrics.json").read_text())["loss_history"]
    assert res.steps == len(hist) >= 1 and all(h == h and h < 20 for h in hist)
    assert (Path(res.model_dir) / "model.safetensors").is_file()
