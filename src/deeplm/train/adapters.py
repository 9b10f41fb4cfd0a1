"""LoRA adapters of a phase: attached when the model is built (``lora_rank > 0``), merged into
the weights before the phase's final checkpoint, so later phases and exports see a plain model."""

from __future__ import annotations

from collections.abc import Callable

from deeplm.config import PhaseConfig
from deeplm.model import Transformer
from deeplm.model.lora import apply_lora, merge_lora


def attach_adapters(
    model: Transformer, phase: PhaseConfig, log: Callable[[str], None] | None = None
) -> None:
    """Add the phase's adapters to ``model`` (no-op without LoRA); ``log`` says how many."""
    if phase.lora_rank <= 0:
        return
    n = apply_lora(model, phase.lora_rank, phase.lora_alpha, phase.lora_targets)
    if log is not None:
        log(f"[{phase.name}] LoRA rank {phase.lora_rank} on {n} projections")


def merge_adapters(model: Transformer, phase: PhaseConfig, log: Callable[[str], None]) -> None:
    """Fold the adapters into the base weights at the phase's end (no-op without LoRA)."""
    if phase.lora_rank > 0:
        merged = merge_lora(model)
        log(f"[{phase.name}] merged {merged} LoRA adapters into the weights")
