"""herd's Prefect deployments (``infra/prefect.yaml``), their work pool, and the automation that crashes
zombie flow runs.

``herd up`` and ``herd deploy`` both call :func:`register`: it creates the missing work pools, applies the
deployments with ``prefect deploy`` (from the checkout, where the entrypoints are relative to) and installs
the zombie-run automation. Flow runs started by a worker emit a heartbeat every
:data:`HEARTBEAT_SECONDS` (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in the worker's environment); a run
whose heartbeats stop for :data:`ZOMBIE_AFTER_SECONDS` without a terminal state (its worker or machine
died) is marked ``Crashed`` by the automation, Prefect's documented recipe for self-hosted servers, so the
deployment's concurrency slot is released and the weekly round goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from stages.errors import HerdError

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "infra" / "prefect.yaml"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
ZOMBIE_AFTER_SECONDS = 90  # three missed heartbeats
ZOMBIE_AUTOMATION = "herd: crash zombie flow runs"


def prefect_bin() -> str:
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else "prefect"


def worker_env() -> dict[str, str]:
    """What a worker needs in its environment so that its flow runs send heartbeats."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}


def deployment_specs(prefect_file: Path) -> tuple[list[dict], list[str]]:
    """The deployments ``prefect_file`` declares whose entrypoint file exists in this checkout, and a warning
    for each one skipped."""
    import yaml

    try:
        specs = (yaml.safe_load(prefect_file.read_text()) or {}).get("deployments") or []
    except (OSError, yaml.YAMLError) as exc:
        raise HerdError(f"cannot read {prefect_file}: {str(exc).splitlines()[0]}") from exc
    present, skipped = [], []
    for spec in specs:
        source = str(spec.get("entrypoint") or "").split(":", 1)[0]
        if not (REPO_ROOT / source).is_file():
            skipped.append(f"skipped deployment {spec.get('name')}: {source or 'entrypoint'} not found in {REPO_ROOT}")
            continue
        present.append(spec)
    if not present:
        raise HerdError(f"{prefect_file} declares no deployment whose entrypoint exists in {REPO_ROOT}")
    return present, skipped


def pools_of(specs: list[dict]) -> set[str]:
    return {(s.get("work_pool") or {}).get("name") for s in specs} - {None}


def ensure_work_pools(names: set[str]) -> list[str]:
    """Create each missing work pool as a ``process`` pool; return the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
                created.append(name)
    return created


def apply_deployments(prefect_file: Path, names: list[str]) -> None:
    """``prefect deploy`` the named deployments of ``prefect_file``, from the repository root."""
    cmd = [prefect_bin(), "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    for name in names:
        cmd += ["--name", name]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if res.returncode != 0:
        tail = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()][-1:] or ["no output"]
        raise HerdError(f"`prefect deploy --prefect-file {prefect_file}` failed (exit {res.returncode}): {tail[0]}")


def install_zombie_automation() -> str:
    """Create (or replace) the automation marking flow runs ``Crashed`` when their heartbeats stop; its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    spec = Automation(
        name=ZOMBIE_AUTOMATION,
        description=(f"A flow run that sent a heartbeat and then neither another one nor a final state within "
                     f"{ZOMBIE_AFTER_SECONDS} s lost its process (a killed worker, a dead machine): mark it "
                     f"Crashed so its deployment's concurrency slot is freed. Installed by herd up / herd deploy."),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_SECONDS),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {ZOMBIE_AFTER_SECONDS} s: its process is gone")],
    )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
            client.delete_automation(old.id)
    return str(spec.create().id)


def fingerprint(prefect_file: Path) -> str:
    """What the registered deployments depend on: the file, the checkout it runs from, the zombie rule."""
    h = hashlib.sha256(prefect_file.read_bytes())
    h.update(json.dumps([str(REPO_ROOT), HEARTBEAT_SECONDS, ZOMBIE_AFTER_SECONDS]).encode())
    return h.hexdigest()


def registered(names: list[str]) -> bool:
    """Whether every named deployment and the zombie automation exist on the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        found = {d.name for d in client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))}
        return found >= set(names) and bool(client.read_automations_by_name(ZOMBIE_AUTOMATION))


def register(prefect_file: Path = PREFECT_YAML, stamp: Path | None = None) -> dict:
    """Work pools, deployments and the zombie automation. With ``stamp`` (a file recording the fingerprint of
    the last registration), nothing is redone while the fingerprint matches and the server still has them all.
    Returns ``{"names", "pools", "created_pools", "skipped", "applied"}``."""
    prefect_file = prefect_file.resolve()
    specs, skipped = deployment_specs(prefect_file)
    names, pools = [s["name"] for s in specs], pools_of(specs)
    fp = fingerprint(prefect_file)
    if stamp is not None and stamp.is_file() and stamp.read_text() == fp and registered(names):
        return {"names": names, "pools": pools, "created_pools": [], "skipped": skipped, "applied": False}
    try:
        created = ensure_work_pools(pools)
    except Exception as exc:  # noqa: BLE001  (the API refused: say which)
        raise HerdError(f"cannot create work pool(s) {sorted(pools)}: {str(exc).splitlines()[0]}") from exc
    apply_deployments(prefect_file, names)
    install_zombie_automation()
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp)
    return {"names": names, "pools": pools, "created_pools": created, "skipped": skipped, "applied": True}


def describe(names: list[str], pools: set[str]) -> list[dict]:
    """What the Prefect API holds for these deployments: full name, schedules, concurrency, trigger events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, WorkPoolFilter,
                                                 WorkPoolFilterName)

    out = []
    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)),
                                        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=sorted(pools))))
        for d in found:
            schedules = [f"cron '{s.schedule.cron}' ({s.schedule.timezone or 'UTC'})" if hasattr(s.schedule, "cron")
                         else str(s.schedule) for s in d.schedules]
            limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else None
            strategy = d.concurrency_options.collision_strategy if d.concurrency_options else None
            triggers = [e for a in client.read_resource_related_automations(f"prefect.deployment.{d.id}")
                        for e in sorted(getattr(a.trigger, "expect", None) or [])]
            out.append({"name": f"{client.read_flow(d.flow_id).name}/{d.name}", "id": str(d.id),
                        "schedules": schedules, "concurrency_limit": limit,
                        "collision_strategy": str(getattr(strategy, "value", strategy)) if strategy else None,
                        "triggers": triggers})
    return sorted(out, key=lambda d: names.index(d["name"].split("/", 1)[1]))
