"""bench/gpu_playbook.sh end to end on CPU (ALLOW_CPU=1), on a copy of the finished micro run:
`deeplm run` (every stage already done), `deeplm eval`, `deeplm export --verify`, `deeplm serve`
asked through the real `openai` client, the summary and the archive under $OUT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.fault_injection import to_toml
from tests.finished_run import cli_env, micro_run
from tests.helpers import drop_none

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return micro_run(tmp_path_factory)


def _playbook(run: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = ["bash", str(REPO / "bench" / "gpu_playbook.sh"), str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.slow
def test_gpu_playbook_script_runs_every_step_and_leaves_the_results(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns(".lock"))
    config = tmp_path / "run.toml"
    config.write_text(to_toml(drop_none(json.loads((run / "config.json").read_text()))))
    out = tmp_path / "out"
    env = cli_env() | {"CONFIG": str(config), "ALLOW_CPU": "1", "OUT": str(out)}
    env["ASK_TOKENS"] = "16"  # the micro model's context is 64 tokens
    env["PYTHON"] = sys.executable  # the interpreter with deeplm and the test extras
    env["TRACE"] = "1"  # and where a step's time goes (bench/trace_trainer.py), briefly
    env["TRACE_ARGS"] = "--warmup 2 --timed 4 --synced 2 --profiled 2"
    _playbook(run, env)
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu.txt", "pipeline.log", "run.tgz", "summary.json", "summary.md",
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["grammar", "vocabulary"]
    for phase in summary["phases"]:
        assert phase["status"] == "done" and phase["tokens"] > 0
        assert phase["train_s"] > 0 and phase["tokens_per_s"] > 0
        assert phase["compile_s"] > 0  # the first step of its graph state, kept apart
    assert summary["export_max_logit_diff"] is not None
    assert summary["export_max_logit_diff"] < 1e-3
    serve = summary["serve"]
    assert serve["ok"] is True, serve
    assert all(serve[k]["answer"].strip() for k in ("chat", "completion", "stream"))
    assert serve["stream"]["chunks"] > 1
    trace = summary["trace"]
    assert trace["phase"] == "grammar" and trace["step_ms_p50"] > 0
    assert trace["host_bound"] in (True, False) and trace["host_issue_ms"] > 0
    assert "## Where a training step's time goes (grammar" in (out / "summary.md").read_text()
    assert "## Served" in (out / "summary.md").read_text()
    with tarfile.open(out / "run.tgz") as tar:
        names = set(tar.getnames())
    kept = ("report.md", "eval/report.md", "./serve.json", "./export.log", "./status.json")
    for name in kept + ("trace/trace-summary.json", "trace/trace.json.gz"):
        assert name in names, sorted(names)
    assert any(n.startswith("report/") and n.endswith(".png") for n in names)
    # waiting again finds the run finished and does the steps after training once more
    r = _playbook(run, env | {"STAGE": "wait"})
    assert "deeplm run" not in r.stdout.split("deeplm eval")[0]  # nothing started
