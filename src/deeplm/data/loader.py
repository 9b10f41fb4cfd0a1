"""Training and evaluation batches from a token shard, with an exact, resumable position.

The token stream of a :class:`~deeplm.data.shards.Shard` is cut into ``n_windows =
(n_tokens - 1) // seq_len`` non-overlapping windows of ``seq_len + 1`` tokens (window ``i`` is
``tokens[i*seq_len : i*seq_len + seq_len + 1]``; consecutive windows share one boundary token so
every token is a target exactly once). Windows ignore document boundaries: documents are packed
and separated by ``<eos><bos>``.

:class:`PackedBatches` reads the windows in epochs; epoch ``e`` visits all windows in the order
``numpy.random.default_rng((seed, e)).permutation(n_windows)``. The visiting order is one
continuous stream (epoch 0's permutation, then epoch 1's, ...); a batch that reaches the end of an
epoch is completed from the next one, so every window is visited exactly once per epoch and no
data is dropped. The state is ``(epoch, position)`` with ``position`` the index in the current
epoch's permutation of the next window to read; ``state_dict()`` holds plain ints only.

Data parallel: each step consumes ``world_size * micro_batch`` windows of the stream; rank ``r``
gets the ``r``-th slice of ``micro_batch`` of them. All ranks advance the same state, so every
rank's ``state_dict()`` is identical and any one of them can be saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from deeplm.data.shards import Shard

__all__ = ["PackedBatches", "eval_batches", "eval_window_indices", "n_windows"]

_STATE_KEYS = ("epoch", "position", "seed", "seq_len", "n_windows")


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Number of complete ``seq_len + 1``-token windows in a stream of ``n_tokens`` tokens."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return max(0, (n_tokens - 1) // seq_len)


def _require_windows(shard: Shard, seq_len: int) -> int:
    n = n_windows(len(shard), seq_len)
    if n < 1:
        raise ValueError(
            f"{shard.prefix}: shard has {len(shard)} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1} tokens; use more data or a shorter seq_len"
        )
    return n


def _gather(
    tokens: np.ndarray, windows: np.ndarray, seq_len: int, pin_memory: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y int64 tensors [len(windows), seq_len] for the given window indices."""
    idx = (windows.astype(np.int64) * seq_len)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    data = np.asarray(tokens[idx], dtype=np.int64)  # one fancy-indexed read from the memmap
    x = torch.from_numpy(np.ascontiguousarray(data[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(data[:, 1:]))
    if pin_memory and torch.cuda.is_available():
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


class PackedBatches:
    """Shuffled, epoch-based, exactly resumable batches of packed windows (see module doc)."""

    def __init__(
        self,
        shard: Shard,
        seq_len: int,
        micro_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if micro_batch <= 0:
            raise ValueError(f"micro_batch must be positive, got {micro_batch}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.shard = shard
        self.seq_len = int(seq_len)
        self.micro_batch = int(micro_batch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.pin_memory = pin_memory
        self.n_windows = _require_windows(shard, self.seq_len)
        self._epoch = 0
        self._position = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def epoch(self) -> int:
        """Current epoch (number of completed passes over all windows)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Index, in the current epoch's permutation, of the next window to read."""
        return self._position

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens in one rank's batch (``micro_batch * seq_len``)."""
        return self.micro_batch * self.seq_len

    @property
    def epoch_progress(self) -> float:
        """Epochs done as a float (``epoch + position / n_windows``)."""
        return self._epoch + self._position / self.n_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch or self._perm is None:
            rng = np.random.default_rng((self.seed, epoch))
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def _take(self, n: int) -> np.ndarray:
        """The next ``n`` window indices of the stream; advances the state."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            perm = self._permutation(self._epoch)
            k = min(n - filled, self.n_windows - self._position)
            out[filled : filled + k] = perm[self._position : self._position + k]
            filled += k
            self._position += k
            if self._position == self.n_windows:
                self._epoch += 1
                self._position = 0
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 ``[micro_batch, seq_len]``, ``y`` is ``x`` shifted by one token."""
        step = self._take(self.micro_batch * self.world_size)
        mine = step[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]
        return _gather(self.shard.tokens, mine, self.seq_len, self.pin_memory)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints: ``epoch, position, seed, seq_len, n_windows``."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`.

        The saved seed replaces the constructor's (the saved order continues). Same ``seq_len``:
        the following batches are exactly those the saved instance would have produced; the
        shard must have the same number of windows, else ``ValueError``. Different ``seq_len``
        (context curriculum): the epoch is kept and the position is converted proportionally,
        ``position * n_windows_now // n_windows_saved`` (same fraction of the epoch done); the
        windows differ, so that continuation is approximate by nature.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing} (got keys {sorted(state)})")
        vals = {}
        for k in _STATE_KEYS:
            v = state[k]
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"loader state {k!r} must be an int, got {v!r}")
            vals[k] = int(v)
        ok = vals["epoch"] >= 0 and 0 <= vals["position"] < vals["n_windows"]
        if not ok:
            raise ValueError(f"invalid loader state {vals}")
        if vals["seq_len"] == self.seq_len:
            if vals["n_windows"] != self.n_windows:
                raise ValueError(
                    f"loader state is for a shard of {vals['n_windows']} windows of seq_len "
                    f"{self.seq_len}, but {self.shard.prefix} has {self.n_windows}: the data "
                    "changed, cannot resume exactly"
                )
            position = vals["position"]
        else:
            position = vals["position"] * self.n_windows // vals["n_windows"]
        self.seed = vals["seed"]
        self._epoch = vals["epoch"]
        self._position = position
        self._perm = None
        self._perm_epoch = -1


def eval_window_indices(n_win: int, count: int) -> np.ndarray:
    """``count`` window indices spread evenly over ``[0, n_win)`` (all of them if fewer)."""
    if n_win <= count:
        return np.arange(n_win, dtype=np.int64)
    # Spacing >= 1, so rounding keeps the indices distinct; first and last windows included.
    return np.rint(np.linspace(0, n_win - 1, count)).astype(np.int64)


def eval_batches(
    shard: Shard, seq_len: int, micro_batch: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: ``n_batches * micro_batch`` windows spread evenly over the shard.

    The same windows, in the same order, every call (no randomness). If the shard has fewer
    windows than requested, every window is used once and the last batch may be smaller.
    """
    if micro_batch <= 0 or n_batches <= 0:
        raise ValueError(
            f"micro_batch and n_batches must be positive, got {micro_batch}, {n_batches}"
        )
    windows = eval_window_indices(_require_windows(shard, seq_len), micro_batch * n_batches)

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(windows), micro_batch):
            yield _gather(shard.tokens, windows[start : start + micro_batch], seq_len)

    return generate()
