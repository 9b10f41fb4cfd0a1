"""Loading a model for inference: the one place that turns a run directory, a checkpoint or an
export folder into a model in eval mode with its tokenizer (like nanochat's checkpoint manager).

:func:`load_model` is what ``deeplm generate``, ``chat``, ``eval``, ``export`` and ``serve`` use;
:func:`load_checkpoint` builds a run's model and loads one checkpoint's weights (the pipeline's
evaluation and the forgetting matrix load each phase's final checkpoint with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deeplm.config import ModelConfig, RunConfig
from deeplm.device import select_device
from deeplm.export.hf import import_hf, is_hf_folder
from deeplm.model import Transformer, build_model
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.run.run_config import load_run_config
from deeplm.tokenizer import Tokenizer


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


def load_checkpoint(cfg: RunConfig, path: Path, device: torch.device) -> Transformer:
    """The run's model (built as training builds it) with ``path``'s weights (verified), on
    ``device``, in eval mode, without gradient checkpointing."""
    model = build_model(cfg, cfg.seed)
    model.set_grad_checkpointing(False)
    ckpt.load_weights(path, model)
    return model.to(device).eval()


def load_model(
    run_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    hf_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
) -> LoadedModel:
    """Load a model from a run directory (its newest checkpoint), a checkpoint, or an export
    folder (exactly one source; ``checkpoint`` may come with its ``run_dir``). Checks that
    checkpoint and tokenizer match."""
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
        found = RunLayout.of_checkpoint(checkpoint)
        if found is None:
            raise FileNotFoundError(
                f"{checkpoint}: cannot find its run directory; pass --run-dir as well"
            )
        run_dir = found.root
    if run_dir is None:
        raise ValueError("give a run directory (--run-dir), a checkpoint or an export folder")
    layout = RunLayout(Path(run_dir))
    cfg = load_run_config(layout.root)
    path = Path(checkpoint) if checkpoint is not None else layout.latest_checkpoint(cfg)
    if path is None:
        raise FileNotFoundError(f"{layout.root}: no checkpoint yet; train first (deeplm run)")
    tok = Tokenizer.load(layout.tokenizer)
    meta = ckpt.read_meta(path)
    if meta.get("tokenizer_hash") not in (None, tok.hash):
        raise RuntimeError(f"{path} was trained with another tokenizer than {layout.root}'s")
    model = load_checkpoint(cfg, path, dev)
    notes = layout.corrupt_checkpoint_warnings(cfg)
    if notes and checkpoint is None:
        notes.append(f"using the newest intact checkpoint instead: {path}")
    return LoadedModel(
        model, tok, cfg.model, cfg.name, path, dev, run_cfg=cfg, run_dir=layout.root, warnings=notes
    )
