"""Malformed input is quarantined with file, line and field; nothing is silently dropped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.curation.base import KEPT, iter_shard_records
from stages.curation.ingest import IngestConfig, ingest, resolve_inputs
from stages.errors import DataValidationError

GOOD = "The quick brown fox jumps over the lazy dog near the river bank."


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine" / "quarantine.jsonl").read_text().splitlines()]


def test_every_kind_of_bad_line_is_quarantined_with_its_line_and_field(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "a", "text": GOOD, "url": "https://example.org/a", "source": "web"}).encode(),
        b'{"id": "b", "text": "unterminated',                         # 2 bad JSON
        json.dumps({"id": "c"}).encode(),                              # 3 missing text
        json.dumps({"id": "d", "text": "   "}).encode(),               # 4 empty text
        json.dumps({"id": "e", "text": 42}).encode(),                  # 5 wrong type
        b'{"id": "f", "text": "caf\xe9"}',                              # 6 not UTF-8
        b"",                                                            # 7 blank: ignored
        json.dumps({"id": "a", "text": GOOD + " again"}).encode(),     # 8 duplicate id
        json.dumps({"id": "g", "text": GOOD, "metadata": [1]}).encode(),  # 9 metadata not an object
        json.dumps({"id": 7, "text": GOOD, "source": "books"}).encode(),  # 10 integer id is fine
        json.dumps(["not", "an", "object"]).encode(),                  # 11
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    stats = ingest(IngestConfig(shards=3), [src], tmp_path / "out")
    q = {r["line"]: r for r in _quarantine(tmp_path / "out")}
    assert sorted(q) == [2, 3, 4, 5, 6, 8, 9, 11]
    assert q[2]["error"].startswith("bad JSON") and q[2]["file"] == str(src)
    assert (q[3]["field"], q[3]["error"]) == ("text", "missing")
    assert (q[4]["field"], q[4]["error"]) == ("text", "empty")
    assert q[5]["field"] == "text" and "got int" in q[5]["error"]
    assert "UTF-8" in q[6]["error"]
    assert q[8]["field"] == "id" and "in.jsonl:1" in q[8]["error"]
    assert q[9]["field"] == "metadata"
    assert stats["in"] == 10 and stats["blank_lines"] == 1
    assert stats["kept"] + stats["quarantined"] == stats["in"]
    kept = {r["id"]: r for r in iter_shard_records(tmp_path / "out" / KEPT)}
    assert set(kept) == {"a", "7"}
    assert kept["a"]["metadata"]["url"] == "https://example.org/a"
    assert kept["7"]["metadata"]["source"] == "books" and kept["a"]["metadata"]["origin"] == "in.jsonl:1"


def test_truncated_gzip_and_parquet(tmp_path: Path) -> None:
    gz = tmp_path / "t.jsonl.gz"
    payload = gzip.compress(b"".join(json.dumps({"id": f"x{i}", "text": GOOD}).encode() + b"\n" for i in range(200)))
    gz.write_bytes(payload[: len(payload) // 2])  # cut in the middle
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": [GOOD, None]}), pq_path)
    stats = ingest(IngestConfig(shards=2), resolve_inputs(tmp_path), tmp_path / "out")
    q = _quarantine(tmp_path / "out")
    assert any("unreadable after line" in r["error"] and r["file"].endswith("t.jsonl.gz") for r in q)
    assert any(r["file"].endswith("p.parquet") and r["line"] == 2 and r["field"] == "text" for r in q)
    assert stats["kept"] >= 2  # the readable head of the gzip and the good Parquet row
    assert stats["kept"] + stats["quarantined"] == stats["in"]


def test_sharding_does_not_depend_on_input_order(tmp_path: Path) -> None:
    docs = [{"id": f"d{i}", "text": f"{GOOD} {i}"} for i in range(50)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(d) + "\n" for d in docs))
    b.write_text("".join(json.dumps(d) + "\n" for d in reversed(docs)))
    ingest(IngestConfig(shards=4), [a], tmp_path / "oa")
    ingest(IngestConfig(shards=4), [b], tmp_path / "ob")
    for sa, sb in zip(sorted((tmp_path / "oa" / KEPT).iterdir()), sorted((tmp_path / "ob" / KEPT).iterdir())):
        ids_a = sorted(json.loads(x)["id"] for x in sa.read_text().splitlines())
        ids_b = sorted(json.loads(x)["id"] for x in sb.read_text().splitlines())
        assert ids_a == ids_b


def test_missing_input_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="nothing-here"):
        resolve_inputs([tmp_path / "nothing-here" / "*.jsonl"])
