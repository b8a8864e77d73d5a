"""The YAML files shipped in `configs/` are overrides a user passes to `herd demo --config`: each must validate
against the preset its header names, and say what it claims to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stages.alignment import Algorithm
from stages.presets import get_preset, load_section

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _preset(path: Path) -> str:
    """The preset a config is written for: its header's `herd demo --preset NAME --config configs/FILE`."""
    m = re.search(r"herd demo --preset (\S+) --config configs/" + re.escape(path.name), path.read_text())
    assert m, f"{path.name}: its header must show the `herd demo --preset ... --config configs/{path.name}` line"
    return m.group(1)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_against_their_preset(path: Path) -> None:
    cfg = load_section("pipeline", _preset(path), path)
    assert cfg != get_preset(_preset(path))  # an override that overrides something


def test_the_cpu_rounds_config_runs_llama2s_five_rounds_on_smollm2() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "smollm2-cpu-rounds.yaml"
    cfg = load_section("pipeline", "smollm2-cpu", path)
    assert cfg.sft.base == get_preset("smollm2").sft.base
    a = cfg.alignment
    assert a.rounds == 5 and a.collect_next
    assert [a.algorithms(n) for n in range(1, 6)] == [[Algorithm.rejection_sampling]] * 4 + [
        [Algorithm.rejection_sampling, Algorithm.ppo]]
    # every round's RMs see a new batch, each with safety prompts, so violations can be read per round
    assert cfg.preferences.collect.prompts >= 100 and cfg.preferences.collect.safety_share > 0
    # the safety RM keeps Llama 2's 90/10 mix; the helpfulness RM trains on helpfulness pairs only
    assert cfg.rewards.helpfulness.other_ratio == 0 and cfg.rewards.safety.other_ratio > 0
