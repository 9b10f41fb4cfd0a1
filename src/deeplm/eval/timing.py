"""Where a phase's training time went, from its metrics records (``metrics/<phase>.jsonl``).

The training loop (:mod:`deeplm.train.progress`) logs, per window of ``train.log_every`` steps,
the seconds spent in training steps (``train_s``) and apart from them: ``compile_s`` (the first
step of each graph state: the loop's start, a new context, a new frozen-layer count), ``eval_s``,
``samples_s`` and ``checkpoint_s``. :func:`phase_timing` adds those up for one phase, overall and
per stage of its curriculum (context, frozen layers), with tokens/s and MFU over the training
seconds alone and the peak device memory. Records of runs made before these fields existed fall
back to the wall time between records (then compile, evaluation and checkpoints are inside the
training time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deeplm.config import RunConfig
from deeplm.eval.report import read_jsonl
from deeplm.run.layout import RunLayout

OVERHEADS = ("compile", "eval", "samples", "checkpoint")


def _empty() -> dict[str, float]:
    return {"train_s": 0.0, "tokens": 0.0, "mfu_s": 0.0}


def _add(acc: dict[str, float], seconds: float, tokens: float, mfu: float | None) -> None:
    acc["train_s"] += seconds
    acc["tokens"] += tokens
    acc["mfu_s"] += (mfu or 0.0) * seconds


def _rates(acc: dict[str, float]) -> dict[str, float | None]:
    secs = acc["train_s"]
    return {
        "train_s": secs,
        "tokens": int(round(acc["tokens"])),
        "tokens_per_s": acc["tokens"] / secs if secs > 0 else None,
        "mfu": acc["mfu_s"] / secs if secs > 0 and acc["mfu_s"] > 0 else None,
    }


def phase_timing(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Training seconds, overheads, tokens/s, MFU and peak memory of one phase's records, with
    ``stages``: one entry per (context, frozen layers) in the order trained. None: no records."""
    total, stages = _empty(), {}
    overheads = dict.fromkeys(OVERHEADS, 0.0)
    peak, prev_elapsed = None, 0.0
    for r in records:
        if "loss" not in r or "tokens_per_s" not in r:
            continue
        elapsed = float(r.get("elapsed_s") or 0.0)
        seconds = r.get("train_s")
        if seconds is None:  # an older run: the wall time since the previous record
            seconds = elapsed - prev_elapsed if elapsed >= prev_elapsed else elapsed
        prev_elapsed = elapsed
        tokens = float(r["tokens_per_s"] or 0.0) * seconds
        key = (int(r.get("seq_len") or 0), int(r.get("frozen_layers") or 0))
        _add(total, seconds, tokens, r.get("mfu"))
        _add(stages.setdefault(key, _empty()), seconds, tokens, r.get("mfu"))
        for kind in OVERHEADS:
            overheads[kind] += float(r.get(f"{kind}_s") or 0.0)
        if r.get("peak_memory_gb") is not None:
            peak = max(peak or 0.0, float(r["peak_memory_gb"]))
    if not stages:
        return None
    return {
        **_rates(total),
        **{f"{kind}_s": secs for kind, secs in overheads.items()},
        "peak_memory_gb": peak,
        "stages": [
            {"seq_len": seq, "frozen_layers": frozen, **_rates(acc)}
            for (seq, frozen), acc in stages.items()
        ],
    }


def training_timing(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """:func:`phase_timing` of every phase of the run that has metrics, by phase name."""
    metrics = RunLayout(run_dir).metrics_dir
    out = {}
    for phase in cfg.phases:
        timing = phase_timing(read_jsonl(metrics / f"{phase.name}.jsonl"))
        if timing is not None:
            out[phase.name] = timing
    return out
