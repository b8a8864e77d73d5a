"""`herd deploy` against a real Prefect server: the deployments of infra/prefect.yaml with the weekly schedule,
concurrency limit and inbox trigger of alignment-round, and an inbox file starting a round through the automation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERD = [sys.executable, "-m", "herd.cli"]
PREFECT_FILE = ROOT / "infra" / "prefect.yaml"
ROUND = "alignment-round/alignment-round"
OTHERS = ["herd-pipeline/herd-pipeline", "preference-inbox/preference-inbox", "reward-models/reward-models",
          "sft/sft"]
EXPORT = {"prompt": "Name a river.", "chosen": "The Danube.", "rejected": "No.", "edited": None, "rating": "better",
          "category": "helpfulness", "annotator_id": "a1"}


def test_watcher_announces_each_export_once(tmp_path: Path) -> None:
    from herd.events import InboxWatcher
    from tasks.preferences import inbox_files

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "week1.jsonl").write_text(json.dumps(EXPORT) + "\n")
    (inbox / ".upload.jsonl").write_text("{}\n")  # hidden: still uploading
    (inbox / "notes.txt").write_text("not an export")
    (inbox / "done.jsonl").write_text(json.dumps(EXPORT) + "\n")
    done = str(inbox / "done.jsonl")
    ingested = tmp_path / "inbox_ledger.json"  # the inbox flow already ingested done.jsonl in this version
    ingested.write_text(json.dumps({done: {"stamp": inbox_files(str(inbox))[done], "batch_id": "b1"}}))
    sent: list[str] = []
    watcher = InboxWatcher(str(inbox), tmp_path / "events.json", ingested,
                           emit=lambda url, stamp: sent.append(url) or url)
    assert watcher.poll() == [str(inbox / "week1.jsonl")]
    assert watcher.poll() == []
    restarted = InboxWatcher(str(inbox), tmp_path / "events.json", ingested,
                             emit=lambda url, stamp: sent.append(url) or url)
    assert restarted.poll() == []  # the ledger survives a restart
    (inbox / "week1.jsonl").write_text(json.dumps(EXPORT) + "\n" + json.dumps(dict(EXPORT, rating="slightly_better")))
    assert restarted.poll() == [str(inbox / "week1.jsonl")]  # a changed export is news again
    assert sent == [str(inbox / "week1.jsonl")] * 2


def test_deploy_registers_schedule_concurrency_and_inbox_trigger(prefect_mlflow: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    home = prefect_mlflow
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HERD_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value(),
               MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"])
    res = subprocess.run([*HERD, "deploy", "--once", "--prefect-file", str(PREFECT_FILE)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "skipped" not in res.stderr, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith(ROUND))
    assert "cron '0 3 * * 1' (UTC)" in line and "concurrency 1 (ENQUEUE)" in line
    assert "trigger: herd.preferences.inbox.landed" in line

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(ROUND)
        for name in OTHERS:
            other = client.read_deployment_by_name(name)
            assert other.work_pool_name == "herd-local" and not other.schedules
        assert dep.work_pool_name == "herd-local" and client.read_work_pool("herd-local").type == "process"
        assert dep.entrypoint == "flows/rounds.py:alignment_round_flow"
        [sched] = dep.schedules
        assert sched.schedule.cron == "0 3 * * 1" and sched.schedule.timezone == "UTC" and sched.active
        assert dep.global_concurrency_limit.limit == 1
        assert str(dep.concurrency_options.collision_strategy.value) == "ENQUEUE"
        assert {"config", "round"} <= set(dep.parameter_openapi_schema["properties"])  # the UI's typed form
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        [automation] = client.read_resource_related_automations(f"prefect.deployment.{dep.id}")
        assert automation.enabled and automation.trigger.expect == {"herd.preferences.inbox.landed"}
        assert automation.trigger.match.model_dump()["prefect.resource.id"] == "herd.inbox.*"
        assert [a.type for a in automation.actions] == ["run-deployment"]
        assert automation.actions[0].deployment_id == dep.id

        # a new export in the inbox: one watcher scan emits the event, the automation creates a round's flow run
        from herd.events import inbox_watcher
        from herd.settings import load_settings

        inbox = home / "preferences" / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        (inbox / "week-1.jsonl").write_text(json.dumps(EXPORT) + "\n")
        assert inbox_watcher(load_settings()).poll() == [str(inbox / "week-1.jsonl")]
        runs = []
        deadline = time.monotonic() + 60
        while not runs and time.monotonic() < deadline:
            time.sleep(1.0)
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        try:
            assert runs, "the inbox event started no alignment-round flow run within 60 s"
            assert runs[0].state.is_scheduled()  # no worker in this test: nothing actually runs
        finally:
            for run in runs:
                client.delete_flow_run(run.id)
