"""`herd deploy` against a real Prefect server: a deployment per user-facing flow (infra/prefect.yaml), each with a
typed, described parameter form; the weekly schedule, concurrency limit and inbox trigger of alignment-round; the
inbox trigger and concurrency limit of preference-inbox; and an inbox file starting both through their automations."""

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
INBOX = "preference-inbox/preference-inbox"
OTHERS = ["herd-pipeline/herd-pipeline", INBOX, "reward-models/reward-models", "sft/sft",
          "data-fetch/data-fetch", "curation/curation", "mix/mix", "tokenizer/tokenizer",
          "scaling-sweep/scaling-sweep", "scaling-fit/scaling-fit", "pretrain/pretrain",
          "preference-ingest/preference-ingest", "preference-collect/preference-collect", "benchmarks/benchmarks"]
# the config parameters whose form comes from a pydantic model (every field typed and described)
CONFIGS = {ROUND: ["config", "rewards", "preferences", "benchmarks"], "benchmarks/benchmarks": ["config"], "herd-pipeline/herd-pipeline": ["config"],
           "data-fetch/data-fetch": ["config"], "curation/curation": ["config", "classifier_corpus"],
           "mix/mix": ["config"], "tokenizer/tokenizer": ["config"], "scaling-sweep/scaling-sweep": ["config"],
           "scaling-fit/scaling-fit": ["config"], "pretrain/pretrain": ["config"], "sft/sft": ["config"],
           "reward-models/reward-models": ["config"], "preference-collect/preference-collect": ["config"],
           INBOX: [], "preference-ingest/preference-ingest": []}
EXPORT = {"prompt": "Name a river.", "chosen": "The Danube.", "rejected": "No.", "edited": None, "rating": "better",
          "category": "helpfulness", "annotator_id": "a1"}


def _typed_form_problems(name: str, schema: dict, configs: list[str]) -> list[str]:
    """What keeps the UI from showing ``schema`` as a typed, described form: parameters without a type or a
    description, config parameters whose pydantic model has fields without either."""
    def typed(prop: dict) -> bool:
        return any(k in prop for k in ("type", "$ref", "allOf", "anyOf", "oneOf", "enum", "const"))

    props, defs = schema.get("properties") or {}, schema.get("definitions") or schema.get("$defs") or {}
    bad = [] if props else [f"{name}: no parameters in the schema"]
    bad += [f"{name}: parameter {p!r} has no description" for p, v in props.items() if not v.get("description")]
    bad += [f"{name}: parameter {p!r} has no type" for p, v in props.items() if not typed(v)]
    for p in configs:
        ref = props[p].get("$ref") or next((x["$ref"] for x in props[p].get("allOf", []) if "$ref" in x), "")
        model = defs.get(ref.rsplit("/", 1)[-1], {})
        fields = model.get("properties") or {}
        bad += [f"{name}: config {p!r} is not a pydantic model in the schema"] if not fields else []
        bad += [f"{name}: {p}.{f} has no description" for f, v in fields.items() if not v.get("description")]
        bad += [f"{name}: {p}.{f} has no type" for f, v in fields.items() if not typed(v)]
    return bad


def test_every_deployment_has_a_typed_described_form() -> None:
    """The schemas `prefect deploy` registers (from each entrypoint's signature and docstring), without a server."""
    import yaml
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    specs = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    flows = {s["name"]: s["entrypoint"] for s in specs}
    assert {f"{n}/{n}" for n in flows} == {ROUND, *OTHERS}  # deployment name = flow name, one per flow
    bad = []
    for name, entrypoint in flows.items():
        schema = parameter_schema_from_entrypoint(str(ROOT / entrypoint)).model_dump()
        bad += _typed_form_problems(name, schema, CONFIGS[f"{name}/{name}"])
    assert not bad, "\n".join(bad)


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
    assert f"registered {1 + len(OTHERS)} deployment(s)" in res.stdout
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith(INBOX))
    assert "concurrency 1 (ENQUEUE)" in line and "trigger: herd.preferences.inbox.landed" in line

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
        forms = [b for name in [ROUND, *OTHERS] for b in _typed_form_problems(
            name, client.read_deployment_by_name(name).parameter_openapi_schema, CONFIGS[name])]
        assert not forms, "\n".join(forms)
        ingest = client.read_deployment_by_name("preference-ingest/preference-ingest")
        assert ingest.parameter_openapi_schema["required"] == ["path"]
        assert ingest.entrypoint == "flows/preferences.py:preference_ingest_flow"
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        [automation] = client.read_resource_related_automations(f"prefect.deployment.{dep.id}")
        assert automation.enabled and automation.trigger.expect == {"herd.preferences.inbox.landed"}
        assert automation.trigger.match.model_dump()["prefect.resource.id"] == "herd.inbox.*"
        assert [a.type for a in automation.actions] == ["run-deployment"]
        assert automation.actions[0].deployment_id == dep.id
        # preference-inbox: the same event ingests the inbox at once; one scan at a time, the rest queued
        inbox_dep = client.read_deployment_by_name(INBOX)
        assert inbox_dep.global_concurrency_limit.limit == 1
        assert str(inbox_dep.concurrency_options.collision_strategy.value) == "ENQUEUE"
        [inbox_auto] = client.read_resource_related_automations(f"prefect.deployment.{inbox_dep.id}")
        assert inbox_auto.enabled and inbox_auto.trigger.expect == {"herd.preferences.inbox.landed"}
        assert inbox_auto.trigger.match.model_dump()["prefect.resource.id"] == "herd.inbox.*"
        assert [a.deployment_id for a in inbox_auto.actions] == [inbox_dep.id]

        # a new export in the inbox: one watcher scan emits the event, the automations create a round's flow run
        # and an inbox ingest's
        from herd.events import inbox_watcher
        from herd.settings import load_settings

        inbox = home / "preferences" / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        (inbox / "week-1.jsonl").write_text(json.dumps(EXPORT) + "\n")
        assert inbox_watcher(load_settings()).poll() == [str(inbox / "week-1.jsonl")]
        runs = []
        deadline = time.monotonic() + 60
        while {r.deployment_id for r in runs} != {dep.id, inbox_dep.id} and time.monotonic() < deadline:
            time.sleep(1.0)
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                any_=[dep.id, inbox_dep.id])))
        try:
            started = {r.deployment_id for r in runs}
            assert dep.id in started, "the inbox event started no alignment-round flow run within 60 s"
            assert inbox_dep.id in started, "the inbox event started no preference-inbox flow run within 60 s"
            assert all(r.state.is_scheduled() for r in runs)  # no worker in this test: nothing actually runs
        finally:
            for run in runs:
                client.delete_flow_run(run.id)
