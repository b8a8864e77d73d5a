"""Llama 3's schedule after the main run: upsampled windows, context stages with a new RoPE theta that resume
exactly across a stage boundary, the anneal's last weights beside their average, and the measurements
(position-bucketed loss, passkey prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.errors import ConfigError
from stages.model import ModelConfig, load_causal_lm, packed_inputs
from stages.pretrain import (
    IGNORE_INDEX,
    PretrainConfig,
    TokenSplit,
    WeightedOrder,
    load_loss_history,
    pretrain,
    token_losses,
    window_weights,
)
from stages.schedule import (
    AnnealConfig,
    ContextStageConfig,
    ContinueConfig,
    ProbeConfig,
    continue_pretraining,
    passkey_accuracy,
    passkey_prompt,
    position_losses,
    stage_configs,
)
from tests.stages._tokens import random_split, write_split

MODEL = ModelConfig.from_flavour("debug", attn_implementation="eager", max_seq_len=32)
MAIN = PretrainConfig(steps=6, seq_len=32, batch_tokens=256, micro_batch_size=2, lr=3e-3, warmup_steps=2,
                      log_every=1, num_threads=1, peak_flops=1e12, eval_tokens=512)
PROBE = ProbeConfig(main_seq_len=32, bucket=16, eval_tokens=512, passkey_trials=0, micro_batch_size=2)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("schedule")
    train, heldout = random_split(d / "train", 120, seed=0), random_split(d / "heldout", 30, seed=1)
    res = pretrain(MAIN, MODEL, train, heldout, d / "main")
    return {"train": train, "heldout": heldout, "model": res.model_dir, "dir": d}


def _majority(split: TokenSplit, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: each window's document with the most tokens (the earliest on a tie) and its token count."""
    n = split.n_windows(seq_len)
    docs = np.searchsorted(split.offsets, np.arange(n * seq_len), side="right") - 1
    best, count = [], []
    for w in range(n):
        ids, c = np.unique(docs[w * seq_len:(w + 1) * seq_len], return_counts=True)
        best.append(ids[np.argmax(c)])
        count.append(c.max())
    return np.array(best), np.array(count)


@pytest.mark.parametrize("seq_len", [8, 16, 64])
def test_window_weights_follow_the_window_s_main_document(tmp_path, seq_len):
    split = TokenSplit(random_split(tmp_path / "s", 80, seed=3))
    best, count = _majority(split, seq_len)
    w = window_weights(split, seq_len, {"code": 3.0}, 5.0)
    expected = np.where(split.sources[best] == "code", 3.0, 1.0) * np.where(2 * count >= seq_len, 5.0, 1.0)
    assert len(w) == split.n_windows(seq_len) and np.array_equal(w, expected)
    assert np.array_equal(window_weights(split, seq_len, {}, 1.0), np.ones(len(w)))


def test_weighted_order_is_resumable_and_draws_by_weight():
    weights = np.array([1.0, 1.0, 6.0, 0.5])
    a, b = WeightedOrder(weights, 4, seed=7), WeightedOrder(weights, 4, seed=7)
    whole = a.starts(0, 20_000)
    parts = np.concatenate([b.starts(0, 5000), b.starts(5000, 9000), b.starts(14_000, 6000)])
    assert np.array_equal(whole, parts)  # a resumed run draws the same windows from any position
    assert set(np.unique(whole)) <= {0, 4, 8, 12}
    freq = np.bincount(whole // 4, minlength=4) / len(whole)
    assert np.allclose(freq, weights / weights.sum(), atol=0.01)
    assert not np.array_equal(whole, WeightedOrder(weights, 4, seed=8).starts(0, 20_000))


def test_weights_validation_names_the_field():
    with pytest.raises(ValueError, match=r"source_weights\['code'\]"):
        MAIN.derive(source_weights={"code": 0.0})


def test_a_continued_model_takes_the_new_rope_theta_and_context(main_run):
    before = load_causal_lm(main_run["model"])
    after = load_causal_lm(main_run["model"], rope_theta=1e6, max_seq_len=128)
    assert after.config.max_position_embeddings == 128 and after.config.rope_parameters["rope_theta"] == 1e6
    for (k, v), (_, u) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(v, u), k  # the same weights
    ratio = after.model.rotary_emb.inv_freq / before.model.rotary_emb.inv_freq
    assert ratio[0] == 1 and ratio[-1] < 0.9  # lower frequencies: a longer wavelength for the longer context


def test_position_losses_bucket_each_target_by_its_position_in_its_document(main_run):
    split = TokenSplit(main_run["heldout"])
    model = load_causal_lm(main_run["model"], "eager")
    got = position_losses(model, split, 32, 8, 256, 2, torch.device("cpu"))
    # by hand: every scored prediction made at document position p (0..31) with its loss, bucketed by p // 8
    n = 256 // 32
    ids, labels, docs = split.windows(np.arange(n) * 32, 32)
    mask, pos = packed_inputs(torch.from_numpy(docs[:, :-1]), attn_implementation="eager")
    with torch.no_grad():
        tl = token_losses(model(input_ids=torch.from_numpy(ids), attention_mask=mask, position_ids=pos).logits,
                          torch.from_numpy(labels)).numpy()
    target_pos = pos.numpy()
    valid = labels != IGNORE_INDEX
    want = {}
    for b in range(4):
        sel = valid & (target_pos // 8 == b)
        if sel.any():
            want[f"{8 * b}-{8 * b + 7}"] = float(tl[sel].mean())
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want)


def test_a_context_stage_resumes_exactly_across_the_stage_boundary(main_run, tmp_path):
    """main -> ctx-64 (RoPE theta 1e6): a run stopped inside the stage, then resumed, gives the uninterrupted
    stage's loss curve and weights; the stage reports position-bucketed loss before and after, the short-context
    check against the main run, and the figure."""
    from safetensors.torch import load_file

    (stage,) = stage_configs(MAIN, [ContextStageConfig(seq_len=64, tokens=2048, rope_theta=1e6, lr=1e-3,
                                                       warmup_steps=1, long_doc_weight=3.0)], AnnealConfig(), PROBE)
    assert stage.name == "ctx-64" and stage.train.seq_len == 64 and stage.train.batch_tokens == 256
    assert stage.train.long_doc_weight == 3.0 and stage.train.total_steps == 8
    args = (main_run["model"], main_run["train"], main_run["heldout"])
    full = continue_pretraining(stage, *args, tmp_path / "full", main_model_dir=main_run["model"])
    assert continue_pretraining(stage, *args, tmp_path / "split", main_model_dir=main_run["model"],
                                stop_after_steps=3) is None
    resumed = continue_pretraining(stage, *args, tmp_path / "split", main_model_dir=main_run["model"])
    assert load_loss_history(tmp_path / "split" / "train") == load_loss_history(tmp_path / "full" / "train")
    a = load_file(str(Path(full.model_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.model_dir) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((Path(full.model_dir) / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 1e6 and cfg["max_position_embeddings"] == 64
    assert full.position_loss["before"].keys() == full.position_loss["after"].keys() >= {"0-15", "16-31", "32-47"}
    assert full.main_short_loss is not None and full.short_loss is not None and isinstance(full.passed, bool)
    assert full.passed == (full.short_loss <= full.main_short_loss * (1 + PROBE.short_tolerance))
    assert Path(full.figure).is_file()
    again = continue_pretraining(stage, *args, tmp_path / "full", main_model_dir=main_run["model"])
    assert again == full  # a complete stage short-circuits


def test_the_anneal_keeps_its_last_weights_beside_their_average(main_run, tmp_path):
    from safetensors.torch import load_file

    (anneal,) = stage_configs(MAIN, [], AnnealConfig(tokens=2048, average_last=4, source_weights={"code": 3.0}),
                              PROBE)
    assert anneal.train.schedule == "linear" and anneal.train.min_lr_ratio == 0 and anneal.train.warmup_steps == 0
    assert anneal.train.lr == pytest.approx(MAIN.lr * MAIN.min_lr_ratio)  # on from where the main run's decay ended
    res = continue_pretraining(anneal, main_run["model"], main_run["train"], main_run["heldout"], tmp_path / "a",
                               main_model_dir=main_run["model"])
    assert res.train.averaged == 4 and res.last_model_dir and res.position_loss == {}
    last = load_file(str(Path(res.last_model_dir) / "model.safetensors"))
    mean = load_file(str(Path(res.model_dir) / "model.safetensors"))
    assert any(not torch.equal(last[k], mean[k]) for k in last)
    assert res.train.heldout_loss_last is not None and res.short_loss_last is not None


def test_stage_lengths_must_grow():
    with pytest.raises(ConfigError, match="context_stages"):
        stage_configs(MAIN, [ContextStageConfig(seq_len=32)], AnnealConfig(), PROBE)
    from stages.presets import PretrainingConfig

    with pytest.raises(ValueError, match=r"context_stages\[1\]\.seq_len=64"):
        PretrainingConfig(train=MAIN, stage_probe=PROBE, context_stages=[ContextStageConfig(seq_len=64),
                                                                         ContextStageConfig(seq_len=64)])


def test_passkey_prompts_hide_the_key_at_the_asked_depth(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    shallow, deep = passkey_prompt(tok, 256, 31415, 0.0), passkey_prompt(tok, 256, 31415, 1.0)
    for ids in (shallow, deep):
        text = tok.decode(ids)
        assert len(ids) + 3 <= 256 and text.count("31415") == 2 and text.endswith("What is the pass key? The pass key is")
    assert tok.decode(shallow).index("31415") < tok.decode(deep).index("31415")


def test_passkey_accuracy_finds_a_key_a_model_can_read(smollm2):
    """SmolLM2-135M-Instruct retrieves a key from 256 tokens of filler; the score is the share of prompts whose
    true key ranks first among 10."""
    model = load_causal_lm(smollm2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    acc = passkey_accuracy(model, tok, 256, 6, 10, seed=0, device=torch.device("cpu"))
    assert acc >= 0.8


def _word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer over the synthetic splits' 128 ids (w0 .. w126, <|end_of_text|> = 127)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(127)} | {"<|end_of_text|>": 127}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_an_anneal_test_draws_its_share_from_the_new_dataset_and_names_bad_records(main_run, tmp_path):
    """Llama 3's data ablation: the with-run draws 30% of its windows (by draw weight) from the dataset (documents
    of a pattern the corpus lacks) appended to the corpus, the without-run none; both start from the same model on
    the same budget. A record without text is a one-line error naming the file, line and field."""
    import gzip

    from stages.schedule import NEW_SOURCE, AnnealTestConfig, anneal_test, mix_in_dataset

    tok = _word_tokenizer(tmp_path / "tok")
    data = tmp_path / "new.jsonl.gz"
    rng = np.random.default_rng(5)
    with gzip.open(data, "wt") as fh:
        for _ in range(12):  # step-5 sequences: the corpus has steps 1 and 3
            start = int(rng.integers(0, 120))
            fh.write(json.dumps({"text": " ".join(f"w{(start + 5 * i) % 127}" for i in range(70))}) + "\n")
    cfg = AnnealTestConfig(weight=0.3, anneal=AnnealConfig(tokens=4096, average_last=2, source_weights={}))
    res = anneal_test(cfg, MAIN, PROBE, main_run["model"], main_run["train"], main_run["heldout"], data, tok,
                      tmp_path / "at")
    assert res.dataset_docs == 12 and res.dataset_tokens == 12 * 71 and res.share == pytest.approx(0.3)
    split = TokenSplit(res.split)
    base = TokenSplit(main_run["train"])
    assert len(split) == len(base) + res.dataset_tokens and list(split.sources[-12:]) == [NEW_SOURCE] * 12
    assert np.array_equal(np.asarray(split.tokens[:len(base)]), np.asarray(base.tokens))
    w, wo = res.with_dataset, res.without_dataset
    assert w.train.tokens == wo.train.tokens and w.model_dir != wo.model_dir
    assert w.train.final_loss != wo.train.final_loss
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    with pytest.raises(Exception, match=r"bad\.jsonl.*line 2.*'text'"):
        mix_in_dataset(main_run["train"], bad, tok, tmp_path / "bad-tokens", 10)
