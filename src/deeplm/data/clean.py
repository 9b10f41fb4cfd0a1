"""Text cleaning: normalisation, chunking, quality filters, exact dedup and the train/val split.

:func:`clean_documents` chains the steps for a stream of :class:`~deeplm.data.sources.Document`:
normalize -> chunk (paragraph-aligned) -> filter -> dedup, one document at a time.
Everything here is deterministic and independent of document order except dedup (the first
occurrence of a text wins), and :func:`split_for` assigns train/val from a hash of the text.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from deeplm.config import CleanConfig
from deeplm.data.sources import Document

# ------------------------------------------------------------------------------- normalisation

# Block-level HTML elements: a tag of one of these becomes a paragraph break, others vanish.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote body br dd div dl dt figcaption figure footer form h1 h2 "
    "h3 h4 h5 h6 head header hr html li main nav ol p pre section table tbody td tfoot th thead "
    "title tr ul".split()
)
# Attributes HTML allows without a value; any other attribute must have ``=value`` for the
# text to count as a tag (so that prose such as "x <y and z> w" is left alone).
_BOOLEAN_ATTRS = (
    "async|autofocus|autoplay|checked|controls|defer|disabled|hidden|loop|multiple|muted|"
    "novalidate|open|readonly|required|selected"
)
_ATTR = (
    r"(?:\s+(?:[A-Za-z_:][-A-Za-z0-9_:.]*\s*=\s*(?:\"[^\"<>]*\"|'[^'<>]*'|[^\s\"'=<>`]+)"
    rf"|(?:{_BOOLEAN_ATTRS})\b))"
)
_TAG = re.compile(rf"</?([A-Za-z][A-Za-z0-9]*(?:[:-][A-Za-z0-9]+)*){_ATTR}*\s*/?>")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_DECLARATION = re.compile(r"<![A-Za-z][^<>]*>|<\?[A-Za-z][^<>]*\?>")
_CDATA = re.compile(r"<!\[CDATA\[(.*?)\]\]>", re.DOTALL)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

# Markdown.
# A fenced code block needs its closing fence (an unclosed fence is left as text).
_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.DOTALL | re.MULTILINE)
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_RULE = re.compile(r"^[ \t]*(?:[-=_*][ \t]*){3,}$", re.MULTILINE)
_TABLE_RULE = re.compile(
    r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(?:\|[ \t]*:?-{3,}:?[ \t]*)+\|?[ \t]*$", re.M
)
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK = re.compile(
    r"\[([^\]\n]+)\]\((?:[^()\s]+|[^()\n]*\([^()\n]*\)[^()\n]*)(?:\s+\"[^\"\n]*\")?\)"
)
_REF_LINK = re.compile(r"\[([^\]\n]+)\]\[[^\]\n]*\]")
_REF_DEF = re.compile(r"^[ \t]{0,3}\[[^\]\n]+\]:[ \t]+\S+.*$", re.MULTILINE)
_AUTOLINK = re.compile(r"<((?:https?|ftp)://[^\s<>]+|mailto:[^\s<>]+)>")
_BLOCKQUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.MULTILINE)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_STRONG = re.compile(r"(?<![\w*])(\*\*|__)(?=\S)([^\n]*?\S)\1(?![\w*])")
_EMPH_STAR = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![\w*])")
_EMPH_UNDER = re.compile(r"(?<![\w_])_(?=[^\s_])([^_\n]*?[^\s_])_(?![\w_])")
_STRIKE = re.compile(r"~~(?=\S)([^\n]*?\S)~~")

# Characters removed outright: C0/C1 controls except \t and \n (\r and other line breaks are
# converted to \n first), zero-width and byte-order marks, soft hyphens.
_DROP = {c: None for c in range(0x20) if c not in (0x09, 0x0A)}
_DROP.update({c: None for c in range(0x7F, 0xA0)})
_DROP.update({c: None for c in (0x00AD, 0x200B, 0x2060, 0xFEFF)})
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NEWLINES = re.compile(r"\r\n?|[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _replace_tag(match: re.Match[str]) -> str:
    name = match.group(1).lower()
    if name == "br":
        return "\n"
    return "\n\n" if name in _BLOCK_TAGS else ""


def _strip_markup(text: str) -> str:
    text = _CDATA.sub(r"\1", text)
    text = _COMMENT.sub("", text)
    text = _SCRIPT_STYLE.sub("", text)
    text = _DECLARATION.sub("", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _TAG.sub(_replace_tag, text)
    text = _FENCE.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _TABLE_RULE.sub("", text)
    text = _RULE.sub("", text)
    text = _REF_DEF.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _BLOCKQUOTE.sub("", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _STRONG.sub(r"\2", text)
    text = _EMPH_STAR.sub(r"\1", text)
    text = _EMPH_UNDER.sub(r"\1", text)
    return _STRIKE.sub(r"\1", text)


def normalize_text(text: str) -> str:
    """Normalise one document.

    Unify line breaks to ``\\n``; remove HTML/XML tags, comments, script/style blocks (block
    tags become paragraph breaks) and decode character entities; remove Markdown markup
    (headings -> their text, emphasis -> plain, links/images -> their text, fenced code blocks
    are dropped entirely, rules/quote markers removed); NFKC; drop control characters (except
    ``\\n`` and ``\\t``), zero-width characters and lone surrogates; strip every line, collapse
    runs of spaces, keep at most 2 consecutive blank lines; strip the result.

    A ``<`` that does not start a real tag (``a < b``, ``x<y``) is kept.
    """
    text = _NEWLINES.sub("\n", text)
    if "<" in text or "[" in text or "`" in text or "#" in text or "*" in text or "_" in text:
        text = _strip_markup(text)
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        text = _NEWLINES.sub("\n", text)
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(_DROP)
    text = _SURROGATE.sub("", text)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)  # strip every line
    text = re.sub(r"[ \t]*\t[ \t]*", "\t", text)
    text = re.sub(r" {2,}", " ", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip()


# ------------------------------------------------------------------------------------ chunking

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def _hard_split(unit: str, size: int) -> Iterator[str]:
    """Split one over-long paragraph into pieces <= size, preferring line ends, then spaces."""
    start = 0
    while len(unit) - start > size:
        window = unit[start : start + size]
        cut = window.rfind("\n") + 1
        if cut < size // 2:
            cut = max(window.rfind(" "), window.rfind("\t")) + 1
        if cut <= 0:
            cut = size
        yield unit[start : start + cut]
        start += cut
    if start < len(unit):
        yield unit[start:]


def chunk_document(text: str, chunk_chars: int) -> Iterator[str]:
    """Split ``text`` into chunks of at most ``chunk_chars`` characters at paragraph breaks.

    ``"".join(chunks) == text`` always holds (separators stay at the end of the chunk before
    them). A paragraph longer than ``chunk_chars`` is cut at a line end or space (a hard cut
    only when a window has no whitespace at all). ``chunk_chars <= 0`` yields ``text`` whole.
    """
    if chunk_chars <= 0 or len(text) <= chunk_chars:
        if text:
            yield text
        return
    current: list[str] = []
    size = 0
    pos = 0
    breaks = [m.end() for m in _PARAGRAPH_BREAK.finditer(text)]
    for end in [*breaks, len(text)]:
        unit = text[pos:end]
        pos = end
        if not unit:
            continue
        pieces = _hard_split(unit, chunk_chars) if len(unit) > chunk_chars else (unit,)
        for piece in pieces:
            if size + len(piece) > chunk_chars and current:
                yield "".join(current)
                current, size = [], 0
            current.append(piece)
            size += len(piece)
    if current:
        yield "".join(current)


# ------------------------------------------------------------------------------------- filters

_SYMBOL_EXTRA = frozenset("#*_|{}[]<>\\/@~^`=+%$&")


def _is_symbol(ch: str) -> bool:
    return ch in _SYMBOL_EXTRA or unicodedata.category(ch).startswith("S")


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """Why ``text`` (already normalised) should be dropped, or None to keep it.

    Reasons, checked in this order:
    ``too short`` (< cfg.min_chars), ``too long`` (> cfg.max_chars when that is > 0),
    ``low alpha fraction`` (letters / all characters < cfg.min_alpha_fraction),
    ``high symbol fraction`` (symbols such as ``# * | { } < > = $`` and Unicode symbol
    categories / non-whitespace characters > cfg.max_symbol_fraction),
    ``repetitive`` (duplicated lines carry > 30% of the line characters, or the most common
    word 4-gram covers > 20% of the word characters).
    """
    n = len(text)
    if n < cfg.min_chars:
        return "too short"
    if cfg.max_chars and n > cfg.max_chars:
        return "too long"
    if n == 0:
        return "too short"
    counts = Counter(text)
    letters = sum(c for ch, c in counts.items() if ch.isalpha())
    if letters / n < cfg.min_alpha_fraction:
        return "low alpha fraction"
    nonspace = n - sum(c for ch, c in counts.items() if ch.isspace())
    symbols = sum(c for ch, c in counts.items() if _is_symbol(ch))
    if nonspace and symbols / nonspace > cfg.max_symbol_fraction:
        return "high symbol fraction"
    if _is_repetitive(text):
        return "repetitive"
    return None


# Lines this short (speaker names in plays, "[Exit.]") are ignored by the duplicate-line test.
_MIN_DUP_LINE = 12


def _is_repetitive(text: str) -> bool:
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    total = sum(len(ln) for ln in lines)
    if len(lines) >= 4 and total:
        seen: set[str] = set()
        dup = 0
        for ln in lines:
            if ln in seen and len(ln) >= _MIN_DUP_LINE:
                dup += len(ln)
            seen.add(ln)
        if dup / total > 0.3:
            return True
    words = text.split()
    if len(words) >= 16:
        grams = Counter(zip(words, words[1:], words[2:], words[3:]))
        top, count = grams.most_common(1)[0]
        if count > 2:
            word_chars = sum(len(w) for w in words)
            if count * sum(len(w) for w in top) / word_chars > 0.2:
                return True
    return False


# --------------------------------------------------------------------------------------- dedup


class Deduper:
    """Exact deduplication by SHA-256 of the (normalised) text.

    ``seen(text)`` returns True if the same text was seen before, else records it and returns
    False. Only 16-byte digest prefixes are stored (collision odds ~ n^2 / 2^129): a sorted
    numpy array plus a small set of recent digests that is merged into it when it grows, so
    memory stays near 16-32 bytes per document even for tens of millions of documents.
    """

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype="S16")
        self._recent: set[bytes] = set()

    @staticmethod
    def digest(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, text: str) -> bool:
        return self._has(self.digest(text))

    def _has(self, key: bytes) -> bool:
        if key in self._recent:
            return True
        arr = self._sorted
        if len(arr) == 0:
            return False
        i = int(np.searchsorted(arr, key))
        # numpy "S" arrays drop trailing NUL bytes, so compare after the same stripping.
        return i < len(arr) and arr[i] == key.rstrip(b"\x00")

    def seen(self, text: str) -> bool:
        key = self.digest(text)
        if self._has(key):
            return True
        self._recent.add(key)
        if len(self._recent) >= max(65536, len(self._sorted) // 8):
            self._merge()
        return False

    def _merge(self) -> None:
        fresh = np.array(sorted(self._recent), dtype="S16")
        self._sorted = np.concatenate([self._sorted, fresh])
        self._sorted.sort(kind="stable")
        self._recent = set()


# --------------------------------------------------------------------------------------- split


def split_score(text: str, seed: int) -> float:
    """Where ``text`` falls in [0, 1) for the train/val split: a pure function of (seed, text).
    Texts below a phase's ``val_fraction`` are its validation documents."""
    h = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_for(text: str, val_fraction: float, seed: int) -> str:
    """``"val"`` or ``"train"`` for ``text``: a pure function of (seed, text), order-free.

    About ``val_fraction`` of distinct texts go to ``"val"``.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    return "val" if split_score(text, seed) < val_fraction else "train"


# -------------------------------------------------------------------------------------- driver


@dataclass
class CleanStats:
    """Counters of :func:`clean_documents` (``dropped``: filter reason -> chunk count)."""

    docs_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def clean_documents(
    docs: Iterable[Document],
    cfg: CleanConfig,
    stats: CleanStats,
    *,
    deduper: Deduper | None = None,
) -> Iterator[Document]:
    """Normalise -> chunk -> filter -> dedup a document stream, lazily.

    Each output document is one chunk; when a document is split into several chunks their ids
    are ``<doc_id>#<i>`` (i from 0), otherwise the id is unchanged. Filters and dedup apply per
    chunk; ``stats.dropped`` and ``stats.duplicates`` count chunks. A document that is empty
    after normalisation counts as dropped ``"empty"``. Pass ``deduper`` to share dedup state
    across several calls (e.g. all sources of a phase); by default each call has its own.
    """
    if cfg.dedup and deduper is None:
        deduper = Deduper()
    for doc in docs:
        stats.docs_in += 1
        text = normalize_text(doc.text)
        if not text:
            stats.drop("empty")
            continue
        chunks = [c.strip() for c in chunk_document(text, cfg.chunk_chars)]
        chunks = [c for c in chunks if c]
        for i, chunk in enumerate(chunks):
            reason = filter_reason(chunk, cfg)
            if reason is not None:
                stats.drop(reason)
                continue
            if cfg.dedup and deduper is not None and deduper.seen(chunk):
                stats.duplicates += 1
                continue
            doc_id = doc.doc_id if len(chunks) == 1 else f"{doc.doc_id}#{i}"
            stats.docs_out += 1
            stats.chars_out += len(chunk)
            yield Document(chunk, doc.source, doc_id)
