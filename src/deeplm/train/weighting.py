"""Rare-token loss weighting: per-token weights from a phase's token frequencies.

``w(t) = (f(t) + eps) ** -alpha`` — rare tokens up, frequent ones (punctuation, stop words) down
— clipped to ``[1/max_weight, max_weight]`` and normalised so the frequency-weighted mean weight
is 1 (the loss keeps its scale: an average token still counts once).
"""

from __future__ import annotations

import numpy as np


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Occurrences of each id in a (memmapped) token array, read in chunks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[start : start + chunk]), minlength=vocab_size)[
            :vocab_size
        ]
    return counts


def token_weights(
    tokens: np.ndarray, vocab_size: int, alpha: float, max_weight: float = 4.0
) -> np.ndarray:
    """float32 weights per token id (mean 1 under the data's own token distribution)."""
    counts = token_counts(tokens, vocab_size)
    total = counts.sum()
    if total == 0:
        raise ValueError("cannot weight tokens of an empty shard")
    freq = counts / total
    eps = 0.5 / total  # unseen ids behave like ids seen half a time
    w = (freq + eps) ** -alpha
    for _ in range(20):  # clip and renormalise until stable
        w = w / (freq * w).sum()
        clipped = np.clip(w, 1.0 / max_weight, max_weight)
        if np.allclose(clipped, w):
            break
        w = clipped
    return w.astype(np.float32)
