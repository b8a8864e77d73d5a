"""The preference inbox scanner: any fsspec URL (here the in-memory filesystem), new or changed files only."""

from __future__ import annotations

import json

import fsspec

from tasks.preferences import inbox_files, localise


def test_inbox_lists_exports_on_any_fsspec_filesystem_and_copies_them_locally(tmp_path):
    fs = fsspec.filesystem("memory")
    rec = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "No.", "rating": "better", "category": "helpfulness",
           "annotator_id": "a"}
    fs.pipe("/inbox/week1.jsonl", (json.dumps(rec) + "\n").encode())
    fs.pipe("/inbox/sub/week2.parquet", b"PAR1")
    fs.pipe("/inbox/.partial.jsonl", b"{}")  # hidden: an upload in progress
    fs.pipe("/inbox/notes.txt", b"not an export")
    found = inbox_files("memory://inbox")
    assert sorted(found) == ["memory:///inbox/sub/week2.parquet", "memory:///inbox/week1.jsonl"]
    local = localise("memory:///inbox/week1.jsonl", tmp_path / "cache")
    assert json.loads(open(local).read()) == rec and str(tmp_path) in local
    # a changed file gets a new stamp, an unchanged one keeps it
    before = found["memory:///inbox/week1.jsonl"]
    fs.pipe("/inbox/week1.jsonl", (json.dumps(rec) + "\n" + json.dumps(rec) + "\n").encode())
    assert inbox_files("memory://inbox")["memory:///inbox/week1.jsonl"] != before
    assert inbox_files("memory://nowhere") == {}
    local_dir = tmp_path / "box"
    local_dir.mkdir()
    (local_dir / "a.jsonl").write_text("{}\n")
    assert list(inbox_files(str(local_dir))) == [str(local_dir / "a.jsonl")]
    assert localise(str(local_dir / "a.jsonl"), tmp_path / "cache") == str(local_dir / "a.jsonl")
