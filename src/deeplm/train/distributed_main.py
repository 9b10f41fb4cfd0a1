"""Worker entry point of a data-parallel train stage: one torchrun process per device.

    torchrun --nproc-per-node 2 -m deeplm.train.distributed_main RUN_DIR PHASE_IDX [--config F]

Every rank trains phase ``PHASE_IDX`` of the run in ``RUN_DIR`` with
:func:`~deeplm.train.distributed.distributed_trainer`. The config is ``--config`` (the
launching activity writes the effective one there) or the run's ``config.json``; ``PHASE_IDX``
may be ``next``: the first phase without a final checkpoint.

The other nodes of a multi-node job run, outside torchrun (docs/distributed.md):

    python -m deeplm.train.distributed_main RUN_DIR follow --config CFG.toml|json --node-rank K

which waits for the shards, then starts this node's torchrun for each phase in turn (node 0's
pipeline starts the same jobs) until every phase has its final checkpoint.

Rank 0 prints progress and events as marked JSON lines for the launcher (which alone writes the
StateDB), and writes ``result.json`` (the phase outcome) into the phase's ``dist`` folder. A
``STOP`` file there, or SIGTERM, asks the ranks to checkpoint and stop at the next step.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from deeplm.atomic import atomic_write_json
from deeplm.config import RunConfig, config_from_json, config_to_json, load_config
from deeplm.data.shards import Shard
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import Tokenizer
from deeplm.train.distributed import (
    RESULT_FILE,
    STOP_FILE,
    dist_dir,
    distributed_trainer,
    emit,
    init_distributed,
    install_sigterm_stop,
    launch_env,
    teardown,
    torchrun_command,
)
from deeplm.train.trainer import TrainHooks


def next_phase(run_dir: Path, cfg: RunConfig) -> int | None:
    """The first phase without a final checkpoint (None when all are done)."""
    for i, phase in enumerate(cfg.phases):
        latest = ckpt.latest_checkpoint(
            RunLayout(run_dir).phase_checkpoints(i, phase.name), verify_files=False
        )
        if latest is None or not latest.meta.get("final"):
            return i
    return None


def _load(path: Path) -> RunConfig:
    if path.suffix == ".toml":
        return load_config(config_file=path)
    return config_from_json(path.read_text(encoding="utf-8"))


def follow(run_dir: Path, cfg: RunConfig, cfg_path: Path, poll_s: float = 10.0) -> int:
    """A non-zero node of a multi-node job: run this node's torchrun for each phase in turn."""
    layout = RunLayout(run_dir)
    while True:
        idx = next_phase(run_dir, cfg)
        if idx is None:
            print("[follow] every phase has its final checkpoint", flush=True)
            return 0
        phase = cfg.phases[idx]
        ready = layout.tokenizer.is_file() and all(
            Path(f"{layout.shard(phase.name, s)}.bin").is_file() for s in ("train", "val")
        )
        if ready:
            cmd = torchrun_command(cfg.train, [str(run_dir), str(idx), "--config", str(cfg_path)])
            print(f"[follow] phase {phase.name}: {shlex.join(cmd)}", flush=True)
            rc = subprocess.run(cmd, env=launch_env()).returncode
            if rc == 0:
                continue
            print(f"[follow] torchrun exited with {rc}; waiting for node 0 to restart", flush=True)
        time.sleep(poll_s)


def _init_from(layout: RunLayout, cfg: RunConfig, idx: int) -> Path | None:
    """The previous phase's final checkpoint (None for the first phase)."""
    if idx == 0:
        return None
    prev = cfg.phases[idx - 1]
    folder = layout.phase_checkpoints(idx - 1, prev.name)
    latest = ckpt.latest_checkpoint(folder, verify_files=False)
    if latest is None or not latest.meta.get("final"):
        raise RuntimeError(
            f"phase {cfg.phases[idx].name!r} needs the final checkpoint of {prev.name!r}"
        )
    return latest.path


def _rank_hooks(folder: Path, sigterm: dict[str, bool]) -> TrainHooks:
    """Rank 0 → launcher: progress and events as marked lines; a stop is SIGTERM or STOP."""

    def should_stop() -> bool:
        return sigterm["stop"] or (folder / STOP_FILE).exists()

    return TrainHooks(
        on_progress=lambda info: emit("progress", info),
        should_stop=should_stop,
        log=lambda msg: print(msg, flush=True),
        on_event=lambda kind, msg, data: emit("event", {"type": kind, "msg": msg, "data": data}),
    )


def train_rank(
    run_dir: Path, cfg: RunConfig, idx: int, is_main: bool, sigterm: dict[str, bool]
) -> None:
    """Train phase ``idx`` on this rank; rank 0 writes ``result.json`` (the outcome, or the
    error)."""
    layout = RunLayout(run_dir)
    phase = cfg.phases[idx]
    folder = dist_dir(run_dir, idx, phase)
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(layout.tokenizer)
    train_shard = Shard.open(layout.shard(phase.name, "train"), tok.hash)
    val_shard = Shard.open(layout.shard(phase.name, "val"), tok.hash)
    init_from = _init_from(layout, cfg, idx)
    hooks = _rank_hooks(folder, sigterm)
    trainer = distributed_trainer(
        cfg, idx, run_dir, tok, train_shard, val_shard, init_from=init_from, hooks=hooks
    )
    try:
        outcome = trainer.run()
    except Exception as exc:
        if is_main:
            atomic_write_json(
                folder / RESULT_FILE,
                {"status": "failed", "error": f"{type(exc).__name__}: {exc}"},
            )
        raise
    if is_main:
        atomic_write_json(folder / RESULT_FILE, dataclasses.asdict(outcome))


def _follow_main(run_dir: Path, cfg: RunConfig, node_rank: int | None) -> int:
    """``follow``: this node's rank (argument over config), the resolved config written."""
    if node_rank is not None:
        cfg.train.node_rank = node_rank
    cfg.validate()
    resolved = RunLayout(run_dir).follow_config(cfg.train.node_rank)
    resolved.parent.mkdir(parents=True, exist_ok=True)
    resolved.write_text(config_to_json(cfg), encoding="utf-8")
    return follow(run_dir, cfg, resolved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("phase", help="phase index, 'next', or 'follow' (outside torchrun)")
    ap.add_argument(
        "--config", type=Path, help="config JSON or TOML (default: RUN_DIR/config.json)"
    )
    ap.add_argument("--node-rank", type=int, help="follow: this node's rank (overrides config)")
    args = ap.parse_args(argv)
    run_dir: Path = args.run_dir
    cfg = _load(args.config or RunLayout(run_dir).config)
    if args.phase == "follow":
        return _follow_main(run_dir, cfg, args.node_rank)
    sigterm = install_sigterm_stop()
    finished = False
    env, _device = init_distributed(cfg.train.device)
    try:
        idx = next_phase(run_dir, cfg) if args.phase == "next" else int(args.phase)
        if idx is None:
            return 0
        train_rank(run_dir, cfg, idx, env.is_main, sigterm)
        finished = True
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        teardown(finished)


if __name__ == "__main__":
    sys.exit(main())
