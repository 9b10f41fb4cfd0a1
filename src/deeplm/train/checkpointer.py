"""The phase's checkpointer: where its checkpoints live, which one to resume from, when to save
(every ``save_every`` steps; a kept one before each freeze; the final one), what a checkpoint's
metadata says, and retention (``keep_last`` periodic checkpoints; kept and final ones stay).
With a plateau stop configured, it also keeps the weights of the best evaluation so far
(``best-<step>``, one at a time, never resumed from; removed when the phase ends).

The file format is :mod:`deeplm.run.checkpoint`'s; what goes into the trainer state is the
trainer's (model, optimizer, loader, RNG and its components' state)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from deeplm.config import PhaseConfig, RunConfig
from deeplm.run import checkpoint as ckpt
from deeplm.tokenizer import Tokenizer


class Checkpointer:
    """Checkpoints of phase ``phase_idx`` in ``folder``. ``last`` is the newest one this run
    wrote or resumed from (a path string, None before any)."""

    def __init__(
        self,
        cfg: RunConfig,
        phase: PhaseConfig,
        phase_idx: int,
        folder: Path,
        tokenizer: Tokenizer,
        log: Callable[[str], None],
    ):
        self.cfg = cfg
        self.phase = phase
        self.phase_idx = phase_idx
        self.dir = folder
        self.tokenizer = tokenizer
        self.log = log
        self.last: str | None = None

    # ------------------------------------------------------------------ when

    def should_save(self, step: int) -> bool:
        """A periodic checkpoint after optimizer step ``step`` (``save_every``; 0 = never)."""
        every = self.phase.save_every
        return bool(every and step % every == 0)

    # ------------------------------------------------------------------ writing

    def path(self, step: int) -> Path:
        return ckpt.step_dir(self.dir, step)

    def meta(self, tokens: int, final: bool, extra: dict | None = None) -> dict[str, Any]:
        """``meta.json`` of a checkpoint (final ones are kept and carry no LoRA adapters)."""
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

    def write(self, step: int, model: nn.Module, state: dict[str, Any], meta: dict) -> Path:
        """Write one checkpoint atomically, then apply retention."""
        path = ckpt.save_checkpoint(self.dir, step, model, state, meta)
        ckpt.apply_retention(self.dir, self.phase.keep_last)
        return path

    def save_best(self, step: int, model: nn.Module, val_loss: float) -> Path:
        """The weights after ``step``, the best evaluation so far; older best weights go."""
        meta = self.meta(0, False, {"best_val_loss": val_loss})
        folder = ckpt.best_dir(self.dir, step)
        path = ckpt.save_checkpoint(self.dir, step, model, {"best_step": step}, meta, folder)
        self.drop_best(keep=path)
        return path

    def best(self, step: int) -> Path | None:
        """The kept best weights of ``step`` when complete and intact (else None)."""
        path = ckpt.best_dir(self.dir, step)
        try:
            ckpt.verify(path)
        except ckpt.CheckpointError:
            return None
        return path

    def drop_best(self, keep: Path | None = None) -> None:
        """Remove kept best weights (all but ``keep``)."""
        for path in self.dir.glob("best-*"):
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def keep(self, path: Path, reason: str) -> None:
        """Exempt ``path`` from retention (e.g. the weights just before a freeze)."""
        ckpt.mark_keep(path, reason)

    # ------------------------------------------------------------------ resuming

    def latest(self) -> ckpt.Checkpoint | None:
        """The newest complete checkpoint (rollbacks return to it)."""
        return ckpt.latest_checkpoint(self.dir)

    def latest_compatible(self, init_from: Path | None) -> ckpt.Checkpoint | None:
        """The newest good checkpoint of this phase made with this run's tokenizer; checkpoints
        of another tokenizer (token ids mean something else) are moved aside, never resumed.
        Raises when ``init_from`` (the previous phase's weights) has another tokenizer."""
        known = {p for p, _ in ckpt.corrupt_checkpoints(self.dir)}
        while (latest := ckpt.latest_checkpoint(self.dir)) is not None:
            self._log_corrupt(known, latest.path)
            if latest.meta.get("tokenizer_hash") in (None, self.tokenizer.hash):
                return latest
            aside = latest.path.with_name(latest.path.name + ".other-tokenizer")
            latest.path.rename(aside)
            self.log(
                f"[{self.phase.name}] {latest.path} was made with another tokenizer; "
                f"moved aside to {aside.name}"
            )
        if init_from is not None:
            meta = ckpt.read_meta(init_from)
            if meta.get("tokenizer_hash") not in (None, self.tokenizer.hash):
                raise ckpt.CheckpointError(
                    f"{init_from} was trained with another tokenizer than this run's "
                    f"({str(meta.get('tokenizer_hash'))[:12]} vs {self.tokenizer.hash[:12]})"
                )
        return None

    def _log_corrupt(self, known: set[Path], using: Path) -> None:
        """Log the checkpoints found corrupt (and moved aside) since ``known`` was taken."""
        for path, reason in ckpt.corrupt_checkpoints(self.dir):
            if path not in known:
                known.add(path)
                self.log(
                    f"[{self.phase.name}] checkpoint {path.name.removesuffix('.corrupt')} is "
                    f"corrupt ({reason}); moved aside to {path.name}, resuming from {using.name}"
                )
