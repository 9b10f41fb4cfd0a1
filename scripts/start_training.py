#!/usr/bin/env python
"""Run deeplm's pipeline through Temporal (same as ``deeplm temporal ...``).

    python scripts/start_training.py start --preset tiny [--with-worker] [--detach]
    python scripts/start_training.py status --run-dir runs/tiny
    python scripts/start_training.py cancel --run-dir runs/tiny
    python scripts/start_training.py list

``start`` starts a local Temporal dev server when none answers (or uses --temporal-address),
starts the run's workflow (or attaches to it when it is already running) and follows it until
it ends. See docs/temporal.md.
"""

from __future__ import annotations

import sys

from deeplm.cli import main

if __name__ == "__main__":
    # ``deeplm temporal`` leaves with os._exit once done: the Temporal SDK can crash the
    # interpreter at shutdown after the work succeeded (temporalio/sdk-python#300).
    sys.exit(main(["temporal", *sys.argv[1:]]))
