"""How the training loop talks to its orchestrator (the local driver, a Temporal activity, the
torchrun launcher): progress, stop requests, log lines and events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainHooks:
    """Callbacks of one phase's training.

    ``on_progress(info)``: after each logged step and each periodic checkpoint;
    ``should_stop()``: asked before each optimizer step (True: checkpoint and stop);
    ``log(line)``: human-readable lines; ``on_event(kind, message, data)``: rollbacks, freezes,
    curriculum changes, plateau stops, stalls."""

    on_progress: Callable[[dict[str, Any]], None] = lambda info: None
    should_stop: Callable[[], bool] = lambda: False
    log: Callable[[str], None] = print
    on_event: Callable[[str, str, dict[str, Any]], None] = lambda kind, msg, data: None
