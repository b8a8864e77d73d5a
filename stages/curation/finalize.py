"""Materialise a curation run into the output layout other tools rely on.

``DIR/kept/*.jsonl.gz``: surviving documents ``{"id", "text", "url", "source", "metadata"}`` (the
input schema; herd's annotations are under ``metadata["herd"]``). ``DIR/rejected/*.jsonl.gz``: every
dropped document with ``id``, ``text``, ``reason``, ``detail``, ``step``, ``source``, ``url``.
``DIR/quarantine/quarantine.jsonl``: malformed input lines with file, line, field and error.
``DIR/report.json``: counts per step and reason, examples of each, throughput per step, and (when the
decontaminate step ran) ``contamination``: per benchmark, documents dropped and cut, characters removed
and evaluation items matched. Invariant
checked before anything is written: input lines = kept + rejected + quarantined.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import orjson

from stages.common import atomic_dir, tree_sha256
from stages.curation.base import KEPT, REJECTED, iter_shard_records, shard_files
from stages.curation.ingest import QUARANTINE
from stages.errors import HerdError

_INTERNAL = ("source", "url", "meta", "origin", "reason", "detail", "file_path")


def _public_record(rec: dict) -> dict:
    meta = rec.get("metadata") or {}
    herd = {k: v for k, v in meta.items() if k not in _INTERNAL}
    user_meta = dict(meta.get("meta") or {})
    if herd:
        user_meta["herd"] = {**user_meta.get("herd", {}), **herd, "origin": meta.get("origin")}
    return {"id": rec["id"], "text": rec["text"], "url": meta.get("url"), "source": meta.get("source"),
            "metadata": user_meta}


def _write_gz(records, path: Path) -> int:
    n = 0
    # mtime=0 and no file name in the header: the same documents give byte-identical files
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as fh:
        for rec in records:
            fh.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
            n += 1
    return n


def finalize(ingest_dir: Path, steps: list[tuple[str, Path]], out_dir: Path, *, config: dict | None = None) -> dict:
    """Write ``out_dir`` from the ingest folder and the ordered ``(step name, step folder)`` list."""
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    ingest_stats = json.loads((ingest_dir / "stats.json").read_text())
    step_stats = [json.loads((Path(d) / "stats.json").read_text()) for _, d in steps]
    last = Path(steps[-1][1]) if steps else ingest_dir
    with atomic_dir(out_dir) as tmp:
        (tmp / KEPT).mkdir()
        (tmp / REJECTED).mkdir()
        shutil.copytree(ingest_dir / QUARANTINE, tmp / QUARANTINE)
        kept_sources: Counter = Counter()
        n_kept = 0
        for i, shard in enumerate(shard_files(last / KEPT)):
            recs = [_public_record(r) for r in iter_shard_records_file(shard)]
            kept_sources.update(r["source"] for r in recs)
            n_kept += _write_gz(recs, tmp / KEPT / f"{i:05d}.jsonl.gz")
        reasons: Counter = Counter()
        rejected_sources: Counter = Counter()
        n_rej = 0
        for name, folder in steps:
            recs = []
            for r in iter_shard_records(Path(folder) / REJECTED):
                meta = r.get("metadata") or {}
                reasons[meta["reason"]] += 1
                rejected_sources[meta.get("source")] += 1
                recs.append({"id": r["id"], "text": r["text"], "reason": meta["reason"], "detail": meta.get("detail", ""),
                             "step": name, "source": meta.get("source"), "url": meta.get("url"),
                             **({"duplicate_of": meta["duplicate_of"]} if meta.get("duplicate_of") else {})})
            if recs:
                n_rej += _write_gz(recs, tmp / REJECTED / f"{name}.jsonl.gz")
        lines, quarantined = ingest_stats["in"], ingest_stats["quarantined"]
        if lines != n_kept + n_rej + quarantined:
            raise HerdError(f"curation lost documents: {lines} input lines != {n_kept} kept + {n_rej} rejected + "
                            f"{quarantined} quarantined")
        report = {
            "counts": {"input_lines": lines, "kept": n_kept, "rejected": n_rej, "quarantined": quarantined},
            "reasons": dict(sorted(reasons.items())),
            "quarantine_errors": ingest_stats.get("quarantine_errors", {}),
            "sources": {
                s: {"in": ingest_stats.get("sources", {}).get(s, 0), "kept": kept_sources.get(s, 0),
                    "rejected": rejected_sources.get(s, 0)}
                for s in sorted(set(ingest_stats.get("sources", {})) | set(kept_sources))
            },
            "steps": [
                {"step": "ingest", "in": lines, "kept": ingest_stats["kept"], "rejected": 0,
                 "quarantined": quarantined, "seconds": ingest_stats["seconds"]},
                *[{k: s.get(k) for k in ("step", "in", "kept", "rejected", "reasons", "seconds", "docs_per_s")}
                  | {k: v for k, v in s.items() if k not in ("examples", "step", "in", "kept", "rejected", "reasons",
                                                               "seconds", "docs_per_s")}
                  for s in step_stats],
            ],
            "examples": {reason: ex for s in step_stats for reason, ex in (s.get("examples") or {}).items()},
            "throughput_docs_per_s": {s["step"]: s.get("docs_per_s") for s in step_stats},
            "inputs": ingest_stats.get("files", []),
            "config": config or {},
        }
        for st in step_stats:  # per benchmark: documents dropped and cut, characters removed, items matched
            if "contamination" in st:
                report["contamination"] = st["contamination"]
        report["kept_sha256"] = tree_sha256(tmp / KEPT)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def iter_shard_records_file(path: Path):
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)
