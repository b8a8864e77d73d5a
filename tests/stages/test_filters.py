"""Curation filters on real text: each asserts the drop reason; the fused heuristics equal datatrove's chain."""

from __future__ import annotations

import itertools
import tarfile

import pytest
from datatrove.data import Document

from stages.curation.assets import UT1_TAR, datatrove_assets_dir, fetch_e2guardian
from stages.curation.base import ExecutorConfig, REASONS, run_filter_step, split_reason
from stages.curation.filters import (
    HeuristicConfig,
    LanguageConfig,
    NsfwConfig,
    PiiConfig,
    UrlFilterConfig,
    run_stock_chain,
    stock_heuristic_chain,
)
from tests.stages._corpora import CACHE, read_folder, schelling, spam_emails, text_compression_samples, write_kept


def doc(text: str, source: str = "web", url: str | None = None, i: int = 0) -> Document:
    return Document(text=text, id=str(i), metadata={"source": source, "url": url})


def reason_of(result) -> str | None:
    if result is True:
        return None
    ok, raw = result
    assert ok is False
    return split_reason(raw)[0]


# ---------------------------------------------------------------------------------------------
# real documents
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_docs() -> list[dict]:
    """400 text_compression samples (quotes, c4, openwebtext, oscar, wikipedia, code, random) + 100 owt passages."""
    docs = [{"text": r["text"], "kind": r["type"]} for r in text_compression_samples()]
    docs += [{"text": rows[0], "kind": "owt"} for rows in schelling("owt_5", 100)]
    return docs


ENGLISH = (
    "The committee met on Tuesday to review the proposal for the new library, which would replace a building "
    "that has served the town since 1962. Members agreed that the current site is too small and that the roof "
    "needs urgent repairs. After a long discussion, they voted to ask the council for funding to study two "
    "possible locations near the river, and to publish the results before the end of the year so that "
    "residents can comment on the plans."
)
FRENCH = (
    "Les hommes naissent et demeurent libres et égaux en droits. Les distinctions sociales ne peuvent être "
    "fondées que sur l'utilité commune. Le but de toute association politique est la conservation des droits "
    "naturels et imprescriptibles de l'homme. Ces droits sont la liberté, la propriété, la sûreté, et la "
    "résistance à l'oppression."
)
CLEAN_PARAGRAPHS = [
    ENGLISH,
    "Breast cancer screening saves lives. Doctors recommend that women discuss mammograms with their physician, "
    "and the clinic offers free appointments on weekends for patients without insurance.",
    "The chef cracked two eggs into the bowl, whisked in the milk and a pinch of salt, and poured the mixture "
    "into a hot pan. Cock-a-leekie soup, a Scottish dish of leeks and chicken, was served first.",
    "Historians still argue about the causes of the war. Some point to economic rivalry between the great "
    "powers; others stress the alliance system, nationalism and the arms race at sea.",
    "The Python 3.11.7 release fixes a crash in the garbage collector. Upgrade with pip and run the test suite "
    "again; the gay-lussac law example in the chemistry notebook now renders correctly.",
]


# ---------------------------------------------------------------------------------------------
# URL blocklist
# ---------------------------------------------------------------------------------------------

def _ut1_sample(n_domains: int = 300, n_urls: int = 100) -> tuple[list[str], list[str]]:
    """Real UT1 entries: streamed from the head of the bundled tar (urls member first, then domains)."""
    urls, domains = [], []
    with tarfile.open(datatrove_assets_dir() / UT1_TAR, "r|gz") as tar:
        for member in tar:
            fh = tar.extractfile(member)
            lines = (x.decode("utf-8") for x in iter(fh.readline, b""))
            if member.name == "urls":
                urls = [x.strip() for x in itertools.islice(lines, 0, 20_000, 200)][:n_urls]
            elif member.name == "domains":
                domains = [x.strip() for x in itertools.islice(lines, 0, 300_000, 1000)][:n_domains]
            if urls and domains:
                break
    return domains, urls


CLEAN_URLS = [
    "https://en.wikipedia.org/wiki/Python_(programming_language)",
    "https://www.bbc.co.uk/news/science-environment-12345678",
    "https://github.com/huggingface/datatrove/blob/main/README.md",
    "https://arxiv.org/abs/2302.13971",
    "https://docs.python.org/3/library/re.html",
    "http://www.nytimes.com/2016/05/01/world/europe/article.html",
    "https://stackoverflow.com/questions/11227809/why-is-processing-a-sorted-array-faster",
    "https://www.gutenberg.org/ebooks/2701",
    "https://news.ycombinator.com/item?id=1",
    "https://blog.example.co.jp/2020/01/hello-world/",
    "http://192.168.0.1/admin",
    "https://www.reddit.com/r/MachineLearning/",
]


@pytest.fixture(scope="module")
def url_filter():
    return UrlFilterConfig().build(CACHE)


def test_url_filter_reasons(url_filter):
    domains, urls = _ut1_sample(20, 5)
    assert reason_of(url_filter.filter(doc("x", url=f"http://{domains[3]}/index.html"))) == "url_blocklist"
    assert url_filter.filter(doc("x", url=f"https://{domains[3]}/")) != True  # noqa: E712
    registered = next(d for d in domains if url_filter.tldextractor(d).top_domain_under_public_suffix == d)
    assert url_filter.filter(doc("x", url=f"http://www.{registered}/page")) == (False, "url_blocklist:domain")
    assert url_filter.filter(doc("x", url=f"http://{urls[0]}")) is not True
    for u in CLEAN_URLS[:6]:
        assert url_filter.filter(doc("x", url=u)) is True, u
    assert url_filter.filter(doc("no url here")) is True  # documents without a URL pass
    assert reason_of(url_filter.filter(doc("x", url="https://example.com/free-porn-videos"))) == "url_blocklist"


@pytest.mark.slow
def test_url_filter_equals_stock_urlfilter(url_filter):
    from datatrove.pipeline.filters import URLFilter

    domains, urls = _ut1_sample()
    candidates = []
    for d in domains:
        candidates += [f"http://{d}/", f"https://www.{d}/some/page?x=1", f"http://sub.{d}"]
    candidates += urls + [f"http://{u}" for u in urls[:20]] + CLEAN_URLS
    stock = URLFilter()
    stock.tldextractor = url_filter.tldextractor  # the bundled public-suffix snapshot on both sides
    n_blocked = 0
    for u in candidates:
        mine = url_filter.filter(doc("x", url=u))
        ref = stock.filter(doc("x", url=u))
        mine_detail = None if mine is True else mine[1].split(":", 1)[1]
        ref_detail = None if ref is True else ref[1]
        assert mine_detail == ref_detail, u
        n_blocked += mine is not True
    assert n_blocked > len(domains)  # the sample really exercises the blocklist


# ---------------------------------------------------------------------------------------------
# language
# ---------------------------------------------------------------------------------------------

def test_language_filter():
    f = LanguageConfig().build()
    d = doc(ENGLISH)
    assert f.filter(d) is True
    assert d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65
    fr = doc(FRENCH)
    res = f.filter(fr)
    assert reason_of(res) == "language" and res[1].startswith("language:fr")
    assert fr.metadata["language"] == "fr"
    code = doc("def f(x):\n    return x + 1\n", source="code")
    assert f.filter(code) is True and "language" not in code.metadata
    assert LanguageConfig(languages=["fr"]).build().filter(doc(FRENCH)) is True


# ---------------------------------------------------------------------------------------------
# heuristics
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def heuristic():
    return HeuristicConfig().build()


def test_heuristic_reasons(heuristic, real_docs):
    quotes = [d["text"] for d in real_docs if d["kind"] == "Abirate/english_quotes"]
    results = [heuristic.filter(doc(q)) for q in quotes]
    assert all(r is not True for r in results)  # one-line quotes are too short for any corpus
    assert (False, "gopher_quality:gopher_short_doc") in results
    by_kind = {}
    for d in real_docs:
        by_kind.setdefault(d["kind"], []).append(heuristic.filter(doc(d["text"])))
    assert (False, "gopher_quality:gopher_short_doc") in by_kind["c4"]  # real short web pages
    assert (False, "gopher_quality:gopher_enough_stop_words") in by_kind["RandomWordsDataset"]  # word salad
    # C4's own line rule (drop lines without terminal punctuation; off by default, as in FineWeb's recipe)
    c4_strict = HeuristicConfig(c4={"filter_no_terminal_punct": True}).build()
    wiki = [d["text"] for d in real_docs if d["kind"] == "wikipedia"]
    assert (False, "c4:too_few_sentences") in [c4_strict.filter(doc(t)) for t in wiki]
    spam = "\n".join(["Buy cheap watches online today, best prices guaranteed!"] * 30)
    assert reason_of(heuristic.filter(doc(spam))) == "gopher_repetition"
    owt = by_kind["openwebtext"]
    assert sum(r is True for r in owt) > len(owt) // 2  # real articles mostly pass


def test_code_rules(heuristic, real_docs):
    code = next(d["text"] for d in real_docs if d["kind"] == "codeparrot/github-code"
                and max(map(len, d["text"].splitlines())) < 200)
    assert reason_of(heuristic.filter(doc(code))) is not None  # prose rules reject code
    assert heuristic.filter(doc(code, source="code")) is True  # code rules keep it
    minified = code + "\n" + ";".join(f"var a{i}=function(b){{return b*{i}}}" for i in range(200))
    assert heuristic.filter(doc(minified, source="code")) == (False, "gopher_quality:code_max_line_length")
    generated = "// Code generated by protoc-gen-go. DO NOT EDIT.\n" + code
    assert heuristic.filter(doc(generated, source="code")) == (False, "gopher_quality:code_autogenerated")


@pytest.mark.parametrize("overrides", [{}, {"c4": {"filter_no_terminal_punct": False}},
                                       {"gopher_quality": {"min_doc_words": 20}, "fineweb": {"new_line_ratio": 0.1}}])
def test_fused_equals_stock_chain(real_docs, overrides):
    cfg = HeuristicConfig().derive(**{k: {**getattr(HeuristicConfig(), k).model_dump(), **v}
                                      for k, v in overrides.items()})
    fused, stock = cfg.build(), stock_heuristic_chain(cfg)
    assert [type(f).__name__ for f in stock] == ["GopherRepetitionFilter", "GopherQualityFilter",
                                                 "C4QualityFilter", "FineWebQualityFilter"]
    reasons = set()
    for i, d in enumerate(real_docs):
        a, b = doc(d["text"], i=i), doc(d["text"], i=i)
        ra, rb = fused.filter(a), run_stock_chain(stock, b)
        assert ra == rb, (i, d["kind"], ra, rb)
        assert a.text == b.text, (i, d["kind"])
        reasons.add(reason_of(ra))
    assert {None, "gopher_quality", "gopher_repetition", "c4"} <= reasons


# ---------------------------------------------------------------------------------------------
# NSFW
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nsfw():
    root = fetch_e2guardian(CACHE)
    return NsfwConfig(e2guardian_dir=str(root) if root else None).build(CACHE)


def test_nsfw_drops_explicit_spam(nsfw):
    spam = spam_emails(500, "spam-2")
    dropped = [r for r in (nsfw.filter(doc(t)) for t in spam) if r is not True]
    assert len(dropped) >= 5
    assert all(reason_of(r) == "nsfw" for r in dropped)
    assert {r[1].split(":")[1] for r in dropped} <= {"density", "phrases"}
    explicit = ("Hot horny sluts want to fuck tonight! Free xxx porn videos, hardcore anal sex, big tits and "
                "pussy pics. Click here for live sex cams with naked teens 18+.")
    assert reason_of(nsfw.filter(doc(explicit))) == "nsfw"


def test_nsfw_no_false_positive_on_clean_text(nsfw):
    for p in CLEAN_PARAGRAPHS:
        assert nsfw.filter(doc(p)) is True, p[:60]
    ham = spam_emails(200, "easy-ham-2")
    assert all(nsfw.filter(doc(t)) is True for t in ham)


def test_nsfw_without_e2guardian(tmp_path, caplog):
    f = NsfwConfig().build(tmp_path)  # no lists under this cache_dir: logs and keeps working
    assert f.phrases == []
    text = "fuck this shit, you stupid cunt, fucking asshole motherfucker bitch " * 3
    assert f.filter(doc(text))[1].startswith("nsfw:density")
    assert f.filter(doc(ENGLISH)) is True


# ---------------------------------------------------------------------------------------------
# PII
# ---------------------------------------------------------------------------------------------

def test_pii_redaction():
    step = PiiConfig().build()
    text = ("Contact jane.doe@example.com or call (555) 123-4567 / +44 20 7946 0958. The server 203.0.113.42 "
            "and 2001:db8::8a2e:370:7334 were patched on 2023-11-23 to Python 3.11.7 (build 1.2.3.4). "
            "Meeting at 10:30:00, ISBN 978-3-16-148410-0, pages 12-15, call 555.123.4567 again.")
    out, counts = step.redact(text)
    assert counts == {"email": 1, "ipv4": 1, "ipv6": 1, "phone": 3}
    for kept in ("3.11.7", "2023-11-23", "10:30:00", "978-3-16-148410-0", "1.2.3.4", "12-15"):
        assert kept in out, kept
    assert "<EMAIL>" in out and "<IP_ADDRESS>" in out and "<PHONE>" in out
    d = doc(text)
    [d2] = list(step.run([d]))
    assert d2.metadata["pii"] == counts and "jane.doe" not in d2.text
    assert step.stats["pii_phone"].total == 3
    custom, _ = PiiConfig(email_placeholder="[mail]", kinds=["email"]).build().redact("a@b.org 1.2.3.4")
    assert custom == "[mail] 1.2.3.4"


# ---------------------------------------------------------------------------------------------
# configs, composition, executor
# ---------------------------------------------------------------------------------------------

def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="languages"):
        LanguageConfig(languages=[])
    with pytest.raises(ValueError, match="kinds"):
        PiiConfig(kinds=["ssn"])
    with pytest.raises(ValueError, match="extra"):
        HeuristicConfig(bogus=1)


def test_disabled_steps_leave_the_chain():
    from stages.curation.pipeline import CurationConfig, enabled_steps

    cfg = CurationConfig(nsfw=NsfwConfig(enabled=False), semantic_dedup={"enabled": False})
    assert enabled_steps(cfg) == ["url", "language", "heuristics", "pii", "exact_dedup", "near_dedup", "decontaminate",
                                  "quality"]


def test_heuristics_through_run_filter_step(tmp_path, real_docs):
    records = [{"text": d["text"], "id": f"d{i}", "metadata": {"url": None}} for i, d in enumerate(real_docs[:200])]
    in_dir = write_kept(tmp_path / "in", records)
    stats = run_filter_step(lambda: HeuristicConfig().build(), in_dir, tmp_path / "out",
                            ExecutorConfig(tasks=2, workers=2), "heuristics")
    assert stats["in"] == 200 and stats["kept"] + stats["rejected"] == 200
    assert set(stats["reasons"]) <= set(REASONS) and "gopher_quality" in stats["reasons"]
    rejected = read_folder(tmp_path / "out" / "rejected")
    assert all(r["metadata"]["detail"] for r in rejected)
    # same decisions as running the filter in-process
    f = HeuristicConfig().build()
    expect_kept = {r["id"] for r in records if f.filter(doc(r["text"])) is True}
    assert {r["id"] for r in read_folder(tmp_path / "out" / "kept")} == expect_kept


def test_pii_through_run_filter_step(tmp_path):
    records = [{"text": f"Mail user{i}@example.org or phone 555-867-{5300 + i}.", "id": f"p{i}"} for i in range(6)]
    in_dir = write_kept(tmp_path / "in", records)
    stats = run_filter_step(lambda: PiiConfig().build(), in_dir, tmp_path / "out",
                            ExecutorConfig(tasks=2, workers=2), "pii")
    assert stats["kept"] == 6 and stats["rejected"] == 0
    out = read_folder(tmp_path / "out" / "kept")
    assert all(r["metadata"]["pii"]["email"] == 1 and r["metadata"]["pii"]["phone"] == 1 for r in out)
    assert all("@" not in r["text"] for r in out)


def test_prose_rules_apply_to_web_sources_only_by_default() -> None:
    # a real dictionary-style entry: punctuation-dense, fails Gopher's alpha-word ratio as prose
    entry = ("Mill (n.) [AS. myln, mylen, fr. L. molina, mola; cf. molere, to grind.] 1. A machine for grinding "
             "or comminuting any substance, as grain, by rubbing and crushing it between two hard, rough, or "
             "indented surfaces; as, a gristmill, a coffee mill; a bone mill. 2. A machine used for expelling "
             "the juice, sap, etc., from vegetable tissues by pressure, or by pressure in combination with a "
             "grinding, or cutting process; as, a cider mill; a cane mill. ") * 2
    default = HeuristicConfig().build()
    everywhere = HeuristicConfig(prose_sources=None).build()
    assert reason_of(everywhere.filter(doc(entry, source="reference"))) is not None
    assert default.filter(doc(entry, source="reference")) is True
    assert reason_of(default.filter(doc(entry, source="web"))) == reason_of(everywhere.filter(doc(entry, source="reference")))
