"""The run directory's lock: only one process may drive a run directory at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deeplm.run.layout import RunLayout

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no advisory lock available
    fcntl = None  # type: ignore[assignment]


class RunLocked(RuntimeError):
    """Another process is driving this run directory."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the run directory (POSIX: Linux and macOS)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(RunLayout(run_dir).lock, "a+")  # noqa: SIM115
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RunLocked(
                    f"{run_dir} is in use by {holder}; wait for it to finish or stop it first"
                ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()
