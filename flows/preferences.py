"""Flows for preference data: ingest one annotation export, or every new export in an inbox."""

from __future__ import annotations

import json

from prefect import flow

from herd.settings import load_settings
from stages.common import write_json_atomic
from stages.preferences import inbox_lock
from tasks.preferences import inbox_files, ingest_task, localise
from tasks.progress import report
from tasks.tracking import parent_run


@flow(name="preference-ingest")
def preference_ingest_flow(path: str, batch_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """Validate one export (JSONL or Parquet) into a new, immutable preference batch; report the counts.

    Args:
        path: The annotation export: a .jsonl, .jsonl.gz or .parquet file on the machine running the flow.
        batch_id: Name of the new batch (letters, digits, '.', '_', '-'; default: date + content digest).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    with parent_run("preference-ingest", None, parent_run_id) as run_id:
        res = ingest_task(path, str(s.preferences), batch_id, run_id)
        report("ingest", {})
    return res


@flow(name="preference-inbox")
def preference_inbox_flow(inbox: str | None = None, parent_run_id: str | None = None) -> dict:
    """Ingest every export in ``inbox`` (a folder or fsspec URL; default ``$HERD_HOME/preferences/inbox``)
    that is new or changed since the last scan. Content already stored is counted as duplicates, never
    stored twice, so rescanning is harmless; concurrent scans take turns (a lock next to the ledger).

    Args:
        inbox: Folder or fsspec URL (s3://, gs://, ...) to scan (default: $HERD_HOME/preferences/inbox).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    inbox = inbox or str(s.preferences / "inbox")
    ledger_path = s.preferences / "inbox_ledger.json"
    results = []
    with inbox_lock(s.preferences), parent_run("preference-inbox", None, parent_run_id) as run_id:
        ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}  # read under the lock
        for url, stamp in inbox_files(inbox).items():
            if ledger.get(url, {}).get("stamp") == stamp:
                continue
            res = ingest_task(localise(url, s.preferences / "cache"), str(s.preferences), None, run_id)
            ledger[url] = {"stamp": stamp, "batch_id": res["batch_id"]}
            write_json_atomic(ledger_path, ledger)
            results.append({"file": url, **res})
            report("ingest", {"docs": len(results)})
    return {"inbox": inbox, "ingested": results}
