"""A killed `herd curate`, `herd pretrain` and `herd sft` resumes: each command is run to the end in one home, and in
a second home it is SIGKILLed in the middle of its work (while a stage writes its output) and run again; the rerun
finishes, its outputs are identical to the uninterrupted run's, and no store folder is left half-written.

Both homes talk to the first home's servers (the second sets PREFECT_API_URL / MLFLOW_TRACKING_URI), so only one
pair of servers starts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._store import half_written
from tests.test_cli import _free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HERD = [sys.executable, "-m", "herd.cli"]
CURATE_YAML = "executor: {tasks: 1, workers: 1}\n"  # in-process datatrove: seconds, not a minute of worker start-up
# long enough to be killed between checkpoints; the rerun resumes from the newest one
PRETRAIN_YAML = "size: debug\ntrain: {steps: 300, checkpoint_every: 100, downstream_every: 0}\n"


@pytest.fixture(scope="module")
def homes(tmp_path_factory, package_cache):
    root = tmp_path_factory.mktemp("resume")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HERD_"))}
    envs = {}
    for name in ("whole", "killed"):
        home = root / name
        home.mkdir()
        (home / "cache").symlink_to(package_cache, target_is_directory=True)
        envs[name] = {**base, "HERD_HOME": str(home)}
    envs["whole"].update(HERD_PREFECT_PORT=str(_free_port()), HERD_MLFLOW_PORT=str(_free_port()))
    envs["killed"].update(PREFECT_API_URL=f"http://127.0.0.1:{envs['whole']['HERD_PREFECT_PORT']}/api",
                          MLFLOW_TRACKING_URI=f"http://127.0.0.1:{envs['whole']['HERD_MLFLOW_PORT']}")
    (root / "curate.yaml").write_text(CURATE_YAML)
    (root / "pretrain.yaml").write_text(PRETRAIN_YAML)
    yield {"root": root, "env": envs}
    subprocess.run([*HERD, "down"], env=envs["whole"], cwd=ROOT, capture_output=True, timeout=120)


def _herd(env: dict, *args: str, timeout: float = 600) -> str:
    res = subprocess.run([*HERD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"herd {' '.join(args)} exited {res.returncode}:\n{res.stderr[-3000:]}"
    return res.stdout


def _in_progress(store: Path, stage: str) -> set[Path]:
    """Outputs of ``stage`` being written: hidden temporary folders (written whole, then renamed), and output folders
    without their manifest (stages that write in place and put the manifest last)."""
    root = store / stage
    if not root.is_dir():
        return set()
    return ({p for p in root.rglob(".*.tmp-*") if p.is_dir()}
            | {p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not (p / "manifest.json").exists()
               and stage != "curation"})


def _kill_midway(env: dict, stage: str, *args: str, ready=None, after: float = 1.0, timeout: float = 300) -> None:
    """Start ``herd ARGS``; once a ``stage`` output is being written (``ready(store)`` true, by default any output in
    progress), wait ``after`` seconds and SIGKILL the command with everything it started."""
    store = Path(env["HERD_HOME"]) / "store"
    before = _in_progress(store, stage)
    ready = ready or (lambda st: bool(_in_progress(st, stage) - before))
    proc = subprocess.Popen([*HERD, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready(store):
            assert proc.poll() is None, f"herd {' '.join(args)} ended (exit {proc.returncode}) before writing {stage}"
            assert time.monotonic() < deadline, f"herd {' '.join(args)} wrote no {stage} output in {timeout} s"
            time.sleep(0.1)
        time.sleep(after)
        assert proc.poll() is None, f"herd {' '.join(args)} finished before it could be killed"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _docs(folder: Path) -> list[tuple]:
    out = []
    for p in sorted(folder.rglob("*.jsonl.gz")):
        with gzip.open(p, "rt") as fh:
            out += [(p.relative_to(folder).as_posix(), r.get("id"), r.get("text"), r.get("reason"))
                    for r in map(json.loads, fh)]
    return sorted(out, key=repr)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_file(home: Path, stage: str) -> Path:
    [model] = (home / "store" / stage).glob("*/model/model.safetensors")  # the final model (not a checkpoint's)
    return model


def test_killed_curate_pretrain_and_sft_rerun_to_identical_outputs(homes):
    root, whole, killed = homes["root"], homes["env"]["whole"], homes["env"]["killed"]
    _herd(whole, "data", "fetch", "--preset", "smoke", "--output", str(root / "raw"))
    curate = ["curate", "--preset", "smoke", "--config", str(root / "curate.yaml"), "--input", str(root / "raw")]

    # curate: killed in the steps after ingest, then rerun
    _herd(whole, *curate, "--output", str(root / "whole-curated"))
    _kill_midway(killed, "curation", *curate, "--output", str(root / "killed-curated"), after=0.5,
                 ready=lambda st: any(st.glob("curation/*/*/manifest.json")))  # after its first step
    assert not (root / "killed-curated" / "report.json").exists()
    _herd(killed, *curate, "--output", str(root / "killed-curated"))
    for part in ("kept", "rejected"):
        assert _docs(root / "killed-curated" / part) == _docs(root / "whole-curated" / part), part
    counts = [json.loads((root / f"{h}-curated" / "report.json").read_text())["counts"] for h in ("whole", "killed")]
    assert counts[0] == counts[1] and counts[0]["kept"] > 0

    # the tokens both homes pretrain on (made once)
    _herd(whole, "mix", "--preset", "smoke", "--input", str(root / "whole-curated"), "--output", str(root / "mixed"),
          "--tokens", "60000")
    _herd(whole, "tokenizer", "train", "--preset", "smoke", "--input", str(root / "mixed"), "--output",
          str(root / "tokenizer"))
    tokens = json.loads((Path(whole["HERD_HOME"]) / "latest.json").read_text())["tokens"]
    pretrain = ["pretrain", "--preset", "smoke", "--config", str(root / "pretrain.yaml"), "--data", tokens]

    _herd(whole, *pretrain)
    # killed once its first checkpoint is on disk (step 100 of 300): the rerun resumes from it
    _kill_midway(killed, "pretrain", *pretrain, after=0.0,
                 ready=lambda st: any(st.glob("pretrain/*/checkpoints/step_100")))
    _herd(killed, *pretrain)
    homes_ = {h: Path(e["HERD_HOME"]) for h, e in (("whole", whole), ("killed", killed))}
    assert _sha(_model_file(homes_["killed"], "pretrain")) == _sha(_model_file(homes_["whole"], "pretrain"))

    # sft from each home's own (identical) base
    sft = ["sft", "--preset", "smoke"]
    _herd(whole, *sft)
    _kill_midway(killed, "sft", *sft, after=3.0)
    _herd(killed, *sft)
    assert _sha(_model_file(homes_["killed"], "sft")) == _sha(_model_file(homes_["whole"], "sft"))

    for h in homes_.values():
        assert not half_written(h / "store"), half_written(h / "store")
