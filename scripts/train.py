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
    if "-h" in argv or "--help" in argv:
        print(
            "usage: scripts/train.py --smoke-test | [deeplm run options]\n\n"
            "  --smoke-test  model, a short training run, checkpoint round trip and generation\n"
            "                on CPU in seconds (nothing else is read or written)\n\n"
            "Anything else is passed to `deeplm run`, whose options follow:\n"
        )
    from deeplm.cli import main as cli_main

    return cli_main(["run", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
