"""The pipeline's report card: built from the stages' results, stored on the pipeline's MLflow run
(``report.md``, ``report.json``), under ``$HERD_HOME/reports/<run id>/`` and as a Prefect artifact."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
from prefect import task

from stages.common import write_json_atomic
from stages.evaluation.report import build_report, render_markdown
from tasks.tracking import publish_markdown

REPO = Path(__file__).resolve().parents[1]


def git_state(repo: Path = REPO) -> dict:
    """The checkout's commit and whether its tree differs from it (``{}`` outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(dirty)}


@task(task_run_name="report-card")
def report_task(stages: list[dict], run_id: str, preset: str, contamination: dict, wall_s: float, home: str,
                downstream: dict | None = None, mixture: dict | None = None) -> dict:
    report = build_report(stages, run_id=run_id, git=git_state(), preset=preset, contamination=contamination,
                          wall_s=wall_s, downstream=downstream, mixture=mixture)
    md = render_markdown(report)
    client = mlflow.MlflowClient()
    client.log_text(run_id, md, "report.md")
    client.log_dict(run_id, report, "report.json")
    out = Path(home) / "reports" / run_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    write_json_atomic(out / "report.json", report)
    write_json_atomic(Path(home) / "reports" / "latest.json", {"run_id": run_id, "path": str(out)})
    publish_markdown("report-card", md, "herd report card: benchmarks and alignment per stage")
    return {"report": report, "markdown": md, "path": str(out)}
