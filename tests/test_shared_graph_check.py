"""bench/shared_graph_check.py on CPU: two trainings of a finished micro run's first phase in one
process, without and with rare-token weights, each first step timed from the trainer's log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.finished_run import cli_env, micro_run

REPO = Path(__file__).resolve().parents[1]


def test_shared_graph_check_times_both_first_steps(tmp_path_factory, tmp_path):
    run = micro_run(tmp_path_factory)
    out = tmp_path / "shared.json"
    cmd = [sys.executable, str(REPO / "bench" / "shared_graph_check.py"), str(run)]
    cmd += ["--steps", "2", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("first step at context") == 2
    first = json.loads(out.read_text())["first_step_s"]
    assert set(first) == {"unweighted", "weighted"} and all(s >= 0 for s in first.values())
