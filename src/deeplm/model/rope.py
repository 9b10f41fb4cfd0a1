"""Rotary position embeddings (RoPE): the model-wide cos/sin cache and the rotation itself.

Convention: "rotate half" (Llama / GPT-NeoX with ``rotary_pct=1``), the same maths as Hugging
Face's ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``::

    inv_freq[i] = 1 / theta ** (2i / head_dim)          i = 0 .. head_dim/2 - 1
    angle[p, :] = cat(p * inv_freq, p * inv_freq)       shape [head_dim]
    rotate_half(x) = cat(-x[..., half:], x[..., :half])
    x_rot = x * cos(angle) + rotate_half(x) * sin(angle)

so a checkpoint's q/k projection rows can be exported to ``LlamaForCausalLM``-style models
without the interleave permutation that Meta-format checkpoints need.

One :class:`RotaryEmbedding` is owned by the model and shared by all layers. Its cos/sin tables
are computed in float32 and kept in float32 even if the module is cast with ``.to(dtype)``
(they are recomputed instead of being rounded); :meth:`RotaryEmbedding.forward` casts the slice
it returns to the activations' dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    """``cat(-x2, x1)`` where ``x1, x2`` are the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[..., head_dim]`` by ``cos``/``sin`` tables of this module (broadcastable
    to ``x``, e.g. ``[T, hd]`` for ``[..., T, hd]`` or ``[T, 1, hd]`` for ``[B, T, H, hd]``).

    ``x * cos + rotate_half(x) * sin``, computed on the two halves: the tables repeat their
    first half (``angle = cat(f, f)``), so ``out = cat(x1*c - x2*s, x2*c + x1*s)`` with ``c, s``
    the first halves. Fewer passes over memory than the textbook form (no negated copy, no
    full-size rotated copy), which matters for eager training (CPU, MPS).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin cache for positions ``0 .. max_seq_len - 1`` (buffers, not saved in state_dict)."""

    cos_cached: Tensor
    sin_cached: Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = float(theta)
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables in float32, on ``device`` or where the buffers already live.

        Call this after materialising a meta-device model with ``to_empty`` (buffers are then
        uninitialised memory); :meth:`Transformer.init_weights` does it for you.
        """
        if device is None:
            device = self.cos_cached.device
        cos, sin = self._compute(torch.device(device))
        self.cos_cached = cos
        self.sin_cached = sin

    def _compute(self, device: torch.device) -> tuple[Tensor, Tensor]:
        half = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (half / self.head_dim))
        pos = torch.arange(self.max_seq_len, dtype=torch.int64, device=device).float()
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def, override]
        # ``module.to(torch.bfloat16)`` would round the tables; recompute them in fp32 instead.
        super()._apply(fn, recurse)
        if self.cos_cached.dtype != torch.float32:
            self.reset_parameters(self.cos_cached.device)
        return self

    def forward(self, x_like: Tensor, seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """cos, sin of shape ``[seq_len, head_dim]`` for positions ``offset .. offset+seq_len-1``,
        in ``x_like``'s dtype and on its device."""
        end = offset + seq_len
        if offset < 0 or end > self.max_seq_len:
            raise ValueError(
                f"RoPE positions {offset}..{end - 1} are outside 0..{self.max_seq_len - 1} "
                f"(max_seq_len {self.max_seq_len})"
            )
        cos = self.cos_cached[offset:end].to(device=x_like.device, dtype=x_like.dtype)
        sin = self.sin_cached[offset:end].to(device=x_like.device, dtype=x_like.dtype)
        return cos, sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}"
