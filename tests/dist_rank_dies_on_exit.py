"""A torchrun worker for tests: the real ``deeplm.train.distributed_main``, after which rank 1
aborts the way gloo does when a peer closes its connections early (SIGABRT), so the launcher's
handling of a rank lost while shutting down can be checked with real processes."""

from __future__ import annotations

import os
import sys

from deeplm.train.distributed_main import main

if __name__ == "__main__":
    rc = main()
    if os.environ.get("RANK") == "1":
        os.abort()
    sys.exit(rc)
