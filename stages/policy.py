"""What every policy-improvement algorithm shares: its result, how a policy is saved, the reward it optimises.

An algorithm (rejection sampling, PPO, DPO; ``stages.alignment`` maps names to them) takes a parent
policy folder (a saved ``LlamaForCausalLM`` with its tokenizer) and writes ``out_dir/model`` in the
same form, so the next round, ``herd`` commands and any Llama tool load it.

Rewards come in as a :data:`RewardFn`: ``(prompts, responses, categories) -> scores in (0, 1)``,
Llama 2's combination of the helpfulness and safety reward models (``stages.reward.RewardScorer``);
tests pass a rule instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from stages.common import atomic_dir

RewardFn = Callable[[Sequence[Any], Sequence[str], Sequence[str]], np.ndarray]


class PolicyResult(BaseModel):
    """One algorithm step's output: the new policy folder and its summary numbers."""

    model_dir: str
    algorithm: str
    parent_dir: str
    metrics: dict[str, float] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="other outputs (samples, metrics), by name")


def save_policy(model, tok, out_dir: str | Path) -> str:
    """Write ``out_dir/model`` (safetensors + tokenizer) atomically; returns its path."""
    target = Path(out_dir) / "model"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return str(target)


def chat_prompt_ids(tok, prompt: Any, max_tokens: int) -> list[int]:
    """Token ids of ``prompt`` (a string or a message list) rendered with the generation prompt, last
    ``max_tokens`` kept."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    return list(ids)[-max_tokens:]
