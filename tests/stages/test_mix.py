"""Mixture sampling against the Llama 1 table, on synthetic corpora scaled by 1e-6.

Each synthetic source holds the tokens the table implies (``share * 1.4T / epochs``, times the scale)
written with word lengths chosen so its disk size is the table's disk size times the scale.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stages.errors import ConfigError
from stages.mix import (
    LLAMA1_TABLE,
    LLAMA1_TO_HERD,
    MixConfig,
    llama1_shares,
    mix,
    register_token_counter,
    sample_source,
)

LLAMA1_TOKENS = 1.4e12


def _vocab(rng: np.random.Generator) -> dict[int, list[str]]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return {n: ["".join(rng.choice(letters, n)) for _ in range(200)] for n in range(1, 12)}


def _docs(n_tokens: int, n_bytes: float, rng: np.random.Generator, vocab) -> list[str]:
    """Documents of 50..1500 words totalling ``n_tokens`` words and about ``n_bytes`` bytes."""
    mean_len = n_bytes / n_tokens - 1.0  # one separator per word
    lo = math.floor(mean_len)
    lengths = lo + (rng.random(n_tokens) < mean_len - lo)
    picks = rng.integers(0, 200, n_tokens)
    words = [vocab[int(n)][int(p)] for n, p in zip(lengths, picks)]
    docs, start = [], 0
    while start < n_tokens:
        size = int(rng.integers(50, 1500))
        docs.append(" ".join(words[start:start + size]))
        start += size
    return docs


def build_llama1_corpus(root: Path, scale: float, herd_labels: bool = False) -> tuple[list[Path], dict]:
    """One input per Llama 1 source: web-like sources as ``.jsonl.gz`` with ``source``, others as shard folders."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    vocab = _vocab(rng)
    inputs, tokens = [], {}
    for name, row in LLAMA1_TABLE.items():
        n_tokens = round(row["share"] * LLAMA1_TOKENS * scale / row["epochs"])
        tokens[name] = n_tokens
        label = LLAMA1_TO_HERD[name] if herd_labels else name
        docs = _docs(n_tokens, row["disk_bytes"] * scale, rng, vocab)
        if name in ("CommonCrawl", "C4"):
            path = root / f"{name}.jsonl.gz"
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                for i, t in enumerate(docs):
                    fh.write(json.dumps({"id": f"{name}-{i}", "text": t, "source": label}) + "\n")
        else:
            path = root / name
            (path / "kept").mkdir(parents=True)
            with open(path / "kept" / "00000.jsonl", "w") as fh:
                for i, t in enumerate(docs):
                    fh.write(json.dumps({"id": f"{name}-{i}", "text": t, "metadata": {"source": label, "url": None}})
                             + "\n")
        inputs.append(path)
    return inputs, tokens


@pytest.fixture(scope="module")
def llama1_corpus(tmp_path_factory):
    return build_llama1_corpus(tmp_path_factory.mktemp("llama1"), 1e-6)


def test_epochs_and_shares_match_llama1_table(llama1_corpus, tmp_path):
    inputs, _ = llama1_corpus
    names = tuple(LLAMA1_TABLE)
    cfg = MixConfig(shares={k: v["share"] for k, v in LLAMA1_TABLE.items()}, known_sources=names,
                    tokens=round(LLAMA1_TOKENS * 1e-6))
    result = mix(cfg, inputs, tmp_path / "mix")
    rows = {r["source"]: r for r in result["table"]["sources"]}
    for name, ref in LLAMA1_TABLE.items():
        r = rows[name]
        assert round(r["epochs"], 2) == ref["epochs"], name
        assert abs(r["realised_share"] - ref["share"]) < 0.005, name
        assert abs(r["realised_epochs"] - ref["epochs"]) < 0.02, name
        assert abs(r["disk_bytes"] / (ref["disk_bytes"] * 1e-6) - 1) < 0.02, name  # 3.3 MB for CommonCrawl...
    assert [r["source"] for r in result["table"]["sources"]][:2] == ["CommonCrawl", "C4"]
    md = (tmp_path / "mix" / "table.md").read_text()
    assert "| CommonCrawl | 67.0% |" in md and "| 1.10 |" in md and "3.3 MB" in md

    # output: every document accounted for, repeated documents carry <id>#<epoch>
    recs = []
    for path in sorted((tmp_path / "mix" / "data").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as fh:
            recs.extend(json.loads(x) for x in fh)
    assert len(recs) == result["documents"] and len({r["id"] for r in recs}) == len(recs)
    wiki = [r for r in recs if r["metadata"]["source"] == "Wikipedia"]
    assert any(r["id"].endswith("#2") for r in wiki) and not any(r["id"].endswith("#3") for r in wiki)
    assert sum(r["metadata"]["tokens"] for r in recs) == result["tokens"]
    assert not any("#" in r["id"] for r in recs if r["metadata"]["source"] == "Github")  # 0.64 epochs


def test_default_shares_on_herd_labels(tmp_path):
    shares = llama1_shares()
    assert set(shares) == {"web", "code", "reference", "books", "qa"}
    assert math.isclose(shares["web"], 0.82 / 0.975) and math.isclose(sum(shares.values()), 1.0)
    inputs, _ = build_llama1_corpus(tmp_path / "corpus", 1e-7, herd_labels=True)
    arxiv = [p for p in inputs if p.name == "ArXiv"][0]
    inputs = [p for p in inputs if p != arxiv]  # herd has no arXiv source
    result = mix(MixConfig(tokens=140_000), inputs, tmp_path / "mix")
    rows = {r["source"]: r for r in result["table"]["sources"]}
    assert set(rows) == set(shares)
    for name, share in shares.items():
        assert abs(rows[name]["realised_share"] - share) < 0.005, name


def test_mix_is_deterministic_and_seeded(tmp_path):
    inputs, _ = build_llama1_corpus(tmp_path / "corpus", 1e-7)
    cfg = MixConfig(shares={k: v["share"] for k, v in LLAMA1_TABLE.items()}, known_sources=tuple(LLAMA1_TABLE),
                    tokens=140_000, output_shards=2)

    def contents(out: Path) -> list[bytes]:
        return [gzip.open(p).read() for p in sorted((out / "data").glob("*.jsonl.gz"))]

    mix(cfg, inputs, tmp_path / "a")
    mix(cfg, list(reversed(inputs)), tmp_path / "b")
    mix(cfg.derive(seed=1), inputs, tmp_path / "c")
    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    assert contents(tmp_path / "a") != contents(tmp_path / "c")
    assert json.loads((tmp_path / "a" / "table.json").read_text()) == json.loads((tmp_path / "b" / "table.json")
                                                                                 .read_text())


def test_sample_source_fractional_epochs():
    tokens = [10] * 100
    ids = [f"d{i}" for i in range(100)]
    picks = sample_source(tokens, ids, 2500, seed=0, source="x")
    assert len(picks) == 250 and sum(e == 2 for _, e in picks) == 50
    assert sample_source(tokens, ids, 2500, seed=0, source="x") == picks
    assert sample_source(tokens, ids, 2500, seed=1, source="x") != picks
    assert sum(tokens[i] for i, _ in sample_source(tokens, ids, 333, 0, "x")) in (330, 340)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="shares: must sum to 1"):
        MixConfig(shares={"web": 0.5, "code": 0.4})
    with pytest.raises(ValueError, match=r"shares: unknown source\(s\) \['webb'\]"):
        MixConfig(shares={"webb": 1.0})
    with pytest.raises(ValueError, match="token_counter"):
        MixConfig(token_counter="bpe-not-trained")
    register_token_counter("chars", len)
    assert MixConfig(token_counter="chars").token_counter == "chars"

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "web.jsonl").write_text(json.dumps({"id": "a", "text": "one two three", "source": "web"}))
    with pytest.raises(ConfigError, match=r"shares: source\(s\) \['books'\]"):
        mix(MixConfig(shares={"web": 0.5, "books": 0.5}), [tmp_path / "in"], tmp_path / "out")
    res = mix(MixConfig(shares={"web": 0.5, "books": 0.5}, missing_sources="renormalise", tokens=9),
              [tmp_path / "in"], tmp_path / "out")
    assert res["tokens"] == 9 and res["table"]["sources"][0]["epochs"] == 3.0
