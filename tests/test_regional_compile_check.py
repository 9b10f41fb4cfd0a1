"""bench/regional_compile_check.py runs its comparison (eager vs whole-model vs regional compile)
and passes where the backend is correct (aot_eager: no code generation, seconds on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_regional_compile_check_compares_gradients_with_eager():
    cmd = [sys.executable, str(REPO / "bench" / "regional_compile_check.py")]
    cmd += ["--layers", "2", "--seq-len", "16", "--batch", "2", "--backend", "aot_eager"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("2 layers x ")
    rows = [line for line in lines if "aot_eager" in line]
    assert len(rows) == 2 and "regional" in rows[1]
    assert all("grad gap 0.00e+00" in row and "WRONG" not in row for row in rows)
