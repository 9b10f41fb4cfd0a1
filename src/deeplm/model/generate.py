"""Autoregressive sampling from a :class:`~deeplm.model.transformer.Transformer`.

Owns next-token selection (greedy / temperature / top-k / top-p) and the decoding loop, with or
without the KV cache.

Context longer than ``max_seq_len``: without the cache every step runs the model on the last
``max_seq_len`` tokens (positions restart at 0 for the cropped window). With the cache, decoding
is incremental while the sequence fits in ``max_seq_len``; once it no longer fits, each further
step falls back to recomputing over the cropped window exactly like the no-cache path. So
``use_cache=True`` and ``use_cache=False`` compute the same thing (up to float rounding) for any
length.

The model is put in eval mode for the duration of the call and its previous mode is restored.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from deeplm.model.transformer import KVCache, Transformer


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` ``[B, V]`` -> LongTensor ``[B]``.

    ``temperature == 0`` is greedy (argmax; top-k/top-p are then irrelevant). Otherwise the logits
    are divided by ``temperature``, filtered to the ``top_k`` largest (ties at the k-th value are
    kept) and to the smallest set of tokens whose probability mass reaches ``top_p`` (the most
    likely token is always kept), and sampled with ``generator``. Sampling happens on the
    generator's device, so a seeded CPU generator gives the same tokens whatever the model's
    device.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    out = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return out.to(logits.device)


def _token_steps(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> Iterator[Tensor]:
    """Yield the next token ``[B]`` of every row, ``max_new_tokens`` times (no stopping)."""
    max_len = model.cfg.max_seq_len
    seq = idx
    cache: KVCache | None = None
    for _ in range(max_new_tokens):
        n = seq.size(1)
        if use_cache and n <= max_len:
            if cache is None:  # prefill with the whole prompt
                cache = model.new_kv_cache()
                logits = model.forward_with_cache(seq, cache, start_pos=0)
            else:  # only the newest token is not cached yet
                logits = model.forward_with_cache(seq[:, -1:], cache, start_pos=n - 1)
        else:
            logits, _ = model(seq[:, -max_len:])
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        yield nxt


def _prepare(model: Transformer, idx: Tensor) -> Tensor:
    if idx.dim() != 2:
        raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
    if idx.size(1) == 0:
        raise ValueError("idx must hold at least one token (e.g. <bos>)")
    device = model.tok_emb.weight.device
    return idx.to(device=device, dtype=torch.long)


@torch.no_grad()
def generate(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend ``idx`` ``[B, T]`` by up to ``max_new_tokens`` tokens; returns ``[B, T + n]``.

    With ``eos_id``, a row that produced it keeps being padded with ``eos_id`` and decoding stops
    as soon as every row has produced it (so ``n`` may be less than ``max_new_tokens``; the eos
    token itself is included). See the module docstring for the context-length behaviour.
    """
    idx = _prepare(model, idx)
    was_training = model.training
    model.eval()
    try:
        out = [idx]
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        steps = _token_steps(
            model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator
        )
        for nxt in steps:
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if eos_id is not None and bool(done.all()):
                break
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()  # torch re-enters no_grad on each resume only, not while the caller runs
def stream_generate(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Like :func:`generate` for ONE sequence (``idx`` ``[T]`` or ``[1, T]``), yielding each new
    token id as a Python int as soon as it is chosen; ``eos_id`` is yielded, then it stops."""
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"stream_generate takes one sequence, got shape {tuple(idx.shape)}")
    idx = _prepare(model, idx)
    was_training = model.training
    model.eval()  # stays in eval mode until the generator is exhausted or closed
    try:
        steps = _token_steps(
            model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator
        )
        for nxt in steps:
            tok = int(nxt.item())
            yield tok
            if eos_id is not None and tok == eos_id:
                return
    finally:
        model.train(was_training)
