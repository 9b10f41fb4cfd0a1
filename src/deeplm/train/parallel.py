"""How a phase's training is spread over processes: the trainer asks a :class:`Parallel` for
everything that differs between one process and a data-parallel job, and this base class is the
one-process answer (nothing to wrap, nothing to communicate).

:class:`deeplm.train.distributed.DataParallel` answers for a torchrun job (DDP or FSDP2). The
questions, grouped:

- parallelize: :attr:`Parallel.distributed` (DDP/FSDP2 wrap the model: the step plan compiles
  blocks in place, :func:`~deeplm.train.compile.fit_plan`), :meth:`Parallel.rank_phase` (the
  phase as one rank runs it),
  :meth:`Parallel.prepare` (shard the model before the optimizer is built),
  :meth:`Parallel.micro_batch` (the loss callable of one micro-batch, with the gradient
  synchronisation that micro-batch needs), :meth:`Parallel.loader_args` (which slice of the data
  this rank reads);
- agree: :meth:`Parallel.reduce_losses`, :meth:`Parallel.agree` (rank 0's value everywhere),
  :meth:`Parallel.before_resume`;
- rank 0 alone: :attr:`Parallel.is_main`, :meth:`Parallel.hooks`, :meth:`Parallel.sampling_model`,
  :meth:`Parallel.gather_for_save` / :meth:`Parallel.after_save` (the writer and its barriers),
  :meth:`Parallel.load_optimizer_state` (the single-process checkpoint format on every rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplm.config import PhaseConfig
from deeplm.train.hooks import TrainHooks

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Parallel:
    """One process: rank 0 of 1."""

    is_main = True
    rank = 0
    world_size = 1
    distributed = False  # one rank of a torchrun job (the model is wrapped or sharded)

    def rank_phase(self, phase: PhaseConfig) -> PhaseConfig:
        """The phase as this rank runs it (its share of the step's micro-batches)."""
        return phase

    def hooks(self, hooks: TrainHooks) -> TrainHooks:
        """The orchestrator's hooks as this rank sees them."""
        return hooks

    def loader_args(self, micro_batch: int) -> dict[str, int]:
        """PackedBatches arguments for this rank: its windows per micro-batch and its slice."""
        return {"micro_batch": micro_batch, "rank": 0, "world_size": 1}

    def before_resume(self, phase_dir: Path) -> None:
        """Before looking for the checkpoint to resume from."""

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """After the weights are loaded onto ``device``, before the optimizer is built."""

    @contextmanager
    def micro_batch(self, loss_module: nn.Module, last: bool) -> Iterator[LossFn]:
        """The loss callable ``(idx, targets, weights) -> (loss, unweighted)`` of one
        micro-batch, from the trainer's ``loss_module``
        (:func:`~deeplm.train.compile.compile_for_training`); ``last``: the step's last one
        (gradients are synchronised then)."""
        yield loss_module

    def reduce_losses(
        self, loss: torch.Tensor, unweighted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's losses as every rank should report them."""
        return loss, unweighted

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        return value

    def sampling_model(self, model: nn.Module) -> nn.Module | None:
        """The model to sample with on this rank (None: this rank does not sample)."""
        return model

    def gather_for_save(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module | None, dict[str, Any] | None]:
        """(model, optimizer state in the single-process format) to write, on the writing rank;
        (None, None) on the others."""
        return model, optimizer.state_dict()

    def after_save(self) -> None:
        """After the writing rank wrote a checkpoint."""

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
    ) -> None:
        """Load a checkpoint's (single-process format) optimizer state."""
        optimizer.load_state_dict(saved)
