"""Tests for deeplm.data.loader: packing, epochs, exact resume, ranks, eval windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplm.config import TokenizerConfig
from deeplm.data.loader import PackedBatches, eval_batches, eval_window_indices, n_windows
from deeplm.data.shards import Shard, ShardMeta, tokenize_to_shard
from deeplm.tokenizer import train_tokenizer

SEQ = 16


def make_shard(n_tokens: int) -> Shard:
    """An in-memory shard whose token at position p is p (so windows are easy to identify)."""
    tokens = np.arange(n_tokens, dtype=np.uint32)
    meta = ShardMeta(
        format_version=1,
        dtype="uint32",
        n_tokens=n_tokens,
        n_docs=1,
        vocab_size=2**20,
        tokenizer_hash="0" * 64,
        bos_id=1,
        eos_id=2,
        docs_path="",
        docs_sha256="",
        bin_sha256="",
        idx_sha256="",
    )
    return Shard(Path("mem/train"), meta, tokens, np.array([0, n_tokens], dtype=np.int64))


def window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // SEQ).tolist()


@pytest.fixture
def shard() -> Shard:
    return make_shard(100 * SEQ + 1)  # exactly 100 windows


def test_shapes_and_shift(shard: Shard) -> None:
    loader = PackedBatches(shard, SEQ, 8, seed=0)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, SEQ)
        assert x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts = x[:, :1]
        assert torch.equal(x, starts + torch.arange(SEQ))  # window i = tokens[i*SEQ : ...]
        assert torch.equal(y, x + 1)
        assert (starts % SEQ == 0).all()


def test_windows_and_counts() -> None:
    assert n_windows(100 * SEQ + 1, SEQ) == 100
    assert n_windows(100 * SEQ, SEQ) == 99  # the last window would lack its final target
    assert n_windows(SEQ, SEQ) == 0
    assert n_windows(0, SEQ) == 0


def test_every_window_once_per_epoch(shard: Shard) -> None:
    loader = PackedBatches(shard, SEQ, 7, seed=3)  # 7 does not divide 100
    seen: list[int] = []
    epochs: list[int] = []
    while len(seen) < 300:
        seen += window_ids(loader.next_batch()[0])
        epochs.append(loader.epoch)
    for e in range(3):
        part = seen[e * 100 : (e + 1) * 100]
        assert sorted(part) == list(range(100)), f"epoch {e} did not visit each window once"
        assert part == np.random.default_rng((3, e)).permutation(100).tolist()
    assert seen[:100] != seen[100:200]  # each epoch has its own order
    assert loader.epoch == 3 and epochs[0] == 0 and epochs == sorted(epochs)


def test_deterministic_and_seed_dependent(shard: Shard) -> None:
    a = PackedBatches(shard, SEQ, 4, seed=11)
    b = PackedBatches(shard, SEQ, 4, seed=11)
    c = PackedBatches(shard, SEQ, 4, seed=12)
    xa = [a.next_batch()[0] for _ in range(30)]
    xb = [b.next_batch()[0] for _ in range(30)]
    xc = [c.next_batch()[0] for _ in range(30)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


@pytest.mark.parametrize("skip", [3, 24, 25, 49])  # mid-epoch, just before / at / across ends
def test_exact_resume(shard: Shard, skip: int, tmp_path: Path) -> None:
    loader = PackedBatches(shard, SEQ, 4, seed=5)
    for _ in range(skip):
        loader.next_batch()
    state = loader.state_dict()
    assert set(state) == {"epoch", "position", "seed", "seq_len", "n_windows"}
    assert all(type(v) is int for v in state.values())
    torch.save({"loader": state}, tmp_path / "ckpt.pt")
    expected = [loader.next_batch() for _ in range(60)]  # crosses at least one epoch boundary

    restored = PackedBatches(shard, SEQ, 4, seed=999)  # the saved seed wins
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"])
    assert restored.state_dict() == state
    for (x, y), (ex, ey) in zip((restored.next_batch() for _ in range(60)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert restored.state_dict() == loader.state_dict()


def test_epoch_boundary_state(shard: Shard) -> None:
    loader = PackedBatches(shard, SEQ, 10, seed=0)
    for _ in range(10):
        loader.next_batch()
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    loader = PackedBatches(shard, SEQ, 30, seed=0)
    for _ in range(4):  # 120 windows: epoch 0 (100) + 20 of epoch 1
        loader.next_batch()
    assert (loader.epoch, loader.position) == (1, 20)
    assert loader.epoch_progress == pytest.approx(1.2)


def test_ranks_split_the_stream(shard: Shard) -> None:
    single = PackedBatches(shard, SEQ, 4, seed=9)
    ranks = [PackedBatches(shard, SEQ, 4, seed=9, rank=r, world_size=3) for r in range(3)]
    seen: list[int] = []
    for _ in range(8):  # 8 steps * 3 ranks * 4 = 96 windows, all within epoch 0
        for r in ranks:
            x, _ = r.next_batch()
            expected, _ = single.next_batch()
            assert torch.equal(x, expected)
            seen += window_ids(x)
    assert len(set(seen)) == len(seen) == 96
    assert len({json.dumps(r.state_dict()) for r in ranks}) == 1


def test_tiny_shards(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        PackedBatches(make_shard(SEQ), SEQ, 2, seed=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_batches(make_shard(5), SEQ, 2, 3)
    one = PackedBatches(make_shard(SEQ + 1), SEQ, 4, seed=0)  # one window, batch of 4
    x, y = one.next_batch()
    assert torch.equal(x, torch.arange(SEQ).repeat(4, 1))
    assert one.epoch == 4


def test_bad_arguments(shard: Shard) -> None:
    with pytest.raises(ValueError):
        PackedBatches(shard, SEQ, 0, seed=0)
    with pytest.raises(ValueError):
        PackedBatches(shard, SEQ, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        PackedBatches(shard, 0, 2, seed=0)


def test_load_state_errors(shard: Shard) -> None:
    loader = PackedBatches(shard, SEQ, 4, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="must be an int"):
        loader.load_state_dict({**state, "position": 1.5})
    with pytest.raises(ValueError, match="invalid loader state"):
        loader.load_state_dict({**state, "position": 100})
    other = PackedBatches(make_shard(50 * SEQ + 1), SEQ, 4, seed=0)
    with pytest.raises(ValueError, match="data\\s+changed"):
        other.load_state_dict(state)


def test_seq_len_change_converts_position(shard: Shard) -> None:
    loader = PackedBatches(shard, SEQ, 10, seed=2)
    for _ in range(13):  # epoch 1, position 30 of 100
        loader.next_batch()
    longer = PackedBatches(shard, 2 * SEQ, 10, seed=2)  # 50 windows of 32 tokens
    longer.load_state_dict(loader.state_dict())
    assert (longer.epoch, longer.position) == (1, 15)
    assert longer.state_dict()["seq_len"] == 2 * SEQ
    x, _ = longer.next_batch()
    assert x.shape == (10, 2 * SEQ)
    expected = np.random.default_rng((2, 1)).permutation(50)[15:25]
    assert (x[:, 0] // (2 * SEQ)).tolist() == expected.tolist()


def test_eval_batches_fixed_and_spread(shard: Shard) -> None:
    first = list(eval_batches(shard, SEQ, 4, 5))
    second = list(eval_batches(shard, SEQ, 4, 5))
    assert len(first) == 5
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(y1, x1 + 1) and x1.shape == (4, SEQ)
    ids = [w for x, _ in first for w in window_ids(x)]
    assert ids == eval_window_indices(100, 20).tolist()
    assert ids[0] == 0 and ids[-1] == 99 and len(set(ids)) == 20
    gaps = np.diff(ids)
    assert gaps.min() >= 5 and gaps.max() <= 6  # evenly spread over 100 windows
    # Fewer windows than asked: each once, the last batch smaller.
    small = list(eval_batches(make_shard(10 * SEQ + 1), SEQ, 4, 5))
    assert [x.shape[0] for x, _ in small] == [4, 4, 2]
    assert [w for x, _ in small for w in window_ids(x)] == list(range(10))


def test_real_shard(tmp_path: Path) -> None:
    texts = [f"Doc {i}: " + "the quick brown fox jumps. " * (i % 7 + 1) for i in range(300)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300), tmp_path / "tok.json")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tokenize_to_shard(docs, tok, tmp_path / "train")
    shard = Shard.open(tmp_path / "train", tok.hash)
    tokens = np.asarray(shard.tokens).astype(np.int64)
    loader = PackedBatches(shard, 32, 6, seed=1)
    x, y = loader.next_batch()
    perm = np.random.default_rng((1, 0)).permutation(loader.n_windows)[:6]
    for row, w in zip(range(6), perm):
        window = torch.from_numpy(tokens[w * 32 : w * 32 + 33])
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])
    (ex, ey), *_ = eval_batches(shard, 32, 2, 1)
    assert torch.equal(ex[0], torch.from_numpy(tokens[:32]))
