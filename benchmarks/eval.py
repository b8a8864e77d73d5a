"""Benchmark scoring speed: herd's scorer (``stages.evaluation.harness.evaluate_model``: each item packed into one
row, its context once and its choices' tokens as a trie, the LM head only where a token is scored) against
lm-eval-harness (``HFLM``, every ``context + continuation`` run in full) on the same model, items, dtype and
threads, side by side, with the score differences. Goal: herd at
least 2x lm-eval's items/s with acc/acc_norm equal within 0.5 points.

    .venv/bin/python benchmarks/eval.py [--model DIR] [--tasks hellaswag,arc_easy,piqa] [--limit 200]
        [--batch-size 16] [--batch-tokens N] [--threads 2] [--dtype float32]

``--model`` defaults to SmolLM2-135M-Instruct under ``$HERD_HOME/models/smollm2-135m`` (``herd models import
smollm2-135m``). Items are herd's seeded ``--limit`` sample of each task; lm-eval reads them as raw rows from local
files through its own task configs (``benchmarks/_lm_eval.py``). herd's time is its per-task time (tokenising,
forwards, metrics); lm-eval's is the time inside ``HFLM.loglikelihood`` (tokenising and forwards; dataset loading
and task building left out). Model loading is excluded on both sides; each side is warmed up on a few items first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._lm_eval import REF_TASKS, make_lm, run_lm_eval  # noqa: E402
from stages.evaluation.benchmarks import load_task  # noqa: E402
from stages.evaluation.harness import HarnessConfig, evaluate_model, sample_items  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", default=",".join(REF_TASKS))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", default="16", help="lm-eval's batch size (an int, or 'auto'); 16 was its fastest on "
                                                   "2 CPU threads (4, 8 within 5%%; 32: 1.3x, 64: 1.6x slower)")
    p.add_argument("--batch-tokens", type=int, default=HarnessConfig().batch_tokens, help="herd's token budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=4, help="items of the first task each side scores first, untimed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    home = Path(os.environ.get("HERD_HOME", ROOT / ".herd"))
    model_dir = Path(args.model or home / "models" / "smollm2-135m")
    if not (model_dir / "config.json").is_file():
        sys.exit(f"no model at {model_dir}: run `herd models import smollm2-135m` first, or pass --model")
    cache = home / "cache"
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = [load_task(n, cache) for n in names]
    batch_size: int | str = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    cfg = HarnessConfig(limit=args.limit, device="cpu", dtype=args.dtype, batch_tokens=args.batch_tokens)

    # herd (warm-up first, untimed)
    evaluate_model(cfg.model_copy(update={"limit": args.warmup}), model_dir, tasks[:1])
    herd, records = evaluate_model(cfg, model_dir, tasks)
    # lm-eval on the very same items
    items = {t.name: sample_items(t.items, cfg.limit, cfg.seed, t.name) for t in tasks}
    lm = make_lm(model_dir, batch_size=batch_size, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        run_lm_eval(lm, {names[0]: items[names[0]][:args.warmup]}, cache, Path(tmp) / "warmup")
        ref = run_lm_eval(lm, items, cache, Path(tmp) / "run")

    params = sum(x.numel() for x in lm.model.parameters())
    print(f"model {model_dir} ({params / 1e6:.1f}M params), {args.dtype}, cpu, {args.threads} threads; "
          f"herd batch_tokens {args.batch_tokens}, lm-eval batch_size {args.batch_size}; --limit {args.limit}")
    head = (f"{'task':<11}{'n':>5}{'herd it/s':>11}{'lm-eval it/s':>14}{'ratio':>7}  {'herd acc/norm':>15}"
            f"{'lm-eval acc/norm':>18}{'diff acc/norm':>16}{'max|dll|':>10}")
    print(head)
    print("-" * len(head))
    tot_h = tot_r = n_all = 0.0
    for name in names:
        h, r = herd["tasks"][name]["metrics"], ref[name]
        hs = herd["timing"][name]["seconds"]
        dll = max(float(np.abs(np.array(rec["loglikelihoods"]) - np.array(ll)).max())
                  for rec, ll in zip(records[name], r["loglikelihoods"]))
        n = herd["tasks"][name]["n"]
        tot_h, tot_r, n_all = tot_h + hs, tot_r + r["seconds"], n_all + n
        print(f"{name:<11}{n:>5}{n / hs:>11.2f}{r['items_per_s']:>14.2f}{r['seconds'] / hs:>6.2f}x  "
              f"{h['acc']:>7.3f}/{h['acc_norm']:.3f}{r['acc']:>10.3f}/{r['acc_norm']:.3f}"
              f"{h['acc'] - r['acc']:>+8.3f}/{h['acc_norm'] - r['acc_norm']:+.3f}{dll:>10.1e}")
    print(f"{'all':<11}{int(n_all):>5}{n_all / tot_h:>11.2f}{n_all / tot_r:>14.2f}{tot_r / tot_h:>6.2f}x")
    print(f"ratio herd / lm-eval (items/s): {tot_r / tot_h:.2f}x over {int(n_all)} items "
          f"(herd {tot_h:.1f} s, lm-eval {tot_r:.1f} s); max|dll|: herd's records round to 1e-4")


if __name__ == "__main__":
    main()
