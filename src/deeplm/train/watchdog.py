"""The stall watchdog: a daemon thread that reports an optimizer step running too long."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StallWatchdog:
    """A daemon thread that reports an optimizer step running longer than ``timeout_s``
    (a hung data read, a deadlocked collective, a swapping machine) — once per stall.

    The training loop calls :meth:`beat` around each step; ``timeout_s <= 0`` disables it."""

    def __init__(self, timeout_s: float, report: Callable[[float], None]):
        self.timeout_s = timeout_s
        self.report = report
        self._last = time.monotonic()
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="deeplm-stall")

    def __enter__(self) -> StallWatchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self) -> None:
        """The loop made progress: restart the clock (and allow a new report)."""
        self._last = time.monotonic()
        self._reported = False

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s and not self._reported:
                self._reported = True
                self.report(waited)
