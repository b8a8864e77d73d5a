"""Shared building blocks of every stage: typed configs, hashing, metrics sinks, atomic outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class StageConfig(BaseModel):
    """Base of every stage config: frozen, no unknown keys, every field documented."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    def derive(self: M, **changes: Any) -> M:
        """Return a copy with ``changes`` applied and re-validated (``model_copy`` skips validators)."""
        data = self.model_dump(mode="python")
        for key, value in changes.items():
            data[key] = value
        return type(self).model_validate(data)


def canonical_json(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(*parts: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``parts`` (configs, digests, strings): names outputs and cache keys."""
    h = hashlib.sha256()
    for part in parts:
        h.update(canonical_json(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def store_key(path: str | Path, store: str | Path) -> str:
    """``path`` as a cache-key part: relative to ``store`` when inside it (store folders are content-addressed, so
    the relative name stands for the content and a moved or copied ``$HERD_HOME`` keeps its keys), else as given."""
    try:
        return Path(path).resolve().relative_to(Path(store).resolve()).as_posix()
    except ValueError:
        return str(path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | Path, pattern: str = "**/*") -> str:
    """Digest of every file under ``root`` matching ``pattern`` (relative names and contents, sorted)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(x for x in root.glob(pattern) if x.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


class MetricsSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class _NullSink:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None


NULL_SINK: MetricsSink = _NullSink()


class MemorySink:
    """Keeps every metric in memory (tests, reports)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


MANIFEST = "manifest.json"


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Write a stage's output folder crash-safely.

    Yields a temporary sibling folder; on success it is renamed to ``out_dir`` (an older complete
    ``out_dir`` is replaced only after the new one is whole). On error the temporary folder is removed
    and whatever was at ``out_dir`` stays untouched. The caller writes ``manifest.json`` last.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Put ``src`` at ``dst`` as a hard link where the filesystem allows, else as a copy. Stage outputs are never
    written in place (every writer fills a fresh folder and renames it), so a linked file cannot change under
    its other name, and a 500 MB model shared by two stage folders takes its space once."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def confined(path: str | Path, *roots: str | Path, field: str, error: type[Exception] | None = None,
             file: str | None = None, hint: str = "") -> Path:
    """``path`` resolved (symlinks followed, ``..`` collapsed; a relative path against the working directory),
    provided it lies strictly inside one of ``roots`` (resolved the same way).

    Guards every path built from a config value, a batch id, a URL or file content before herd reads or
    writes it: join first (``confined(root / name, root, field="batch_id")``), then check. Otherwise raises
    ``error`` (``ConfigError`` by default; ``DataValidationError`` for paths from data, with the ``file`` that
    held the value) naming ``field``; ``hint`` says what to do instead.
    """
    from stages.errors import ConfigError, DataValidationError

    if not roots:
        raise ValueError("confined() needs at least one root")
    target = Path(path).expanduser().resolve()
    bases = [Path(r).expanduser().resolve() for r in roots]
    if any(b in target.parents for b in bases):
        return target
    error = error or ConfigError
    where = " or ".join(str(b) for b in bases)
    reason = f"{str(path)!r} resolves to {target}, outside {where}; " + (hint or "paths here must stay inside it")
    if issubclass(error, DataValidationError):
        raise error(reason, file=file, field=field)
    raise error(f"{field}: {reason}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for every non-blank line of a trusted JSONL(.gz) file.

    A line that is not valid JSON raises ``DataValidationError`` naming the file and line (herd's
    own intermediate files; raw user input goes through the curation ingest, which quarantines).
    """
    import gzip

    from stages.errors import DataValidationError

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataValidationError(f"invalid JSON: {exc}", file=str(path), line=n) from exc
