"""Periodic validation: when to evaluate and how (the loss on fixed windows of the validation
shard at the context the last step trained at), logged as ``val_loss`` / ``val_ppl``.

The first value (at step 0) is kept for the phase's outcome and in every checkpoint, so a resumed
phase reports the improvement over its true start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deeplm.config import PhaseConfig
from deeplm.data.shards import Shard
from deeplm.eval.perplexity import evaluate_loss, perplexity
from deeplm.train.metrics import MetricsLogger


class Evaluator:
    """``should_eval(step, last)`` decides, ``evaluate(model, step, tokens)`` measures and logs.

    ``agree``: how the value is made the same on every process (a broadcast from rank 0 in a
    distributed job), so decisions taken on it (plateau stop) agree."""

    def __init__(
        self,
        phase: PhaseConfig,
        val_shard: Shard,
        device: torch.device,
        dtype: torch.dtype | None,
        metrics: MetricsLogger,
        agree: Callable[[float], float] = lambda v: v,
    ):
        self.phase = phase
        self.val_shard = val_shard
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.agree = agree
        self.first_val_loss: float | None = None
        self.val_loss: float | None = None  # the latest evaluation of this run of the phase

    def should_eval(self, step: int, last: bool) -> bool:
        """Every ``eval_every`` optimizer steps (0: never in between) and at the phase's end."""
        every = self.phase.eval_every
        return bool(every and step % every == 0) or last

    def evaluate_start(self, model: nn.Module) -> float:
        """The validation loss before training: the phase's ``first_val_loss``."""
        self.first_val_loss = self._measure(model, 0, 0)
        return self.first_val_loss

    def evaluate(self, model: nn.Module, step: int, tokens: int) -> float:
        """The validation loss after ``step`` optimizer steps: the latest ``val_loss``."""
        self.val_loss = self._measure(model, step, tokens)
        return self.val_loss

    def _measure(self, model: nn.Module, step: int, tokens: int) -> float:
        """Validation loss after ``step`` optimizer steps, at the context of the last of them."""
        seq_len = self.phase.context_at(max(0, step - 1))
        loss = evaluate_loss(
            model,
            self.val_shard,
            seq_len,
            self.phase.micro_batch_for(seq_len),
            self.phase.eval_batches,
            self.device,
            self.dtype,
        )
        self.metrics.log(
            {
                "step": step,
                "tokens": tokens,
                "val_loss": loss,
                "val_ppl": perplexity(loss),
                "seq_len": seq_len,
            }
        )
        return self.agree(loss)

    def state_dict(self) -> dict[str, Any]:
        fv = self.first_val_loss
        return {"first_val_loss": fv if fv is not None else -1.0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fv = float(state.get("first_val_loss", -1.0))
        self.first_val_loss = fv if fv >= 0 else None
