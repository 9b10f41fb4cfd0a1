"""The training loop for one phase: resume from the phase's newest checkpoint (or start from the
previous phase's final weights), train to the phase's token budget with warmup + cosine, gradient
accumulation and clipping, evaluate and sample periodically, log metrics, checkpoint atomically.

Exact resume: weights, optimizer, data cursor and RNG state are in every checkpoint, and nothing
outside the training RNG draws random numbers (sampling uses its own generator), so a run stopped
at step k and resumed reaches bit-identical weights to an uninterrupted run on the same device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deeplm.config import PhaseConfig, RunConfig
from deeplm.data.loader import PackedBatches
from deeplm.data.shards import Shard
from deeplm.eval.perplexity import evaluate_loss, perplexity
from deeplm.eval.samples import sample_texts
from deeplm.model import Transformer, flops_per_token
from deeplm.tokenizer import Tokenizer
from deeplm.train import checkpoint as ckpt
from deeplm.train.device import (
    autocast_context,
    autocast_dtype,
    peak_flops,
    select_device,
    set_threads,
    synchronize,
)
from deeplm.train.metrics import MetricsLogger
from deeplm.train.optim import build_optimizer, set_lr
from deeplm.train.schedule import lr_at


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf."""


@dataclass
class TrainHooks:
    """How the loop talks to its orchestrator."""

    on_progress: Callable[[dict[str, Any]], None] = lambda info: None
    should_stop: Callable[[], bool] = lambda: False
    log: Callable[[str], None] = print


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


def phase_dir(run_dir: Path, phase_idx: int, phase: PhaseConfig) -> Path:
    return run_dir / "checkpoints" / f"{phase_idx + 1}-{phase.name}"


def build_model(cfg: RunConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


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
        self.dir = phase_dir(run_dir, phase_idx, self.phase)

    # ------------------------------------------------------------------ helpers

    def _meta(self, step: int, tokens: int, final: bool, extra: dict | None = None) -> dict:
        return {
            "phase": self.phase.name,
            "phase_idx": self.phase_idx,
            "tokens": tokens,
            "total_steps": self.phase.total_steps,
            "final": final,
            "keep": final,
            "tokenizer_hash": self.tokenizer.hash,
            "model": self.cfg.to_dict()["model"],
            **(extra or {}),
        }

    def _save(self, step: int, tokens: int, final: bool, extra: dict | None = None) -> Path:
        state = {
            "step": step,
            "tokens": tokens,
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": _rng_state(self.device),
            "phase": self.phase.name,
            "tokenizer_hash": self.tokenizer.hash,
            "first_val_loss": self.first_val_loss if self.first_val_loss is not None else -1.0,
        }
        path = ckpt.save_checkpoint(
            self.dir, step, self.model, state, self._meta(step, tokens, final, extra)
        )
        ckpt.apply_retention(self.dir, self.phase.keep_last)
        return path

    def _evaluate(self, step: int, tokens: int) -> float:
        loss = evaluate_loss(
            self.model,
            self.val_shard,
            self.phase.seq_len,
            self.phase.micro_batch,
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
                "seq_len": self.phase.seq_len,
            }
        )
        return loss

    def _samples(self, step: int) -> list[dict[str, str]]:
        samples = sample_texts(
            self.model,
            self.tokenizer,
            self.phase.prompts,
            self.phase.sample_tokens,
            self.device,
            seed=self.cfg.seed,
        )
        text = "\n\n".join(f"**{s['prompt']}**{s['completion']}" for s in samples)
        self.metrics.log_text("samples", text, step)
        with (self.run_dir / "metrics" / f"{self.phase.name}.samples.jsonl").open("a") as fh:
            import json

            for s in samples:
                fh.write(json.dumps({"step": step, **s}) + "\n")
        return samples

    # ------------------------------------------------------------------ main

    def run(self) -> PhaseOutcome:
        cfg, phase, hooks = self.cfg, self.phase, self.hooks
        total = phase.total_steps
        existing = ckpt.latest_checkpoint(self.dir)
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
            )

        set_threads(cfg.train.threads)
        self.device = select_device(cfg.train.device)
        self.dtype = autocast_dtype(self.device, cfg.train.precision)
        self.model = build_model(cfg, cfg.seed + self.phase_idx)
        step, tokens = 0, 0
        state = None
        self.first_val_loss: float | None = None
        if existing is not None:
            ckpt.load_weights(existing.path, self.model)
            state = ckpt.load_trainer_state(existing.path)
            step, tokens = int(state["step"]), int(state["tokens"])
            fv = float(state.get("first_val_loss", -1.0))
            self.first_val_loss = fv if fv >= 0 else None
            hooks.log(f"[{phase.name}] resuming from {existing.path} (step {step}/{total})")
        elif self.init_from is not None:
            ckpt.load_weights(self.init_from, self.model)
            hooks.log(f"[{phase.name}] starting from {self.init_from}")
        self.model.to(self.device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, phase, self.device)
        self.loader = PackedBatches(
            self.train_shard,
            phase.seq_len,
            phase.micro_batch,
            seed=cfg.seed + 1000 * self.phase_idx,
        )
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.loader.load_state_dict(state["loader"])
            _set_rng_state(state["rng"], self.device)
        train_model = torch.compile(self.model) if cfg.train.compile else self.model

        self.metrics = MetricsLogger(
            self.run_dir / "metrics", phase.name, self.run_dir / "tensorboard", resume_step=step
        )
        flops_tok = flops_per_token(cfg.model, phase.seq_len)
        peak = peak_flops(self.device, self.dtype)
        params = [p for p in self.model.parameters() if p.requires_grad]
        last_ckpt = str(existing.path) if existing is not None else None
        val_loss = None
        samples: list[dict[str, str]] = []
        tok_per_s = None

        try:
            if step == 0 and self.first_val_loss is None:
                self.first_val_loss = self._evaluate(0, 0)
                hooks.log(f"[{phase.name}] initial val loss {self.first_val_loss:.4f}")
            bar = tqdm(
                total=total,
                initial=step,
                desc=phase.name,
                unit="step",
                disable=not cfg.train.progress,
                dynamic_ncols=True,
                leave=True,
            )
            t_last, tokens_last, loss_sum, loss_n = time.perf_counter(), tokens, None, 0
            t_phase = time.perf_counter()
            while step < total:
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
                    )
                lr = lr_at(step, total, phase.lr, phase.warmup_frac, phase.min_lr_ratio)
                set_lr(self.optimizer, lr)
                for _ in range(phase.grad_accum):
                    x, y = self.loader.next_batch()
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True)
                    with autocast_context(self.device, self.dtype):
                        _, loss = train_model(x, y)
                    (loss / phase.grad_accum).backward()
                    d = loss.detach()
                    loss_sum = d if loss_sum is None else loss_sum + d
                    loss_n += 1
                grad_norm = torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += phase.tokens_per_step
                bar.update(1)

                if step % cfg.train.log_every == 0 or step == total:
                    synchronize(self.device)
                    now = time.perf_counter()
                    mean_loss = float(loss_sum.item()) / max(1, loss_n)
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(
                            f"[{phase.name}] loss is {mean_loss} at step {step}; lower "
                            f"phases[{self.phase_idx}].lr or raise warmup_frac"
                        )
                    tok_per_s = (tokens - tokens_last) / max(1e-9, now - t_last)
                    mfu = tok_per_s * flops_tok / peak if peak else None
                    record = {
                        "step": step,
                        "tokens": tokens,
                        "loss": mean_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm.item()),
                        "tokens_per_s": tok_per_s,
                        "mfu": mfu,
                        "seq_len": phase.seq_len,
                        "elapsed_s": now - t_phase,
                    }
                    self.metrics.log(record)
                    bar.set_postfix(
                        loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:,.0f}"
                    )
                    hooks.on_progress(
                        {
                            "phase": phase.name,
                            "step": step,
                            "total_steps": total,
                            "tokens": tokens,
                            "loss": mean_loss,
                            "lr": lr,
                            "tokens_per_s": tok_per_s,
                            "last_checkpoint": last_ckpt,
                        }
                    )
                    t_last, tokens_last, loss_sum, loss_n = now, tokens, None, 0

                is_last = step == total
                if (phase.eval_every and step % phase.eval_every == 0) or is_last:
                    val_loss = self._evaluate(step, tokens)
                    hooks.log(
                        f"[{phase.name}] step {step}/{total} val loss {val_loss:.4f} "
                        f"(ppl {perplexity(val_loss):.1f})"
                    )
                    every = phase.sample_every or phase.eval_every
                    if is_last or (every and step % every == 0):
                        samples = self._samples(step)
                if is_last:
                    last_ckpt = str(
                        self._save(
                            step,
                            tokens,
                            final=True,
                            extra={"val_loss": val_loss, "first_val_loss": self.first_val_loss},
                        )
                    )
                elif phase.save_every and step % phase.save_every == 0:
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
        finally:
            self.metrics.close()
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
        )
