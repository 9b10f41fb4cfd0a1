"""Forgetting across phases: how each phase's final model does on every earlier phase's
validation data, and warnings for a phase that raised an earlier phase's loss too much.

A run trains its phases in order, each from the previous phase's final checkpoint, so a later
phase can undo what an earlier one taught (a fine-tune on a small, different corpus is the usual
culprit). :func:`forgetting_matrix` evaluates the final checkpoint of every phase ``j`` on the
validation windows of every phase ``k <= j`` (the windows of the training loop's own
evaluations: ``evaluate_loss`` at the phase's full context, micro-batch and ``eval_batches``).
:func:`forgetting_warnings` flags each later phase that raised an earlier phase's loss above its
value at the end of that phase by more than ``margin`` nats (default
:data:`FORGETTING_MARGIN`); ``report.md`` and ``deeplm eval`` print them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deeplm.config import RunConfig
from deeplm.data.shards import Shard, is_shard_complete
from deeplm.eval.perplexity import evaluate_loss
from deeplm.export.loading import load_checkpoint
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import Tokenizer

# A later phase may raise an earlier phase's validation loss by at most this many nats (per
# token) before the report and ``deeplm eval`` warn about it.
FORGETTING_MARGIN = 0.1


def _val_shards(run_dir: Path, cfg: RunConfig, tok: Tokenizer) -> dict[str, Shard]:
    shards = {}
    for phase in cfg.phases:
        prefix = RunLayout(run_dir).shard(phase.name, "val")
        if is_shard_complete(prefix, tok.hash):
            shards[phase.name] = Shard.open(prefix, tok.hash)
    return shards


def forgetting_matrix(
    run_dir: Path,
    cfg: RunConfig,
    tok: Tokenizer,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """``{earlier phase: {phase whose final model was evaluated: val loss}}`` for every pair
    of phases ``k <= j`` that both have data and a final checkpoint."""
    finals = RunLayout(run_dir).final_checkpoints(cfg)
    shards = _val_shards(run_dir, cfg, tok)
    matrix: dict[str, dict[str, float]] = {p.name: {} for p in cfg.phases if p.name in shards}
    for j, later in enumerate(cfg.phases):
        if later.name not in finals:
            continue
        model = load_checkpoint(cfg, finals[later.name], device)
        for earlier in cfg.phases[: j + 1]:
            if earlier.name not in shards:
                continue
            seq_len = min(earlier.seq_len, cfg.model.max_seq_len)
            matrix[earlier.name][later.name] = evaluate_loss(
                model,
                shards[earlier.name],
                seq_len,
                earlier.micro_batch,
                earlier.eval_batches,
                device,
                dtype,
            )
    return matrix


def forgetting_warnings(
    matrix: dict[str, dict[str, float]], cfg: RunConfig, margin: float = FORGETTING_MARGIN
) -> list[dict[str, Any]]:
    """Each later phase that raised an earlier phase's val loss to more than ``margin`` above
    the loss at the end of the earlier phase (and above the loss before the later phase)."""
    order = [p.name for p in cfg.phases]
    out = []
    for earlier, row in matrix.items():
        if earlier not in row:
            continue
        own = row[earlier]
        before = own
        for later in order[order.index(earlier) + 1 :]:
            if later not in row:
                continue
            loss = row[later]
            if loss - own > margin and loss > before:
                out.append(
                    {
                        "phase": later,
                        "earlier": earlier,
                        "own_loss": own,
                        "before": before,
                        "loss": loss,
                        "rise": loss - own,
                        "margin": margin,
                    }
                )
            before = loss
    return out


def warning_line(w: dict[str, Any]) -> str:
    """One human line for a forgetting warning."""
    return (
        f"warning: phase {w['phase']!r} raised phase {w['earlier']!r}'s val loss to "
        f"{w['loss']:.4f} ({w['rise']:+.4f} nats since the end of {w['earlier']!r}, "
        f"{w['own_loss']:.4f}; margin {w['margin']:g}): it forgot what {w['earlier']!r} taught "
        "(see docs/playbook.md, Forgetting: replay, a lower LR, fewer steps)"
    )
