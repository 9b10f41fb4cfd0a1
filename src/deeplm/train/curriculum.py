"""The in-phase plan: the context length (curriculum) and the number of frozen bottom blocks at
each optimizer step, from ``PhaseConfig.curriculum`` and ``PhaseConfig.freeze``.

Tokens per optimizer step stay constant: at a shorter context the micro-batch grows
(:meth:`PhaseConfig.micro_batch_for`). The trainer asks the plan before each step; a new context
means a new loader at the same place in the data, a new freeze means a kept checkpoint first."""

from __future__ import annotations

from deeplm.config import PhaseConfig


class CurriculumPlan:
    """Per-step context and freezing decisions of one phase."""

    def __init__(self, phase: PhaseConfig):
        self.phase = phase

    def context(self, step: int) -> int:
        """Context length of optimizer step ``step`` (0-based)."""
        return self.phase.context_at(step)

    def new_context(self, step: int, current: int) -> int | None:
        """The context step ``step`` trains at when it differs from ``current`` (else None)."""
        seq_len = self.phase.context_at(step)
        return seq_len if seq_len != current else None

    def new_frozen(self, step: int, current: int) -> int | None:
        """The frozen-block count of step ``step`` when it differs from ``current`` (else None)."""
        n = self.phase.frozen_at(step)
        return n if n != current else None

    def keep_before_freeze(self, step: int) -> bool:
        """True when step ``step`` freezes more blocks than the step before: the weights just
        before it are worth a kept checkpoint (not at step 0: nothing was trained yet)."""
        return step > 0 and self.phase.frozen_at(step) > self.phase.frozen_at(step - 1)
