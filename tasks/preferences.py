"""Prefect tasks for preference batches: ingest one export (validate, store, log to MLflow), scan an inbox."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
from prefect import task

from stages.common import confined
from stages.errors import DataValidationError
from stages.preferences import ingest_file
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run

log = logging.getLogger(__name__)


@task(task_run_name="ingest-{path}")
def ingest_task(path: str, root: str, batch_id: str | None, parent_run_id: str | None) -> dict:
    """Validate ``path`` into a new batch under ``root``; log the batch as an MLflow dataset with its digest."""
    res, batch = ingest_file(path, root, batch_id)
    with stage_run("preferences/ingest", None, parent_run_id, tags={"herd.batch_id": res.batch_id or ""}) as rid:
        mlflow.log_params({"source_file": path, "batch_id": res.batch_id or "-"})
        mlflow.log_metrics({k: float(v) for k, v in res.model_dump().items() if k != "batch_id"})
        if batch is not None:
            man = json.loads((batch / "manifest.json").read_text())
            log_dataset(f"preferences/{res.batch_id}", str(batch / "data.parquet"), man["digest"], "output",
                        rows=man["rows"])
            mlflow.log_dict(man, "batch_manifest.json")
    rows = [{"batch": res.batch_id or "(nothing new)", "accepted": res.accepted, "quarantined": res.quarantined,
             "duplicates": res.duplicates}]
    publish_markdown("preference-ingest", f"# Preference ingest: `{Path(path).name}`\n\n{markdown_table(rows)}\n\n"
                     f"MLflow run: {run_url(rid)}\n", "preference batch ingestion")
    return {**res.model_dump(), "batch_dir": str(batch) if batch else None}


def inbox_files(inbox: str) -> dict[str, str]:
    """Export files in ``inbox`` (a folder or any fsspec URL) -> a change stamp (size and modification time)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(inbox)
    if not fs.exists(root):
        return {}
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    found = {}
    for p, info in sorted(fs.find(root, detail=True).items()):
        name = p.rsplit("/", 1)[-1]
        if name.startswith(".") or not name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
            continue
        if local:  # a symlink to a file outside the inbox is not an export (its text would land in quarantine)
            try:
                confined(p, root, field="inbox file", error=DataValidationError)
            except DataValidationError as exc:
                log.warning("skipping %s: %s", p, exc)
                continue
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        url = p if local else fs.unstrip_protocol(p)
        found[url] = f"{info.get('size')}:{mtime}"
    return found


def cache_name(url: str, path: str) -> str:
    """The cache file name of the remote export ``url`` (``path`` on its filesystem): a digest of the URL, then
    the last path segment reduced to letters, digits, '.', '_' and '-' (no separator, no leading dot, so
    never '..'), keeping the export's suffix."""
    import hashlib
    import re

    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", path.rstrip("/").rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
    tail = tail.lstrip(".")[-100:] or "export"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{tail}"


def localise(url: str, cache: Path) -> str:
    """A local path for ``url``: local files as they are, remote ones copied into ``cache`` first (under a
    name from :func:`cache_name`, checked to stay inside ``cache``)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return path
    target = confined(Path(cache) / cache_name(url, path), cache, field="inbox file name", error=DataValidationError)
    Path(cache).mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(target))
    return str(target)
