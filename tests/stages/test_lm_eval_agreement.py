"""herd's scorer against the reference: lm-eval-harness, run from local files on the same items and the same
model (SmolLM2-135M-Instruct, float32 on CPU), gives the same acc/acc_norm on HellaSwag, ARC-Easy and PIQA.

lm-eval builds its requests from the raw rows with its own task configs (``benchmarks/_lm_eval.py``), so this also
checks herd's rendering of the items: every ``(context, continuation)`` pair must be lm-eval's, character for
character. BOS is set explicitly on both sides (``harness.bos_prefix``; none for SmolLM2)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks._lm_eval import REF_TASKS, herd_requests, make_lm, run_lm_eval
from stages.evaluation.benchmarks import load_task
from stages.evaluation.harness import HarnessConfig, evaluate_model, sample_items

pytestmark = pytest.mark.slow
LIMIT = 50  # items per task (herd's seeded sample); ~2 min for both scorers on 2 CPU cores
TOLERANCE = 0.005  # the 0.5 points
LL_TOLERANCE = 2e-3  # nats per choice (herd's records round to 4 decimals; float32 forwards of different shapes)


@pytest.fixture(scope="module")
def scored(smollm2, package_cache, tmp_path_factory):
    cfg = HarnessConfig(limit=LIMIT, device="cpu", dtype="float32")
    tasks = [load_task(name, package_cache) for name in REF_TASKS]
    results, records = evaluate_model(cfg, smollm2, tasks)
    items = {t.name: sample_items(t.items, cfg.limit, cfg.seed, t.name) for t in tasks}
    ref = run_lm_eval(make_lm(smollm2, batch_size=16), items, package_cache, tmp_path_factory.mktemp("lm-eval"))
    return items, results, records, ref


def test_lm_eval_scores_the_requests_herd_scores(scored):
    items, _, _, ref = scored
    for task in REF_TASKS:
        assert ref[task]["n"] == len(items[task]) == LIMIT
        for it, req in zip(items[task], ref[task]["requests"]):
            assert herd_requests(it) == req, f"{task} {it.id}: herd's prompt differs from lm-eval's"


@pytest.mark.parametrize("task", REF_TASKS)
def test_acc_and_acc_norm_agree_with_lm_eval(scored, task):
    items, results, records, ref = scored
    ours, theirs = results["tasks"][task]["metrics"], ref[task]
    herd_ll = [np.array(r["loglikelihoods"]) for r in records[task]]
    ref_ll = [np.array(v) for v in theirs["loglikelihoods"]]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(herd_ll, ref_ll))
    flips = [(it.id, r["acc"], a, r["acc_norm"], an) for it, r, a, an in
             zip(items[task], records[task], theirs["item_acc"], theirs["item_acc_norm"])
             if (r["acc"], r["acc_norm"]) != (a, an)]
    detail = f"{task}: herd acc {ours['acc']:.4f} acc_norm {ours['acc_norm']:.4f}, lm-eval acc {theirs['acc']:.4f} " \
             f"acc_norm {theirs['acc_norm']:.4f}; max |ll diff| {diff:.2e}; items that differ {flips}"
    assert abs(ours["acc"] - theirs["acc"]) <= TOLERANCE, detail
    assert abs(ours["acc_norm"] - theirs["acc_norm"]) <= TOLERANCE, detail
    assert diff <= LL_TOLERANCE, detail
