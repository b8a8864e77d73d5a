"""Benchmark scoring speed: herd's scorer (``stages.evaluation.harness.evaluate_model``: each item packed into one
row, its context once and its choices' tokens as a trie, the LM head only where a token is scored) against
lm-eval-harness (``HFLM``, every ``context + continuation`` run in full) on the same model, items, dtype and
threads, side by side, with the score differences. Goal: herd at
least 2x lm-eval's items/s with acc/acc_norm equal within 0.5 points.

    .venv/bin/python benchmarks/eval.py [--model DIR] [--tasks hellaswag,arc_easy,piqa] [--limit 200]
        [--batch-size 16] [--batch-tokens N] [--threads 2] [--dtype float32] [--repeats 3]

``--model`` defaults to SmolLM2-135M-Instruct under ``$HERD_HOME/models/smollm2-135m`` (``herd models import
smollm2-135m``). Items are herd's seeded ``--limit`` sample of each task; lm-eval reads them as raw rows from local
files through its own task configs (``benchmarks/_lm_eval.py``). herd's time is its per-task time (tokenising,
forwards, metrics); lm-eval's is the time inside ``HFLM.loglikelihood`` (tokenising and forwards; dataset loading
and task building left out). Model loading is excluded on both sides; each side is warmed up on a few items first,
then the two run in turn ``--repeats`` times and the table shows each side's median. lm-eval runs in a process of
its own with the C library's default allocator, as it runs for its users; herd tunes its process's allocator for
tensor work (``stages.device.tune_cpu_allocator``), and ``--ref-allocator tuned`` gives lm-eval the same setting. The FLOP ratio column is
lm-eval's arithmetic over herd's for the same items (linear layers: herd's padded rows and scored positions,
lm-eval's full sequences): it separates what herd saves by computing less from how fast each side computes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._lm_eval import REF_TASKS, make_lm, run_lm_eval  # noqa: E402
from stages.device import tune_cpu_allocator  # noqa: E402
from stages.evaluation.benchmarks import load_task  # noqa: E402
from stages.evaluation.harness import (HarnessConfig, bos_prefix, encode_pair, evaluate_model,  # noqa: E402
                                      sample_items)


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
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs per side; the table shows medians")
    p.add_argument("--ref-allocator", default="default", choices=["default", "tuned"],
                   help="lm-eval's malloc: 'default' (as it runs for its users) or 'tuned' (herd's setting, "
                        "stages.device.tune_cpu_allocator: the ratio of the two scorers' arithmetic alone)")
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

    # lm-eval runs in a process of its own, started before herd's (which tunes its allocator on its first CPU
    # model): as lm-eval runs for its users, unless --ref-allocator tuned gives it herd's setting too
    items = {t.name: sample_items(t.items, cfg.limit, cfg.seed, t.name) for t in tasks}
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    ref_proc = ctx.Process(target=_lm_eval_server, args=(child_conn, str(model_dir), batch_size, args.dtype,
                                                         args.threads, str(cache), args.ref_allocator == "tuned"))
    ref_proc.start()
    # warm-up, untimed: herd, then lm-eval
    evaluate_model(cfg.model_copy(update={"limit": args.warmup}), model_dir, tasks[:1])
    herd_s: dict[str, list[float]] = {n: [] for n in names}
    ref_s: dict[str, list[float]] = {n: [] for n in names}

    def run_ref(batch: dict, work: Path) -> dict:
        conn.send((batch, str(work)))
        answer = conn.recv()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    with tempfile.TemporaryDirectory() as tmp:
        run_ref({names[0]: items[names[0]][:args.warmup]}, Path(tmp) / "warmup")
        for rep in range(args.repeats):  # alternate the sides, so a slow spell of the machine hits both
            herd, records = evaluate_model(cfg, model_dir, tasks)
            ref = run_ref(items, Path(tmp) / f"run{rep}")
            for n in names:
                herd_s[n].append(herd["timing"][n]["seconds"])
                ref_s[n].append(ref[n]["seconds"])
            print(f"repeat {rep + 1}/{args.repeats}: herd {sum(herd_s[n][-1] for n in names):.1f} s, lm-eval "
                  f"{sum(ref_s[n][-1] for n in names):.1f} s, ratio "
                  f"{sum(ref_s[n][-1] for n in names) / sum(herd_s[n][-1] for n in names):.2f}x", flush=True)

    conn.send(None)
    ref_proc.join(timeout=60)
    # the arithmetic each side did, from the model's linear layers (attention's T^2 term left out): herd runs the
    # decoder over its padded packed rows and the LM head where a token is scored; lm-eval runs decoder and head
    # over every context + continuation (BOS + both, less the last token; its batch padding left out)
    from transformers import AutoTokenizer

    from stages.model import load_causal_lm

    model = load_causal_lm(model_dir)
    head_w = model.get_output_embeddings().weight
    body = 2 * sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    head = 2 * head_w.numel()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    bos = bos_prefix(tok)
    max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)

    def ref_flops(name: str) -> float:
        total = 0
        for reqs in ref[name]["requests"]:
            for ctx, cont in reqs:
                c_ids, t_ids = encode_pair(tok, ctx, cont, bos)
                total += min(len(bos) + len(c_ids) + len(t_ids) - 1, max_len)
        return float(total) * (body + head)

    params = sum(x.numel() for x in model.parameters())
    print(f"model {model_dir} ({params / 1e6:.1f}M params), {args.dtype}, cpu, {args.threads} threads; "
          f"herd batch_tokens {args.batch_tokens}, lm-eval batch_size {args.batch_size}; --limit {args.limit}; "
          f"median of {args.repeats} alternating runs per side; allocator: herd tuned "
          f"({'yes' if tune_cpu_allocator() else 'not glibc'}), lm-eval {args.ref_allocator}")
    head_line = (f"{'task':<11}{'n':>5}{'herd it/s':>11}{'lm-eval it/s':>14}{'ratio':>7}{'FLOP ratio':>12}"
                 f"{'herd GFLOP/s':>14}  {'herd acc/norm':>15}{'lm-eval acc/norm':>18}{'diff acc/norm':>16}"
                 f"{'max|dll|':>10}")
    print(head_line)
    print("-" * len(head_line))
    tot_h = tot_r = n_all = fl_h = fl_r = 0.0
    for name in names:
        h, r, t = herd["tasks"][name]["metrics"], ref[name], herd["timing"][name]
        hs, rs = float(np.median(herd_s[name])), float(np.median(ref_s[name]))
        dll = max(float(np.abs(np.array(rec["loglikelihoods"]) - np.array(ll)).max())
                  for rec, ll in zip(records[name], r["loglikelihoods"]))
        n = herd["tasks"][name]["n"]
        fh, fr = float(t["padded_tokens"] * body + t["head_rows"] * head), ref_flops(name)
        tot_h, tot_r, n_all, fl_h, fl_r = tot_h + hs, tot_r + rs, n_all + n, fl_h + fh, fl_r + fr
        print(f"{name:<11}{n:>5}{n / hs:>11.2f}{n / rs:>14.2f}{rs / hs:>6.2f}x{fr / fh:>11.2f}x{fh / hs / 1e9:>14.0f}  "
              f"{h['acc']:>7.3f}/{h['acc_norm']:.3f}{r['acc']:>10.3f}/{r['acc_norm']:.3f}"
              f"{h['acc'] - r['acc']:>+8.3f}/{h['acc_norm'] - r['acc_norm']:+.3f}{dll:>10.1e}")
    print(f"{'all':<11}{int(n_all):>5}{n_all / tot_h:>11.2f}{n_all / tot_r:>14.2f}{tot_r / tot_h:>6.2f}x"
          f"{fl_r / fl_h:>11.2f}x{fl_h / tot_h / 1e9:>14.0f}")
    runs = [sum(ref_s[n][k] for n in names) / sum(herd_s[n][k] for n in names) for k in range(args.repeats)]
    print(f"ratio herd / lm-eval (items/s): {tot_r / tot_h:.2f}x over {int(n_all)} items (median seconds: herd "
          f"{tot_h:.1f}, lm-eval {tot_r:.1f}); per run {', '.join(f'{x:.2f}x' for x in runs)}. FLOP ratio: lm-eval's "
          f"arithmetic over herd's, {fl_r / fl_h:.2f}x (the ratio at equal FLOP/s). "
          f"max|dll|: herd's records round to 1e-4")


def _lm_eval_server(conn, model_dir: str, batch_size, dtype: str, threads: int, cache: str, tune: bool) -> None:
    """lm-eval's side, in its own process: scores each ``(items by task, work dir)`` it is sent until ``None``."""
    torch.set_num_threads(threads)
    if tune:
        tune_cpu_allocator()
    lm = make_lm(model_dir, batch_size=batch_size, dtype=dtype)
    while (msg := conn.recv()) is not None:
        batch, work = msg
        try:
            conn.send(run_lm_eval(lm, batch, Path(cache), Path(work)))
        except Exception as exc:  # noqa: BLE001  (raised again in the parent)
            conn.send(exc)


if __name__ == "__main__":
    main()
