"""Byte-level BPE tokenizer: training, loading, encoding/decoding and the tokenizer's identity hash.

This module owns the tokenizer file (``tokenizer.json``, Hugging Face ``tokenizers`` format) and
its hash. Design points other modules rely on:

* Byte-level BPE with no normalizer: every string is representable and
  ``decode(encode(text)) == text`` exactly (whitespace, newlines, any unicode).
* Special tokens get ids ``0..`` in ``TokenizerConfig.special_tokens`` order
  (``<pad>=0, <bos>=1, <eos>=2, <|user|>=3, <|assistant|>=4, <|end|>=5`` by default).
* :meth:`Tokenizer.encode` treats special-token strings that occur in the text (say a literal
  ``<eos>`` in a web page) as ordinary text; only ``encode(..., allow_special=True)`` maps them to
  their special ids (for chat templates). Specials are never added automatically.
* :attr:`Tokenizer.hash` (= :func:`tokenizer_hash`) is the sha256 of a canonical form of the JSON
  (parsed, keys sorted, compact separators), so it does not depend on whitespace/pretty-printing.
  Shards and checkpoints record it; data tokenized by different tokenizers is never mixed.
* Training is deterministic: the same text and config give a byte-identical file (checked across
  processes and thread counts with ``tokenizers`` 0.23: ties between equally frequent pairs are
  broken by a fixed order, not hash-map order).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from deeplm.atomic import atomic_write_text
from deeplm.config import TokenizerConfig

__all__ = [
    "REQUIRED_SPECIALS",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "canonical_tokenizer_json",
    "limit_chars",
    "tokenizer_hash",
    "train_tokenizer",
]

# Specials every deeplm tokenizer must have (the shard format and the trainer use them).
REQUIRED_SPECIALS = ("<pad>", "<bos>", "<eos>")


class TokenizerError(ValueError):
    """A tokenizer file is missing or invalid, or a tokenizer config cannot be trained."""


def canonical_tokenizer_json(data: str | bytes | dict[str, Any]) -> str:
    """Canonical text of a tokenizer JSON: parsed and re-dumped with sorted keys, no spaces."""
    obj = json.loads(data) if isinstance(data, str | bytes) else data
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _hash_json_text(text: str) -> str:
    return hashlib.sha256(canonical_tokenizer_json(text).encode("utf-8")).hexdigest()


def _read_tokenizer_text(path: Path) -> str:
    if not path.exists():
        raise TokenizerError(f"{path}: tokenizer file not found")
    if not path.is_file():
        raise TokenizerError(f"{path}: not a file (expected a tokenizer.json)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not a tokenizer file (not UTF-8: {exc.reason})") from None


def tokenizer_hash(path: str | os.PathLike[str]) -> str:
    """sha256 hex of the canonical JSON of the tokenizer file at ``path`` (its identity)."""
    p = Path(path)
    text = _read_tokenizer_text(p)
    try:
        return _hash_json_text(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{p}: not a tokenizer file (invalid JSON: {exc})") from None


def limit_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield ``texts`` until ``max_chars`` characters have been yielded (the last one truncated).

    Never pulls another item from ``texts`` once the budget is spent. ``max_chars <= 0`` means
    no limit.
    """
    if max_chars <= 0:
        yield from texts
        return
    left = max_chars
    for text in texts:
        if len(text) >= left:
            yield text[:left]
            return
        left -= len(text)
        yield text


def _build_untrained(cfg: TokenizerConfig) -> tuple[HFTokenizer, trainers.BpeTrainer]:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _check_cfg(cfg: TokenizerConfig) -> None:
    specials = list(cfg.special_tokens)
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"tokenizer.special_tokens has duplicates: {specials}")
    if specials[: len(REQUIRED_SPECIALS)] != list(REQUIRED_SPECIALS):
        raise TokenizerError(
            f"tokenizer.special_tokens must start with {list(REQUIRED_SPECIALS)} "
            f"(ids 0, 1, 2), got {specials}"
        )
    minimum = 256 + len(specials)
    if cfg.vocab_size < minimum:
        raise TokenizerError(
            f"tokenizer.vocab_size ({cfg.vocab_size}) must be at least {minimum} "
            f"(256 byte tokens + {len(specials)} specials)"
        )


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, out_path: str | os.PathLike[str]
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` and write it atomically to ``out_path``.

    At most ``cfg.max_train_chars`` characters are consumed from ``texts`` (streamed, never all
    held in memory by this function). If the text is too small to learn ``cfg.vocab_size``
    tokens the vocabulary is smaller; check :attr:`Tokenizer.vocab_size`.
    """
    _check_cfg(cfg)
    out = Path(out_path)
    tok, trainer = _build_untrained(cfg)
    tok.train_from_iterator(limit_chars(texts, cfg.max_train_chars), trainer=trainer)
    for i, special in enumerate(cfg.special_tokens):
        if tok.token_to_id(special) != i:  # guaranteed by the trainer; guard against changes
            raise TokenizerError(f"special token {special!r} did not get id {i}")
    text = tok.to_str(pretty=True) + "\n"
    atomic_write_text(out, text)
    return Tokenizer(tok, out, _hash_json_text(text))


class Tokenizer:
    """A trained tokenizer loaded from a ``tokenizer.json`` (use :meth:`load`)."""

    def __init__(self, hf: HFTokenizer, path: Path, hash_: str) -> None:
        self._hf = hf
        self._hf.encode_special_tokens = True  # special strings in text are plain text
        self._hf_special: HFTokenizer | None = None
        self._bytes_cache: dict[int, tuple[bool, bytes]] = {}  # id -> (special, bytes)
        self.path = Path(path)
        self.hash = hash_
        for special in REQUIRED_SPECIALS:
            if hf.token_to_id(special) is None:
                raise TokenizerError(
                    f"{self.path}: tokenizer lacks the special token {special!r} "
                    f"(deeplm needs {list(REQUIRED_SPECIALS)})"
                )
        self.pad_id: int = hf.token_to_id("<pad>")
        self.bos_id: int = hf.token_to_id("<bos>")
        self.eos_id: int = hf.token_to_id("<eos>")
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``path``; raises :class:`TokenizerError` naming the file if missing or invalid."""
        p = Path(path)
        text = _read_tokenizer_text(p)
        try:
            hash_ = _hash_json_text(text)
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{p}: not a tokenizer file (invalid JSON: {exc})") from None
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizerError(f"{p}: not a tokenizer file ({exc})") from None
        return cls(hf, p, hash_)

    @property
    def hf(self) -> HFTokenizer:
        """The underlying Hugging Face tokenizer (special strings in text encode as text)."""
        return self._hf

    @property
    def special_tokens(self) -> list[str]:
        """Special tokens in id order."""
        decoder = self._hf.get_added_tokens_decoder()
        return [decoder[i].content for i in sorted(decoder) if decoder[i].special]

    def _special_aware(self) -> HFTokenizer:
        if self._hf_special is None:
            self._hf_special = HFTokenizer.from_str(self._hf.to_str())
            self._hf_special.encode_special_tokens = False
        return self._hf_special

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; no bos/eos added.

        With ``allow_special=False`` (default) special-token strings in ``text`` are encoded as
        ordinary text; with ``True`` they become their special ids (chat templates).
        """
        hf = self._special_aware() if allow_special else self._hf
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts, run in parallel inside ``tokenizers`` (Rust threads)."""
        hf = self._special_aware() if allow_special else self._hf
        encodings = hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Special tokens are rendered as their strings unless skipped. Bytes
        that are not valid UTF-8 (a token sequence cut inside a character) become U+FFFD; for
        text a model generated use :meth:`decode_generated`."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one token stands for (a special token: its string, or b"" when skipped)."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            specials = self._hf.get_added_tokens_decoder()
            if token_id in specials:
                cached = (specials[token_id].special, specials[token_id].content.encode())
            else:
                piece = self._hf.id_to_token(int(token_id)) or ""
                table = _unicode_to_byte()
                cached = (False, bytes(table[c] for c in piece if c in table))
            self._bytes_cache[token_id] = cached
        special, data = cached
        return b"" if special and skip_special_tokens else data

    def decode_generated(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of generated ``ids``: like :meth:`decode`, but bytes that do not form complete
        UTF-8 characters (a sample cut inside a character, a stray byte token) are left out
        instead of shown as U+FFFD. Valid text decodes exactly as with :meth:`decode`."""
        data = b"".join(self.token_bytes(i, skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="ignore")

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary form, e.g. ``"Ġthe"``), or None if absent."""
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A :class:`StreamDecoder` for printing tokens one at a time while sampling."""
        return StreamDecoder(self, skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"hash={self.hash[:12]})"
        )


class StreamDecoder:
    """Incremental decoding: feed ids one by one, get the newly completed text.

    A byte-level token may end in the middle of a multi-byte UTF-8 character; such bytes are held
    back until the character is complete, and bytes that can never form one are dropped, so the
    concatenation of all returned pieces equals ``tokenizer.decode_generated(all_ids)`` and never
    holds U+FFFD that the model did not write as a character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def step(self, token_id: int) -> str:
        """Add one id; return the text that became final (possibly "")."""
        return self._utf8.decode(self._tok.token_bytes(int(token_id), self._skip))

    def flush(self) -> str:
        """End of the stream: an incomplete character held back is dropped."""
        piece = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return piece


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The byte-level alphabet's inverse: the character standing for each byte (GPT-2's
    ``bytes_to_unicode``, which the ``tokenizers`` ByteLevel pre-tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}
