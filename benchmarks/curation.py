"""Curation throughput against stock datatrove, side by side, one core each.

1. Heuristic chain: herd's fused ``HeuristicFilter`` vs datatrove's stock chain
   (GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality), same documents, same process,
   CPU time. Documents: real text from the ``evals`` wheel, cached under ``.herd/cache/``.
2. Whole flow (``--flow``): herd's curation chain as the flow runs it (content-addressed step
   folders, kept/rejected shards, stats per step) vs one stock datatrove pipeline of the same filters
   (URLFilter, LanguageFilter, the stock heuristic chain, the same NSFW filter, PIIFormatter, with an
   exclusion writer per filter, then datatrove's four MinHash stages), on the same ingested demo
   corpus, both through datatrove's LocalPipelineExecutor with one task and one worker (in-process).
   herd-only steps (exact and semantic dedup, quality classifier) are timed and listed separately.

    .venv/bin/python benchmarks/curation.py [--docs 3000] [--repeat 1] [--flow] [--flow-docs 2000]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.curation")

EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
EVALS_FILES = {
    "evals/registry/data/text_compression/samples.jsonl": "text",
    "evals/registry/data/schelling_point/owt_5.jsonl": "0",
    "evals/registry/data/schelling_point/wikipedia_5.jsonl": "0",
}


def evals_wheel(cache_dir: Path) -> Path:
    """The cached ``evals`` wheel, fetched with ``pip download --no-deps`` when missing."""
    wheel = cache_dir / EVALS_WHEEL
    if not wheel.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "evals==3.0.1.post1", "-d",
                        str(cache_dir), "-q"], check=True)
    return wheel


def load_real_texts(cache_dir: Path = ROOT / ".herd" / "cache") -> list[dict]:
    """``[{"text", "kind"}]`` real documents from the evals wheel (2,400 of them)."""
    out = []
    with zipfile.ZipFile(evals_wheel(cache_dir)) as zf:
        for name, key in EVALS_FILES.items():
            with zf.open(name) as fh:
                for line in io.TextIOWrapper(fh, encoding="utf-8"):
                    rec = json.loads(line)
                    text = rec.get(key)
                    if isinstance(text, str) and text:
                        out.append({"text": text, "kind": rec.get("type") or Path(name).stem})
    return out


def bench(docs: list[dict], n_repeat: int = 1) -> dict:
    from datatrove.data import Document

    from stages.curation.filters import HeuristicConfig, run_stock_chain, stock_heuristic_chain

    cfg = HeuristicConfig()
    fused = cfg.build()
    stock = stock_heuristic_chain(cfg)

    def make():
        return [Document(text=d["text"], id=str(i), metadata={"source": "web"}) for i, d in enumerate(docs)]

    # warm-up (spaCy/tokenizer load) on both
    for d in make()[:20]:
        fused.filter(copy.deepcopy(d))
        run_stock_chain(stock, d)
    t_stock = t_fused = 0.0
    agree = 0
    for _ in range(n_repeat):
        a, b = make(), make()
        t0 = time.process_time()
        res_stock = [run_stock_chain(stock, d) for d in a]
        t_stock += time.process_time() - t0
        t0 = time.process_time()
        res_fused = [fused.filter(d) for d in b]
        t_fused += time.process_time() - t0
        agree = sum(ra == rb and da.text == db.text for ra, rb, da, db in zip(res_stock, res_fused, a, b))
    n = len(docs) * n_repeat
    kept = sum(r is True for r in res_fused)
    return {"docs": len(docs), "kept": kept, "agree": agree,
            "stock_docs_per_s_core": n / t_stock, "fused_docs_per_s_core": n / t_fused, "ratio": t_stock / t_fused}


def _stock_flow(in_dir: Path, out: Path, cache: Path, nsfw_cfg, minhash_cfg) -> float:
    """Stock datatrove: one pipeline of the same filters + datatrove MinHash; returns wall seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import URLFilter
    from datatrove.pipeline.filters.language_filter import LanguageFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from fasttext.FastText import _FastText

    from stages.curation.assets import lid176_path
    from stages.curation.filters import HeuristicConfig, stock_heuristic_chain

    def excl(name):
        return JsonlWriter(str(out / "rejected" / name), compression=None)

    t0 = time.perf_counter()
    from datatrove.utils.lid import FT176LID

    class LocalFT176(FT176LID):  # datatrove would download lid.176; load the same local model lazily
        @property
        def model(self):
            if self._model is None:
                self._model = _FastText(str(lid176_path()))
            return self._model

    lang = LanguageFilter(languages=["en"], exclusion_writer=excl("language"))
    lang.model = LocalFT176(["en"])
    heur = stock_heuristic_chain(HeuristicConfig())
    for f in heur:
        f.exclusion_writer = excl(type(f).__name__)
    nsfw = nsfw_cfg.build(cache)
    nsfw.exclusion_writer = excl("nsfw")
    class StockURLFilter(URLFilter):  # stock URLFilter asserts every document has a URL; ours lets URL-less ones pass
        def filter(self, doc):
            return True if not doc.metadata.get("url") else super().filter(doc)

    pipeline = [JsonlReader(str(in_dir), glob_pattern="*.jsonl"), StockURLFilter(exclusion_writer=excl("url")), lang,
                *heur, nsfw, PIIFormatter(), JsonlWriter(str(out / "filtered"), compression=None)]
    LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(out / "logs" / "filter")).run()
    mh = MinhashConfig(num_buckets=minhash_cfg.lsh_params()[0], hashes_per_bucket=minhash_cfg.lsh_params()[1],
                       n_grams=minhash_cfg.n_grams) if hasattr(minhash_cfg, "lsh_params") else MinhashConfig()
    sig, buck, clus = out / "mh" / "sig", out / "mh" / "buckets", out / "mh" / "clusters"
    for name, steps, tasks in (
        ("sig", [JsonlReader(str(out / "filtered")), MinhashDedupSignature(str(sig), config=mh)], 1),
        ("buckets", [MinhashDedupBuckets(str(sig), str(buck), config=mh)], mh.num_buckets),
        ("cluster", [MinhashDedupCluster(str(buck), str(clus), config=mh)], 1),
        ("filter", [JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(clus), exclusion_writer=excl("near")),
                    JsonlWriter(str(out / "kept"), compression=None)], 1),
    ):
        LocalPipelineExecutor(steps, tasks=tasks, workers=1, logging_dir=str(out / "logs" / name)).run()
    return time.perf_counter() - t0


def bench_flow(n_docs: int, work: Path) -> dict:
    """herd's chain (as the flow runs it) vs a stock datatrove pipeline; docs/s on one core each."""
    import shutil

    from stages.common import atomic_dir
    from stages.curation.base import ExecutorConfig
    from stages.curation.ingest import IngestConfig, ingest
    from stages.curation.pipeline import CurationConfig, StepContext, run_step
    from stages.curation.quality import train_quality_classifier
    from stages.data.fetch import fetch_corpus, tiny_fetch

    cache = ROOT / ".herd" / "cache"
    corpus = fetch_corpus(tiny_fetch(), cache, work / "corpus")
    files = sorted((work / "corpus").glob("*.jsonl.gz"))
    cfg = CurationConfig()
    # the stock chain runs the prose rules on every document: so does herd here, for the same work
    cfg = cfg.derive(executor=ExecutorConfig(tasks=1, workers=1).model_dump(),
                     ingest=IngestConfig(shards=1).model_dump(),
                     heuristics=cfg.heuristics.derive(prose_sources=None, code_sources=[]).model_dump())
    # the same documents for both: ingest once, optionally capped
    shutil.rmtree(work / "ingest", ignore_errors=True)
    ingest(cfg.ingest, files, work / "ingest")
    shard = next((work / "ingest" / "kept").glob("*.jsonl"))
    lines = shard.read_text().splitlines()
    if n_docs and n_docs < len(lines):
        step = len(lines) / n_docs
        lines = [lines[int(i * step)] for i in range(n_docs)]
        shard.write_text("\n".join(lines) + "\n")
    n = len(lines)
    (work / "ingest" / "stats.json").write_text(json.dumps({"in": n}))

    stock_s = _stock_flow(work / "ingest" / "kept", work / "stock", cache, cfg.nsfw, cfg.near_dedup)

    ctx_dir = work / "herd"
    shutil.rmtree(ctx_dir, ignore_errors=True)
    timings = {}
    prev = work / "ingest"
    clf = work / "clf"
    if not (clf / "model.bin").exists():
        pos = [f for f in files if any(k in f.name for k in ("wikipedia", "gcide", "wordnet", "python_docs"))]
        neg = [f for f in files if any(k in f.name for k in ("spamassassin", "junk", "owt", "c4"))]
        train_quality_classifier(cfg.quality, pos, neg, clf)
    ctx = StepContext(cache_dir=cache, classifier_path=clf / "model.bin")
    for name in ("url", "language", "heuristics", "nsfw", "pii", "exact_dedup", "near_dedup", "semantic_dedup",
                 "quality"):
        t0 = time.perf_counter()
        with atomic_dir(ctx_dir / name) as tmp:
            stats = run_step(name, cfg, prev, tmp, ctx)
        timings[name] = (time.perf_counter() - t0, stats["in"], stats["kept"])
        prev = ctx_dir / name
    comparable = ("url", "language", "heuristics", "nsfw", "pii", "near_dedup")
    herd_s = sum(timings[k][0] for k in comparable)
    from stages.curation.base import iter_shard_records

    # documents surviving the per-document filters (before MinHash, which is datatrove's code in both)
    stock_kept = sorted(r["id"] for r in iter_shard_records(work / "stock" / "filtered"))
    herd_kept = sorted(r["id"] for r in iter_shard_records(ctx_dir / "pii" / "kept"))
    return {"docs": n, "stock_s": stock_s, "herd_s": herd_s, "timings": timings, "corpus_docs": corpus.docs_total,
            "stock_docs_per_s_core": n / stock_s, "herd_docs_per_s_core": n / herd_s, "ratio": stock_s / herd_s,
            "same_kept": stock_kept == herd_kept, "stock_kept": len(stock_kept), "herd_kept": len(herd_kept)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=0, help="number of documents (0 = all ~2,400)")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the documents")
    ap.add_argument("--flow", action="store_true", help="also compare the whole curation flow with stock datatrove")
    ap.add_argument("--flow-docs", type=int, default=0, help="documents for --flow (0 = the whole tiny demo corpus)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:  # one core
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass
    docs = load_real_texts()
    if args.docs:
        docs = (docs * (args.docs // len(docs) + 1))[: args.docs]
    r = bench(docs, args.repeat)
    log.info("heuristic chain (gopher_rep -> gopher_quality -> c4 -> fineweb), %d real docs, 1 core, CPU time", r["docs"])
    log.info("  %-34s %10s", "implementation", "docs/s/core")
    log.info("  %-34s %10.1f", "datatrove stock chain", r["stock_docs_per_s_core"])
    log.info("  %-34s %10.1f", "herd fused HeuristicFilter", r["fused_docs_per_s_core"])
    log.info("  ratio fused/stock: %.2fx   identical decisions+text: %d/%d   kept: %d",
             r["ratio"], r["agree"], r["docs"], r["kept"])
    if args.flow:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
            f = bench_flow(args.flow_docs, Path(tmp))
        log.info("")
        log.info("whole curation flow, %d demo documents, 1 core, wall time", f["docs"])
        log.info("  %-58s %10s", "implementation", "docs/s/core")
        log.info("  %-58s %10.1f", "stock datatrove (url, lid, heuristics, nsfw, pii, minhash)", f["stock_docs_per_s_core"])
        log.info("  %-58s %10.1f", "herd flow steps (same filters, per-step folders + stats)", f["herd_docs_per_s_core"])
        log.info("  ratio herd/stock: %.2fx   same documents pass the filters: %s (stock %d, herd %d)", f["ratio"],
                 f["same_kept"], f["stock_kept"], f["herd_kept"])
        log.info("  per herd step (seconds, in -> kept, docs/s):")
        for name, (sec, n_in, n_kept) in f["timings"].items():
            log.info("    %-16s %7.1f s  %6d -> %6d  %8.1f", name, sec, n_in, n_kept, n_in / sec if sec else 0)
        r["flow"] = f
    return r


if __name__ == "__main__":
    main()
