"""A tiny chat policy for alignment tests: a random-init debug Llama on a small BPE trained on ``texts``,
saved as a policy folder (safetensors + tokenizer with herd's chat template)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch


def make_policy(root: Path, texts: list[str], vocab_size: int = 300) -> Path:
    from transformers import AutoTokenizer

    from stages.model import ModelConfig, build_model
    from stages.tokenizer import TokenizerConfig, train_tokenizer

    (root / "data").mkdir(parents=True)
    with gzip.open(root / "data" / "00000.jsonl.gz", "wt") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"d{i}", "text": text, "source": "qa"}) + "\n")
    out = root / "policy"
    train_tokenizer(TokenizerConfig(vocab_size=vocab_size), [root], out)
    vocab = len(AutoTokenizer.from_pretrained(str(out), local_files_only=True))
    build_model(ModelConfig.from_flavour("debug"), vocab, seed=0).save_pretrained(out)
    return out


def one_thread():
    """Body of an autouse fixture: one torch thread (tests share 2 cores), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
