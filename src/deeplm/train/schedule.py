"""Learning-rate schedule: linear warmup, then cosine decay to a floor relative to the peak."""

from __future__ import annotations

import math


def lr_at(
    step: int, total_steps: int, peak_lr: float, warmup_frac: float, min_lr_ratio: float
) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup ramps linearly over ``round(warmup_frac * total_steps)`` steps (at least 1 when the
    fraction is positive), then a cosine goes from ``peak_lr`` to ``peak_lr * min_lr_ratio`` at the
    last step. The floor is always relative to the phase's own peak, so it can never exceed it.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    floor = peak_lr * min_lr_ratio
    warmup = max(1, round(warmup_frac * total_steps)) if warmup_frac > 0 else 0
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
