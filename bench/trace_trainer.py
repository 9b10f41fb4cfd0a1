#!/usr/bin/env python
"""Where the training loop's time goes: ``deeplm run``'s own trainer (PhaseTrainer, the plan,
loader, optimizer and bookkeeping the pipeline uses) on one phase of a prepared run, measured in
three windows after a warm-up:

1. **timed**: every step's period as the GPU sees it (CUDA events) and as the host sees it, with
   nothing else in the loop: tokens/s and the spread (p10/p50/p90/max) of the step time;
2. **synced**: each step waited for: the host's time to issue the step against its total, so the
   GPU's step time and the host's are side by side (a host issue time near the step time: the
   loop is CPU-bound and any host stall shows up as GPU idle);
3. **profiled**: torch.profiler over a few steps: GPU time by kind of kernel, the top kernels, and
   every idle gap of the GPU attributed to the host code that issued the next kernel (data
   loading, forward, backward, clipping, optimizer, ...); the Chrome trace is kept.

Throughout, every garbage collection of the Python heap is timed (``gc.callbacks``) against the
step it fell in, and the slowest timed steps are listed with the collections inside them: a
multi-second step is either a collection, a recompile or a re-recorded CUDA graph.

    python bench/trace_trainer.py RUN_DIR [--phase 0] [--out DIR] [--warmup 20] [--timed 50]
        [--synced 10] [--profiled 6] [--set train.compile_mode=reduce-overhead ...]
    python bench/trace_trainer.py --from-trace DIR [--profiled N]   # re-read a saved trace

The run directory is only read (its config, tokenizer and shards): training writes to
``DIR/scratch``. Evaluation, samples and periodic checkpoints are off in the measured windows, so
they show the steady training step. Writes ``DIR/trace-summary.json`` and ``DIR/trace.json.gz``
and prints the figures.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import gzip
import json
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import kernel_summary  # noqa: E402  (bench/throughput.py)

from deeplm.config import apply_overrides, config_from_dict, config_to_json  # noqa: E402
from deeplm.data.loader import PackedBatches  # noqa: E402
from deeplm.data.shards import Shard  # noqa: E402
from deeplm.device import synchronize  # noqa: E402
from deeplm.run.layout import RunLayout  # noqa: E402
from deeplm.run.run_config import load_run_config  # noqa: E402
from deeplm.tokenizer import Tokenizer  # noqa: E402
from deeplm.train.hooks import TrainHooks  # noqa: E402
from deeplm.train.trainer import PhaseTrainer  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _annotate(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` in a profiler range ``label`` (seen in the trace and the gap table)."""
    fn = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def _percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {
        "p10": at(0.1),
        "p50": at(0.5),
        "p90": at(0.9),
        "max": v[-1],
        "mean": statistics.mean(v),
    }


class Windows:
    """Counts the trainer's steps (through its ``_train_step``) and measures each window."""

    def __init__(self, trainer: PhaseTrainer, args: argparse.Namespace, out: Path):
        self.trainer, self.args, self.out = trainer, args, out
        self.cuda = torch.cuda.is_available()
        self.n = 0
        self.host: list[float] = []  # host time at the start of each timed step
        self.events: list[Any] = []
        self.issue: list[float] = []  # synced window: host seconds to issue the step
        self.total: list[float] = []  # synced window: seconds until the GPU finished it
        self.prof: profile | None = None
        self.profile_summary: dict[str, Any] | None = None
        self.profiled_s = 0.0
        self.collections: list[tuple[int, int, float]] = []  # (step, generation, seconds)
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)
        self.inner = trainer._train_step
        trainer._train_step = self.step  # type: ignore[method-assign]

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.collections.append((self.n, info["generation"], time.perf_counter() - self._gc_t0))

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        a = self.args
        w = a.warmup
        return w, w + a.timed, w + a.timed + a.synced, w + a.timed + a.synced + a.profiled

    def done(self) -> bool:
        return self.n >= self.bounds[3]

    def step(self) -> torch.Tensor:
        warm, timed, synced, end = self.bounds
        if warm <= self.n <= timed:  # one mark more than steps: the window's end
            self.host.append(time.perf_counter())
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events.append(ev)
        if self.n == synced:
            self._start_profile()
        if timed <= self.n < synced:
            grad_norm = self._synced_step()
        else:
            with record_function("deeplm.train_step"):
                grad_norm = self.inner()
        self.n += 1
        if self.n == end:
            self._stop_profile()
        return grad_norm

    def _synced_step(self) -> torch.Tensor:
        synchronize(self.trainer.device)
        t0 = time.perf_counter()
        grad_norm = self.inner()
        t1 = time.perf_counter()
        synchronize(self.trainer.device)
        self.issue.append(t1 - t0)
        self.total.append(time.perf_counter() - t0)
        return grad_norm

    def _start_profile(self) -> None:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        synchronize(self.trainer.device)
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self._t_prof = time.perf_counter()

    def _stop_profile(self) -> None:
        assert self.prof is not None
        synchronize(self.trainer.device)
        self.profiled_s = time.perf_counter() - self._t_prof
        self.prof.__exit__(None, None, None)
        raw = self.out / "trace.json"
        self.prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(self.out / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        self.trace_events = json.loads(raw.read_text()).get("traceEvents", [])
        raw.unlink()
        n = self.args.profiled
        self.profile_summary = kernel_table(self.trace_events, n, self.profiled_s / n)

    def _slowest(self, step_ms: list[float], k: int = 5) -> list[dict[str, Any]]:
        """The ``k`` slowest timed steps (index counted from the first step of the loop) with
        the garbage collections that ran while the host issued them."""
        first = self.args.warmup
        order = sorted(range(len(step_ms)), key=lambda i: -step_ms[i])[:k]
        rows = []
        for i in order:
            gcs = [(g, s) for n, g, s in self.collections if n == first + i]
            rows.append(
                {
                    "step": first + i,
                    "ms": step_ms[i],
                    "gc_ms": 1000 * sum(s for _, s in gcs),
                    "gc_generations": [g for g, _ in gcs],
                }
            )
        return rows

    def _gc_figures(self) -> dict[str, Any]:
        """Collections during the measured windows (after the warm-up), by generation."""
        measured = [(g, s) for n, g, s in self.collections if n >= self.args.warmup]
        by_gen = {
            str(g): {
                "count": sum(1 for x, _ in measured if x == g),
                "total_ms": 1000 * sum(s for x, s in measured if x == g),
                "max_ms": 1000 * max((s for x, s in measured if x == g), default=0.0),
            }
            for g in (0, 1, 2)
        }
        warm = [s for n, _, s in self.collections if n < self.args.warmup]
        return {
            "measured": by_gen,
            "warmup_total_ms": 1000 * sum(warm),
        }

    def figures(self) -> dict[str, Any]:
        tokens = self.trainer.phase.tokens_per_step
        host_steps = [b - a for a, b in zip(self.host, self.host[1:], strict=False)]
        out: dict[str, Any] = {"tokens_per_step": tokens, "timed_steps": len(host_steps)}
        if host_steps:
            wall = self.host[-1] - self.host[0]
            out["tokens_per_s"] = tokens * len(host_steps) / wall
            out["host_step_ms"] = {k: 1000 * v for k, v in _percentiles(host_steps).items()}
        if self.cuda and len(self.events) > 1:
            synchronize(self.trainer.device)
            gpu = [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:], strict=False)]
            out["gpu_step_ms"] = _percentiles(gpu)
            out["slowest_steps"] = self._slowest(gpu)
        elif host_steps:
            out["slowest_steps"] = self._slowest([1000 * s for s in host_steps])
        out["gc"] = self._gc_figures()
        if self.issue:
            out["synced"] = {
                "host_issue_ms": 1000 * statistics.median(self.issue),
                "step_ms": 1000 * statistics.median(self.total),
                "issue_share": statistics.median(self.issue) / statistics.median(self.total),
            }
        if self.profile_summary is not None:
            out["profiled_steps"] = self.args.profiled
            out["profile"] = self.profile_summary
            out["gaps"] = gap_table(self.trace_events, self.args.profiled, self.args.gap_us)
        return out


def kernel_table(events: list[dict], steps: int, step_s: float) -> dict[str, Any]:
    """GPU time per step of the trace's kernels, copies and memsets (annotations and host ranges
    excluded): by kind and the top kernels, against the profiled steps' wall time."""
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in GPU_CATS and "dur" in e:
            row = per[e.get("name", "?")]
            row[0] += 1
            row[1] += e["dur"]
    rows = [(name, n / steps, us / steps / 1000) for name, (n, us) in per.items()]
    return kernel_summary(rows, step_s)


def reanalyse(out: Path, steps: int, gap_us: float) -> dict[str, Any]:
    """Recompute the kernel table and the gaps of ``out``'s saved trace (of ``steps`` steps,
    unless its summary says) into its summary."""
    fig = json.loads((out / "trace-summary.json").read_text())
    with gzip.open(out / "trace.json.gz", "rt") as f:
        events = json.load(f).get("traceEvents", [])
    steps = int(fig.get("profiled_steps") or steps)
    fig["profiled_steps"] = steps
    fig["profile"] = kernel_table(events, steps, fig["profile"]["step_ms"] / 1000)
    fig["gaps"] = gap_table(events, steps, gap_us)
    (out / "trace-summary.json").write_text(json.dumps(fig, indent=1))
    return fig


def _enclosing(ranges: list[dict], ts: float) -> list[str]:
    """Names of the host ``ranges`` (one thread's, sorted by start) that contain time ``ts``,
    outermost first."""
    stop = bisect.bisect_right(ranges, ts, key=lambda e: e["ts"])
    spans = [e for e in ranges[:stop] if ts <= e["ts"] + e["dur"]]
    spans.sort(key=lambda e: (e["ts"], -e["dur"]))
    return [e["name"] for e in spans]


def _label(stack: list[str]) -> str:
    """The gap's owner: the outermost range below the step itself (a deeplm.* annotation, the
    optimizer step, a compiled graph, autograd's backward, ...)."""
    for name in stack:
        if name in ("deeplm.train_step",) or name.startswith("ProfilerStep"):
            continue
        return name[:120]
    return stack[0][:120] if stack else "(no host range)"


def gap_table(events: list[dict], steps: int, gap_us: float) -> dict[str, Any]:
    """The GPU's idle time in the profiled steps: total per step, and the gaps longer than
    ``gap_us`` grouped by the host range that issued the kernel after each gap."""
    gpu = sorted(
        (e for e in events if e.get("cat") in GPU_CATS and "dur" in e), key=lambda e: e["ts"]
    )
    if not gpu:
        return {"idle_ms_per_step": None, "by_issuer": {}}
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    host: dict[Any, list[dict]] = defaultdict(list)  # each thread's ranges, by start
    for e in sorted(events, key=lambda e: e.get("ts", 0)):
        if e.get("cat") in HOST_CATS and "dur" in e:
            host[e.get("tid")].append(e)
    idle, by_issuer, count = 0.0, defaultdict(float), defaultdict(int)
    end = gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        gap = e["ts"] - end
        if gap > 0:
            idle += gap
        if gap > gap_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            label = "(launch not traced)"
            if launch is not None:
                label = _label(_enclosing(host[launch.get("tid")], launch["ts"]))
            by_issuer[label] += gap
            count[label] += 1
        end = max(end, e["ts"] + e["dur"])
    span = end - gpu[0]["ts"]
    table = sorted(by_issuer.items(), key=lambda kv: -kv[1])
    return {
        "gpu_span_ms_per_step": span / steps / 1000,
        "idle_ms_per_step": idle / steps / 1000,
        "idle_fraction": idle / span if span else None,
        "gap_threshold_us": gap_us,
        "by_issuer": {
            k: {"ms_per_step": v / steps / 1000, "gaps_per_step": count[k] / steps}
            for k, v in table[:20]
        },
    }


def build_trainer(
    run_dir: Path, phase_idx: int, scratch: Path, hooks: TrainHooks, overrides: list[str]
) -> PhaseTrainer:
    """The pipeline's trainer for ``phase_idx`` of ``run_dir`` (its config with ``overrides``,
    ``key=value`` as ``deeplm run --set``), writing under ``scratch``; evaluation, samples and
    periodic checkpoints only at the phase's end."""
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = config_from_dict(apply_overrides(cfg.to_dict(), overrides))
    if not 0 <= phase_idx < len(cfg.phases):
        raise SystemExit(f"--phase {phase_idx}: the run has {len(cfg.phases)} phases")
    phase = dataclasses.replace(cfg.phases[phase_idx], eval_every=0, sample_every=0, save_every=0)
    cfg.phases[phase_idx] = phase
    layout = RunLayout(run_dir)
    tok = Tokenizer.load(layout.tokenizer)
    shards = [Shard.open(layout.shard(phase.name, s), tok.hash) for s in ("train", "val")]
    scratch.mkdir(parents=True, exist_ok=True)
    RunLayout(scratch).config.write_text(config_to_json(cfg))
    return PhaseTrainer(cfg, phase_idx, scratch, tok, *shards, hooks=hooks)


def report(fig: dict[str, Any]) -> None:
    print(
        f"tokens/s (timed window, {fig.get('timed_steps')} steps): "
        f"{fig.get('tokens_per_s', 0):,.0f}"
    )
    for key in ("gpu_step_ms", "host_step_ms"):
        if key in fig:
            p = fig[key]
            print(
                f"{key}: p10 {p['p10']:.1f}  p50 {p['p50']:.1f}  p90 {p['p90']:.1f}  "
                f"max {p['max']:.1f}"
            )
    for row in fig.get("slowest_steps", [])[:3]:
        gens = ",".join(map(str, row["gc_generations"])) or "none"
        print(
            f"  slow step {row['step']}: {row['ms']:.1f} ms, garbage collection "
            f"{row['gc_ms']:.1f} ms (generations {gens})"
        )
    if "gc" in fig:
        m = fig["gc"]["measured"]
        print(
            "garbage collections after warm-up: "
            + ", ".join(
                f"gen {g} x{v['count']} ({v['total_ms']:.1f} ms, max {v['max_ms']:.1f})"
                for g, v in m.items()
            )
        )
    if "synced" in fig:
        s = fig["synced"]
        print(
            f"synced: host issues a step in {s['host_issue_ms']:.1f} ms of {s['step_ms']:.1f} ms "
            f"({100 * s['issue_share']:.0f} %)"
        )
    prof = fig.get("profile")
    if prof:
        print(
            f"profiled: kernels {prof['kernel_ms_per_step']:.1f} ms of "
            f"{prof['step_ms']:.1f} ms per step"
        )
        for kind, ms in prof["by_kind_ms"].items():
            print(f"  {ms:7.2f} ms  {kind}")
    gaps = fig.get("gaps")
    if gaps and gaps.get("idle_ms_per_step") is not None:
        print(
            f"GPU idle {gaps['idle_ms_per_step']:.2f} ms per step "
            f"({100 * (gaps['idle_fraction'] or 0):.1f} %); "
            f"gaps > {gaps['gap_threshold_us']:g} us by issuer:"
        )
        for name, g in gaps["by_issuer"].items():
            print(f"  {g['ms_per_step']:7.2f} ms  {g['gaps_per_step']:5.1f} gaps  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", type=Path, nargs="?", help="a prepared run directory (only read)")
    p.add_argument("--phase", type=int, default=0, help="phase index (default 0)")
    p.add_argument("--out", type=Path, default=Path("out/trace"), help="results and scratch")
    p.add_argument("--warmup", type=int, default=20, help="steps before measuring (compile)")
    p.add_argument("--timed", type=int, default=50, help="steps timed by CUDA events")
    p.add_argument("--synced", type=int, default=10, help="steps each waited for")
    p.add_argument("--profiled", type=int, default=6, help="steps under torch.profiler")
    p.add_argument("--gap-us", type=float, default=20.0, help="GPU gaps listed above this")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override as in `deeplm run --set`, e.g. train.compile_mode=reduce-overhead",
    )
    p.add_argument(
        "--from-trace",
        type=Path,
        metavar="DIR",
        help="no training: recompute DIR's tables from its trace.json.gz (--profiled steps)",
    )
    args = p.parse_args(argv)
    if args.from_trace is not None:
        report(reanalyse(args.from_trace, args.profiled, args.gap_us))
        return 0
    if args.run_dir is None or not (args.run_dir / "config.json").is_file():
        raise SystemExit(f"{args.run_dir}: not a prepared run directory (no config.json)")
    if min(args.timed, args.synced, args.profiled) < 1 or args.warmup < 1:
        raise SystemExit("--warmup, --timed, --synced and --profiled must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    box: list[Windows] = []
    hooks = TrainHooks(should_stop=lambda: bool(box) and box[0].done(), log=print)
    trainer = build_trainer(args.run_dir, args.phase, scratch, hooks, args.set)
    total = args.warmup + args.timed + args.synced + args.profiled
    if trainer.phase.total_steps <= total:
        raise SystemExit(
            f"phase {trainer.phase.name!r} has {trainer.phase.total_steps} steps; the windows "
            f"need more than {total}: lower --warmup/--timed/--synced/--profiled"
        )
    _annotate(PackedBatches, "next_batch", "deeplm.data")
    _annotate(torch.nn.utils, "clip_grad_norm_", "deeplm.clip_grad_norm")
    original_setup = trainer._setup

    def setup(existing: Any) -> tuple[int, int]:  # the optimizer exists after _setup
        result = original_setup(existing)
        if not box:
            box.append(Windows(trainer, args, args.out))
        return result

    trainer._setup = setup  # type: ignore[method-assign]
    try:
        outcome = trainer.run()
    finally:
        if box:
            box[0].close()
    if not box or not box[0].done():
        raise SystemExit(f"training ended after {outcome.step} steps, before the windows did")
    fig = box[0].figures()
    fig.update(
        {
            "run_dir": str(args.run_dir),
            "phase": trainer.phase.name,
            "device": trainer.device.type,
            "plan": trainer.plan.describe(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "overrides": args.set,
            "command": " ".join(sys.argv),
        }
    )
    (args.out / "trace-summary.json").write_text(json.dumps(fig, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    report(fig)
    print(f"wrote {args.out / 'trace-summary.json'} and {args.out / 'trace.json.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
