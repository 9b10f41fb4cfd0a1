"""Optimizers: AdamW (fused/foreach where available) and Adafactor, with weight decay applied to
matrices only (never to norms, biases)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deeplm.config import PhaseConfig
from deeplm.train.device import adamw_implementation

# below this, torch's Adafactor (step = lr x parameter RMS) hardly moves the weights
ADAFACTOR_LOW_LR = 1e-3


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, phase: PhaseConfig, device: torch.device
) -> torch.optim.Optimizer:
    groups = param_groups(model, phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=phase.lr,
            betas=(phase.beta1, phase.beta2),
            eps=1e-8,
            **adamw_implementation(device),
        )
    if phase.optimizer == "adafactor":
        if phase.lr < ADAFACTOR_LOW_LR:
            warnings.warn(
                f"phase {phase.name!r}: Adafactor with lr={phase.lr:g}. torch's Adafactor scales "
                "each step by the parameter's RMS (~0.02 here), so its lr is ~50x an AdamW lr: "
                "1e-2 to 5e-2 is the usual range (docs/configuration.md); this one will barely "
                "learn",
                stacklevel=2,
            )
        return torch.optim.Adafactor(groups, lr=phase.lr, foreach=True)
    raise ValueError(f"unknown optimizer {phase.optimizer!r} (adamw or adafactor)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
