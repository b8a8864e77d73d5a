"""Standard benchmarks as a flow: ``herd eval`` and the ``benchmarks`` deployment."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from herd.settings import load_settings
from stages.errors import ConfigError
from stages.evaluation.harness import HarnessConfig
from stages.evaluation.run import export_results
from tasks.evaluation import benchmark_task
from tasks.progress import report
from tasks.tracking import parent_run


def resolve_model(model: str) -> tuple[str, str]:
    """``(folder, name)`` of ``model``: a Hugging Face Llama folder, or ``models:/NAME@ALIAS`` /
    ``models:/NAME/VERSION`` from the MLflow registry (the version's ``herd.model_dir`` tag when that folder
    exists here, else the registered artifacts, downloaded)."""
    if not model.startswith("models:/"):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model: {model} is not a folder; give a Hugging Face Llama folder or models:/NAME@ALIAS")
        return str(path.resolve()), str(path.resolve())
    import mlflow

    ref = model.removeprefix("models:/")
    client = mlflow.MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except (mlflow.exceptions.MlflowException, ValueError) as exc:
        raise ConfigError(f"model: {model} is not in the MLflow registry ({str(exc).splitlines()[0]}); list them in "
                          "the MLflow UI under Models") from exc
    folder = mv.tags.get("herd.model_dir")
    if folder and Path(folder).is_dir():
        return folder, model
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}"))
    for cand in sorted(local.rglob("config.json")):
        if any(cand.parent.glob("*.safetensors")):
            return str(cand.parent), model
    raise ConfigError(f"model: {model} holds no Hugging Face model folder (config.json + *.safetensors)")


@flow(name="benchmarks")
def benchmarks_flow(model: str, config: HarnessConfig = HarnessConfig(), output: str | None = None,
                    tokenizer: str | None = None, parent_run_id: str | None = None) -> dict:
    """Score a model on standard benchmarks (HellaSwag, ARC, PIQA, Winogrande, BoolQ, OpenBookQA, CommonsenseQA,
    Social IQa, MMLU, LAMBADA, GSM8K, HumanEval) and log the results to MLflow.

    Args:
        model: A Hugging Face Llama folder on the worker, or a registered model `models:/NAME@ALIAS` (e.g.
            `models:/policy@champion`).
        config: Tasks (`core`, `chat`, `all` or names), items per task, shots, chat template, device.
        output: Folder to copy `results.json` (and per-item samples) into.
        tokenizer: The tokenizer's folder, when the model folder has none (herd's pretrained base models).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    folder, name = resolve_model(model)
    with parent_run("benchmarks", config, parent_run_id) as run_id:
        res = benchmark_task(config, folder, "model", str(s.store), str(s.cache), run_id, model_name=name,
                             tokenizer=tokenizer)
        report("benchmarks", {})
    if output:
        res["results_file"] = str(export_results(res, output))
    return res
