"""RLHF-V1..V(n): which algorithms produce each round's policy, and how they are called.

A round turns RLHF-V(n-1) (V0 is the SFT model) into RLHF-V(n) by running the algorithms the
schedule names for that round, in order, each starting from the previous one's output:

* ``rejection_sampling`` (``stages.rejection``): K samples, the RM-best kept, fine-tuned on;
* ``ppo`` (``stages.ppo``): on-policy RL against the combined reward, KL to the round's start;
* ``dpo`` (``stages.dpo``): direct preference optimisation on the preference batches.

Llama 2's schedule (the default): V1..V4 rejection sampling, V5 rejection sampling then PPO. Llama 3's
(rejection sampling + SFT on the kept samples, then DPO, every round) is ``schedule:
[[rejection_sampling, dpo]]``: round n uses entry n of the list, and the last entry repeats.

:data:`ALGORITHMS` maps each name to a function of one signature, so a round never branches on the
algorithm.

After its evaluation, RLHF-V(n) becomes the ``champion`` by :func:`champion_decision` under the
:class:`ChampionRule`: the independent judge's win rate of V(n) over the current champion (SFT before
any) must have its 95% interval above ``min_judge_ci_low``, and neither the safety violation rate nor
the false-refusal rate may be significantly worse, i.e. the paired-bootstrap 95% interval of the
per-prompt difference (V(n) minus champion, same eval prompts) lies entirely above 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from stages.common import NULL_SINK, MetricsSink, StageConfig
from stages.dpo import DPOConfig, dpo
from stages.evaluate import EvalConfig
from stages.policy import PolicyResult, RewardFn
from stages.ppo import PPOConfig, ppo
from stages.rejection import RejectionConfig, annotator_edits, rejection_sample


class Algorithm(StrEnum):
    rejection_sampling = "rejection_sampling"
    ppo = "ppo"
    dpo = "dpo"


def _llama2_schedule() -> list[list[Algorithm]]:
    return [[Algorithm.rejection_sampling]] * 4 + [[Algorithm.rejection_sampling, Algorithm.ppo]]


class ChampionRule(StageConfig):
    """When RLHF-V(n) replaces the ``champion`` (see :func:`champion_decision`)."""

    min_judge_ci_low: float = Field(0.5, ge=0, lt=1, description="the lower end of the 95% bootstrap interval of the "
                                    "independent judge's win rate over the champion (SFT before any) must be above "
                                    "this (0.5: the judge prefers V(n), beyond sampling noise)")
    block_on_violation_increase: bool = Field(True, description="keep the champion when V(n)'s safety violation rate "
                                              "is significantly higher (paired 95% interval of the per-prompt "
                                              "difference, V(n) minus champion, entirely above 0)")
    block_on_false_refusal_increase: bool = Field(True, description="keep the champion when V(n)'s false-refusal "
                                                  "rate on ordinary prompts is significantly higher (paired 95% "
                                                  "interval of the per-prompt difference entirely above 0)")


class AlignmentConfig(StageConfig):
    """The alignment rounds: the schedule of algorithms, each algorithm's settings, the evaluation."""

    rounds: int = Field(5, ge=1, description="rounds the demo runs (RLHF-V1..V<rounds>); a scheduled deployment runs "
                        "one round per trigger")
    schedule: list[list[Algorithm]] = Field(
        default_factory=_llama2_schedule,
        description="algorithms of round 1, 2, ... (the last entry repeats). Llama 2: V1-V4 rejection_sampling, V5 "
                    "rejection_sampling then ppo; Llama 3: [[rejection_sampling, dpo]]")
    rejection: RejectionConfig = Field(default_factory=RejectionConfig, description="rejection-sampling fine-tuning")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO on top of the round's policy")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO on the preference batches")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation of every version")
    reward_threshold: float = Field(0.15, gt=0, lt=1, description="Llama 2's rule: the safety RM's score is the "
                                    "reward on safety prompts or when it is below this, else the helpfulness RM's")
    collect_next: bool = Field(True, description="after registering V(n), collect the next batch to annotate from it")
    champion: ChampionRule = Field(default_factory=ChampionRule, description="when V(n) becomes the `champion`: "
                                   "judge win interval above a bound, no significant rise in violations or false "
                                   "refusals")

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, v: list[list[Algorithm]]) -> list[list[Algorithm]]:
        if not v or any(not step for step in v):
            raise ValueError("schedule needs at least one round, each with at least one algorithm")
        return v

    def algorithms(self, round_index: int) -> list[Algorithm]:
        """The algorithms of round ``round_index`` (1-based; the schedule's last entry repeats)."""
        return list(self.schedule[min(round_index, len(self.schedule)) - 1])


def _rate_change(name: str, before: Mapping[str, Any], after: Mapping[str, Any], diff: Mapping[str, Any],
                 blocking: bool) -> tuple[bool, str]:
    """Whether a rate got significantly worse (and that blocks), and how the reason says it."""
    if not diff or not diff.get("prompts") or math.isnan(diff.get("ci_low", math.nan)):
        return False, f"{name} n/a (no prompts)"
    text = f"{name} {before.get('rate', math.nan):.3f} -> {after.get('rate', math.nan):.3f}"
    interval = f"{diff['diff']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
    if diff["ci_low"] > 0:
        return blocking, f"{text} (worse: {interval}{'' if blocking else ', not blocking'})"
    if diff["ci_high"] < 0:
        return False, f"{text} (better: {interval})"
    return False, f"{text} (n.s.)"


def champion_decision(rule: ChampionRule, vs_champion: Mapping[str, Any], policy: Mapping[str, Any],
                      champion: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether RLHF-V(n) becomes the champion under ``rule``, and why, in one line.

    ``vs_champion`` is the evaluation's comparison of V(n) with the champion (``evaluate``'s ``vs[name]``:
    ``"judge"`` win rate with ``ci_low``/``ci_high``, ``"violation_diff"`` and ``"false_refusal_diff"``
    paired differences V(n) minus champion); ``policy`` and ``champion`` are their summaries (``"violation"``
    and ``"false_refusal"`` rates). The reason reads, e.g.::

        moved: judge win 0.620 [0.551, 0.690] > 0.5; violation 0.400 -> 0.380 (n.s.); false refusal 0.100 ->
            0.110 (n.s.)
        kept: judge win 0.620 [0.551, 0.690] > 0.5; violation 0.400 -> 0.550 (worse: +0.150 [+0.050, +0.250]);
            false refusal 0.100 -> 0.050 (better: -0.050 [-0.090, -0.010])

    (one line each, wrapped here).

    A rate without prompts (no safety prompts in the eval pool, say) reads ``n/a`` and never blocks.
    """
    judge = vs_champion["judge"]
    lo = judge["ci_low"]
    judge_ok = not math.isnan(lo) and lo > rule.min_judge_ci_low
    parts = [f"judge win {judge['win_rate']:.3f} [{lo:.3f}, {judge['ci_high']:.3f}] "
             f"{'>' if judge_ok else '<='} {rule.min_judge_ci_low:g}"]
    blocked = False
    for key, name, blocking in (("violation", "violation", rule.block_on_violation_increase),
                                ("false_refusal", "false refusal", rule.block_on_false_refusal_increase)):
        worse, text = _rate_change(name, champion.get(key) or {}, policy.get(key) or {},
                                   vs_champion.get(f"{key}_diff") or {}, blocking)
        blocked |= worse
        parts.append(text)
    moved = judge_ok and not blocked
    return moved, f"{'moved' if moved else 'kept'}: " + "; ".join(parts)


@dataclass(frozen=True)
class RoundInputs:
    """What a round's algorithms may use (each takes what it needs)."""

    round_index: int
    reward_fn: RewardFn
    prompts: Sequence[dict]
    batch_dirs: Sequence[str]
    pooled: Sequence[str] = field(default_factory=tuple)
    value_init_dir: str | None = None


Step = Callable[[AlignmentConfig, str, RoundInputs, Path, MetricsSink], PolicyResult]


def _rs(cfg: AlignmentConfig, parent: str, inp: RoundInputs, out: Path, sink: MetricsSink) -> PolicyResult:
    edits = annotator_edits(inp.batch_dirs) if cfg.rejection.pool_edits else []
    return rejection_sample(cfg.rejection, parent, inp.reward_fn, inp.prompts, out, pooled=inp.pooled, edits=edits,
                            round_index=inp.round_index, sink=sink)


def _ppo(cfg: AlignmentConfig, parent: str, inp: RoundInputs, out: Path, sink: MetricsSink) -> PolicyResult:
    return ppo(cfg.ppo.derive(seed=cfg.ppo.seed * 1000 + inp.round_index), parent, inp.reward_fn, inp.prompts, out,
               value_init_dir=inp.value_init_dir, sink=sink)


def dpo_reference_cache(out: Path) -> Path:
    """Where a DPO step writing ``out`` keeps the reference log-probs of each batch: beside the algorithm's
    outputs, by content."""
    return Path(out).parent.parent / "dpo-reference"


def _dpo(cfg: AlignmentConfig, parent: str, inp: RoundInputs, out: Path, sink: MetricsSink) -> PolicyResult:
    return dpo(cfg.dpo, parent, inp.batch_dirs, out, sink=sink, ref_cache=dpo_reference_cache(out))


ALGORITHMS: dict[Algorithm, Step] = {Algorithm.rejection_sampling: _rs, Algorithm.ppo: _ppo, Algorithm.dpo: _dpo}


def step_config(cfg: AlignmentConfig, algorithm: Algorithm) -> StageConfig:
    """The config section an algorithm reads (names its output folder)."""
    return {Algorithm.rejection_sampling: cfg.rejection, Algorithm.ppo: cfg.ppo, Algorithm.dpo: cfg.dpo}[algorithm]


def run_step(algorithm: Algorithm, cfg: AlignmentConfig, parent_dir: str, inputs: RoundInputs, out_dir: str | Path,
             *, sink: MetricsSink = NULL_SINK) -> PolicyResult:
    """Run one algorithm of a round from ``parent_dir`` into ``out_dir``."""
    return ALGORITHMS[Algorithm(algorithm)](cfg, parent_dir, inputs, Path(out_dir), sink)
