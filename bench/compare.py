#!/usr/bin/env python
"""Quality per token: train several models or recipes on the same shards for the same token
budget, then print one table of validation loss, grammar minimal-pair accuracy, tokens/s and
wall time (docs/depth-vs-width.md).

    deeplm prepare --preset 60m --run-dir runs/src          # tokenizer + shards, once
    python bench/compare.py --data runs/src --phase grammar --tokens 40_000_000 \\
        --candidate deep=60m --candidate wide=wide \\
        --candidate "deep-lr1e-3=60m,phases.0.lr=1e-3" --out runs/compare

A candidate is ``NAME=PRESET[,KEY=VALUE...]``: the preset's model and its first phase's recipe
(optimizer, learning rate, schedule, curriculum, freezing, batch), with ``--set``-style overrides
(keys as in ``deeplm run --set``; ``phases.0.*`` is the recipe). Every candidate reads the data
run's tokenizer and the chosen phase's shards, trains for ``--tokens`` tokens (``--set`` keys given
with ``--common`` apply to all), and is scored on the same validation windows at ``--eval-seq-len``
and on the whole grammar suite. Each candidate trains in its own folder under ``--out`` and
resumes there: run the same command again after an interruption and finished candidates are
only re-scored. The table goes to the terminal and, with ``--save NAME``, to
``bench/results/compare-NAME.json`` (``--json PATH``: anywhere) together with the command. Each
row keeps the candidate's overrides, its recipe, its validation-loss curve (every evaluation of
the training run: ``[tokens, val_loss]``) and the device's peak memory.

The anchor shards (``deeplm import``, docs/playbook.md) are the data every recipe figure in
``bench/NOTES.md`` is measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from deeplm.atomic import atomic_write_json
from deeplm.config import (
    apply_overrides,
    config_from_dict,
    preset_path,
    read_toml,
    resolve_extends,
)
from deeplm.data.shards import Shard
from deeplm.device import autocast_dtype, select_device
from deeplm.eval.grammar import evaluate_grammar
from deeplm.eval.perplexity import evaluate_loss
from deeplm.export.loading import load_checkpoint
from deeplm.model import count_parameters, describe
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.run.run_config import load_run_config
from deeplm.tokenizer import Tokenizer
from deeplm.train.trainer import PhaseTrainer, TrainHooks

RESULTS = Path(__file__).resolve().parent / "results"


def parse_candidate(spec: str) -> tuple[str, str, list[str]]:
    """``NAME=PRESET[,KEY=VALUE...]`` -> (name, preset, overrides)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--candidate {spec!r}: expected NAME=PRESET[,KEY=VALUE...]")
    preset, *overrides = _split_top_level(rest)
    return name, preset, overrides


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes (TOML values may hold commas)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def candidate_config(
    preset: str, overrides: list[str], data_cfg, phase_name: str, tokens: int, common: list[str]
):
    """One phase named like the data run's phase (so it reads those shards): the data run's
    tokenizer and vocabulary, the candidate preset's model and first-phase recipe."""
    path = preset_path(preset)
    d = resolve_extends(read_toml(path), path)
    data_phase = next(p for p in data_cfg.phases if p.name == phase_name)
    phase = dict(d["phases"][0])
    phase.update(
        name=phase_name,
        kind="pretrain",
        tokens=tokens,
        sources=[dataclasses.asdict(s) for s in data_phase.sources],
        val_fraction=data_phase.val_fraction,
    )
    d["phases"] = [phase]
    d["tokenizer"] = dataclasses.asdict(data_cfg.tokenizer)
    d.setdefault("model", {})["vocab_size"] = data_cfg.model.vocab_size
    d["train"] = dict(d.get("train", {}), progress=False)
    apply_overrides(d, [*common, *overrides])
    return config_from_dict(d, f"{path} (candidate)")


def copy_data(data_run: Path, run: Path, phase_name: str) -> None:
    """The candidate folder gets the data run's tokenizer and this phase's shards (copied: a
    few files, and a candidate must not depend on another folder staying put)."""
    tok = RunLayout(run).tokenizer
    if not tok.is_file():
        tok.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(RunLayout(data_run).tokenizer, tok)
    for split in ("train", "val"):
        src = RunLayout(data_run).shard(phase_name, split)
        dst = RunLayout(run).shard(phase_name, split)
        dst.parent.mkdir(parents=True, exist_ok=True)
        for f in src.parent.glob(src.name + ".*"):
            target = dst.parent / f.name
            if not target.exists():
                shutil.copy2(f, target)


RECIPE_KEYS = (
    "optimizer",
    "lr",
    "adamw_lr",
    "weight_decay",
    "schedule",
    "min_lr_ratio",
    "warmup_frac",
    "decay_frac",
    "muon_momentum",
    "muon_ns_steps",
    "muon_adjust_lr",
    "micro_batch",
    "grad_accum",
)


def val_curve(run: Path, phase: str) -> list[list[float]]:
    """``[tokens, val_loss]`` of every evaluation in the run's metrics (the last run's only)."""
    path = run / "metrics" / f"{phase}.jsonl"
    points: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("val_loss") is not None:
                points[int(rec["tokens"])] = float(rec["val_loss"])
    return [[t, v] for t, v in sorted(points.items())]


def peak_memory_gb(run: Path, phase: str) -> float | None:
    path = run / "metrics" / f"{phase}.jsonl"
    if not path.is_file():
        return None
    peaks = [
        json.loads(line).get("peak_memory_gb") for line in path.read_text().splitlines() if line
    ]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def train_and_score(name: str, cfg, data_run: Path, out: Path, args) -> dict:
    run = out / name
    phase = cfg.phases[0]
    copy_data(data_run, run, phase.name)
    tok = Tokenizer.load(RunLayout(run).tokenizer)
    train = Shard.open(RunLayout(run).shard(phase.name, "train"), tok.hash)
    val = Shard.open(RunLayout(run).shard(phase.name, "val"), tok.hash)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    last_print = [0.0]

    def progress(info: dict) -> None:
        if time.monotonic() - last_print[0] > args.print_every:
            last_print[0] = time.monotonic()
            loss = info.get("loss")
            print(
                f"  [{name}] step {info.get('step')}/{info.get('total_steps')} "
                f"loss {loss if loss is None else round(loss, 3)}",
                flush=True,
            )

    t0 = time.perf_counter()
    trainer = PhaseTrainer(cfg, 0, run, tok, train, val, hooks=TrainHooks(on_progress=progress))
    outcome = trainer.run()
    wall = time.perf_counter() - t0
    final = ckpt.latest_checkpoint(RunLayout(run).phase_checkpoints(0, phase.name))
    if final is None or not final.meta.get("final"):
        raise SystemExit(f"[{name}] no final checkpoint after training ({outcome.status})")
    device = select_device(cfg.train.device)
    dtype = autocast_dtype(device, cfg.train.precision)
    model = load_checkpoint(cfg, final.path, device)
    with torch.no_grad():
        val_loss = evaluate_loss(
            model, val, args.eval_seq_len, args.eval_batch, args.eval_batches, device, dtype
        )
        grammar = evaluate_grammar(model, tok, device, dtype)
    record = {
        "name": name,
        "model": describe(cfg.model),
        "parameters": count_parameters(cfg.model),
        "tokens": phase.tokens,
        "val_loss": val_loss,
        "grammar_accuracy": grammar["accuracy"],
        "grammar_by_category": {k: v["accuracy"] for k, v in grammar["categories"].items()},
        "tokens_per_s": outcome.tokens_per_s,
        "train_wall_s": None if outcome.skipped else wall,
        "stop_reason": outcome.stop_reason,
        "recipe": {k: getattr(phase, k) for k in RECIPE_KEYS},
        "curriculum": [dataclasses.asdict(c) for c in phase.curriculum],
        "freeze": [dataclasses.asdict(f) for f in phase.freeze],
        "model_config": dataclasses.asdict(cfg.model),
        "val_curve": val_curve(run, phase.name),
        "peak_memory_gb": peak_memory_gb(run, phase.name),
        "device": str(device),
    }
    timing = run / "compare-timing.json"
    if outcome.skipped and timing.is_file():  # re-scored: keep the training run's figures
        record.update(json.loads(timing.read_text()))
    elif not outcome.skipped:
        atomic_write_json(timing, {"train_wall_s": wall, "tokens_per_s": outcome.tokens_per_s})
    return record


def print_table(rows: list[dict]) -> None:
    head = "| candidate | params | val loss | grammar acc | tokens/s | train wall |"
    print("\n" + head + "\n|---|---|---|---|---|---|")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        wall = f"{r['train_wall_s']:.0f} s" if r["train_wall_s"] else "n/a"
        print(
            f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {r['val_loss']:.3f} | "
            f"{100 * r['grammar_accuracy']:.1f} % | {tps} | {wall} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a prepared run (deeplm prepare)")
    ap.add_argument("--phase", required=True, help="the data run's phase whose shards to use")
    ap.add_argument("--tokens", type=int, required=True, help="training tokens per candidate")
    ap.add_argument("--candidate", action="append", required=True, help="NAME=PRESET[,K=V...]")
    ap.add_argument("--common", action="append", default=[], help="K=V for every candidate")
    ap.add_argument("--out", type=Path, required=True, help="folder for the candidates' runs")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=50)
    ap.add_argument("--print-every", type=float, default=30.0, help="seconds between progress")
    ap.add_argument("--save", help="write bench/results/compare-SAVE.json")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    args = ap.parse_args(argv)
    data_cfg = _data_config(args.data)
    if args.phase not in [p.name for p in data_cfg.phases]:
        raise SystemExit(f"{args.data}: no phase {args.phase!r} in its config")
    for split in ("train", "val"):
        prefix = RunLayout(args.data).shard(args.phase, split)
        if not Path(f"{prefix}.bin").is_file():
            raise SystemExit(f"{prefix}.bin: missing; run `deeplm prepare` for {args.data} first")
    rows = []
    for spec in args.candidate:
        name, preset, overrides = parse_candidate(spec)
        cfg = candidate_config(preset, overrides, data_cfg, args.phase, args.tokens, args.common)
        print(f"[{name}] {describe(cfg.model)}; {args.tokens:,} tokens", flush=True)
        rows.append(train_and_score(name, cfg, args.data, args.out, args))
        r = rows[-1]
        r.update(preset=preset, overrides=[*args.common, *overrides])
        print(
            f"[{name}] val loss {r['val_loss']:.4f}, grammar {100 * r['grammar_accuracy']:.1f} %",
            flush=True,
        )
    print_table(rows)
    paths = [RESULTS / f"compare-{args.save}.json"] if args.save else []
    paths += [args.json] if args.json else []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_json(path, {"command": command, "torch": torch.__version__, "rows": rows})
        print(f"results: {path}")
    return 0


def _data_config(run: Path):
    """The data run's effective config (``config.json``, written by ``deeplm prepare``)."""
    try:
        return load_run_config(run)
    except FileNotFoundError:
        raise SystemExit(
            f"{run / 'config.json'}: not found; prepare the data run first (deeplm prepare)"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
