"""SFT: chat rendering with answer-only loss, Ghost Attention, safety demonstrations, and a fine-tune
from a saved base model that learns the answers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.model import ModelConfig, build_model
from stages.pretrain import IGNORE_INDEX, PretrainConfig, TokenSplit
from stages.sft import SFTConfig, sft
from stages.sft_data import (
    GATT_INSTRUCTIONS,
    SFTTokenizeConfig,
    chat_tokens,
    ghost_attention,
    load_safety_demos,
    tokenize_chats,
)
from stages.tokenizer import TokenizerConfig, train_tokenizer

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("How many legs does a spider have?", "A spider has eight legs."),
      ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
      ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
      ("What is two plus two?", "Two plus two is four."),
      ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun.")]


def _convs(n_repeat: int = 4) -> list[dict]:
    return [{"id": f"qa-{i}-{r}", "source": "qa" if i % 2 else "faq", "license": "test",
             "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for r in range(n_repeat) for i, (q, a) in enumerate(QA)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft-tok")
    (root / "data").mkdir()
    with gzip.open(root / "data" / "00000.jsonl.gz", "wt") as fh:
        for i, (q, a) in enumerate(QA * 5):
            fh.write(json.dumps({"id": f"d{i}", "text": f"{q} {a}", "source": "qa"}) + "\n")
    out = root / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=300), [root], out)
    return out


def _tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def test_answer_tokens_only_are_scored(tok_dir):
    tok = _tok(tok_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QA[0][0]},
            {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]},
            {"role": "assistant", "content": QA[1][1]}]
    ids, mask = chat_tokens(tok, msgs)
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)  # the template users get
    scored = [i for i, m in zip(ids, mask) if m]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    # exactly the two answers, each with its end-of-turn token; no header, system or user token
    assert tok.decode(scored) == f"{QA[0][1]}<|eot_id|>{QA[1][1]}<|eot_id|>"
    assert sum(1 for i in scored if i == eot) == 2
    first_answer = ids.index(eot, ids.index(eot) + 1)  # eot after system, then after user -> first answer's eot
    assert mask[: ids.index(eot) + 1] == [0] * (ids.index(eot) + 1)
    assert first_answer > 0
    # an untrained turn (GAtt's earlier turns) is not scored
    msgs[2]["train"] = False
    _, mask2 = chat_tokens(tok, msgs)
    assert tok.decode([i for i, m in zip(ids, mask2) if m]) == f"{QA[1][1]}<|eot_id|>"


def test_ghost_attention_states_the_instruction_once_and_trains_the_last_turn():
    convs = _convs(3)
    dialogues = ghost_attention(convs, turns=3, fraction=1.0, seed=0)
    assert len(dialogues) == len(convs) // 3
    for d in dialogues:
        msgs = d["messages"]
        assert msgs[0]["role"] == "system" and msgs[0]["content"] in GATT_INSTRUCTIONS.values()
        assert sum(m["role"] == "system" for m in msgs) == 1  # said once, at the start
        answers = [m for m in msgs if m["role"] == "assistant"]
        assert [a["train"] for a in answers] == [False, False, True]
        kind = d["gatt"]
        for a in answers:  # every answer complies with the instruction
            assert {"prefix": a["content"].startswith("Certainly."), "signoff": a["content"].endswith("-- herd"),
                    "upper": a["content"] == a["content"].upper()}[kind]
    assert {d["gatt"] for d in dialogues} == set(GATT_INSTRUCTIONS)


def test_safety_demonstrations_are_refusals():
    demos = load_safety_demos()
    assert len(demos) >= 40 and len({d["id"] for d in demos}) == len(demos)
    refusal = ("can't", "won't", "cannot", "No.", "not help", "I'm sorry", "I can't")
    assert all(any(r in d["response"] for r in refusal) for d in demos)
    assert len({d["category"] for d in demos}) >= 8


def test_tokenize_chats_writes_a_masked_split(tok_dir, tmp_path):
    man = tokenize_chats(SFTTokenizeConfig(heldout_fraction=0.2), tok_dir, _convs(), tmp_path / "t")
    split = TokenSplit(tmp_path / "t" / "train")
    assert split.loss_mask is not None and len(split.loss_mask) == len(split.tokens)
    assert man["splits"]["train"]["scored_tokens"] == int(np.asarray(split.loss_mask).sum())
    assert 0 < man["splits"]["train"]["scored_tokens"] < man["splits"]["train"]["tokens"]
    ids, labels, _docs = split.windows(np.array([0]), 32)
    tok = _tok(tok_dir)
    scored = labels[labels != IGNORE_INDEX]
    assert "<|start_header_id|>" not in tok.decode(scored.tolist())
    assert "?" not in tok.decode(scored.tolist())  # no question token is a target


def test_sft_from_a_saved_base_model_learns_the_answers(tok_dir, tmp_path):
    vocab = len(_tok(tok_dir))
    base = tmp_path / "base"
    build_model(ModelConfig.from_flavour("debug", attn_implementation="eager"), vocab, seed=0).save_pretrained(base)
    cfg = SFTConfig(train=PretrainConfig(lr=3e-3, warmup_steps=2, seq_len=64, batch_tokens=512, micro_batch_size=8,
                                         log_every=5, eval_tokens=4096),
                    tokenize=SFTTokenizeConfig(heldout_fraction=0.0), epochs=30.0)
    res = sft(cfg, base, tok_dir, _convs(), tmp_path / "sft")
    hist = json.loads((tmp_path / "sft" / "train" / "metrics.json").read_text())["loss_history"]
    assert res.steps == len(hist) and hist[-1] < 0.5 * hist[0]
    assert (Path(res.model_dir) / "model.safetensors").is_file()
    assert (Path(res.model_dir) / "tokenizer.json").is_file()  # self-contained: model + tokenizer + template

    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(res.model_dir, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(res.model_dir).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": QA[1][0]}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False, eos_token_id=tok.convert_tokens_to_ids(
            "<|eot_id|>"), pad_token_id=tok.pad_token_id)
    assert "eight legs" in tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_two_processes_match_one_process(tok_dir, tmp_path):
    """SFT in two gloo processes under torchrun with FSDP2: rank 0 tokenizes, the pretraining loop runs sharded, and
    the loss curve and weights are the one-process run's; the model folder carries the tokenizer."""
    from safetensors.torch import load_file

    from tasks.torchrun_stage import launch

    base = tmp_path / "base"
    build_model(ModelConfig.from_flavour("debug", attn_implementation="eager"), len(_tok(tok_dir)),
                seed=0).save_pretrained(base)
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "conversations.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(c) + "\n" for c in _convs())
    cfg = SFTConfig(train=PretrainConfig(lr=3e-3, warmup_steps=1, seq_len=64, batch_tokens=512, micro_batch_size=4,
                                         log_every=1, eval_tokens=4096, device="cpu", num_threads=1),
                    tokenize=SFTTokenizeConfig(heldout_fraction=0.0), epochs=3.0)
    one = sft(cfg, base, tok_dir, _convs(), tmp_path / "one")
    fsdp = cfg.derive(nproc=2, train=cfg.train.derive(parallelism="fsdp"))
    two = launch("sft", fsdp, {"base_model_dir": str(base), "tokenizer_dir": str(tok_dir), "sft_data": str(data),
                               "out_dir": str(tmp_path / "two")}, 2, timeout=300)
    h1, h2 = (json.loads((tmp_path / r / "train" / "metrics.json").read_text())["loss_history"] for r in ("one", "two"))
    assert len(h2) == one.steps >= 3 and json.loads((tmp_path / "two" / "train" / "manifest.json").read_text())[
        "world_size"] == 2
    np.testing.assert_allclose(h2, h1, atol=1e-4, rtol=0)
    a, b = load_file(Path(one.model_dir) / "model.safetensors"), load_file(Path(two["model_dir"]) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
    assert (Path(two["model_dir"]) / "tokenizer.json").is_file()


def test_process_count_checks_name_the_fix(tmp_path):
    from stages.errors import ConfigError
    from stages.presets import load_section

    override = tmp_path / "s.yaml"
    override.write_text("train: {parallelism: fsdp}\n")
    with pytest.raises(ConfigError, match=r"sft: train.parallelism 'fsdp' .* set nproc to 2 or more"):
        load_section("sft", "tiny", override)
    override.write_text("nproc: 3\n")
    with pytest.raises(ConfigError, match=r"nproc 3 x train.micro_batch_size 8 must divide the global batch"):
        load_section("sft", "tiny", override)
    override.write_text("nproc: 2\ntrain: {parallelism: fsdp, activation_checkpointing: true}\n")
    assert load_section("sft", "tiny", override).nproc == 2 and load_section("sft", "tiny").nproc == 1
