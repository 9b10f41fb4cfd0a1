"""Validation loss and perplexity over fixed, deterministic windows of a shard."""

from __future__ import annotations

import math

import torch
from torch import nn

from deeplm.data.loader import eval_batches
from deeplm.data.shards import Shard
from deeplm.device import autocast_context


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    shard: Shard,
    seq_len: int,
    micro_batch: int,
    n_batches: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over ``n_batches`` fixed windows of ``shard``
    (batches weighted by their size; the last one may be smaller)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    try:
        for x, y in eval_batches(shard, seq_len, micro_batch, n_batches):
            x, y = x.to(device), y.to(device)
            with autocast_context(device, dtype):
                loss, _ = model.loss(x, y)
            total += loss.double() * x.shape[0]
            count += x.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation shard produced no batches")
    return float(total.item() / count)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
