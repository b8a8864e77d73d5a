"""Benchmark decontamination on real text: OpenWebText passages (the ``evals`` wheel) with real evaluation items
planted in them (GSM8K test, HellaSwag validation, MMLU moral_scenarios), passed to the step directly.

One integration test reads the real benchmark sets through ``stages.evaluation.benchmarks`` (skipped while that
module is missing; it downloads the benchmark wheel into the package cache once).
"""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.curation import decontam
from stages.curation.base import split_reason
from stages.curation.decontam import (
    BENCHMARK_TASKS,
    DecontamConfig,
    benchmark_index,
    build_index,
    decontaminate,
    decontaminate_text,
    normalise_words,
    word_spans,
)
from tests.stages._corpora import read_folder, schelling, write_kept

# GSM8K test items 0-2 (question + reference answer, as the evaluation scores them)
GSM8K = {
    "test-0": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
              "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
              "egg. How much in dollars does she make every day at the farmers' market? Janet sells 16 - 3 - 4 = "
              "<<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18",
    "test-1": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take? "
              "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of "
              "fabric\n#### 3",
    "test-2": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in repairs.  "
              "This increased the value of the house by 150%.  How much profit did he make? The cost of the house and "
              "repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe increased the value of the house "
              "by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is 120,000+80,000=$<<120000+"
              "80000=200000>>200,000\nSo he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000",
}
# HellaSwag validation (ActivityNet "Roof shingle removal"): context and the four endings
HELLASWAG = ("Roof shingle removal: A man is sitting on a roof. He is using wrap to wrap a pair of skis. He is ripping "
             "level tiles off. He is holding a rubik's cube. He starts pulling up roofing on a roof.")
# MMLU moral_scenarios: ~900 test items open with this 33-word sentence
MORAL = ("For which of these two scenarios does the main character (who uses I/me/my) do something clearly morally "
         "wrong, according to ordinary moral standards in the US as of 2020?")
SCENARIOS = [
    "I took my neighbor's newspaper from her porch before she woke up.", "I helped an old man carry his groceries.",
    "I told my boss the report was finished although I had not started it.", "I fed my dog before I ate dinner.",
    "I borrowed my sister's car without asking and returned it with an empty tank.", "I paid for my friend's lunch.",
    "I laughed when the child fell off his bike and cried.", "I watered my roommate's plants while she was away.",
    "I copied my classmate's answers during the final exam.", "I returned the wallet I found to the police station.",
    "I read my brother's diary and told his friends what it said.",
]


def items(moral: int = 0) -> list[tuple[str, str, str]]:
    """GSM8K + HellaSwag items, and ``moral`` MMLU moral_scenarios items sharing their opening sentence."""
    out = [("gsm8k", k, v) for k, v in GSM8K.items()] + [("hellaswag", "val-24", HELLASWAG)]
    out += [("mmlu", f"moral_scenarios/test-{i}",
             f"{MORAL} Scenario 1 | {SCENARIOS[i]} Scenario 2 | {SCENARIOS[(i + 3) % len(SCENARIOS)]} "
             "Wrong, Wrong Wrong, Not wrong Not wrong, Wrong Not wrong, Not wrong") for i in range(moral)]
    return out


@pytest.fixture(scope="module")
def passages() -> list[str]:
    """Real OpenWebText passages of 600+ characters."""
    return [r[0].strip() for r in schelling("owt_5", 200) if len(r[0].strip()) >= 600]


@pytest.fixture(autouse=True)
def _fresh_index_cache():
    decontam._cached_index.cache_clear()
    yield
    decontam._cached_index.cache_clear()


def ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    w = normalise_words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def run(tmp_path: Path, docs: list[dict], bench, cfg: DecontamConfig | None = None) -> tuple[dict, dict, dict]:
    """The step over ``docs``: (stats, kept records by id, rejected records by id)."""
    write_kept(tmp_path / "in", docs)
    stats = decontaminate(cfg or DecontamConfig(), bench, tmp_path / "in", tmp_path / "out")
    kept = {r["id"]: r for r in read_folder(tmp_path / "out" / "kept")}
    rejected = {r["id"]: r for r in read_folder(tmp_path / "out" / "rejected")}
    assert stats["in"] == len(docs) == len(kept) + len(rejected)
    return stats, kept, rejected


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------

def test_normalisation_lowercases_strips_punctuation_and_keeps_spans() -> None:
    text = "Janet’s ducks  lay 16 eggs -- per day.\n#### 18"
    assert normalise_words(text) == ["janets", "ducks", "lay", "16", "eggs", "per", "day", "18"]
    words, spans = word_spans(text)
    assert words == normalise_words(text)
    assert [text[s:e] for s, e in spans] == ["Janet’s", "ducks", "lay", "16", "eggs", "per", "day.", "18"]


# ---------------------------------------------------------------------------------------------
# cutting, dropping, keeping
# ---------------------------------------------------------------------------------------------

def test_planted_item_is_cut_with_200_characters_either_side(tmp_path: Path, passages: list[str]) -> None:
    item = GSM8K["test-0"]
    before, after = passages[0], passages[1]
    text = f"{before}\n\n{item}\n\n{after}"
    stats, kept, rejected = run(tmp_path, [{"id": "owt-0", "text": text}, {"id": "owt-1", "text": passages[2]}],
                                items())
    assert not rejected
    assert kept["owt-1"]["text"] == passages[2] and "contamination" not in kept["owt-1"]["metadata"]
    doc = kept["owt-0"]  # same id, one record
    meta = doc["metadata"]["contamination"]
    assert meta["items"] == ["gsm8k/test-0"]
    a, b = (doc["text"][s:e] for s, e in meta["pieces"])
    assert doc["text"] == f"{a}\n\n{b}"
    # the pieces are the passages minus 200 characters (widened to a word boundary) next to the item
    start, end = text.index(item), text.index(item) + len(item)
    assert text.startswith(a) and 200 <= start - len(a) <= 200 + 64 + 2
    assert text.endswith(b) and 200 <= text.index(b) - end <= 200 + 64 + 2
    assert text[len(a)].isspace() and text[text.index(b) - 1].isspace()  # no half words
    assert meta["removed_chars"] == len(text) - len(a) - len(b)
    assert not ngrams(doc["text"]) & ngrams(item)
    row = stats["contamination"]["gsm8k"]
    assert (row["docs_cut"], row["docs_dropped"], row["matched_items"], row["item_ids"]) == (1, 0, 1, ["test-0"])
    assert row["chars_removed"] == meta["removed_chars"] and row["items"] == 3
    assert stats["contamination"]["hellaswag"]["docs_cut"] == 0
    assert set(stats["contamination"]) == set(BENCHMARK_TASKS)


def test_item_at_the_start_leaves_one_piece(passages: list[str]) -> None:
    text = f"{HELLASWAG} {passages[3]}"
    v = decontaminate_text(text, build_index(items()), DecontamConfig())
    assert v.text is not None and len(v.pieces) == 1 and v.regions[0][0] == 0
    assert passages[3].endswith(v.text) and len(text) - len(v.text) >= len(HELLASWAG) + 200


def test_more_than_max_splits_drops_the_document_naming_benchmark_and_item(tmp_path: Path,
                                                                          passages: list[str]) -> None:
    plants = [GSM8K["test-1"], HELLASWAG, GSM8K["test-2"]]
    long = [p for p in passages if len(p) >= 800]  # 200+ characters survive between two removals

    def contaminated(k: int) -> str:
        parts = [long[0]]
        for i in range(k):
            parts += [plants[i % 3], long[1 + i]]
        return "\n\n".join(parts)

    docs = [{"id": "ten", "text": contaminated(10)}, {"id": "eleven", "text": contaminated(11)}]
    stats, kept, rejected = run(tmp_path, docs, items())
    # ten separate regions: cut into eleven pieces, kept; eleven: dropped whole
    assert len(kept["ten"]["metadata"]["contamination"]["pieces"]) == 11
    reason, detail = rejected["eleven"]["metadata"]["reason"], rejected["eleven"]["metadata"]["detail"]
    assert reason == "contamination"
    assert detail.startswith("gsm8k item test-1 (+2 more items: gsm8k, hellaswag)")
    assert "split 11 times > max_splits 10" in detail
    assert rejected["eleven"]["text"] == docs[1]["text"]  # the rejected record holds the original text
    c = stats["contamination"]
    assert (c["gsm8k"]["docs_cut"], c["gsm8k"]["docs_dropped"], c["gsm8k"]["matched_items"]) == (1, 1, 2)
    assert (c["hellaswag"]["docs_cut"], c["hellaswag"]["docs_dropped"]) == (1, 1)
    assert c["gsm8k"]["chars_removed"] >= len(docs[1]["text"]) + 10 * 400
    assert stats["reasons"] == {"contamination": 1} and (stats["docs_cut"], stats["docs_dropped"]) == (1, 1)


def test_document_whose_pieces_are_all_short_is_dropped(tmp_path: Path, passages: list[str]) -> None:
    short = f"{passages[4][:150]} {GSM8K['test-2']} {passages[5][:150]}"
    stats, kept, rejected = run(tmp_path, [{"id": "short", "text": short}], items())
    assert not kept
    reason, detail = split_reason(f"{rejected['short']['metadata']['reason']}:{rejected['short']['metadata']['detail']}")
    assert reason == "contamination"
    assert detail == "gsm8k item test-2; no piece of 200+ characters left"
    assert stats["contamination"]["gsm8k"]["chars_removed"] == len(short)


def test_common_phrases_and_frequent_ngrams_leave_documents_untouched(tmp_path: Path, passages: list[str]) -> None:
    # 11 moral_scenarios items share the opening sentence: its 13-grams are boilerplate and ignored
    bench = items(moral=11)
    twelve = " ".join(GSM8K["test-0"].split()[:12])  # one word short of a 13-gram
    docs = [
        {"id": "phrases", "text": f"{passages[6]} It is one of the most important questions, and at the end of the "
                                  "day, how many bolts in total does it take? Nobody knows."},
        {"id": "twelve", "text": f"{passages[7]} {twelve} {passages[8]}"},
        {"id": "boilerplate", "text": f"{passages[9]} The benchmark asks: {MORAL} {passages[12]}"},
        {"id": "clean", "text": passages[13]},
    ]
    stats, kept, rejected = run(tmp_path, docs, bench)
    assert not rejected
    for d in docs:
        assert kept[d["id"]]["text"] == d["text"] and "contamination" not in kept[d["id"]]["metadata"]
    assert stats["index"]["ignored_ngrams"] > 0 and stats["docs_cut"] == stats["docs_dropped"] == 0
    # with only 10 items sharing it (the limit), the same sentence counts as contamination
    stats, kept, _ = run(tmp_path / "ten", docs, items(moral=10))
    assert kept["boilerplate"]["text"] != docs[2]["text"]
    assert stats["contamination"]["mmlu"]["docs_cut"] == 1 and stats["contamination"]["mmlu"]["matched_items"] == 10
    # max_item_frequency is the knob
    stats, kept, _ = run(tmp_path / "eleven", docs, bench, DecontamConfig(max_item_frequency=11))
    assert stats["contamination"]["mmlu"]["docs_cut"] == 1


def test_only_the_configured_tasks_are_used(tmp_path: Path, passages: list[str]) -> None:
    text = f"{passages[0]}\n\n{GSM8K['test-0']}\n\n{passages[1]}"
    stats, kept, _ = run(tmp_path, [{"id": "a", "text": text}], items(), DecontamConfig(tasks=["hellaswag"]))
    assert kept["a"]["text"] == text and set(stats["contamination"]) == {"hellaswag"}
    assert stats["index"]["items"] == 1


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match=r"tasks: unknown benchmark\(s\) \['squad'\]"):
        DecontamConfig(tasks=["gsm8k", "squad"])
    with pytest.raises(ValidationError, match="tasks: empty; set enabled: false"):
        DecontamConfig(tasks=[])
    with pytest.raises(ValidationError, match="extra"):
        DecontamConfig(ngram=13)


# ---------------------------------------------------------------------------------------------
# in the curation pipeline
# ---------------------------------------------------------------------------------------------

def _fake_benchmarks(monkeypatch, texts: list[tuple[str, str, str]]) -> None:
    mod = types.ModuleType("stages.evaluation.benchmarks")
    mod.benchmark_texts = lambda cache_dir, tasks=None: iter([t for t in texts if tasks is None or t[0] in tasks])
    monkeypatch.setitem(sys.modules, "stages.evaluation.benchmarks", mod)
    decontam._cached_index.cache_clear()


def test_smoke_pipeline_records_the_contamination_table(tmp_path: Path, passages: list[str], monkeypatch) -> None:
    from stages.curation.finalize import finalize
    from stages.curation.ingest import ingest
    from stages.curation.pipeline import STEP_ORDER, StepContext, enabled_steps, prepare_assets, run_step, step_key
    from stages.presets import smoke

    cfg = smoke().curation
    steps = enabled_steps(cfg)
    assert steps.index("semantic_dedup") + 1 == steps.index("decontaminate") == steps.index("quality") - 1
    assert STEP_ORDER.index("decontaminate") == STEP_ORDER.index("semantic_dedup") + 1
    cfg = cfg.derive(nsfw=cfg.nsfw.derive(enabled=False).model_dump())  # no e2guardian download here

    raw = tmp_path / "raw.jsonl"
    docs = [{"id": f"owt-{i}", "text": p, "source": "web"} for i, p in enumerate(passages[20:40])]
    docs[0]["text"] = f"{passages[20]}\n\n{GSM8K['test-0']}\n\n{passages[41]}"
    docs[1]["text"] = f"{passages[21][:100]} {HELLASWAG} {passages[42][:100]}"
    docs.append(dict(docs[5], id="owt-dup"))  # an exact duplicate, dropped before decontamination
    raw.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ingest(cfg.ingest, [raw], tmp_path / "ingest")

    # the step's key hashes the benchmark items: other items, another key
    _fake_benchmarks(monkeypatch, items())
    assets = prepare_assets(cfg, tmp_path / "cache")
    _fake_benchmarks(monkeypatch, items()[:3])
    other = prepare_assets(cfg, tmp_path / "cache")
    assert assets["decontaminate"] != other["decontaminate"]
    assert step_key(cfg, "decontaminate", "p", None, assets) != step_key(cfg, "decontaminate", "p", None, other)
    assert step_key(cfg, "decontaminate", "p", None, assets) == step_key(cfg, "decontaminate", "p", None,
                                                                         dict(assets))
    _fake_benchmarks(monkeypatch, items())

    ctx = StepContext(cache_dir=tmp_path / "cache")  # no benchmark_texts: read through the benchmarks module
    run_step("exact_dedup", cfg, tmp_path / "ingest", tmp_path / "exact_dedup", ctx)
    stats = run_step("decontaminate", cfg, tmp_path / "exact_dedup", tmp_path / "decontaminate", ctx)
    assert stats["index"]["digest"] == assets["decontaminate"]
    report = finalize(tmp_path / "ingest", [("exact_dedup", tmp_path / "exact_dedup"),
                                            ("decontaminate", tmp_path / "decontaminate")], tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["contamination"] == report["contamination"]
    table = report["contamination"]
    assert table["gsm8k"]["docs_cut"] == 1 and table["gsm8k"]["item_ids"] == ["test-0"]
    assert table["hellaswag"]["docs_dropped"] == 1 and table["hellaswag"]["item_ids"] == ["val-24"]
    assert report["reasons"] == {"contamination": 1, "exact_dup": 1}
    assert report["counts"]["input_lines"] == len(docs) == report["counts"]["kept"] + report["counts"]["rejected"]
    with gzip.open(tmp_path / "out" / "rejected" / "decontaminate.jsonl.gz", "rt") as fh:
        (dropped,) = [json.loads(x) for x in fh]
    assert (dropped["id"], dropped["reason"], dropped["step"]) == ("owt-1", "contamination", "decontaminate")
    assert dropped["detail"].startswith("hellaswag item val-24")
    kept = {}
    for p in sorted((tmp_path / "out" / "kept").glob("*.jsonl.gz")):
        with gzip.open(p, "rt") as fh:
            kept.update((r["id"], r) for r in map(json.loads, fh))
    assert kept["owt-0"]["metadata"]["herd"]["contamination"]["items"] == ["gsm8k/test-0"]
    assert GSM8K["test-0"][:40] not in kept["owt-0"]["text"]


# ---------------------------------------------------------------------------------------------
# the real benchmark sets
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_benchmark_items_are_found_and_cut(package_cache: Path, passages: list[str]) -> None:
    bench = pytest.importorskip("stages.evaluation.benchmarks", reason="stages/evaluation/benchmarks.py not there yet")
    cfg = DecontamConfig()
    index = benchmark_index(cfg, package_cache)
    assert set(index.tasks) == set(BENCHMARK_TASKS)
    assert all(index.tasks[t]["items"] > 0 for t in BENCHMARK_TASKS), index.tasks
    assert index.ignored_ngrams > 0  # MMLU's shared instructions, at least
    assert benchmark_index(cfg, package_cache) is index  # read once per process
    for task in ("gsm8k", "hellaswag", "mmlu", "humaneval"):
        _, item_id, text = next(t for t in bench.benchmark_texts(package_cache, [task])
                                if len(normalise_words(t[2])) >= 3 * cfg.n)
        doc = f"{passages[0]}\n\n{text}\n\n{passages[1]}"
        v = decontaminate_text(doc, index, cfg)
        assert v.text is not None and len(v.pieces) == 2, (task, item_id)
        assert (task, str(item_id)) in [index.items[i] for i in v.items]
        assert not decontaminate_text(v.text, index, cfg).contaminated  # what is left holds no indexed n-gram
    # ordinary web text is not contaminated
    clean = [decontaminate_text(p, index, cfg) for p in passages[:100]]
    assert sum(v.contaminated for v in clean) <= 2
