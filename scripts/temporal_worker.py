#!/usr/bin/env python
"""Run a deeplm Temporal worker (same as ``deeplm worker``): serves the cpu and gpu task queues
of the pipeline until Ctrl-C / SIGTERM. ``--help`` lists the options."""

from __future__ import annotations

import sys

from deeplm.cli import main

if __name__ == "__main__":
    # ``deeplm worker`` leaves with os._exit once done: the Temporal SDK can crash the
    # interpreter at shutdown after the work succeeded (temporalio/sdk-python#300).
    sys.exit(main(["worker", *sys.argv[1:]]))
