"""fastText quality classifier (Llama 1 / CCNet): reference-like pages vs random web, then a filter step.

``train_quality_classifier`` fits a supervised fastText model on positive (reference: Wikipedia,
books...) vs negative (random or spammy web) JSONL records, with a hash-based held-out split on
``id``, and writes ``model.bin`` + ``metrics.json``. ``quality_filter`` scores every document of
the sources in ``apply_to_sources`` (``metadata["quality_score"]`` = P(positive)) and drops those
below the threshold with reason ``quality``; documents of other sources pass untouched.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from stages.common import StageConfig, file_sha256, iter_jsonl, write_json_atomic
from stages.curation import base
from stages.curation.base import KEPT, ExecutorConfig
from stages.errors import DataValidationError, MissingAssetError

log = logging.getLogger(__name__)

POSITIVE = "__label__hq"
NEGATIVE = "__label__lq"


class QualityConfig(StageConfig):
    """Training and application of the fastText quality classifier."""

    enabled: bool = Field(True, description="run the quality classifier step")
    retrain: bool = Field(False, description="train and register a new classifier even when a registered version "
                          "was trained with the same training config and data")
    classifier_version: int | None = Field(None, ge=1, description="use this registered version of the classifier "
                                           "(e.g. one trained elsewhere); None = the latest version trained with this "
                                           "training config and data, training one if there is none")

    positive_sources: list[str] = Field(["reference"], description="source labels / datasets used as the positive "
                                        "(reference-quality) class; the task layer resolves them to files")
    negative_sources: list[str] = Field(["web"], description="source labels / datasets used as the negative "
                                        "(random or spammy web) class")
    epochs: int = Field(10, ge=1, description="fastText epoch")
    lr: float = Field(0.5, gt=0, description="fastText learning rate (lr)")
    word_ngrams: int = Field(2, ge=1, le=5, description="fastText wordNgrams")
    dim: int = Field(64, ge=2, description="fastText embedding dimension (dim)")
    min_count: int = Field(1, ge=1, description="fastText minCount")
    bucket: int = Field(200_000, ge=1000, description="fastText hash buckets for word n-grams (bucket)")
    max_chars: int = Field(4000, ge=100, description="characters of each text used for training and scoring")
    threshold: float | None = Field(0.5, ge=0.0, le=1.0, description="drop documents with P(positive) below this "
                                    "(set to None when keep_top_fraction is used)")
    keep_top_fraction: float | None = Field(None, gt=0.0, le=1.0, description="instead of a threshold: keep this "
                                            "top fraction of the scored documents (threshold computed from scores)")
    apply_to_sources: list[str] = Field(["web"], description="metadata.source values scored and filtered; "
                                        "documents of other sources pass untouched")
    seed: int = Field(0, description="fastText seed and training-order shuffle seed")
    held_out_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of records (hash of id) held out "
                                     "for metrics")

    @model_validator(mode="after")
    def _check(self) -> QualityConfig:
        if (self.threshold is None) == (self.keep_top_fraction is None):
            raise ValueError("threshold/keep_top_fraction: set exactly one of them (the other to None)")
        if not self.apply_to_sources:
            raise ValueError("apply_to_sources: name at least one source to filter")
        return self


_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"([.,!?;:()\[\]{}\"<>/=])")


def fasttext_text(text: str, max_chars: int) -> str:
    """One-line, lowercased, punctuation-split text as the classifier sees it."""
    text = _PUNCT.sub(r" \1 ", text[:max_chars].lower())
    return _WS.sub(" ", text).strip()


def held_out(doc_id: Any, fraction: float) -> bool:
    """Stable hash split on ``id``: the same id is always on the same side."""
    h = int.from_bytes(hashlib.blake2b(f"quality-split:{doc_id}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def _order_key(doc_id: Any, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()


def iter_jsonl_records(path: Path) -> Iterator[dict]:
    """``{"id", "text", ...}`` records of a JSONL(.gz) file, or of every shard in a folder."""
    path = Path(path)
    files = base.shard_files(path) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            raise MissingAssetError(f"quality: input file {file} does not exist")
        for n, rec in iter_jsonl(file):
            for key in ("id", "text"):
                if key not in rec:
                    raise DataValidationError("missing key", file=str(file), line=n, field=key)
            yield rec


def _binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    tp = int(np.sum(y_true & y_pred))
    fp = int(np.sum(~y_true & y_pred))
    fn = int(np.sum(y_true & ~y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / max(1, len(y_true)),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _load_model(path: str | Path):
    import fasttext

    fasttext.FastText.eprint = lambda *a, **k: None  # silence the load_model warning
    return fasttext.load_model(str(path))


def positive_probability(model, texts: list[str]) -> np.ndarray:
    """P(positive) per (already fastText-normalised) text."""
    if not texts:
        return np.zeros(0, dtype=np.float64)
    labels, probs = model.predict(texts, k=-1)
    out = np.zeros(len(texts), dtype=np.float64)
    for i, (lab, pr) in enumerate(zip(labels, probs)):
        for name, p in zip(lab, pr):
            if name == POSITIVE:
                out[i] = min(1.0, max(0.0, float(p)))
    return out


def _train_fasttext(train_file: str, model_path: str, kwargs: dict) -> None:
    """Train and save a supervised fastText model (runs in a spawned process; see train_quality_classifier)."""
    import fasttext

    fasttext.train_supervised(input=train_file, **kwargs).save_model(model_path)


def train_quality_classifier(cfg: QualityConfig, positives: list[Path], negatives: list[Path],
                             out_dir: str | Path) -> dict:
    """Train the classifier; writes ``out_dir/model.bin`` and ``out_dir/metrics.json``; returns the metrics."""
    import fasttext

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = [], []
    seen: set[tuple[str, str]] = set()
    for label, paths in ((POSITIVE, positives), (NEGATIVE, negatives)):
        for path in sorted(Path(p) for p in paths):
            for rec in iter_jsonl_records(path):
                text = fasttext_text(rec["text"], cfg.max_chars)
                if not text:
                    continue
                key = (label, str(rec["id"]))
                if key in seen:
                    continue
                seen.add(key)
                (test if held_out(rec["id"], cfg.held_out_fraction) else train).append((rec["id"], label, text))
    for name, rows in (("train", train), ("held-out", test)):
        if {r[1] for r in rows} != {POSITIVE, NEGATIVE}:
            raise DataValidationError(f"quality: the {name} split needs both positive and negative records "
                                      f"(got {len(rows)} records); add data or change held_out_fraction")
    train.sort(key=lambda r: _order_key(r[0], cfg.seed))
    train_file = out_dir / "train.txt"
    train_file.write_text("".join(f"{label} {text}\n" for _, label, text in train), encoding="utf-8")
    model_path = out_dir / "model.bin"
    kwargs = dict(epoch=cfg.epochs, lr=cfg.lr, wordNgrams=cfg.word_ngrams, dim=cfg.dim, minCount=cfg.min_count,
                  bucket=cfg.bucket, loss="softmax", thread=1, seed=cfg.seed, verbose=0)
    # A fresh process: in one that has run a large torch model, fastText's training reads reused heap
    # memory and hits NaN ("Encountered NaN"); a spawned interpreter trains from a clean heap.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_train_fasttext, str(train_file), str(model_path), kwargs).result()
    train_file.unlink()
    model = fasttext.load_model(str(model_path))
    threshold = cfg.threshold if cfg.threshold is not None else 0.5
    scores = positive_probability(model, [t for _, _, t in test])
    y_true = np.array([lab == POSITIVE for _, lab, _ in test])
    metrics = {
        **_binary_metrics(y_true, scores >= threshold),
        "threshold": threshold,
        "n_train": len(train),
        "n_test": len(test),
        "n_train_positive": sum(1 for r in train if r[1] == POSITIVE),
        "n_test_positive": int(y_true.sum()),
        "seconds": round(time.perf_counter() - t0, 3),
        "model_sha256": file_sha256(model_path),
        "config": cfg.model_dump(mode="json"),
    }
    try:
        from sklearn.metrics import roc_auc_score

        metrics["auc"] = float(roc_auc_score(y_true, scores))
    except ValueError:
        metrics["auc"] = None
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("quality classifier: held-out precision=%.3f recall=%.3f f1=%.3f (n_test=%d)", metrics["precision"],
             metrics["recall"], metrics["f1"], metrics["n_test"])
    return {**metrics, "model_path": str(model_path), "metrics_path": str(out_dir / "metrics.json")}


def make_quality_filter(model_path: str | Path, threshold: float, apply_to_sources: list[str], max_chars: int):
    """A datatrove filter writing ``metadata["quality_score"]`` and dropping scores below ``threshold``."""
    from datatrove.pipeline.filters.base_filter import BaseFilter

    class _QualityFilter(BaseFilter):
        name = "🏅 fastText quality"

        def __init__(self) -> None:
            super().__init__()
            self.model_path, self.threshold = str(model_path), float(threshold)
            self.sources, self.max_chars = frozenset(apply_to_sources), max_chars
            self._model = None

        @property
        def model(self):
            if self._model is None:
                self._model = _load_model(self.model_path)
            return self._model

        def __getstate__(self):  # fastText models do not pickle; workers reload from model_path
            state = dict(self.__dict__)
            state["_model"] = None
            return state

        def filter(self, doc) -> bool | tuple[bool, str]:
            if doc.metadata.get("source") not in self.sources:
                return True
            score = float(positive_probability(self.model, [fasttext_text(doc.text, self.max_chars)])[0])
            doc.metadata["quality_score"] = round(score, 6)
            if score < self.threshold:
                return False, f"quality:score={score:.4f}<{self.threshold:.4f}"
            return True

    return _QualityFilter()


def score_threshold_for_fraction(scores: np.ndarray, keep_top_fraction: float) -> float:
    """Smallest score among the top ``keep_top_fraction`` of ``scores`` (ties may keep slightly more)."""
    if len(scores) == 0:
        return 0.0
    k = max(1, int(round(keep_top_fraction * len(scores))))
    return float(np.sort(scores)[::-1][k - 1])


def quality_filter(cfg: QualityConfig, model_path: str | Path, in_dir: str | Path, out_dir: str | Path,
                   executor: ExecutorConfig) -> dict:
    """Score and filter ``in_dir/kept`` with the trained classifier (datatrove filter step)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise MissingAssetError(f"quality: model {model_path} does not exist; run train_quality_classifier first")
    threshold = cfg.threshold
    extra: dict[str, Any] = {"model_sha256": file_sha256(model_path)}
    if cfg.keep_top_fraction is not None:
        model = _load_model(model_path)
        sources = set(cfg.apply_to_sources)
        scores = positive_probability(model, [fasttext_text(r["text"], cfg.max_chars)
                                              for r in base.iter_shard_records(Path(in_dir) / KEPT)
                                              if (r.get("metadata") or {}).get("source") in sources])
        threshold = score_threshold_for_fraction(scores, cfg.keep_top_fraction)
        extra.update(scored=len(scores), keep_top_fraction=cfg.keep_top_fraction)
    assert threshold is not None
    extra["threshold"] = threshold

    def make():
        f = make_quality_filter(model_path, threshold, cfg.apply_to_sources, cfg.max_chars)
        _ = f.model  # load once here; fork-started workers share it
        return f

    stats = base.run_filter_step(make, in_dir, out_dir, executor, "quality_filter")
    stats.update(extra)
    write_json_atomic(Path(out_dir) / base.STATS, stats)
    return stats


__all__ = ["QualityConfig", "train_quality_classifier", "quality_filter", "make_quality_filter",
           "positive_probability", "fasttext_text", "held_out", "score_threshold_for_fraction"]
