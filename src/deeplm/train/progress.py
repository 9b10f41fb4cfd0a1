"""Progress of the training loop: the per-step loss window, the training metrics records (loss,
LR, grad norm, tokens/s, MFU, context, micro-batch, frozen layers, peak memory), the tqdm bar, and
the orchestrator's ``on_progress`` callback.

Losses are summed as device tensors and read once per logged step (``train.log_every``), so the
loop does not wait on the device every micro-batch.

Time the loop spends on something other than training steps (the first step of a new graph
state, which compiles; evaluations; samples; checkpoints) is kept out of the window's tokens/s and
MFU and reported beside it: each record carries ``train_s`` (the window's training seconds) and
``compile_s`` / ``eval_s`` / ``samples_s`` / ``checkpoint_s`` where the window had any."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
        self._flops: dict[tuple[int, int], float] = {}  # (context, frozen layers) -> FLOPs
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
        self._excluded: dict[str, float] = {}
        self._excluded_tokens = 0

    def exclude(self, kind: str, seconds: float, tokens: int = 0) -> None:
        """Keep ``seconds`` (and the ``tokens`` trained in them) out of the window's throughput;
        the record reports them as ``<kind>_s``."""
        self._excluded[kind] = self._excluded.get(kind, 0.0) + seconds
        self._excluded_tokens += tokens

    @contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        """Time the block (the device synchronised at both ends) and :meth:`exclude` it."""
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.exclude(kind, time.perf_counter() - t0)

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
        train_s = self._now - self._t_last - sum(self._excluded.values())
        trained = tokens - self._tokens_last - self._excluded_tokens
        if train_s <= 0 or trained <= 0:  # the window was all compile/eval: its raw figure
            train_s, trained = self._now - self._t_last, tokens - self._tokens_last
        tok_per_s = trained / max(1e-9, train_s)
        self.tokens_per_s = tok_per_s
        shape = (seq_len, at["frozen_layers"])
        if shape not in self._flops:
            self._flops[shape] = flops_per_token(self.cfg.model, *shape)
        mfu = tok_per_s * self._flops[shape] / self.peak if self.peak else None
        record = self._record(at, loss, grad_norm, lr, tok_per_s, mfu)
        record["train_s"] = max(0.0, train_s)
        record.update({f"{kind}_s": secs for kind, secs in self._excluded.items()})
        self.metrics.log(record)
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
