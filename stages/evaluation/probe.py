"""In-loop downstream evaluation (OLMo's): a few benchmarks' ``bpb`` and ``acc_norm`` every N training steps.

Accuracy of a small model sits at chance for most of its training; the bits per byte of the gold answer move
from the first steps, so the curve next to the loss says whether the model is learning what the benchmarks
ask. The probe holds a fixed seeded sample of items per task, scores them zero-shot with the benchmark
scorer (the same tokenisation and packed rows as ``herd eval``), and leaves the model as it found it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from stages.evaluation.harness import choice_loglikelihoods, mc_metrics, sample_items


class DownstreamProbe:
    """``probe(model, device) -> {"downstream/<task>/bpb": ..., "downstream/<task>/acc_norm": ...}``."""

    def __init__(self, tasks: Sequence, tokenizer_dir: str | Path, every: int, items: int, seed: int = 1234,
                 batch_tokens: int = 8192):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.every, self.batch_tokens, self.seed = every, batch_tokens, seed
        self.tasks = [(t.name, sample_items([i for i in t.items if i.n_choices > 0], items, seed, t.name), t.chance)
                      for t in tasks if t.kind == "mc"]

    @classmethod
    def from_cache(cls, names: Sequence[str], cache_dir: str | Path, tokenizer_dir: str | Path, every: int,
                   items: int, seed: int = 1234) -> DownstreamProbe:
        from stages.evaluation.benchmarks import load_task

        return cls([load_task(n, Path(cache_dir)) for n in names], tokenizer_dir, every, items, seed)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    @torch.no_grad()
    def __call__(self, model, device: torch.device) -> dict[str, float]:
        was_training, use_cache = model.training, model.config.use_cache
        model.eval()
        model.config.use_cache = True
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        out: dict[str, float] = {}
        try:
            for name, items, chance in self.tasks:
                lls, greedy = choice_loglikelihoods(model, self.tok, items, [""] * len(items),
                                                    batch_tokens=self.batch_tokens, max_length=max_length,
                                                    device=device)
                metrics, _, _ = mc_metrics(items, lls, greedy, chance, 10, self.seed)
                out[f"downstream/{name}/bpb"] = metrics["bpb"]
                if "acc_norm" in metrics:
                    out[f"downstream/{name}/acc_norm"] = metrics["acc_norm"]
        finally:
            model.config.use_cache = use_cache
            model.train(was_training)
        return out
