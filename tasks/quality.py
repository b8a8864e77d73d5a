"""Prefect task that provides the fastText quality classifier: the latest registered version in the
MLflow model registry, or a new one trained from the configured reference/negative sources (fetched
as ``herd data fetch`` does) and registered, with its held-out precision and recall."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
from prefect import task

from stages.common import atomic_dir, config_hash, file_sha256, read_manifest, write_json_atomic
from stages.curation.quality import QualityConfig, train_quality_classifier
from stages.data.fetch import FetchConfig
from tasks.data import run_fetch
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run

log = logging.getLogger(__name__)

REGISTERED_MODEL = "herd-quality-classifier"
TRAINING_FIELDS = ("positive_sources", "negative_sources", "epochs", "lr", "word_ngrams", "dim", "min_count", "bucket",
                   "max_chars", "seed", "held_out_fraction")


MODEL_CODE = Path(__file__).with_name("quality_model.py")


def _latest_version(client: mlflow.MlflowClient, train_key: str | None = None, version: int | None = None):
    """The latest registered version (trained with ``train_key`` if given), or exactly ``version``."""
    try:
        if version is not None:
            return client.get_model_version(REGISTERED_MODEL, str(version))
        versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    except mlflow.exceptions.MlflowException:
        if version is not None:
            raise
        return None
    if train_key is not None:
        versions = [v for v in versions if (v.tags or {}).get("herd.train_key") == train_key]
    return max(versions, key=lambda v: int(v.version), default=None)


def _from_registry(version, store: Path) -> dict:
    dst = store / "quality_classifier" / "registered" / f"v{version.version}"
    if not (dst / "manifest.json").exists():
        with atomic_dir(dst) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{REGISTERED_MODEL}/{version.version}",
                                                dst_path=str(tmp))
            model_bin = next(tmp.rglob("model.bin"))
            write_json_atomic(tmp / "manifest.json", {"model": str(model_bin.relative_to(tmp)),
                                                      "sha256": file_sha256(model_bin)})
    man = read_manifest(dst)
    return {"path": str(dst / man["model"]), "digest": man["sha256"], "version": int(version.version),
            "trained": False, "metrics": {}}


@task(task_run_name="quality-classifier")
def quality_classifier_task(cfg: QualityConfig, corpus: FetchConfig, store: str, cache_dir: str,
                            parent_run_id: str | None, retrain: bool = False) -> dict:
    client = mlflow.MlflowClient()
    if cfg.classifier_version is not None:
        log.info("using registered %s version %s", REGISTERED_MODEL, cfg.classifier_version)
        return _from_registry(_latest_version(client, version=cfg.classifier_version), Path(store))
    fetched = run_fetch(corpus, store, cache_dir, parent_run_id)
    sources = read_manifest(fetched.path)["sources"]
    pick = lambda names: [s for s in sources if s["source"] in names or s["name"] in names]  # noqa: E731
    pos, neg = pick(cfg.positive_sources), pick(cfg.negative_sources)
    train_cfg = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
    key = config_hash("quality-classifier", train_cfg, sorted(s["sha256"] for s in pos), sorted(s["sha256"] for s in neg))
    latest = None if retrain else _latest_version(client, train_key=key)
    if latest is not None:
        log.info("using registered %s version %s (same training config and data)", REGISTERED_MODEL, latest.version)
        return _from_registry(latest, Path(store))
    out = Path(store) / "quality_classifier" / key
    if read_manifest(out) is None:
        with atomic_dir(out) as tmp:
            metrics = train_quality_classifier(cfg, [Path(fetched.path) / s["path"] for s in pos],
                                               [Path(fetched.path) / s["path"] for s in neg], tmp)
            write_json_atomic(tmp / "manifest.json", {"key": key, "metrics": metrics})
    metrics = read_manifest(out)["metrics"]
    model_path = out / "model.bin"
    with stage_run("quality-classifier", cfg, parent_run_id) as rid:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        for s in pos:
            log_dataset(s["name"], str(Path(fetched.path) / s["path"]), s["sha256"], "train-positive", rows=s["docs"])
        for s in neg:
            log_dataset(s["name"], str(Path(fetched.path) / s["path"]), s["sha256"], "train-negative", rows=s["docs"])
        info = mlflow.pyfunc.log_model(
            name="quality-classifier", python_model=str(MODEL_CODE), artifacts={"fasttext": str(model_path)},
            model_config={"max_chars": cfg.max_chars},
            input_example=pd.DataFrame({"text": ["An encyclopedic paragraph about the history of Rome."]}),
            pip_requirements=["fasttext-numpy2-wheel==0.9.2", "pandas"], registered_model_name=REGISTERED_MODEL,
        )
    version = info.registered_model_version
    client.set_model_version_tag(REGISTERED_MODEL, str(version), "herd.train_key", key)
    for k in ("precision", "recall", "f1", "auc"):
        if metrics.get(k) is not None:
            client.set_model_version_tag(REGISTERED_MODEL, str(version), f"heldout_{k}", f"{metrics[k]:.4f}")
    rows = [{"metric": k, "value": round(metrics[k], 4) if isinstance(metrics[k], float) else metrics[k]}
            for k in ("precision", "recall", "f1", "accuracy", "auc", "n_train", "n_test") if k in metrics]
    publish_markdown("quality-classifier",
                     f"# Quality classifier v{version}\n\npositives: {', '.join(s['name'] for s in pos)}\n\n"
                     f"negatives: {', '.join(s['name'] for s in neg)}\n\n{markdown_table(rows)}\n\n"
                     f"MLflow run: {run_url(rid)}\n", "fastText quality classifier (held-out metrics)")
    return {"path": str(model_path), "digest": file_sha256(model_path), "version": int(version or 0),
            "trained": True, "metrics": {k: metrics.get(k) for k in ("precision", "recall", "f1", "auc")}}
