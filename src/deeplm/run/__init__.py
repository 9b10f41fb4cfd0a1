"""The run directory: its layout (:mod:`~deeplm.run.layout`, the one place that knows every
path), its lock, its StateDB, its recorded config file and its checkpoint folders (format and
discovery). Low level: imports only ``atomic`` and ``config`` of deeplm."""

from deeplm.run.layout import RunLayout
from deeplm.run.lock import RunLocked, run_lock

__all__ = ["RunLayout", "RunLocked", "run_lock"]
