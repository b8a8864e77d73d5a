"""Thin Prefect tasks around the curation stages: caching, retries, MLflow runs, artifacts."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from prefect import task

from stages.common import atomic_dir, read_manifest, tree_sha256, write_json_atomic
from stages.curation.base import KEPT
from stages.curation.finalize import finalize
from stages.curation.ingest import ingest, input_digest, resolve_inputs
from stages.curation.pipeline import CurationConfig, StepContext, prepare_assets, run_step
from tasks.common import StepRef, key_from_params, retry_transient, strip_examples
from tasks.tracking import log_dataset, markdown_table, publish_markdown, run_url, stage_run

log = logging.getLogger(__name__)


def _metrics(stats: dict) -> dict[str, float]:
    out = {k: float(stats[k]) for k in ("in", "kept", "rejected", "quarantined", "seconds", "docs_per_s")
           if isinstance(stats.get(k), (int, float))}
    out.update({f"dropped_{r}": float(n) for r, n in (stats.get("reasons") or {}).items()})
    for task, row in (stats.get("contamination") or {}).items():  # the decontaminate step, per benchmark
        out.update({f"contamination_{task}_{k}": float(row.get(k, 0))
                    for k in ("docs_dropped", "docs_cut", "chars_removed", "matched_items")})
    return out


def _publish_step(ref: StepRef, run_id: str) -> None:
    s = ref.stats
    rows = [{"reason": r, "dropped": n} for r, n in (s.get("reasons") or {}).items()]
    md = (f"## curation step `{ref.name}`{' (reused)' if ref.cached else ''}\n\n"
          f"in **{s.get('in')}**, kept **{s.get('kept')}**, rejected **{s.get('rejected')}**"
          f"{', quarantined **' + str(s['quarantined']) + '**' if 'quarantined' in s else ''}; "
          f"{s.get('docs_per_s') or '-'} docs/s{chr(10) * 2 + '_' + s['skipped'] + '_' if s.get('skipped') else ''}"
          f"\n\n{markdown_table(rows) if rows else ''}\n\n"
          f"output `{ref.path}` (sha256 `{ref.digest[:16]}`)\n\nMLflow run: {run_url(run_id)}\n")
    publish_markdown(f"curation-{ref.name.replace('_', '-')}", md, f"curation step {ref.name}")


@task(task_run_name="ingest", cache_key_fn=key_from_params, persist_result=True)
def ingest_task(name: str, key: str, cfg: CurationConfig, inputs: list[str], store: str, parent_run_id: str) -> StepRef:
    files = resolve_inputs([Path(p) for p in inputs])
    out = Path(store) / "curation" / name / key
    cached = read_manifest(out) is not None
    if not cached:
        with atomic_dir(out) as tmp:
            stats = ingest(cfg.ingest, files, tmp)
            write_json_atomic(tmp / "manifest.json", {"step": name, "key": key, "stats": stats,
                                                      "kept_sha256": tree_sha256(tmp / KEPT)})
    man = read_manifest(out)
    ref = StepRef(name=name, key=key, path=str(out), digest=man["kept_sha256"], docs=man["stats"]["kept"],
                  stats=man["stats"], cached=cached)
    with stage_run("curate/ingest", cfg.ingest, parent_run_id) as rid:
        mlflow.log_metrics(_metrics(ref.stats))
        for f in files:
            log_dataset(f.name, str(f), input_digest([f]), "input")
        log_dataset("ingested", str(out / KEPT), ref.digest, "output", rows=ref.docs)
        mlflow.log_dict(ref.stats, "stats.json")
    _publish_step(ref, rid)
    return ref.model_copy(update={"run_id": rid})


@task(task_run_name="curate-{name}", cache_key_fn=key_from_params, persist_result=True, retries=2,
      retry_condition_fn=retry_transient)
def curation_step_task(name: str, key: str, cfg: CurationConfig, parent: StepRef, store: str, cache_dir: str,
                       parent_run_id: str, classifier_path: str | None = None) -> StepRef:
    out = Path(store) / "curation" / name / key
    cached = read_manifest(out) is not None
    if not cached:
        ctx = StepContext(cache_dir=Path(cache_dir), classifier_path=Path(classifier_path) if classifier_path else None)
        with atomic_dir(out) as tmp:
            stats = run_step(name, cfg, Path(parent.path), tmp, ctx)
            write_json_atomic(tmp / "manifest.json", {"step": name, "key": key, "parent": parent.key,
                                                      "stats": stats, "kept_sha256": tree_sha256(tmp / KEPT)})
    man = read_manifest(out)
    ref = StepRef(name=name, key=key, path=str(out), digest=man["kept_sha256"], docs=man["stats"]["kept"],
                  stats=strip_examples(man["stats"]), cached=cached)
    with stage_run(f"curate/{name}", getattr(cfg, name), parent_run_id, tags={"herd.reused": str(cached)}) as rid:
        mlflow.log_metrics(_metrics(ref.stats))
        log_dataset(parent.name, str(Path(parent.path) / KEPT), parent.digest, "input", rows=parent.docs)
        log_dataset(name, str(out / KEPT), ref.digest, "output", rows=ref.docs)
        mlflow.log_dict(man["stats"], "stats.json")
    _publish_step(ref, rid)
    return ref.model_copy(update={"run_id": rid})


@task(task_run_name="prepare-assets", retries=2, retry_condition_fn=retry_transient)
def prepare_assets_task(cfg: CurationConfig, cache_dir: str) -> dict[str, str]:
    """Fetch optional filter assets (e2guardian phrase lists) once; digests feed the step keys."""
    return prepare_assets(cfg, Path(cache_dir))


@task(task_run_name="finalize")
def finalize_task(cfg: CurationConfig, ingest_ref: StepRef, steps: list[StepRef], output: str,
                  parent_run_id: str) -> dict:
    report = finalize(Path(ingest_ref.path), [(s.name, Path(s.path)) for s in steps], Path(output),
                      config=cfg.model_dump(mode="json"))
    out = Path(output)
    with stage_run("curate/report", None, parent_run_id) as rid:
        c = report["counts"]
        mlflow.log_metrics({f"count_{k}": float(v) for k, v in c.items()}
                           | {f"dropped_{k}": float(v) for k, v in report["reasons"].items()})
        for s in [ingest_ref, *steps]:
            log_dataset(s.name, str(Path(s.path) / KEPT), s.digest, "input", rows=s.docs)
        log_dataset("curated", str(out / KEPT), report["kept_sha256"], "output", rows=c["kept"])
        log_dataset("rejected", str(out / "rejected"), tree_sha256(out / "rejected"), "output", rows=c["rejected"])
        mlflow.log_artifact(str(out / "report.json"))
        mlflow.log_figure(funnel_figure(report), "curation_funnel.png")
    rows = [{"step": s["step"], "in": s.get("in"), "kept": s.get("kept"), "rejected": s.get("rejected"),
             "docs/s": s.get("docs_per_s", "")} for s in report["steps"]]
    reasons = [{"reason": r, "dropped": n, "example": (report["examples"].get(r) or [{}])[0].get("id", "")}
               for r, n in report["reasons"].items()]
    sources = [{"source": s, **v} for s, v in report["sources"].items()]
    contamination = [{"benchmark": t, **{k: r.get(k) for k in ("items", "matched_items", "docs_cut", "docs_dropped",
                                                               "chars_removed")}}
                     for t, r in (report.get("contamination") or {}).items()]
    publish_markdown("curation-report",
                     f"# Curation report\n\n**{c['input_lines']}** input lines: **{c['kept']}** kept, "
                     f"**{c['rejected']}** rejected, **{c['quarantined']}** quarantined.\n\n"
                     f"## Steps\n\n{markdown_table(rows)}\n\n## Drops by reason\n\n{markdown_table(reasons)}\n\n"
                     f"## Sources\n\n{markdown_table(sources)}\n\n"
                     + (f"## Benchmark contamination\n\n{markdown_table(contamination)}\n\n" if contamination else "")
                     + f"Output: `{out}`\n\nMLflow run (with the funnel plot "
                     f"`curation_funnel.png`): {run_url(rid)}\n",
                     "curation report")
    return report


def funnel_figure(report: dict):
    """Documents surviving each step, and drops per reason: the curation funnel as one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.bar([s["step"] for s in steps], [s["kept"] for s in steps], color="#4c72b0")
    a.set_title("documents kept after each step")
    a.tick_params(axis="x", rotation=45)
    reasons = report["reasons"]
    b.barh(list(reasons), list(reasons.values()), color="#dd8452")
    b.set_title("documents dropped, by reason")
    fig.tight_layout()
    plt.close(fig)
    return fig
