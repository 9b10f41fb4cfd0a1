"""The training loop for one phase: resume from the phase's newest checkpoint (or start from the
previous phase's final weights), train to the phase's token budget with warmup + cosine, gradient
accumulation and clipping, evaluate and sample periodically, log metrics, checkpoint atomically.

Inside a phase (all optional, see ``PhaseConfig``):
- context curriculum: the context length follows ``phase.context_at(step)``; tokens per
  optimizer step stay constant (the micro-batch grows at shorter contexts);
- layer freezing: the bottom ``phase.frozen_at(step)`` blocks are frozen (run without autograd);
  a checkpoint is written and kept just before each freeze;
- rare-token loss weighting, reported next to the unweighted loss;
- early stop on a validation plateau;
- LoRA adapters, merged into the weights at the end of the phase;
- divergence handling: NaN/Inf loss or a grad-norm spike rolls back to the last good checkpoint
  with half the learning rate and twice the warmup; repeated failure stops with a clear message.

Exact resume: weights, optimizer, data cursor and RNG state are in every checkpoint, and nothing
outside the training RNG draws random numbers (sampling uses its own generator), so a run stopped
at step k and resumed reaches bit-identical weights to an uninterrupted run on the same device.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from deeplm.config import RunConfig
from deeplm.data.loader import PackedBatches
from deeplm.data.shards import Shard
from deeplm.device import (
    autocast_context,
    autocast_dtype,
    peak_flops,
    peak_memory_bytes,
    select_device,
    set_threads,
    synchronize,
)
from deeplm.eval.perplexity import evaluate_loss, perplexity
from deeplm.eval.samples import sample_texts
from deeplm.model import build_model, flops_per_token
from deeplm.model.lora import apply_lora, merge_lora
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import Tokenizer
from deeplm.train.compile import compile_for_training, fit_plan, regroup, step_plan
from deeplm.train.metrics import MetricsLogger
from deeplm.train.optim import build_optimizer, set_lr
from deeplm.train.schedule import lr_at
from deeplm.train.weighting import token_weights


class TrainingDiverged(RuntimeError):
    """The loss kept diverging after every allowed rollback."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the settings to change."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class StallWatchdog:
    """A daemon thread that reports an optimizer step running longer than ``timeout_s``
    (a hung data read, a deadlocked collective, a swapping machine) — once per stall."""

    def __init__(self, timeout_s: float, report: Callable[[float], None]):
        self.timeout_s = timeout_s
        self.report = report
        self._last = time.monotonic()
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="deeplm-stall")

    def __enter__(self) -> StallWatchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last = time.monotonic()
        self._reported = False

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s and not self._reported:
                self._reported = True
                self.report(waited)


@dataclass
class TrainHooks:
    """How the loop talks to its orchestrator."""

    on_progress: Callable[[dict[str, Any]], None] = lambda info: None
    should_stop: Callable[[], bool] = lambda: False
    log: Callable[[str], None] = print
    on_event: Callable[[str, str, dict[str, Any]], None] = lambda kind, msg, data: None


@dataclass
class PhaseOutcome:
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


def distinct_n(texts: list[str], n: int) -> float:
    """Share of distinct word n-grams among all word n-grams of ``texts`` (0 when none)."""
    grams = []
    for t in texts:
        words = t.split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class PhaseTrainer:
    """Trains one phase of a run to completion (or until asked to stop)."""

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
    ):
        self.cfg = cfg
        self.phase = cfg.phases[phase_idx]
        self.phase_idx = phase_idx
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.train_shard = train_shard
        self.val_shard = val_shard
        self.init_from = init_from
        self.hooks = hooks or TrainHooks()
        # how steps run on this device (compile, loss head, micro-batch size): deeplm.train.compile
        self.plan = step_plan(cfg.train, select_device(cfg.train.device))
        self.phase = regroup(self.phase, self.plan.micro_batch_tokens)
        self.plan = fit_plan(self.plan, self.phase, distributed=self._distributed())
        self._train_module: torch.nn.Module | None = None
        self._compiled_for: torch.nn.Module | None = None
        self.dir = RunLayout(run_dir).phase_checkpoints(phase_idx, self.phase.name)
        # divergence-handling state (kept across rollbacks, saved in checkpoints)
        self.lr_scale = 1.0
        self.warmup_scale = 1.0
        self.rollbacks = 0

    # ------------------------------------------------------------------ state

    def _meta(self, tokens: int, final: bool, extra: dict | None = None) -> dict:
        return {
            "phase": self.phase.name,
            "phase_idx": self.phase_idx,
            "tokens": tokens,
            "total_steps": self.phase.total_steps,
            "final": final,
            "keep": final,
            "tokenizer_hash": self.tokenizer.hash,
            "model": self.cfg.to_dict()["model"],
            "lora": self.phase.lora_rank > 0 and not final,
            **(extra or {}),
        }

    def _trainer_state(self, step: int, tokens: int) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": _rng_state(self.device),
            "phase": self.phase.name,
            "tokenizer_hash": self.tokenizer.hash,
            "first_val_loss": self.first_val_loss if self.first_val_loss is not None else -1.0,
            "best_val_loss": self.best_val if self.best_val is not None else -1.0,
            "evals_since_best": self.evals_since_best,
            "lr_scale": self.lr_scale,
            "warmup_scale": self.warmup_scale,
            "rollbacks": self.rollbacks,
        }

    def _save(self, step: int, tokens: int, final: bool, extra: dict | None = None) -> Path:
        path = ckpt.save_checkpoint(
            self.dir,
            step,
            self.model,
            self._trainer_state(step, tokens),
            self._meta(tokens, final, extra),
        )
        ckpt.apply_retention(self.dir, self.phase.keep_last)
        return path

    def _restore(self, state: dict[str, Any]) -> tuple[int, int]:
        self.optimizer.load_state_dict(state["optimizer"])
        loader_state = state["loader"]
        self.loader = self._make_loader(int(loader_state["seq_len"]), int(state["step"]))
        self.loader.load_state_dict(loader_state)
        _set_rng_state(state["rng"], self.device)
        fv = float(state.get("first_val_loss", -1.0))
        self.first_val_loss = fv if fv >= 0 else None
        bv = float(state.get("best_val_loss", -1.0))
        self.best_val = bv if bv >= 0 else None
        self.evals_since_best = int(state.get("evals_since_best", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.warmup_scale = float(state.get("warmup_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        return int(state["step"]), int(state["tokens"])

    def _make_loader(self, seq_len: int, step: int) -> PackedBatches:
        micro_batch = self.phase.micro_batch * self.phase.seq_len // seq_len
        return PackedBatches(
            self.train_shard,
            seq_len,
            micro_batch,
            seed=self.cfg.seed + 1000 * self.phase_idx,
            pin_memory=self.device.type == "cuda",  # async host-to-device copies
        )

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, step: int, tokens: int) -> float:
        seq_len = self.phase.context_at(max(0, step - 1)) if step else self.phase.context_at(0)
        micro_batch = self.phase.micro_batch * self.phase.seq_len // seq_len
        loss = evaluate_loss(
            self.model,
            self.val_shard,
            seq_len,
            micro_batch,
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
        return loss

    def _samples(self, step: int) -> list[dict[str, str]]:
        phase = self.phase
        samples = sample_texts(
            self.model,
            self.tokenizer,
            phase.prompts,
            phase.sample_tokens,
            self.device,
            seed=self.cfg.seed,
            allow_special=phase.kind == "finetune",
        )
        for s in samples:
            s["kind"] = "short"
        if phase.long_sample_tokens:
            longs = sample_texts(
                self.model,
                self.tokenizer,
                phase.prompts[:1],
                min(phase.long_sample_tokens, self.cfg.model.max_seq_len - 8),
                self.device,
                seed=self.cfg.seed + 99,
                allow_special=phase.kind == "finetune",
            )
            samples += [dict(s, kind="long") for s in longs]
        texts = [s["completion"] for s in samples]
        richness = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
        if self.token_weight_table is not None:
            ids = [t for text in texts for t in self.tokenizer.encode(text)]
            rare = self.rare_token_ids
            richness["rare_token_rate"] = sum(1 for t in ids if t in rare) / max(1, len(ids))
        self.metrics.log({"step": step, **richness})
        text = "\n\n".join(f"**{s['prompt']}**{s['completion']}" for s in samples)
        self.metrics.log_text("samples", text, step)
        with RunLayout(self.run_dir).samples(phase.name).open("a") as fh:
            for s in samples:
                fh.write(json.dumps({"step": step, **s}) + "\n")
        return samples

    # ------------------------------------------------------------------ setup

    def _load_model(self, existing: ckpt.Checkpoint | None) -> None:
        phase = self.phase
        self.model = build_model(self.cfg, self.cfg.seed + self.phase_idx)
        if existing is None and self.init_from is not None:
            ckpt.load_weights(self.init_from, self.model)
            self.hooks.log(f"[{phase.name}] starting from {self.init_from}")
        if phase.lora_rank > 0:
            n = apply_lora(self.model, phase.lora_rank, phase.lora_alpha, phase.lora_targets)
            if existing is None:
                self.hooks.log(f"[{phase.name}] LoRA rank {phase.lora_rank} on {n} projections")
        if existing is not None:
            ckpt.load_weights(existing.path, self.model)

    def _setup(self, existing: ckpt.Checkpoint | None) -> tuple[int, int]:
        """Build model, optimizer and loader, restored from ``existing`` when given."""
        self._load_model(existing)
        self.model.to(self.device)
        self.model.train()
        self._prepare_model()
        # The optimizer always sees every trainable parameter (freezing only drops gradients),
        # so its state lines up with a checkpoint whatever was frozen when it was written.
        self.optimizer = build_optimizer(self.model, self.phase, self.device, self.plan.compile)
        self.first_val_loss = None
        self.best_val = None
        self.evals_since_best = 0
        if existing is None:
            self.loader = self._make_loader(self.phase.context_at(0), 0)
            return 0, 0
        state = ckpt.load_trainer_state(existing.path)
        return self._restore(dict(state, optimizer=self._optimizer_state(state["optimizer"])))

    def _distributed(self) -> bool:
        """Whether this trainer runs one rank of a torchrun job (DDP/FSDP2 wrap the model)."""
        return False

    def _prepare_model(self) -> None:
        """Hook between loading the weights and building the optimizer (e.g. FSDP sharding)."""

    def _optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Hook: a checkpoint's optimizer state as this trainer's optimizer expects it."""
        return saved

    # ------------------------------------------------------------------ main

    def run(self) -> PhaseOutcome:
        cfg, phase, hooks = self.cfg, self.phase, self.hooks
        total = phase.total_steps
        existing = self._latest_compatible()
        if existing is not None and existing.meta.get("final"):
            return PhaseOutcome(
                status="done",
                step=existing.step,
                total_steps=total,
                tokens=existing.meta.get("tokens", 0),
                last_checkpoint=str(existing.path),
                final_checkpoint=str(existing.path),
                skipped=True,
                val_loss=existing.meta.get("val_loss"),
                first_val_loss=existing.meta.get("first_val_loss"),
                stop_reason=existing.meta.get("stop_reason", "budget"),
            )

        set_threads(cfg.train.threads)
        self.device = select_device(cfg.train.device)
        self.dtype = autocast_dtype(self.device, cfg.train.precision)
        self.token_weight_table: torch.Tensor | None = None
        self.rare_token_ids: set[int] = set()
        if phase.rare_token_alpha > 0:
            table = token_weights(
                self.train_shard.tokens,
                self.tokenizer.vocab_size,
                phase.rare_token_alpha,
                phase.rare_token_max_weight,
            )
            self.token_weight_table = torch.from_numpy(table).to(self.device)
            self.rare_token_ids = set(np.nonzero(table > 1.0)[0].tolist())
        step, tokens = self._setup(existing)
        if existing is not None:
            hooks.log(f"[{phase.name}] resuming from {existing.path} (step {step}/{total})")
        hooks.log(
            f"[{phase.name}] {self.device.type}: {self.plan.describe()}; micro-batch "
            f"{phase.micro_batch} x {phase.seq_len} x {phase.grad_accum} per step"
        )

        self.metrics = self._make_metrics(step)

        def stalled(seconds: float) -> None:
            msg = (
                f"step {getattr(self, 'current_step', step) + 1} has run for {seconds:.0f}s "
                f"(train.stall_timeout_s = {cfg.train.stall_timeout_s:g}): stalled?"
            )
            hooks.log(f"[{phase.name}] warning: {msg}")
            hooks.on_event("stall", msg, {"seconds": seconds})

        self.watchdog = StallWatchdog(cfg.train.stall_timeout_s, stalled)
        try:
            with self.watchdog:
                return self._loop(step, tokens, existing)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            seq = phase.context_at(getattr(self, "current_step", step))
            raise OutOfMemory(
                f"[{phase.name}] out of {self.device.type} memory at context {seq} with "
                f"micro-batch {phase.micro_batch * phase.seq_len // seq}: lower "
                f"phases[{self.phase_idx}].micro_batch (raise grad_accum to keep the tokens per "
                "step) or train.micro_batch_tokens, or set model.grad_checkpointing = true; "
                "progress up to the last "
                "checkpoint is kept"
            ) from exc
        finally:
            self.metrics.close()

    def _log_corrupt(self, known: set[Path], using: Path) -> None:
        """Log the checkpoints found corrupt (and moved aside) since ``known`` was taken."""
        for path, reason in ckpt.corrupt_checkpoints(self.dir):
            if path not in known:
                known.add(path)
                self.hooks.log(
                    f"[{self.phase.name}] checkpoint {path.name.removesuffix('.corrupt')} is "
                    f"corrupt ({reason}); moved aside to {path.name}, resuming from {using.name}"
                )

    def _latest_compatible(self) -> ckpt.Checkpoint | None:
        """The newest good checkpoint of this phase made with this run's tokenizer; checkpoints
        of another tokenizer (token ids mean something else) are moved aside, never resumed."""
        known = {p for p, _ in ckpt.corrupt_checkpoints(self.dir)}
        while (latest := ckpt.latest_checkpoint(self.dir)) is not None:
            self._log_corrupt(known, latest.path)
            if latest.meta.get("tokenizer_hash") in (None, self.tokenizer.hash):
                return latest
            aside = latest.path.with_name(latest.path.name + ".other-tokenizer")
            latest.path.rename(aside)
            self.hooks.log(
                f"[{self.phase.name}] {latest.path} was made with another tokenizer; "
                f"moved aside to {aside.name}"
            )
        if self.init_from is not None:
            meta = ckpt.read_meta(self.init_from)
            if meta.get("tokenizer_hash") not in (None, self.tokenizer.hash):
                raise ckpt.CheckpointError(
                    f"{self.init_from} was trained with another tokenizer than this run's "
                    f"({str(meta.get('tokenizer_hash'))[:12]} vs {self.tokenizer.hash[:12]})"
                )
        return None

    def _make_metrics(self, resume_step: int) -> MetricsLogger:
        """The phase's metrics sink (a distributed trainer gives ranks other than 0 a null one)."""
        return MetricsLogger(
            RunLayout(self.run_dir).metrics_dir,
            self.phase.name,
            RunLayout(self.run_dir).tensorboard_dir,
            resume_step=resume_step,
        )

    def _forward_loss(self, model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to optimise, unweighted loss) for one micro-batch, through the chunked head
        (:mod:`deeplm.model.fused_loss`: no full logits tensor in memory)."""
        weights = None if self.token_weight_table is None else self.token_weight_table[y]
        with autocast_context(self.device, self.dtype):
            unweighted, loss = model(x, y, weights, return_logits=False)
        return loss, unweighted

    def _compiled(self) -> torch.nn.Module:
        """The module to call for training steps (:func:`deeplm.train.compile.compile_for_training`
        under this device's plan), built once per model object: a rollback builds a new model."""
        if self._train_module is None or self._compiled_for is not self.model:
            self.model.set_loss_head(self.plan.loss_head)
            self._train_module = compile_for_training(self.model, self.plan)
            self._compiled_for = self.model
        return self._train_module

    def _rollback(self, step: int, reason: str) -> tuple[int, int]:
        """Return to the newest good checkpoint with a lower LR and a longer warmup."""
        phase = self.phase
        self.rollbacks += 1
        if self.rollbacks > phase.max_rollbacks:
            raise TrainingDiverged(
                f"[{phase.name}] training diverged ({reason}) at step {step} and "
                f"{phase.max_rollbacks} rollbacks did not help; lower phases[{self.phase_idx}].lr "
                f"(now {phase.lr:g}) or raise warmup_frac"
            )
        self.lr_scale *= 0.5
        self.warmup_scale *= 2.0
        keep = (self.lr_scale, self.warmup_scale, self.rollbacks, self.first_val_loss)
        good = ckpt.latest_checkpoint(self.dir)
        step, tokens = self._setup(good)
        self.lr_scale, self.warmup_scale, self.rollbacks, first = keep
        self.first_val_loss = self.first_val_loss if self.first_val_loss is not None else first
        where = f"step {step}" if good else "the phase start"
        msg = (
            f"{reason} at step {step}: rolled back to {where}, lr x{self.lr_scale:g}, "
            f"warmup x{self.warmup_scale:g} (rollback {self.rollbacks}/{phase.max_rollbacks})"
        )
        self.hooks.log(f"[{phase.name}] {msg}")
        self.hooks.on_event("rollback", msg, {"step": step, "reason": reason})
        self.metrics.truncate_after(step)
        return step, tokens

    def _loop(self, step: int, tokens: int, existing: ckpt.Checkpoint | None) -> PhaseOutcome:
        cfg, phase, hooks = self.cfg, self.phase, self.hooks
        total = phase.total_steps
        peak = peak_flops(self.device, self.dtype)
        last_ckpt = str(existing.path) if existing is not None else None
        val_loss: float | None = None
        samples: list[dict[str, str]] = []
        tok_per_s = None
        stop_reason = "budget"
        gn_ema: float | None = None
        flops_cache: dict[int, float] = {}

        if step == 0 and self.first_val_loss is None:
            self.first_val_loss = self._evaluate(0, 0)
            self.best_val = self.first_val_loss
            hooks.log(f"[{phase.name}] initial val loss {self.first_val_loss:.4f}")
        train_model = self._compiled()
        bar = tqdm(
            total=total,
            initial=step,
            desc=phase.name,
            unit="step",
            disable=not cfg.train.progress,
            dynamic_ncols=True,
        )
        t_last, tokens_last, loss_sum, unw_sum, loss_n = time.perf_counter(), tokens, None, None, 0
        t_phase = time.perf_counter()
        while step < total:
            self.current_step = step
            self.watchdog.beat()  # evaluation and checkpointing do not count as a stalled step
            if hooks.should_stop():
                last_ckpt = str(self._save(step, tokens, final=False))
                hooks.log(f"[{phase.name}] stopped at step {step}; checkpoint {last_ckpt}")
                bar.close()
                return PhaseOutcome(
                    "stopped",
                    step,
                    total,
                    tokens,
                    last_ckpt,
                    first_val_loss=self.first_val_loss,
                    val_loss=val_loss,
                    rollbacks=self.rollbacks,
                )
            # context curriculum: a new loader at the new length, same place in the data
            seq_len = phase.context_at(step)
            if seq_len != self.loader.seq_len:
                state = self.loader.state_dict()
                self.loader = self._make_loader(seq_len, step)
                self.loader.load_state_dict(state)
                hooks.on_event("curriculum", f"context {seq_len} from step {step}", {})
            # layer freezing: keep a checkpoint just before each new freeze
            n_frozen = phase.frozen_at(step)
            if n_frozen != self.model.n_frozen:
                if step > 0 and n_frozen > phase.frozen_at(step - 1):
                    path = self._save(step, tokens, final=False)
                    ckpt.mark_keep(path, f"before freezing {n_frozen} layers")
                    last_ckpt = str(path)
                    hooks.on_event(
                        "freeze",
                        f"bottom {n_frozen} layers frozen from step {step}",
                        {"checkpoint": last_ckpt},
                    )
                self.model.set_frozen_layers(n_frozen)

            warmup = min(0.5, phase.warmup_frac * self.warmup_scale)
            lr = self.lr_scale * lr_at(
                step, total, phase.lr, warmup, phase.min_lr_ratio, phase.schedule, phase.decay_frac
            )
            set_lr(self.optimizer, lr)
            for _ in range(phase.grad_accum):
                x, y = self.loader.next_batch()
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                loss, unweighted = self._forward_loss(train_model, x, y)
                (loss / phase.grad_accum).backward()
                d, u = loss.detach(), unweighted.detach()
                loss_sum = d if loss_sum is None else loss_sum + d
                unw_sum = u if unw_sum is None else unw_sum + u
                loss_n += 1
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += phase.tokens_per_step
            bar.update(1)
            self.watchdog.beat()

            if step % cfg.train.log_every == 0 or step == total:
                synchronize(self.device)
                now = time.perf_counter()
                mean_loss = float(loss_sum.item()) / max(1, loss_n)
                gn = float(grad_norm.item())
                spike = (
                    phase.spike_factor > 0
                    and gn_ema is not None
                    and step > warmup * total
                    and gn > phase.spike_factor * gn_ema
                )
                if not math.isfinite(mean_loss) or not math.isfinite(gn) or spike:
                    reason = f"grad-norm spike {gn:.3g}" if spike else f"loss {mean_loss}"
                    step, tokens = self._rollback(step, reason)
                    bar.reset(total=total)
                    bar.update(step)
                    train_model = self._compiled()
                    t_last, tokens_last, loss_sum, unw_sum, loss_n = (
                        time.perf_counter(),
                        tokens,
                        None,
                        None,
                        0,
                    )
                    gn_ema = None
                    continue
                gn_ema = gn if gn_ema is None else 0.9 * gn_ema + 0.1 * gn
                tok_per_s = (tokens - tokens_last) / max(1e-9, now - t_last)
                if seq_len not in flops_cache:
                    flops_cache[seq_len] = flops_per_token(cfg.model, seq_len)
                mfu = tok_per_s * flops_cache[seq_len] / peak if peak else None
                record = {
                    "step": step,
                    "tokens": tokens,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": gn,
                    "tokens_per_s": tok_per_s,
                    "mfu": mfu,
                    "seq_len": seq_len,
                    "micro_batch": self.loader.micro_batch,
                    "frozen_layers": self.model.n_frozen,
                    "elapsed_s": now - t_phase,
                }
                mem = peak_memory_bytes(self.device)
                if mem:
                    record["peak_memory_gb"] = mem / 2**30
                if self.token_weight_table is not None:
                    record["loss_unweighted"] = float(unw_sum.item()) / max(1, loss_n)
                self.metrics.log(record)
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}",
                    lr=f"{lr:.2e}",
                    T=seq_len,
                    frozen=self.model.n_frozen,
                    tok_s=f"{tok_per_s:,.0f}",
                )
                hooks.on_progress(
                    {
                        "phase": phase.name,
                        "step": step,
                        "total_steps": total,
                        "tokens": tokens,
                        "loss": mean_loss,
                        "lr": lr,
                        "seq_len": seq_len,
                        "frozen_layers": self.model.n_frozen,
                        "tokens_per_s": tok_per_s,
                        "last_checkpoint": last_ckpt,
                    }
                )
                t_last, tokens_last, loss_sum, unw_sum, loss_n = now, tokens, None, None, 0

            is_last = step == total
            if (phase.eval_every and step % phase.eval_every == 0) or is_last:
                val_loss = self._evaluate(step, tokens)
                hooks.log(
                    f"[{phase.name}] step {step}/{total} val loss {val_loss:.4f} "
                    f"(ppl {perplexity(val_loss):.1f})"
                )
                every = phase.sample_every or phase.eval_every
                plateau = False
                if self.best_val is None or val_loss < self.best_val - phase.plateau_min_delta:
                    self.best_val, self.evals_since_best = val_loss, 0
                else:
                    self.evals_since_best += 1
                    plateau = 0 < phase.plateau_patience <= self.evals_since_best
                if plateau and not is_last:
                    stop_reason = (
                        f"validation plateau: no improvement > {phase.plateau_min_delta:g} in "
                        f"{self.evals_since_best} evaluations (best {self.best_val:.4f})"
                    )
                    hooks.log(f"[{phase.name}] stopping early at step {step}: {stop_reason}")
                    hooks.on_event("plateau", stop_reason, {"step": step})
                    is_last = True
                if is_last or (every and step % every == 0):
                    samples = self._samples(step)
            if is_last:
                if phase.lora_rank > 0:
                    merged = merge_lora(self.model)
                    hooks.log(f"[{phase.name}] merged {merged} LoRA adapters into the weights")
                last_ckpt = str(
                    self._save(
                        step,
                        tokens,
                        final=True,
                        extra={
                            "val_loss": val_loss,
                            "first_val_loss": self.first_val_loss,
                            "stop_reason": stop_reason,
                        },
                    )
                )
                break
            if phase.save_every and step % phase.save_every == 0:
                last_ckpt = str(self._save(step, tokens, final=False))
                hooks.on_progress(
                    {
                        "phase": phase.name,
                        "step": step,
                        "total_steps": total,
                        "tokens": tokens,
                        "last_checkpoint": last_ckpt,
                    }
                )
        bar.close()
        for s in samples:
            hooks.log(f"[{phase.name}] sample: {s['prompt']!r} -> {s['completion']!r}")
        return PhaseOutcome(
            "done",
            step,
            total,
            tokens,
            last_ckpt,
            final_checkpoint=last_ckpt,
            first_val_loss=self.first_val_loss,
            val_loss=val_loss,
            samples=samples,
            tokens_per_s=tok_per_s,
            stop_reason=stop_reason,
            rollbacks=self.rollbacks,
        )
