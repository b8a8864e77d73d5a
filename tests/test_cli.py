"""The CLI as a user runs it: real local servers started by `herd up`, a curate run against them,
clear errors for bad configs, and `herd down`."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERD = [sys.executable, "-m", "herd.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, package_cache):
    home = tmp_path_factory.mktemp("cli-home")
    (home / "cache").symlink_to(package_cache, target_is_directory=True)
    e = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    e.update(HERD_HOME=str(home), HERD_PREFECT_PORT=str(_free_port()), HERD_MLFLOW_PORT=str(_free_port()))
    yield e
    subprocess.run([*HERD, "down"], env=e, cwd=ROOT, timeout=60)


def _run(env, *args, timeout=600):
    return subprocess.run([*HERD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _status(env) -> dict:
    res = _run(env, "status", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def _wait_healthy(env, timeout: float = 60.0) -> dict:
    """`herd status` once every process is healthy (the worker's first poll and the watcher's first scan take
    a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        procs = _status(env)["servers"]
        if all(p["healthy"] and p["pid"] for p in procs.values()) or time.monotonic() > deadline:
            assert all(p["healthy"] and p["pid"] for p in procs.values()), procs
            return procs
        time.sleep(1.0)


def test_bad_config_file_names_file_and_field(env, tmp_path: Path) -> None:
    cfg = tmp_path / "curate.yaml"
    cfg.write_text("near_dedup:\n  threshold: 1.7\n")
    res = _run(env, "curate", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(cfg))
    assert res.returncode == 2
    assert "curate.yaml" in res.stderr and "curation.near_dedup.threshold" in res.stderr
    cfg.write_text("executor:\n  kind: kubernetes\n")
    res = _run(env, "curate", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(cfg))
    assert res.returncode == 2 and "curation.executor.kind" in res.stderr


@pytest.mark.slow
def test_up_curate_ingest_down(env, tmp_path: Path) -> None:
    res = _run(env, "up", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    procs = _wait_healthy(env)
    assert set(procs) == {"prefect", "mlflow", "worker-herd-local", "inbox-watcher"}
    # the UI is usable without `herd deploy`: deployments, the weekly schedule, the zombie-run automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{env['HERD_PREFECT_PORT']}/api"}), \
            get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("alignment-round/alignment-round")
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"]
        [zombie] = client.read_automations_by_name("herd: crash zombie flow runs")
        assert zombie.enabled and zombie.trigger.after == {"prefect.flow-run.heartbeat"}
        assert [a.type for a in zombie.actions] == ["change-flow-run-state"]
    again = _run(env, "up", timeout=120)  # idempotent: nothing started twice
    assert again.returncode == 0 and _status(env)["servers"] == procs

    text = ("Rivers carry water from the hills to the sea, and along the way they shape valleys, feed farms "
            "and give towns a reason to exist. The oldest settlements in the region grew where a river could "
            "be crossed on foot, and the bridges that replaced those fords are still the centres of the towns. ")
    src = tmp_path / "docs.jsonl"
    src.write_text(
        json.dumps({"id": "keep-me", "text": text * 3, "source": "books"}) + "\n"
        + json.dumps({"id": "dup-of-keep", "text": text * 3, "source": "books"}) + "\n"
        + json.dumps({"id": "short", "text": "Click here to buy the best cheap watches online today, with free "
                                               "shipping on every order from our store.", "source": "web"}) + "\n"
        + '{"id": "bad json"\n'
    )
    out = tmp_path / "curated"
    res = _run(env, "curate", "--preset", "smoke", "--input", str(src), "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    # a quiet console: herd's bar and herd's own warnings; datatrove's loguru lines and MLflow's prints are in the
    # log file
    lines = [x for x in res.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert any(x.startswith("curate:") for x in lines), res.stderr[-3000:]
    assert all(x.startswith("curate:") or re.match(r"WARNING (stages|tasks|flows|herd)\.", x) for x in lines), \
        res.stderr[-3000:]
    assert any("quarantined 1 of 4 lines" in x for x in lines)
    library_log = (Path(env["HERD_HOME"]) / "logs" / "herd.log").read_text()
    assert "datatrove" in library_log and "PIPELINE" in library_log
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"input_lines": 4, "kept": 1, "rejected": 2, "quarantined": 1}
    with gzip.open(next((out / "kept").glob("*.jsonl.gz")), "rt") as fh:
        assert [json.loads(x)["id"] for x in fh] == ["dup-of-keep"]  # exact dedup keeps the smallest id
    rejected = {}
    for p in (out / "rejected").glob("*.jsonl.gz"):
        with gzip.open(p, "rt") as fh:
            rejected.update({(r := json.loads(x))["id"]: r["reason"] for x in fh})
    assert rejected["keep-me"] == "exact_dup"
    assert rejected["short"] in {"gopher_quality", "gopher_repetition", "c4", "fineweb"}  # a heuristic rule
    assert len(rejected) == 2

    # preference ingest: stdout is exactly one JSON object; the same content again adds nothing
    pref = tmp_path / "export.jsonl"
    good = {"prompt": "Name a river.", "chosen": "The Danube.", "rejected": "No.", "edited": None,
            "rating": "better", "category": "helpfulness", "annotator_id": "a1"}
    pref.write_text(json.dumps(good) + "\n\n" + json.dumps(dict(good, rating="meh")) + "\n"
                    + json.dumps(dict(good, id="x")) + "\n")
    res = _run(env, "preferences", "ingest", str(pref), "--batch-id", "week-1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout) == {"batch_id": "week-1", "accepted": 1, "quarantined": 1, "duplicates": 1}
    again = _run(env, "preferences", "ingest", str(pref))
    assert json.loads(again.stdout) == {"batch_id": None, "accepted": 0, "quarantined": 1, "duplicates": 2}
    missing = _run(env, "preferences", "ingest", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [f"error: file {tmp_path / 'nope.jsonl'}: "
                                                                               "no such file"]
    verbose = _run(env, "-v", "preferences", "ingest", str(tmp_path / "nope.jsonl"))
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    batch = Path(env["HERD_HOME"]) / "preferences" / "batches" / "week-1"
    assert (batch / "data.parquet").is_file() and json.loads((batch / "manifest.json").read_text())["rows"] == 1

    res = _run(env, "down")
    assert res.returncode == 0
    assert set(res.stdout.split(":", 1)[1].replace(",", " ").split()) == set(procs)
    status = _status(env)["servers"]
    assert not any(p["healthy"] or p["pid"] for p in status.values()), status
    for p in procs.values():  # every process herd started is gone
        assert not Path(f"/proc/{p['pid']}").exists() or "Z" in Path(f"/proc/{p['pid']}/stat").read_text().split()[2]


def test_refuses_servers_that_belong_to_another_home(env, tmp_path: Path) -> None:
    other = dict(env, HERD_HOME=str(tmp_path / "other-home"))
    res = _run(env, "up", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run(other, "up", timeout=60)  # same ports, different home: must not log into the first home's stores
    assert res.returncode == 2 and "did not start" in res.stderr and "HERD_PREFECT_PORT" in res.stderr
    assert _run(env, "down").returncode == 0


def test_each_home_gets_its_own_free_ports(tmp_path: Path, monkeypatch) -> None:
    """Two homes never share ports; a home keeps its ports; a recorded port that another program took while the
    home's servers were down is picked anew; HERD_*_PORT override."""
    from herd.settings import DEFAULT_PORTS, _bindable, load_settings

    for k in ("HERD_PREFECT_PORT", "HERD_MLFLOW_PORT", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "a"))
    a = load_settings()  # a's servers are down: its ports are free to bind, yet b must not take them
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "b"))
    with socket.socket() as held:  # a program holding home a's Prefect port
        held.bind(("127.0.0.1", a.prefect_port))
        held.listen()
        b = load_settings()
        assert len({a.prefect_port, a.mlflow_port, b.prefect_port, b.mlflow_port}) == 4
        assert json.loads((tmp_path / "b" / "run" / "ports.json").read_text()) == {"prefect": b.prefect_port,
                                                                                   "mlflow": b.mlflow_port}
        monkeypatch.setenv("HERD_HOME", str(tmp_path / "a"))
        moved = load_settings()
        assert moved.prefect_port != a.prefect_port and moved.mlflow_port == a.mlflow_port
        assert moved.prefect_api_url == f"http://127.0.0.1:{moved.prefect_port}/api"
    assert load_settings().prefect_port == moved.prefect_port  # kept once picked
    homes = json.loads((tmp_path / "state" / "herd" / "homes.json").read_text())
    assert homes == {str(tmp_path / "a"): {"prefect": moved.prefect_port, "mlflow": moved.mlflow_port},
                     str(tmp_path / "b"): {"prefect": b.prefect_port, "mlflow": b.mlflow_port}}
    shutil.rmtree(tmp_path / "a")  # a home deleted gives its ports back
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "c"))
    c = load_settings()
    assert not {c.prefect_port, c.mlflow_port} & {b.prefect_port, b.mlflow_port}
    for name, port in DEFAULT_PORTS.items():  # the defaults, free again, go to the next home
        assert (getattr(c, f"{name}_port") == port) == _bindable(port)
    monkeypatch.setenv("HERD_PREFECT_PORT", "4999")
    assert load_settings().prefect_port == 4999


def test_a_preset_whose_base_model_is_not_imported_names_the_import(env) -> None:
    res = _run(env, "demo", "--preset", "smollm2-cpu", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    home = Path(env["HERD_HOME"]).resolve()
    assert res.stderr.strip().splitlines() == [f"error: sft.base: no model weights in {home / 'models' / 'smollm2-135m'}: "
                                               "run `herd models import smollm2-135m` first (or set sft.base to a "
                                               "folder with a saved LlamaForCausalLM)"]


def test_herd_errors_are_one_line_with_exit_2(env, tmp_path: Path) -> None:
    """A HerdError from any command: one line on stderr, exit 2, no traceback (`-v` shows it)."""
    res = _run(env, "tokenizer", "train", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "t"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "missing" in errors[0] and res.stderr.rstrip().endswith(errors[0]), res.stderr[-2000:]


def test_an_anneal_test_of_a_missing_dataset_is_one_line(env, tmp_path: Path) -> None:
    res = _run(env, "anneal-test", "--dataset", str(tmp_path / "nope.jsonl"), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [f"error: --dataset {tmp_path / 'nope.jsonl'}: no such file"]
