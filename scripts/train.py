#!/usr/bin/env python
"""Train a run in-process (same as ``deeplm run``), or ``--smoke-test``: check model, one short
training run, checkpoint round trip and generation on CPU in seconds."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if "--smoke-test" in argv:
        from deeplm.smoke import run_smoke_test

        run_smoke_test()
        return 0
    from deeplm.cli import main as cli_main

    return cli_main(["run", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
