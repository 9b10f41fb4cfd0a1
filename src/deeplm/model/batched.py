"""Batched incremental decoding of several sequences at different positions (the server's engine).

Owns :class:`SlotCache`, a key/value cache with one row ("slot") per sequence, and the two model
calls the server's scheduler makes: :func:`prefill` (one prompt into one slot, exactly the
unbatched :meth:`~deeplm.model.transformer.Transformer.forward_with_cache`) and
:func:`decode_step` (the next token of every active slot in ONE forward pass, each row at its own
position: per-row RoPE angles and a per-row attention mask over the slot's cached keys).

Active sequences occupy rows ``0 .. B-1``; :meth:`SlotCache.move` compacts the rows when a
sequence finishes, so a step never touches free rows. With temperature 0 the tokens equal
unbatched greedy decoding (tested); only float rounding differs between batch sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deeplm.model.rope import apply_rotary
from deeplm.model.transformer import KVCache, Transformer


class SlotCache:
    """Per-layer keys/values ``[slots, n_heads, max_seq_len, head_dim]``, one row per sequence."""

    def __init__(self, model: Transformer, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        cfg = model.cfg
        weight = model.tok_emb.weight
        shape = (slots, cfg.n_heads, cfg.max_seq_len, cfg.head_dim)
        self.slots = slots
        self.max_len = cfg.max_seq_len
        self.k = [weight.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.v = [weight.new_zeros(shape) for _ in range(cfg.n_layers)]

    def row(self, row: int) -> KVCache:
        """A batch-1 :class:`KVCache` whose tensors are views of row ``row`` (writes land here)."""
        cache = KVCache(len(self.k), self.max_len)
        cache.k = [k[row : row + 1] for k in self.k]
        cache.v = [v[row : row + 1] for v in self.v]
        return cache

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (compaction after a sequence finished)."""
        if src != dst:
            for k, v in zip(self.k, self.v, strict=True):
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])


@torch.no_grad()
def prefill(model: Transformer, cache: SlotCache, row: int, prompt_ids: list[int]) -> Tensor:
    """Run the prompt into slot ``row``; returns the float32 logits ``[V]`` of its last token."""
    if not 0 < len(prompt_ids) <= cache.max_len:
        raise ValueError(f"prompt length {len(prompt_ids)} not in 1..{cache.max_len}")
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=model.tok_emb.weight.device)
    return model.forward_with_cache(idx, cache.row(row), start_pos=0)[0, -1]


@torch.no_grad()
def decode_step(
    model: Transformer, cache: SlotCache, tokens: list[int], positions: list[int]
) -> Tensor:
    """Feed token ``tokens[i]`` at position ``positions[i]`` to slot ``i`` for ``i < B``
    (``B = len(tokens)``) and return the float32 logits ``[B, V]`` of the next tokens.

    Slot ``i`` must hold the keys/values of positions ``0 .. positions[i]-1``."""
    b, end = len(tokens), max(positions) + 1
    if end > cache.max_len or len(positions) != b:
        raise ValueError(f"{b} tokens at positions up to {end - 1} (max_seq_len {cache.max_len})")
    device = model.tok_emb.weight.device
    idx = torch.tensor(tokens, dtype=torch.long, device=device)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    x = model.embd_drop(model.tok_emb(idx[:, None]))  # [B, 1, d]
    hd = model.cfg.head_dim
    cos = model.rope.cos_cached[pos].to(x.dtype).view(b, 1, 1, 1, hd)
    sin = model.rope.sin_cached[pos].to(x.dtype).view(b, 1, 1, 1, hd)
    mask = None  # same position everywhere: every cached key is visible, as unbatched
    if min(positions) + 1 != end:
        keys = torch.arange(end, device=device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, end]
    rows = torch.arange(b, device=device)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.qkv(block.ln1(x)).view(b, 1, 3, attn.n_heads, hd)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)
        q, k, v = qk[:, 0, 0, :, None], qk[:, 0, 1], qkv[:, 0, 2]  # [B,H,1,hd], [B,H,hd] x2
        ck, cv = cache.k[i], cache.v[i]
        ck[rows, :, pos] = k.to(ck.dtype)
        cv[rows, :, pos] = v.to(cv.dtype)
        y = F.scaled_dot_product_attention(q, ck[:b, :, :end], cv[:b, :, :end], attn_mask=mask)
        x = x + attn.resid_drop(attn.proj(y.transpose(1, 2).reshape(b, 1, attn.d_model)))
        x = x + block.mlp(block.ln2(x))
    return model.lm_head(model.norm_f(x)).float()[:, 0]
