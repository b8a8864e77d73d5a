"""Preference batches: the record schema, validated ingestion into versioned Parquet batches, quarantine.

A record (one JSON object per line, or one Parquet row)::

    {"id": str?, "prompt": str | [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "chosen": str, "rejected": str, "edited": str | null,
     "rating": "significantly_better" | "better" | "slightly_better" | "negligibly_better",
     "category": "helpfulness" | "safety", "annotator_id": str}

``edited`` is the annotator's improved response (Llama 3: edited > chosen > rejected).

:func:`ingest_file` validates every row. Valid rows not seen before (in this file or in any stored batch;
identity is the record's content without ``id``) become one batch,
``<root>/batches/<batch_id>/{data.parquet, manifest.json}``, written atomically (a crash leaves no
partial batch). Invalid rows go to ``<root>/quarantine/<batch or file digest>.jsonl`` with file, line,
byte offset, field and reason; so do lines that cannot be read at all (bytes that are not UTF-8, a NUL
byte, a line over ``max_line_bytes``, a line cut by a truncated gzip member): each line is decoded on its
own, so one bad line never sinks the file. A UTF-8 BOM and CRLF line endings are accepted. Blank lines
are ignored. Every other row is counted exactly once: ``rows = accepted + quarantined + duplicates``.
A Parquet file that cannot be opened at all is refused with one error naming the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages.common import atomic_dir, canonical_json, confined, file_sha256, write_json_atomic
from stages.errors import ConfigError, DataValidationError
from stages.rows import MAX_LINE_BYTES, bad_string, is_parquet, parquet_rows, read_lines

log = logging.getLogger(__name__)

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
CATEGORIES = ("helpfulness", "safety")
Rating = Literal["significantly_better", "better", "slightly_better", "negligibly_better"]
Category = Literal["helpfulness", "safety"]
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one folder name (fullmatch)
COLUMNS = ("record_sha256", "id", "prompt", "chosen", "rejected", "edited", "rating", "category", "annotator_id",
           "source_file", "source_line")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("message content is empty")
        return v


class PreferenceRecord(BaseModel):
    """One annotated comparison: ``chosen`` preferred over ``rejected`` (and ``edited`` over both)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(None, description="Annotation-tool id (optional; not part of the record's identity).")
    prompt: str | list[Message] = Field(description="The prompt: a string, or the conversation so far.")
    chosen: str = Field(description="The preferred response.")
    rejected: str = Field(description="The other response.")
    edited: str | None = Field(None, description="The annotator's improved response (edited > chosen > rejected).")
    rating: Rating = Field(description="How much better chosen is than rejected.")
    category: Category = Field(description="Which reward model the comparison trains.")
    annotator_id: str = Field(description="Who labelled it.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[Message]) -> str | list[Message]:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("prompt is empty")
        else:
            if not v:
                raise ValueError("prompt has no messages")
            if v[-1].role != "user":
                raise ValueError(f"the last prompt message must be the user's, got {v[-1].role!r}")
        return v

    @field_validator("chosen", "rejected", "annotator_id")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("edited")
    @classmethod
    def _edited(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (use null when there is no edit)")
        return v

    def check_pair(self) -> None:
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are the same text: not a comparison")

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (a string prompt is one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.prompt]

    def digest(self) -> str:
        """Content identity: sha256 of the canonical record without ``id``."""
        body = self.model_dump(mode="json", exclude={"id"})
        return hashlib.sha256(canonical_json(body).encode()).hexdigest()

    def row(self, source_file: str, source_line: int) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else json.dumps(self.messages(), ensure_ascii=False)
        return {"record_sha256": self.digest(), "id": self.id, "prompt": prompt, "chosen": self.chosen,
                "rejected": self.rejected, "edited": self.edited, "rating": self.rating, "category": self.category,
                "annotator_id": self.annotator_id, "source_file": source_file, "source_line": source_line}


def record_from_row(row: dict[str, Any]) -> PreferenceRecord:
    """A stored batch row back to a record (the prompt column holds a string or a JSON message list)."""
    prompt = row["prompt"]
    if isinstance(prompt, str) and prompt.startswith("[{"):
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            pass
    return PreferenceRecord(id=row.get("id"), prompt=prompt, chosen=row["chosen"], rejected=row["rejected"],
                            edited=row.get("edited"), rating=row["rating"], category=row["category"],
                            annotator_id=row["annotator_id"])


# ---------------------------------------------------------------------------------------------- reading


class Rejected(BaseModel):
    """A row that failed validation, as written to the quarantine file.

    ``line`` is the 1-based line (JSONL) or row (Parquet) number; ``offset`` the byte offset of the line's first
    byte in the file (in the decompressed stream for ``.gz``; None for Parquet rows).
    """

    file: str
    line: int
    offset: int | None = None
    field: str | None
    reason: str
    raw: str


RAW_CHARS = 10_000  # how much of a bad row is copied into the quarantine file


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (allowed: " + ", ".join(PreferenceRecord.model_fields) + ")"
    elif err["type"] == "missing":
        msg = "required field is missing"
    more = len(exc.errors()) - 1
    return field or "", msg + (f" (and {more} more error{'s' * (more > 1)})" if more > 0 else "")


class Unreadable:
    """A row that could not be read at all (bytes not UTF-8, a NUL byte, an over-long line, damaged gzip data)."""

    def __init__(self, reason: str):
        self.reason = reason


def read_rows(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, int | None, Any, str]]:
    """``(line, byte offset, parsed object | JSONDecodeError | Unreadable, raw text)`` per non-blank JSONL line,
    or per Parquet row (1-based, offset None). Each line is decoded on its own: one bad line never stops the file.

    A Parquet file that cannot be opened at all raises :class:`DataValidationError` naming the file.
    """
    if is_parquet(path):
        for i, row, error in parquet_rows(path):
            if error is not None:
                yield i, None, Unreadable(error), ""
                continue
            row = {k: v for k, v in row.items() if v is not None or k in ("edited", "id")}
            yield i, None, row, json.dumps(row, ensure_ascii=False, default=str)
        return
    for line in read_lines(path, max_line_bytes=max_line_bytes):
        if line.error is not None:
            yield line.number, line.offset, Unreadable(line.error), line.raw_text(RAW_CHARS)
            continue
        if line.blank:
            continue
        try:
            yield line.number, line.offset, json.loads(line.text), line.text
        except json.JSONDecodeError as exc:
            yield line.number, line.offset, exc, line.text


def validate(obj: Any) -> tuple[PreferenceRecord | None, str | None, str | None]:
    """``(record, None, None)`` or ``(None, field, reason)``."""
    if isinstance(obj, Unreadable):
        return None, None, obj.reason
    if isinstance(obj, Exception):
        return None, None, f"invalid JSON: {obj}"
    if not isinstance(obj, dict):
        return None, None, f"expected a JSON object, got {type(obj).__name__}"
    try:
        rec = PreferenceRecord.model_validate(obj)
    except ValidationError as exc:
        field, reason = _first_error(exc)
        return None, field, reason
    bad = bad_string(obj)  # a NUL or a lone surrogate would break the batch's Parquet file or the tokenizer
    if bad:
        return None, bad[0], bad[1]
    try:
        rec.check_pair()
    except ValueError as exc:
        return None, "rejected", str(exc)
    return rec, None, None


# ---------------------------------------------------------------------------------------------- store


class IngestResult(BaseModel):
    """The ``herd preferences ingest`` contract: one JSON object with these four keys."""

    batch_id: str | None
    accepted: int
    quarantined: int
    duplicates: int


@contextmanager
def _locked(root: Path, name: str = ".lock") -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def inbox_lock(root: str | Path):
    """Exclusive lock for one inbox scan under ``root`` (``<root>/.inbox.lock``, across processes): a scan
    reads, updates and rewrites the inbox ledger, so two at once would lose each other's entries. Separate
    from the batch store's lock, which :func:`ingest_file` takes inside a scan."""
    return _locked(Path(root), ".inbox.lock")


def batch_dirs(root: str | Path) -> list[Path]:
    """Complete batches (manifest present), oldest first."""
    base = Path(root) / "batches"
    if not base.is_dir():
        return []
    found = []
    for d in base.iterdir():
        if d.name.startswith("."):
            continue
        man = d / "manifest.json"
        if man.is_file():
            found.append((json.loads(man.read_text())["created"], d.name, d))
    return [d for _, _, d in sorted(found)]


def read_batch(batch_dir: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(batch_dir) / "data.parquet").to_pylist()


def stored_digests(root: str | Path) -> dict[str, str]:
    """record digest -> batch id, over every stored batch."""
    import pyarrow.parquet as pq

    seen: dict[str, str] = {}
    for d in batch_dirs(root):
        for digest in pq.read_table(d / "data.parquet", columns=["record_sha256"]).column(0).to_pylist():
            seen.setdefault(digest, d.name)
    return seen


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("record_sha256", pa.string()), ("id", pa.string()), ("prompt", pa.string()),
                        ("chosen", pa.string()), ("rejected", pa.string()), ("edited", pa.string()),
                        ("rating", pa.string()), ("category", pa.string()), ("annotator_id", pa.string()),
                        ("source_file", pa.string()), ("source_line", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def ingest_file(path: str | Path, root: str | Path, batch_id: str | None = None, *,
                max_line_bytes: int = MAX_LINE_BYTES) -> tuple[IngestResult, Path | None]:
    """Validate ``path`` (JSONL, JSONL.gz or Parquet) and store its new valid rows as one batch under ``root``.

    Every line is read on its own (:func:`stages.rows.read_lines`): a line that is not UTF-8, holds a NUL byte,
    is longer than ``max_line_bytes`` or is cut by damaged gzip data is quarantined with its line number and
    byte offset, and the rest of the file is still ingested.

    Returns the result and the batch folder (None when nothing new was accepted). ``batch_id`` defaults
    to ``b<UTC date>-<digest of the accepted rows>``; an explicit id that already names a stored batch
    with other content is refused (batches are immutable).
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DataValidationError("no such file", file=str(path))
    if batch_id is not None and not (isinstance(batch_id, str) and BATCH_ID.fullmatch(batch_id)):
        raise ConfigError(f"batch_id (--batch-id) {batch_id!r}: a batch id is one folder name: start with a letter "
                          "or digit, then letters, digits, '.', '_' or '-' (at most 128); no '/', no '..' paths")
    with _locked(root):
        seen = stored_digests(root)
        accepted: list[dict[str, Any]] = []
        rejected: list[Rejected] = []
        in_file: set[str] = set()
        duplicates = 0
        for line, offset, obj, raw in read_rows(path, max_line_bytes=max_line_bytes):
            rec, field, reason = validate(obj)
            if rec is None:
                rejected.append(Rejected(file=str(path), line=line, offset=offset, field=field, reason=reason or "",
                                         raw=raw[:RAW_CHARS]))
                continue
            digest = rec.digest()
            if digest in seen or digest in in_file:
                duplicates += 1
                continue
            in_file.add(digest)
            accepted.append(rec.row(str(path), line))
        content = hashlib.sha256("\n".join(r["record_sha256"] for r in accepted).encode()).hexdigest()
        qname = (batch_id or f"file-{file_sha256(path)[:16]}") + ".jsonl"
        if rejected:
            qfile = root / "quarantine" / qname
            confined(qfile, root / "quarantine", field="batch_id")
            qfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = qfile.with_name(f".{qfile.name}.tmp")
            tmp.write_text("".join(r.model_dump_json() + "\n" for r in rejected))
            tmp.replace(qfile)
            log.warning("%d invalid row(s) of %s quarantined in %s", len(rejected), path, qfile)
        if not accepted:
            log.info("%s: nothing new (%d duplicate, %d quarantined row(s))", path, duplicates, len(rejected))
            return IngestResult(batch_id=None, accepted=0, quarantined=len(rejected), duplicates=duplicates), None
        now = datetime.now(UTC)
        bid = batch_id or f"b{now:%Y%m%d}-{content[:12]}"
        target = root / "batches" / bid
        confined(target, root / "batches", field="batch_id")
        if (target / "manifest.json").exists():
            raise ConfigError(f"batch id {bid!r} already names a stored batch ({target}); batches are immutable, "
                              "pick another --batch-id")
        counts = {c: sum(r["category"] == c for r in accepted) for c in CATEGORIES}
        ratings = {r: sum(row["rating"] == r for row in accepted) for r in RATINGS}
        with atomic_dir(target) as tmp:
            _write_parquet(accepted, tmp / "data.parquet")
            write_json_atomic(tmp / "manifest.json", {
                "batch_id": bid, "created": now.isoformat(), "source_file": str(path),
                "source_sha256": file_sha256(path), "rows": len(accepted), "digest": content,
                "data_sha256": file_sha256(tmp / "data.parquet"), "categories": counts, "ratings": ratings,
                "with_edits": sum(r["edited"] is not None for r in accepted),
                "quarantined": len(rejected), "duplicates": duplicates,
            })
        log.info("batch %s: %d accepted, %d quarantined, %d duplicate(s) -> %s", bid, len(accepted), len(rejected),
                 duplicates, target)
        return IngestResult(batch_id=bid, accepted=len(accepted), quarantined=len(rejected),
                            duplicates=duplicates), target
