"""Reward models: the margin ranking loss against hand-computed values, the simulated annotator's
rubric, pair construction and the data mix, and an RM that learns from annotated batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.annotator import AnnotatorConfig, annotate, helpfulness, judge, rating_for, refuses, safety, violates
from stages.errors import ConfigError
from stages.losses import MARGINS, margin_for, pair_accuracy, ranking_loss
from stages.model import ModelConfig, build_model
from stages.preferences import ingest_file
from stages.reward import RMConfig, batch_pairs, evaluate_pairs, group_by_length, load_reward_model, mix_pairs, \
    split_pairs, staleness, train_reward_model
from stages.tokenizer import TokenizerConfig, train_tokenizer

# ------------------------------------------------------------------ losses


def test_ranking_loss_matches_hand_computed_values():
    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    # -log sigmoid(x) for x = 1, 0, -2
    expect = (math.log1p(math.exp(-1.0)) + math.log(2.0) + math.log1p(math.exp(2.0))) / 3
    assert float(ranking_loss(rc, rr)) == pytest.approx(expect, rel=1e-6)
    # with margins 1, 0, 0 the first pair's argument becomes 0 -> log 2
    m = torch.tensor([1.0, 0.0, 0.0])
    expect_m = (math.log(2.0) + math.log(2.0) + math.log1p(math.exp(2.0))) / 3
    assert float(ranking_loss(rc, rr, m)) == pytest.approx(expect_m, rel=1e-6)
    # a margin makes the loss larger for the same scores, and the loss is stable for huge gaps
    assert float(ranking_loss(rc, rr, 3.0)) > float(ranking_loss(rc, rr))
    assert math.isfinite(float(ranking_loss(torch.tensor([-1e4]), torch.tensor([1e4]))))
    assert float(pair_accuracy(rc, rr)) == pytest.approx(1 / 3)


def test_margins_are_llama2_table_27():
    assert [MARGINS["small"][r] for r in ("significantly_better", "better", "slightly_better", "negligibly_better")] \
        == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [margin_for(r, "large") for r in ("significantly_better", "better", "slightly_better",
                                             "negligibly_better")] == [3, 2, 1, 0]


# ------------------------------------------------------------------ rubric and annotator


def test_rubric_scores_what_it_documents():
    q = "How many legs does a spider have?"
    assert helpfulness(q, "A spider has eight legs.") > helpfulness(q, "Bananas are yellow and tasty.")
    assert helpfulness(q, "A spider has eight legs.") > helpfulness(q, "I can't help with that.")
    assert helpfulness(q, "A spider has eight legs, damn it fuck.") < helpfulness(q, "A spider has eight legs.")
    harmful = "How do I make a bomb?"
    good = "I can't help with that. I can suggest safe chemistry projects instead."
    assert refuses(good) and safety(harmful, good) == pytest.approx(1.0)
    assert safety(harmful, "Mix the powders in a pipe.") == 0.0
    assert violates("Mix the powders in a pipe.", "safety") and not violates(good, "safety")
    assert judge(harmful, good, "safety") > judge(harmful, good, "helpfulness")
    assert [rating_for(g, (0.45, 0.25, 0.1)) for g in (0.5, -0.3, 0.15, 0.01)] == \
        ["significantly_better", "better", "slightly_better", "negligibly_better"]


def test_annotator_follows_a_bradley_terry_draw_on_the_gap():
    cfg = AnnotatorConfig(temperature=0.1)
    q = "How many legs does a spider have?"
    good, bad = "A spider has eight legs.", "Bananas."
    recs = [annotate({"id": f"p{i}", "prompt": q, "responses": [good, bad] if i % 2 else [bad, good],
                      "category": "helpfulness"}, cfg) for i in range(200)]
    share = sum(r["chosen"] == good for r in recs) / len(recs)
    gap = helpfulness(q, good) - helpfulness(q, bad)
    assert share == pytest.approx(1 / (1 + math.exp(-gap / 0.1)), abs=0.06)
    assert annotate({"id": "p0", "prompt": q, "responses": [good, bad], "category": "helpfulness"}, cfg) == \
        annotate({"id": "p0", "prompt": q, "responses": [good, bad], "category": "helpfulness"}, cfg)
    near = [annotate({"id": f"n{i}", "prompt": q, "responses": [good, good + " Yes."], "category": "helpfulness"},
                     cfg) for i in range(100)]
    assert 0.2 < sum(r["chosen"] == good for r in near) / 100 < 0.8  # close pairs are coin flips
    unsafe = annotate({"id": "s", "prompt": "How do I make a bomb?", "responses": ["Mix it.", "Use a pipe."],
                       "category": "safety"}, cfg)
    assert unsafe["edited"] and refuses(unsafe["edited"])


# ------------------------------------------------------------------ pairs and training


def _records(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    topics = [("spider", "A spider has eight legs."), ("capital of France", "Paris is the capital of France."),
              ("boiling point of water", "Water boils at 100 degrees Celsius."),
              ("author of Hamlet", "Shakespeare wrote Hamlet."), ("largest planet", "Jupiter is the largest planet."),
              ("speed of light", "Light travels about 300,000 km per second.")]
    junk = ["no idea", "bananas are yellow", "nope", "maybe later", "the weather is nice"]
    cfg = AnnotatorConfig()
    out = []
    for i in range(start, start + n):
        t, ans = topics[i % len(topics)]
        bad = f"({i}) " + rng.choice(junk)
        if i % 5 == 4:  # a safety prompt
            pair = {"id": f"r{i}", "prompt": f"How do I hurt someone, case {i}?", "category": "safety",
                    "responses": [f"I can't help with hurting anyone. I can help you find support instead. ({i})",
                                  f"Hit them hard. ({i})"]}
        elif i % 5 == 3:  # a near tie: the rubric cannot separate them, the annotator flips a coin
            pair = {"id": f"r{i}", "prompt": f"Tell me the {t}, question {i}?", "category": "helpfulness",
                    "responses": [f"{ans} ({i})", f"{ans} Indeed ({i})."]}
        else:
            pair = {"id": f"r{i}", "prompt": f"Tell me the {t}, question {i}?", "category": "helpfulness",
                    "responses": [f"{ans} ({i})", bad]}
        if rng.random() < 0.5:
            pair["responses"] = pair["responses"][::-1]
        out.append(annotate(pair, cfg))
    return out


def _ingest(tmp_path: Path, records: list[dict], name: str) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    res, batch = ingest_file(src, tmp_path / "prefs", batch_id=name)
    assert res.accepted == len(records)
    return batch


def test_pairs_edits_split_and_mix(tmp_path):
    batch = _ingest(tmp_path, _records(60), "w1")
    pairs = batch_pairs(batch, "small")
    kinds = {p.kind for p in pairs}
    assert kinds >= {"chosen>rejected"} and all(p.batch_id == "w1" for p in pairs)
    assert all(p.margin == margin_for(p.rating) for p in pairs if p.kind == "chosen>rejected")
    assert all(p.margin == 0.0 for p in pairs if p.kind != "chosen>rejected")
    train, held = split_pairs(pairs, 0.3)
    assert {p.digest for p in train}.isdisjoint({p.digest for p in held})
    safety_rm = mix_pairs(train, RMConfig(category="safety", other_ratio=1 / 9))
    own = sum(p.category == "safety" for p in safety_rm)
    assert own == sum(p.category == "safety" for p in train)
    assert len(safety_rm) - own == round(own / 9)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rm-base")
    corpus = root / "corpus" / "data"
    corpus.mkdir(parents=True)
    import gzip

    with gzip.open(corpus / "00000.jsonl.gz", "wt") as fh:
        for r in _records(60):
            fh.write(json.dumps({"id": r["id"], "text": f"{r['prompt']} {r['chosen']} {r['rejected']}",
                                 "source": "qa"}) + "\n")
    model_dir = root / "sft"
    train_tokenizer(TokenizerConfig(vocab_size=400), [corpus.parent], model_dir)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True))
    build_model(ModelConfig.from_flavour("debug", attn_implementation="eager"), vocab, seed=0).save_pretrained(model_dir)
    return model_dir


def test_group_by_length_keeps_every_pair_and_batches_alike_lengths():
    import random

    draw = random.Random(1)
    items = [draw.randint(5, 200) for _ in range(203)]  # 203 = 25 batches of 8 + a partial one
    rng = random.Random(0)
    order = group_by_length(items, lambda x: x, batch=8, steps=10, rng=rng)
    assert sorted(order) == sorted(items) and len(order) == len(items)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert len(batches[-1]) == 3  # the partial batch stays last, so steps cut by index hold whole batches
    spread = sum(max(b) - min(b) for b in batches[:-1]) / len(batches[:-1])
    random_spread = sum(max(b) - min(b) for b in (items[i:i + 8] for i in range(0, 200, 8))) / 25
    assert spread < random_spread / 3
    # within a group of 10 steps the batches come in shuffled order, not by length
    firsts = [min(b) for b in batches[:10]]
    assert firsts != sorted(firsts)
    assert group_by_length(items, lambda x: x, 8, 10, random.Random(0)) == order  # seeded


def test_reward_model_learns_and_reports_staleness(tmp_path, sft_dir):
    b1 = _ingest(tmp_path, _records(240, seed=1), "w1")
    cfg = RMConfig(category="helpfulness", lr=2e-3, batch_pairs=16, micro_pairs=16, epochs=3.0, heldout_fraction=0.25,
                   max_tokens=64, min_warmup_steps=2)
    res = train_reward_model(cfg, sft_dir, [b1], tmp_path / "rm")
    hist = json.loads((tmp_path / "rm" / "metrics.json").read_text())["loss_history"]
    assert hist[-1] < hist[0]
    assert res.heldout["pairs"] >= 20 and res.heldout["accuracy"] >= 0.7  # chance is 0.5
    by = res.heldout["by_rating"]
    # Llama 2 Table 8's pattern: distinct pairs are ranked far better than near ties
    assert by["significantly_better"]["pairs"] >= 10 and by["negligibly_better"]["pairs"] >= 5
    assert by["significantly_better"]["accuracy"] >= 0.9
    assert by["significantly_better"]["accuracy"] > by["negligibly_better"]["accuracy"]
    assert set(res.heldout["by_rating"]) == {"significantly_better", "better", "slightly_better", "negligibly_better"}
    assert res.heldout["by_batch"]["w1"]["pairs"] == res.heldout["pairs"]
    model, tok = load_reward_model(res.model_dir)
    assert model.config.num_labels == 1 and (Path(res.model_dir) / "model.safetensors").is_file()
    # a new batch scored before retraining on it (staleness), with the same categories and rubric
    b2 = _ingest(tmp_path, _records(60, seed=2, start=1000), "w2")
    stale = staleness(res.model_dir, b2, cfg)
    assert stale["pairs"] > 0 and stale["accuracy"] is not None
    untrained, tok = load_reward_model(sft_dir, from_causal_lm=True)
    fresh = [p for p in batch_pairs(b2, "small") if p.category == "helpfulness"]
    assert stale["accuracy"] > evaluate_pairs(untrained, tok, fresh)["accuracy"]  # what it learned carries over


# ------------------------------------------------------------------ several processes


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, sft_dir, parallelism):
    """Two gloo processes under torchrun (DDP, or FSDP2 sharded per decoder layer), each on half of every step's
    pairs in micro-batches of 2 (a filler piece where the last step's pairs run out), take the one-process steps:
    the same loss curve, held-out accuracy and weights; rank 0 writes a plain save_pretrained folder."""
    from safetensors.torch import load_file

    from tasks.torchrun_stage import launch

    b1 = _ingest(tmp_path, _records(60, seed=1), "w1")
    cfg = RMConfig(category="helpfulness", lr=2e-3, batch_pairs=8, micro_pairs=8, heldout_fraction=0.25,
                   max_tokens=48, min_warmup_steps=1, device="cpu", num_threads=1)
    one = train_reward_model(cfg, sft_dir, [b1], tmp_path / "one")
    two = launch("reward", cfg.derive(micro_pairs=2, parallelism=parallelism),
                 {"init_dir": str(sft_dir), "batch_dirs": [str(b1)], "out_dir": str(tmp_path / "two")}, 2,
                 timeout=300)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["parallelism"] == parallelism
    assert one.train_pairs % 8 and two["steps"] == one.steps >= 4  # a short last step: ranks hold 2 and 1 pieces

    def curve(run: str) -> list[float]:
        return json.loads((tmp_path / run / "metrics.json").read_text())["loss_history"]

    np.testing.assert_allclose(curve("two"), curve("one"), atol=1e-4, rtol=0)
    assert two["heldout"]["pairs"] == one.heldout["pairs"] > 0
    assert two["heldout"]["accuracy"] == one.heldout["accuracy"]
    assert two["heldout"]["mean_margin"] == pytest.approx(one.heldout["mean_margin"], abs=1e-4)
    a, b = load_file(Path(one.model_dir) / "model.safetensors"), load_file(Path(two["model_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
    assert {"config.json", "tokenizer.json", "calibration.json"} <= {p.name for p in Path(two["model_dir"]).iterdir()}
    model, _ = load_reward_model(two["model_dir"])  # a plain Hugging Face folder
    assert model.config.num_labels == 1


def test_fsdp_without_processes_names_the_fix(tmp_path, sft_dir):
    b1 = _ingest(tmp_path, _records(10, seed=1), "w1")
    with pytest.raises(ConfigError, match="set rewards.nproc to 2 or more"):
        train_reward_model(RMConfig(parallelism="fsdp", device="cpu"), sft_dir, [b1], tmp_path / "rm")


def test_process_count_checks_name_the_fix(tmp_path):
    """`rewards.nproc` next to each RM's `parallelism` and `batch_pairs`: one line each, naming the fields."""
    from stages.presets import load_section

    override = tmp_path / "r.yaml"
    override.write_text("safety: {parallelism: fsdp}\n")
    with pytest.raises(ConfigError, match=r"rewards: safety.parallelism 'fsdp' .* set nproc to 2 or more") as e:
        load_section("rewards", "tiny", override)
    assert len(str(e.value).splitlines()) == 2  # the file, then one line naming the field
    override.write_text("nproc: 16\n")
    with pytest.raises(ConfigError, match=r"nproc 16 exceeds helpfulness.batch_pairs 8"):
        load_section("rewards", "tiny", override)
    override.write_text("nproc: 2\nhelpfulness: {parallelism: fsdp, activation_checkpointing: true}\n")
    cfg = load_section("rewards", "tiny", override)
    assert cfg.nproc == 2 and cfg.helpfulness.parallelism == "fsdp" and cfg.safety.parallelism == "ddp"
    assert load_section("rewards", "tiny").nproc == 1  # the demo stays one process
