"""The deeplm language model: Transformer, RoPE, KV cache and generation.

Public API::

    build_model(run_cfg, seed)            a fresh, seeded model for a run's config
    Transformer(cfg)                      model; forward(idx, targets=None, loss_weights=None)
                                          -> (logits, loss); loss(idx, targets, loss_weights=None)
                                          -> (loss, unweighted), chunked head, no logits
    TrainingLoss(model)                   a module whose forward is model.loss (for DDP wrapping)
    describe(cfg) / count_parameters(cfg) exact parameter count (meta-device build)
    flops_per_token(cfg, seq_len, frozen_layers=0)
                                          6*N + 12*L*d*T training FLOPs per token (less the
                                          backward of frozen bottom layers)
    generate(model, idx, max_new_tokens, ...) / stream_generate(...)
"""

from deeplm.model.build import build_model
from deeplm.model.generate import generate, sample_next, stream_generate
from deeplm.model.rope import RotaryEmbedding, apply_rotary, rotate_half
from deeplm.model.transformer import (
    IGNORE_INDEX,
    KVCache,
    TrainingLoss,
    Transformer,
    count_parameters,
    describe,
    flops_per_token,
    lm_loss,
    mlp_hidden_dim,
)

__all__ = [
    "IGNORE_INDEX",
    "KVCache",
    "RotaryEmbedding",
    "TrainingLoss",
    "Transformer",
    "apply_rotary",
    "build_model",
    "count_parameters",
    "describe",
    "flops_per_token",
    "generate",
    "lm_loss",
    "mlp_hidden_dim",
    "rotate_half",
    "sample_next",
    "stream_generate",
]
