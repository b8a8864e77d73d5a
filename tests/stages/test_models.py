"""A real pretrained Llama that ships in a package (SmolLM2-135M-Instruct, GGUF) imported as a plain
Hugging Face folder, and fine-tuned by herd's SFT through its own (ChatML) chat template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.data.models import import_model
from stages.pretrain import PretrainConfig
from stages.sft import SFTConfig, sft
from stages.sft_data import SFTTokenizeConfig, chat_tokens

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2(package_cache, tmp_path_factory) -> Path:
    """Imported the way a user does it, `herd models import` (its own process: the GGUF reader leaves this
    process's floating-point state such that fastText training later hits NaN)."""
    home = tmp_path_factory.mktemp("models-home")
    (home / "cache").symlink_to(package_cache, target_is_directory=True)
    out = home / "smollm2-135m"
    env = {**os.environ, "HERD_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "herd.cli", "models", "import", "smollm2-135m", "--output", str(out)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads(res.stdout)
    assert man["path"] == str(out) and 130e6 < man["params"] < 140e6 and man["license"] == "Apache-2.0"
    assert import_model("smollm2-135m", package_cache, out)["sha256"] == man["sha256"]  # converted once, reused
    return out


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
