"""The training loop for one phase: resume from the phase's newest checkpoint (or start from the
previous phase's final weights), train to the phase's token budget with warmup + cosine, gradient
accumulation and clipping, evaluate and sample periodically, log metrics, checkpoint atomically.

:meth:`PhaseTrainer._loop` is short on purpose (like torchtitan's ``Trainer.train()``): it runs
:meth:`PhaseTrainer._train_step` and asks components, each in the module that owns it, whether
and how to act:

- :class:`~deeplm.train.curriculum.CurriculumPlan`: context length and frozen layers per step
  (a new loader at a new length; a kept checkpoint before each freeze);
- :class:`~deeplm.train.guard.DivergenceGuard`: the LR of each step; NaN/Inf loss or a grad-norm
  spike rolls back to the last good checkpoint with half the learning rate and twice the warmup;
  repeated failure stops with a clear message;
- :class:`~deeplm.train.progress.ProgressReporter`: loss window, metrics records, tqdm,
  ``hooks.on_progress``;
- :class:`~deeplm.train.evaluator.Evaluator` (``should_eval``), then
  :class:`~deeplm.train.plateau.PlateauStop` (early stop on a validation plateau) and
  :class:`~deeplm.train.sampling.Sampler` (``should_sample``);
- :class:`~deeplm.train.checkpointer.Checkpointer` (``should_save``, metadata, retention);
- :mod:`deeplm.train.adapters`: LoRA attached at build, merged before the final checkpoint;
- :class:`~deeplm.train.parallel.Parallel`: what differs in a data-parallel job (one process by
  default; :class:`deeplm.train.distributed.DataParallel` under torchrun).

Exact resume: weights, optimizer, data cursor, RNG state and the components' state are in every
checkpoint, and nothing outside the training RNG draws random numbers (sampling uses its own
generator), so a run stopped at step k and resumed reaches bit-identical weights to an
uninterrupted run on the same device.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeplm.config import RunConfig
from deeplm.data.loader import PackedBatches
from deeplm.data.shards import Shard
from deeplm.device import (
    autocast_context,
    autocast_dtype,
    select_device,
    set_threads,
    synchronize,
)
from deeplm.eval.perplexity import perplexity
from deeplm.model import Transformer, build_model
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import Tokenizer
from deeplm.train.adapters import attach_adapters, merge_adapters
from deeplm.train.checkpointer import Checkpointer
from deeplm.train.compile import compile_for_training, fit_plan, regroup, step_plan
from deeplm.train.curriculum import CurriculumPlan
from deeplm.train.evaluator import Evaluator
from deeplm.train.guard import DivergenceGuard, TrainingDiverged
from deeplm.train.hooks import TrainHooks
from deeplm.train.metrics import MetricsLogger, NullMetrics
from deeplm.train.optim import build_optimizer, set_lr
from deeplm.train.parallel import LossFn, Parallel
from deeplm.train.plateau import PlateauStop
from deeplm.train.progress import ProgressReporter
from deeplm.train.sampling import Sampler
from deeplm.train.watchdog import StallWatchdog
from deeplm.train.weighting import token_weights

__all__ = [
    "OutOfMemory",
    "PhaseOutcome",
    "PhaseTrainer",
    "TrainHooks",
    "TrainingDiverged",
]


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the settings to change."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass
class PhaseOutcome:
    """What training one phase ended with (rank 0's is handed to the orchestrator as JSON)."""

    status: str  # "done" or "stopped"
    step: int
    total_steps: int
    tokens: int
    last_checkpoint: str | None
    final_checkpoint: str | None = None
    first_val_loss: float | None = None
    val_loss: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    tokens_per_s: float | None = None
    skipped: bool = False
    stop_reason: str = "budget"
    rollbacks: int = 0


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class PhaseTrainer:
    """Trains one phase of a run to completion (or until asked to stop).

    ``parallel``: how the work is spread over processes (default: one process)."""

    def __init__(
        self,
        cfg: RunConfig,
        phase_idx: int,
        run_dir: Path,
        tokenizer: Tokenizer,
        train_shard: Shard,
        val_shard: Shard,
        init_from: Path | None = None,
        hooks: TrainHooks | None = None,
        parallel: Parallel | None = None,
    ):
        self.parallel = parallel or Parallel()
        self.cfg = cfg
        # how steps run on this device (compile, loss head, micro-batch size): deeplm.train.compile
        plan = step_plan(cfg.train, select_device(cfg.train.device))
        capped = cfg.phases[phase_idx].epoch_capped(train_shard.meta.n_tokens)
        phase = regroup(capped, plan.micro_batch_tokens)
        self.plan = fit_plan(plan, phase, distributed=self.parallel.distributed)
        self.phase = self.parallel.rank_phase(phase)
        self.phase_idx = phase_idx
        self.run_dir = run_dir
        self.layout = RunLayout(run_dir)
        self.tokenizer = tokenizer
        self.train_shard = train_shard
        self.val_shard = val_shard
        self.init_from = init_from
        self.hooks = self.parallel.hooks(hooks or TrainHooks())
        self.dir = self.layout.phase_checkpoints(phase_idx, self.phase.name)
        self.guard = DivergenceGuard(self.phase, phase_idx)
        self.plateau = PlateauStop(self.phase)
        self.curriculum = CurriculumPlan(self.phase)
        self.checkpointer = Checkpointer(
            cfg, self.phase, phase_idx, self.dir, tokenizer, self.hooks.log
        )
        self.stop_reason = "budget"
        self._train_module: nn.Module | None = None
        self._compiled_for: nn.Module | None = None
        self._fresh = True  # the next step starts a graph state (see _step)
        self._best_restored: int | None = None  # a plateau stop's weights are of this step
        self._ones: torch.Tensor | None = None  # see _uniform_weights

    # ------------------------------------------------------------------ main

    def run(self) -> PhaseOutcome:
        """Train the phase (or return at once when its final checkpoint exists)."""
        self.parallel.before_resume(self.dir)
        existing = self.checkpointer.latest_compatible(self.init_from)
        if existing is not None and existing.meta.get("final"):
            return self._already_done(existing)
        self._select_device()
        self.metrics = self._make_metrics(existing.step if existing is not None else 0)
        try:
            step, tokens = self._start(existing)
            return self._train(step, tokens)
        finally:
            self.metrics.close()

    def _loop(self, step: int, tokens: int) -> PhaseOutcome:
        """Optimizer steps from ``step`` to the phase's end, a plateau, or a stop request."""
        phase, hooks = self.phase, self.hooks
        self._initial_eval(step)
        self.train_model = self._compiled()
        self.progress = self._make_progress(step, tokens)
        self._fresh = True  # the next step is the first of a graph state (it compiles)
        try:
            while step < phase.total_steps:
                self.current_step = step
                self.watchdog.beat()  # evaluation and checkpointing do not count as a stall
                if hooks.should_stop():
                    return self._stop(step, tokens)
                self._follow_plan(step, tokens)
                lr = self.guard.lr(step)
                set_lr(self.optimizer, lr)
                grad_norm = self._step()
                step, tokens = step + 1, tokens + phase.tokens_per_step
                self.progress.advance()
                self.watchdog.beat()
                if self.progress.should_log(step):
                    loss, gn = self.progress.window(grad_norm)
                    reason = self.guard.check(step, loss, gn)
                    if reason is not None:
                        step, tokens = self._rollback(step, reason)
                        continue
                    self.progress.report(self._position(step, tokens), loss, gn, lr)
                last = step == phase.total_steps
                if self.evaluator.should_eval(step, last):
                    last = self._evaluate(step, tokens, last)
                if last:
                    self._save_final(step, tokens)
                    break
                if self.checkpointer.should_save(step):
                    with self.progress.excluded("checkpoint"):
                        path = self._save(step, tokens, final=False)
                    self.progress.saved(step, tokens, str(path))
        finally:
            self.progress.close()
        return self._outcome(step, tokens)

    def _step(self) -> torch.Tensor:
        """One optimizer step. The first of a graph state (the loop's start, a new context, a
        new frozen-layer count, a rollback) compiles when ``train.compile`` is on: it is timed,
        logged, and kept out of the throughput figures."""
        if not self._fresh:
            return self._train_step()
        self._fresh = False
        synchronize(self.device)
        t0 = time.perf_counter()
        grad_norm = self._train_step()
        synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.progress.exclude("compile", seconds, self.phase.tokens_per_step)
        self.hooks.log(
            f"[{self.phase.name}] first step at context {self.loader.seq_len} with "
            f"{self.model.n_frozen} frozen layers: {seconds:.1f}s"
            + (" (compile and warm-up)" if self.plan.compile else "")
        )
        return grad_norm

    def _train_step(self) -> torch.Tensor:
        """One optimizer step: ``grad_accum`` micro-batches forward and backward (gradients
        synchronised across ranks on the last), clipping, the update. Returns the grad norm."""
        accum = self.phase.grad_accum
        for i in range(accum):
            x, y = self.loader.next_batch()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.parallel.micro_batch(self.train_model, last=i == accum - 1) as loss_fn:
                loss, unweighted = self._forward_loss(loss_fn, x, y)
            loss, unweighted = self.parallel.reduce_losses(loss, unweighted)
            (loss / accum).backward()
            self.progress.add(loss, unweighted)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.phase.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _forward_loss(self, loss_fn: LossFn, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to optimise, unweighted loss) for one micro-batch, through the training head
        (:meth:`Transformer.loss`; by default chunked: no full logits tensor in memory)."""
        weights = None if self.token_weight_table is None else self.token_weight_table[y]
        if weights is None and self.plan.uniform_weights:
            weights = self._uniform_weights(y)
        with autocast_context(self.device, self.dtype):
            return loss_fn(x, y, weights)

    def _uniform_weights(self, y: torch.Tensor) -> torch.Tensor:
        """Weights of 1 shaped like ``y`` (kept between steps): an unweighted phase runs the
        weighted phases' compiled graph (:attr:`StepPlan.uniform_weights`)."""
        ones = self._ones
        if ones is None or ones.shape != y.shape:
            ones = self._ones = torch.ones(y.shape, dtype=torch.float32, device=y.device)
        return ones

    # ------------------------------------------------------------------ loop actions

    def _follow_plan(self, step: int, tokens: int) -> None:
        """Before step ``step``: a new loader at a new context (same place in the data), and
        a new frozen-layer count (a kept checkpoint just before a new freeze)."""
        seq_len = self.curriculum.new_context(step, self.loader.seq_len)
        if seq_len is not None:
            self._fresh = True
            state = self.loader.state_dict()
            self.loader = self._make_loader(seq_len)
            self.loader.load_state_dict(state)
            self.hooks.on_event("curriculum", f"context {seq_len} from step {step}", {})
        n_frozen = self.curriculum.new_frozen(step, self.model.n_frozen)
        if n_frozen is not None:
            self._fresh = True
            if self.curriculum.keep_before_freeze(step):
                with self.progress.excluded("checkpoint"):
                    path = self._save(step, tokens, final=False)
                self.checkpointer.keep(path, f"before freezing {n_frozen} layers")
                self.hooks.on_event(
                    "freeze",
                    f"bottom {n_frozen} layers frozen from step {step}",
                    {"checkpoint": str(path)},
                )
            self.model.set_frozen_layers(n_frozen)

    def _position(self, step: int, tokens: int) -> dict[str, Any]:
        """Where the loop is, for the progress record of step ``step``."""
        return {
            "step": step,
            "tokens": tokens,
            "seq_len": self.loader.seq_len,
            "micro_batch": self.loader.micro_batch,
            "frozen_layers": self.model.n_frozen,
            "last_checkpoint": self.checkpointer.last,
        }

    def _initial_eval(self, step: int) -> None:
        """The validation loss before any training (once per phase)."""
        if step == 0 and self.evaluator.first_val_loss is None:
            first = self.evaluator.evaluate_start(self.model)
            self.plateau.best_val = first
            self.hooks.log(f"[{self.phase.name}] initial val loss {first:.4f}")

    def _evaluate(self, step: int, tokens: int, last: bool) -> bool:
        """Evaluate after step ``step`` (then maybe sample); True when the phase ends here: its
        last step, or a validation plateau."""
        phase = self.phase
        with self.progress.excluded("eval"):
            val_loss = self.evaluator.evaluate(self.model, step, tokens)
        self.hooks.log(
            f"[{phase.name}] step {step}/{phase.total_steps} val loss {val_loss:.4f} "
            f"(ppl {perplexity(val_loss):.1f})"
        )
        plateau = self.plateau.update(val_loss, step)
        if self._keeps_best() and self.plateau.best_step == step and not last:
            with self.progress.excluded("checkpoint"):
                self.checkpointer.save_best(step, self.model, val_loss)
        if plateau and not last:
            self.stop_reason = self.plateau.reason()
            self.hooks.log(f"[{phase.name}] stopping early at step {step}: {self.stop_reason}")
            self.hooks.on_event("plateau", self.stop_reason, {"step": step})
            self._restore_best()
            last = True
        if self.sampler.should_sample(step, last):
            with self.progress.excluded("samples"):
                self.sampler.sample(self.parallel.sampling_model(self.model), step)
        return last

    def _keeps_best(self) -> bool:
        """A plateau stop can end this phase, so the best weights are kept (one process)."""
        return self.plateau.enabled and not self.parallel.distributed

    def _restore_best(self) -> None:
        """At a plateau stop: the weights of the best evaluation replace the last ones (the
        kept ``best-<step>``, or the phase's starting weights when nothing beat them)."""
        best, name = self.plateau.best_step, self.phase.name
        if not self._keeps_best():
            return
        source = self.checkpointer.best(best) if best > 0 else None
        if best == 0 and self.init_from is not None and not self.phase.lora_rank:
            source = self.init_from
        if source is None:
            self.hooks.log(f"[{name}] no weights of step {best} on disk: ending with the last")
            return
        ckpt.load_weights(source, self.model)
        self.evaluator.val_loss = self.plateau.best_val
        self._best_restored = best
        self.hooks.log(
            f"[{name}] ending with the weights of step {best}, the best evaluation "
            f"(val loss {self.plateau.best_val:.4f})"
        )

    def _rollback(self, step: int, reason: str) -> tuple[int, int]:
        """Return to the newest good checkpoint with a lower LR and a longer warmup."""
        self.guard.rollback(step, reason)
        kept, first = self.guard.state_dict(), self.evaluator.first_val_loss
        good = self.checkpointer.latest()
        step, tokens = self._setup(good)
        self.guard.load_state_dict(kept)
        if self.evaluator.first_val_loss is None:
            self.evaluator.first_val_loss = first
        msg = self.guard.describe(reason, step, f"step {step}" if good else "the phase start")
        self.hooks.log(f"[{self.phase.name}] {msg}")
        self.hooks.on_event("rollback", msg, {"step": step, "reason": reason})
        self.metrics.truncate_after(step)
        self.train_model = self._compiled()
        self.progress.restart(step, tokens)
        self._fresh = True
        return step, tokens

    def _stop(self, step: int, tokens: int) -> PhaseOutcome:
        """A stop request: checkpoint here and return."""
        path = str(self._save(step, tokens, final=False))
        self.hooks.log(f"[{self.phase.name}] stopped at step {step}; checkpoint {path}")
        return PhaseOutcome(
            "stopped",
            step,
            self.phase.total_steps,
            tokens,
            path,
            first_val_loss=self.evaluator.first_val_loss,
            val_loss=self.evaluator.val_loss,
            rollbacks=self.guard.rollbacks,
        )

    def _save_final(self, step: int, tokens: int) -> None:
        """The phase's end: LoRA merged into the weights, the final (kept) checkpoint."""
        merge_adapters(self.model, self.phase, self.hooks.log)
        extra = {
            "val_loss": self.evaluator.val_loss,
            "first_val_loss": self.evaluator.first_val_loss,
            "stop_reason": self.stop_reason,
        }
        if self._best_restored is not None:
            extra["weights_of_step"] = self._best_restored
        self._save(step, tokens, final=True, extra=extra)
        self.checkpointer.drop_best()

    def _outcome(self, step: int, tokens: int) -> PhaseOutcome:
        samples = self.sampler.samples
        for s in samples:
            self.hooks.log(f"[{self.phase.name}] sample: {s['prompt']!r} -> {s['completion']!r}")
        last = self.checkpointer.last
        return PhaseOutcome(
            "done",
            step,
            self.phase.total_steps,
            tokens,
            last,
            final_checkpoint=last,
            first_val_loss=self.evaluator.first_val_loss,
            val_loss=self.evaluator.val_loss,
            samples=samples,
            tokens_per_s=self.progress.tokens_per_s,
            stop_reason=self.stop_reason,
            rollbacks=self.guard.rollbacks,
        )

    def _already_done(self, existing: ckpt.Checkpoint) -> PhaseOutcome:
        """The outcome of a phase whose final checkpoint exists (nothing is trained)."""
        meta = existing.meta
        return PhaseOutcome(
            status="done",
            step=existing.step,
            total_steps=self.phase.total_steps,
            tokens=meta.get("tokens", 0),
            last_checkpoint=str(existing.path),
            final_checkpoint=str(existing.path),
            skipped=True,
            val_loss=meta.get("val_loss"),
            first_val_loss=meta.get("first_val_loss"),
            stop_reason=meta.get("stop_reason", "budget"),
        )

    # ------------------------------------------------------------------ setup

    def _select_device(self) -> None:
        """Threads, device, autocast dtype and the rare-token weight table."""
        set_threads(self.cfg.train.threads)
        self.device = select_device(self.cfg.train.device)
        self.dtype = autocast_dtype(self.device, self.cfg.train.precision)
        self.token_weight_table: torch.Tensor | None = None
        self.rare_token_ids: set[int] = set()
        phase = self.phase
        if phase.rare_token_alpha > 0:
            table = token_weights(
                self.train_shard.tokens,
                self.tokenizer.vocab_size,
                phase.rare_token_alpha,
                phase.rare_token_max_weight,
            )
            self.token_weight_table = torch.from_numpy(table).to(self.device)
            self.rare_token_ids = set(np.nonzero(table > 1.0)[0].tolist())

    def _start(self, existing: ckpt.Checkpoint | None) -> tuple[int, int]:
        """The components that report into the metrics, then the model, optimizer and loader
        (restored from ``existing`` when given)."""
        phase = self.phase
        # evaluation windows are the configured micro_batch x eval_batches, whatever the device
        # regrouped training into (deeplm.train.compile.regroup)
        configured = dataclasses.replace(
            phase, micro_batch=self.cfg.phases[self.phase_idx].micro_batch
        )
        self.evaluator = Evaluator(
            configured, self.val_shard, self.device, self.dtype, self.metrics, self.parallel.agree
        )
        weighted = self.token_weight_table is not None
        self.sampler = Sampler(
            self.cfg,
            phase,
            self.tokenizer,
            self.device,
            self.metrics,
            self.layout.samples(phase.name),
            self.rare_token_ids if weighted else None,
        )
        step, tokens = self._setup(existing)
        if existing is not None:
            self.checkpointer.last = str(existing.path)
            self.hooks.log(
                f"[{phase.name}] resuming from {existing.path} (step {step}/{phase.total_steps})"
            )
        self.hooks.log(
            f"[{phase.name}] {self.device.type}: {self.plan.describe()}; micro-batch "
            f"{phase.micro_batch} x {phase.seq_len} x {phase.grad_accum} per step"
        )
        self._say_epoch_cap()
        return step, tokens

    def _say_epoch_cap(self) -> None:
        """Log (and record as an event) a budget cut by ``max_epochs``."""
        asked, phase = self.cfg.phases[self.phase_idx].tokens, self.phase
        if phase.tokens >= asked:
            return
        shard = self.train_shard.meta.n_tokens
        msg = (
            f"{asked:,} tokens would be {asked / shard:.1f} passes over the {shard:,}-token "
            f"training shard; training {phase.tokens:,} ({phase.total_steps} steps, "
            f"phases[{self.phase_idx}].max_epochs = {phase.max_epochs:g})"
        )
        self.hooks.log(f"[{phase.name}] {msg}")
        self.hooks.on_event("epochs", msg, {"tokens": phase.tokens, "asked": asked})

    def _train(self, step: int, tokens: int) -> PhaseOutcome:
        """The loop under the stall watchdog; running out of memory names the knobs."""
        self.current_step = step
        self.watchdog = StallWatchdog(self.cfg.train.stall_timeout_s, self._stalled)
        try:
            with self.watchdog:
                return self._loop(step, tokens)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            seq = self.phase.context_at(self.current_step)
            raise OutOfMemory(
                f"[{self.phase.name}] out of {self.device.type} memory at context {seq} with "
                f"micro-batch {self.phase.micro_batch_for(seq)}: lower "
                f"phases[{self.phase_idx}].micro_batch (raise grad_accum to keep the tokens per "
                "step) or train.micro_batch_tokens, or set model.grad_checkpointing = true; "
                "progress up to the last checkpoint is kept"
            ) from exc

    def _stalled(self, seconds: float) -> None:
        msg = (
            f"step {self.current_step + 1} has run for {seconds:.0f}s "
            f"(train.stall_timeout_s = {self.cfg.train.stall_timeout_s:g}): stalled?"
        )
        self.hooks.log(f"[{self.phase.name}] warning: {msg}")
        self.hooks.on_event("stall", msg, {"seconds": seconds})

    def _setup(self, existing: ckpt.Checkpoint | None) -> tuple[int, int]:
        """Build model, optimizer and loader, restored from ``existing`` when given."""
        self.model = self._load_model(existing)
        self.model.to(self.device)
        self.model.train()
        self.parallel.prepare(self.model, self.device)
        # The optimizer always sees every trainable parameter (freezing only drops gradients),
        # so its state lines up with a checkpoint whatever was frozen when it was written.
        self.optimizer = build_optimizer(self.model, self.phase, self.device, self.plan.compile)
        self.evaluator.first_val_loss = None
        self.plateau.reset()
        if existing is None:
            self.loader = self._make_loader(self.curriculum.context(0))
            return 0, 0
        return self._restore(ckpt.load_trainer_state(existing.path))

    def _load_model(self, existing: ckpt.Checkpoint | None) -> Transformer:
        phase = self.phase
        model = build_model(self.cfg, self.cfg.seed + self.phase_idx)
        if existing is None and self.init_from is not None:
            ckpt.load_weights(self.init_from, model)
            self.hooks.log(f"[{phase.name}] starting from {self.init_from}")
        attach_adapters(model, phase, self.hooks.log if existing is None else None)
        if existing is not None:
            ckpt.load_weights(existing.path, model)
        return model

    def _make_loader(self, seq_len: int) -> PackedBatches:
        return PackedBatches(
            self.train_shard,
            seq_len,
            seed=self.cfg.seed + 1000 * self.phase_idx,
            pin_memory=self.device.type == "cuda",  # async host-to-device copies
            **self.parallel.loader_args(self.phase.micro_batch_for(seq_len)),
        )

    def _make_metrics(self, resume_step: int) -> MetricsLogger | NullMetrics:
        """The phase's metrics sink (only the main process writes files)."""
        if not self.parallel.is_main:
            return NullMetrics()
        return MetricsLogger(
            self.layout.metrics_dir,
            self.phase.name,
            self.layout.tensorboard_dir,
            resume_step=resume_step,
        )

    def _make_progress(self, step: int, tokens: int) -> ProgressReporter:
        return ProgressReporter(
            self.cfg,
            self.phase,
            self.device,
            self.dtype,
            self.metrics,
            self.hooks.on_progress,
            step,
            tokens,
            weighted=self.token_weight_table is not None,
            show=self.cfg.train.progress and self.parallel.is_main,
        )

    def _compiled(self) -> nn.Module:
        """The loss module to call for training steps (:func:`deeplm.train.compile.
        compile_for_training` under this device's plan), built once per model object: a rollback
        builds a new model."""
        if self._train_module is None or self._compiled_for is not self.model:
            self.model.set_loss_head(self.plan.loss_head)
            self._train_module = compile_for_training(self.model, self.plan)
            self._compiled_for = self.model
        return self._train_module

    # ------------------------------------------------------------------ checkpoint state

    def _trainer_state(self, step: int, tokens: int, optimizer: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,
            "optimizer": optimizer,
            "loader": self.loader.state_dict(),
            "rng": _rng_state(self.device),
            "phase": self.phase.name,
            "tokenizer_hash": self.tokenizer.hash,
            **self.evaluator.state_dict(),
            **self.plateau.state_dict(),
            **self.guard.state_dict(),
        }

    def _save(self, step: int, tokens: int, final: bool, extra: dict | None = None) -> Path:
        """Write a checkpoint (the writing rank; the others wait for it)."""
        model, optimizer = self.parallel.gather_for_save(self.model, self.optimizer)
        path = self.checkpointer.path(step)
        if model is not None and optimizer is not None:
            state = self._trainer_state(step, tokens, optimizer)
            meta = self.checkpointer.meta(tokens, final, extra)
            path = self.checkpointer.write(step, model, state, meta)
        self.parallel.after_save()
        self.checkpointer.last = str(path)
        return path

    def _restore(self, state: dict[str, Any]) -> tuple[int, int]:
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        loader_state = state["loader"]
        self.loader = self._make_loader(int(loader_state["seq_len"]))
        self.loader.load_state_dict(loader_state)
        _set_rng_state(state["rng"], self.device)
        self.evaluator.load_state_dict(state)
        self.plateau.load_state_dict(state)
        self.guard.load_state_dict(state)
        return int(state["step"]), int(state["tokens"])
