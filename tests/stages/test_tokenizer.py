"""Tokenizer stage: BPE training, offline reload, specials, roundtrip, compression, token shards."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from stages.tokenizer import (
    BOS,
    DEFAULT_SPECIALS,
    EOS,
    EOT,
    PAD,
    TokenizeConfig,
    TokenizerConfig,
    TokenShard,
    base_id,
    compression,
    heldout_ids,
    input_files,
    split_of,
    tokenize_corpus,
    train_tokenizer,
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures.",
    "In 1969, the Apollo 11 mission landed two astronauts on the Moon; they returned safely to Earth.",
    "A language model assigns probabilities to sequences of words, and it is trained on a large corpus of text.",
    "The river flows through the valley, past the old mill and the church, toward the distant sea.",
    "Photosynthesis converts light energy into chemical energy stored in glucose and other sugars.",
    "She opened the door slowly, listening for any sound from the dark hallway beyond the kitchen.",
    "Tokenizers split text into units; byte-level BPE never produces unknown tokens for any input.",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "import numpy as np\n\nx = np.arange(10)\nprint(x.sum())\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    if i % 2 == 0:\n        continue\n    total += i * i\n",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "with open(path, 'r', encoding='utf-8') as fh:\n    lines = [line.strip() for line in fh]\n",
]
QA = [
    "Q: How do I reverse a list in Python?\nA: Use lst[::-1] or lst.reverse() to reverse it in place.",
    "Q: What is the capital of France?\nA: Paris is the capital and largest city of France.",
    "Q: Why does my loop never end?\nA: Check that the loop variable is updated on every iteration.",
]
UNICODE = ["Café naïve résumé — «quotes» and emoji 🦙🚀; 日本語のテキスト; Ünïcödé ß ø å."]


def _docs(n_repeat: int = 6) -> list[dict]:
    docs = []
    for src, texts in (("web", ENGLISH), ("code", CODE), ("qa", QA), ("reference", UNICODE)):
        for r in range(n_repeat):
            for j, t in enumerate(texts):
                text = t if r == 0 else f"{t} ({src} variant {r})" if src != "code" else f"# v{r}\n{t}"
                docs.append({"id": f"{src}-{r}-{j}", "text": text, "url": f"https://x/{src}/{r}/{j}",
                             "source": src, "metadata": {}})
    return docs


def _write_mix(root: Path, docs: list[dict], shards: int = 2) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for k in range(shards):
        with gzip.open(data / f"{k:05d}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for d in docs[k::shards]:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_mix(tmp_path_factory.mktemp("mix"), _docs())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    res = train_tokenizer(TokenizerConfig(vocab_size=1000), [corpus], out)
    assert res["path"] == str(out) and res["train_chars"] > 0
    return out


def _auto(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def test_train_reload_offline_and_special_ids(tok_dir):
    tok = _auto(tok_dir)
    assert tok.is_fast
    assert 300 < len(tok) <= 1000
    for i, t in enumerate(DEFAULT_SPECIALS):
        assert tok.convert_tokens_to_ids(t) == i
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 5)
    # specials are never split, even glued to text
    ids = tok.encode(f"hello{EOT}world{BOS}", add_special_tokens=False)
    assert 4 in ids and 0 in ids
    assert tok.decode(ids) == f"hello{EOT}world{BOS}"
    # the post-processor adds bos like Llama 3
    assert tok("hi")["input_ids"][0] == 0


@pytest.mark.parametrize("text", [
    "The quick brown fox.", "  leading and trailing spaces  ", "Café naïve 🦙 日本語 ß\tTabs\r\nCRLF",
    "def f(x):\n    return x ** 2  # square\n", "1234567890 3.14159 -42", "", "\x00\x01 raw control bytes \x7f",
])
def test_roundtrip(tok_dir, text):
    tok = _auto(tok_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_chat_template_renders_specials(tok_dir):
    tok = _auto(tok_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == 0 and ids.count(0) == 1  # one bos, no double bos
    assert ids.count(4) == 3 and ids.count(2) == 3 and ids.count(3) == 3
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|eot_id|>"


def test_training_is_deterministic_and_rerun_is_free(tmp_path, corpus, tok_dir):
    cfg = TokenizerConfig(vocab_size=1000)
    again = train_tokenizer(cfg, [corpus], tmp_path / "t2")
    first = json.loads((tok_dir / "manifest.json").read_text())["result"]
    assert again["sha256"] == first["sha256"]
    mtime = (tmp_path / "t2" / "tokenizer.json").stat().st_mtime_ns
    assert train_tokenizer(cfg, [corpus], tmp_path / "t2") == again
    assert (tmp_path / "t2" / "tokenizer.json").stat().st_mtime_ns == mtime


def test_max_train_chars_caps_training_text(tmp_path, corpus):
    res = train_tokenizer(TokenizerConfig(vocab_size=400, max_train_chars=500), [corpus], tmp_path / "t")
    assert res["train_chars"] == 500


def test_compression_per_source(tok_dir, corpus):
    rows = compression(tok_dir, [corpus], max_docs_per_source=4)
    assert set(rows) == {"web", "code", "qa", "reference", "all"}
    assert rows["web"]["docs"] == 4 and rows["reference"]["docs"] == 4
    assert rows["all"]["docs"] == 16
    assert rows["all"]["tokens"] == sum(rows[s]["tokens"] for s in ("web", "code", "qa", "reference"))
    for r in rows.values():
        assert r["chars_per_token"] == pytest.approx(r["chars"] / r["tokens"], abs=1e-4)
    assert rows["web"]["chars_per_token"] > 2.0  # trained on it: merges must compress English
    assert rows["web"]["chars_per_token"] > rows["reference"]["chars_per_token"]  # unicode costs more bytes


def test_tokenize_corpus_boundaries_and_splits(tmp_path, tok_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    docs = _docs()
    # repeats as the mix step writes them: id#epoch
    docs += [dict(d, id=f"{d['id']}#{e}") for d in docs[:10] for e in (1, 2)]
    mix = _write_mix(tmp_path / "mix2", docs, shards=3)
    cfg = TokenizeConfig(heldout_fraction=0.2, batch_docs=7)
    man = tokenize_corpus(cfg, tok_dir, [mix], tmp_path / "shards")
    assert man["docs"] == len(docs) and man["dtype"] == "uint16"
    assert man["splits"]["train"]["docs"] > 0 and man["splits"]["heldout"]["docs"] > 0
    assert man["tokens_per_s"] > 0

    by_id = {d["id"]: d for d in docs}
    held = heldout_ids(cfg, input_files([mix]))
    # the hash picks a fraction; every source with >= 2 documents is topped up to one held-out document
    assert {base_id(d["id"]) for d in docs if split_of(d["id"], 0.2) == "heldout"} <= held
    for source in {d["source"] for d in docs}:
        n_src = len({base_id(d["id"]) for d in docs if d["source"] == source})
        n_held = len({base_id(d["id"]) for d in docs if d["source"] == source and base_id(d["id"]) in held})
        assert n_src >= 2 and n_held >= 1
    expect = {s: [d for d in _read_order(mix) if ("heldout" if base_id(d["id"]) in held else "train") == s]
              for s in ("train", "heldout")}
    seen_split: dict[str, set[str]] = {}
    for split in ("train", "heldout"):
        shard = TokenShard(tmp_path / "shards" / split)
        assert len(shard) == man["splits"][split]["docs"] == len(expect[split])
        assert shard.tokens.dtype == np.uint16 and len(shard.tokens) == shard.doc_offsets[-1]
        assert shard.doc_offsets.dtype == np.int64 and len(shard.doc_offsets) == len(shard) + 1
        for i, d in enumerate(expect[split]):
            ids = shard.doc(i).tolist()
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            assert tok.decode(ids) == by_id[d["id"]]["text"] + EOS
            assert shard.source(i) == d["source"]
            seen_split.setdefault(base_id(d["id"]), set()).add(split)
        per_source = man["splits"][split]["per_source"]
        assert sum(r["tokens"] for r in per_source.values()) == shard.n_tokens
    assert all(len(s) == 1 for s in seen_split.values())  # repeats never straddle splits
    # deterministic: same inputs -> identical bytes; rerun returns the manifest untouched
    man2 = tokenize_corpus(cfg, tok_dir, [mix], tmp_path / "shards_b")
    for split in ("train", "heldout"):
        for name in ("tokens.bin", "doc_offsets.npy", "doc_sources.npy", "sources.json"):
            a = (tmp_path / "shards" / split / name).read_bytes()
            assert a == (tmp_path / "shards_b" / split / name).read_bytes()
    assert man2["splits"] == man["splits"]
    assert tokenize_corpus(cfg, tok_dir, [mix], tmp_path / "shards")["key"] == man["key"]


def _read_order(mix: Path) -> list[dict]:
    out = []
    for f in sorted((mix / "data").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def test_add_bos_and_plain_jsonl(tmp_path, tok_dir):
    path = tmp_path / "kept" / "a.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t, "metadata": {"source": "web"}})
                              for i, t in enumerate(["one doc", "", "two docs"])) + "\n")
    man = tokenize_corpus(TokenizeConfig(add_bos=True, heldout_fraction=0.0), tok_dir, [tmp_path], tmp_path / "o")
    assert man["skipped_empty"] == 1 and man["splits"]["heldout"]["docs"] == 0
    shard = TokenShard(tmp_path / "o" / "train")
    assert len(shard) == 2 and shard.doc(0)[0] == 0 and shard.doc(-1)[-1] == 1
    assert len(TokenShard(tmp_path / "o" / "heldout").tokens) == 0


def test_heldout_hash_strips_repeat_suffix():
    ids = [f"doc-{i}" for i in range(2000)]
    held = [i for i in ids if split_of(i, 0.1) == "heldout"]
    assert 120 < len(held) < 280
    assert all(split_of(f"{i}#{e}", 0.1) == split_of(i, 0.1) for i in ids[:200] for e in (1, 2, 17))
    assert base_id("https://x/page#frag") == "https://x/page#frag"
    assert split_of("doc-1", 0.1, seed=0) == split_of("doc-1", 0.1, seed=0)


@pytest.mark.parametrize("cls,field,value", [
    (TokenizerConfig, "vocab_size", 100),
    (TokenizerConfig, "min_frequency", 0),
    (TokenizerConfig, "max_train_chars", 0),
    (TokenizerConfig, "special_tokens", ("<|pad|>",)),
    (TokenizeConfig, "heldout_fraction", 1.5),
    (TokenizeConfig, "batch_docs", 0),
])
def test_config_errors_name_the_field(cls, field, value):
    with pytest.raises(ValidationError, match=field):
        cls().derive(**{field: value})
    with pytest.raises(ValidationError, match="extra"):
        cls(unknown=1)


def test_missing_source_is_reported(tmp_path, tok_dir, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": "no source"}) + "\n")
    from stages.errors import DataValidationError

    with caplog.at_level(logging.INFO), pytest.raises(DataValidationError, match="line 1.*'source'"):
        tokenize_corpus(TokenizeConfig(), tok_dir, [bad], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_heldout_tops_up_small_sources_but_never_takes_a_whole_source(tmp_path):
    docs = [{"id": f"web-{i}", "text": f"web page {i}", "source": "web"} for i in range(40)]
    docs += [{"id": "book-0", "text": "a lone book", "source": "books"}]
    docs += [{"id": f"qa-{i}", "text": f"question {i}", "source": "qa"} for i in range(2)]
    docs += [{"id": "qa-0#2", "text": "question 0", "source": "qa"}]  # a repeat follows its document
    mix = _write_mix(tmp_path / "mix", [dict(d, url="", metadata={}) for d in docs], shards=1)
    files = input_files([mix])
    held = heldout_ids(TokenizeConfig(heldout_fraction=1e-9, heldout_min_docs=1), files)
    assert "book-0" not in held  # one document: it stays in train
    assert len([b for b in held if b.startswith("qa-")]) == 1
    assert len([b for b in held if b.startswith("web-")]) == 1
    held3 = heldout_ids(TokenizeConfig(heldout_fraction=1e-9, heldout_min_docs=3), files)
    assert len([b for b in held3 if b.startswith("web-")]) == 3 and held <= held3
    assert heldout_ids(TokenizeConfig(heldout_fraction=1e-9, heldout_min_docs=0), files) == set()
    assert heldout_ids(TokenizeConfig(heldout_fraction=0.0, heldout_min_docs=3), files) == set()
