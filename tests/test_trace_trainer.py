"""bench/trace_trainer.py on CPU: the pipeline's trainer on a finished micro run's first phase,
its three windows measured, the profiler's summary and trace written, the run left untouched."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.trace_trainer import gap_table, kernel_table
from tests.finished_run import cli_env, micro_run

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_trace_trainer_measures_the_windows_of_the_pipeline_trainer(tmp_path_factory, tmp_path):
    run = micro_run(tmp_path_factory)
    before = _tree(run)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "trace_trainer.py"), str(run), "--out", str(out)]
    cmd += ["--warmup", "2", "--timed", "4", "--synced", "2", "--profiled", "2"]
    cmd += ["--set", "phases.0.lr=0.002"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tokens/s (timed window, 4 steps)" in r.stdout
    fig = json.loads((out / "trace-summary.json").read_text())
    assert fig["phase"] == "grammar" and fig["device"] == "cpu"
    assert fig["overrides"] == ["phases.0.lr=0.002"]
    assert fig["timed_steps"] == 4 and fig["tokens_per_s"] > 0
    assert 0 < fig["host_step_ms"]["p10"] <= fig["host_step_ms"]["max"]
    synced = fig["synced"]
    assert 0 < synced["host_issue_ms"] <= synced["step_ms"]
    assert fig["profile"]["step_ms"] > 0
    slow = fig["slowest_steps"]
    assert [r["step"] for r in slow] and all(2 <= r["step"] < 6 for r in slow)
    assert slow[0]["ms"] == max(r["ms"] for r in slow) and slow[0]["gc_ms"] >= 0
    assert set(fig["gc"]["measured"]) == {"0", "1", "2"}
    with gzip.open(out / "trace.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"deeplm.train_step", "deeplm.data", "deeplm.clip_grad_norm"} <= names
    assert not (out / "scratch").exists()
    assert _tree(run) == before  # the run directory is only read
    again = [sys.executable, str(REPO / "bench" / "trace_trainer.py"), "--from-trace", str(out)]
    r = subprocess.run(again, capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode == 0 and "profiled: kernels" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "trace-summary.json").read_text())["profiled_steps"] == 2


def test_trace_trainer_refuses_windows_longer_than_the_phase(tmp_path_factory, tmp_path):
    run = micro_run(tmp_path_factory)
    cmd = [sys.executable, str(REPO / "bench" / "trace_trainer.py"), str(run)]
    cmd += ["--out", str(tmp_path / "out"), "--timed", "100000"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode != 0 and "lower --warmup/--timed" in r.stderr


def test_gap_table_attributes_each_idle_gap_to_the_host_range_that_issued_the_next_kernel():
    def kernel(ts, dur, corr):
        return {"cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"cat": "cuda_runtime", "tid": 1, "ts": ts, "dur": 1, "args": {"correlation": corr}}

    def host(name, ts, dur):
        return {"cat": "user_annotation", "tid": 1, "name": name, "ts": ts, "dur": dur}

    events = [
        host("deeplm.train_step", 0, 1000),
        host("deeplm.data", 0, 100),
        host("Optimizer.step#Muon.step", 400, 500),
        launch(90, 1), kernel(100, 200, 1),  # starts the GPU's span
        launch(250, 2), kernel(300, 50, 2),  # 0 us after the first: no gap
        launch(500, 3), kernel(550, 100, 3),  # 200 us idle, issued inside the optimizer step
        launch(95, 4), kernel(660, 40, 4),  # 10 us idle: under the threshold, counted as idle
    ]  # fmt: skip
    t = gap_table(events, steps=1, gap_us=20)
    assert t["idle_ms_per_step"] == pytest.approx(0.21)
    assert t["gpu_span_ms_per_step"] == pytest.approx(0.6)
    assert list(t["by_issuer"]) == ["Optimizer.step#Muon.step"]
    assert t["by_issuer"]["Optimizer.step#Muon.step"]["ms_per_step"] == pytest.approx(0.2)


def test_kernel_table_counts_gpu_work_only_not_annotations_or_host_ranges():
    events = [
        {"cat": "kernel", "name": "nvjet_sm90_gemm", "ts": 0, "dur": 3000},
        {"cat": "kernel", "name": "nvjet_sm90_gemm", "ts": 3000, "dur": 1000},
        {"cat": "kernel", "name": "triton_poi_fused_gelu_0", "ts": 4000, "dur": 2000},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 6000, "dur": 500},
        {"cat": "gpu_user_annotation", "name": "deeplm.train_step", "ts": 0, "dur": 9000},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50},
    ]
    t = kernel_table(events, steps=2, step_s=0.005)
    assert t["kernel_ms_per_step"] == pytest.approx(3.25)
    assert t["by_kind_ms"]["gemm"] == pytest.approx(2.0)
    assert t["by_kind_ms"]["triton (fused elementwise/norm/reduction)"] == pytest.approx(1.0)
    assert t["gpu_busy_fraction"] == pytest.approx(0.65)
    assert t["top_kernels"][0] == {
        "name": "nvjet_sm90_gemm", "calls_per_step": 1.0, "ms_per_step": 2.0,
    }  # fmt: skip
    assert "deeplm.train_step" not in {k["name"] for k in t["top_kernels"]}
