"""Tokenizer: train a byte-level BPE (Llama 3 style), measure compression, tokenize a corpus into shards.

* ``train_tokenizer`` trains a byte-level BPE with the ``tokenizers`` library on (a deterministic,
  capped sample of) the mixture, with the chat specials first so their ids are fixed ``0..k-1``, and
  saves it as a ``transformers.PreTrainedTokenizerFast`` (with a Llama 3 chat template) that
  ``AutoTokenizer.from_pretrained(dir)`` loads offline.
* ``compression`` reports characters per token per source (Llama 3 went from 3.17 to 3.94 chars/token
  with its tokenizer change).
* ``tokenize_corpus`` writes ``<split>/tokens.bin`` + ``doc_offsets.npy`` + ``doc_sources.npy`` +
  ``sources.json`` for the ``train`` and ``heldout`` splits, keeping document boundaries (every document
  is ``[bos] + tokens + [eos]``); ``TokenShard`` reads them back (memory-mapped).

Inputs are the mix step's ``DIR/data/*.jsonl.gz``, curated ``DIR/kept/*.jsonl.gz``, plain ``*.jsonl``
files or folders of them; one JSON object per line with ``text`` and ``source`` (or ``metadata.source``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from stages.common import (
    NULL_SINK,
    MetricsSink,
    StageConfig,
    atomic_dir,
    config_hash,
    file_sha256,
    iter_jsonl,
    read_manifest,
    write_json_atomic,
)
from stages.errors import DataValidationError, MissingAssetError

log = logging.getLogger(__name__)

BOS, EOS, START_HEADER, END_HEADER, EOT, PAD = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>")
DEFAULT_SPECIALS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD)

# Llama 3's pre-tokenization regex (tiktoken cl100k style): contractions, letter runs, 1-3 digit groups,
# punctuation runs, newlines and whitespace. Applied before the byte-level mapping.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3 (Instruct) chat template. Assistant turns are wrapped in ``{% generation %}`` so SFT can ask
# transformers for ``return_assistant_tokens_mask=True``; the header + content + <|eot_id|> layout is
# exactly Llama 3's.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPLITS = ("train", "heldout")
_REPEAT_SUFFIX = re.compile(r"#\d+$")


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

class TokenizerConfig(StageConfig):
    """Byte-level BPE training (Llama 3 style pre-tokenizer, chat specials with fixed ids 0..k-1)."""

    vocab_size: int = Field(8192, description="total vocabulary size including the 256 byte tokens and the "
                                              "special tokens (Llama 3: 128256)")
    min_frequency: int = Field(2, description="a pair must occur at least this often to be merged")
    max_train_chars: int = Field(50_000_000, description="cap on training text (characters); documents are "
                                                         "taken in a seeded hash order of their id until the cap")
    special_tokens: tuple[str, ...] = Field(DEFAULT_SPECIALS, description="special tokens, given ids 0..k-1 in "
                                            "this order; must include the Llama 3 chat specials and <|pad|>")
    seed: int = Field(0, description="seed of the training-document selection order")

    @field_validator("vocab_size")
    @classmethod
    def _vocab(cls, v: int) -> int:
        if not 256 < v <= 2**32:
            raise ValueError(f"vocab_size={v}: must exceed the 256 byte tokens (and fit in uint32)")
        return v

    @field_validator("min_frequency")
    @classmethod
    def _minf(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"min_frequency={v}: must be >= 1")
        return v

    @field_validator("max_train_chars")
    @classmethod
    def _maxc(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_train_chars={v}: must be >= 1")
        return v

    @field_validator("special_tokens")
    @classmethod
    def _specials(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        missing = [t for t in DEFAULT_SPECIALS if t not in v]
        if missing:
            raise ValueError(f"special_tokens: missing {missing}: the SFT chat format needs all of "
                              f"{list(DEFAULT_SPECIALS)}")
        if len(set(v)) != len(v) or any(not t for t in v):
            raise ValueError("special_tokens: must be unique and non-empty")
        return v


class TokenizeConfig(StageConfig):
    """Corpus -> token shards (train / heldout) that keep document boundaries."""

    heldout_fraction: float = Field(0.02, description="fraction of documents (hash of the id, repeat suffix "
                                                      "'#N' stripped) sent to the heldout split")
    heldout_min_docs: int = Field(1, ge=0, description="hold out at least this many documents of every source "
                                  "(lowest hashes first; never more than half of a source's documents), so the "
                                  "held-out loss is reported per source")
    add_bos: bool = Field(False, description="prepend <|begin_of_text|> to every document (eos is always appended)")
    batch_docs: int = Field(1024, description="documents per encode_batch call (Rust, parallel)")
    seed: int = Field(0, description="salt of the heldout hash")

    @field_validator("heldout_fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"heldout_fraction={v}: must be in [0, 1)")
        return v

    @field_validator("batch_docs")
    @classmethod
    def _batch(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"batch_docs={v}: must be >= 1")
        return v


# ---------------------------------------------------------------------------------------------
# reading documents
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    source: str


def input_files(inputs: list[Path]) -> list[Path]:
    """Sorted JSONL(.gz) files of ``inputs``: files, folders, or folders with ``data/`` (mix) or ``kept/``."""
    files: set[Path] = set()
    for p in map(Path, inputs):
        if p.is_file():
            files.add(p)
            continue
        if not p.is_dir():
            raise DataValidationError("input does not exist", file=str(p))
        folder = next((p / s for s in ("data", "kept") if (p / s).is_dir()), p)
        found = [*folder.glob("*.jsonl"), *folder.glob("*.jsonl.gz")]
        if not found:
            raise DataValidationError(f"no *.jsonl / *.jsonl.gz files in {folder}", file=str(p))
        files.update(found)
    return sorted(files)


def iter_docs(inputs: list[Path]) -> Iterator[Doc]:
    """Every document of ``inputs`` in sorted file order, line order."""
    for path in input_files(inputs):
        for n, rec in iter_jsonl(path):
            text = rec.get("text")
            if not isinstance(text, str):
                raise DataValidationError("record has no string text", file=str(path), line=n, field="text")
            src = rec.get("source") or (rec.get("metadata") or {}).get("source")
            if not src:
                raise DataValidationError("record has no source (top-level 'source' or metadata.source)",
                                          file=str(path), line=n, field="source")
            yield Doc(str(rec.get("id", f"{path.name}:{n}")), text, str(src))


def base_id(doc_id: str) -> str:
    """Strip the mix step's repeat suffix (``id#2`` -> ``id``) so repeats share one identity."""
    return _REPEAT_SUFFIX.sub("", doc_id)


def _unit_hash(*parts: Any) -> float:
    """Stable hash of ``parts`` mapped to [0, 1)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def select_training_docs(cfg: TokenizerConfig, inputs: list[Path]) -> tuple[list[str], int]:
    """Texts for tokenizer training: unique documents (repeats dropped) in seeded hash order, capped at
    ``max_train_chars`` (the document crossing the cap is truncated). Returns ``(texts, chars)``."""
    keyed: dict[str, tuple[float, str]] = {}
    for doc in iter_docs(inputs):
        b = base_id(doc.id)
        if b not in keyed and doc.text:
            keyed[b] = (_unit_hash(cfg.seed, b), doc.text)
    texts, chars = [], 0
    for _, (_, text) in sorted(keyed.items(), key=lambda kv: (kv[1][0], kv[0])):
        take = text[: cfg.max_train_chars - chars]
        texts.append(take)
        chars += len(take)
        if chars >= cfg.max_train_chars:
            break
    return texts, chars


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def _build_bpe(cfg: TokenizerConfig):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer, processors


def train_tokenizer(cfg: TokenizerConfig, inputs: list[Path], out_dir: Path, *,
                    sink: MetricsSink = NULL_SINK) -> dict:
    """Train a byte-level BPE on ``inputs`` and save it as a Hugging Face fast tokenizer in ``out_dir``.

    Special tokens get ids ``0..k-1`` in ``cfg.special_tokens`` order; bos = <|begin_of_text|> (added
    by the post-processor, as Llama 3 does), eos = <|end_of_text|>, pad = <|pad|>; a Llama 3 chat
    template is attached. Reruns with a complete manifest of the same config + inputs return it.

    Returns ``{"vocab_size", "path", "sha256" (of tokenizer.json), "train_chars", "seconds"}``.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    files = input_files(inputs)
    key = config_hash(cfg, [file_sha256(f) for f in files])
    done = read_manifest(out_dir)
    if done and done.get("key") == key:
        log.info("tokenizer in %s is complete (key %s); reusing it", out_dir, key)
        return done["result"]

    t0 = time.perf_counter()
    texts, chars = select_training_docs(cfg, files)
    if not texts:
        raise DataValidationError("no documents with text to train the tokenizer on (an empty mixture? see the mix "
                                  "step's table.json)", file=", ".join(str(f) for f in files))
    tok, trainer, processors = _build_bpe(cfg)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(cfg.special_tokens):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[t for t in cfg.special_tokens if t not in (BOS, EOS, PAD)],
        clean_up_tokenization_spaces=False, model_max_length=1_000_000_000, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    seconds = time.perf_counter() - t0

    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
        result = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "path": str(out_dir),
                  "sha256": file_sha256(tmp / "tokenizer.json"), "train_chars": chars,
                  "train_docs": len(texts), "seconds": round(seconds, 3)}
        write_json_atomic(tmp / "manifest.json", {"key": key, "config": cfg.model_dump(mode="json"),
                                                  "inputs": [str(f) for f in files], "result": result})
    log.info("trained BPE: vocab %d on %d chars (%d docs) in %.1fs -> %s", result["vocab_size"], chars,
             len(texts), seconds, out_dir)
    sink.log_metrics({"tokenizer/vocab_size": result["vocab_size"], "tokenizer/train_chars": chars,
                      "tokenizer/seconds": seconds})
    return result


def _encode_batch(tok, texts: list[str]) -> list:
    """``encode_batch`` without offset tracking where the library has it (~20% faster), no specials added."""
    fast = getattr(tok, "encode_batch_fast", None)
    return (fast or tok.encode_batch)(texts, add_special_tokens=False)


def load_tokenizer(tokenizer_dir: Path):
    """The raw ``tokenizers.Tokenizer`` of a saved tokenizer folder (fast batch encoding)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise MissingAssetError(f"{path} not found: train the tokenizer first (train_tokenizer)")
    return Tokenizer.from_file(str(path))


# ---------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------

def compression(tokenizer_dir: Path, inputs: list[Path], max_docs_per_source: int = 1000,
                batch_docs: int = 256) -> dict[str, dict[str, float]]:
    """Characters per token per source (first ``max_docs_per_source`` unique documents of each, in file
    order) plus an ``"all"`` row. Tokens exclude bos/eos. Row: ``{"chars", "tokens", "chars_per_token", "docs"}``."""
    tok = load_tokenizer(tokenizer_dir)
    rows: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    batch: list[Doc] = []

    def flush() -> None:
        encs = _encode_batch(tok, [d.text for d in batch])
        for d, e in zip(batch, encs):
            r = rows.setdefault(d.source, {"chars": 0, "tokens": 0, "docs": 0})
            r["chars"] += len(d.text)
            r["tokens"] += len(e.ids)
            r["docs"] += 1
        batch.clear()

    counts: dict[str, int] = {}
    for doc in iter_docs(inputs):
        b = base_id(doc.id)
        if b in seen or counts.get(doc.source, 0) >= max_docs_per_source:
            continue
        seen.add(b)
        counts[doc.source] = counts.get(doc.source, 0) + 1
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    out = {s: rows[s] for s in sorted(rows)}
    out["all"] = {k: sum(r[k] for r in rows.values()) for k in ("chars", "tokens", "docs")}
    for r in out.values():
        r["chars_per_token"] = round(r["chars"] / r["tokens"], 4) if r["tokens"] else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# tokenizing a corpus into shards
# ---------------------------------------------------------------------------------------------

def split_of(doc_id: str, heldout_fraction: float, seed: int = 0) -> str:
    """``"heldout"`` or ``"train"`` from a stable hash of the id with its repeat suffix stripped."""
    return "heldout" if _unit_hash("heldout", seed, base_id(doc_id)) < heldout_fraction else "train"


def heldout_ids(cfg: TokenizeConfig, files: list[Path]) -> set[str]:
    """Base ids of the held-out documents: ``split_of`` per id, topped up per source to ``heldout_min_docs``.

    One pass over the ids (repeats of a document share its base id, so all copies land in one split).
    ``heldout_fraction == 0`` holds nothing out.
    """
    if cfg.heldout_fraction == 0:
        return set()
    by_source: dict[str, dict[str, float]] = {}
    for doc in iter_docs(files):
        if doc.text:
            bid = base_id(doc.id)
            by_source.setdefault(doc.source, {})[bid] = _unit_hash("heldout", cfg.seed, bid)
    held: set[str] = set()
    for hashes in by_source.values():
        chosen = {b for b, h in hashes.items() if h < cfg.heldout_fraction}
        want = min(cfg.heldout_min_docs, len(hashes) // 2)
        for b in sorted(hashes, key=hashes.__getitem__):
            if len(chosen) >= want:
                break
            chosen.add(b)
        held |= chosen
    return held


class _SplitWriter:
    def __init__(self, folder: Path, dtype: np.dtype):
        folder.mkdir(parents=True)
        self.folder, self.dtype = folder, dtype
        self.fh = open(folder / "tokens.bin", "wb")
        self.offsets: list[int] = [0]
        self.doc_sources: list[int] = []
        self.sources: list[str] = []
        self._source_index: dict[str, int] = {}
        self.per_source: dict[str, dict[str, int]] = {}

    def add(self, ids: np.ndarray, source: str) -> None:
        self.fh.write(ids.astype(self.dtype, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        if source not in self._source_index:
            self._source_index[source] = len(self.sources)
            self.sources.append(source)
        self.doc_sources.append(self._source_index[source])
        row = self.per_source.setdefault(source, {"docs": 0, "tokens": 0})
        row["docs"] += 1
        row["tokens"] += len(ids)

    def close(self) -> dict:
        self.fh.close()
        np.save(self.folder / "doc_offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.folder / "doc_sources.npy", np.asarray(self.doc_sources, dtype=np.int32))
        (self.folder / "sources.json").write_text(json.dumps(self.sources))
        info = {"docs": len(self.doc_sources), "tokens": self.offsets[-1], "dtype": np.dtype(self.dtype).name,
                "per_source": {s: self.per_source[s] for s in sorted(self.per_source)}}
        (self.folder / "shard.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return info


def tokenize_corpus(cfg: TokenizeConfig, tokenizer_dir: Path, inputs: list[Path], out_dir: Path, *,
                    sink: MetricsSink = NULL_SINK) -> dict:
    """Tokenize every document of ``inputs`` into ``out_dir/{train,heldout}/`` shards; ``manifest.json`` last.

    Each document becomes ``[bos]? + tokens + [eos]``; ``tokens.bin`` (uint16 if the vocabulary fits,
    else uint32) concatenates them, ``doc_offsets.npy`` (int64, n_docs+1) marks boundaries and
    ``doc_sources.npy`` indexes ``sources.json``. Empty documents are skipped (counted). Returns the
    manifest: counts per split and per source, dtype, tokens/s. A complete manifest with the same
    config, tokenizer and inputs is returned without work.
    """
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_dir)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if eos_id is None or (cfg.add_bos and bos_id is None):
        raise MissingAssetError(f"tokenizer in {tokenizer_dir} lacks {EOS} or {BOS}; retrain it with train_tokenizer")
    files = input_files(inputs)
    tok_sha = file_sha256(Path(tokenizer_dir) / "tokenizer.json")
    key = config_hash(cfg, tok_sha, [file_sha256(f) for f in files])
    done = read_manifest(out_dir)
    if done and done.get("key") == key:
        log.info("token shards in %s are complete (key %s); reusing them", out_dir, key)
        return done

    t0 = time.perf_counter()
    skipped_empty = 0
    with atomic_dir(out_dir) as tmp:
        writers = {s: _SplitWriter(tmp / s, dtype) for s in SPLITS}
        prefix = [bos_id] if cfg.add_bos else []
        held = heldout_ids(cfg, files)
        batch: list[Doc] = []

        def flush() -> None:
            encs = _encode_batch(tok, [d.text for d in batch])
            for d, e in zip(batch, encs):
                ids = np.asarray(prefix + e.ids + [eos_id], dtype=np.int64)
                writers["heldout" if base_id(d.id) in held else "train"].add(ids, d.source)
            batch.clear()

        for doc in iter_docs(files):
            if not doc.text:
                skipped_empty += 1
                continue
            batch.append(doc)
            if len(batch) >= cfg.batch_docs:
                flush()
        if batch:
            flush()
        splits = {s: w.close() for s, w in writers.items()}
        inputs_named = ", ".join(str(f) for f in files)
        if not splits["train"]["docs"]:
            held_docs = splits["heldout"]["docs"]
            raise DataValidationError(
                "no documents with text to tokenize (an empty mixture? see the mix step's table.json)" if not held_docs
                else f"all {held_docs} document(s) went to the held-out split, none is left to train on; give more "
                     f"documents or lower heldout_fraction (now {cfg.heldout_fraction})", file=inputs_named)
        seconds = time.perf_counter() - t0
        total = sum(v["tokens"] for v in splits.values())
        manifest = {
            "key": key, "config": cfg.model_dump(mode="json"), "tokenizer_sha256": tok_sha,
            "tokenizer_dir": str(tokenizer_dir), "inputs": [str(f) for f in files], "vocab_size": vocab,
            "dtype": dtype.name, "bos_id": bos_id, "eos_id": eos_id, "splits": splits,
            "tokens": total, "docs": sum(v["docs"] for v in splits.values()), "skipped_empty": skipped_empty,
            "seconds": round(seconds, 3), "tokens_per_s": round(total / seconds, 1) if seconds > 0 else 0.0,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    manifest["path"] = str(out_dir)
    log.info("tokenized %d docs -> %d tokens (train %d, heldout %d) in %.1fs (%.0f tok/s) -> %s",
             manifest["docs"], total, splits["train"]["tokens"], splits["heldout"]["tokens"], seconds,
             manifest["tokens_per_s"], out_dir)
    sink.log_metrics({"tokenize/tokens": total, "tokenize/tokens_per_s": manifest["tokens_per_s"],
                      "tokenize/heldout_tokens": splits["heldout"]["tokens"]})
    return manifest


class TokenShard:
    """One split written by ``tokenize_corpus``: memory-mapped tokens plus document boundaries.

    ``len(shard)`` is the number of documents; ``shard.doc(i)`` the tokens of document ``i`` (with its
    eos, and bos if it was added); ``shard.source(i)`` its source label.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        info_path = self.path / "shard.json"
        if not info_path.is_file():
            raise MissingAssetError(f"{info_path} not found: {self.path} is not a tokenize_corpus split")
        self.info = json.loads(info_path.read_text())
        self.dtype = np.dtype(self.info["dtype"])
        self.doc_offsets: np.ndarray = np.load(self.path / "doc_offsets.npy")
        self.doc_sources: np.ndarray = np.load(self.path / "doc_sources.npy")
        self.sources: list[str] = json.loads((self.path / "sources.json").read_text())
        n = int(self.doc_offsets[-1])
        bin_path = self.path / "tokens.bin"
        if bin_path.stat().st_size != n * self.dtype.itemsize:
            raise DataValidationError(f"tokens.bin holds {bin_path.stat().st_size} bytes, doc_offsets says "
                                      f"{n} tokens of {self.dtype.name}; rerun tokenize_corpus", file=str(bin_path))
        self.tokens: np.ndarray = (np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(n,)) if n
                                   else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.path}")
        i %= len(self)
        return self.tokens[self.doc_offsets[i]: self.doc_offsets[i + 1]]

    def source(self, i: int) -> str:
        return self.sources[int(self.doc_sources[i])]
