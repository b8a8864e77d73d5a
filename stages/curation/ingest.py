"""Read raw input documents, validate every line, and shard them for the curation steps.

Accepts JSONL, JSONL.gz and Parquet files (a file, a folder or a glob). Each record needs a
non-empty string ``text`` and an ``id`` (string or integer); ``url`` (string or null), ``source``
(string or null) and ``metadata`` (object or null) are optional. Every line is decoded on its own
(:func:`stages.rows.read_lines`): a line that is not valid JSON, not UTF-8, holds a NUL byte, is
longer than ``max_line_bytes``, is cut by a truncated gzip member, misses ``text``/``id``, has a field
of the wrong type (a Parquet column of the wrong type: row by row) or repeats an earlier ``id`` is
written to ``quarantine/quarantine.jsonl`` as ``{"file", "line", "offset", "field", "error", "raw"}``
(``offset``: the line's byte offset, in the decompressed stream for ``.gz``; null for Parquet rows);
it never stops the run. A UTF-8 BOM and CRLF line endings are accepted. Blank lines are ignored; every
other line is counted once: ``in = kept + quarantined``. Valid documents are spread over ``shards``
files by a hash of their id, so the layout does not depend on input order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from stages.common import StageConfig, file_sha256
from stages.curation.base import KEPT, STATS, ShardWriter
from stages.errors import DataValidationError
from stages.rows import MAX_LINE_BYTES, bad_string, is_parquet, parquet_rows, read_lines

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"


class IngestConfig(StageConfig):
    """How raw input is read and sharded."""

    shards: int = Field(4, ge=1, le=4096, description="number of shards valid documents are spread over")
    default_source: str = Field("web", min_length=1, description="source label for records without a `source`")
    max_raw_chars: int = Field(2000, ge=0, description="how much of a bad line is copied into the quarantine file")
    max_line_bytes: int = Field(MAX_LINE_BYTES, ge=1024, description="longest input line read (bytes); a longer "
                                "line is quarantined without being held in memory")


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
    bad = bad_string({k: obj.get(k) for k in ("text", "id", "url", "source", "metadata")}, nul=False)
    if bad:  # a lone surrogate cannot be written as UTF-8
        return None, bad[0], bad[1]
    return {
        "id": doc_id,
        "text": text,
        "url": obj.get("url") or None,
        "source": obj.get("source") or default_source,
        "meta": meta or {},
    }, None, None


def _shard_of(doc_id: str, shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % shards


BLANK = object()  # the row of a blank line (not counted)


def _input_rows(path: Path, cfg: IngestConfig) -> Iterator[tuple[int, int | None, object, str | None, str | None]]:
    """``(line, byte offset, parsed row, raw text, error)`` per line or Parquet row; a blank line's row is ``BLANK``.

    ``error`` set: the line could not be read or parsed (the row is None). Each line is decoded on its own.
    """
    if is_parquet(path):
        try:
            for n, row, err in parquet_rows(path):
                yield n, None, row, None, err
        except DataValidationError as exc:  # the file cannot be opened at all: one quarantine record for it
            yield 1, None, None, None, exc.reason
        return
    for line in read_lines(path, max_line_bytes=cfg.max_line_bytes):
        if line.error is not None:
            yield line.number, line.offset, None, line.raw_text(cfg.max_raw_chars), line.error
        elif line.blank:
            yield line.number, line.offset, BLANK, None, None
        else:
            try:
                yield line.number, line.offset, json.loads(line.text), line.text, None
            except json.JSONDecodeError as exc:
                yield line.number, line.offset, None, line.text, f"bad JSON: {exc}"


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
        def quarantine(file: Path, line: int, offset: int | None, field: str | None, error: str,
                       raw: str | None) -> None:
            errors[f"{field or 'line'}: {error.split(':')[0]}"] += 1
            qfh.write(json.dumps({"file": str(file), "line": line, "offset": offset, "field": field, "error": error,
                                  "raw": (raw or "")[: cfg.max_raw_chars]}, ensure_ascii=False) + "\n")

        for path in inputs:
            for n, offset, row, raw_text, err in _input_rows(path, cfg):
                if row is BLANK:
                    blank += 1
                    continue
                lines += 1
                if err is not None:
                    quarantine(path, n, offset, None, err, raw_text)
                    continue
                rec, field, error = validate_record(row, cfg.default_source)
                if rec is None:
                    quarantine(path, n, offset, field, error,
                               raw_text if raw_text is not None else json.dumps(row, default=str))
                    continue
                origin = f"{path.name}:{n}"
                if rec["id"] in seen:
                    quarantine(path, n, offset, "id", f"duplicate id {rec['id']!r} (first seen at {seen[rec['id']]})",
                               raw_text if raw_text is not None else json.dumps(row, default=str))
                    continue
                try:  # serialised before anything is written: a value orjson cannot store fails here, alone
                    writers[_shard_of(rec["id"], cfg.shards)].write({
                        "text": rec["text"], "id": rec["id"],
                        "metadata": {"source": rec["source"], "url": rec["url"], "meta": rec["meta"], "origin": origin},
                    })
                except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError (e.g. an int > 64 bits)
                    quarantine(path, n, offset, "metadata", f"cannot be stored as JSON: {exc}",
                               raw_text if raw_text is not None else json.dumps(row, default=str))
                    continue
                seen[rec["id"]] = origin
                valid += 1
                per_source[rec["source"]] += 1
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
