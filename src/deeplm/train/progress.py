"""Progress of the training loop: the per-step loss window, the training metrics records (loss,
LR, grad norm, tokens/s, MFU, context, micro-batch, frozen layers, peak memory), the tqdm bar, and
the orchestrator's ``on_progress`` callback.

Losses are summed as device tensors and read once per logged step (``train.log_every``), so the
loop does not wait on the device every micro-batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from deeplm.config import PhaseConfig, RunConfig
from deeplm.device import peak_flops, peak_memory_bytes, synchronize
from deeplm.model import flops_per_token
from deeplm.train.metrics import MetricsLogger


class ProgressReporter:
    """The loss window since the last logged step and everything reported about it.

    ``weighted``: rare-token weighting is on, so records also carry ``loss_unweighted``;
    ``show``: draw the tqdm bar (``train.progress``, rank 0)."""

    def __init__(
        self,
        cfg: RunConfig,
        phase: PhaseConfig,
        device: torch.device,
        dtype: torch.dtype | None,
        metrics: MetricsLogger,
        on_progress: Callable[[dict[str, Any]], None],
        step: int,
        tokens: int,
        weighted: bool,
        show: bool,
    ):
        self.cfg, self.phase, self.device = cfg, phase, device
        self.metrics = metrics
        self.on_progress = on_progress
        self.weighted = weighted
        self.peak = peak_flops(device, dtype)
        self.tokens_per_s: float | None = None
        self._flops: dict[int, float] = {}
        self.bar = tqdm(
            total=phase.total_steps,
            initial=step,
            desc=phase.name,
            unit="step",
            disable=not show,
            dynamic_ncols=True,
        )
        self._t_phase = time.perf_counter()
        self._open_window(time.perf_counter(), tokens)

    def _open_window(self, now: float, tokens: int) -> None:
        self._t_last, self._tokens_last = now, tokens
        self._loss_sum: torch.Tensor | None = None
        self._unw_sum: torch.Tensor | None = None
        self._n = 0
        self._now = now

    def add(self, loss: torch.Tensor, unweighted: torch.Tensor) -> None:
        """Count one micro-batch's losses into the window (no device sync)."""
        d, u = loss.detach(), unweighted.detach()
        self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
        self._unw_sum = u if self._unw_sum is None else self._unw_sum + u
        self._n += 1

    def advance(self) -> None:
        """One optimizer step done."""
        self.bar.update(1)

    def should_log(self, step: int) -> bool:
        """Every ``train.log_every`` optimizer steps and at the phase's last step."""
        return step % self.cfg.train.log_every == 0 or step == self.phase.total_steps

    def window(self, grad_norm: torch.Tensor) -> tuple[float, float]:
        """(mean loss of the window, the last step's grad norm), read from the device."""
        synchronize(self.device)
        self._now = time.perf_counter()
        assert self._loss_sum is not None
        return float(self._loss_sum.item()) / max(1, self._n), float(grad_norm.item())

    def report(self, at: dict[str, Any], loss: float, grad_norm: float, lr: float) -> None:
        """Log the window ending at ``at`` (``step``, ``tokens``, ``seq_len``, ``micro_batch``,
        ``frozen_layers``, ``last_checkpoint``) and open the next one."""
        step, tokens, seq_len = at["step"], at["tokens"], at["seq_len"]
        tok_per_s = (tokens - self._tokens_last) / max(1e-9, self._now - self._t_last)
        self.tokens_per_s = tok_per_s
        if seq_len not in self._flops:
            self._flops[seq_len] = flops_per_token(self.cfg.model, seq_len)
        mfu = tok_per_s * self._flops[seq_len] / self.peak if self.peak else None
        self.metrics.log(self._record(at, loss, grad_norm, lr, tok_per_s, mfu))
        self.bar.set_postfix(
            loss=f"{loss:.3f}",
            lr=f"{lr:.2e}",
            T=seq_len,
            frozen=at["frozen_layers"],
            tok_s=f"{tok_per_s:,.0f}",
        )
        self.on_progress(
            {
                "phase": self.phase.name,
                "step": step,
                "total_steps": self.phase.total_steps,
                "tokens": tokens,
                "loss": loss,
                "lr": lr,
                "seq_len": seq_len,
                "frozen_layers": at["frozen_layers"],
                "tokens_per_s": tok_per_s,
                "last_checkpoint": at["last_checkpoint"],
            }
        )
        self._open_window(self._now, tokens)

    def _record(
        self, at: dict[str, Any], loss: float, gn: float, lr: float, tps: float, mfu: float | None
    ) -> dict[str, Any]:
        record = {
            "step": at["step"],
            "tokens": at["tokens"],
            "loss": loss,
            "lr": lr,
            "grad_norm": gn,
            "tokens_per_s": tps,
            "mfu": mfu,
            "seq_len": at["seq_len"],
            "micro_batch": at["micro_batch"],
            "frozen_layers": at["frozen_layers"],
            "elapsed_s": self._now - self._t_phase,
        }
        mem = peak_memory_bytes(self.device)
        if mem:
            record["peak_memory_gb"] = mem / 2**30
        if self.weighted:
            assert self._unw_sum is not None
            record["loss_unweighted"] = float(self._unw_sum.item()) / max(1, self._n)
        return record

    def saved(self, step: int, tokens: int, checkpoint: str) -> None:
        """Tell the orchestrator about a periodic checkpoint."""
        self.on_progress(
            {
                "phase": self.phase.name,
                "step": step,
                "total_steps": self.phase.total_steps,
                "tokens": tokens,
                "last_checkpoint": checkpoint,
            }
        )

    def restart(self, step: int, tokens: int) -> None:
        """After a rollback to ``step``: the bar moves back and the window starts empty."""
        self.bar.reset(total=self.phase.total_steps)
        self.bar.update(step)
        self._open_window(time.perf_counter(), tokens)

    def close(self) -> None:
        self.bar.close()
