"""Preference-batch ingestion: validation with file/line/field, quarantine, duplicates, atomic batches."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.errors import ConfigError, DataValidationError
from stages.preferences import (
    PreferenceRecord,
    batch_dirs,
    ingest_file,
    read_batch,
    record_from_row,
    stored_digests,
)


def _rec(i: int, **over) -> dict:
    base = {"id": f"r{i}", "prompt": f"How do I sort a list, case {i}?", "chosen": f"Use sorted(xs). ({i})",
            "rejected": f"I don't know. ({i})", "edited": None, "rating": "better", "category": "helpfulness",
            "annotator_id": "ann-1"}
    return {**base, **over}


def _write(path: Path, rows: list, blank_lines: int = 0) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows] + [""] * blank_lines
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ingest_accepts_quarantines_and_counts_every_row(tmp_path):
    rows = [
        _rec(0),
        _rec(1, prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
             edited="Hello! (edited)", rating="significantly_better"),
        _rec(2, category="safety", rating="negligibly_better"),
        _rec(3, rating="much_better"),                      # bad enum
        {k: v for k, v in _rec(4).items() if k != "chosen"},  # missing field
        "{not json",                                        # broken line
        _rec(5, chosen="same", rejected="same"),            # not a comparison
        _rec(6, raiting="better"),                          # unknown field (typo)
        _rec(0, id="another-id"),                           # same content as row 1: duplicate
        _rec(7, prompt=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),  # ends on assistant
    ]
    src = _write(tmp_path / "export.jsonl", rows, blank_lines=2)
    res, batch = ingest_file(src, tmp_path / "prefs")
    assert (res.accepted, res.quarantined, res.duplicates) == (3, 6, 1)
    assert res.accepted + res.quarantined + res.duplicates == len(rows)
    assert batch is not None and res.batch_id == batch.name

    man = json.loads((batch / "manifest.json").read_text())
    assert man["rows"] == 3 and man["categories"] == {"helpfulness": 2, "safety": 1} and man["with_edits"] == 1
    stored = read_batch(batch)
    assert [r["source_line"] for r in stored] == [1, 2, 3]
    assert record_from_row(stored[1]).messages()[0] == {"role": "system", "content": "Be brief."}
    assert record_from_row(stored[0]) == PreferenceRecord.model_validate(_rec(0))

    quarantine = [json.loads(x) for x in next((tmp_path / "prefs" / "quarantine").glob("*.jsonl")).read_text().splitlines()]
    by_line = {q["line"]: q for q in quarantine}
    assert set(by_line) == {4, 5, 6, 7, 8, 10}
    assert by_line[4]["field"] == "rating" and "significantly_better" in by_line[4]["reason"]
    assert by_line[5]["field"] == "chosen" and "missing" in by_line[5]["reason"]
    assert by_line[6]["field"] is None and "invalid JSON" in by_line[6]["reason"]
    assert by_line[7]["field"] == "rejected" and "same text" in by_line[7]["reason"]
    assert by_line[8]["field"] == "raiting" and "unknown field" in by_line[8]["reason"]
    assert by_line[10]["field"] == "prompt" and "user" in by_line[10]["reason"]
    assert all(q["file"] == str(src) and q["raw"] for q in quarantine)


def test_reingesting_the_same_content_adds_nothing(tmp_path):
    src = _write(tmp_path / "a.jsonl", [_rec(i) for i in range(5)])
    first, _ = ingest_file(src, tmp_path / "prefs")
    again, batch = ingest_file(src, tmp_path / "prefs")
    assert first.accepted == 5 and again.model_dump() == {"batch_id": None, "accepted": 0, "quarantined": 0,
                                                          "duplicates": 5}
    assert batch is None and len(batch_dirs(tmp_path / "prefs")) == 1
    # a new export overlapping the old one stores only its new rows
    src2 = _write(tmp_path / "b.jsonl", [_rec(i) for i in range(3, 8)])
    res, _ = ingest_file(src2, tmp_path / "prefs", batch_id="week-2")
    assert (res.batch_id, res.accepted, res.duplicates) == ("week-2", 3, 2)
    assert len(stored_digests(tmp_path / "prefs")) == 8
    with pytest.raises(ConfigError, match="immutable"):
        ingest_file(_write(tmp_path / "c.jsonl", [_rec(99)]), tmp_path / "prefs", batch_id="week-2")
    with pytest.raises(ConfigError, match="batch id"):
        ingest_file(src2, tmp_path / "prefs", batch_id="../escape")


def test_parquet_input_and_missing_file(tmp_path):
    table = pa.Table.from_pylist([_rec(0), _rec(1, category="safety"), _rec(2, rating="bogus")])
    pq.write_table(table, tmp_path / "export.parquet")
    res, batch = ingest_file(tmp_path / "export.parquet", tmp_path / "prefs")
    assert (res.accepted, res.quarantined) == (2, 1)
    with pytest.raises(DataValidationError, match="no such file"):
        ingest_file(tmp_path / "nope.jsonl", tmp_path / "prefs")


def test_a_crash_mid_write_leaves_no_partial_batch(tmp_path, monkeypatch):
    import stages.preferences as prefs

    def boom(rows, path):
        path.write_bytes(b"half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(prefs, "_write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        ingest_file(_write(tmp_path / "a.jsonl", [_rec(0)]), tmp_path / "prefs")
    assert batch_dirs(tmp_path / "prefs") == []
    assert not [p for p in (tmp_path / "prefs" / "batches").iterdir() if not p.name.startswith(".")]
    monkeypatch.undo()
    res, _ = ingest_file(tmp_path / "a.jsonl", tmp_path / "prefs")
    assert res.accepted == 1  # nothing was recorded by the failed attempt
