#!/usr/bin/env python
"""Run a deeplm Temporal worker (same as ``deeplm worker``): serves the cpu and gpu task queues
of the pipeline until Ctrl-C / SIGTERM. ``--help`` lists the options."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from deeplm.workflows.worker import main as worker_main

    return worker_main(argv)


if __name__ == "__main__":
    from deeplm.workflows.temporal_client import hard_exit

    # Leave with os._exit once done: the Temporal SDK can crash the interpreter at shutdown after
    # the work succeeded (temporalio/sdk-python#300); that must not read as a failure.
    hard_exit(main(sys.argv[1:]))
