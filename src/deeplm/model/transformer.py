"""The decoder-only Transformer: blocks, loss, initialisation, KV cache, parameter/FLOP counts.

Architecture:

* token embedding -> dropout(``embd_dropout``) -> ``n_layers`` pre-norm blocks -> final
  LayerNorm -> LM head (tied to the token embedding when ``tie_embeddings``).
* block: ``x = x + drop(attn(ln1(x)))``; ``x = x + drop(mlp(ln2(x)))`` with
  ``drop`` = ``resid_dropout``.
* No biases in any Linear. LayerNorms keep their (affine) bias: ``nn.LayerNorm(d, eps)``.
* attention: fused ``qkv = Linear(d, 3d)`` whose output splits as ``[q | k | v]`` (rows
  ``0:d`` of the weight are the q projection, ``d:2d`` k, ``2d:3d`` v; inside each, head ``h``
  owns rows ``h*head_dim:(h+1)*head_dim``), RoPE (rotate-half, see :mod:`deeplm.model.rope`) on
  q and k, ``F.scaled_dot_product_attention`` (causal, ``attn_dropout`` in training), output
  projection ``Linear(d, d)``.
* ``qk_norm``: q and k each go through a per-head LayerNorm without bias (weight
  ``[n_heads, head_dim]``, StableLM's ``qk_layernorm``) before RoPE.
* MLP: ``gelu``: ``Linear(d, h) -> exact GELU (erf, F.gelu default) -> Linear(h, d)`` with
  ``h = int(mlp_ratio * d)``; ``relu2``: the same with ``relu(x)**2`` (squared ReLU).
  ``swiglu``: ``Linear(d, 2h)`` whose output splits as ``[gate | up]``,
  ``silu(gate) * up -> Linear(h, d)`` with ``h = round(mlp_ratio * d * 2/3 / 8) * 8`` (Python
  ``round``), which keeps the parameter count close to the GELU MLP's.
* init: every Linear / Embedding weight ~ N(0, init_std); the residual output projections
  (attention ``proj`` and MLP ``down``, marked ``residual_proj = True``) ~
  N(0, init_std / sqrt(2 * n_layers)), or zero with ``zero_init_residual``; LayerNorm weight 1,
  bias 0.

Logits are returned in float32; the loss is float32 cross-entropy with ``ignore_index=-100``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deeplm.config import ModelConfig
from deeplm.model.fused_loss import IGNORE_INDEX, linear_cross_entropy
from deeplm.model.rope import RotaryEmbedding, apply_rotary


def mlp_hidden_dim(cfg: ModelConfig) -> int:
    """Hidden width of the MLP: ``int(mlp_ratio*d)`` for gelu, parameter-matched for swiglu."""
    if cfg.activation == "swiglu":
        return max(8, round(cfg.mlp_ratio * cfg.d_model * 2 / 3 / 8) * 8)
    return int(cfg.mlp_ratio * cfg.d_model)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Preallocated per-layer key/value cache for incremental decoding.

    Each layer's tensors are ``[B, n_heads, max_len, head_dim]``, allocated on the first write
    with the dtype/device of the keys written (so it follows autocast / bf16 models).
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.n_layers = n_layers
        self.max_len = max_len
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` ``[B, H, T, hd]`` at positions ``start_pos..start_pos+T-1`` and return
        the cached keys/values for positions ``0..start_pos+T-1``."""
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end - 1} >= max_len {self.max_len}")
        ck, cv = self.k[layer], self.v[layer]
        if ck is None or cv is None:
            b, h, _, hd = k.shape
            ck = k.new_zeros(b, h, self.max_len, hd)
            cv = v.new_zeros(b, h, self.max_len, hd)
            self.k[layer], self.v[layer] = ck, cv
        ck[:, :, start_pos:end] = k
        cv[:, :, start_pos:end] = v
        return ck[:, :, :end], cv[:, :, :end]


class HeadNorm(nn.Module):
    """LayerNorm over each head's ``head_dim`` with a per-head weight and no bias."""

    def __init__(self, n_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x [..., n_heads, head_dim]
        y = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return (y * self.weight.float()).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.proj.residual_proj = True  # type: ignore[assignment]
        self.resid_drop = _dropout(cfg.resid_dropout)
        self.q_norm = HeadNorm(cfg.n_heads, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg.n_heads, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qn, kn = self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1])
            qkv = torch.stack((qn, kn, qkv[:, :, 2]), dim=2)
        # q and k rotated together, in the projection's [B, T, (q|k), H, hd] layout
        cos = cos.to(qkv.dtype).view(t, 1, 1, self.head_dim)
        sin = sin.to(qkv.dtype).view(t, 1, 1, self.head_dim)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        dropout_p = self.attn_dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k, v = kv_cache.update(self.layer_idx, k, v, start_pos)
            if t == 1:  # one new token attends to every cached position
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif start_pos == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            else:  # a chunk after a prefix: SDPA's is_causal is top-left aligned, so build it
                q_pos = torch.arange(start_pos, start_pos + t, device=x.device)
                k_pos = torch.arange(start_pos + t, device=x.device)
                mask = k_pos[None, :] <= q_pos[:, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, self.d_model)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.hidden = mlp_hidden_dim(cfg)
        n_up = 2 * self.hidden if cfg.activation == "swiglu" else self.hidden
        self.up = nn.Linear(cfg.d_model, n_up, bias=False)
        self.down = nn.Linear(self.hidden, cfg.d_model, bias=False)
        self.down.residual_proj = True  # type: ignore[assignment]
        self.resid_drop = _dropout(cfg.resid_dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            gate, up = h.split(self.hidden, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.resid_drop(self.down(h))


class Block(nn.Module):
    """Pre-norm Transformer block: attention then MLP, each with a residual add."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), cos, sin, kv_cache, start_pos)
        return x + self.mlp(self.ln2(x))


def lm_loss(logits: Tensor, targets: Tensor, loss_weights: Tensor | None = None) -> Tensor:
    """float32 cross-entropy over all positions, ``ignore_index=-100``.

    Unweighted: mean over non-ignored positions. Weighted: ``sum(w*ce) / sum(w)`` with the sum of
    ``w`` taken over non-ignored positions. If nothing counts (all ignored / zero weight) the loss
    is 0 (not NaN).
    """
    ce, valid = _token_ce(logits, targets)
    return _weighted_mean(ce, _loss_weights(valid, ce.dtype, loss_weights))


def lm_losses(
    logits: Tensor, targets: Tensor, loss_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(``lm_loss(logits, targets, loss_weights)``, the detached unweighted loss), from one
    cross-entropy over the logits."""
    ce, valid = _token_ce(logits, targets)
    loss = _weighted_mean(ce, _loss_weights(valid, ce.dtype, loss_weights))
    if loss_weights is None:
        return loss, loss.detach()
    return loss, _weighted_mean(ce.detach(), valid.to(ce.dtype))


def _token_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """float32 per-token cross-entropy (0 at ignored positions) and the mask of counted ones."""
    v = logits.size(-1)
    flat_t = targets.reshape(-1)
    ce = F.cross_entropy(
        logits.reshape(-1, v).float(), flat_t, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce, flat_t != IGNORE_INDEX


def _loss_weights(valid: Tensor, dtype: torch.dtype, loss_weights: Tensor | None) -> Tensor:
    if loss_weights is None:
        return valid.to(dtype)
    return loss_weights.reshape(-1).to(dtype) * valid


def _weighted_mean(ce: Tensor, w: Tensor) -> Tensor:
    """``sum(w*ce) / sum(w)``; 0 (not NaN) when nothing counts."""
    denom = w.sum()
    return (w * ce).sum() / torch.where(denom > 0, denom, torch.ones_like(denom))


class Transformer(nn.Module):
    """Decoder-only language model. See the module docstring for the architecture."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = bool(cfg.grad_checkpointing)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embd_drop = _dropout(cfg.embd_dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.n_frozen = 0
        self.loss_head = "chunked"
        self.init_weights()

    # ------------------------------------------------------------------ init and bookkeeping

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables per the spec (module docstring)."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for m in self.modules():
            if m is self.lm_head and self.cfg.tie_embeddings:
                continue  # shares the embedding's weight, initialised once below
            if isinstance(m, nn.Linear):
                residual = getattr(m, "residual_proj", False)
                if residual and self.cfg.zero_init_residual:
                    nn.init.zeros_(m.weight)
                    continue
                nn.init.normal_(m.weight, mean=0.0, std=resid_std if residual else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, HeadNorm):
                nn.init.ones_(m.weight)
        self.rope.reset_parameters()

    def set_frozen_layers(self, n: int) -> None:
        """Freeze the bottom ``n`` blocks: their parameters stop requiring gradients and, in
        training, they run under ``no_grad`` (no stored activations, no backward compute, no
        optimizer updates). ``n = 0`` unfreezes everything. The token embedding stays trainable
        (tied, it still learns through the LM head)."""
        if not 0 <= n <= len(self.blocks):
            raise ValueError(f"cannot freeze {n} of {len(self.blocks)} blocks")
        self.n_frozen = int(n)
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                p.requires_grad_(i >= n)

    def set_grad_checkpointing(self, flag: bool) -> None:
        """Recompute each block's activations in backward (training only) to save memory."""
        self.grad_checkpointing = bool(flag)

    def set_loss_head(self, head: str) -> None:
        """How the training loss (:meth:`loss`) goes through the output head:
        ``"chunked"`` (:func:`~deeplm.model.fused_loss.linear_cross_entropy`, no full logits
        tensor) or ``"logits"`` (full logits then :func:`lm_loss`; one graph under compile)."""
        if head not in ("chunked", "logits"):
            raise ValueError(f"loss head must be chunked or logits, not {head!r}")
        self.loss_head = head

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameter count, tied weights counted once. ``exclude_embedding`` drops the token
        embedding matrix (an untied LM head is still counted)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for :meth:`forward_with_cache` (``max_len`` <= ``max_seq_len``)."""
        return KVCache(self.cfg.n_layers, max_len or self.cfg.max_seq_len)

    # ------------------------------------------------------------------ forward passes

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, loss_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``idx`` ``[B, T]`` (T <= max_seq_len) -> (float32 logits ``[B, T, V]``, loss or None).

        The loss (with ``targets``) is :func:`lm_loss` over the full logits. Training, which needs
        no logits, uses :meth:`loss` instead.
        """
        logits = self.lm_head(self._hidden(idx)).float()
        loss = None if targets is None else lm_loss(logits, targets, loss_weights)
        return logits, loss

    def loss(
        self, idx: Tensor, targets: Tensor, loss_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(loss, detached unweighted loss) of ``idx`` ``[B, T]`` against ``targets``, through
        the training head (:meth:`set_loss_head`): ``chunked`` (default,
        :func:`~deeplm.model.fused_loss.linear_cross_entropy`: chunked over the vocabulary, the
        full logits tensor never exists, gigabytes saved) or ``logits`` (full logits, then
        :func:`lm_loss`; one graph under compile). Without ``loss_weights`` the two values are
        equal. Wrappers that only intercept ``__call__`` (DDP, ``torch.compile``) reach this
        through :class:`TrainingLoss`."""
        x = self._hidden(idx)
        if self.loss_head == "logits":
            return lm_losses(self.lm_head(x), targets, loss_weights)
        return linear_cross_entropy(x, self.lm_head.weight, targets, loss_weights)

    def _hidden(self, idx: Tensor) -> Tensor:
        """The final-norm hidden states ``[B, T, d]`` of ``idx``: the frozen bottom blocks run
        without autograd, the others with optional activation checkpointing."""
        t = idx.size(1)
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len}")
        frozen = self.n_frozen if torch.is_grad_enabled() else 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen == 0):
            x = self.embd_drop(self.tok_emb(idx))
        cos, sin = self.rope(x, t)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if frozen:
            with torch.no_grad():  # frozen bottom: no graph, no activations kept for backward
                for block in self.blocks[:frozen]:
                    x = block(x, cos, sin)
        for block in self.blocks[frozen:]:
            if use_ckpt:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm_f(x)

    def forward_with_cache(self, idx: Tensor, kv_cache: KVCache, start_pos: int) -> Tensor:
        """Incremental forward: ``idx`` ``[B, T]`` holds the tokens at positions
        ``start_pos .. start_pos+T-1``; positions before ``start_pos`` come from ``kv_cache``,
        which is updated in place. Returns float32 logits ``[B, T, V]``. No checkpointing."""
        t = idx.size(1)
        x = self.embd_drop(self.tok_emb(idx))
        cos, sin = self.rope(x, t, offset=start_pos)
        for block in self.blocks:
            # .forward, not __call__: a block compiled for training (Module.compile) would
            # otherwise recompile per layer index and decode length; decoding runs eager.
            x = block.forward(x, cos, sin, kv_cache, start_pos)
        return self.lm_head(self.norm_f(x)).float()


class TrainingLoss(nn.Module):
    """``model.loss`` as a module's ``forward``: what DDP (or ``torch.compile``) wraps in
    training, so the wrapper's ``__call__`` reaches the chunked loss. It owns no parameters of its
    own; ``model``'s are registered under ``model.``."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, idx: Tensor, targets: Tensor, loss_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.model.loss(idx, targets, loss_weights)


# ---------------------------------------------------------------------- config-level helpers


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of ``Transformer(cfg)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def describe(cfg: ModelConfig) -> str:
    """One-line summary with the exact parameter count, e.g. ``60 layers x 320 (5 heads x 64),
    MLP 2.0x gelu, vocab 32000: 59,469,440 parameters``."""
    tied = "" if cfg.tie_embeddings else " (untied head)"
    return (
        f"{cfg.n_layers} layers x {cfg.d_model} ({cfg.n_heads} heads x {cfg.head_dim}), "
        f"MLP {cfg.mlp_ratio}x {cfg.activation}, vocab {cfg.vocab_size}{tied}: "
        f"{count_parameters(cfg):,} parameters"
    )


def block_parameters(cfg: ModelConfig) -> int:
    """Parameters of one Transformer block (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Block(cfg, 0).parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int, frozen_layers: int = 0) -> float:
    """Training FLOPs per token (forward + backward), PaLM / nanoGPT MFU formula:
    ``6*N + 12*n_layers*d_model*seq_len`` with N the TOTAL parameter count (tied embedding counted
    once; the LM head matmul is real compute, so the embedding stays in N).

    With the bottom ``frozen_layers`` blocks frozen, those run forward only (no autograd, see
    :meth:`Transformer.set_frozen_layers`): their backward share, ``4*P_block + 8*d_model*seq_len``
    each, is not counted."""
    n = count_parameters(cfg)
    full = 6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len
    k = max(0, min(frozen_layers, cfg.n_layers))
    skipped = k * (4 * block_parameters(cfg) + 8 * cfg.d_model * seq_len) if k else 0
    return float(full - skipped)
