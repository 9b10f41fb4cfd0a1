"""Vocabulary richness of generated text: distinct-n, type-token ratio, rare-word rate.

Words are lower-cased runs of letters (with inner apostrophes: ``don't``), see :func:`words`.

* ``distinct_n``: unique word n-grams / all word n-grams (n-grams never cross texts); low values
  mean repetition (the classic degenerate loop of small models).
* ``type_token_ratio``: unique words / words. It falls as texts get longer, so compare texts of
  similar length; ``mattr`` (moving-average TTR over a fixed window) is length-robust.
* ``rare_word_rate``: fraction of words outside the ``top_k`` most frequent words of a reference
  corpus (the run's training text); ``oov_rate``: fraction never seen in the reference at all.

:func:`richness` computes all of them; the report shows the same numbers for the model's samples
and for a reference sample of real (validation) text of similar size.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (letters with inner apostrophes)."""
    return WORD_RE.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int, split: Callable[[str], list[str]] = words) -> float:
    """Unique word n-grams over all n-grams of ``texts`` (0.0 when there are none); ``split``
    cuts a text into words (default :func:`words`; the training loop's samples use
    ``str.split``, as its logged ``distinct_1``/``distinct_2`` always have)."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        w = split(t)
        grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def type_token_ratio(ws: Sequence[str]) -> float:
    return len(set(ws)) / len(ws) if ws else 0.0


def mattr(ws: Sequence[str], window: int = 50) -> float:
    """Moving-average type-token ratio over windows of ``window`` words (TTR if shorter)."""
    if len(ws) <= window:
        return type_token_ratio(ws)
    counts = Counter(ws[:window])
    types = [len(counts)]
    for i in range(window, len(ws)):
        counts[ws[i]] += 1
        old = ws[i - window]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
        types.append(len(counts))
    return sum(types) / len(types) / window


def word_counts(texts: Iterable[str], max_chars: int = 5_000_000) -> Counter[str]:
    """Word frequencies of ``texts`` (reading at most ``max_chars`` characters)."""
    counts: Counter[str] = Counter()
    seen = 0
    for t in texts:
        counts.update(words(t))
        seen += len(t)
        if seen >= max_chars:
            break
    return counts


def rare_word_rate(
    ws: Sequence[str], reference: Counter[str], top_k: int = 1000
) -> dict[str, float]:
    """Fraction of ``ws`` outside the reference's ``top_k`` words, and never in it at all."""
    if not ws:
        return {"rare_word_rate": 0.0, "oov_rate": 0.0}
    common = {w for w, _ in reference.most_common(top_k)}
    return {
        "rare_word_rate": sum(w not in common for w in ws) / len(ws),
        "oov_rate": sum(w not in reference for w in ws) / len(ws),
    }


def richness(
    texts: Sequence[str], reference: Counter[str] | None = None, top_k: int = 1000
) -> dict[str, Any]:
    """Every richness number for ``texts`` (rare-word rates need a ``reference``)."""
    ws = [w for t in texts for w in words(t)]
    out: dict[str, Any] = {
        "texts": len(texts),
        "words": len(ws),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "type_token_ratio": type_token_ratio(ws),
        "mattr_50": mattr(ws, 50),
    }
    if reference is not None:
        out |= rare_word_rate(ws, reference, top_k) | {"rare_top_k": top_k}
    return out
