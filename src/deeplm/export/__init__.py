"""Model input/output: Hugging Face export and import, and loading a model for inference.

:func:`load_model` is what ``deeplm generate``, ``chat``, ``eval`` and ``serve`` use to get a
model and its tokenizer from any of: a run directory (its newest checkpoint), a checkpoint folder
(inside a run directory), or an export folder written by :func:`~deeplm.export.hf.export_hf`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deeplm.config import ModelConfig, RunConfig
from deeplm.export.hf import ExportError, export_hf, import_hf, is_hf_folder
from deeplm.model.transformer import Transformer
from deeplm.tokenizer import Tokenizer

__all__ = [
    "ExportError",
    "LoadedModel",
    "export_hf",
    "import_hf",
    "is_hf_folder",
    "load_model",
    "run_dir_of_checkpoint",
]


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on ``device``) with its tokenizer."""

    model: Transformer
    tokenizer: Tokenizer
    cfg: ModelConfig
    name: str  # a short id: the run's name, or the export folder's name
    source: Path  # the checkpoint or export folder the weights came from
    device: torch.device
    run_cfg: RunConfig | None = None
    run_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. corrupt checkpoints skipped


def run_dir_of_checkpoint(checkpoint: Path) -> Path | None:
    """``<run>/checkpoints/<phase>/step-N`` -> ``<run>`` when it holds a run's config.json."""
    p = Path(checkpoint).resolve()
    if len(p.parents) >= 3 and (p.parents[2] / "config.json").is_file():
        return p.parents[2]
    return None


def load_model(
    run_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    hf_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
) -> LoadedModel:
    """Load a model from a run directory, a checkpoint, or an export folder (exactly one source;
    ``checkpoint`` may come with its ``run_dir``). Checks that checkpoint and tokenizer match."""
    from deeplm.train import checkpoint as ckpt
    from deeplm.train.device import select_device
    from deeplm.train.trainer import build_model
    from deeplm.workflows.activities import (
        corrupt_checkpoint_warnings,
        latest_model_checkpoint,
        tokenizer_path,
    )
    from deeplm.workflows.local import load_run_config

    dev = device if isinstance(device, torch.device) else select_device(device)
    if hf_dir is not None:
        if run_dir is not None or checkpoint is not None:
            raise ValueError("give an export folder, or a run directory / checkpoint, not both")
        model, tok = import_hf(hf_dir, device=dev)
        path = Path(hf_dir)
        return LoadedModel(model, tok, model.cfg, path.resolve().name, path, dev)
    if (
        checkpoint is not None
        and is_hf_folder(checkpoint)
        and not ckpt.is_complete(Path(checkpoint))
    ):
        return load_model(hf_dir=checkpoint, device=dev)
    if run_dir is None and checkpoint is not None:
        run_dir = run_dir_of_checkpoint(Path(checkpoint))
        if run_dir is None:
            raise FileNotFoundError(
                f"{checkpoint}: cannot find its run directory; pass --run-dir as well"
            )
    if run_dir is None:
        raise ValueError("give a run directory (--run-dir), a checkpoint or an export folder")
    rdir = Path(run_dir)
    cfg = load_run_config(rdir)
    path = Path(checkpoint) if checkpoint is not None else latest_model_checkpoint(rdir, cfg)
    if path is None:
        raise FileNotFoundError(f"{rdir}: no checkpoint yet; train first (deeplm run)")
    tok = Tokenizer.load(tokenizer_path(rdir))
    meta = ckpt.read_meta(path)
    if meta.get("tokenizer_hash") not in (None, tok.hash):
        raise RuntimeError(f"{path} was trained with another tokenizer than {rdir}'s")
    model = build_model(cfg, cfg.seed)
    model.set_grad_checkpointing(False)
    ckpt.load_weights(path, model)
    model.to(dev).eval()
    notes = corrupt_checkpoint_warnings(rdir, cfg)
    if notes and checkpoint is None:
        notes.append(f"using the newest intact checkpoint instead: {path}")
    return LoadedModel(
        model, tok, cfg.model, cfg.name, path, dev, run_cfg=cfg, run_dir=rdir, warnings=notes
    )
