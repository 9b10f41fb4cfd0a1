#!/usr/bin/env python
"""Do two phases of one run share one compiled graph on this device? The pipeline's trainer
(``bench/trace_trainer.build_trainer``) trains a few steps of phase ``--phase`` of a prepared
run, then, in the same process, a few steps of the same phase with rare-token weights (what
phase 2 adds), and prints each first step's time: a shared graph makes the second's a replay
(seconds), an unshared one a compile of its own (minutes on a GPU).

    python bench/shared_graph_check.py RUN_DIR [--steps 20] [--alpha 0.3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_trainer import build_trainer  # noqa: E402  (bench/trace_trainer.py)

from deeplm.train.hooks import TrainHooks  # noqa: E402


def first_step_seconds(run_dir: Path, phase: int, steps: int, overrides: list[str]) -> float:
    """Train ``steps`` steps of ``phase`` (in a scratch folder) and return the first's time."""
    logged: list[str] = []
    count = {"n": 0}

    def should_stop() -> bool:
        count["n"] += 1
        return count["n"] > steps

    scratch = Path(tempfile.mkdtemp(prefix="shared-graph-"))
    try:
        hooks = TrainHooks(should_stop=should_stop, log=logged.append)
        build_trainer(run_dir, phase, scratch, hooks, overrides).run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    line = next(s for s in logged if "first step" in s)
    print(line, flush=True)
    return float(line.rsplit(": ", 1)[1].split("s")[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--phase", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.3, help="rare_token_alpha of the second")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    plain = first_step_seconds(args.run_dir, args.phase, args.steps, args.set)
    weighted_set = [*args.set, f"phases.{args.phase}.rare_token_alpha={args.alpha}"]
    weighted = first_step_seconds(args.run_dir, args.phase, args.steps, weighted_set)
    result = {
        "first_step_s": {"unweighted": plain, "weighted": weighted},
        "total_s": time.perf_counter() - t0,
        "overrides": args.set,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
