"""Learning-rate schedules: linear warmup, then a cosine decay or a warmup-stable-decay (WSD)
plateau and linear decay, both to a floor relative to the phase's peak."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_frac: float,
    min_lr_ratio: float,
    schedule: str = "cosine",
    decay_frac: float = 0.2,
) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup ramps linearly over ``round(warmup_frac * total_steps)`` steps (at least 1 when the
    fraction is positive). Then ``cosine`` goes from ``peak_lr`` to ``peak_lr * min_lr_ratio`` at
    the last step; ``wsd`` holds ``peak_lr`` and decays linearly to the floor over the last
    ``decay_frac`` of the steps. The floor is always relative to the phase's own peak, so it can
    never exceed it.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    floor = peak_lr * min_lr_ratio
    warmup = max(1, round(warmup_frac * total_steps)) if warmup_frac > 0 else 0
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * total_steps))
        start = max(warmup, total_steps - decay_steps)
        if step < start:
            return peak_lr
        progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
        return peak_lr + (floor - peak_lr) * progress
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r} (cosine or wsd)")
    decay_steps = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
