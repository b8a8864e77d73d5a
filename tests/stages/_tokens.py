"""Synthetic tokenised splits in the tokenizer stage's layout (tokens.bin, doc_offsets.npy, doc_sources.npy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_split(path: Path, docs: list[np.ndarray], sources: list[str], vocab_size: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    tokens.tofile(path / "tokens.bin")
    np.save(path / "doc_offsets.npy", offsets)
    np.save(path / "doc_sources.npy", np.asarray(sources))
    (path / "manifest.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab_size, "n_docs": len(docs)}))
    return path


def random_split(path: Path, n_docs: int = 60, vocab_size: int = 128, seed: int = 0) -> Path:
    """Documents of random length whose tokens follow a simple per-source pattern (learnable)."""
    rng = np.random.default_rng(seed)
    docs, sources = [], []
    for i in range(n_docs):
        n = int(rng.integers(5, 60))
        src = ["web", "code"][i % 2]
        start = int(rng.integers(0, vocab_size))
        step = 1 if src == "web" else 3
        docs.append((start + step * np.arange(n)) % vocab_size)
        sources.append(src)
    return write_split(path, docs, sources, vocab_size)
