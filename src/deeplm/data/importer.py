"""Import pre-tokenized data: nanoGPT / llm.c token files and their ``tokenizer.json`` become a
run's tokenizer and shards, with every token id unchanged.

* Token files: raw little-endian ``uint16`` (nanoGPT's ``train.bin``; ``dtype="uint32"`` for
  raw ``uint32``) or llm.c's format (a 1024-byte header of 256 ``int32``: magic ``20240520``,
  version 1 = ``uint16`` tokens, the token count; then the tokens). The format is detected.
* Tokenizer: a Hugging Face ``tokenizer.json``. deeplm needs ``<bos>``, ``<eos>`` and ``<pad>``:
  the file's document separator (``bos_token``, e.g. ``<|endoftext|>`` or ``<|bos|>``) is renamed
  ``<bos>`` in place (same id), and ``<eos>`` / ``<pad>`` are appended after the last id when the
  file has none. The renamed file is the run's tokenizer; its hash identifies it as always.
* Documents: each starts at an occurrence of the separator (a file that does not start with one
  gets a first document from position 0); the shards' document index records those starts.

Every check runs before anything is written: a token id at or above the vocabulary size, a file
whose size is not a whole number of tokens, an llm.c header that does not match its size, a
separator the tokenizer does not have — each is an :class:`ImportError_` naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeplm.atomic import atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from deeplm.data.shards import FORMAT_VERSION, ShardMeta, dtype_for_vocab, shard_paths
from deeplm.tokenizer import Tokenizer

LLMC_MAGIC = 20240520
LLMC_HEADER_INTS = 256
SEPARATOR_CANDIDATES = ("<bos>", "<|bos|>", "<|endoftext|>", "<s>", "<|begin_of_text|>")


class ImportError_(ValueError):  # noqa: N801 (ImportError is a builtin)
    """Pre-tokenized data that cannot be imported; the message names the file and the problem."""


@dataclass
class TokenFile:
    """A token file read into memory (``tokens``) with the format it was found in."""

    path: Path
    tokens: np.ndarray
    fmt: str  # "raw-uint16" | "raw-uint32" | "llm.c"


def read_token_file(path: Path, dtype: str = "uint16") -> TokenFile:
    """Read ``path`` as llm.c (detected by its magic number) or raw ``dtype`` tokens."""
    if not path.is_file():
        raise ImportError_(f"{path}: token file not found")
    size = path.stat().st_size
    if size >= 4 * LLMC_HEADER_INTS:
        header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
        if int(header[0]) == LLMC_MAGIC:
            return _read_llmc(path, header, size)
    if dtype not in ("uint16", "uint32"):
        raise ImportError_(f"{path}: dtype must be uint16 or uint32, not {dtype!r}")
    itemsize = 2 if dtype == "uint16" else 4
    if size % itemsize:
        raise ImportError_(
            f"{path}: {size} bytes is not a whole number of {dtype} tokens; is this a token file "
            "(nanoGPT .bin or llm.c), and is its dtype right?"
        )
    tokens = np.fromfile(path, dtype=f"<u{itemsize}")
    if dtype == "uint16" and len(tokens) >= 64 and not tokens[1::2].any() and tokens[::2].any():
        raise ImportError_(
            f"{path}: every second uint16 is 0: this looks like uint32 tokens; pass dtype uint32"
        )
    return TokenFile(path, tokens, f"raw-{dtype}")


def _read_llmc(path: Path, header: np.ndarray, size: int) -> TokenFile:
    version, n = int(header[1]), int(header[2])
    if version != 1:
        raise ImportError_(f"{path}: llm.c token file version {version} (only 1, uint16, known)")
    want = 4 * LLMC_HEADER_INTS + 2 * n
    if size != want:
        raise ImportError_(
            f"{path}: llm.c header says {n:,} tokens ({want:,} bytes) but the file has "
            f"{size:,} bytes: truncated or not an llm.c file"
        )
    tokens = np.fromfile(path, dtype="<u2", offset=4 * LLMC_HEADER_INTS)
    return TokenFile(path, tokens, "llm.c")


def adapt_tokenizer(src: Path, dst: Path, separator: str | None = None) -> Tokenizer:
    """Write ``src``'s tokenizer to ``dst`` with deeplm's special tokens (module docstring)."""
    try:
        t = json.loads(src.read_text(encoding="utf-8"))
        vocab: dict[str, int] = t["model"]["vocab"]
        added: list[dict] = t.setdefault("added_tokens", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImportError_(f"{src}: not a Hugging Face tokenizer.json ({exc})") from None
    ids = {a["content"]: a["id"] for a in added} | vocab
    sep = separator or next((s for s in SEPARATOR_CANDIDATES if s in ids), None)
    if sep is None or sep not in ids:
        known = ", ".join(a["content"] for a in added) or "none"
        wanted = repr(separator) if separator else "(tried " + ", ".join(SEPARATOR_CANDIDATES) + ")"
        raise ImportError_(
            f"{src}: no document separator {wanted} in the tokenizer; its added tokens: {known}. "
            "Name the token that starts each document (--bos-token)"
        )
    sep_id = ids[sep]
    if sep != "<bos>":
        _rename(vocab, added, sep, "<bos>", sep_id)
    next_id = len(set(vocab.values()) | {a["id"] for a in added})
    for name in ("<pad>", "<eos>"):
        if name not in vocab and all(a["content"] != name for a in added):
            added.append(_special(name, next_id))
            next_id += 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, json.dumps(t, ensure_ascii=False))
    tok = Tokenizer.load(dst)
    moved = [name for name, i in ids.items() if name != sep and tok.token_to_id(name) != i]
    if moved or tok.bos_id != sep_id:
        dst.unlink()
        raise ImportError_(
            f"{src}: token ids would change on import ({', '.join(moved[:5]) or sep}); the "
            "tokenizer's ids are not contiguous"
        )
    return tok


def _rename(vocab: dict, added: list[dict], old: str, new: str, token_id: int) -> None:
    if new in vocab or any(a["content"] == new for a in added):
        raise ImportError_(f"the tokenizer has both {old!r} and {new!r}; cannot rename")
    if old in vocab:
        vocab[new] = vocab.pop(old)
    found = False
    for a in added:
        if a["content"] == old:
            a["content"], found = new, True
    if not found:
        added.append(_special(new, token_id))


def _special(content: str, token_id: int) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def check_tokens(tf: TokenFile, vocab_size: int) -> None:
    """Every id below ``vocab_size``; at least one token."""
    if not len(tf.tokens):
        raise ImportError_(f"{tf.path}: no tokens")
    top = int(tf.tokens.max())
    if top >= vocab_size:
        raise ImportError_(
            f"{tf.path}: token id {top} is outside the tokenizer's vocabulary of {vocab_size}: "
            "these tokens were encoded with another tokenizer"
        )


def write_shard(tf: TokenFile, prefix: Path, tok: Tokenizer) -> ShardMeta:
    """Write ``tf``'s tokens as the shard ``prefix`` (documents start at each ``<bos>``)."""
    dtype = dtype_for_vocab(tok.vocab_size)
    tokens = tf.tokens.astype(dtype, copy=False)
    starts = np.flatnonzero(tokens == tok.bos_id)
    if not len(starts) or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    offsets = np.append(starts, len(tokens)).astype("<i8")
    paths = shard_paths(prefix)
    paths.bin.parent.mkdir(parents=True, exist_ok=True)
    paths.meta.unlink(missing_ok=True)  # the shard is incomplete until its metadata is back
    for final, data in ((paths.bin, tokens), (paths.idx, offsets)):
        tmp = final.with_name(final.name + ".import-tmp")
        with open(tmp, "wb") as fh:
            if final == paths.idx:
                np.save(fh, data, allow_pickle=False)
            else:
                data.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    fsync_dir(paths.bin.parent)
    meta = ShardMeta(
        format_version=FORMAT_VERSION,
        dtype="uint16" if dtype.itemsize == 2 else "uint32",
        n_tokens=int(len(tokens)),
        n_docs=int(len(offsets) - 1),
        vocab_size=tok.vocab_size,
        tokenizer_hash=tok.hash,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        docs_path=str(tf.path.resolve()),
        docs_sha256="",
        bin_sha256=sha256_file(paths.bin),
        idx_sha256=sha256_file(paths.idx),
    )
    atomic_write_json(paths.meta, meta.to_dict())
    return meta
