"""Benchmark decontamination: cut evaluation text out of the training documents (GPT-3, NeMo Curator).

The method of GPT-3 (Brown et al. 2020, appendix C) as NeMo Curator's ``TaskDecontamination`` implements it:

1. Every evaluation item of the benchmarks (question and answers as one text) is normalised: lowercased,
   punctuation and symbols removed (``[^\\w\\s]``), split on whitespace. Its word 13-grams form the
   contamination set; an n-gram found in more than ``max_item_frequency`` items (boilerplate such as
   "which of the following is not ...") is ignored. Items shorter than ``n`` words contribute nothing
   (counted per benchmark as ``short_items``).
2. A training document is normalised the same way; each of its 13-grams is hashed and looked up among
   the evaluation n-gram hashes (a sorted ``uint64`` array; a hit is confirmed word by word against each
   item holding it, so a hash collision never cuts text). No Aho-Corasick automaton: memory is about 20
   bytes per distinct evaluation n-gram, 8 per occurrence, plus the items' word ids.
3. Each match, mapped back to characters through the words' spans, is removed together with
   ``window_chars`` characters on either side (widened to whole words); overlapping removals merge. Each
   merged removal is one *split*. The pieces left between removals are stripped of surrounding whitespace
   and those shorter than ``min_piece_chars`` characters are dropped.
4. A document split more than ``max_splits`` times, or with no piece left, is dropped whole: it goes to
   ``rejected/`` with reason ``contamination`` and a detail naming the benchmark and item (the first
   match in the document, and how many other items matched).

**Cut documents stay one document under their id.** The surviving pieces are joined with a blank line
(``"\\n\\n"``) and ``metadata["contamination"]`` records where they start and end in the new text
(``pieces``), the characters removed and the items matched. NeMo Curator emits each piece as its own
document instead; herd keeps one record per input document so every input line still has exactly one
fate (input lines = kept + rejected + quarantined, as ``finalize`` checks) and a later step (the quality
classifier) judges the document as a whole. A packer that wants the pieces as separate training
documents splits on ``metadata.herd.contamination.pieces``.

The step is a plain single-process pass over the shards, like exact dedup: it needs the whole
evaluation index in memory, and the lookup is cheap next to the text normalisation.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from stages.common import StageConfig
from stages.curation import base
from stages.curation.base import KEPT, REJECTED, ShardWriter
from stages.errors import MissingAssetError

log = logging.getLogger(__name__)

#: The benchmarks herd evaluates on (``stages.evaluation.benchmarks``), in its order.
BENCHMARK_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa",
                   "commonsense_qa", "social_iqa", "mmlu", "lambada", "gsm8k", "humaneval")


class DecontamConfig(StageConfig):
    """Remove benchmark text from training documents: 13-gram overlap, a window around it, GPT-3's rules."""

    enabled: bool = Field(True, description="run benchmark decontamination")

    tasks: list[str] = Field(default_factory=lambda: list(BENCHMARK_TASKS),
                             description="benchmarks whose evaluation items are removed from the training text "
                                         f"(any of {', '.join(BENCHMARK_TASKS)}; default all)")
    n: int = Field(13, ge=3, le=64, description="n-gram length in normalised words (GPT-3 and NeMo Curator: 13)")
    max_item_frequency: int = Field(10, ge=1, description="ignore an n-gram that occurs in more than this many "
                                    "evaluation items (shared boilerplate, not contamination)")
    window_chars: int = Field(200, ge=0, description="characters removed on each side of a matched n-gram "
                              "(widened to whole words)")
    min_piece_chars: int = Field(200, ge=0, description="a piece of a cut document shorter than this (after "
                                 "stripping whitespace) is dropped")
    max_splits: int = Field(10, ge=0, description="a document with more than this many separate removed regions "
                            "is dropped whole (reason contamination)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(BENCHMARK_TASKS))
        if unknown:
            raise ValueError(f"tasks: unknown benchmark(s) {unknown}; choose from {list(BENCHMARK_TASKS)}")
        if not v:
            raise ValueError("tasks: empty; set enabled: false to skip decontamination")
        return list(dict.fromkeys(v))


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]+")
_TOKEN = re.compile(r"\S+")


def normalise_words(text: str) -> list[str]:
    """Lowercase, strip punctuation and symbols, split on whitespace (the evaluation items and documents alike)."""
    return _PUNCT.sub("", text.lower()).split()


def word_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The normalised words of ``text`` and each one's ``(start, end)`` character span in ``text``.

    A whitespace token that is all punctuation yields no word (as in ``normalise_words``).
    """
    words: list[str] = []
    spans: list[tuple[int, int]] = []
    for m in _TOKEN.finditer(text):
        w = _PUNCT.sub("", m.group().lower())
        if w:
            words.append(w)
            spans.append(m.span())
    return words, spans


_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """(L,) uint64 polynomial hash of each window of ``n`` word ids, L = len(ids) - n + 1 (mod 2**64)."""
    length = len(ids) - n + 1
    if length <= 0:
        return np.zeros(0, dtype=np.uint64)
    u = (ids.astype(np.int64) + 1).astype(np.uint64)
    h = np.zeros(length, dtype=np.uint64)
    for k in range(n):
        h = h * _MULT + u[k:k + length]
    return h


# ---------------------------------------------------------------------------------------------
# the evaluation index
# ---------------------------------------------------------------------------------------------

@dataclass
class BenchmarkIndex:
    """The evaluation n-grams: sorted unique hashes, each with the (item, word position) of every item holding it.

    Occurrences of hash ``hashes[j]`` are ``occ_item/occ_pos[starts[j]:starts[j] + counts[j]]``
    (at most ``max_item_frequency`` of them; more and the n-gram is not indexed).
    """

    n: int
    vocab: dict[str, int]
    hashes: np.ndarray       # (H,) uint64, sorted, unique
    starts: np.ndarray       # (H,) int64 first occurrence of each hash in occ_*
    counts: np.ndarray       # (H,) int32 items holding each hash
    occ_item: np.ndarray     # (O,) int32 index into items
    occ_pos: np.ndarray      # (O,) int32 word position inside that item
    item_words: list[np.ndarray]
    items: list[tuple[str, str]]  # (task, item id)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {"items", "short_items"}
    ignored_ngrams: int = 0
    digest: str = ""

    def summary(self) -> dict:
        return {"items": len(self.items), "ngrams": int(len(self.hashes)), "ignored_ngrams": self.ignored_ngrams,
                "vocab": len(self.vocab), "digest": self.digest}

    def find(self, words: Sequence[str]) -> list[tuple[int, int]]:
        """``(word position, item index)`` for every n-gram of ``words`` and every evaluation item holding it."""
        n = self.n
        if len(words) < n or len(self.hashes) == 0:
            return []
        vocab = self.vocab
        ids = np.fromiter((vocab.get(w, -1) for w in words), dtype=np.int64, count=len(words))
        oov = np.concatenate(([0], np.cumsum(ids < 0)))
        valid = (oov[n:] - oov[:-n]) == 0
        if not valid.any():
            return []
        h = ngram_hashes(ids, n)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        hit = np.flatnonzero(valid & (self.hashes[pos] == h))
        out = []
        for i in hit.tolist():
            j = int(pos[i])
            start = int(self.starts[j])
            for k in range(start, start + int(self.counts[j])):
                item, p = int(self.occ_item[k]), int(self.occ_pos[k])
                if np.array_equal(ids[i:i + n], self.item_words[item][p:p + n]):  # never trust a hash alone
                    out.append((i, item))
        return out


def build_index(items: Iterable[tuple[str, str, str]], n: int = 13, max_item_frequency: int = 10,
                tasks: Sequence[str] | None = None) -> BenchmarkIndex:
    """Index ``(task, item_id, text)`` evaluation items (only ``tasks`` when given) into an ``n``-gram index.

    ``digest`` is the sha256 of every selected ``(task, item_id, text)`` in order: a step keyed on it
    recomputes when the benchmark set changes.
    """
    keep = set(tasks) if tasks is not None else None
    vocab: dict[str, int] = {}
    item_words: list[np.ndarray] = []
    names: list[tuple[str, str]] = []
    per_task: dict[str, dict[str, int]] = {t: {"items": 0, "short_items": 0} for t in (tasks or ())}
    chunks_h: list[np.ndarray] = []
    chunks_i: list[np.ndarray] = []
    chunks_p: list[np.ndarray] = []
    sha = hashlib.sha256()
    for task, item_id, text in items:
        if keep is not None and task not in keep:
            continue
        item_id = str(item_id)
        for part in (task, item_id, text):
            sha.update(part.encode("utf-8"))
            sha.update(b"\x00")
        idx = len(names)
        names.append((task, item_id))
        stats = per_task.setdefault(task, {"items": 0, "short_items": 0})
        stats["items"] += 1
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in normalise_words(text)], dtype=np.int64)
        item_words.append(ids.astype(np.int32))
        if len(ids) < n:
            stats["short_items"] += 1
            continue
        h, first = np.unique(ngram_hashes(ids, n), return_index=True)
        chunks_h.append(h)
        chunks_i.append(np.full(len(h), idx, dtype=np.int32))
        chunks_p.append(first.astype(np.int32))
    if chunks_h:
        all_h = np.concatenate(chunks_h)
        order = np.argsort(all_h, kind="stable")  # stable: occurrences of one n-gram in item order
        hs = all_h[order]
        first = np.flatnonzero(np.concatenate(([True], hs[1:] != hs[:-1])))
        counts = np.diff(np.concatenate((first, [len(hs)])))  # distinct items per n-gram
        ok = counts <= max_item_frequency
        occ = np.repeat(ok, counts)  # occurrences of the n-grams kept
        hashes, counts = hs[first][ok], counts[ok].astype(np.int32)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        occ_item = np.concatenate(chunks_i)[order][occ]
        occ_pos = np.concatenate(chunks_p)[order][occ]
        ignored = int((~ok).sum())
    else:
        hashes = np.zeros(0, dtype=np.uint64)
        starts = np.zeros(0, dtype=np.int64)
        counts = occ_item = occ_pos = np.zeros(0, dtype=np.int32)
        ignored = 0
    index = BenchmarkIndex(n=n, vocab=vocab, hashes=hashes, starts=starts, counts=counts, occ_item=occ_item,
                           occ_pos=occ_pos, item_words=item_words, items=names, tasks=per_task, ignored_ngrams=ignored,
                           digest=sha.hexdigest())
    log.info("decontaminate: indexed %d evaluation items of %d benchmarks: %d %d-grams (%d ignored as too common)",
             len(names), len(per_task), len(hashes), n, ignored)
    return index


def benchmark_index(cfg: DecontamConfig, cache_dir: str | Path) -> BenchmarkIndex:
    """The index of ``cfg.tasks``' evaluation items (``stages.evaluation.benchmarks``; the last one is kept
    in memory, so preparing the step's key and running the step read the benchmarks once)."""
    return _cached_index(str(cache_dir), tuple(cfg.tasks), cfg.n, cfg.max_item_frequency)


@functools.lru_cache(maxsize=1)
def _cached_index(cache_dir: str, tasks: tuple[str, ...], n: int, max_item_frequency: int) -> BenchmarkIndex:
    try:
        from stages.evaluation.benchmarks import benchmark_texts
    except ModuleNotFoundError as exc:
        if exc.name not in ("stages.evaluation", "stages.evaluation.benchmarks"):
            raise
        raise MissingAssetError("decontaminate: the benchmark reader stages.evaluation.benchmarks is not installed; "
                                "set curation.decontaminate.enabled: false to skip decontamination") from exc
    t0 = time.perf_counter()
    index = build_index(benchmark_texts(Path(cache_dir), list(tasks)), n=n, max_item_frequency=max_item_frequency,
                        tasks=tasks)
    log.info("decontaminate: benchmark index built in %.1f s", time.perf_counter() - t0)
    return index


# ---------------------------------------------------------------------------------------------
# one document
# ---------------------------------------------------------------------------------------------

_SNAP = 64  # widen a cut to a word boundary, but at most this many characters (minified code, URLs)


@dataclass
class Verdict:
    """What decontamination does to one document."""

    text: str | None                 # the new text (unchanged when clean); None when dropped
    items: list[int]                 # matched item indices, in document order, distinct
    regions: list[tuple[int, int]]   # removed character ranges of the original text, merged
    pieces: list[tuple[int, int]]    # kept character ranges of the original text
    removed_chars: int = 0           # characters of the original text not in the output
    dropped: str | None = None       # "max_splits" or "no_piece" when the document is dropped

    @property
    def contaminated(self) -> bool:
        return bool(self.items)


def _snap_left(text: str, i: int) -> int:
    stop = max(0, i - _SNAP)
    j = i
    while j > stop and not text[j - 1].isspace():
        j -= 1
    return j if (j == 0 or text[j - 1].isspace()) else i


def _snap_right(text: str, i: int) -> int:
    stop = min(len(text), i + _SNAP)
    j = i
    while j < stop and not text[j].isspace():
        j += 1
    return j if (j == len(text) or text[j].isspace()) else i


def _strip_range(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def decontaminate_text(text: str, index: BenchmarkIndex, cfg: DecontamConfig) -> Verdict:
    """Apply the contamination rules to one text (see the module docstring)."""
    if not index.find(normalise_words(text)):  # fast path: one regex pass, no spans
        return Verdict(text=text, items=[], regions=[], pieces=[(0, len(text))])
    words, spans = word_spans(text)
    matches = index.find(words)
    if not matches:  # cannot happen (same normalisation); be safe
        return Verdict(text=text, items=[], regions=[], pieces=[(0, len(text))])
    n, w = index.n, cfg.window_chars
    raw = []
    for i, _ in matches:
        s = max(0, spans[i][0] - w)
        e = min(len(text), spans[i + n - 1][1] + w)
        raw.append((_snap_left(text, s), _snap_right(text, e)))
    raw.sort()
    regions: list[tuple[int, int]] = []
    for s, e in raw:
        if regions and s <= regions[-1][1]:
            regions[-1] = (regions[-1][0], max(regions[-1][1], e))
        else:
            regions.append((s, e))
    items = list(dict.fromkeys(item for _, item in matches))
    if len(regions) > cfg.max_splits:
        return Verdict(text=None, items=items, regions=regions, pieces=[], removed_chars=len(text),
                       dropped="max_splits")
    pieces = []
    prev = 0
    for s, e in [*regions, (len(text), len(text))]:
        ps, pe = _strip_range(text, prev, s)
        if pe - ps >= max(1, cfg.min_piece_chars):
            pieces.append((ps, pe))
        prev = e
    if not pieces:
        return Verdict(text=None, items=items, regions=regions, pieces=[], removed_chars=len(text), dropped="no_piece")
    kept = sum(e - s for s, e in pieces)
    return Verdict(text="\n\n".join(text[s:e] for s, e in pieces), items=items, regions=regions, pieces=pieces,
                   removed_chars=len(text) - kept)


def _drop_detail(v: Verdict, index: BenchmarkIndex, cfg: DecontamConfig) -> str:
    task, item_id = index.items[v.items[0]]
    detail = f"{task} item {item_id}"
    if len(v.items) > 1:
        others = sorted({index.items[i][0] for i in v.items[1:]})
        detail += f" (+{len(v.items) - 1} more items: {', '.join(others)})"
    if v.dropped == "max_splits":
        return f"{detail}; split {len(v.regions)} times > max_splits {cfg.max_splits}"
    return f"{detail}; no piece of {cfg.min_piece_chars}+ characters left"


def _label(task: str, item_id: str) -> str:
    """``task/item`` (an id that already starts with its task, as ``boolq/2396``, is used as it is)."""
    return item_id if item_id.startswith(f"{task}/") else f"{task}/{item_id}"


def _piece_offsets(v: Verdict) -> list[list[int]]:
    """Where each kept piece lies in the joined text (pieces joined with two characters, ``\\n\\n``)."""
    out, at = [], 0
    for s, e in v.pieces:
        out.append([at, at + (e - s)])
        at += (e - s) + 2
    return out


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------

def decontaminate(cfg: DecontamConfig, benchmark: BenchmarkIndex | Iterable[tuple[str, str, str]],
                  in_dir: str | Path, out_dir: str | Path) -> dict:
    """Decontaminate ``in_dir/kept`` against ``benchmark`` (an index, or ``(task, item_id, text)`` items).

    Writes ``out_dir/kept`` (clean documents untouched, cut documents under their id) and
    ``out_dir/rejected`` (reason ``contamination``), and returns the step stats with
    ``contamination``: per benchmark ``{"items", "short_items", "docs_dropped", "docs_cut",
    "chars_removed", "matched_items", "item_ids"}``. A document matching several benchmarks counts for
    each of them (its characters removed too).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    t0 = time.perf_counter()
    index = benchmark if isinstance(benchmark, BenchmarkIndex) else build_index(
        benchmark, n=cfg.n, max_item_frequency=cfg.max_item_frequency, tasks=cfg.tasks)
    if index.n != cfg.n:
        raise ValueError(f"decontaminate: the index holds {index.n}-grams but n = {cfg.n}")
    table = {t: {"items": index.tasks.get(t, {}).get("items", 0),
                 "short_items": index.tasks.get(t, {}).get("short_items", 0),
                 "docs_dropped": 0, "docs_cut": 0, "chars_removed": 0, "matched_items": 0}
             for t in cfg.tasks}
    matched: dict[str, set[str]] = {t: set() for t in cfg.tasks}
    totals = {"docs_scanned": 0, "docs_cut": 0, "docs_dropped": 0, "chars_scanned": 0, "chars_removed": 0}
    with ShardWriter(out_dir / KEPT) as kept, ShardWriter(out_dir / REJECTED) as rejected:
        for doc in base.iter_documents(in_dir / KEPT):
            totals["docs_scanned"] += 1
            totals["chars_scanned"] += len(doc.text)
            v = decontaminate_text(doc.text, index, cfg)
            if not v.contaminated:
                kept.write(doc)
                continue
            outcome = "docs_cut" if v.text is not None else "docs_dropped"
            totals[outcome] += 1
            totals["chars_removed"] += v.removed_chars
            for task in dict.fromkeys(index.items[i][0] for i in v.items):
                table.setdefault(task, {"docs_dropped": 0, "docs_cut": 0, "chars_removed": 0, "matched_items": 0})
                table[task][outcome] += 1
                table[task]["chars_removed"] += v.removed_chars
            for i in v.items:
                matched.setdefault(index.items[i][0], set()).add(index.items[i][1])
            if v.text is None:
                rejected.write(base.reject(doc, f"contamination:{_drop_detail(v, index, cfg)}"))
                continue
            doc.metadata["contamination"] = {
                "removed_chars": v.removed_chars,
                "pieces": _piece_offsets(v),
                "items": [_label(*index.items[i]) for i in v.items[:20]],
            }
            doc.text = v.text
            kept.write(doc)
    for d in (KEPT, REJECTED):
        (out_dir / d).mkdir(parents=True, exist_ok=True)
    for task, ids in matched.items():
        table[task]["matched_items"] = len(ids)
        table[task]["item_ids"] = sorted(ids)[:50]
    seconds = time.perf_counter() - t0
    log.info("decontaminate: %d documents, %d cut, %d dropped, %d characters removed (%.1f s)",
             totals["docs_scanned"], totals["docs_cut"], totals["docs_dropped"], totals["chars_removed"], seconds)
    return base.write_step_stats("decontaminate", in_dir, out_dir, seconds, {
        **totals, "contamination": table, "index": index.summary(), "config": cfg.model_dump(mode="json"),
    })


__all__ = ["BENCHMARK_TASKS", "BenchmarkIndex", "DecontamConfig", "Verdict", "benchmark_index", "build_index",
           "decontaminate", "decontaminate_text", "ngram_hashes", "normalise_words",
           "word_spans"]
