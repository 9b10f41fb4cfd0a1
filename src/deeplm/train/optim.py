"""Optimizers: AdamW (fused/foreach where available), Muon for the blocks' matrices with AdamW for
the rest, and Adafactor; weight decay applies to matrices only (never to norms, biases).

Muon is ``torch.optim.Muon`` with one change: :class:`BatchedMuon` orthogonalises all matrices of
one shape together (a batched Newton-Schulz iteration, the same polynomial and coefficients), so
the 60 blocks' four kinds of matrices cost four batched iterations per step instead of 240 small
ones. Its state (one ``momentum_buffer`` per matrix) is torch's, so checkpoints carry over.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from deeplm.config import PhaseConfig
from deeplm.device import adamw_implementation

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


def newton_schulz(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Approximate orthogonalisation of each matrix of ``g`` ``[..., A, B]`` (bf16), the quintic
    iteration of ``torch.optim.Muon`` applied to a batch: ``X <- a X + (b XX^T + c (XX^T)^2) X``
    after scaling each matrix to unit Frobenius norm (on the wide orientation)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The per-matrix LR ``torch.optim.Muon`` uses for a ``[A, B]`` matrix."""
    a, b = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, a / b))
    return lr


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose step orthogonalises same-shaped matrices in one batch.
    ``compile_ns``: the Newton-Schulz iteration runs ``torch.compile``-d (one graph per matrix
    shape; the LR and weight decay stay outside it, so a changing LR never recompiles)."""

    def __init__(self, *args: Any, compile_ns: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ns = torch.compile(newton_schulz, dynamic=False) if compile_ns else newton_schulz

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params in self._by_shape(group):
                self._update(group, params)
        return loss

    def _by_shape(self, group: dict) -> Iterator[list[Tensor]]:
        shapes: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                shapes[(tuple(p.shape), p.dtype, p.device)].append(p)
        return iter(shapes.values())

    def _update(self, group: dict, params: list[Tensor]) -> None:
        lr, wd, mom = float(group["lr"]), group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        updates = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
        ortho = self._ns(
            torch.stack(updates), group["ns_coefficients"], group["ns_steps"], group["eps"]
        )
        step_lr = muon_lr(lr, group["adjust_lr_fn"], params[0].shape)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-step_lr)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the blocks' 2-D weights, AdamW on everything else, stepped as one optimizer.

    Each param group has an ``lr_scale`` relative to the phase's scheduled LR (the AdamW groups
    run at ``adamw_lr``); ``state_dict`` holds both optimizers' states.
    """

    def __init__(self, muon: BatchedMuon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        self.defaults: dict[str, Any] = {}
        self.state = defaultdict(dict)  # type: ignore[assignment]
        self.param_groups = muon.param_groups + adamw.param_groups

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = self.muon.step(closure)
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                "this checkpoint's optimizer state is not Muon+AdamW (the phase's optimizer "
                "changed since it was written); start the phase again or keep its optimizer"
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def is_muon_matrix(name: str, p: Tensor) -> bool:
    """The parameters Muon trains: 2-D weights inside the transformer blocks (not the embedding,
    the head, norms or LoRA adapters)."""
    return p.dim() == 2 and name.startswith("blocks.") and "lora_" not in name


def build_muon(
    model: nn.Module, phase: PhaseConfig, device: torch.device, compile_ns: bool = False
) -> MuonAdamW:
    matrices, other_decay, other_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_muon_matrix(name, p):
            matrices.append(p)
        else:
            (other_decay if p.dim() >= 2 else other_no_decay).append(p)
    muon = BatchedMuon(
        [{"params": matrices, "lr_scale": 1.0}],
        lr=phase.lr,
        weight_decay=phase.weight_decay,
        momentum=phase.muon_momentum,
        nesterov=True,
        ns_steps=phase.muon_ns_steps,
        adjust_lr_fn=phase.muon_adjust_lr,
        compile_ns=compile_ns,
    )
    aux = (phase.adamw_lr or phase.lr) / phase.lr
    adamw = torch.optim.AdamW(
        [
            {"params": other_decay, "weight_decay": phase.weight_decay, "lr_scale": aux},
            {"params": other_no_decay, "weight_decay": 0.0, "lr_scale": aux},
        ],
        lr=phase.lr * aux,
        betas=(phase.beta1, phase.beta2),
        eps=1e-8,
        **adamw_implementation(device),
    )
    return MuonAdamW(muon, adamw)


def build_optimizer(
    model: nn.Module, phase: PhaseConfig, device: torch.device, compile_: bool = False
) -> torch.optim.Optimizer:
    """The phase's optimizer over ``model``'s trainable parameters; ``compile_`` compiles the
    parts that have a fixed-shape tensor core (Muon's Newton-Schulz iteration)."""
    if phase.optimizer == "muon":
        return build_muon(model, phase, device, compile_ns=compile_)
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
    raise ValueError(f"unknown optimizer {phase.optimizer!r} (adamw, muon or adafactor)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to the scheduled ``lr`` times the group's ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
