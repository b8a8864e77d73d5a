"""Read raw input documents, validate every line, and shard them for the curation steps.

Accepts JSONL, JSONL.gz and Parquet files (a file, a folder or a glob). Each record needs a
non-empty string ``text`` and an ``id`` (string or integer); ``url`` (string or null), ``source``
(string or null) and ``metadata`` (object or null) are optional. A line that is not valid JSON,
not UTF-8, misses ``text``/``id``, has a field of the wrong type or repeats an earlier ``id`` is
written to ``quarantine/quarantine.jsonl`` with its file, line number, field and error; it never
stops the run. Blank lines are ignored. Valid documents are spread over ``shards`` files by a hash
of their id, so the layout does not depend on input order.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from stages.common import StageConfig, file_sha256
from stages.curation.base import KEPT, STATS, ShardWriter
from stages.errors import DataValidationError

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"


class IngestConfig(StageConfig):
    """How raw input is read and sharded."""

    shards: int = Field(4, ge=1, le=4096, description="number of shards valid documents are spread over")
    default_source: str = Field("web", min_length=1, description="source label for records without a `source`")
    max_raw_chars: int = Field(2000, ge=0, description="how much of a bad line is copied into the quarantine file")


def resolve_inputs(spec: str | Path | list[str | Path]) -> list[Path]:
    """Expand files, folders and globs into a sorted list of input files; error names what matched nothing."""
    specs = spec if isinstance(spec, list) else [spec]
    files: set[Path] = set()
    for s in specs:
        p = Path(s)
        if p.is_dir():
            for pat in ("**/*.jsonl", "**/*.jsonl.gz", "**/*.parquet", "**/*.json.gz"):
                files.update(x for x in p.glob(pat) if x.is_file() and x.name != "manifest.json")
        elif p.is_file():
            files.add(p)
        else:
            matched = [Path(x) for x in glob.glob(str(s), recursive=True) if Path(x).is_file()]
            if not matched:
                raise DataValidationError(f"no input file matches {str(s)!r}", file=str(s))
            files.update(matched)
    if not files:
        raise DataValidationError(f"no JSONL, JSONL.gz or Parquet files under {specs}")
    return sorted(p.resolve() for p in files)


def input_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.name).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Yield (line number, raw bytes, read error) for every line of a JSONL(.gz) file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                yield n, raw, None
    except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip
        yield n + 1, None, f"unreadable after line {n}: {exc}"


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means the file is unreadable
        yield 1, None, f"unreadable Parquet file: {exc}"
        return
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row, None


def validate_record(obj: object, default_source: str) -> tuple[dict | None, str | None, str | None]:
    """Return (clean record, None, None) or (None, field, error)."""
    if not isinstance(obj, dict):
        return None, None, f"expected a JSON object, got {type(obj).__name__}"
    if "text" not in obj or obj["text"] is None:
        return None, "text", "missing"
    text = obj["text"]
    if not isinstance(text, str):
        return None, "text", f"expected a string, got {type(text).__name__}"
    if not text.strip():
        return None, "text", "empty"
    if "id" not in obj or obj["id"] is None:
        return None, "id", "missing"
    doc_id = obj["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return None, "id", f"expected a string or integer, got {type(doc_id).__name__}"
    doc_id = str(doc_id)
    if not doc_id.strip():
        return None, "id", "empty"
    for key in ("url", "source"):
        val = obj.get(key)
        if val is not None and not isinstance(val, str):
            return None, key, f"expected a string or null, got {type(val).__name__}"
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return None, "metadata", f"expected an object or null, got {type(meta).__name__}"
    if "\x00" in text:
        return None, "text", "contains NUL bytes"
    return {
        "id": doc_id,
        "text": text,
        "url": obj.get("url") or None,
        "source": obj.get("source") or default_source,
        "meta": meta or {},
    }, None, None


def _shard_of(doc_id: str, shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % shards


def ingest(cfg: IngestConfig, inputs: list[Path], out_dir: Path, *, progress=None) -> dict:
    """Validate and shard ``inputs`` into ``out_dir/kept``; bad lines into ``out_dir/quarantine``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / QUARANTINE).mkdir(parents=True, exist_ok=True)
    writers = [ShardWriter(out_dir / KEPT, prefix=f"{i:05d}_", max_docs=10**9) for i in range(cfg.shards)]
    seen: dict[str, str] = {}
    lines = blank = valid = 0
    errors: Counter = Counter()
    per_source: Counter = Counter()
    qpath = out_dir / QUARANTINE / "quarantine.jsonl"
    with open(qpath, "w", encoding="utf-8") as qfh:
        def quarantine(file: Path, line: int, field: str | None, error: str, raw: str | None) -> None:
            errors[f"{field or 'line'}: {error.split(':')[0]}"] += 1
            qfh.write(json.dumps({"file": str(file), "line": line, "field": field, "error": error,
                                  "raw": (raw or "")[: cfg.max_raw_chars]}, ensure_ascii=False) + "\n")

        for path in inputs:
            if path.suffix == ".parquet":
                rows = ((n, row, err, None) for n, row, err in _iter_parquet(path))
            else:
                rows = ((n, None, err, raw) for n, raw, err in _iter_raw_lines(path))
            for n, row, err, raw in rows:
                if err is not None:
                    lines += 1
                    quarantine(path, n, None, err, None)
                    continue
                raw_text = None
                if row is None:
                    if not raw.strip():
                        blank += 1
                        continue
                    lines += 1
                    try:
                        raw_text = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        quarantine(path, n, None, f"undecodable bytes (not UTF-8): {exc}", raw.decode("utf-8", "replace"))
                        continue
                    try:
                        row = json.loads(raw_text)
                    except json.JSONDecodeError as exc:
                        quarantine(path, n, None, f"bad JSON: {exc}", raw_text)
                        continue
                else:
                    lines += 1
                rec, field, error = validate_record(row, cfg.default_source)
                if rec is None:
                    quarantine(path, n, field, error, raw_text if raw_text is not None else json.dumps(row, default=str))
                    continue
                origin = f"{path.name}:{n}"
                if rec["id"] in seen:
                    quarantine(path, n, "id", f"duplicate id {rec['id']!r} (first seen at {seen[rec['id']]})", raw_text)
                    continue
                seen[rec["id"]] = origin
                valid += 1
                per_source[rec["source"]] += 1
                writers[_shard_of(rec["id"], cfg.shards)].write({
                    "text": rec["text"], "id": rec["id"],
                    "metadata": {"source": rec["source"], "url": rec["url"], "meta": rec["meta"], "origin": origin},
                })
            if progress:
                progress(path.name, lines)
    for w in writers:
        w.close()
        if w._n == 0:  # make every shard exist so downstream tasks see a fixed layout
            (out_dir / KEPT / f"{writers.index(w):05d}_00000.jsonl").touch()
    quarantined = sum(errors.values())
    stats = {
        "step": "ingest",
        "files": [str(p) for p in inputs],
        "in": lines,
        "blank_lines": blank,
        "kept": valid,
        "quarantined": quarantined,
        "rejected": 0,
        "reasons": {},
        "quarantine_errors": dict(errors.most_common()),
        "sources": dict(sorted(per_source.items())),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    assert lines == valid + quarantined
    (out_dir / STATS).write_text(json.dumps(stats, indent=2))
    if quarantined:
        log.warning("quarantined %d of %d lines (see %s)", quarantined, lines, qpath)
    return stats
