"""``benchmarks/gpu_check.py``, the one script a lent GPU runs, checked on the CPU at tiny sizes (``--quick``), so
the device's few minutes are never spent on a script that cannot run: every part runs, and its table and JSON
hold a row per stage with both herd's and the naive baseline's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HERD_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["failures"] == []
    stages = [r["stage"] for r in report["rows"]]
    assert len(stages) == 4 and stages[0].startswith("pretrain debug")
    assert any(s.startswith("reward model") for s in stages) and any(s.startswith("DPO") for s in stages)
    assert any(s.startswith("rejection-sampling") for s in stages)
    for r in report["rows"]:
        assert r["herd"] > 0 and r["naive"] > 0, r
    assert "MFU" in report["rows"][0]["note"]
    for s in stages:  # the table the closing note pastes
        assert s in proc.stdout
