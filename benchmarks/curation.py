"""Heuristic-chain throughput: herd's fused ``HeuristicFilter`` vs datatrove's stock chain.

Same documents, same process, one core, run one after the other; prints docs/s/core side by side
and the ratio. Documents are real English text from the ``evals`` wheel (openwebtext, wikipedia,
c4, oscar, quotes, ... samples), cached under ``.herd/cache/``.

    .venv/bin/python benchmarks/curation.py [--docs 3000] [--repeat 1]
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=0, help="number of documents (0 = all ~2,400)")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the documents")
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
    return r


if __name__ == "__main__":
    main()
