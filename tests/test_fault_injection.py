"""Fault injection (fast subset of bench/fault_injection.py) and integrity on start: a run that is
SIGKILLed in several stages and restarted ends byte-identical to an uninterrupted one, and a
corrupted or missing artifact is detected, moved aside and rebuilt (or training falls back to
the previous good checkpoint) with the same final result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import fault_injection as fi
from deeplm.config import load_config
from deeplm.pipeline.local import run_local
from deeplm.pipeline.stages import RunContext, open_verified_shard
from deeplm.run.layout import RunLayout
from deeplm.run.run_config import load_run_config
from deeplm.run.state_db import StateDB

PHASES = ["grammar", "vocabulary"]


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fault")
    lines: list[str] = []
    survived, problems, res = fi.run(3, seed=1, workdir=workdir, say=lines.append)
    return workdir, survived, problems, res, lines


def test_kills_in_three_stages_are_survived(injected):
    workdir, survived, problems, res, lines = injected
    assert not problems, "\n".join(lines)
    assert survived == 3 and len(res.kills) == 3, "\n".join(lines)
    assert {k.stage for k in res.kills} - {"between stages"}, lines  # kills landed in stages


def test_schedule_spreads_over_every_stage():
    import random

    targets = [s for s, _ in fi.kill_schedule(30, random.Random(0))]
    assert set(targets) == set(fi.STAGES_ORDER)
    assert targets == sorted(targets, key=fi.STAGES_ORDER.index)


def _copy_finished(injected, tmp_path) -> Path:
    workdir = injected[0]
    run_dir = tmp_path / "run"
    shutil.copytree(workdir / "reference", run_dir)
    return run_dir


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def _rerun(run_dir: Path, workdir: Path) -> tuple[dict, list[str]]:
    """Run the pipeline again in-process, with the thread count of the harness's subprocesses
    (bit-identical weights need the same float reduction order as the reference run)."""
    import torch

    cfg = load_config(config_file=workdir / "config.toml")
    logs: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(int(fi._env()["OMP_NUM_THREADS"]))
    try:
        summary = run_local(run_dir, cfg, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] == "done", logs
    return summary, logs


def test_corrupt_shard_is_moved_aside_and_rebuilt(injected, tmp_path):
    workdir = injected[0]
    run_dir = _copy_finished(injected, tmp_path)
    shard = run_dir / "shards" / "grammar" / "train.bin"
    _flip_byte(shard)
    summary, logs = _rerun(run_dir, workdir)
    assert any("train.bin" in f and "sha256" in f for f in summary["integrity"]), logs
    assert (shard.parent / "train.bin.corrupt").is_file()
    assert shard.read_bytes() == (workdir / "reference" / "shards/grammar/train.bin").read_bytes()
    assert not summary["stages"]["tokenize:grammar"]["skipped"]
    assert fi.compare_runs(workdir / "reference", run_dir, PHASES) == []


def test_corrupt_final_checkpoint_falls_back_to_previous_good(injected, tmp_path):
    workdir = injected[0]
    run_dir = _copy_finished(injected, tmp_path)
    final = fi._final_checkpoint(run_dir, 1, "vocabulary")
    _flip_byte(final / "model.safetensors", 5000)
    summary, logs = _rerun(run_dir, workdir)
    assert any("model.safetensors" in f for f in summary["integrity"]), logs
    assert final.with_name(final.name + ".corrupt").is_dir()
    assert not summary["stages"]["train:vocabulary"]["skipped"]
    assert summary["stages"]["train:grammar"]["skipped"]  # upstream phase untouched
    # retrained from the previous good checkpoint: bit-identical final weights
    assert fi.compare_runs(workdir / "reference", run_dir, PHASES) == []


def test_missing_tokenizer_is_redone_identically(injected, tmp_path):
    workdir = injected[0]
    run_dir = _copy_finished(injected, tmp_path)
    (run_dir / "tokenizer" / "tokenizer.json").unlink()
    summary, logs = _rerun(run_dir, workdir)
    assert any("tokenizer.json missing" in f for f in summary["integrity"]), logs
    assert not summary["stages"]["tokenizer"]["skipped"]
    assert fi.compare_runs(workdir / "reference", run_dir, PHASES) == []


def test_intact_run_has_no_findings_and_redoes_nothing(injected, tmp_path):
    workdir = injected[0]
    run_dir = _copy_finished(injected, tmp_path)
    summary, _ = _rerun(run_dir, workdir)
    assert "integrity" not in summary and summary.get("nothing_redone")


def test_unfinished_temp_files_of_a_killed_write_are_removed(injected, tmp_path):
    """A kill in the middle of an atomic write leaves its temp file (the final name never
    appears). The stage that owns the folder removes such files when it runs again, so the
    rerun ends identical to the reference with nothing unfinished left over."""
    workdir = injected[0]
    run_dir = _copy_finished(injected, tmp_path)
    shards = run_dir / "shards" / "grammar"
    (shards / "val.bin").unlink()  # the write that was killed
    stale = [shards / ".val.json.k1ll3d.tmp", shards / ".train.idx.npy.tmp-99"]
    for path in stale:
        path.write_text("half")
    summary, logs = _rerun(run_dir, workdir)
    assert not summary["stages"]["tokenize:grammar"]["skipped"]
    assert not any(p.exists() for p in stale), logs
    assert sum("removed an unfinished file" in line for line in logs) == 2, logs
    assert fi.compare_runs(workdir / "reference", run_dir, PHASES) == []


def test_truncated_shard_at_train_start_is_rebuilt(injected, tmp_path):
    run_dir = _copy_finished(injected, tmp_path)
    val = run_dir / "shards" / "vocabulary" / "val.bin"
    original = val.read_bytes()
    val.write_bytes(original[:-10])
    cfg = load_run_config(run_dir)
    db = StateDB(run_dir / "state.db")
    try:
        ctx = RunContext(run_dir=run_dir, cfg=cfg, db=db, log=lambda s: None)
        from deeplm.tokenizer import Tokenizer

        tok = Tokenizer.load(run_dir / "tokenizer" / "tokenizer.json")
        shard = open_verified_shard(ctx, 1, "val", tok)
        assert shard.n_tokens == len(original) // 2
        assert db.stage("tokenize:vocabulary").status == "done"
    finally:
        db.close()
    assert val.read_bytes() == original
    assert Path(f"{RunLayout(run_dir).shard('vocabulary', 'val')}.bin.corrupt").is_file()


def test_killed_worker_and_server_are_survived_through_temporal(tmp_path):
    """The same harness through Temporal: a real dev server and worker, the worker SIGKILLed
    twice and the server once, each restarted; the final artifacts equal the reference run's."""
    lines: list[str] = []
    survived, problems, res = fi.run(
        3, seed=2, workdir=tmp_path / "fi", say=lines.append, orchestrator="temporal"
    )
    assert not problems, "\n".join(lines)
    assert survived == 3 and res.final_rc == 0
    assert [k.target.split("@")[0] for k in res.kills] == ["worker", "worker", "server"]
