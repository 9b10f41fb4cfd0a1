"""Checkpoint folders: atomic save, verified load, discovery and retention (the on-disk format
of a run's checkpoints; :class:`~deeplm.run.layout.RunLayout` says where they live).

A checkpoint is a folder ``<phase_dir>/step-NNNNNNN/`` holding ``model.safetensors`` (weights),
``trainer.pt`` (optimizer, data cursor, RNG, step, tokens — loadable with
``torch.load(weights_only=True)``), ``meta.json`` and, written last, ``DONE`` with the sha256 of
every file. It is assembled in a temporary folder and renamed into place, so a folder without a
valid ``DONE`` never counts. Retention keeps the newest ``keep_last`` periodic checkpoints of a
phase plus every checkpoint whose meta says ``keep`` (phase-final, pre-freeze).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from deeplm.atomic import atomic_write_text, fsync_dir, sha256_file

WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
META = "meta.json"
DONE = "DONE"


class DiskFullError(RuntimeError):
    """The disk filled up while writing; what was written before is intact."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted (the message names the file)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def step_dir(phase_dir: Path, step: int) -> Path:
    return phase_dir / f"step-{step:07d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def best_dir(phase_dir: Path, step: int) -> Path:
    """The weights of the best validation loss so far, reached at ``step`` (a plateau stop
    ends the phase with them); never a resume point."""
    return phase_dir / f"best-{step:07d}"


def save_checkpoint(
    phase_dir: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    folder: Path | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically and return its folder
    (``folder``, default :func:`step_dir`)."""
    final = folder or step_dir(phase_dir, step)
    if is_complete(final):
        return final
    phase_dir.mkdir(parents=True, exist_ok=True)
    tmp = phase_dir / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, model, trainer_state, meta, step)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"{phase_dir}: no space left on the device while writing the checkpoint of step "
                f"{step}; the earlier checkpoints are intact. Free some space (or lower "
                "keep_last) and run the same command again"
            ) from exc
        raise
    if final.exists():  # an incomplete leftover of an earlier crash
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(phase_dir)
    return final


def _write_files(
    tmp: Path, model: nn.Module, trainer_state: dict[str, Any], meta: dict[str, Any], step: int
) -> None:
    save_model(_unwrap(model), str(tmp / WEIGHTS))
    torch.save(trainer_state, tmp / TRAINER_STATE)
    (tmp / META).write_text(json.dumps(meta | {"step": step}, indent=2, sort_keys=True))
    digests = {}
    for name in (WEIGHTS, TRAINER_STATE, META):
        _fsync_file(tmp / name)
        digests[name] = sha256_file(tmp / name)
    (tmp / DONE).write_text(json.dumps(digests, indent=2, sort_keys=True))
    _fsync_file(tmp / DONE)
    fsync_dir(tmp)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def is_complete(path: Path) -> bool:
    return (path / DONE).is_file() and all(
        (path / n).is_file() for n in (WEIGHTS, TRAINER_STATE, META)
    )


def verify(path: Path) -> None:
    """Check every file of a checkpoint against the digests in DONE; raise CheckpointError."""
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no DONE marker or missing files)")
    try:
        digests = json.loads((path / DONE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / DONE}: unreadable ({exc})") from None
    for name, digest in digests.items():
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path / name}: sha256 mismatch (corrupted checkpoint)")


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def list_checkpoints(phase_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a phase, oldest first."""
    if not phase_dir.is_dir():
        return []
    out = []
    for p in sorted(phase_dir.glob("step-*")):
        if p.is_dir() and is_complete(p):
            try:
                out.append(Checkpoint(p, int(p.name.split("-")[1]), read_meta(p)))
            except (ValueError, json.JSONDecodeError):
                continue
    return out


def latest_checkpoint(phase_dir: Path, verify_files: bool = True) -> Checkpoint | None:
    """The newest checkpoint that verifies; a corrupted one is moved aside and skipped."""
    for ckpt in reversed(list_checkpoints(phase_dir)):
        if not verify_files:
            return ckpt
        try:
            verify(ckpt.path)
            return ckpt
        except CheckpointError as exc:
            move_aside_corrupt(ckpt.path, str(exc))
    return None


CORRUPT_NOTE = "CORRUPT"


def move_aside_corrupt(path: Path, reason: str) -> Path:
    """Rename a corrupted checkpoint folder to ``<name>.corrupt`` (replacing an older one) and
    note ``reason`` in it, so :func:`corrupt_checkpoints` can tell later why it is not used."""
    aside = path.with_name(path.name + ".corrupt")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    atomic_write_text(aside / CORRUPT_NOTE, reason + "\n")
    return aside


def corrupt_checkpoints(phase_dir: Path) -> list[tuple[Path, str]]:
    """Checkpoints of a phase moved aside as corrupted, oldest first, with the reason."""
    if not phase_dir.is_dir():
        return []
    out = []
    for p in sorted(phase_dir.glob("step-*.corrupt")):
        note = p / CORRUPT_NOTE
        reason = note.read_text(encoding="utf-8").strip() if note.is_file() else "corrupted"
        out.append((p, reason))
    return out


def load_weights(path: Path, model: nn.Module, verify_files: bool = True) -> None:
    if verify_files:
        verify(path)
    missing, unexpected = load_model(_unwrap(model), str(path / WEIGHTS), strict=True)
    if missing or unexpected:  # strict=True raises; kept for clarity
        raise CheckpointError(f"{path}: weights do not match the model")


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


KEEP = "KEEP"


def mark_keep(path: Path, reason: str) -> None:
    """Protect a complete checkpoint from retention (a ``KEEP`` file beside its files; it is not
    part of the checkpoint's digests, so marking never touches the checkpoint itself)."""
    atomic_write_text(path / KEEP, reason + "\n")


def is_kept(ckpt: Checkpoint) -> bool:
    return bool(ckpt.meta.get("keep")) or (ckpt.path / KEEP).is_file()


def apply_retention(phase_dir: Path, keep_last: int) -> list[Path]:
    """Delete old periodic checkpoints; never those marked ``keep`` (final, pre-freeze)."""
    periodic = [c for c in list_checkpoints(phase_dir) if not is_kept(c)]
    doomed = periodic[:-keep_last] if keep_last > 0 else periodic[:-1]
    removed = []
    for ckpt in doomed:
        shutil.rmtree(ckpt.path, ignore_errors=True)
        removed.append(ckpt.path)
    for pattern in (".step-*.tmp-*", ".best-*.tmp-*"):  # of writers killed mid-write
        for leftover in phase_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed
