"""Reading untrusted row files one row at a time: JSONL (plain or gzip) lines and Parquet rows.

One bad row never sinks a file. :func:`read_lines` reads bytes, splits them on ``\\n`` and decodes each
line on its own, so an undecodable line is reported with its true line number and byte offset while
every other line is still read. What it handles, line by line:

- bytes that are not UTF-8 and raw NUL bytes (a JSON text never holds one): the line gets an ``error``;
- a UTF-8 byte-order mark at the start of a line (the first line of many exports; concatenated exports
  carry one mid-file) and CRLF line endings: removed, the line is read normally;
- a line longer than ``max_line_bytes``: never held in memory whole; it gets an ``error`` naming its
  length and keeps only its first bytes as ``raw``;
- a truncated or corrupt gzip member: every line before the damage is read; the line the damage cuts
  (or, when the cut falls between lines, one extra line after the last) gets an ``error``.

``offset`` is the byte offset of the line's first byte in the file, or in the decompressed stream for
gzip. :func:`parquet_rows` reads a Parquet file row group by row group, falling back to single
rows when a group cannot be converted, so only the rows that cannot be read get an error.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from stages.errors import DataValidationError

BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 64 << 20  # default cap on one line; a longer one is reported, not read into memory
RAW_HEAD_BYTES = 64 << 10  # how much of an over-long line (or a line cut by gzip damage) is kept as raw


class Line(NamedTuple):
    """One physical line: ``text`` without its line ending, or ``error`` (then ``text`` is None)."""

    number: int
    offset: int
    text: str | None
    raw: bytes
    error: str | None = None

    @property
    def blank(self) -> bool:
        return self.text is not None and not self.text.strip()

    def raw_text(self, limit: int) -> str:
        """The line's bytes as text for a quarantine record: undecodable bytes as ``\\xNN``, at most ``limit`` chars."""
        if self.text is not None:
            return self.text[:limit]
        return self.raw[: limit * 4].decode("utf-8", "backslashreplace")[:limit]


def _decode(number: int, offset: int, body: bytes) -> Line:
    """One line's bytes (without its ``\\n``) to a :class:`Line`."""
    if body.endswith(b"\r"):
        body = body[:-1]
    skip = len(BOM) if body.startswith(BOM) else 0
    if b"\x00" in body:
        at = body.index(b"\x00")
        return Line(number, offset, None, body, f"NUL byte: at byte offset {offset + at} (column {at + 1}); "
                                                "binary data, not a JSON text line")
    try:
        text = body[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        return Line(number, offset, None, body, f"not UTF-8: byte 0x{body[at]:02x} at byte offset {offset + at} "
                                                f"(column {at + 1}) {exc.reason}; re-export the file as UTF-8")
    return Line(number, offset, text, body)


class _Damaged:
    """Marks the end of a damaged compressed stream in the chunk iterator."""

    def __init__(self, reason: str):
        self.reason = reason


def _plain_chunks(path: Path) -> Iterator[bytes | _Damaged]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk


def _gzip_chunks(path: Path) -> Iterator[bytes | _Damaged]:
    """Decompressed bytes of every gzip member; a ``_Damaged`` marker instead of raising on a cut or corrupt member."""
    with open(path, "rb") as fh:
        d = None
        data = b""
        while True:
            if not data:
                data = fh.read(CHUNK_BYTES)
                if not data:
                    if d is not None and not d.eof:
                        if tail := d.flush():
                            yield tail
                        yield _Damaged(f"truncated gzip member: the file ends at byte {fh.tell()} before the "
                                       "member's end marker (an interrupted copy or download?)")
                    return
            if d is None or d.eof:  # a new member; zero padding after the last one is allowed, as gzip does
                if d is not None and not data.strip(b"\x00"):
                    data = b""
                    continue
                d = zlib.decompressobj(wbits=31)
            try:
                out = d.decompress(data, CHUNK_BYTES)
            except zlib.error as exc:
                yield _Damaged(f"corrupt gzip data near byte {fh.tell() - len(data)} of the file: {exc}")
                return
            if out:
                yield out
            data = d.unused_data if d.eof else d.unconsumed_tail


def read_lines(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Line]:
    """Every line of a JSONL file (``.gz``: gzip, any number of members), blank ones included, in order."""
    path = Path(path)
    chunks = _gzip_chunks(path) if path.name.endswith(".gz") else _plain_chunks(path)
    tail = b""  # the incomplete line at the end of what was read so far
    pending: list[bytes] = []  # chunks without a line ending that continue ``tail``
    pending_len = 0
    base = 0  # stream offset of tail[0]
    number = 0
    long_start = long_len = -1  # an over-long line being skipped: its offset and length so far
    long_head = b""
    damage: str | None = None

    def too_long(n: int, off: int, length: int, head: bytes) -> Line:
        return Line(n, off, None, head[:RAW_HEAD_BYTES],
                    f"line too long: {length} bytes, over the {max_line_bytes} byte limit (max_line_bytes)")

    for chunk in chunks:
        if isinstance(chunk, _Damaged):
            damage = chunk.reason
            break
        if long_start >= 0:  # skipping an over-long line: up to its end, if this chunk holds it
            nl = chunk.find(b"\n")
            if nl < 0:
                long_len += len(chunk)
                base += len(chunk)
                continue
            number += 1
            yield too_long(number, long_start, long_len + nl + 1, long_head)
            long_start = -1
            base += nl + 1
            chunk = chunk[nl + 1:]
        if b"\n" not in chunk:  # the line goes on: collect its pieces (joined once, so a long line costs linear time)
            pending.append(chunk)
            pending_len += len(chunk)
            if len(tail) + pending_len > max_line_bytes:
                long_start, long_len = base, len(tail) + pending_len
                long_head = (tail + b"".join(pending[:2]))[:RAW_HEAD_BYTES]
                base += long_len
                tail, pending, pending_len = b"", [], 0
            continue
        parts = b"".join([tail, *pending, chunk]).split(b"\n")
        pending, pending_len = [], 0
        tail = parts.pop()
        for part in parts:
            number += 1
            if len(part) >= max_line_bytes:
                yield too_long(number, base, len(part) + 1, part)
            else:
                yield _decode(number, base, part)
            base += len(part) + 1
        if len(tail) > max_line_bytes:
            long_start, long_len, long_head = base, len(tail), tail[:RAW_HEAD_BYTES]
            base += len(tail)
            tail = b""
    tail += b"".join(pending)
    if long_start >= 0:
        number += 1
        line = too_long(number, long_start, long_len, long_head)
        yield line._replace(error=f"{line.error}; then {damage}") if damage else line
    elif tail:
        number += 1
        if damage:
            yield Line(number, base, None, tail[:RAW_HEAD_BYTES],
                       f"damaged gzip: unreadable after line {number - 1}, this line is cut off; {damage}")
        else:
            yield _decode(number, base, tail)  # a last line without a line ending
    elif damage:
        yield Line(number + 1, base, None, b"", f"damaged gzip: unreadable after line {number}; {damage}")


def bad_string(obj: Any, *, nul: bool = True, path: str = "") -> tuple[str, str] | None:
    """``(field path, reason)`` of the first string (key or value, nested) that cannot be stored as UTF-8 text: a
    lone surrogate (a ``\\ud800`` escape in the JSON) or, with ``nul``, a NUL character (``\\u0000``); else None."""
    if isinstance(obj, str):
        if nul and "\x00" in obj:
            return path or "(value)", "NUL character (\\u0000): not text"
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path or "(value)", (f"not valid Unicode: a lone surrogate {obj[exc.start]!r} at character "
                                       f"{exc.start}")
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            found = bad_string(k, nul=nul, path=where) if isinstance(k, str) else None
            found = found or bad_string(v, nul=nul, path=where)
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = bad_string(v, nul=nul, path=f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


def parquet_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(row number (1-based), row dict, None)`` or ``(row number, None, error)`` for every row of a Parquet file.

    Raises :class:`DataValidationError` (one line, naming the file) when the file cannot be opened at all.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means the file is not readable Parquet
        raise DataValidationError(f"not a readable Parquet file: {_one_line(exc)}", file=str(path)) from None
    row = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g)
        except Exception as exc:  # noqa: BLE001
            why = f"unreadable row group: row group {g} ({n} rows): {_one_line(exc)}"
            for i in range(n):
                yield row + i + 1, None, why
            row += n
            continue
        try:
            rows = table.to_pylist()
        except Exception:  # noqa: BLE001 - a value Python cannot hold (e.g. an out-of-range timestamp): row by row
            rows = None
        for i in range(table.num_rows):
            if rows is not None:
                yield row + i + 1, rows[i], None
                continue
            try:
                one, error = table.slice(i, 1).to_pylist()[0], None
            except Exception as exc:  # noqa: BLE001
                one, error = None, f"row cannot be converted: {_one_line(exc)}"
            yield row + i + 1, one, error
        row += table.num_rows


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] or type(exc).__name__


def is_parquet(path: str | Path) -> bool:
    return Path(path).suffix == ".parquet"


__all__ = ["Line", "read_lines", "parquet_rows", "bad_string", "is_parquet", "MAX_LINE_BYTES", "BOM"]
