#!/usr/bin/env python
"""Training-throughput benchmark: tokens/s, MFU, peak memory and compile time of a preset's model,
over a grid of context lengths, precisions, compile on/off, frozen layers, gradient checkpointing,
loss heads and data (synthetic tokens or a run's real shards).

    python bench/throughput.py --preset tiny --batch 16 --seq-len 256 --steps 10
    python bench/throughput.py --preset 60m --batch 64 --seq-len 128 256 512 \\
        --precision bf16 --compile on --baseline --gemm-peak --save
    python bench/throughput.py --preset 60m --batch 16 --seq-len 512 --precision bf16 \\
        --grad-checkpointing off on --steps 2          # the laptop memory figure
    python bench/throughput.py --preset 60m --data synthetic shards \\
        --shards RUN/shards/grammar/train

Each configuration runs in its own process, so its peak memory (CUDA: max allocated; MPS: see
``deeplm.device.peak_memory_bytes``; CPU: peak resident set size) is its own. MFU counts
``6*N + 12*L*d*T`` FLOPs per token against the datasheet peak (CUDA) and, with ``--gemm-peak``,
against a bf16/fp32 GEMM peak measured in the same run (any device). ``--baseline`` also runs
the plain eager model (fp32 and bf16, logits head) at each context length and prints each
configuration's speed-up over it. ``--save`` writes ``bench/results/<device>-<preset>.json``;
``--json F`` writes elsewhere.

Data parallel: ``--world-size N`` also runs every configuration in N processes under torchrun
(DDP, one GPU each; gloo on CPU), each with the same per-process batch, and prints tokens/s per
process, the total, and the scaling efficiency ``total / (N * one-process tokens/s)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from deeplm.config import COMPILE_MODES, OPTIMIZERS, load_config
from deeplm.device import (
    autocast_context,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    select_device,
    synchronize,
)
from deeplm.model import Transformer, count_parameters, describe, flops_per_token
from deeplm.train.compile import compile_for_training, fit_plan, step_plan
from deeplm.train.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def _batches(data: str, shards: str | None, vocab: int, batch: int, seq_len: int, device):
    """An endless supply of (inputs, targets) on ``device``: random tokens, or packed windows
    of a real shard (read, copied and moved every step, as training does)."""
    if data == "synthetic":
        x = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
        while True:
            yield x[:, :-1], x[:, 1:]
    from deeplm.data.loader import PackedBatches
    from deeplm.data.shards import Shard

    if not shards:
        raise SystemExit("--data shards needs --shards PREFIX (e.g. RUN/shards/grammar/train)")
    shard = Shard.open(shards)
    loader = PackedBatches(shard, seq_len, batch, seed=0, pin_memory=device.type == "cuda")
    while True:
        x, y = loader.next_batch()
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class LigerLM(torch.nn.Module):
    """deeplm's model with the loss through Liger Kernel's fused linear cross-entropy (an
    experiment: ``--head liger`` on CUDA with ``liger-kernel`` installed)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        self.model, self.lce = model, LigerFusedLinearCrossEntropyLoss()

    def forward(self, idx, targets, loss_weights=None):
        m = self.model
        x = m.tok_emb(idx)
        cos, sin = m.rope(x, idx.size(1))
        for block in m.blocks:
            x = block(x, cos, sin)
        x = m.norm_f(x)
        d = x.size(-1)
        loss = self.lce(m.lm_head.weight.to(x.dtype), x.reshape(-1, d), targets.reshape(-1))
        return loss, loss.detach()


def bench_one(
    cfg,
    device,
    precision: str,
    compile_: bool,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    frozen: int = 0,
    grad_ckpt: bool = False,
    head: str = "chunked",
    data: str = "synthetic",
    shards: str | None = None,
    compile_scope: str = "block",
    compile_mode: str = "default",
    ddp: bool = False,
    optimizer: str = "adamw",
    profile: bool = False,
) -> dict:
    """Time ``steps`` optimizer steps of one configuration (after ``warmup`` steps): the
    trainer's step (deeplm.train.compile's plan, its optimizer, gradient clipping)."""
    torch.manual_seed(0)
    if seq_len > cfg.model.max_seq_len:  # RoPE has no learned positions: any length can run
        cfg.model.max_seq_len = seq_len
    model = Transformer(cfg.model).to(device)
    model.set_grad_checkpointing(grad_ckpt)
    model.set_frozen_layers(frozen)
    phase = dataclasses.replace(cfg.phases[0], optimizer=optimizer, grad_accum=1)
    train = dataclasses.replace(
        cfg.train,
        compile="on" if compile_ else "off",
        compile_scope=compile_scope,
        compile_mode=compile_mode,
        loss_head="chunked" if head == "liger" else head,
        micro_batch_tokens=0,
    )
    plan = fit_plan(step_plan(train, device), phase, distributed=ddp)  # as the trainer decides
    # the optimizer training builds (deeplm.train.optim), with the preset's first-phase settings
    opt = build_optimizer(model, phase, device, plan.compile)
    dtype = torch.bfloat16 if precision == "bf16" else None
    model.set_loss_head(plan.loss_head)
    if head == "liger":
        fwd: torch.nn.Module = LigerLM(model)
        fwd = torch.compile(fwd, dynamic=False) if compile_ and compile_scope == "model" else fwd
        if compile_ and compile_scope == "block":
            compile_for_training(model, plan)
    else:
        fwd = compile_for_training(model, plan)
    if ddp:  # under torchrun: gradients all-reduced every step, as in training
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    batches = _batches(data, shards, cfg.model.vocab_size, batch, seq_len, device)
    # as the trainer: a whole-model graph takes token weights (1 here), shared across phases
    ones = torch.ones(batch, seq_len, device=device) if plan.uniform_weights else None
    reset_peak_memory(device)

    def step(timed_opt: list[float] | None = None) -> torch.Tensor:
        inp, tgt = next(batches)
        with autocast_context(device, dtype):
            loss, _ = fwd(inp, tgt, ones)
        loss.backward()
        if timed_opt is not None:
            synchronize(device)
            t = time.perf_counter()
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
        opt.step()
        if timed_opt is not None:
            synchronize(device)
            timed_opt.append(time.perf_counter() - t)
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    dt = time.perf_counter() - t0
    opt_times: list[float] = []  # clip + optimizer step alone, synchronised on both sides
    for _ in range(steps):
        step(opt_times)
    opt_s = sorted(opt_times)[len(opt_times) // 2]
    tok_s = batch * seq_len * steps / dt
    peak = peak_flops(device, dtype)
    mem = peak_memory_bytes(device)
    step_s = dt / steps
    result = {
        "precision": precision,
        "compile": compile_,
        "compile_scope": plan.scope if plan.compile else None,
        "compile_mode": plan.mode if plan.compile else None,
        "frozen": frozen,
        "grad_checkpointing": grad_ckpt,
        "head": "liger" if head == "liger" else plan.loss_head,
        "data": data,
        "batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": tok_s,
        "step_ms": 1000 * step_s,
        "optimizer": optimizer,
        "optimizer_ms": 1000 * opt_s,
        "optimizer_share": opt_s / step_s,
        "first_step_s": first_step_s,
        # the first step's time beyond an ordinary step: compilation (and allocator warm-up)
        "compile_s": max(0.0, first_step_s - step_s) if compile_ else None,
        "flops_per_token": flops_per_token(cfg.model, seq_len, frozen),
        "mfu": tok_s * flops_per_token(cfg.model, seq_len, frozen) / peak if peak else None,
        "peak_memory_gb": mem / 2**30 if mem else None,
        "loss": float(loss.item()),
    }
    if profile:
        result["profile"] = profile_steps(step, device, step_s)
    return result


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, by its name (the profile tables' rows)."""
    n = name.lower()
    if n.startswith("triton"):
        return "triton (fused elementwise/norm/reduction)"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn::fusion")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "sm90_", "cublas", "xmma", "matmul")):
        return "gemm"
    if any(k in n for k in ("multi_tensor", "foreach", "adam", "fused_adam")):
        return "optimizer (foreach/fused)"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy/memset"
    return "other (eager elementwise/reduction)"


def profile_steps(step, device, step_s: float, n: int = 3) -> dict:
    """torch.profiler over ``n`` steps: the top kernels by GPU time and the time per kind of
    kernel, per step, against the step's wall time (the rest is the GPU waiting on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        synchronize(device)
    return summarize_profile(prof, n, step_s)


def summarize_profile(prof, n: int, step_s: float) -> dict:
    """Kernel time per step of ``n`` profiled steps of ``step_s`` seconds each: by kind, the
    annotated ranges' spans and the top kernels."""
    rows: list[tuple[str, float, float]] = []
    annotated: dict[str, float] = {}  # ranges such as Optimizer.step#...: their kernels' span
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if dev_us <= 0 or "CUDA" not in str(getattr(e, "device_type", "")):
            continue
        annotation = getattr(e, "is_user_annotation", False) or e.key.startswith("Torch-Compiled")
        if annotation or e.key.startswith(("Optimizer.", "ProfilerStep")) or "#" in e.key:
            annotated[e.key] = dev_us / n / 1000
        else:
            rows.append((e.key, e.count / n, dev_us / n / 1000))
    return kernel_summary(rows, step_s) | {"annotated_span_ms": annotated}


def kernel_summary(rows: list[tuple[str, float, float]], step_s: float) -> dict:
    """``rows`` of (kernel name, calls per step, ms per step) as the profile tables: GPU time by
    kind of kernel, the top 30 kernels, and the GPU's busy share of a ``step_s``-second step
    (also used by bench/trace_trainer.py)."""
    rows = sorted(rows, key=lambda r: -r[2])
    kinds: dict[str, float] = {}
    for name, _, ms in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    busy = sum(kinds.values())
    return {
        "step_ms": 1000 * step_s,
        "kernel_ms_per_step": busy,
        "gpu_busy_fraction": busy / (1000 * step_s) if step_s else None,
        "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top_kernels": [
            {"name": name[:160], "calls_per_step": calls, "ms_per_step": ms}
            for name, calls, ms in rows[:30]
        ],
    }


def gemm_peaks(device, dtype: torch.dtype, shapes: list[tuple[int, int, int]]) -> dict:
    """Measured FLOP/s of ``[m, k] @ [k, n]`` GEMMs in ``dtype`` (best of a few repeats)."""
    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        synchronize(device)
        best = float("inf")
        reps = 10 if device.type == "cuda" else 3
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            synchronize(device)
            best = min(best, (time.perf_counter() - t0) / reps)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return out


def device_slug(device) -> str:
    """A file name for ``bench/results/``: the GPU model, or ``cpu-<processor>``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = f"mps-{platform.machine()}"
    else:
        name = f"cpu-{_cpu_name()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument(
        "--compile-scope",
        nargs="+",
        default=["block"],
        choices=["block", "model"],
        help="compile each block in place or the whole model (train.compile_scope)",
    )
    ap.add_argument(
        "--compile-mode",
        nargs="+",
        default=["auto"],
        choices=list(COMPILE_MODES),
        help="torch.compile modes to time (train.compile_mode; reduce-overhead = CUDA graphs; "
        "auto: as deeplm run, CUDA graphs for the whole model on CUDA)",
    )
    ap.add_argument(
        "--nanogpt",
        action="store_true",
        help="also time the plain nanoGPT-style reference (bench/nanogpt.py; CUDA)",
    )
    ap.add_argument(
        "--sdpa",
        default="auto",
        choices=["auto", "flash", "cudnn", "efficient"],
        help="the scaled_dot_product_attention backend (auto: torch's choice; cuDNN on Hopper)",
    )
    ap.add_argument("--skip-grid", action="store_true", help="only the references (--nanogpt)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler top kernels and GPU time by kernel kind for every configuration",
    )
    ap.add_argument(
        "--optimizer",
        nargs="+",
        default=["adamw"],
        choices=list(OPTIMIZERS),
        help="the optimizers to time (training's own, with the preset's phase-1 settings)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as `deeplm run --set` (e.g. model.activation=relu2)",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--grad-checkpointing",
        nargs="*",
        default=["off"],
        choices=["off", "on"],
        help="per-block activation checkpointing: off, on, or both (bare flag: on)",
    )
    ap.add_argument(
        "--frozen",
        type=int,
        nargs="+",
        default=[0],
        help="numbers of bottom layers frozen (e.g. 0 20 40)",
    )
    ap.add_argument(
        "--head",
        nargs="+",
        default=["chunked"],
        choices=["auto", "chunked", "logits", "liger"],
        help="training loss head: chunked (no full logits), logits (full logits, fused under "
        "compile), liger (Liger Kernel's fused linear cross-entropy; CUDA, liger-kernel)",
    )
    ap.add_argument("--data", nargs="+", default=["synthetic"], choices=["synthetic", "shards"])
    ap.add_argument("--shards", help="shard prefix for --data shards (RUN/shards/PHASE/train)")
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also time the plain eager model (fp32 and bf16, logits head) and print speed-ups",
    )
    ap.add_argument("--gemm-peak", action="store_true", help="measure GEMM peaks for MFU")
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument(
        "--save", action="store_true", help="write bench/results/<device>-<preset>.json"
    )
    ap.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="also run N data-parallel processes (torchrun, one GPU each) and report scaling",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args(argv)
    if args.grad_checkpointing == []:
        args.grad_checkpointing = ["on"]
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(preset=args.preset, overrides=args.set)
    if args.one and args.world_size > 1:  # a rank of the data-parallel run
        return _rank_main(cfg, args)
    device = select_device(args.device)
    if args.sdpa != "auto":  # only this backend (set before anything compiles)
        # a cached compiled graph would keep the backend it was traced with (seen on an H200)
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
        for name in ("flash", "cudnn", "mem_efficient", "math"):
            on = name == args.sdpa or (args.sdpa == "efficient" and name == "mem_efficient")
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    if args.one:  # child process: one configuration, result as JSON on the last line
        spec = json.loads(args.one)
        if spec.pop("nanogpt", False):
            from nanogpt import bench_nanogpt

            r = bench_nanogpt(cfg, device, spec["batch"], spec["seq_len"], spec["steps"], 3)
        else:
            r = bench_one(cfg, device, **spec)
        print(json.dumps(r))
        return 0
    print(
        f"{args.preset}: {describe(cfg.model)} on {device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__})",
        flush=True,
    )
    report: dict = {
        "preset": args.preset,
        "parameters": count_parameters(cfg.model),
        "device": str(device),
        "device_name": device_slug(device),
        "machine": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sdpa": args.sdpa,
        "command": "python bench/throughput.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    measured_peak = _measure_gemm_peaks(cfg, device, args, report) if args.gemm_peak else {}
    baselines: dict[tuple[int, str], dict] = {}
    if args.baseline:
        report["baseline"] = []
        for seq_len, precision in itertools.product(args.seq_len, ["fp32", "bf16"]):
            spec = _spec(args, seq_len, precision, False, 0, False, "logits", "synthetic")
            r = _run_child(argv_base(args), spec)
            if "error" in r:
                print(f"  baseline FAILED: {r['error'][-300:]}", flush=True)
                continue
            baselines[(seq_len, precision)] = r
            report["baseline"].append(r)
            _print_result("baseline eager ", r, measured_peak)
    if args.nanogpt:
        report["nanogpt"] = []
        for seq_len in args.seq_len:
            r = _run_child(
                argv_base(args),
                {"nanogpt": True, "batch": args.batch, "seq_len": seq_len, "steps": args.steps},
            )
            if "error" not in r:
                fpt = flops_per_token(cfg.model, seq_len)
                peak = peak_flops(device, torch.bfloat16)
                r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else None
                mfu = f"{100 * r['mfu']:.1f}%" if peak else "n/a"
                print(
                    f"  nanoGPT reference T={seq_len}: {r['tokens_per_s']:>10,.0f} tok/s, "
                    f"MFU {mfu}, first step {r['first_step_s']:.1f}s",
                    flush=True,
                )
            report["nanogpt"].append(r)
    results = []
    grid = itertools.product(
        args.seq_len,
        args.precision,
        args.compile,
        args.compile_scope,
        args.compile_mode,
        args.frozen,
        args.grad_checkpointing,
        args.head,
        args.data,
        args.optimizer,
    )
    default = default_row(cfg, device)
    if args.skip_grid:
        grid = iter(())
    for seq_len, precision, comp, scope, mode, frozen, ckpt_, head, data, optim in grid:
        if comp == "off" and (scope, mode) != (args.compile_scope[0], args.compile_mode[0]):
            continue  # eager: scope and mode do not apply
        spec = _spec(args, seq_len, precision, comp == "on", frozen, ckpt_ == "on", head, data)
        spec.update(optimizer=optim, compile_scope=scope, compile_mode=mode, profile=args.profile)
        r = _run_child(argv_base(args), spec)
        if "error" in r:
            print(f"  FAILED {spec}: {r['error'][-300:]}", flush=True)
            results.append(r)
            continue
        key = (r["compile"], r["compile_scope"], r["compile_mode"], r["head"], r["optimizer"])
        r["default_path"] = key == default and precision == "bf16" and not frozen
        for nano in report.get("nanogpt", []):
            if nano.get("seq_len") == seq_len and "tokens_per_s" in nano:
                r["speedup_vs_nanogpt"] = r["tokens_per_s"] / nano["tokens_per_s"]
        for base_precision in ("fp32", "bf16"):  # the eager baseline (--baseline)
            base = baselines.get((seq_len, base_precision))
            if base:
                r[f"speedup_vs_eager_{base_precision}"] = r["tokens_per_s"] / base["tokens_per_s"]
        results.append(r)
        _print_result("", r, measured_peak)
        if args.world_size > 1:
            d = _run_ranks(argv_base(args), spec, args.world_size)
            d["scaling_efficiency"] = d["total_tokens_per_s"] / (
                args.world_size * r["tokens_per_s"]
            )
            r["data_parallel"] = d
            print(
                f"    x{args.world_size} processes (DDP): "
                f"{d['tokens_per_s_per_process']:>10,.0f} tok/s per process, "
                f"{d['total_tokens_per_s']:>12,.0f} tok/s total, "
                f"scaling efficiency {100 * d['scaling_efficiency']:.1f}%",
                flush=True,
            )
    report["results"] = results
    name = f"{report['device_name']}-{args.preset}.json"
    out = args.json or (str(RESULTS / name) if args.save else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)
        print(f"results: {out}")
    return 0


def default_row(cfg, device) -> tuple:
    """(compile, scope, mode, head, optimizer) of the path ``deeplm run`` takes on ``device``."""
    plan = step_plan(cfg.train, device)
    scope = plan.scope if plan.compile else None
    mode = plan.mode if plan.compile else None
    return (plan.compile, scope, mode, plan.loss_head, cfg.phases[0].optimizer)


def _spec(args, seq_len, precision, compile_, frozen, grad_ckpt, head, data) -> dict:
    return {
        "precision": precision,
        "compile_": compile_,
        "batch": args.batch,
        "seq_len": seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "frozen": frozen,
        "grad_ckpt": grad_ckpt,
        "head": head,
        "data": data,
        "shards": args.shards,
    }


def _measure_gemm_peaks(cfg, device, args, report: dict) -> dict[str, float]:
    """GEMM FLOP/s in each benchmarked precision: a large square GEMM and this model's own
    projection shapes at the benchmark's batch; MFU is also reported against the square one."""
    big = 8192 if device.type == "cuda" else 2048
    rows = args.batch * max(args.seq_len)
    d, h = cfg.model.d_model, int(cfg.model.d_model * cfg.model.mlp_ratio)
    shapes = [(big, big, big), (rows, d, 3 * d), (rows, d, h), (rows, d, cfg.model.vocab_size)]
    peaks: dict[str, float] = {}
    report["gemm_flops"] = {}
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        g = gemm_peaks(device, dtype, shapes)
        report["gemm_flops"][precision] = g
        peaks[precision] = g[f"{big}x{big}x{big}"]
        shown = ", ".join(f"{k}: {v / 1e12:.2f} TF/s" for k, v in g.items())
        print(f"  GEMM {precision}: {shown}", flush=True)
    return peaks


def _print_result(label: str, r: dict, measured_peak: dict[str, float]) -> None:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    gemm = measured_peak.get(r["precision"])
    if gemm:
        r["mfu_vs_measured_gemm"] = r["tokens_per_s"] * r["flops_per_token"] / gemm
        mfu += f" ({100 * r['mfu_vs_measured_gemm']:.1f}% of measured GEMM)"
    mem = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] else "n/a"
    speed = "".join(
        f"  x{r[k]:.2f} vs eager {k[-4:]}"
        for k in ("speedup_vs_eager_fp32", "speedup_vs_eager_bf16")
        if k in r
    )
    comp = f"{r['compile_scope']}/{r['compile_mode']}" if r["compile"] else "off"
    if "speedup_vs_nanogpt" in r:
        speed += f"  x{r['speedup_vs_nanogpt']:.2f} vs nanoGPT"
    if r.get("default_path"):
        speed += "  <- default path"
    print(
        f"  {label}T={r['seq_len']:<4} {r['precision']:<4} compile={comp:<14} "
        f"frozen={r['frozen']:<3} ckpt={'on' if r['grad_checkpointing'] else 'off':<3} "
        f"head={r['head']:<7} {r['data']:<9} {r.get('optimizer', 'adamw'):<9}"
        f"{r['tokens_per_s']:>10,.0f} tok/s {r['step_ms']:8.1f} ms/step  "
        f"first step {r['first_step_s']:6.1f}s  MFU {mfu}  peak mem {mem}{speed}"
        f"  optimizer {100 * r.get('optimizer_share', 0):.1f}% of the step",
        flush=True,
    )


def argv_base(args: argparse.Namespace) -> list[str]:
    base = ["--preset", args.preset, "--device", args.device, "--sdpa", args.sdpa]
    for kv in args.set:
        base += ["--set", kv]
    if args.threads:
        base += ["--threads", str(args.threads)]
    return base


def _rank_main(cfg, args: argparse.Namespace) -> int:
    """One rank of a data-parallel measurement (under torchrun): rank 0 prints the result."""
    import torch.distributed as dist

    from deeplm.train.distributed import init_distributed, teardown

    env, device = init_distributed(args.device)
    finished = False
    try:
        r = bench_one(cfg, device, **json.loads(args.one), ddp=True)
        slowest = torch.tensor([r["tokens_per_s"]], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MIN)
        if env.is_main:
            world = env.world_size
            # the ranks step in lockstep (one all-reduce per step): the slowest sets the pace
            total = float(slowest.item()) * world
            out = {"world_size": world, "tokens_per_s_per_process": total / world}
            print(json.dumps(out | {"total_tokens_per_s": total}))
        finished = True
    finally:
        teardown(finished)
    return 0


def _run_ranks(base: list[str], spec: dict, world: int) -> dict:
    from deeplm.train.distributed import free_port, launch_env

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        __file__,
        *base,
        "--world-size",
        str(world),
        "--one",
        json.dumps(spec),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=launch_env())
    if out.returncode != 0:
        raise RuntimeError(f"{world}-process run of {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_child(base: list[str], spec: dict) -> dict:
    """One configuration in its own process; a failure is recorded (``error``), not raised, so
    the rest of a grid still runs."""
    out = subprocess.run(
        [sys.executable, __file__, *base, "--one", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        return dict(spec, error=out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
