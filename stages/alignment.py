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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

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

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, v: list[list[Algorithm]]) -> list[list[Algorithm]]:
        if not v or any(not step for step in v):
            raise ValueError("schedule needs at least one round, each with at least one algorithm")
        return v

    def algorithms(self, round_index: int) -> list[Algorithm]:
        """The algorithms of round ``round_index`` (1-based; the schedule's last entry repeats)."""
        return list(self.schedule[min(round_index, len(self.schedule)) - 1])


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


def _dpo(cfg: AlignmentConfig, parent: str, inp: RoundInputs, out: Path, sink: MetricsSink) -> PolicyResult:
    return dpo(cfg.dpo, parent, inp.batch_dirs, out, sink=sink)


ALGORITHMS: dict[Algorithm, Step] = {Algorithm.rejection_sampling: _rs, Algorithm.ppo: _ppo, Algorithm.dpo: _dpo}


def step_config(cfg: AlignmentConfig, algorithm: Algorithm) -> StageConfig:
    """The config section an algorithm reads (names its output folder)."""
    return {Algorithm.rejection_sampling: cfg.rejection, Algorithm.ppo: cfg.ppo, Algorithm.dpo: cfg.dpo}[algorithm]


def run_step(algorithm: Algorithm, cfg: AlignmentConfig, parent_dir: str, inputs: RoundInputs, out_dir: str | Path,
             *, sink: MetricsSink = NULL_SINK) -> PolicyResult:
    """Run one algorithm of a round from ``parent_dir`` into ``out_dir``."""
    return ALGORITHMS[Algorithm(algorithm)](cfg, parent_dir, inputs, Path(out_dir), sink)
