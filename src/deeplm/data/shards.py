"""Pre-tokenized memmap shards: resumable, crash-safe tokenization of a docs JSONL, and reading.

A shard for ``out_prefix`` (say ``.../shards/grammar/train``) is three files:

* ``train.bin``: the token stream, raw little-endian ``uint16`` (vocab <= 65535) or ``uint32``.
  Every document is written as ``<bos> tokens <eos>`` and documents are concatenated.
* ``train.idx.npy``: ``int64`` array of length ``n_docs + 1``: the start offset (in tokens) of
  each document in the stream, then the end offset (= ``n_tokens``).
* ``train.json``: metadata (:class:`ShardMeta`). Written LAST: its presence means the shard is
  complete. It holds no timestamps, so the same input always gives byte-identical files.

While tokenizing, data goes to ``train.bin.partial`` / ``train.idx.partial`` (raw int64 start
offsets) plus ``train.partial.json`` (which tokenizer and which docs file the partial data
belongs to). After every batch both data files are flushed and fsynced and then ``on_progress``
gets the :class:`ShardCursor`; the caller persists it. To resume, pass the last persisted cursor:
the partial files are truncated to exactly the cursor's sizes (anything written after it is
discarded) and tokenization continues at document ``cursor.doc_index``. The result is
byte-identical to an uninterrupted run. If the partial files are shorter than the cursor claims,
or belong to another tokenizer or another docs file, :class:`ShardResumeError` is raised (we do
not silently restart: the caller may catch it and call again with ``cursor=None`` to start over).

Docs JSONL: one ``{"text": "..."}`` object per line; blank lines are ignored (not counted as
documents). The file is streamed line by line; only one batch of documents is in memory.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deeplm.atomic import atomic_write_json, fsync_dir, sha256_file
from deeplm.tokenizer import Tokenizer

__all__ = [
    "FORMAT_VERSION",
    "Shard",
    "ShardCursor",
    "ShardError",
    "ShardMeta",
    "ShardResumeError",
    "ShardStopped",
    "dtype_for_vocab",
    "is_shard_complete",
    "remove_leftovers",
    "iter_docs",
    "shard_paths",
    "tokenize_to_shard",
]

FORMAT_VERSION = 1
_IDX_DTYPE = np.dtype("<i8")


class ShardError(RuntimeError):
    """A shard is missing, truncated, corrupt, or was made with another tokenizer."""


class ShardResumeError(ShardError):
    """Partial files do not match the cursor given for resuming (call with cursor=None)."""


class ShardStopped(Exception):
    """Raised by :func:`tokenize_to_shard` when ``should_stop()`` returned True.

    Raised after the batch in progress was committed and reported via ``on_progress``;
    ``cursor`` is that committed cursor (resume from it).
    """

    def __init__(self, cursor: ShardCursor) -> None:
        super().__init__(
            f"tokenization stopped at doc {cursor.doc_index} ({cursor.n_tokens} tokens)"
        )
        self.cursor = cursor


@dataclass
class ShardCursor:
    """Committed progress: ``doc_index`` documents fully written, ``n_tokens`` tokens written."""

    doc_index: int = 0
    n_tokens: int = 0


@dataclass
class ShardMeta:
    """Content of ``<prefix>.json``."""

    format_version: int
    dtype: str  # "uint16" | "uint32" (little-endian)
    n_tokens: int
    n_docs: int
    vocab_size: int
    tokenizer_hash: str
    bos_id: int
    eos_id: int
    docs_path: str
    docs_sha256: str
    bin_sha256: str
    idx_sha256: str

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> ShardMeta:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ShardError(f"{where}: shard metadata lacks {missing}")
        return cls(**{n: data[n] for n in names})


@dataclass(frozen=True)
class ShardPaths:
    """File names of one shard."""

    prefix: Path

    def _with(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix)

    @property
    def bin(self) -> Path:
        return self._with(".bin")

    @property
    def idx(self) -> Path:
        return self._with(".idx.npy")

    @property
    def meta(self) -> Path:
        return self._with(".json")

    @property
    def bin_partial(self) -> Path:
        return self._with(".bin.partial")

    @property
    def idx_partial(self) -> Path:
        return self._with(".idx.partial")

    @property
    def partial_meta(self) -> Path:
        return self._with(".partial.json")

    @property
    def idx_tmp(self) -> Path:
        return self._with(".idx.npy.tmp")


def shard_paths(out_prefix: str | os.PathLike[str]) -> ShardPaths:
    """The files that make up the shard at ``out_prefix``."""
    return ShardPaths(Path(out_prefix))


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Little-endian ``uint16`` if ``vocab_size <= 65535``, else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 65535:
        return np.dtype("<u2")
    if vocab_size <= 2**32 - 1:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def _dtype_name(dt: np.dtype) -> str:
    return {np.dtype("<u2"): "uint16", np.dtype("<u4"): "uint32"}[dt]


def iter_docs(docs_path: str | os.PathLike[str], start: int = 0) -> Iterator[str]:
    """Yield the ``text`` of each document of a JSONL file, skipping the first ``start`` docs.

    Streams line by line. Blank lines are not documents. Bad lines raise :class:`ShardError`
    naming the file and line number.
    """
    path = Path(docs_path)
    index = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if index < start:
                index += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShardError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ShardError(f'{path}:{lineno}: expected an object with a string "text"')
            index += 1
            yield obj["text"]
    if index < start:
        raise ShardResumeError(
            f"{path}: has {index} documents but the cursor says {start} were already tokenized "
            "(the docs file changed?)"
        )


def _fsync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _read_meta(path: Path) -> ShardMeta:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: shard metadata not found (missing or incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: corrupt shard metadata ({exc})") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path}: corrupt shard metadata (not an object)")
    meta = ShardMeta.from_dict(data, str(path))
    if meta.format_version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: shard format version {meta.format_version}, this deeplm reads "
            f"{FORMAT_VERSION}; re-tokenize"
        )
    if meta.dtype not in ("uint16", "uint32"):
        raise ShardError(f"{path}: unknown token dtype {meta.dtype!r}")
    return meta


def _npy_header(n: int) -> bytes:
    buf = io.BytesIO()
    header = {"descr": _IDX_DTYPE.str, "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _idx_expected_size(n_docs: int) -> int:
    return len(_npy_header(n_docs + 1)) + (n_docs + 1) * _IDX_DTYPE.itemsize


def _check_sizes(meta: ShardMeta, paths: ShardPaths) -> None:
    want_bin = meta.n_tokens * meta.np_dtype.itemsize
    for path, want in ((paths.bin, want_bin), (paths.idx, _idx_expected_size(meta.n_docs))):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"{path}: shard file missing (metadata {paths.meta} exists)") from None
        if size != want:
            raise ShardError(
                f"{path}: size {size} bytes, expected {want} from {paths.meta} "
                "(truncated or corrupt shard; re-tokenize)"
            )


def is_shard_complete(out_prefix: str | os.PathLike[str], tokenizer_hash: str) -> bool:
    """True if the shard's metadata exists, matches ``tokenizer_hash`` and the file sizes.

    Cheap (no hashing of the data); any problem gives False.
    """
    paths = shard_paths(out_prefix)
    try:
        meta = _read_meta(paths.meta)
        if meta.tokenizer_hash != tokenizer_hash:
            return False
        _check_sizes(meta, paths)
    except (ShardError, OSError):
        return False
    return True


def remove_leftovers(out_prefix: str | os.PathLike[str]) -> None:
    """Delete the partial files of a shard whose metadata exists (a crash right after the
    metadata was written and before they were removed leaves them behind)."""
    paths = shard_paths(out_prefix)
    for stale in (paths.bin_partial, paths.idx_partial, paths.partial_meta, paths.idx_tmp):
        _unlink(stale)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _clear_final(paths: ShardPaths) -> None:
    """Remove a previous complete shard; metadata first so it never describes other data."""
    if paths.meta.exists():
        _unlink(paths.meta)
        fsync_dir(paths.meta.parent)
    _unlink(paths.bin)
    _unlink(paths.idx)
    _unlink(paths.idx_tmp)


def _prepare_partials(
    paths: ShardPaths, cursor: ShardCursor, partial_info: dict[str, Any], itemsize: int
) -> None:
    """Create or truncate the partial files so they hold exactly ``cursor``'s data."""
    fresh = cursor.doc_index == 0 and cursor.n_tokens == 0
    if fresh:
        _clear_final(paths)
        for p in (paths.bin_partial, paths.idx_partial):
            with open(p, "wb"):
                pass
        atomic_write_json(paths.partial_meta, partial_info)
        return
    if cursor.doc_index < 0 or cursor.n_tokens < 0 or cursor.n_tokens < 2 * cursor.doc_index:
        raise ShardResumeError(f"{paths.prefix}: invalid cursor {cursor}")
    # A crash during finalisation may have renamed the token file without writing metadata;
    # without metadata a final-named .bin is uncommitted data: take it back.
    if not paths.bin_partial.exists() and paths.bin.exists() and not paths.meta.exists():
        os.replace(paths.bin, paths.bin_partial)
    if paths.meta.exists():
        _clear_final(paths)
    try:
        info = json.loads(paths.partial_meta.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ShardResumeError(
            f"{paths.partial_meta}: cannot resume at {cursor}: partial-shard info missing or "
            f"corrupt ({exc.__class__.__name__}); restart with cursor=None"
        ) from None
    for key, value in partial_info.items():
        if info.get(key) != value:
            raise ShardResumeError(
                f"{paths.partial_meta}: cannot resume: partial data has {key}={info.get(key)!r} "
                f"but this run has {value!r} (never mixed); restart with cursor=None"
            )
    want = {paths.bin_partial: cursor.n_tokens * itemsize, paths.idx_partial: cursor.doc_index * 8}
    for path, size in want.items():
        have = path.stat().st_size if path.exists() else -1
        if have < size:
            what = "missing" if have < 0 else f"only {have} bytes"
            raise ShardResumeError(
                f"{path}: {what}, but the cursor {cursor} needs {size} bytes (partial data lost "
                "or corrupt); restart with cursor=None"
            )
    for path, size in want.items():
        with open(path, "r+b") as fh:
            fh.truncate(size)
            _fsync(fh)
    # Cross-check the last committed document offset against the cursor.
    if cursor.doc_index > 0:
        with open(paths.idx_partial, "rb") as fh:
            fh.seek((cursor.doc_index - 1) * 8)
            last_start = int(np.frombuffer(fh.read(8), dtype=_IDX_DTYPE)[0])
        if not 0 <= last_start <= cursor.n_tokens - 2:
            raise ShardResumeError(
                f"{paths.idx_partial}: last document offset {last_start} inconsistent with "
                f"cursor {cursor}; restart with cursor=None"
            )


def _pack_batch(
    encoded: list[list[int]], start: int, bos: int, eos: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``<bos> ids <eos>`` for each doc, concatenated; and each doc's start offset."""
    lengths = np.fromiter((len(ids) + 2 for ids in encoded), dtype=np.int64, count=len(encoded))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    out[starts] = bos
    out[ends - 1] = eos
    for ids, s, n in zip(encoded, starts.tolist(), lengths.tolist()):
        out[s + 1 : s + n - 1] = ids
    return out, (starts + start).astype(_IDX_DTYPE)


def _finalize(
    paths: ShardPaths,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    cursor: ShardCursor,
    docs_path: Path,
    docs_sha: str,
) -> ShardMeta:
    # 1. idx.npy: header + the raw start offsets + the final end offset, streamed.
    with open(paths.idx_tmp, "wb") as out, open(paths.idx_partial, "rb") as src:
        out.write(_npy_header(cursor.doc_index + 1))
        while chunk := src.read(1 << 20):
            out.write(chunk)
        out.write(np.array([cursor.n_tokens], dtype=_IDX_DTYPE).tobytes())
        _fsync(out)
    bin_sha = sha256_file(paths.bin_partial)
    idx_sha = sha256_file(paths.idx_tmp)
    # 2. Final names (meta still absent: the shard is not complete yet).
    os.replace(paths.idx_tmp, paths.idx)
    os.replace(paths.bin_partial, paths.bin)
    fsync_dir(paths.bin.parent)
    meta = ShardMeta(
        format_version=FORMAT_VERSION,
        dtype=_dtype_name(dtype),
        n_tokens=cursor.n_tokens,
        n_docs=cursor.doc_index,
        vocab_size=tokenizer.vocab_size,
        tokenizer_hash=tokenizer.hash,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        docs_path=str(docs_path.resolve()),
        docs_sha256=docs_sha,
        bin_sha256=bin_sha,
        idx_sha256=idx_sha,
    )
    # 3. Metadata last: its presence marks the shard complete.
    atomic_write_json(paths.meta, meta.to_dict())
    _unlink(paths.idx_partial)
    _unlink(paths.partial_meta)
    return meta


def tokenize_to_shard(
    docs_path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    out_prefix: str | os.PathLike[str],
    cursor: ShardCursor | None = None,
    on_progress: Callable[[ShardCursor], None] | None = None,
    batch_docs: int = 256,
    should_stop: Callable[[], bool] | None = None,
    allow_special: bool = False,
) -> ShardMeta:
    """Tokenize the docs JSONL at ``docs_path`` into the shard at ``out_prefix``.

    ``allow_special`` encodes special-token strings in the text (``<|user|>``...) as their ids:
    for chat-formatted fine-tuning documents only.

    ``cursor=None`` (or a zero cursor) starts from scratch, discarding any partial or previous
    shard; a non-zero cursor resumes (see the module docstring). If the shard is already complete
    for this tokenizer and this docs file (same sha256), it is returned as is.

    After each batch of ``batch_docs`` documents: data files fsynced, then ``on_progress(cursor)``
    (a fresh :class:`ShardCursor` each time), then ``should_stop()``; if that returns True,
    :class:`ShardStopped` is raised carrying the committed cursor.
    """
    if batch_docs <= 0:
        raise ValueError(f"batch_docs must be positive, got {batch_docs}")
    docs = Path(docs_path)
    if not docs.is_file():
        raise ShardError(f"{docs}: docs file not found")
    paths = shard_paths(out_prefix)
    paths.prefix.parent.mkdir(parents=True, exist_ok=True)
    docs_sha = sha256_file(docs)

    if paths.meta.exists() and is_shard_complete(paths.prefix, tokenizer.hash):
        meta = _read_meta(paths.meta)
        if meta.docs_sha256 == docs_sha:
            remove_leftovers(paths.prefix)
            return meta

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    partial_info = {
        "format_version": FORMAT_VERSION,
        "tokenizer_hash": tokenizer.hash,
        "docs_sha256": docs_sha,
        "dtype": _dtype_name(dtype),
    }
    cur = ShardCursor(cursor.doc_index, cursor.n_tokens) if cursor else ShardCursor()
    _prepare_partials(paths, cur, partial_info, dtype.itemsize)

    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    with open(paths.bin_partial, "r+b") as fbin, open(paths.idx_partial, "r+b") as fidx:
        fbin.seek(0, os.SEEK_END)
        fidx.seek(0, os.SEEK_END)
        batch: list[str] = []
        doc_iter = iter_docs(docs, start=cur.doc_index)
        while True:
            batch.clear()
            for text in doc_iter:
                batch.append(text)
                if len(batch) == batch_docs:
                    break
            if not batch:
                break
            tokens, starts = _pack_batch(
                tokenizer.encode_batch(batch, allow_special=allow_special),
                cur.n_tokens,
                bos,
                eos,
                dtype,
            )
            fbin.write(tokens.tobytes())
            fidx.write(starts.tobytes())
            _fsync(fbin)
            _fsync(fidx)
            cur = ShardCursor(cur.doc_index + len(batch), cur.n_tokens + len(tokens))
            if on_progress is not None:
                on_progress(ShardCursor(cur.doc_index, cur.n_tokens))
            if should_stop is not None and should_stop():
                raise ShardStopped(ShardCursor(cur.doc_index, cur.n_tokens))
    return _finalize(paths, tokenizer, dtype, cur, docs, docs_sha)


class Shard:
    """A complete shard opened read-only: ``tokens`` is a numpy memmap (use :meth:`open`)."""

    def __init__(
        self, prefix: Path, meta: ShardMeta, tokens: np.ndarray, doc_offsets: np.ndarray
    ) -> None:
        self.prefix = prefix
        self.meta = meta
        self.tokens = tokens
        self.doc_offsets = doc_offsets

    @classmethod
    def open(
        cls, out_prefix: str | os.PathLike[str], expected_tokenizer_hash: str | None = None
    ) -> Shard:
        """Open the shard at ``out_prefix``; checks metadata, tokenizer hash and file sizes."""
        paths = shard_paths(out_prefix)
        meta = _read_meta(paths.meta)
        if expected_tokenizer_hash is not None and meta.tokenizer_hash != expected_tokenizer_hash:
            raise ShardError(
                f"{paths.meta}: shard was tokenized with another tokenizer "
                f"(hash {meta.tokenizer_hash[:12]}, expected {expected_tokenizer_hash[:12]}); "
                "data of different tokenizers is never mixed: re-tokenize"
            )
        _check_sizes(meta, paths)
        if meta.n_tokens:
            tokens = np.memmap(paths.bin, dtype=meta.np_dtype, mode="r", shape=(meta.n_tokens,))
        else:  # mmap of an empty file is an error
            tokens = np.empty(0, dtype=meta.np_dtype)
        try:
            offsets = np.load(paths.idx, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ShardError(f"{paths.idx}: corrupt document index ({exc})") from None
        if offsets.shape != (meta.n_docs + 1,) or offsets.dtype != _IDX_DTYPE:
            raise ShardError(
                f"{paths.idx}: document index has shape {offsets.shape} {offsets.dtype}, "
                f"expected ({meta.n_docs + 1},) int64"
            )
        return cls(paths.prefix, meta, tokens, offsets)

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    @property
    def n_docs(self) -> int:
        return self.meta.n_docs

    @property
    def tokenizer_hash(self) -> str:
        return self.meta.tokenizer_hash

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` including its ``<bos>`` and ``<eos>``."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range (shard has {self.n_docs})")
        return self.tokens[int(self.doc_offsets[i]) : int(self.doc_offsets[i + 1])]

    def verify(self) -> None:
        """Full check: recompute the sha256 of the data files against the metadata (slow)."""
        paths = shard_paths(self.prefix)
        for path, want in ((paths.bin, self.meta.bin_sha256), (paths.idx, self.meta.idx_sha256)):
            if sha256_file(path) != want:
                raise ShardError(f"{path}: content does not match its sha256 in {paths.meta}")

    def __len__(self) -> int:
        return self.meta.n_tokens

    def __repr__(self) -> str:
        return (
            f"Shard({str(self.prefix)!r}, n_tokens={self.n_tokens}, n_docs={self.n_docs}, "
            f"dtype={self.meta.dtype})"
        )
