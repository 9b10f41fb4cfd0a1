"""Cross-entropy through the output head without the full logits tensor (chunked, fused).

The plain path materialises ``[B, T, V]`` logits, their float32 copy, and for backward the
float32 gradient of the same size: at 16 x 512 tokens and a 32k vocabulary that is 3 GB and
more, most of a laptop's training memory for the 60-layer model. :func:`linear_cross_entropy`
instead walks the rows in chunks: for each chunk it computes the logits (in the autocast dtype,
like ``nn.Linear`` would), the float32 cross-entropy, and at once the gradients with respect to
the hidden states and the head weight (``softmax - onehot``, scaled by the token weights), then
drops the chunk. Backward only scales the stored gradients by the incoming one. The three GEMMs
are those of the plain path; the peak extra memory is one chunk's logits.

The loss is the one :func:`deeplm.model.transformer.lm_loss` defines: ``sum(w * ce) / sum(w)``
over positions whose target is not ``IGNORE_INDEX`` (``w = 1`` without weights; 0 when nothing
counts). The unweighted mean comes out of the same pass, detached, for reporting.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 64M (256 MB in float32)


def _compute_dtype(ref: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in here: the autocast dtype when autocast is on."""
    kind = ref.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return ref.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        token_weights: Tensor | None,
        chunk_rows: int,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.size(0)
        dtype = _compute_dtype(hidden)
        w_c = weight.to(dtype)
        valid = targets != IGNORE_INDEX
        w = valid.float() if token_weights is None else token_weights.float() * valid
        denom = w.sum()
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        n_valid = valid.sum().clamp_min(1).float()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weighted = hidden.new_zeros((), dtype=torch.float32)
        plain = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            h = hidden[start:stop].to(dtype)
            t = targets[start:stop]
            logits = (h @ w_c.t()).float()
            ce = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
            weighted = weighted + (w[start:stop] * ce).sum()
            plain = plain + (ce * valid[start:stop]).sum()
            if not need_grad:
                continue
            # d(sum(w*ce)/denom)/dlogits = (softmax - onehot) * w / denom, row by row
            g = torch.softmax(logits, dim=-1)
            rows = torch.arange(stop - start, device=g.device)
            safe_t = torch.where(valid[start:stop], t, torch.zeros_like(t))
            g[rows, safe_t] -= 1.0
            g *= (w[start:stop] / denom).unsqueeze(1)
            g = g.to(dtype)
            grad_hidden[start:stop] = (g @ w_c).to(hidden.dtype)
            grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if need_grad else None)
        unweighted = plain / n_valid
        ctx.mark_non_differentiable(unweighted)
        return weighted / denom, unweighted

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_plain: Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weights: Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss, unweighted loss)`` of ``hidden @ weight.T`` against ``targets`` (see module doc).

    ``hidden`` ``[..., d]``, ``weight`` ``[V, d]``, ``targets`` and ``token_weights`` ``[...]``.
    The unweighted loss is detached (a figure to report); without weights the two are equal.
    ``chunk_rows`` defaults to :data:`CHUNK_ELEMENTS` logits per chunk.
    """
    d = hidden.size(-1)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.size(0))
    flat_w = None if token_weights is None else token_weights.reshape(-1)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, d), weight, targets.reshape(-1), flat_w, rows
    )
