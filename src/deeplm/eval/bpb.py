"""Validation loss, perplexity and bits per byte over a shard's fixed evaluation windows.

Bits per byte (bpb) makes models with different tokenizers comparable: the summed next-token
negative log-likelihood (nats) of the text tokens divided by ``ln 2`` times the number of UTF-8
bytes those tokens stand for. With byte-level BPE every character of a (non-special) token's
vocabulary string is exactly one byte, so a token's byte count is the length of that string.
Targets that are special tokens (the ``<eos>``/``<bos>`` between packed documents) stand for no
bytes and are left out of bpb; they stay in the loss, which is therefore identical to the
training/validation loss (:func:`~deeplm.eval.perplexity.evaluate_loss`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deeplm.data.loader import eval_batches
from deeplm.data.shards import Shard
from deeplm.device import autocast_context
from deeplm.tokenizer import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes per token id (0 for special tokens), as an int64 array of ``vocab_size``."""
    specials = set(tokenizer.special_tokens)
    out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        tok = tokenizer.id_to_token(i)
        if tok is None or tok in specials:
            continue
        out[i] = len(tok)  # byte-level alphabet: one character per byte
    return out


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    shard: Shard,
    token_bytes: np.ndarray,
    seq_len: int,
    micro_batch: int,
    n_batches: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Loss (nats/token, all targets), perplexity and bpb (text targets) of ``model`` on
    ``n_batches`` fixed windows of ``shard`` (the windows of ``evaluate_loss``)."""
    was_training = model.training
    model.eval()
    table = torch.as_tensor(token_bytes, dtype=torch.float64, device=device)
    nll_all = torch.zeros((), dtype=torch.float64, device=device)
    nll_text = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    n_all = 0
    n_text = 0
    try:
        for x, y in eval_batches(shard, seq_len, micro_batch, n_batches):
            x, y = x.to(device), y.to(device)
            with autocast_context(device, dtype):
                logits, _ = model(x)
            ce = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
            ).double()
            b = table[y.reshape(-1).clamp(max=table.numel() - 1)]
            text = b > 0
            nll_all += ce.sum()
            nll_text += (ce * text).sum()
            n_bytes += b.sum()
            n_all += ce.numel()
            n_text += int(text.sum())
    finally:
        model.train(was_training)
    if n_all == 0:
        raise ValueError("evaluation shard produced no batches")
    loss = float(nll_all.item()) / n_all
    total_bytes = float(n_bytes.item())
    bpb = float(nll_text.item()) / math.log(2) / total_bytes if total_bytes else float("nan")
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "bpb": bpb,
        "tokens": n_all,
        "text_tokens": n_text,
        "bytes": int(total_bytes),
        "bytes_per_token": total_bytes / n_text if n_text else float("nan"),
    }
