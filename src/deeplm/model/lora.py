"""LoRA adapters for fine-tuning: low-rank updates ``W + (alpha/r) * B @ A`` on chosen Linear
projections, with the base weights frozen, and a merge that folds the adapters back into plain
Linear layers (so a merged model is an ordinary deeplm model)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update. ``B`` starts at zero, so the
    wrapped layer computes exactly what the base layer did until training moves it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * (
            self.scale
        )

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with the adapter folded into its weight."""
        self.base.weight += self.scale * (self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        self.base.weight.requires_grad_(True)
        return self.base


def _targets(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                found.append((module, child_name, child))
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> int:
    """Wrap every Linear whose qualified name ends with one of ``targets``; freeze everything
    else. Returns the number of wrapped layers (an error if none matched)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = _targets(model, targets)
    if not wrapped:
        raise ValueError(f"LoRA targets {targets} matched no Linear layer")
    for parent, child_name, child in wrapped:
        setattr(parent, child_name, LoRALinear(child, rank, alpha))
    return len(wrapped)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and restore plain Linear layers; all parameters
    become trainable again. Returns the number of merged layers."""
    n = 0
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                n += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return n
