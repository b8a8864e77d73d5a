"""The CLI as a user runs it: real local servers started by `herd up`, a curate run against them,
clear errors for bad configs, and `herd down`."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
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
    status = json.loads(_run(env, "status").stdout)
    assert status["servers"]["prefect"]["healthy"] and status["servers"]["mlflow"]["healthy"]
    assert status["servers"]["prefect"]["pid"] and status["servers"]["mlflow"]["pid"]

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
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    batch = Path(env["HERD_HOME"]) / "preferences" / "batches" / "week-1"
    assert (batch / "data.parquet").is_file() and json.loads((batch / "manifest.json").read_text())["rows"] == 1

    res = _run(env, "down")
    assert res.returncode == 0 and "prefect" in res.stdout and "mlflow" in res.stdout
    status = json.loads(_run(env, "status").stdout)
    assert not status["servers"]["prefect"]["healthy"] and not status["servers"]["mlflow"]["healthy"]


def test_refuses_servers_that_belong_to_another_home(env, tmp_path: Path) -> None:
    other = dict(env, HERD_HOME=str(tmp_path / "other-home"))
    res = _run(env, "up", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run(other, "up", timeout=60)  # same ports, different home: must not log into the first home's stores
    assert res.returncode == 2 and "did not start" in res.stderr and "HERD_PREFECT_PORT" in res.stderr
    assert _run(env, "down").returncode == 0
