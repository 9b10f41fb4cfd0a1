"""Early stop on a validation plateau: the phase ends when the validation loss has not improved
by more than ``plateau_min_delta`` in ``plateau_patience`` evaluations (0 = never). It remembers
the step of the best evaluation: a plateau stop ends the phase with that step's weights."""

from __future__ import annotations

from typing import Any

from deeplm.config import PhaseConfig


class PlateauStop:
    """The best validation loss so far and the evaluations since it; :meth:`update` decides."""

    def __init__(self, phase: PhaseConfig):
        self.phase = phase
        self.best_val: float | None = None
        self.best_step = 0
        self.evals_since_best = 0

    def reset(self, best_val: float | None = None) -> None:
        self.best_val = best_val
        self.best_step = 0
        self.evals_since_best = 0

    @property
    def enabled(self) -> bool:
        return self.phase.plateau_patience > 0

    def update(self, val_loss: float, step: int) -> bool:
        """Record the evaluation after step ``step``; True when the phase should stop now (a
        plateau)."""
        p = self.phase
        if self.best_val is None or val_loss < self.best_val - p.plateau_min_delta:
            self.best_val, self.best_step, self.evals_since_best = val_loss, step, 0
            return False
        self.evals_since_best += 1
        return 0 < p.plateau_patience <= self.evals_since_best

    def reason(self) -> str:
        """The stop reason recorded in the final checkpoint (after :meth:`update` said stop)."""
        return (
            f"validation plateau: no improvement > {self.phase.plateau_min_delta:g} in "
            f"{self.evals_since_best} evaluations (best {self.best_val:.4f})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_val_loss": self.best_val if self.best_val is not None else -1.0,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bv = float(state.get("best_val_loss", -1.0))
        self.best_val = bv if bv >= 0 else None
        self.best_step = int(state.get("best_step", 0))
        self.evals_since_best = int(state.get("evals_since_best", 0))
