"""What a benchmark task hands to the scorer: items, independent of where they were read from.

Multiple-choice items are scored by log-likelihood. Each choice is a ``(context, continuation)`` request;
usually every choice shares one context (the question) and differs in the continuation (the answers), but
Winogrande's partial scoring puts the choice in the context and scores the shared suffix. The scorer
groups requests by context, so a shared context is computed once per item.

Generative items (GSM8K, HumanEval) carry a prompt, stop sequences and what to check the output against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item.

    ``contexts[i]`` + ``continuations[i]`` is choice i's text; ``gold`` indexes the right choice. The
    scorer puts the few-shot prefix in front of every context. ``norm_texts[i]`` is the text whose
    character count normalises choice i's log-likelihood for ``acc_norm`` (lm-eval-harness divides by the
    length of the choice string, without the leading delimiter). A task with a single choice (LAMBADA:
    the last word) has ``contexts``/``continuations`` of length 1 and ``gold`` 0; it reports ``bpb`` and,
    where ``greedy_check`` is set, ``acc`` = the continuation is the model's greedy output.
    """

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_texts: tuple[str, ...] = ()
    greedy_check: bool = False
    # few-shot: the item rendered as a solved example (context + gold continuation)
    def example(self) -> str:
        return self.contexts[self.gold] + self.continuations[self.gold]

    @property
    def n_choices(self) -> int:
        return len(self.continuations)

    def text_for_ngrams(self) -> str:
        """The item's evaluation text (question and every answer), what decontamination matches against."""
        parts = list(dict.fromkeys(self.contexts)) + list(dict.fromkeys(self.continuations))
        return " ".join(p.strip() for p in parts)


@dataclass(frozen=True)
class GenItem:
    """One generative item: greedy decoding from ``prompt`` until a stop sequence.

    ``kind`` says how the output is checked: ``gsm8k`` compares the final number with ``target``;
    ``humaneval`` runs ``prompt + completion`` followed by ``test`` and ``check(entry_point)`` in the sandbox.
    ``messages`` is the chat form of the prompt for instruct models (used with the chat template);
    ``gold`` is the reference continuation (its ``bpb`` is reported too).
    """

    id: str
    prompt: str
    kind: Literal["gsm8k", "humaneval"]
    target: str
    gold: str
    stop: tuple[str, ...] = ()
    test: str = ""
    entry_point: str = ""
    messages: tuple[tuple[str, str], ...] = field(default=())

    def text_for_ngrams(self) -> str:
        return f"{self.prompt} {self.gold}"


Item = MCItem | GenItem
