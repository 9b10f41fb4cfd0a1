"""Text-kind detection for per-phase exclusion: code, lists/FAQs, math-heavy text, chat logs and
forum/social posts. Cheap line-based heuristics, tuned to keep ordinary prose (dialogue in novels,
a numbered list inside an essay) and to drop documents dominated by the kind."""

from __future__ import annotations

import re

_CODE_LINE = re.compile(
    r"(^\s*(def |class |import |from \S+ import |#include|function |var |let |const |public |"
    r"private |return\b|if \(|for \(|while \(|\}|\{)|[;{}]\s*$|=>|::|</?\w+>)"
)
_LIST_LINE = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)]|[a-zA-Z][.)]|Q:|A:|Q\.|A\.)\s+\S")
_MATH_TOKEN = re.compile(
    r"\\(?:frac|sum|int|alpha|beta|sqrt|cdot|left|right)|\$[^$\n]+\$|[=^<>±×÷∑∫√]"
)
_CHAT_LINE = re.compile(
    r"^\s*(?:\[\d{1,2}:\d{2}(?::\d{2})?\]|<[\w.@-]{1,32}>|(?:user|assistant|system|human|ai|bot)"
    r"\s*:|[\w.-]{1,24}\s*\(\d{1,2}:\d{2}\)\s*:)",
    re.IGNORECASE,
)
_FORUM_LINE = re.compile(
    r"^\s*(?:posted by|reply|quote|re:|originally posted|\d+ (?:points|upvotes|likes|replies)"
    r"|share\b|report\b|permalink|@\w{2,})|\bwrote:\s*$",
    re.IGNORECASE,
)


def _share(lines: list[str], pattern: re.Pattern[str]) -> float:
    return sum(1 for line in lines if pattern.search(line)) / len(lines) if lines else 0.0


def text_kinds(text: str) -> set[str]:
    """The unwanted kinds ``text`` is dominated by (empty for ordinary prose)."""
    lines = [line for line in text.splitlines() if line.strip()]
    kinds = set()
    if len(lines) >= 3 and _share(lines, _CODE_LINE) > 0.3:
        kinds.add("code")
    if len(lines) >= 4 and _share(lines, _LIST_LINE) > 0.5:
        kinds.add("lists")
    words = max(1, len(text.split()))
    if len(_MATH_TOKEN.findall(text)) / words > 0.08:
        kinds.add("math")
    if len(lines) >= 3 and _share(lines, _CHAT_LINE) > 0.3:
        kinds.add("chat")
    if len(lines) >= 3 and _share(lines, _FORUM_LINE) > 0.15:
        kinds.add("forum")
    return kinds


def excluded_kind(text: str, exclude: list[str]) -> str | None:
    """The first of ``exclude`` that ``text`` is, or None to keep it."""
    if not exclude:
        return None
    found = text_kinds(text)
    for kind in exclude:
        if kind in found:
            return kind
    return None
