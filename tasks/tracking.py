"""MLflow runs and Prefect artifacts for every stage: the glue the task layer shares.

Each flow opens one MLflow parent run (tagged with the Prefect flow-run id); each stage task opens
a child run with an explicit ``parent_run_id``, logs the stage config as params, its summary numbers
as metrics, and every input and output dataset with ``mlflow.log_input`` (name, source uri,
digest), so lineage can be followed from an output shard back to its raw sources.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import mlflow
from pydantic import BaseModel

log = logging.getLogger(__name__)

EXPERIMENT = "herd"
DIGEST_CHARS = 36  # MLflow keeps a dataset digest this long


def _prefect_ids() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run, task_run

        ids = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or "")}
        if task_run.id:
            ids["prefect.task_run_id"] = str(task_run.id)
        return {k: v for k, v in ids.items() if v and v != "None"}
    except Exception:  # noqa: BLE001 - outside a Prefect run there are no ids
        return {}


def experiment_id() -> str:
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri()))
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(EXPERIMENT)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def flatten(prefix: str, obj: Any) -> dict[str, str]:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    else:
        text = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
        out[prefix] = text[:6000]
    return out


def run_url(run_id: str) -> str:
    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        run = mlflow.get_run(run_id)
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} run {run_id}"


def open_parent_run(name: str, config: BaseModel | None = None, tags: dict[str, str] | None = None) -> str:
    """Create the flow's MLflow run (left RUNNING so stage runs can nest under it); return its id."""
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(), run_name=name,
                            tags={"herd.flow": name, **_prefect_ids(), **(tags or {})})
    if config is not None:
        params = flatten("", config)
        for batch in _chunks(list(params.items()), 100):
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in batch])
    return run.info.run_id


def close_parent_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow.MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def parent_run(name: str, config: BaseModel | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """The flow-level run; nested under ``parent_run_id`` when a flow is called from another flow."""
    if parent_run_id:
        with stage_run(name, config, parent_run_id) as rid:
            yield rid
        return
    rid = open_parent_run(name, config)
    try:
        yield rid
    except BaseException:
        close_parent_run(rid, "FAILED")
        raise
    close_parent_run(rid)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@contextlib.contextmanager
def stage_run(name: str, config: BaseModel | None, parent_run_id: str | None,
              tags: dict[str, str] | None = None) -> Iterator[str]:
    """A child MLflow run for one stage, nested under the flow's run by explicit ``parent_run_id``."""
    exp = experiment_id()
    with mlflow.start_run(run_name=name, experiment_id=exp, parent_run_id=parent_run_id, nested=True,
                          tags={"herd.stage": name, **_prefect_ids(), **(tags or {})}) as run:
        if config is not None:
            for batch in _chunks(list(flatten("", config).items()), 100):
                mlflow.log_params(dict(batch))
        yield run.info.run_id


def log_dataset(name: str, uri: str, digest: str, context: str, rows: int | None = None) -> None:
    """Record a dataset (a folder or file of documents) as an input or output of the active run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    import warnings

    if "://" not in uri:
        uri = f"file://{uri}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    ds = MetaDataset(source=source, name=name, digest=digest[:DIGEST_CHARS])
    tags = {"herd.rows": str(rows)} if rows is not None else None
    try:
        mlflow.log_input(ds, context=context, tags=tags)
    except mlflow.exceptions.MlflowException as exc:
        # two tasks logging the same new dataset at once (sweep runs share their token split): the store's
        # get-or-create is not atomic, the loser hits the unique constraint; the dataset exists now, so retry
        if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc):
            raise
        mlflow.log_input(ds, context=context, tags=tags)


def register_folder(name: str, run_id: str, artifact_path: str, model_dir: str, digest: str,
                    tags: dict[str, str]) -> int:
    """Register the model folder logged at ``runs:/<run_id>/<artifact_path>`` as a version of ``name``, tagged with
    its folder, weights digest and inputs (``tags``); a rerun that made the same folder with the same weights gets
    the version registered before instead of a new one."""
    client = mlflow.MlflowClient()
    try:
        for v in client.search_model_versions(f"name='{name}'"):
            if v.tags.get("herd.model_dir") == model_dir and v.tags.get("herd.digest") == digest:
                return int(v.version)
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:  # registered already (or meanwhile)
        pass
    v = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                    tags={"herd.model_dir": model_dir, "herd.digest": digest, **tags})
    return int(v.version)


class MlflowSink:
    """``MetricsSink`` that batches metrics into the active MLflow run."""

    def __init__(self, run_id: str, flush_every: int = 50):
        self.run_id, self.flush_every = run_id, flush_every
        self._buf: list = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        self._buf.extend(mlflow.entities.Metric(k, float(v), ts, step or 0) for k, v in metrics.items())
        if len(self._buf) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        client = mlflow.MlflowClient()
        for batch in _chunks(self._buf, 1000):
            client.log_batch(self.run_id, metrics=batch)
        self._buf = []

    def __enter__(self) -> MlflowSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def publish_markdown(key: str, markdown: str, description: str | None = None) -> None:
    """A Prefect markdown artifact for the current task/flow run (no-op outside Prefect)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as exc:  # noqa: BLE001 - an artifact must never fail a stage
        log.debug("artifact %s not published: %s", key, exc)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "_(empty)_"
    columns = columns or list(rows[0].keys())
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body
