#!/usr/bin/env python
"""Training-throughput benchmark on synthetic tokens: tokens/s, MFU (when the device peak is
known), peak memory, for a preset's model at several precisions and with/without torch.compile.

    python bench/throughput.py --preset tiny --batch 16 --seq-len 256 --steps 10
    python bench/throughput.py --preset 60m --precision fp32 bf16 --compile off on
    python bench/throughput.py --preset 60m --batch 4 --seq-len 512 --frozen 0 20 40

Each configuration runs in its own process, so the peak memory figure (CUDA: max allocated;
CPU: peak resident set size of that process) belongs to that configuration alone.

Prints one line per configuration and, with ``--json FILE``, writes the results.

Data parallel: ``--world-size N`` also runs every configuration in N processes under torchrun
(DDP, one GPU each; gloo on CPU), each with the same per-process batch, and prints tokens/s per
process, the total, and the scaling efficiency ``total / (N * one-process tokens/s)``:

    python bench/throughput.py --preset 60m --precision bf16 --batch 64 --seq-len 512 \
        --world-size 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from deeplm.config import load_config
from deeplm.model import Transformer, describe, flops_per_token
from deeplm.train.device import (
    autocast_context,
    peak_flops,
    peak_memory_bytes,
    select_device,
    synchronize,
)


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
    ddp: bool = False,
) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    model.set_frozen_layers(frozen)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=1e-4,
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
    dtype = torch.bfloat16 if precision == "bf16" else None
    fwd = torch.compile(model) if compile_ else model
    if ddp:  # under torchrun: gradients all-reduced every step, as in training
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> torch.Tensor:
        with autocast_context(device, dtype):
            _, loss = fwd(inp, tgt)
        loss.backward()
        opt.step()
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
    tok_s = batch * seq_len * steps / dt
    peak = peak_flops(device, dtype)
    mem = peak_memory_bytes(device)
    if mem is None and device.type == "cpu":
        mem = _peak_rss_bytes()
    return {
        "precision": precision,
        "compile": compile_,
        "frozen": frozen,
        "batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": tok_s,
        "step_ms": 1000 * dt / steps,
        "first_step_s": first_step_s,
        "mfu": tok_s * flops_per_token(cfg.model, seq_len) / peak if peak else None,
        "peak_memory_gb": mem / 2**30 if mem else None,
        "loss": float(loss.item()),
    }


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument(
        "--frozen",
        type=int,
        nargs="+",
        default=[0],
        help="numbers of bottom layers frozen (e.g. 0 20 40)",
    )
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="also run N data-parallel processes (torchrun, one GPU each) and report scaling",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(preset=args.preset)
    cfg.model.grad_checkpointing = args.grad_checkpointing
    if args.one and args.world_size > 1:  # a rank of the data-parallel run
        return _rank_main(cfg, args)
    device = select_device(args.device)
    if args.one:  # child process: one configuration, result as JSON on the last line
        spec = json.loads(args.one)
        print(json.dumps(bench_one(cfg, device, **spec)))
        return 0
    print(
        f"{args.preset}: {describe(cfg.model)} on {device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__})",
        flush=True,
    )
    results = []
    for seq_len in args.seq_len:
        for precision in args.precision:
            for comp in args.compile:
                for frozen in args.frozen:
                    spec = {
                        "precision": precision,
                        "compile_": comp == "on",
                        "batch": args.batch,
                        "seq_len": seq_len,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "frozen": frozen,
                    }
                    r = _run_child(argv_base(args), spec)
                    results.append(r)
                    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
                    mem = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] else "n/a"
                    print(
                        f"  T={seq_len:<4} {precision:<4} compile={comp:<3} frozen={frozen:<3}"
                        f"{r['tokens_per_s']:>10,.0f} tok/s  {r['step_ms']:8.1f} ms/step  "
                        f"first step {r['first_step_s']:6.1f}s  MFU {mfu}  peak mem {mem}",
                        flush=True,
                    )
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "preset": args.preset,
                    "device": str(device),
                    "machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "results": results,
                },
                fh,
                indent=2,
            )
    return 0


def argv_base(args: argparse.Namespace) -> list[str]:
    base = ["--preset", args.preset, "--device", args.device]
    if args.threads:
        base += ["--threads", str(args.threads)]
    if args.grad_checkpointing:
        base.append("--grad-checkpointing")
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
    import subprocess

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
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, *base, "--one", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark configuration {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
