#!/usr/bin/env python
"""Recipe experiments on the anchor shards: several ``bench/compare.py`` candidates trained side
by side on one GPU (the 60-layer model is launch-bound, so concurrent runs share the card at
little cost each), with a deadline, every result packed into one folder.

    python bench/recipe_grid.py --anchor .anchor --grid screen --tokens 20_000_000 --out OUT
    python bench/recipe_grid.py --anchor .anchor --grid final --tokens 40_000_000 --out OUT

``--anchor`` holds ``train.bin``, ``val.bin`` and ``tokenizer.json`` (the anchor shards); they are
imported once with ``deeplm import``. Each candidate is one ``compare.py`` process (its own
``--out``, log and JSON result); at most ``--parallel`` run at once. At ``--deadline-s`` the
stragglers are stopped and their partial validation curves kept. ``OUT/summary.json`` holds
every row (the finished runs' final scores, the others' curves) and ``OUT/summary.md`` the
table. The grids are defined below, so a result names its grid and the exact overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What every candidate shares: phase 1 of its preset, 32,768 tokens per step (micro-batch x
# accumulation x 512), no curriculum / freezing unless the candidate sets them, no early stop,
# evaluation every ~2M tokens, samples only at the end, per-block compile.
COMMON = [
    "phases.0.seq_len=512",
    "phases.0.curriculum=[]",
    "phases.0.freeze=[]",
    "phases.0.plateau_patience=0",
    "phases.0.eval_every=61",
    "phases.0.eval_batches=13",
    "phases.0.sample_every=1000000",
    "phases.0.long_sample_tokens=0",
    "phases.0.save_every=0",
    "train.compile=true",
    "train.log_every=20",
]
ADAMW = "phases.0.optimizer=adamw,phases.0.lr=6e-4,phases.0.weight_decay=0.1,phases.0.min_lr_ratio=0.1,phases.0.warmup_frac=0.02"  # noqa: E501
MUON = "phases.0.optimizer=muon,phases.0.lr=1.5e-3,phases.0.adamw_lr=6e-4,phases.0.weight_decay=0.1,phases.0.min_lr_ratio=0.1,phases.0.warmup_frac=0.02,phases.0.muon_adjust_lr=match_rms_adamw"  # noqa: E501

CURRICULUM = (
    "phases.0.curriculum=[{at=0.0,seq_len=128},{at=0.3,seq_len=256},{at=0.7,seq_len=512}],"
    "phases.0.freeze=[{at=0.2,layers=20},{at=0.5,layers=40}]"
)

GRIDS: dict[str, list[str]] = {
    "screen": [
        f"adamw=60m,{ADAMW}",
        f"muon=60m,{MUON}",
        f"muon-lr3e-3=60m,{MUON},phases.0.lr=3e-3",
        f"muon-adamw1.5e-3=60m,{MUON},phases.0.adamw_lr=1.5e-3",
        f"muon-wsd=60m,{MUON},phases.0.schedule=wsd,phases.0.decay_frac=0.3,phases.0.min_lr_ratio=0",
        f"muon-relu2=60m,{MUON},model.activation=relu2",
        f"muon-qknorm=60m,{MUON},model.qk_norm=true",
        f"muon-zeroinit=60m,{MUON},model.zero_init_residual=true",
        f"muon-untied=60m,{MUON},model.tie_embeddings=false",
        f"muon-swiglu=60m,{MUON},model.activation=swiglu",
    ],
    # the screen's winners combined, at the full budget, one at a time (solo: their wall times
    # are the GPU time): A the candidate default; D = A + the playbook's curriculum and freezing
    # (equal GPU time); A on the wide model; B = A + QK-norm (the last, with what time is left)
    "final": [
        f"A-muon3e-3-adamw1.5e-3=60m,{MUON},phases.0.lr=3e-3,phases.0.adamw_lr=1.5e-3",
        f"D-A-curriculum-freeze=60m,{MUON},phases.0.lr=3e-3,phases.0.adamw_lr=1.5e-3,"
        f"{CURRICULUM}",
        f"wide-A=wide,{MUON},phases.0.lr=3e-3,phases.0.adamw_lr=1.5e-3",
        f"B-A-qknorm=60m,{MUON},phases.0.lr=3e-3,phases.0.adamw_lr=1.5e-3,model.qk_norm=true",
    ],
}


def load_grid(name: str, extra: list[str]) -> list[str]:
    if name == "none":
        return extra
    if name not in GRIDS:
        raise SystemExit(f"unknown grid {name!r} (known: {', '.join(GRIDS)}, none)")
    return GRIDS[name] + extra


def import_anchor(anchor: Path, data: Path) -> None:
    if (data / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "deeplm.cli", "import", "--preset", "60m"]
    cmd += ["--train", str(anchor / "train.bin"), "--val", str(anchor / "val.bin")]
    cmd += ["--tokenizer", str(anchor / "tokenizer.json"), "--run-dir", str(data)]
    subprocess.run(cmd, check=True)


def launch(spec: str, args: argparse.Namespace) -> tuple[str, subprocess.Popen]:
    name = spec.partition("=")[0]
    cmd = [sys.executable, str(HERE / "compare.py"), "--data", str(args.data)]
    cmd += ["--phase", "grammar", "--tokens", str(args.tokens), "--candidate", spec]
    common = [*COMMON, f"phases.0.micro_batch={args.micro_batch}"]
    common.append(f"phases.0.grad_accum={32768 // 512 // args.micro_batch}")
    cmd += [x for kv in common for x in ("--common", kv)]
    cmd += ["--out", str(args.out / "runs"), "--json", str(args.out / "json" / f"{name}.json")]
    cmd += ["--eval-seq-len", "512", "--eval-batch", "8", "--eval-batches", "25"]
    log = open(args.out / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return name, proc


def partial_row(out: Path, name: str) -> dict:
    sys.path.insert(0, str(HERE))
    from compare import val_curve  # the same reading as a finished row's

    curve = val_curve(out / "runs" / name, "grammar")
    return {"name": name, "finished": False, "val_curve": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("/tmp/anchor-run"))
    ap.add_argument("--grid", default="screen")
    ap.add_argument("--candidate", action="append", default=[], help="more NAME=PRESET,K=V")
    ap.add_argument("--tokens", type=int, default=40_000_000)
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=16, help="x 512 x accumulation = 32,768")
    ap.add_argument("--deadline-s", type=float, default=520.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    for sub in ("runs", "json", "logs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "2")
    import_anchor(args.anchor, args.data)
    pending = load_grid(args.grid, args.candidate)
    running: dict[str, subprocess.Popen] = {}
    rows: dict[str, dict] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, proc = launch(pending.pop(0), args)
            running[name] = proc
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(
                    f"[{time.monotonic() - t0:6.0f}s] {name} exited {proc.returncode}", flush=True
                )
        if time.monotonic() - t0 > args.deadline_s:
            for name, proc in running.items():
                os.killpg(proc.pid, 9)
                print(f"deadline: stopped {name}", flush=True)
            running.clear()
            pending.clear()
        time.sleep(2)
    for name in sorted(p.name for p in (args.out / "runs").iterdir() if p.is_dir()):
        path = args.out / "json" / f"{name}.json"
        if path.is_file():
            rows[name] = dict(json.loads(path.read_text())["rows"][0], finished=True)
        else:
            rows[name] = partial_row(args.out, name)
    summary = {"grid": args.grid, "tokens": args.tokens, "common": COMMON, "rows": rows}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = ["| candidate | val loss (final) | last curve point | tokens/s (shared GPU) |"]
    table.append("|---|---|---|---|")
    for name, r in rows.items():
        last = r["val_curve"][-1] if r.get("val_curve") else None
        final = f"{r['val_loss']:.4f}" if r.get("finished") else "unfinished"
        pt = f"{last[1]:.4f} at {last[0] / 1e6:.1f}M" if last else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        table.append(f"| {name} | {final} | {pt} | {tps} |")
    (args.out / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
