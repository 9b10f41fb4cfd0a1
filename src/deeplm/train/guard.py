"""The divergence guard: decides when training diverged and holds the rollback state.

After each logged step :meth:`DivergenceGuard.check` looks at the window's mean loss and the
step's gradient norm: a NaN/Inf value, or (``spike_factor > 0``, past the warmup) a gradient norm
above ``spike_factor`` times its running mean (EMA, 0.9), is a divergence. The trainer then calls
:meth:`DivergenceGuard.rollback` and returns to the newest good checkpoint; the guard halves the
LR scale and doubles the warmup scale, and raises :class:`TrainingDiverged` once
``max_rollbacks`` did not help. The scales and the count are part of every checkpoint
(:meth:`state_dict`), so a resumed run keeps them; the EMA is not (it restarts empty).
"""

from __future__ import annotations

import math
from typing import Any

from deeplm.config import PhaseConfig
from deeplm.train.schedule import lr_at


class TrainingDiverged(RuntimeError):
    """The loss kept diverging after every allowed rollback."""


class DivergenceGuard:
    """Rollback state of one phase (``lr_scale``, ``warmup_scale``, ``rollbacks``) and the
    grad-norm EMA the spike test compares against."""

    def __init__(self, phase: PhaseConfig, phase_idx: int):
        self.phase = phase
        self.phase_idx = phase_idx
        self.lr_scale = 1.0
        self.warmup_scale = 1.0
        self.rollbacks = 0
        self.grad_norm_ema: float | None = None

    def warmup_frac(self) -> float:
        """The phase's warmup fraction under the current warmup scale (at most half the phase)."""
        return min(0.5, self.phase.warmup_frac * self.warmup_scale)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step``: the schedule times the LR scale."""
        p = self.phase
        return self.lr_scale * lr_at(
            step, p.total_steps, p.lr, self.warmup_frac(), p.min_lr_ratio, p.schedule, p.decay_frac
        )

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Why the step that ended at ``step`` diverged, or None (then the EMA takes
        ``grad_norm``)."""
        p = self.phase
        spike = (
            p.spike_factor > 0
            and self.grad_norm_ema is not None
            and step > self.warmup_frac() * p.total_steps
            and grad_norm > p.spike_factor * self.grad_norm_ema
        )
        if not math.isfinite(loss) or not math.isfinite(grad_norm) or spike:
            return f"grad-norm spike {grad_norm:.3g}" if spike else f"loss {loss}"
        ema = self.grad_norm_ema
        self.grad_norm_ema = grad_norm if ema is None else 0.9 * ema + 0.1 * grad_norm
        return None

    def rollback(self, step: int, reason: str) -> None:
        """Count a rollback: lower the LR, lengthen the warmup, forget the EMA. Raises
        :class:`TrainingDiverged` (naming the settings to change) past ``max_rollbacks``."""
        p = self.phase
        self.rollbacks += 1
        if self.rollbacks > p.max_rollbacks:
            raise TrainingDiverged(
                f"[{p.name}] training diverged ({reason}) at step {step} and "
                f"{p.max_rollbacks} rollbacks did not help; lower phases[{self.phase_idx}].lr "
                f"(now {p.lr:g}) or raise warmup_frac"
            )
        self.lr_scale *= 0.5
        self.warmup_scale *= 2.0
        self.grad_norm_ema = None

    def describe(self, reason: str, step: int, where: str) -> str:
        """The log line of a rollback to ``where`` (restored at ``step``)."""
        return (
            f"{reason} at step {step}: rolled back to {where}, lr x{self.lr_scale:g}, "
            f"warmup x{self.warmup_scale:g} (rollback {self.rollbacks}/{self.phase.max_rollbacks})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "warmup_scale": self.warmup_scale,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a trainer state (checkpoints before rollbacks existed: the defaults)."""
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.warmup_scale = float(state.get("warmup_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
