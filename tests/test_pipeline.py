"""End to end on real components: the local orchestrator runs every stage of a 2-phase run on
the offline corpus (capped for speed), val loss falls in each phase, a second run redoes nothing,
and the CLI shows status and samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deeplm.config import config_from_dict
from deeplm.pipeline.local import run_local
from deeplm.pipeline.status import status
from deeplm.run.lock import RunLocked, run_lock
from deeplm.run.state_db import StateDB
from tests.helpers import micro_config, two_phase_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(two_phase_config())
    logs: list[str] = []
    summary = run_local(run_dir, cfg, log=logs.append)
    return run_dir, cfg, summary, logs


def test_pipeline_completes_every_stage(finished_run):
    run_dir, cfg, summary, logs = finished_run
    assert summary["status"] == "done"
    assert list(summary["stages"]) == [
        "prepare",
        "tokenizer",
        "tokenize:grammar",
        "tokenize:vocabulary",
        "train:grammar",
        "train:vocabulary",
        "evaluate",
    ]
    assert not any(s["skipped"] for s in summary["stages"].values())
    st = status(run_dir)
    assert all(s["status"] == "done" for s in st["stages"])
    assert [p["name"] for p in st["phases"]] == ["grammar", "vocabulary"]
    for p in st["phases"]:
        assert p["metrics"]["val_loss"] < p["metrics"]["first_val_loss"], p
    report = (run_dir / "report.md").read_text()
    assert "## Samples" in report and (run_dir / "report" / "loss_curves.png").stat().st_size > 0


def test_every_artifact_is_recorded_with_hash(finished_run):
    run_dir, cfg, _, _ = finished_run
    db = StateDB(run_dir / "state.db", readonly=True)
    arts = db.artifacts()
    kinds = {a["kind"] for a in arts}
    assert {"docs", "tokenizer", "shard", "checkpoint", "report"} <= kinds
    for a in arts:
        assert db.artifact_ok(a["path"], verify_hash=True), a["path"]
    tok_hash = db.stage("tokenizer").outputs["hash"]
    shard_meta = json.loads((run_dir / "shards" / "grammar" / "train.json").read_text())
    assert shard_meta["tokenizer_hash"] == tok_hash
    db.close()


def test_second_run_redoes_nothing(finished_run):
    run_dir, cfg, _, _ = finished_run
    mtimes = {
        p: p.stat().st_mtime_ns
        for p in run_dir.rglob("*")
        if p.is_file()
        and p.suffix in (".bin", ".safetensors", ".json", ".jsonl")
        and "metrics" not in p.parts
    }
    logs: list[str] = []
    summary = run_local(run_dir, cfg, log=logs.append)
    assert summary.get("nothing_redone") is True
    assert all(s["skipped"] for s in summary["stages"].values())
    assert any("nothing to do" in line for line in logs)
    for p, m in mtimes.items():
        assert p.stat().st_mtime_ns == m, f"{p} was rewritten"


def test_changed_config_in_same_run_dir_is_refused(finished_run):
    run_dir, cfg, _, _ = finished_run
    d = two_phase_config()
    d["phases"][0]["lr"] = 1e-2
    with pytest.raises(ValueError, match="different configuration"):
        run_local(run_dir, config_from_dict(d), log=lambda s: None)


def test_missing_shard_is_rebuilt(finished_run, tmp_path):
    import shutil

    run_dir, cfg, _, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    # artifacts are recorded relative to the run directory: a copied run dir is still intact
    victim = copy / "shards" / "vocabulary" / "val.bin"
    before = victim.read_bytes()
    victim.unlink()
    logs: list[str] = []
    summary = run_local(copy, cfg, log=logs.append)
    assert summary["stages"]["tokenize:vocabulary"]["skipped"] is False
    assert summary["stages"]["train:grammar"]["skipped"] is True
    assert victim.read_bytes() == before


def test_partial_files_left_by_a_kill_after_the_shard_metadata_are_removed(finished_run, tmp_path):
    """A kill between writing a shard's metadata and deleting its partial files leaves a
    complete shard, its stage still running, and the partial files: the re-run removes them."""
    import shutil

    from deeplm.data.shards import shard_paths
    from deeplm.run.layout import RunLayout

    run_dir, cfg, _, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    layout = RunLayout(copy)
    paths = shard_paths(layout.shard("grammar", "train"))
    for stale in (paths.idx_partial, paths.partial_meta):
        stale.write_bytes(b"left by a kill")
    db = StateDB(layout.state_db)
    db.start_stage("tokenize:grammar")
    db.close()
    summary = run_local(copy, cfg, log=lambda s: None)
    assert summary["stages"]["tokenize:grammar"]["skipped"] is False
    assert not paths.idx_partial.exists() and not paths.partial_meta.exists()


def test_lock_refuses_a_second_driver(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLocked, match="in use"):
            with run_lock(tmp_path):
                pass


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "deeplm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_cli_status_and_generate(finished_run):
    run_dir = finished_run[0]
    r = _cli("status", "--run-dir", str(run_dir))
    assert r.returncode == 0 and "train:vocabulary" in r.stdout and "done" in r.stdout
    r = _cli("status", "--run-dir", str(run_dir), "--json")
    assert json.loads(r.stdout)["run"]["status"] == "done"
    r = _cli(
        "generate",
        "--run-dir",
        str(run_dir),
        "--prompt",
        "The people",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The people") and len(r.stdout) > len("The people")


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--preset", "tiny", "--set", "phases.0.bogus=1"], "unknown key 'phases[0].bogus'"),
        (["run", "--preset", "tiny", "--set", "phases.0.tokens=-1"], "tokens must be positive"),
        (["status", "--run-dir", "/nonexistent/run"], "not a deeplm run directory"),
        (["generate", "--run-dir", "/nonexistent/run", "--prompt", "x"], "not a deeplm run"),
    ],
)
def test_cli_bad_input_gives_clear_errors(args, message, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_source_file_fails_stage_with_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"valid start \xff\xfe invalid utf-8 " * 50)
    d = micro_config(sources=[{"kind": "files", "path": str(bad)}])
    cfg = config_from_dict(d)
    with pytest.raises(Exception, match="bad.txt"):
        run_local(tmp_path / "run", cfg, log=lambda s: None)
    st = status(tmp_path / "run")
    prep = next(s for s in st["stages"] if s["name"] == "prepare")
    assert prep["status"] == "failed" and "bad.txt" in prep["error"]
    assert Path(tmp_path / "run" / "config.json").exists()
