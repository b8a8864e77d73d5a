"""A step that keeps nothing passes an empty result on; later stages refuse empty or too-small inputs with a
clear error naming the input, never a library traceback."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from stages.curation.base import KEPT, REJECTED, ExecutorConfig
from stages.curation.finalize import finalize
from stages.curation.ingest import IngestConfig, ingest
from stages.curation.pipeline import STEP_ORDER, CurationConfig, StepContext, run_step
from stages.errors import DataValidationError
from stages.mix import MixConfig, mix
from stages.tokenizer import TokenizeConfig, TokenizerConfig, tokenize_corpus, train_tokenizer
from tests.stages._tokens import write_split


def _gz_lines(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(p, "rt") as fh:
            out += [json.loads(x) for x in fh if x.strip()]
    return out


def _curate(cfg: CurationConfig, raw: Path, root: Path, steps: list[str]) -> dict:
    ingest(cfg.ingest, [raw], root / "ingest")
    ctx = StepContext(cache_dir=root / "cache")
    prev, done = root / "ingest", []
    for name in steps:
        run_step(name, cfg, prev, root / name, ctx)
        done.append((name, root / name))
        prev = root / name
    return finalize(root / "ingest", done, root / "out")


def test_a_curation_run_whose_documents_all_fail_keeps_nothing_and_rejects_each_with_its_reason(tmp_path):
    """The reported crash: after heuristics kept nothing, the next step died on 'No files found .../kept!'."""
    cfg = CurationConfig(executor=ExecutorConfig(tasks=1, workers=1), ingest=IngestConfig(shards=2))
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"d{i}", "text": f"x{i}"}) + "\n" for i in range(5)) + "{broken\n")
    later = list(STEP_ORDER[STEP_ORDER.index("heuristics") + 1:])  # every step after it, assets and all
    report = _curate(cfg, raw, tmp_path, ["heuristics", *later])
    assert report["counts"] == {"input_lines": 6, "kept": 0, "rejected": 5, "quarantined": 1}
    assert report["reasons"] == {"gopher_quality": 5}
    out = tmp_path / "out"
    assert (out / KEPT).is_dir() and _gz_lines(out / KEPT) == []
    rejected = _gz_lines(out / REJECTED)
    assert sorted(r["id"] for r in rejected) == [f"d{i}" for i in range(5)]
    assert all(r["reason"] == "gopher_quality" and r["detail"] and r["step"] == "heuristics" for r in rejected)
    for name in later:  # each later step passed the empty result on, and says why
        stats = json.loads((tmp_path / name / "stats.json").read_text())
        assert (stats["in"], stats["kept"], stats["rejected"]) == (0, 0, 0) and "no documents" in stats["skipped"]

    # and the empty curated output into the mix: an error naming the input
    with pytest.raises(DataValidationError, match="no .*jsonl.* files in .*out/kept"):
        mix(MixConfig(), [out], tmp_path / "mix")


def test_a_run_where_every_line_is_quarantined_passes_an_empty_result_through_every_step(tmp_path):
    cfg = CurationConfig(ingest=IngestConfig(shards=2))
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b'{"id": 1}\n\xff\xfe\n[1]\n')
    report = _curate(cfg, raw, tmp_path, list(STEP_ORDER))  # no step runs, none needs its assets
    assert report["counts"] == {"input_lines": 3, "kept": 0, "rejected": 0, "quarantined": 3}


def _mixture(root: Path, docs: list[dict]) -> Path:
    (root / "data").mkdir(parents=True)
    with gzip.open(root / "data" / "00000.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs)
    return root


def test_mix_and_tokenizer_refuse_empty_inputs_naming_them(tmp_path):
    empty = _mixture(tmp_path / "empty", [])
    with pytest.raises(DataValidationError, match=r"empty.*nothing to mix|nothing to mix") as err:
        mix(MixConfig(), [empty / "data" / "00000.jsonl.gz"], tmp_path / "mix")
    assert "00000.jsonl.gz" in str(err.value)
    with pytest.raises(DataValidationError, match="no documents with text to train the tokenizer") as err:
        train_tokenizer(TokenizerConfig(vocab_size=300), [empty], tmp_path / "tok-empty")
    assert "00000.jsonl.gz" in str(err.value)

    one = _mixture(tmp_path / "one", [{"id": "a", "text": "The quick brown fox jumps over the lazy dog.",
                                       "source": "web"}])
    tok = tmp_path / "tok"
    train_tokenizer(TokenizerConfig(vocab_size=300), [one], tok)  # one document is enough to train on
    with pytest.raises(DataValidationError, match="no documents with text to tokenize") as err:
        tokenize_corpus(TokenizeConfig(), tok, [empty], tmp_path / "tokens-empty")
    assert "00000.jsonl.gz" in str(err.value) and not (tmp_path / "tokens-empty").exists()
    with pytest.raises(DataValidationError, match="held-out split, none is left to train on"):
        tokenize_corpus(TokenizeConfig(heldout_fraction=0.99), tok, [one], tmp_path / "tokens-one")


def test_pretrain_and_sft_refuse_too_small_data_naming_it(tmp_path):
    from stages.model import ModelConfig, build_model
    from stages.pretrain import PretrainConfig, pretrain
    from stages.sft import SFTConfig, sft
    from stages.sft_data import SFTTokenizeConfig

    split = write_split(tmp_path / "train", [np.arange(5)], ["web"], vocab_size=64)
    cfg = PretrainConfig(steps=2, seq_len=32, batch_tokens=64, micro_batch_size=2, num_threads=1)
    model = ModelConfig.from_flavour("debug", attn_implementation="eager")
    with pytest.raises(DataValidationError, match=r"5 tokens in 1 documents: too few .*seq_len=32") as err:
        pretrain(cfg, model, split, None, tmp_path / "run")
    assert str(split) in str(err.value)

    with pytest.raises(DataValidationError, match="no conversations to fine-tune on"):
        sft(SFTConfig(), tmp_path / "no-model", tmp_path / "no-tok", [], tmp_path / "sft-empty")
    one = _mixture(tmp_path / "corpus", [{"id": f"d{i}", "text": f"What is {i} plus {i}? It is {2 * i}.",
                                          "source": "qa"} for i in range(20)])
    tok = tmp_path / "tok"
    train_tokenizer(TokenizerConfig(vocab_size=300), [one], tok)
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    vocab = len(AutoTokenizer.from_pretrained(str(tok), local_files_only=True))
    build_model(model, vocab, seed=0).save_pretrained(base)
    conv = [{"id": "c0", "source": "qa", "license": "test",
             "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    scfg = SFTConfig(train=PretrainConfig(seq_len=256, batch_tokens=512, micro_batch_size=2),
                     tokenize=SFTTokenizeConfig(heldout_fraction=0.0))
    with pytest.raises(DataValidationError, match=r"1 conversation\(s\) give \d+ training tokens: too few") as err:
        sft(scfg, base, tok, conv, tmp_path / "sft-one")
    assert "train.seq_len=256" in str(err.value) and str(tmp_path / "sft-one") in str(err.value)
