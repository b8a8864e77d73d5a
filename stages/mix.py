"""Mixture sampling: turn curated per-source corpora into a token budget with Llama 1 style shares.

For every source, ``epochs = share * tokens / source_tokens`` (the Llama 1 table's "Epochs" column).
Whole epochs repeat every document; the fractional part takes documents in a seeded hash order until
the source's token target is met, so realised shares land within a document of the target. The
mixed documents are shuffled deterministically into ``out_dir/data/*.jsonl.gz``; ``table.json`` and
``table.md`` report, per source, target and realised share, epochs, tokens and disk size.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from stages.common import StageConfig, atomic_dir, write_json_atomic
from stages.errors import ConfigError, DataValidationError
from stages.rows import read_lines

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# the Llama 1 table (Touvron et al. 2023, Table 1) and its mapping onto herd's source labels
# ---------------------------------------------------------------------------------------------

LLAMA1_TABLE: dict[str, dict[str, float]] = {
    "CommonCrawl": {"share": 0.670, "epochs": 1.10, "disk_bytes": 3.3e12},
    "C4": {"share": 0.150, "epochs": 1.06, "disk_bytes": 783e9},
    "Github": {"share": 0.045, "epochs": 0.64, "disk_bytes": 328e9},
    "Wikipedia": {"share": 0.045, "epochs": 2.45, "disk_bytes": 83e9},
    "Books": {"share": 0.045, "epochs": 2.23, "disk_bytes": 85e9},
    "ArXiv": {"share": 0.025, "epochs": 1.06, "disk_bytes": 92e9},
    "StackExchange": {"share": 0.020, "epochs": 1.03, "disk_bytes": 78e9},
}
LLAMA1_TO_HERD = {"CommonCrawl": "web", "C4": "web", "Github": "code", "Wikipedia": "reference", "Books": "books",
                  "ArXiv": "arxiv", "StackExchange": "qa"}
KNOWN_SOURCES = ("web", "code", "reference", "books", "qa", "arxiv")


def llama1_shares(available: tuple[str, ...] = ("web", "code", "reference", "books", "qa")) -> dict[str, float]:
    """Llama 1 sampling proportions on herd labels, restricted to ``available`` and renormalised.

    CommonCrawl + C4 -> web, Github -> code, Wikipedia -> reference, Books -> books,
    StackExchange -> qa, ArXiv -> arxiv (absent from herd's corpus by default, hence renormalised).
    """
    shares: dict[str, float] = {}
    for name, row in LLAMA1_TABLE.items():
        label = LLAMA1_TO_HERD[name]
        if label in available:
            shares[label] = shares.get(label, 0.0) + row["share"]
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


# ---------------------------------------------------------------------------------------------
# token counters (pluggable: a trained tokenizer registers itself here later)
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")


def count_words(text: str) -> int:
    """Whitespace-separated words: a deterministic stand-in for a tokenizer."""
    return sum(1 for _ in _WORD.finditer(text))


TOKEN_COUNTERS: dict[str, Callable[[str], int]] = {"words": count_words}


def register_token_counter(name: str, fn: Callable[[str], int]) -> None:
    """Make ``MixConfig(token_counter=name)`` count tokens with ``fn`` (e.g. a trained tokenizer)."""
    TOKEN_COUNTERS[name] = fn


class MissingSourcePolicy(StrEnum):
    error = "error"
    renormalise = "renormalise"


class MixConfig(StageConfig):
    """Per-source sampling shares and the token budget of the pretraining mixture."""

    shares: dict[str, float] = Field(default_factory=llama1_shares, description="sampling proportion per source "
                                     "label (sums to 1); default: Llama 1 table on herd labels, ArXiv renormalised away")
    known_sources: tuple[str, ...] = Field(KNOWN_SOURCES, description="source labels shares may name")
    tokens: int = Field(1_000_000, ge=1, description="token budget of the mixture")
    token_counter: str = Field("words", description="registered token counter (TOKEN_COUNTERS): 'words' until a "
                               "trained tokenizer is registered")
    missing_sources: MissingSourcePolicy = Field(MissingSourcePolicy.error, description="a source with a nonzero "
                                                 "share but no documents: 'error' or 'renormalise' the others")
    seed: int = Field(0, description="seed of the fractional-epoch pick and the output shuffle")
    output_shards: int = Field(4, ge=1, description="number of data/*.jsonl.gz files written")

    @field_validator("shares")
    @classmethod
    def _shares_valid(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("shares: name at least one source")
        bad = {k: x for k, x in v.items() if not (x >= 0.0 and math.isfinite(x))}
        if bad:
            raise ValueError(f"shares: must be finite and >= 0, got {bad}")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"shares: must sum to 1 (within 1e-6), got {total:.8f}")
        return v

    @model_validator(mode="after")
    def _known(self) -> MixConfig:
        unknown = sorted(set(self.shares) - set(self.known_sources))
        if unknown:
            raise ValueError(f"shares: unknown source(s) {unknown}; known_sources are {list(self.known_sources)}")
        if self.token_counter not in TOKEN_COUNTERS:
            raise ValueError(f"token_counter: {self.token_counter!r} is not registered; "
                             f"known: {sorted(TOKEN_COUNTERS)}")
        return self


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

@dataclass
class _Source:
    name: str
    ids: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    disk_bytes: int = 0


def _input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        folder = path / "kept" if (path / "kept").is_dir() else path
        files = sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.gz")])
        if files:
            return files
        hint = "; a curation run that kept nothing? see its report.json" if folder.name == "kept" else ""
        raise DataValidationError(f"no *.jsonl / *.jsonl.gz files in {folder}: nothing to mix{hint}", file=str(path))
    raise DataValidationError("input does not exist", file=str(path))


def _iter_records(path: Path) -> Iterator[tuple[Path, int, dict]]:
    for line in read_lines(path):  # each line decoded on its own: an error names its true line
        if line.error is not None:
            raise DataValidationError(line.error, file=str(path), line=line.number)
        if line.blank:
            continue
        try:
            rec = json.loads(line.text)
        except json.JSONDecodeError as exc:
            raise DataValidationError(f"invalid JSON: {exc}", file=str(path), line=line.number) from None
        if not isinstance(rec, dict):
            raise DataValidationError(f"expected a JSON object, got {type(rec).__name__}", file=str(path),
                                      line=line.number)
        yield path, line.number, rec


def read_sources(inputs: list[Path], count: Callable[[str], int]) -> dict[str, _Source]:
    """Documents per source from datatrove shard folders (``metadata.source``) or JSONL(.gz) (``source``)."""
    sources: dict[str, _Source] = {}
    files = sorted({f for p in inputs for f in _input_files(Path(p))})
    for path in files:
        for file, line, rec in _iter_records(path):
            meta = rec.get("metadata") or {}
            src = rec.get("source") or meta.get("source")
            if not src:
                raise DataValidationError("record has no source (top-level 'source' or metadata.source)",
                                          file=str(file), line=line, field="source")
            if not isinstance(rec.get("text"), str):
                raise DataValidationError("record has no string text", file=str(file), line=line, field="text")
            doc_id = rec.get("id", f"{file.name}:{line}")
            s = sources.setdefault(src, _Source(src))
            text = rec["text"]
            s.ids.append(doc_id)
            s.texts.append(text)
            s.metas.append({k: v for k, v in meta.items() if k != "source"}
                           | {k: v for k, v in rec.items() if k not in ("text", "id", "metadata", "source")})
            s.tokens.append(count(text))
            s.disk_bytes += len(text.encode("utf-8"))
    return sources


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def _hash_order(ids: list[Any], seed: int, source: str) -> list[int]:
    keys = [hashlib.blake2b(f"{seed}:{source}:{i}".encode(), digest_size=8).digest() for i in ids]
    return sorted(range(len(ids)), key=lambda j: (keys[j], j))


def sample_source(tokens: list[int], ids: list[Any], target: float, seed: int, source: str) -> list[tuple[int, int]]:
    """``(doc index, epoch)`` pairs realising ``target`` tokens from documents of ``tokens`` tokens each.

    Whole epochs take every document; the remainder takes documents in a seeded hash order while
    adding the next one keeps the total closer to the target (overshoot < half a document).
    """
    total = sum(tokens)
    if total <= 0 or target <= 0:
        return []
    full = int(target // total)
    picks = [(i, e) for e in range(full) for i in range(len(tokens))]
    remaining = target - full * total
    cum = 0
    for i in _hash_order(ids, seed, source):
        if remaining - cum < tokens[i] / 2:
            break
        picks.append((i, full))
        cum += tokens[i]
    return picks


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _effective_shares(cfg: MixConfig, sources: dict[str, _Source]) -> dict[str, float]:
    present = {k: v for k, v in cfg.shares.items() if v > 0}
    missing = sorted(k for k in present if k not in sources or sum(sources[k].tokens) == 0)
    if missing:
        if cfg.missing_sources == MissingSourcePolicy.error:
            raise ConfigError(f"shares: source(s) {missing} have a nonzero share but no documents in the inputs; "
                              f"add them, set their share to 0, or set missing_sources='renormalise'")
        log.warning("mix: sources %s missing; renormalising the other shares", missing)
        present = {k: v for k, v in present.items() if k not in missing}
        if not present:
            raise ConfigError("shares: none of the sources with a nonzero share has documents in the inputs")
    total = sum(present.values())
    return {k: v / total for k, v in present.items()}


def mix(cfg: MixConfig, inputs: list[Path], out_dir: str | Path, *,
        count_tokens: Callable[[str], int] | None = None) -> dict:
    """Sample the mixture; writes ``out_dir/data/*.jsonl.gz``, ``table.json``, ``table.md``, ``manifest.json``.

    ``count_tokens`` overrides ``cfg.token_counter`` (e.g. a tokenizer object's ``len(encode(text))``).
    """
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    count = count_tokens or TOKEN_COUNTERS[cfg.token_counter]
    sources = read_sources(inputs, count)
    if not any(sum(src.tokens) for src in sources.values()):
        raise DataValidationError(
            f"no documents with text in the inputs ({sum(len(src.ids) for src in sources.values())} document(s), "
            "0 tokens): nothing to mix; a curation run that kept nothing? see its report.json",
            file=", ".join(str(p) for p in inputs))
    shares = _effective_shares(cfg, sources)
    unused = sorted(set(sources) - set(shares))
    if unused:
        log.info("mix: sources %s have no share and are left out", unused)

    plan: list[tuple[str, int, int]] = []
    rows: dict[str, dict] = {}
    for name in sorted(shares):
        src = sources[name]
        src_tokens = sum(src.tokens)
        target = shares[name] * cfg.tokens
        picks = sample_source(src.tokens, src.ids, target, cfg.seed, name)
        plan.extend((name, i, e) for i, e in picks)
        rows[name] = {"source": name, "target_share": shares[name], "epochs": target / src_tokens,
                      "source_tokens": src_tokens, "source_docs": len(src.ids), "target_tokens": target,
                      "sampled_tokens": sum(src.tokens[i] for i, _ in picks), "sampled_docs": len(picks),
                      "disk_bytes": src.disk_bytes, "disk_size": human_bytes(src.disk_bytes)}
    for name in unused:
        src = sources[name]
        rows[name] = {"source": name, "target_share": 0.0, "epochs": 0.0, "source_tokens": sum(src.tokens),
                      "source_docs": len(src.ids), "target_tokens": 0.0, "sampled_tokens": 0, "sampled_docs": 0,
                      "disk_bytes": src.disk_bytes, "disk_size": human_bytes(src.disk_bytes)}
    total = sum(r["sampled_tokens"] for r in rows.values())
    for r in rows.values():
        r["realised_share"] = r["sampled_tokens"] / total if total else 0.0
        r["realised_epochs"] = r["sampled_tokens"] / r["source_tokens"] if r["source_tokens"] else 0.0

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(plan))
    with atomic_dir(out_dir) as tmp:
        data = tmp / "data"
        data.mkdir()
        per_shard = math.ceil(len(plan) / cfg.output_shards) if plan else 0
        import orjson

        for k in range(cfg.output_shards):
            with gzip.open(data / f"{k:05d}.jsonl.gz", "wb", compresslevel=6) as fh:
                for j in order[k * per_shard:(k + 1) * per_shard]:
                    name, i, epoch = plan[j]
                    src = sources[name]
                    doc_id = src.ids[i] if epoch == 0 else f"{src.ids[i]}#{epoch}"
                    rec = {"text": src.texts[i], "id": doc_id,
                           "metadata": {**src.metas[i], "source": name, "epoch": epoch, "tokens": src.tokens[i]}}
                    fh.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
        table = {"tokens_budget": cfg.tokens, "tokens_sampled": total, "token_counter": cfg.token_counter
                 if count_tokens is None else getattr(count_tokens, "__name__", "custom"),
                 "sources": [rows[k] for k in sorted(rows, key=lambda s: -rows[s]["target_share"])]}
        write_json_atomic(tmp / "table.json", table)
        (tmp / "table.md").write_text(render_table_md(table))
        result = {"out_dir": str(out_dir), "documents": len(plan), "tokens": total,
                  "seconds": round(time.perf_counter() - t0, 3), "table": table,
                  "config": cfg.model_dump(mode="json")}
        write_json_atomic(tmp / "manifest.json", result)
    log.info("mix: %d documents, %d tokens into %s", len(plan), total, out_dir)
    return result


def render_table_md(table: dict) -> str:
    """The Llama 1 table's columns (plus realised share and tokens) as Markdown."""
    lines = ["| Dataset | Sampling prop. | Realised prop. | Epochs | Tokens (source) | Tokens (sampled) | Disk size |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table["sources"]:
        lines.append(f"| {r['source']} | {100 * r['target_share']:.1f}% | {100 * r['realised_share']:.2f}% | "
                     f"{r['epochs']:.2f} | {r['source_tokens']:,} | {r['sampled_tokens']:,} | {r['disk_size']} |")
    lines.append(f"\nToken budget {table['tokens_budget']:,}; sampled {table['tokens_sampled']:,} "
                 f"(counter: {table['token_counter']}).\n")
    return "\n".join(lines)


__all__ = ["MixConfig", "mix", "llama1_shares", "LLAMA1_TABLE", "LLAMA1_TO_HERD", "KNOWN_SOURCES",
           "TOKEN_COUNTERS", "register_token_counter", "count_words", "sample_source", "read_sources",
           "render_table_md", "MissingSourcePolicy", "human_bytes"]
