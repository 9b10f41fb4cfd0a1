"""The run directory's on-disk format is a contract: :class:`RunLayout` names every file exactly
as runs made before it did (so old run directories keep working), finds checkpoints, and a run
directory whose files sit at those literal paths is resumed, not redone."""

from __future__ import annotations

from pathlib import Path

from deeplm.config import config_from_dict
from deeplm.pipeline.local import run_local
from deeplm.run.layout import RunLayout
from deeplm.run.state_db import StateDB
from tests.helpers import micro_config


def test_paths_are_the_on_disk_format(tmp_path):
    """Every name as written by deeplm before the layout had one home (spelled out here on
    purpose: changing one breaks every existing run directory)."""
    r = tmp_path
    lay = RunLayout(r)
    assert lay.config == r / "config.json"
    assert lay.state_db == r / "state.db"
    assert lay.lock == r / ".lock"
    assert lay.docs("p1", "train") == r / "data" / "p1" / "train.jsonl"
    assert lay.doc_parts("p1") == r / "data" / "p1" / "parts"
    assert lay.tokenizer == r / "tokenizer" / "tokenizer.json"
    assert lay.tokenizer_staging == r / "tokenizer" / ".import"
    assert lay.shard("p1", "val") == r / "shards" / "p1" / "val"
    assert lay.phase_checkpoints(0, "p1") == r / "checkpoints" / "1-p1"
    assert lay.metrics("p1") == r / "metrics" / "p1.jsonl"
    assert lay.samples("p1") == r / "metrics" / "p1.samples.jsonl"
    assert lay.tensorboard_dir == r / "tensorboard"
    assert lay.dist_dir(1, "p2") == r / "dist" / "2-p2"
    assert lay.dist_config(1, "p2") == r / "dist" / "2-p2" / "config.json"
    assert lay.follow_config(3) == r / "dist" / "follow-node3.json"
    assert lay.report == r / "report.md"
    assert lay.report_dir == r / "report"
    assert lay.eval_dir == r / "eval"
    assert lay.temporal_dir == r / "temporal"
    assert lay.temporal_worker_log == r / "temporal" / "worker.log"
    assert RunLayout(str(r)) == lay  # a str is accepted, and layouts compare by root


def test_an_interrupted_run_directory_resumes_from_its_files(tmp_path):
    """Stop a run after its first checkpoint; every file is where runs have always put it; the
    same command resumes it (data and tokenizer not redone, training from the checkpoint)."""
    cfg = config_from_dict(micro_config())
    run = tmp_path / "run"
    ckpts = run / "checkpoints" / "1-p1"

    def stop() -> bool:
        return any(ckpts.glob("step-*"))

    first = run_local(run, cfg, log=lambda s: None, should_stop=stop)
    assert first["status"] == "paused"
    for rel in (
        "config.json",
        "state.db",
        ".lock",
        "data/p1/train.jsonl",
        "data/p1/val.jsonl",
        "tokenizer/tokenizer.json",
        "shards/p1/train.bin",
        "shards/p1/val.json",
        "metrics/p1.jsonl",
    ):
        assert (run / rel).is_file(), rel
    stopped_at = sorted(ckpts.glob("step-*"))[-1]
    assert RunLayout(run).latest_checkpoint(cfg) == stopped_at
    assert RunLayout(run).final_checkpoint(cfg, 0) is None

    logs: list[str] = []
    second = run_local(run, cfg, log=logs.append)
    assert second["status"] == "done"
    stages = second["stages"]
    assert all(stages[s]["skipped"] for s in ("prepare", "tokenizer", "tokenize:p1")), stages
    assert not stages["train:p1"]["skipped"] and not stages["evaluate"]["skipped"]
    final = RunLayout(run).final_checkpoint(cfg, 0)
    assert final is not None and final.parent == ckpts
    assert (run / "report.md").is_file() and (run / "report" / "eval.json").is_file()
    db = StateDB(run / "state.db", readonly=True)
    try:
        row = db.phases()[0]
        assert row.status == "done" and Path(row.final_checkpoint) == final
        resumed = [e for e in db.events(limit=200) if "resum" in e["message"].lower()]
        assert resumed, "training resumed from the checkpoint"
    finally:
        db.close()
