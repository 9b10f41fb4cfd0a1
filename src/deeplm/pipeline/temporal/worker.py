"""The Temporal worker: polls the CPU and/or GPU task queue of deeplm and runs the pipeline's
workflow and stage activities.

One process serves both queues by default (``--queues cpu,gpu``); run ``--queues gpu`` on a
machine with a GPU and ``--queues cpu`` elsewhere to split the work (the run directory must then
be on a filesystem every worker sees at the same path). Activities are synchronous functions run
in a thread pool, so training never blocks the worker's event loop.

Ctrl-C or SIGTERM shuts down gracefully: running stages stop at their next safe point (training
writes a checkpoint first) and report a retryable error, so another worker resumes them. A
second Ctrl-C leaves at once (the newest checkpoint is still there).

The command line is ``deeplm worker`` (or ``deeplm temporal worker``; options in
:mod:`deeplm.cli`); ``scripts/temporal_worker.py`` is a thin wrapper around it.
``temporalio.worker`` is imported where the workers are built: it loads the SDK's native
runtime, which a process that only imports this module (tests, ``--help``) must not load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from deeplm.device import select_device
from deeplm.pipeline.stages import ACTIVITIES
from deeplm.pipeline.temporal.activities import all_activities
from deeplm.pipeline.temporal.client import connect
from deeplm.pipeline.temporal.server import (
    QUEUE_KINDS,
    TemporalServerError,
    ensure_server,
    hard_exit,
    resolve_address,
    server_healthy,
    task_queues,
)
from deeplm.pipeline.temporal.workflow import STAGE_ACTIVITY_NAMES, DeeplmPipeline

# How often a running activity's heartbeat reaches the server at most (the SDK throttles to
# this); it bounds how long a cancel takes to reach a running stage.
HEARTBEAT_THROTTLE = timedelta(seconds=1)


def build_workers(
    client: object,
    queues: list[str],
    prefix: str,
    executor: ThreadPoolExecutor,
    slots: dict[str, int],
    graceful_s: float,
) -> list[object]:
    """One ``temporalio.worker.Worker`` per task queue kind; the workflow runs on the cpu one."""
    from temporalio.worker import Worker  # the native runtime: see the module's docstring

    names = task_queues(prefix)
    identity = f"{socket.gethostname()}:{os.getpid()}"
    device = local_device()
    workers = []
    for kind in queues:
        workers.append(
            Worker(
                client,  # type: ignore[arg-type]
                task_queue=names[kind],
                workflows=[DeeplmPipeline] if kind == "cpu" else [],
                activities=all_activities(),
                activity_executor=executor,
                max_concurrent_activities=slots[kind],
                max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                graceful_shutdown_timeout=timedelta(seconds=graceful_s),
                identity=worker_identity(names[kind], device, identity),
            )
        )
    return workers


def local_device() -> str:
    """The device this machine's stages train on (``cuda``, ``mps`` or ``cpu``)."""
    return select_device("auto").type


def worker_identity(queue: str, device: str, where: str) -> str:
    """A worker's name: the task queue it serves and the device it really has, so a CPU-only
    machine serving the gpu queue reads ``deeplm-gpu queue on cpu@host:pid``, never as a GPU."""
    return f"{queue} queue on {device}@{where}"


def _check_stage_registry() -> None:
    if sorted(ACTIVITIES) != sorted(STAGE_ACTIVITY_NAMES):
        raise RuntimeError(
            f"workflow.STAGE_ACTIVITY_NAMES {sorted(STAGE_ACTIVITY_NAMES)} does not match "
            f"stages.ACTIVITIES {sorted(ACTIVITIES)}"
        )


async def _wait_for_server(address: str, wait_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s if wait_s > 0 else None
    said = False
    while not await server_healthy(address):
        if deadline is not None and loop.time() > deadline:
            raise TemporalServerError(f"no Temporal server answered at {address} in {wait_s:.0f}s")
        if not said:
            print(
                f"waiting for a Temporal server at {address} (scripts/start_training.py start "
                "starts one; or run this worker with --start-server)",
                flush=True,
            )
            said = True
        await asyncio.sleep(1.0)


async def run_worker(args: argparse.Namespace) -> int:
    """Connect (waiting for the server, or starting a dev server with ``--start-server``) and
    serve the queues until SIGINT/SIGTERM."""
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUE_KINDS]
    if bad or not queues:
        raise ValueError(f"--queues takes cpu, gpu or cpu,gpu, not {args.queues!r}")
    _check_stage_registry()
    address = resolve_address(args.temporal_address)
    if args.start_server:
        await ensure_server(address, Path(args.state_dir), ui=True)
    else:
        await _wait_for_server(address, args.wait_for_server)
    client = await connect(address, args.namespace)
    slots = {"cpu": args.cpu_slots, "gpu": args.gpu_slots}
    executor = ThreadPoolExecutor(
        max_workers=sum(slots[q] for q in queues) + 1, thread_name_prefix="deeplm-activity"
    )
    workers = build_workers(client, queues, args.task_queue_prefix, executor, slots, args.graceful)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            print("deeplm worker: leaving now", file=sys.stderr, flush=True)
            hard_exit(130)
        print(
            "\ndeeplm worker: shutting down; running stages stop at their next safe point "
            "(Ctrl-C again to leave at once)",
            file=sys.stderr,
            flush=True,
        )
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    tasks = [asyncio.create_task(w.run()) for w in workers]  # type: ignore[attr-defined]
    names = task_queues(args.task_queue_prefix)
    print(
        f"deeplm worker ready: pid {os.getpid()}, polling "
        + ", ".join(names[q] for q in queues)
        + f" at {address} (namespace {args.namespace})",
        flush=True,
    )
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopper and t.exception() is not None]
    await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)  # type: ignore
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    executor.shutdown(wait=False, cancel_futures=True)
    if failed:
        exc = failed[0].exception()
        print(f"deeplm worker: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print("deeplm worker: stopped", flush=True)
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_worker(args))
    except (TemporalServerError, ValueError, RuntimeError) as exc:
        print(f"deeplm worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
