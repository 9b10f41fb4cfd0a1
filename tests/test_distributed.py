"""Data-parallel training on CPU with real torchrun processes and the gloo backend.

Tolerances: DDP with 2 processes and 1 process with the same global batch reach the same fp32
weights up to summation order, checked with ``atol=1e-5, rtol=0`` (measured: up to 7e-7 after 6
steps). FSDP2 is checked with ``atol=2e-3`` (measured: 1.1e-3; see docs/distributed.md). Dropout
is off in these configs: with dropout each rank draws its own masks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deeplm.config import RunConfig, TrainConfig, config_from_dict, config_to_json
from deeplm.data.shards import Shard
from deeplm.pipeline.open_run import open_run
from deeplm.pipeline.stages import RunContext, StageStopped, train_phase
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.run.run_config import load_run_config
from deeplm.tokenizer import Tokenizer
from deeplm.train import distributed, distributed_main
from deeplm.train.trainer import PhaseTrainer, TrainHooks
from tests.helpers import micro_config

ATOL = 1e-5
FSDP_ATOL = 2e-3
PHASE = "1-p1"


def _config(**overrides) -> RunConfig:
    phase = dict(tokens=6 * 4 * 64, micro_batch=2, grad_accum=2, save_every=2, keep_last=10)
    d = micro_config(**(phase | overrides))
    d["model"]["resid_dropout"] = 0.0
    d["model"]["embd_dropout"] = 0.0
    # fp32 maths: bf16 autocast (the default on CPUs with AMX) rounds differently when the
    # thread count differs (ranks run with one thread each), which Adam then magnifies
    d["train"]["precision"] = "fp32"
    d["phases"][0]["val_fraction"] = 0.05
    d["clean"] = {"chunk_chars": 4000}
    return config_from_dict(d)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    """A run directory with the session corpus's tokenizer and shards as phase p1's, and no
    checkpoints (copied by each test)."""
    run = tmp_path_factory.mktemp("dist") / "prepared"
    RunLayout(run).tokenizer.parent.mkdir(parents=True)
    shutil.copy(corpus["root"] / "tokenizer.json", RunLayout(run).tokenizer)
    shards = RunLayout(run).shard("p1", "train").parent
    shutil.copytree(corpus["root"] / "shards", shards)
    (run / "config.json").write_text(config_to_json(_config()))
    return run


def _copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def _torchrun_cmd(run: Path, nproc: int, cfg: RunConfig | None = None) -> list[str]:
    args = [str(run), "0"]
    if cfg is not None:
        path = run / "test-config.json"
        path.write_text(config_to_json(cfg))
        args += ["--config", str(path)]
    return distributed.torchrun_command(TrainConfig(devices=nproc), args)


def _torchrun(run: Path, nproc: int, cfg: RunConfig | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _torchrun_cmd(run, nproc, cfg),
        env=distributed.launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _train_in_process(run: Path) -> None:
    cfg = load_run_config(run)
    tok = Tokenizer.load(RunLayout(run).tokenizer)
    shards = {s: Shard.open(RunLayout(run).shard("p1", s), tok.hash) for s in ("train", "val")}
    trainer = PhaseTrainer(
        cfg, 0, run, tok, shards["train"], shards["val"], hooks=TrainHooks(log=lambda s: None)
    )
    assert trainer.run().status == "done"


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / PHASE / f"step-{step:07d}" / ckpt.WEIGHTS))


def _assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL
) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"
    return worst


def _state(run: Path, step: int) -> dict:
    return ckpt.load_trainer_state(run / "checkpoints" / PHASE / f"step-{step:07d}")


@pytest.fixture(scope="module")
def one_proc(prepared, tmp_path_factory) -> Path:
    run = _copy(prepared, tmp_path_factory.mktemp("one") / "run")
    _train_in_process(run)
    return run


@pytest.fixture(scope="module")
def two_proc(prepared, tmp_path_factory) -> Path:
    run = _copy(prepared, tmp_path_factory.mktemp("two") / "run")
    out = _torchrun(run, 2)
    assert "@@deeplm-dist" in out.stdout  # rank 0's progress lines for the launcher
    return run


def test_two_processes_match_one_process(one_proc, two_proc):
    _assert_close(_weights(one_proc, 6), _weights(two_proc, 6))
    a, b = _state(one_proc, 6), _state(two_proc, 6)
    assert a["loader"] == b["loader"] and a["tokens"] == b["tokens"] == 6 * 256
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    # rank 0 alone wrote metrics: one record per step, no duplicates
    recs = [json.loads(x) for x in (two_proc / "metrics" / "p1.jsonl").open()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    result = json.loads((two_proc / "dist" / PHASE / distributed.RESULT_FILE).read_text())
    assert result["status"] == "done" and result["step"] == 6


def test_micro_batch_split_matches_one_process(prepared, one_proc, tmp_path):
    """grad_accum 1, micro_batch 4: each of 2 ranks takes 2 windows per micro-batch."""
    run = _copy(prepared, tmp_path / "run")
    cfg = _config(micro_batch=4, grad_accum=1)
    _torchrun(run, 2, cfg)
    _assert_close(_weights(one_proc, 6), _weights(run, 6))


def test_checkpoints_cross_world_sizes(one_proc, two_proc, tmp_path):
    ref = _weights(one_proc, 6)
    # a 2-process checkpoint resumes in 1 process
    run = tmp_path / "2to1"
    shutil.copytree(two_proc, run)
    shutil.rmtree(run / "checkpoints" / PHASE / "step-0000006")
    _train_in_process(run)
    _assert_close(ref, _weights(run, 6))
    # a 1-process checkpoint resumes in 2 processes
    run = tmp_path / "1to2"
    shutil.copytree(one_proc, run)
    shutil.rmtree(run / "checkpoints" / PHASE / "step-0000006")
    out = _torchrun(run, 2)
    assert "resuming from" in out.stdout and "(step 4/6)" in out.stdout
    _assert_close(ref, _weights(run, 6))


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of ``parent``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker pids through /proc")
def test_killed_rank_resumes_from_last_checkpoint(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    cfg = _config(tokens=20 * 4 * 64)  # 20 steps, a checkpoint every 2
    proc = subprocess.Popen(
        _torchrun_cmd(run, 2, cfg),
        env=distributed.launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    phase_dir = run / "checkpoints" / PHASE
    deadline = time.monotonic() + 90
    while not (phase_dir / "step-0000004").is_dir() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode != 0  # torchrun reports the failed rank
    last = ckpt.latest_checkpoint(phase_dir)
    assert last is not None and 4 <= last.step < 20 and not last.meta.get("final")
    out = _torchrun(run, 2, cfg)
    assert f"(step {last.step}/20)" in out.stdout
    progress = [
        json.loads(line.split(distributed.EVENT_PREFIX, 1)[1])
        for line in out.stdout.splitlines()
        if distributed.EVENT_PREFIX in line
    ]
    steps = [p["step"] for p in progress if "loss" in p]
    assert steps[0] == last.step + 1 and steps[-1] == 20  # nothing before the checkpoint redone
    recs = [json.loads(x) for x in (run / "metrics" / "p1.jsonl").open()]
    train_steps = [r["step"] for r in recs if "loss" in r]
    assert train_steps == list(range(1, 21))


def test_train_activity_launches_torchrun_and_forwards_stop(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "run")
    cfg = _config()
    cfg.train.devices = 2
    db = open_run(run, cfg)
    logs: list[str] = []
    seen: list[dict] = []
    ctx = RunContext(
        run_dir=run,
        cfg=cfg,
        db=db,
        progress=seen.append,
        log=logs.append,
        should_stop=lambda: any(p.get("step", 0) >= 2 for p in seen),
    )
    with pytest.raises(StageStopped):
        train_phase(ctx, 0)
    assert any("launching 2 processes" in line and "torch.distributed.run" in line for line in logs)
    assert db.stage("train:p1").status == "paused"
    stopped = ckpt.latest_checkpoint(run / "checkpoints" / PHASE)
    assert stopped is not None and 2 <= stopped.step < 6
    ctx.should_stop = lambda: False
    out = train_phase(ctx, 0)
    assert out["steps"] == 6 and Path(out["final_checkpoint"]).name == "step-0000006"
    assert db.stage("train:p1").status == "done"
    db.close()


def test_a_rank_lost_while_shutting_down_loses_nothing(prepared, tmp_path, monkeypatch):
    """Rank 0 reports the phase only after its last barrier; a rank that dies afterwards (here:
    SIGABRT on exit, as gloo does when a peer hangs up first) makes torchrun exit non-zero, but
    the outcome stands because its checkpoint is complete. The warning quotes the cause."""
    real = distributed.torchrun_command
    monkeypatch.setattr(
        distributed,
        "torchrun_command",
        lambda train, args: real(train, args, module="tests.dist_rank_dies_on_exit"),
    )
    run = _copy(prepared, tmp_path / "run")
    cfg = _config()
    cfg.train.devices = 2
    db = open_run(run, cfg)
    logs: list[str] = []
    ctx = RunContext(run_dir=run, cfg=cfg, db=db, progress=lambda info: None, log=logs.append)
    out = train_phase(ctx, 0)
    assert out["steps"] == 6 and Path(out["final_checkpoint"]).name == "step-0000006"
    assert db.stage("train:p1").status == "done"
    assert any("a rank failed while shutting down" in line for line in logs)
    db.close()


def test_fsdp2_matches_one_process_and_shares_the_checkpoint_format(prepared, one_proc, tmp_path):
    """FSDP2 (gloo, CPU): 2 sharded processes stay close to 1 process (FSDP_ATOL; not as close
    as DDP: its gradients are accumulated and reduced in another order, and Adam magnifies
    rounding where gradients nearly cancel). Its full-state checkpoint, gathered on rank 0, has
    the single-process format and resumes in one plain process."""
    run = _copy(prepared, tmp_path / "fsdp")
    cfg = _config()
    cfg.train.parallel = "fsdp2"
    _torchrun(run, 2, cfg)
    ref = _weights(one_proc, 6)
    _assert_close(ref, _weights(run, 6), FSDP_ATOL)
    a, b = _state(one_proc, 6), _state(run, 6)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["loader"] == b["loader"]
    shutil.rmtree(run / "checkpoints" / PHASE / "step-0000006")
    _train_in_process(run)  # the FSDP2 step-4 checkpoint, resumed in one process (config.json)
    _assert_close(ref, _weights(run, 6), FSDP_ATOL)


def test_muon_under_ddp_matches_one_process(prepared, tmp_path):
    """Muon + AdamW under DDP: the same orthogonalised updates as one process (the
    Newton-Schulz iteration runs in bf16, so rounding of nearly equal gradients may differ:
    FSDP_ATOL), and its two-optimizer state resumes across world sizes."""
    cfg = _config(optimizer="muon", adamw_lr=1e-3)
    one = _copy(prepared, tmp_path / "one")
    (one / "config.json").write_text(config_to_json(cfg))
    _train_in_process(one)
    two = _copy(prepared, tmp_path / "two")
    _torchrun(two, 2, cfg)
    ref = _weights(one, 6)
    _assert_close(ref, _weights(two, 6), FSDP_ATOL)
    state = _state(two, 6)["optimizer"]
    assert set(state) == {"muon", "adamw"}
    shutil.rmtree(two / "checkpoints" / PHASE / "step-0000006")
    (two / "config.json").write_text(config_to_json(cfg))
    _train_in_process(two)  # the 2-process step-4 checkpoint, resumed in one process
    _assert_close(ref, _weights(two, 6), FSDP_ATOL)


def test_train_settings_are_validated_and_split_the_step():
    from deeplm.config import ConfigError

    for bad in ({"devices": 0}, {"nodes": 2}, {"parallel": "zero3"}, {"node_rank": 1}):
        d = micro_config()
        d["train"].update(bad)
        with pytest.raises(ConfigError):
            config_from_dict(d)
    d = micro_config()
    d["train"].update(nodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500", devices=4)
    cfg = config_from_dict(d)
    cmd = distributed.torchrun_command(cfg.train, ["run", "0"])
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=10.0.0.1" in cmd
    assert cfg.fingerprint() == config_from_dict(micro_config()).fingerprint()
    phase = _config(micro_batch=4, grad_accum=6).phases[0]
    assert distributed.split_batch(phase, 2) == (3, 1)  # keep micro_batch, split grad_accum
    assert distributed.split_batch(phase, 4) == (6, 4)  # split micro_batch
    with pytest.raises(distributed.DistributedConfigError):
        distributed.split_batch(phase, 5)


def test_a_later_phase_writes_its_result_into_its_own_dist_folder(one_proc, tmp_path):
    """The rank entry point for phase 1 (not under torchrun: one process) starts from phase 0's
    final checkpoint and writes result.json into ``dist/2-p2``, next to where the launcher
    looks for it and its STOP file (not into phase 0's checkpoint folder)."""
    run = _copy(one_proc, tmp_path / "run")
    layout = RunLayout(run)
    shutil.copytree(layout.shards_dir("p1"), layout.shards_dir("p2"))
    d = json.loads(config_to_json(_config()))
    d["phases"].append(dict(d["phases"][0], name="p2", tokens=2 * 4 * 64))
    path = run / "two-phases.json"
    path.write_text(json.dumps(d))
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert distributed_main.main([str(run), "1", "--config", str(path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    result = json.loads((layout.dist_dir(1, "p2") / distributed.RESULT_FILE).read_text())
    assert result["status"] == "done" and result["final_checkpoint"]
    assert not (layout.phase_checkpoints(0, "p1") / distributed.RESULT_FILE).exists()
