"""How the training step runs on a device: whether and how the model is compiled (``torch.compile``
scope and mode), which loss head it uses, and how one optimizer step's windows are grouped into
micro-batches. The trainer and ``bench/throughput.py`` both build their step from here, so the
benchmark times the path ``deeplm run`` takes.

Defaults (``train.compile = "auto"`` etc.) are the fastest measured per device (bench/NOTES.md,
docs/performance.md): on CUDA the whole model is compiled, the loss goes through full logits
(fused by the compiler), micro-batches grow to ``train.micro_batch_tokens`` and the graph is
replayed as a CUDA graph (``reduce-overhead``) whenever a step is one micro-batch of the whole
model on one process: the step is otherwise host-bound (the Python that launches ~1,500 kernels
is slower than the GPU that runs them; 1.5x on an H200, the same loss curve over a 20M-token
phase). A whole-model graph always takes token weights (1 where a phase has none: the same loss
to the bit), so the phases of a run share one graph instead of compiling one each. On CPU and MPS
training runs eager with the phase's micro-batch and the chunked head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map

from deeplm.config import COMPILE_MODES, PhaseConfig, TrainConfig
from deeplm.device import compile_supported
from deeplm.model import TrainingLoss, Transformer

#: ``train.micro_batch_tokens = 0`` on CUDA: micro-batches of up to this many tokens.
CUDA_MICRO_BATCH_TOKENS = 32_768


@dataclass(frozen=True)
class StepPlan:
    """The resolved execution choices for one device (``train.*`` with ``auto`` decided)."""

    compile: bool
    scope: str  # "block" | "model"
    mode: str  # one of COMPILE_MODES
    loss_head: str  # "chunked" | "logits"
    micro_batch_tokens: int  # 0 = the phase's micro-batch
    # every step passes token weights (all 1 when the phase has none), so phases with and
    # without rare-token weights share one whole-model graph: compiled once per run, not per phase
    uniform_weights: bool = False

    def describe(self) -> str:
        comp = f"compile {self.scope} ({self.mode})" if self.compile else "eager"
        mb = f", micro-batches up to {self.micro_batch_tokens:,} tokens"
        return f"{comp}, {self.loss_head} head" + (mb if self.micro_batch_tokens else "")


def step_plan(train: TrainConfig, device: torch.device) -> StepPlan:
    """Decide every ``auto`` of ``train`` for ``device`` (see the module docstring)."""
    cuda = device.type == "cuda"
    enabled = train.compile == "on" or (train.compile == "auto" and cuda)
    enabled = enabled and compile_supported(device)
    scope = train.compile_scope if train.compile_scope != "auto" else ("model" if cuda else "block")
    mode = train.compile_mode
    if mode == "auto":  # CUDA graphs for the whole model (fit_plan falls back where they can't)
        mode = "reduce-overhead" if cuda and scope == "model" else "default"
    if mode == "reduce-overhead" and not cuda:
        mode = "default"  # CUDA graphs exist only on CUDA
    head = train.loss_head
    if head == "auto":  # full logits fuse into the compiled graph; eager, they cost memory
        head = "logits" if cuda and enabled and scope == "model" else "chunked"
    tokens = train.micro_batch_tokens
    if tokens == 0 and cuda:
        tokens = CUDA_MICRO_BATCH_TOKENS
    return StepPlan(
        enabled, scope, mode, head, tokens, uniform_weights=enabled and scope == "model"
    )


def fit_plan(plan: StepPlan, phase: PhaseConfig, distributed: bool = False) -> StepPlan:
    """``plan`` for one phase: CUDA graphs (``reduce-overhead``) only when an optimizer step is
    one micro-batch of the whole model on one process (the graph's outputs, the gradients
    among them, are reused at the next replay, so they must be consumed before it); under
    DDP/FSDP2 the blocks are compiled in place, inside the wrapper."""
    if distributed:
        plan = dataclasses.replace(plan, scope="block", uniform_weights=False)
    graphs = plan.mode in ("reduce-overhead", "max-autotune")
    if graphs and (phase.grad_accum > 1 or plan.scope != "model" or distributed):
        fallback = "max-autotune-no-cudagraphs" if plan.mode == "max-autotune" else "default"
        plan = dataclasses.replace(plan, mode=fallback)
    return plan


class _StepBoundary(nn.Module):
    """A CUDA-graphed model whose every call starts a new training iteration (the previous
    step's graph outputs, gradients included, have been consumed by then)."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args, **kwargs)
        # outputs live in the graph's memory pool until the next replay: callers keep copies
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def compile_for_training(model: Transformer, plan: StepPlan) -> nn.Module:
    """The module to call for training steps under ``plan``: ``(idx, targets, weights) ->
    (loss, unweighted loss)``, i.e. :meth:`Transformer.loss` as a module
    (:class:`~deeplm.model.TrainingLoss`), which DDP can wrap and ``torch.compile`` compiles.

    ``block``: each block is compiled in place (``Module.compile``); the 60 blocks share one code
    object and so one graph per (context length, frozen/trainable) pair; evaluation and
    generation run the compiled blocks too. ``model``: ``torch.compile`` of the whole loss,
    returned as a wrapper sharing the model's parameters (evaluation keeps the eager model); a
    new context length or frozen-layer count recompiles once. Never compiles twice.
    """
    loss = TrainingLoss(model)
    if not plan.compile:
        return loss
    if torch._dynamo.config.cache_size_limit < 64:
        torch._dynamo.config.cache_size_limit = 64
    mode = None if plan.mode == "default" else plan.mode
    if plan.scope == "model":
        compiled = torch.compile(loss, dynamic=False, mode=mode)
        return (
            _StepBoundary(compiled)
            if plan.mode in ("reduce-overhead", "max-autotune")
            else compiled
        )
    for block in model.blocks:
        if not _is_compiled(block):
            block.compile(dynamic=False, mode=mode)
    return loss


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def regroup(phase: PhaseConfig, micro_batch_tokens: int) -> PhaseConfig:
    """``phase`` with its step's ``micro_batch * grad_accum`` windows regrouped into the fewest
    micro-batches of at most ``micro_batch_tokens`` tokens (at every curriculum context).

    Tokens per optimizer step, the windows of each step and their order are unchanged (the loader
    takes windows from one stream whatever the micro-batch), so training is the same computation
    in fewer, larger kernels: gradients differ only by float summation order (and, with
    rare-token weights, by normalising per larger micro-batch). ``0`` or a budget below the
    phase's micro-batch returns ``phase`` unchanged.
    """
    if micro_batch_tokens <= 0 or phase.grad_accum == 1:
        return phase
    # micro-batch tokens are the same at every curriculum context (more, shorter windows)
    best = 1
    for k in range(2, phase.grad_accum + 1):
        fits = phase.micro_batch * k * phase.seq_len <= micro_batch_tokens
        if phase.grad_accum % k == 0 and fits:
            best = k
    if best == 1:
        return phase
    return dataclasses.replace(
        phase, micro_batch=phase.micro_batch * best, grad_accum=phase.grad_accum // best
    )


__all__ = [
    "COMPILE_MODES",
    "CUDA_MICRO_BATCH_TOKENS",
    "StepPlan",
    "compile_for_training",
    "fit_plan",
    "regroup",
    "step_plan",
]
