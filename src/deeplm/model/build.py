"""Building a fresh model from a run's config: the one place that seeds and constructs it."""

from __future__ import annotations

import torch

from deeplm.config import RunConfig
from deeplm.model.transformer import Transformer


def build_model(cfg: RunConfig, seed: int) -> Transformer:
    """A freshly initialised :class:`Transformer` for ``cfg.model``, seeded with ``seed``, with
    the config's gradient checkpointing setting."""
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model
