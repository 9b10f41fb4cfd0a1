"""A finished 2-phase micro run shared by the "use the model" tests (chat, eval, export, serve).

:func:`micro_run` runs the real pipeline once per test session into a fixed folder under pytest's
base temp dir; later calls find every stage done and return at once (the pipeline is idempotent),
so test modules can share it without a conftest fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from deeplm.config import config_from_dict
from deeplm.pipeline.local import run_local
from tests.helpers import two_phase_config

RUN_NAME = "usemodel"


def micro_run_config() -> dict:
    d = two_phase_config()
    d["name"] = RUN_NAME
    return d


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny ops: one torch thread is much faster on a busy 2-core machine. The previous count
    is restored (other tests compare runs across processes and need the default)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def micro_run(tmp_path_factory) -> Path:
    """The run directory of a finished micro run (trained, evaluated, report written)."""
    run_dir = tmp_path_factory.getbasetemp() / "usemodel-run"
    with one_thread():
        summary = run_local(run_dir, config_from_dict(micro_run_config()), log=lambda s: None)
    assert summary["status"] == "done", summary
    return run_dir


def cli_env() -> dict[str, str]:
    """Environment for ``python -m deeplm.cli`` subprocesses (one torch thread, no hub)."""
    return os.environ | {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deeplm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )
