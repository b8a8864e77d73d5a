"""Prefect task around mixture sampling (``herd mix``)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import task

from stages.common import atomic_dir, config_hash, file_sha256, read_manifest, tree_sha256, write_json_atomic
from stages.mix import MixConfig, mix
from tasks.common import copy_tree
from tasks.tracking import log_dataset, publish_markdown, run_url, stage_run


def _digest(path: Path) -> str:
    return file_sha256(path) if path.is_file() else tree_sha256(path)


@task(task_run_name="mix")
def mix_task(cfg: MixConfig, inputs: list[str], store: str, output: str | None, parent_run_id: str | None) -> dict:
    paths = [Path(p).resolve() for p in inputs]
    digests = [_digest(p) for p in paths]
    key = config_hash("mix", cfg, digests)
    out = Path(store) / "mix" / key
    cached = read_manifest(out) is not None
    if not cached:
        with atomic_dir(out) as tmp:
            result = mix(cfg, paths, tmp)
            write_json_atomic(tmp / "manifest.json", {"step": "mix", "key": key, "inputs": [str(p) for p in paths],
                                                      "input_digests": digests, "result": result,
                                                      "data_sha256": tree_sha256(tmp / "data")})
    man = read_manifest(out)
    final = Path(output) if output else out
    if output:
        copy_tree(out, final)
    table = json.loads((final / "table.json").read_text())
    with stage_run("mix", cfg, parent_run_id, tags={"herd.reused": str(cached)}) as rid:
        for row in table["sources"]:
            src = row["source"]
            for k in ("target_share", "realised_share", "epochs", "tokens"):
                if isinstance(row.get(k), (int, float)):
                    mlflow.log_metric(f"{k}_{src}", float(row[k]))
        for p, d in zip(paths, digests):
            log_dataset(p.parent.name + "/" + p.name, str(p), d, "input")
        log_dataset("mixture", str(final / "data"), man["data_sha256"], "output")
        mlflow.log_artifact(str(final / "table.md"))
        mlflow.log_artifact(str(final / "table.json"))
    publish_markdown("mixture", f"# Mixture\n\n{(final / 'table.md').read_text()}\n\nMLflow run: {run_url(rid)}\n",
                     "mixture table (Llama 1 columns)")
    return {"output": str(final), "key": key, "cached": cached, "table": table}
