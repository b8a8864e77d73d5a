"""One bad row never sinks a batch: `herd preferences ingest` and `herd curate` read every line on its own.

Real files with the broken bytes (not UTF-8, NUL, BOM, CRLF, a multi-megabyte line), real gzip
truncation, real Parquet with a wrong column type; and a seeded property test over random mixtures of
valid and broken rows checking, for both commands, input rows = accepted + quarantined (+ duplicates).
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.curation.base import KEPT, iter_shard_records
from stages.curation.finalize import finalize
from stages.curation.ingest import IngestConfig, ingest
from stages.curation.pipeline import CurationConfig, StepContext, run_step
from stages.errors import DataValidationError
from stages.preferences import batch_dirs, ingest_file, read_batch
from stages.rows import read_lines

WORDS = ("river", "valley", "mill", "church", "sea", "forest", "stone", "bridge", "garden", "harbour", "lantern")


def _pref(i: int, **over) -> dict:
    base = {"id": f"r{i}", "prompt": f"How do I sort a list, case {i}?", "chosen": f"Use sorted(xs). ({i})",
            "rejected": f"I don't know. ({i})", "edited": None, "rating": "better", "category": "helpfulness",
            "annotator_id": "ann-1"}
    return {**base, **over}


def _doc(i: int, **over) -> dict:
    return {"id": f"d{i}", "text": f"The boat {i} sailed past the old mill toward the distant sea.", **over}


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _prefs(path: Path, root: Path, **kw):
    res, _ = ingest_file(path, root, **kw)
    files = sorted((root / "quarantine").glob("*.jsonl")) if (root / "quarantine").is_dir() else []
    q = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    return res, q


def _accepted_prefs(root: Path) -> list[dict]:
    return [r for d in batch_dirs(root) for r in read_batch(d)]


def _curate(inputs: list[Path], out: Path, **ingest_kw) -> tuple[dict, list[dict], dict]:
    """Ingest, one real step (exact dedup, in-process) and finalize: (ingest stats, quarantine, report)."""
    cfg = CurationConfig().derive(ingest=IngestConfig(shards=2, **ingest_kw).model_dump())
    stats = ingest(cfg.ingest, inputs, out / "ingest")
    run_step("exact_dedup", cfg, out / "ingest", out / "exact_dedup", StepContext(cache_dir=out / "cache"))
    report = finalize(out / "ingest", [("exact_dedup", out / "exact_dedup")], out / "final")
    q = [json.loads(x) for x in (out / "final" / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    return stats, q, report


def _offsets(data: bytes) -> list[int]:
    """Byte offset of every line's first byte."""
    offs, at = [], 0
    for piece in data.split(b"\n"):
        offs.append(at)
        at += len(piece) + 1
    return offs


# ------------------------------------------------------------------------------------------ not UTF-8


def test_an_undecodable_line_is_quarantined_with_its_true_line_and_offset(tmp_path: Path) -> None:
    """The reported bug: one bad line used to reject the whole export, naming a line read ahead of it."""
    prefs = [_line(_pref(i, chosen="Use sorted(xs). " * 20 + str(i))) for i in range(200)]
    docs = [_line(_doc(i, text=("The boat sailed past the old mill. " * 10) + str(i))) for i in range(200)]
    for lines, bad_at in ((prefs, 120), (docs, 150)):
        lines[bad_at] = lines[bad_at].replace(b"sorted" if lines is prefs else b"boat", b"caf\xe9\xff")
    p_src, c_src = tmp_path / "export.jsonl", tmp_path / "docs.jsonl"
    p_src.write_bytes(b"\n".join(prefs) + b"\n")
    c_src.write_bytes(b"\n".join(docs) + b"\n")

    res, q = _prefs(p_src, tmp_path / "prefs")
    assert (res.accepted, res.quarantined, res.duplicates) == (199, 1, 0)
    assert (q[0]["line"], q[0]["offset"], q[0]["field"]) == (121, _offsets(p_src.read_bytes())[120], None)
    assert "not UTF-8" in q[0]["reason"] and "0xe9" in q[0]["reason"] and "\\xe9" in q[0]["raw"]
    assert len(_accepted_prefs(tmp_path / "prefs")) == 199

    stats, cq, report = _curate([c_src], tmp_path / "cur")
    assert [(r["line"], r["offset"]) for r in cq] == [(151, _offsets(c_src.read_bytes())[150])]
    assert "UTF-8" in cq[0]["error"] and cq[0]["file"] == str(c_src)
    assert report["counts"] == {"input_lines": 200, "kept": 199, "rejected": 0, "quarantined": 1}


# ------------------------------------------------------------------------------------------ BOM, CRLF, NUL


def test_bom_and_crlf_are_read_and_nul_bytes_are_quarantined(tmp_path: Path) -> None:
    def write(path: Path, rows: list[bytes]) -> Path:
        path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows) + b"\r\n")
        return path

    p = write(tmp_path / "p.jsonl", [_line(_pref(0)), _line(_pref(1)),
                                     _line(_pref(2)).replace(b"sorted", b"sor\x00ted"),     # raw NUL byte
                                     _line(_pref(3, chosen="a\u0000b")),                    # escaped NUL
                                     _line(_pref(4, rejected="x\ud800y")),                  # lone surrogate
                                     _line(_pref(5))])
    res, q = _prefs(p, tmp_path / "prefs")
    assert (res.accepted, res.quarantined) == (3, 3)
    by_line = {r["line"]: r for r in q}
    assert "NUL byte" in by_line[3]["reason"] and by_line[3]["offset"] == _offsets(p.read_bytes())[2]
    assert (by_line[4]["field"], "NUL" in by_line[4]["reason"]) == ("chosen", True)
    assert by_line[5]["field"] == "rejected" and "surrogate" in by_line[5]["reason"]
    stored = _accepted_prefs(tmp_path / "prefs")
    assert [r["source_line"] for r in stored] == [1, 2, 6]
    assert not any("\r" in r["annotator_id"] or "\ufeff" in r["id"] for r in stored)

    c = write(tmp_path / "c.jsonl", [_line(_doc(0)), _line(_doc(1)).replace(b"boat", b"bo\x00at"),
                                     _line(_doc(2, text="x\u0000y")), _line(_doc(3, text="x\udc80y")),
                                     _line(_doc(4, metadata={"n": 2**70})), _line(_doc(5))])
    stats, cq, report = _curate([c], tmp_path / "cur")
    assert report["counts"] == {"input_lines": 6, "kept": 2, "rejected": 0, "quarantined": 4}
    assert {r["line"]: r["field"] for r in cq} == {2: None, 3: "text", 4: "text", 5: "metadata"}
    kept = {r["id"] for r in iter_shard_records(tmp_path / "cur" / "ingest" / KEPT)}
    assert kept == {"d0", "d5"}  # the BOM'd first line and the last one


# ------------------------------------------------------------------------------------------ long lines


def test_a_multi_megabyte_line_is_kept_and_one_over_the_limit_is_quarantined_alone(tmp_path: Path) -> None:
    big_text = " ".join(random.Random(0).choice(WORDS) for _ in range(500_000))  # ~3.4 MB
    p = tmp_path / "p.jsonl"
    p.write_bytes(b"\n".join([_line(_pref(0, chosen=big_text)), _line(_pref(1))]) + b"\n")
    res, q = _prefs(p, tmp_path / "prefs")
    assert (res.accepted, res.quarantined) == (2, 0)
    assert _accepted_prefs(tmp_path / "prefs")[0]["chosen"] == big_text

    res, q = _prefs(p, tmp_path / "prefs-capped", max_line_bytes=1 << 20)
    assert (res.accepted, res.quarantined) == (1, 1)
    assert q[0]["line"] == 1 and q[0]["offset"] == 0
    assert "line too long" in q[0]["reason"] and "over the 1048576 byte limit" in q[0]["reason"]
    assert len(q[0]["raw"]) <= 10_000

    c = tmp_path / "c.jsonl"
    c.write_bytes(b"\n".join([_line(_doc(0, text=big_text)), _line(_doc(1)), _line(_doc(2, text=big_text + "!"))]))
    stats, cq, report = _curate([c], tmp_path / "cur")
    assert report["counts"]["kept"] == 3 and not cq
    stats, cq, report = _curate([c], tmp_path / "cur-capped", max_line_bytes=1 << 20)
    assert report["counts"] == {"input_lines": 3, "kept": 1, "rejected": 0, "quarantined": 2}
    assert [(r["line"], r["offset"]) for r in cq] == [(1, 0), (3, _offsets(c.read_bytes())[2])]
    assert all("byte limit" in r["error"] and len(r["raw"]) <= 2000 for r in cq)


# ------------------------------------------------------------------------------------------ truncated gzip


def _gzip_with_boundaries(lines: list[bytes]) -> tuple[bytes, list[int]]:
    """A real gzip member, sync-flushed after every line; boundaries[k] = compressed size holding lines[:k]."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    out, bounds = bytearray(c.compress(b"")), []
    for line in lines:
        bounds.append(len(out) + len(c.flush(zlib.Z_NO_FLUSH)))
        out += c.compress(line + b"\n") + c.flush(zlib.Z_SYNC_FLUSH)
    bounds.append(len(out))
    out += c.flush()
    return bytes(out), bounds


@pytest.mark.parametrize("where", ["mid_line", "on_boundary", "in_trailer"])
def test_a_truncated_gzip_member_keeps_every_line_before_the_cut(tmp_path: Path, where: str) -> None:
    n = 60
    prefs = [_line(_pref(i)) for i in range(n)]
    docs = [_line(_doc(i)) for i in range(n)]
    for name, lines in (("prefs", prefs), ("docs", docs)):
        data, bounds = _gzip_with_boundaries(lines)
        assert gzip.decompress(data).count(b"\n") == n
        k = 37
        cut = {"mid_line": (bounds[k] + bounds[k + 1]) // 2, "on_boundary": bounds[k],
               "in_trailer": len(data) - 4}[where]
        complete = n if where == "in_trailer" else k
        src = tmp_path / f"{name}-{where}.jsonl.gz"
        src.write_bytes(data[:cut])
        if name == "prefs":
            res, q = _prefs(src, tmp_path / "prefs")
            assert (res.accepted, res.quarantined) == (complete, 1)
            assert [r["source_line"] for r in _accepted_prefs(tmp_path / "prefs")] == list(range(1, complete + 1))
            reason = q[0]["reason"]
        else:
            stats, q, report = _curate([src], tmp_path / "cur")
            assert report["counts"] == {"input_lines": complete + 1, "kept": complete, "rejected": 0, "quarantined": 1}
            reason = q[0]["error"]
        assert q[0]["line"] == complete + 1 and f"unreadable after line {complete}" in reason
        assert "truncated gzip" in reason


def test_reader_reads_every_gzip_member_and_names_a_corrupt_one(tmp_path: Path) -> None:
    a, b = b"".join(_line(_doc(i)) + b"\n" for i in range(5)), b"".join(_line(_doc(i)) + b"\n" for i in range(5, 8))
    src = tmp_path / "multi.jsonl.gz"
    src.write_bytes(gzip.compress(a) + gzip.compress(b))
    assert [ln.number for ln in read_lines(src) if ln.error is None] == list(range(1, 9))
    src.write_bytes(gzip.compress(a) + b"this is not gzip")
    lines = list(read_lines(src))
    assert [ln.error is None for ln in lines] == [True] * 5 + [False]
    assert "corrupt gzip data" in lines[-1].error and lines[-1].offset == len(a)


# ------------------------------------------------------------------------------------------ Parquet


def test_parquet_with_a_wrong_column_type_is_read_row_by_row(tmp_path: Path) -> None:
    rows = [_pref(i) for i in range(5)]
    table = pa.Table.from_pylist(rows).set_column(  # "edited" as int64: a wrong column type
        list(rows[0]).index("edited"), "edited", pa.array([None, 7, None, None, 9], pa.int64()))
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)  # rows 1-2, 3-4, 5
    res, q = _prefs(tmp_path / "p.parquet", tmp_path / "prefs")
    assert (res.accepted, res.quarantined) == (3, 2)
    assert [(r["line"], r["offset"], r["field"]) for r in q] == [(2, None, "edited"), (5, None, "edited")]

    table = pa.table({"id": [f"d{i}" for i in range(5)], "text": [_doc(i)["text"] for i in range(5)],
                      "url": pa.array([None, 3, None, 4, None], pa.int64())})  # url as int64
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    stats, cq, report = _curate([tmp_path / "c.parquet"], tmp_path / "cur")
    assert report["counts"] == {"input_lines": 5, "kept": 3, "rejected": 0, "quarantined": 2}
    assert [(r["line"], r["field"]) for r in cq] == [(2, "url"), (4, "url")]

    # a value Python cannot hold (a timestamp past year 9999): that row alone, the rest of its row group is read
    table = table.append_column("seen", pa.array([0, 0, 2**62, 0, 0], pa.timestamp("us")))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=5)
    stats, cq, report = _curate([tmp_path / "t.parquet"], tmp_path / "cur-t")
    assert report["counts"] == {"input_lines": 5, "kept": 2, "rejected": 0, "quarantined": 3}
    assert [(r["line"], r["field"]) for r in cq] == [(2, "url"), (3, None), (4, "url")]
    assert cq[1]["error"].startswith("row cannot be converted")


def test_an_unreadable_parquet_file_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataValidationError) as err:
        ingest_file(bad, tmp_path / "prefs")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    good = tmp_path / "good.jsonl"
    good.write_bytes(_line(_doc(0)) + b"\n")
    stats, cq, report = _curate([bad, good], tmp_path / "cur")  # curation: the other files still go through
    assert [(r["file"], r["line"]) for r in cq] == [(str(bad), 1)] and report["counts"]["kept"] == 1


# ------------------------------------------------------------------------------------------ property


BROKEN = ("bad_json", "not_utf8", "raw_nul", "escaped_nul", "surrogate", "schema", "not_object", "overlong")
MAX_LINE = 4096


def _random_case(rng: random.Random, kind: str) -> tuple[list[bytes], dict]:
    """Lines of one export mixing valid and broken rows, and what each command must make of them."""
    make = _pref if kind == "prefs" else _doc
    lines: list[bytes] = []
    bad: set[int] = set()  # line numbers that must be quarantined
    valid: dict[int, dict] = {}  # content key -> the first valid row with it
    repeats = 0  # valid rows repeating an earlier row's content under another id
    for _ in range(rng.randint(0, 40)):
        r, i = rng.random(), len(lines)
        if r < 0.1:
            lines.append(rng.choice([b"", b"   ", b"\t"]))
        elif r < 0.5 or (r < 0.6 and not valid):
            obj = make(i, **({"prompt": f"{rng.choice(WORDS)} {i}?"} if kind == "prefs"
                             else {"text": f"The {rng.choice(WORDS)} {i} stood by the sea."}))
            valid[i] = obj
            lines.append(_line(obj))
        elif r < 0.6:  # the same content as an earlier valid row, under another id
            lines.append(_line({**valid[rng.choice(sorted(valid))], "id": f"again-{i}"}))
            repeats += 1
        else:
            base = _line(make(i))
            lines.append({
                "bad_json": base[: rng.randrange(1, len(base) - 1)],
                "not_utf8": base.replace(b"sorted" if kind == "prefs" else b"boat",
                                         bytes([rng.choice([0xff, 0xc3, 0xe9])])),
                "raw_nul": base[:10] + b"\x00" + base[10:],
                "escaped_nul": _line(make(i, **({"chosen": "a\u0000b"} if kind == "prefs" else {"text": "a\u0000b"}))),
                "surrogate": _line(make(i, **({"rejected": "a\ud800b"} if kind == "prefs" else {"text": "a\ud800b"}))),
                "schema": _line({k: v for k, v in make(i).items() if k not in ("chosen", "text")}),
                "not_object": rng.choice([b"[1, 2]", b"42", b'"text"', b"null"]),
                "overlong": _line(make(i, **({"chosen": "x" * MAX_LINE} if kind == "prefs"
                                             else {"text": "x " * MAX_LINE}))),
            }[rng.choice(BROKEN)])
            bad.add(len(lines))
    return lines, {"bad": bad, "unique": len(valid), "repeats": repeats}


def _write_case(rng: random.Random, lines: list[bytes], path: Path) -> Path:
    eol = rng.choice([b"\n", b"\r\n"])
    data = eol.join(lines) + (eol if rng.random() < 0.7 or not lines or not lines[-1].strip() else b"")
    if rng.random() < 0.3 and lines:
        data = b"\xef\xbb\xbf" + data
    if rng.random() < 0.3:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("seed", range(30))
def test_property_every_input_row_is_accepted_quarantined_or_a_duplicate(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)

    lines, want = _random_case(rng, "prefs")
    src = _write_case(rng, lines, tmp_path / "export.jsonl")
    rows = sum(1 for x in lines if x.strip())
    res, q = _prefs(src, tmp_path / "prefs", max_line_bytes=MAX_LINE)
    assert res.accepted + res.quarantined + res.duplicates == rows
    assert {r["line"] for r in q} == want["bad"]
    assert res.duplicates == want["repeats"]
    assert res.accepted == want["unique"] == len(_accepted_prefs(tmp_path / "prefs"))

    lines, want = _random_case(rng, "docs")
    src = _write_case(rng, lines, tmp_path / "docs.jsonl")
    rows = sum(1 for x in lines if x.strip())
    stats, q, report = _curate([src], tmp_path / "cur", max_line_bytes=MAX_LINE)
    c = report["counts"]
    assert c["input_lines"] == rows == c["kept"] + c["rejected"] + c["quarantined"]
    assert {r["line"] for r in q} == want["bad"]
    # a repeated text under a new id is an exact duplicate: rejected with its reason, never lost
    assert c["rejected"] == want["repeats"] == report["reasons"].get("exact_dup", 0)
    assert c["kept"] == want["unique"]


# ------------------------------------------------------------------------------------------ the reader itself


@pytest.mark.parametrize("seed", range(20))
def test_reader_agrees_with_a_plain_split_however_the_bytes_are_chunked(tmp_path: Path, monkeypatch,
                                                                         seed: int) -> None:
    import stages.rows as rows

    rng = random.Random(seed)
    monkeypatch.setattr(rows, "CHUNK_BYTES", rng.choice([1, 3, 16, 1 << 20]))
    limit = rng.choice([12, 40, 1 << 20])
    alphabet = [b"a", b"bc", "\u00e9".encode(), b"\r", b"\xff", b"\x00", b"\xef\xbb\xbf", b" ", b"{}"]
    lines = [b"".join(rng.choices(alphabet, weights=[20, 20, 5, 2, 1, 1, 1, 5, 5], k=rng.randrange(0, 30)))
             for _ in range(rng.randrange(0, 25))]
    data = b"\n".join(lines) + (b"\n" if lines and rng.random() < 0.6 else b"")
    path = tmp_path / ("x.jsonl.gz" if rng.random() < 0.5 else "x.jsonl")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)

    want, offset = [], 0
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()  # the file ends with a line ending
    for n, piece in enumerate(pieces, 1):
        ended = offset + len(piece) < len(data)
        body = piece[:-1] if piece.endswith(b"\r") else piece
        body = body[3:] if body.startswith(b"\xef\xbb\xbf") else body
        if (len(piece) + 1 if ended else len(piece)) > limit:
            got = "too long"
        elif b"\x00" in piece:
            got = "NUL"
        else:
            try:
                got = body.decode("utf-8")
            except UnicodeDecodeError:
                got = "not UTF-8"
        want.append((n, offset, got))
        offset += len(piece) + 1
    seen = [(ln.number, ln.offset, ln.text if ln.error is None else
             "too long" if ln.error.startswith("line too long") else ln.error.split(":")[0].split(" byte")[0])
            for ln in rows.read_lines(path, max_line_bytes=limit)]
    assert seen == want
