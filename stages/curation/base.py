"""The shard format, executors and the generic filter-stage runner shared by every curation step.

Between curation steps documents live as datatrove JSONL shards (``{"text", "id", "metadata"}``,
uncompressed, one file per datatrove rank). ``metadata`` always holds:

- ``source``: the mixture source the document belongs to (``web``, ``books``, ``reference``,
  ``code``, ``qa``, ...), the unit the Llama 1 table shares are defined on;
- ``url``: the document URL or ``None``;
- ``meta``: the user's own ``metadata`` object from the input line, untouched;
- ``origin``: ``"<input file>:<line>"`` where the document came from (lineage).

Every step writes ``<out>/kept/*.jsonl`` and ``<out>/rejected/*.jsonl``; a rejected document has
``metadata["reason"]`` (one of ``REASONS``) and ``metadata["detail"]`` (free text, e.g. which rule).

Filters are datatrove ``BaseFilter`` subclasses whose ``filter`` returns ``True`` to keep or
``(False, "<reason>:<detail>")`` to drop, ``<reason>`` being one of ``REASONS``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common import StageConfig

log = logging.getLogger(__name__)

REASONS = (
    "url_blocklist",
    "language",
    "gopher_quality",
    "gopher_repetition",
    "c4",
    "fineweb",
    "nsfw",
    "exact_dup",
    "near_dup",
    "semantic_dup",
    "contamination",
    "quality",
)

KEPT = "kept"
REJECTED = "rejected"
STATS = "stats.json"


def split_reason(raw: str | None) -> tuple[str, str]:
    """``"c4:no_terminal_punct"`` -> ``("c4", "no_terminal_punct")``; validates the reason."""
    if not raw:
        raise ValueError("a dropped document must carry a reason")
    reason, _, detail = raw.partition(":")
    if reason not in REASONS:
        raise ValueError(f"unknown drop reason {reason!r}; expected one of {REASONS}")
    return reason, detail


class ExecutorKind(StrEnum):
    local = "local"
    ray = "ray"
    slurm = "slurm"


class ExecutorConfig(StageConfig):
    """Where datatrove runs the curation steps. Switching ``kind`` moves the same steps to a cluster."""

    kind: ExecutorKind = Field(ExecutorKind.local, description="datatrove executor: local, ray or slurm")
    tasks: int = Field(2, ge=1, description="datatrove tasks (shards) per step")
    workers: int = Field(2, ge=1, description="tasks run at once (local/ray)")
    start_method: str = Field("forkserver", description="local executor start method (forkserver: safe with the threads Prefect and MLflow run)")
    slurm_partition: str = Field("cpu", description="slurm partition (kind=slurm)")
    slurm_time: str = Field("04:00:00", description="slurm time limit per task (kind=slurm)")
    slurm_venv: str | None = Field(None, description="virtualenv activated on slurm nodes")
    ray_cpus_per_task: int = Field(1, ge=1, description="CPUs per Ray task (kind=ray)")
    ray_mem_per_cpu_gb: float = Field(2.0, gt=0, description="memory per CPU for Ray tasks, GB (kind=ray)")


def make_executor(cfg: ExecutorConfig, pipeline: list, logging_dir: str | Path, *, tasks: int | None = None,
                  depends: Any = None):
    """Build the datatrove executor ``cfg.kind`` names for ``pipeline``."""
    tasks = tasks or cfg.tasks
    logging_dir = str(logging_dir)
    if cfg.kind == ExecutorKind.local:
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=logging_dir,
                                     start_method=cfg.start_method, depends=depends, skip_completed=False)
    if cfg.kind == ExecutorKind.ray:
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=logging_dir,
                                   depends=depends, skip_completed=False, cpus_per_task=cfg.ray_cpus_per_task,
                                   mem_per_cpu_gb=cfg.ray_mem_per_cpu_gb)
    if cfg.kind == ExecutorKind.slurm:
        from datatrove.executor.slurm import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline, tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
                                     logging_dir=logging_dir, depends=depends, venv_path=cfg.slurm_venv,
                                     skip_completed=False)
    raise ValueError(f"executor.kind: unknown executor {cfg.kind!r}")


# ---------------------------------------------------------------------------------------------
# shard IO
# ---------------------------------------------------------------------------------------------

def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.gz")])


def iter_shard_records(folder: str | Path) -> Iterator[dict]:
    """Yield the raw ``{"text", "id", "metadata"}`` dicts of every shard in ``folder``, in file order."""
    import gzip

    for path in shard_files(folder):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def iter_documents(folder: str | Path) -> Iterator[Any]:
    """Yield datatrove ``Document`` objects from every shard in ``folder``."""
    from datatrove.data import Document

    for rec in iter_shard_records(folder):
        yield Document(text=rec["text"], id=rec["id"], metadata=rec.get("metadata") or {})


class ShardWriter:
    """Writes datatrove-format records into ``folder/<prefix><n>.jsonl`` (used by in-process steps)."""

    def __init__(self, folder: str | Path, prefix: str = "", max_docs: int = 50_000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_docs = prefix, max_docs
        self._n = 0
        self._count = 0
        self._fh = None

    def write(self, doc: Any) -> None:
        import orjson

        if self._fh is None or self._count >= self.max_docs:
            self._roll()
        rec = {"text": doc.text, "id": doc.id, "metadata": doc.metadata} if not isinstance(doc, dict) else doc
        self._fh.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
        self._count += 1

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.folder / f"{self.prefix}{self._n:05d}.jsonl", "wb")
        self._n += 1
        self._count = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reject(doc: Any, raw_reason: str) -> Any:
    """Stamp ``reason``/``detail`` on a document that is being dropped."""
    reason, detail = split_reason(raw_reason)
    doc.metadata["reason"] = reason
    doc.metadata["detail"] = detail
    return doc


def _rejected_adapter(self, document) -> dict:  # datatrove binds adapters as methods
    meta = dict(document.metadata)
    meta.pop("file_path", None)
    reason, detail = split_reason(meta.pop("filter_reason", None) or meta.get("reason"))
    meta["reason"], meta["detail"] = reason, detail
    return {"text": document.text, "id": document.id, "metadata": meta}


def _kept_adapter(self, document) -> dict:
    meta = dict(document.metadata)
    meta.pop("file_path", None)
    return {"text": document.text, "id": document.id, "metadata": meta}


def count_folder(folder: str | Path) -> tuple[int, Counter]:
    """Number of records in a shard folder, and a Counter of ``metadata.reason`` among them."""
    n, reasons = 0, Counter()
    for rec in iter_shard_records(folder):
        n += 1
        reason = (rec.get("metadata") or {}).get("reason")
        if reason:
            reasons[reason] += 1
    return n, reasons


def examples_by_reason(folder: str | Path, per_reason: int = 3, max_chars: int = 300) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in iter_shard_records(folder):
        meta = rec.get("metadata") or {}
        bucket = out.setdefault(meta.get("reason", "?"), [])
        if len(bucket) < per_reason:
            bucket.append({"id": rec["id"], "detail": meta.get("detail", ""), "text": rec["text"][:max_chars]})
    return out


def run_filter_step(make_filter: Callable[[], Any], in_dir: str | Path, out_dir: str | Path,
                    executor: ExecutorConfig, name: str) -> dict:
    """Run one datatrove filter over ``in_dir/kept`` into ``out_dir/{kept,rejected}`` with ``executor``.

    ``make_filter`` builds the filter step (called once, in this process, so heavy assets load once
    and fork-started workers share them). Returns the stats dict also written to ``out_dir/stats.json``.
    """
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    step = make_filter()
    step.exclusion_writer = JsonlWriter(str(out_dir / REJECTED), compression=None, adapter=_rejected_adapter)
    pipeline = [
        JsonlReader(str(in_dir / KEPT), glob_pattern="*.jsonl", add_file_path=False),
        step,
        JsonlWriter(str(out_dir / KEPT), compression=None, adapter=_kept_adapter),
    ]
    n_in = len(shard_files(in_dir / KEPT))
    t0 = time.perf_counter()
    make_executor(executor, pipeline, out_dir / "logs", tasks=max(1, min(executor.tasks, n_in))).run()
    seconds = time.perf_counter() - t0
    (out_dir / KEPT).mkdir(parents=True, exist_ok=True)
    (out_dir / REJECTED).mkdir(parents=True, exist_ok=True)
    return write_step_stats(name, in_dir, out_dir, seconds)


def write_step_stats(name: str, in_dir: str | Path, out_dir: str | Path, seconds: float, extra: dict | None = None) -> dict:
    """Count what a step kept and rejected, check nothing vanished, and write ``stats.json``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    n_in, _ = count_folder(in_dir / KEPT)
    n_kept, _ = count_folder(out_dir / KEPT)
    n_rej, reasons = count_folder(out_dir / REJECTED)
    if n_in != n_kept + n_rej:
        raise RuntimeError(f"step {name}: {n_in} documents in but {n_kept} kept + {n_rej} rejected")
    stats = {
        "step": name,
        "in": n_in,
        "kept": n_kept,
        "rejected": n_rej,
        "reasons": dict(sorted(reasons.items())),
        "seconds": round(seconds, 3),
        "docs_per_s": round(n_in / seconds, 1) if seconds > 0 else None,
        "examples": examples_by_reason(out_dir / REJECTED),
        **(extra or {}),
    }
    (out_dir / STATS).write_text(json.dumps(stats, indent=2))
    return stats


def documents_from_records(records: Iterable[dict]) -> Iterator[Any]:
    from datatrove.data import Document

    for rec in records:
        yield Document(text=rec["text"], id=rec["id"], metadata=rec.get("metadata") or {})
