"""Client side of the Temporal orchestration: start (or attach to) a run's workflow, show its
status, cancel it, list runs, start a local dev server. The command line is ``deeplm temporal
...`` (:mod:`deeplm.cli`; ``scripts/start_training.py`` is a thin wrapper around it).

Names and settings:

- workflow id ``deeplm-<run name>`` (the config's ``name``; ``--workflow-id`` overrides it).
  Starting while that workflow runs attaches to it instead of starting another; a workflow of
  that id running for a *different* run directory is refused with a clear message;
- task queues ``<prefix>-cpu`` (the workflow, prepare, tokenizer, tokenize) and ``<prefix>-gpu``
  (train, evaluate); prefix ``deeplm`` (``--task-queue-prefix``, ``$DEEPLM_TEMPORAL_TASK_QUEUE``);
- server address ``--temporal-address`` > ``$DEEPLM_TEMPORAL_ADDRESS`` > ``127.0.0.1:7233``;
  namespace ``--namespace`` > ``$DEEPLM_TEMPORAL_NAMESPACE`` > ``default``;
- heartbeat timeout ``--heartbeat-timeout`` > ``$DEEPLM_TEMPORAL_HEARTBEAT_TIMEOUT`` > 120 s
  (how fast a dead worker's stage is retried elsewhere); training limit ``--train-timeout``
  (hours) > ``$DEEPLM_TEMPORAL_TRAIN_TIMEOUT_HOURS`` > 336 h.

Entry points that used the Temporal SDK leave through :func:`hard_exit` (flush, then
``os._exit``): the SDK's native threads can crash the interpreter at shutdown after the work
has succeeded (temporalio/sdk-python#300), which must not turn a success into a failure.

``temporalio.client`` / ``.service`` / ``.api`` are imported inside the functions that talk to
the server: they load the SDK's native bridge, which code that only formats or plans (and the
test process) must not load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from deeplm.config import ConfigError, RunConfig, config_to_json, load_config
from deeplm.pipeline.integrity import reconcile
from deeplm.pipeline.open_run import open_run
from deeplm.pipeline.plan import pipeline_stages
from deeplm.pipeline.status import format_status, status
from deeplm.pipeline.temporal.server import (
    ENV_QUEUE_PREFIX,
    QUEUE_KINDS,
    TemporalServerError,
    add_connection_args,
    default_namespace,
    ensure_server,
    hard_exit,
    read_server_info,
    resolve_address,
    server_healthy,
    stop_dev_server,
    task_queues,
)
from deeplm.pipeline.temporal.workflow import (
    PROGRESS_QUERY,
    WORKFLOW_NAME,
    PipelineInput,
    StagePlan,
    Timeouts,
)
from deeplm.run.layout import CONFIG_FILE, RunLayout

__all__ = ["QUEUE_KINDS", "add_connection_args", "hard_exit", "task_queues"]

ENV_HEARTBEAT = "DEEPLM_TEMPORAL_HEARTBEAT_TIMEOUT"
ENV_TRAIN_TIMEOUT = "DEEPLM_TEMPORAL_TRAIN_TIMEOUT_HOURS"


def workflow_id_for(run_name: str) -> str:
    return f"deeplm-{run_name}"


async def connect(address: str, namespace: str = "default") -> Any:
    from temporalio.client import Client

    return await Client.connect(address, namespace=namespace)


# ---------------------------------------------------------------------------- start


def stage_plans(cfg: RunConfig) -> list[StagePlan]:
    return [StagePlan(s.name, s.activity, s.arg, s.queue) for s in pipeline_stages(cfg)]


def timeouts_from(args: argparse.Namespace) -> Timeouts:
    t = Timeouts()
    hb = getattr(args, "heartbeat_timeout", None) or os.environ.get(ENV_HEARTBEAT)
    if hb:
        t.heartbeat_s = float(hb)
    train_h = getattr(args, "train_timeout", None) or os.environ.get(ENV_TRAIN_TIMEOUT)
    if train_h:
        t.train_s = float(train_h) * 3600
    if getattr(args, "max_attempts", None):
        t.max_attempts = int(args.max_attempts)
    if t.heartbeat_s < 2 or t.train_s <= 0 or t.max_attempts < 1:
        raise ValueError("heartbeat timeout must be >= 2 s, train timeout > 0, max attempts >= 1")
    return t


async def queue_pollers(
    client: Any, namespace: str, queue: str, workflow_tasks: bool = False
) -> list[str]:
    """Identities of the workers that polled ``queue`` (activity or workflow tasks) recently."""
    from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=namespace,
            task_queue=TaskQueue(name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            task_queue_type=(
                TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
                if workflow_tasks
                else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
            ),
        )
    )
    # The server lists a stopped worker for minutes; a live one polls again at least every
    # minute (long polls end after 60 s), so older entries are gone workers.
    now = time.time()
    return [
        p.identity
        for p in resp.pollers
        if not p.HasField("last_access_time") or now - p.last_access_time.seconds < 70
    ]


async def start_run(
    client: Any,
    run_dir: Path,
    cfg: RunConfig,
    queues: dict[str, str],
    timeouts: Timeouts,
    workflow_id: str | None = None,
) -> tuple[Any, bool]:
    """Start the run's workflow, or attach to it when it is already running.

    Returns (handle, attached)."""
    from temporalio.client import WorkflowExecutionStatus
    from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

    wid = workflow_id or workflow_id_for(cfg.name)
    existing = await _describe_or_none(client, wid)
    if existing is not None and existing.status == WorkflowExecutionStatus.RUNNING:
        memo = await existing.memo()
        if memo.get("run_dir") not in (None, str(run_dir)):
            raise ValueError(
                f"workflow {wid} is already running for run directory {memo['run_dir']}; "
                f"cancel it, wait for it, or give this run another name (--set name=...) "
                f"or --workflow-id"
            )
        return client.get_workflow_handle(wid), True
    handle = await client.start_workflow(
        WORKFLOW_NAME,
        PipelineInput(
            run_dir=str(run_dir),
            run_name=cfg.name,
            config_json=config_to_json(cfg),
            stages=stage_plans(cfg),
            cpu_queue=queues["cpu"],
            gpu_queue=queues["gpu"],
            timeouts=timeouts,
        ),
        id=wid,
        task_queue=queues["cpu"],
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        memo={"run_dir": str(run_dir), "run_name": cfg.name},
        static_summary=f"deeplm run {cfg.name} in {run_dir}",
    )
    return handle, False


async def _describe_or_none(client: Any, workflow_id: str) -> Any:
    from temporalio.service import RPCError, RPCStatusCode

    try:
        return await client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


# ---------------------------------------------------------------------------- status


async def describe_run(client: Any, workflow_id: str, query_timeout_s: float = 5.0) -> dict | None:
    """The workflow's status, memo, ``progress`` query (when a worker answers) and the running
    activities with their latest heartbeat (live step, tokens, loss, checkpoint)."""
    desc = await _describe_or_none(client, workflow_id)
    if desc is None:
        return None
    handle = client.get_workflow_handle(workflow_id)
    out: dict[str, Any] = {
        "workflow_id": workflow_id,
        "run_id": desc.run_id,
        "status": desc.status.name if desc.status else "UNKNOWN",
        "start_time": desc.start_time.isoformat() if desc.start_time else None,
        "close_time": desc.close_time.isoformat() if desc.close_time else None,
        "history_length": desc.history_length,
        "memo": await desc.memo(),
        "progress": None,
        "activities": [],
        "described_at": time.time(),
    }
    try:
        out["progress"] = await handle.query(
            PROGRESS_QUERY, rpc_timeout=timedelta(seconds=query_timeout_s)
        )
    except Exception as exc:  # no worker to answer the query: say so, show the rest
        out["progress_error"] = f"{type(exc).__name__}: {exc}"
    conv = client.data_converter.payload_converter
    for pa in desc.raw_description.pending_activities:
        details: Any = None
        if pa.heartbeat_details.payloads:
            try:
                details = conv.from_payloads(pa.heartbeat_details.payloads)[0]
            except Exception:
                details = None
        act = {
            "id": pa.activity_id,
            "type": pa.activity_type.name,
            "state": pa.state,
            "attempt": pa.attempt,
            "heartbeat": details,
            "last_heartbeat": pa.last_heartbeat_time.seconds or None,
            "worker": pa.last_worker_identity,
            "last_failure": pa.last_failure.message or None,
        }
        out["activities"].append(act)
    return out


def _heartbeat_eta(hb: dict[str, Any]) -> float | None:
    """Seconds left in a training stage from its heartbeat (steps left at the measured speed)."""
    step, total, tokens, speed = (
        hb.get(k) for k in ("step", "total_steps", "tokens", "tokens_per_s")
    )
    if not (step and total and tokens and isinstance(speed, int | float) and speed > 0):
        return None
    return (total - step) * (tokens / step) / speed


def format_live(act: dict[str, Any], now: float | None = None) -> str:
    """One line for a running stage from its latest heartbeat (``now``: when it was read)."""
    hb = act.get("heartbeat") or {}
    parts = [f"{act['id']}: attempt {act['attempt']}"]
    if hb.get("phase"):
        parts.append(f"phase {hb['phase']}")
    if hb.get("step") is not None:
        total = hb.get("total_steps")
        parts.append(f"step {hb['step']}" + (f"/{total}" if total else ""))
    if hb.get("tokens") is not None:
        parts.append(f"{hb['tokens']:,} tokens")
    if isinstance(hb.get("loss"), int | float):
        parts.append(f"loss {hb['loss']:.4f}")
    eta = _heartbeat_eta(hb)
    if eta is not None:
        parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
    if hb.get("split"):
        parts.append(f"{hb['split']} doc {hb.get('last_doc_index')}")
    if hb.get("docs") is not None:
        parts.append(f"{hb['docs']} docs")
    if hb.get("last_checkpoint"):
        parts.append(f"checkpoint {Path(hb['last_checkpoint']).name}")
    if act.get("last_heartbeat"):
        ago = (now or time.time()) - act["last_heartbeat"]
        parts.append(f"heartbeat {max(0, int(ago))}s ago")
    if act.get("worker"):
        parts.append(f"worker {act['worker']}")
    if act.get("last_failure"):
        parts.append(f"last failure: {act['last_failure']}")
    return ", ".join(parts)


def format_temporal(info: dict[str, Any], ui_url: str | None = None) -> str:
    lines = [
        f"workflow {info['workflow_id']}: {info['status']} (started {info['start_time']}"
        + (f", closed {info['close_time']}" if info.get("close_time") else "")
        + f", {info['history_length']} history events)"
    ]
    if ui_url:
        lines.append(f"Web UI: {ui_url}")
    prog = info.get("progress")
    if prog:
        stages = ", ".join(f"{s['name']} {s['status']}" for s in prog["stages"])
        lines.append(f"workflow says: {prog['status']}; stage {prog['stage'] or '-'}")
        lines += textwrap.wrap(stages, 98, initial_indent="  ", subsequent_indent="  ")
    elif info["status"] == "RUNNING" and info.get("progress_error"):
        lines.append("(no worker answered the progress query: is a worker running?)")
    for act in info["activities"]:
        lines.append(f"running: {format_live(act, info.get('described_at'))}")
    return "\n".join(lines)


def _run_name_from(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """(workflow id, run dir) from --workflow-id / --run-dir / --preset / --config."""
    run_dir = Path(args.run_dir).absolute() if getattr(args, "run_dir", None) else None
    if getattr(args, "workflow_id", None):
        return args.workflow_id, run_dir
    if run_dir is not None and (config := RunLayout(run_dir).config).is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("name")
        return workflow_id_for(name), run_dir
    if getattr(args, "preset", None) or getattr(args, "config", None):
        cfg = _load_cfg(args)
        return workflow_id_for(cfg.name), run_dir or Path(f"runs/{cfg.name}").absolute()
    if run_dir is not None:
        raise FileNotFoundError(f"{run_dir}: not a deeplm run directory (no {CONFIG_FILE})")
    raise ConfigError("say which run: --run-dir, --preset/--config or --workflow-id")


def _load_cfg(args: argparse.Namespace) -> RunConfig:
    preset, config = getattr(args, "preset", None), getattr(args, "config", None)
    if preset and config:
        raise ConfigError("give either --preset or --config, not both")
    if not preset and not config:
        preset = "tiny"
    return load_config(
        preset=preset, config_file=config, overrides=getattr(args, "set", None) or []
    )


def _local_status(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None or not RunLayout(run_dir).state_db.exists():
        return None
    return status(run_dir)


async def cmd_status(args: argparse.Namespace) -> int:
    address = resolve_address(args.temporal_address)
    wid, run_dir = _run_name_from(args)
    info = None
    server_note = None
    if await server_healthy(address):
        client = await connect(address, args.namespace)
        info = await describe_run(client, wid)
        if info is None:
            server_note = f"no workflow {wid} on the Temporal server at {address}"
        elif run_dir is None and info["memo"].get("run_dir"):
            run_dir = Path(info["memo"]["run_dir"])
    else:
        server_note = f"no Temporal server answers at {address}"
    local = _local_status(run_dir)
    if args.json:
        print(json.dumps({"temporal": info, "note": server_note, "run": local}, default=str))
        return 0 if (info or local) else 2
    ui = None
    if run_dir is not None:
        known = read_server_info(RunLayout(run_dir).temporal_dir)
        if known is not None and known.address == address and info is not None:
            ui = known.workflow_url(wid, args.namespace)
    if info is not None:
        print(format_temporal(info, ui))
    if server_note:
        print(server_note)
    if local is not None:
        print()
        print(format_status(local))
    elif info is None:
        print(f"deeplm: error: no run found for {wid}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------- cancel / list


async def cmd_cancel(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError

    address = resolve_address(args.temporal_address)
    wid, run_dir = _run_name_from(args)
    if not await server_healthy(address):
        raise TemporalServerError(f"no Temporal server answers at {address}")
    client = await connect(address, args.namespace)
    desc = await _describe_or_none(client, wid)
    if desc is None or desc.status != WorkflowExecutionStatus.RUNNING:
        state = "not found" if desc is None else desc.status.name
        print(f"workflow {wid} is not running ({state}); nothing to cancel")
        return 1
    handle = client.get_workflow_handle(wid, run_id=desc.run_id)
    await handle.cancel()
    print(f"cancel requested for {wid}; the running stage stops at its next safe point", flush=True)
    if args.no_wait:
        return 0
    queue = desc.task_queue or task_queues(args.task_queue_prefix)["cpu"]
    if not await queue_pollers(client, args.namespace, queue, workflow_tasks=True):
        print(
            f"no worker polls {queue}: {wid} finishes cancelling once a worker runs",
            file=sys.stderr,
        )
        return 0
    try:
        await asyncio.wait_for(handle.result(), args.timeout)
        print(f"{wid} finished before the cancel reached it")
    except WorkflowFailureError:
        pass
    except TimeoutError:
        print(f"{wid} is still stopping after {args.timeout:.0f}s (see status)", file=sys.stderr)
        return 1
    desc = await handle.describe()
    print(f"workflow {wid}: {desc.status.name}")
    run_dir = run_dir or Path((await desc.memo()).get("run_dir", ""))
    local = _local_status(run_dir)
    if local is not None:
        for p in local["phases"]:
            if p["status"] != "done":
                print(f"phase {p['name']}: step {p['step']}, checkpoint {p['last_checkpoint']}")
        print(f"run {local['run'].get('status')}: start it again to resume from there")
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    address = resolve_address(args.temporal_address)
    if not await server_healthy(address):
        raise TemporalServerError(f"no Temporal server answers at {address}")
    client = await connect(address, args.namespace)
    rows = []
    async for wf in client.list_workflows(f'WorkflowType = "{WORKFLOW_NAME}"', limit=args.limit):
        memo = await wf.memo()
        rows.append(
            {
                "workflow_id": wf.id,
                "run_id": wf.run_id,
                "status": wf.status.name if wf.status else "UNKNOWN",
                "start_time": wf.start_time.isoformat() if wf.start_time else None,
                "close_time": wf.close_time.isoformat() if wf.close_time else None,
                "run_dir": memo.get("run_dir"),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no deeplm workflows on {address} (namespace {args.namespace})")
        return 0
    print(f"{'workflow id':<28} {'status':<11} {'started':<20} run dir")
    for r in rows:
        started = (r["start_time"] or "")[:19].replace("T", " ")
        print(f"{r['workflow_id']:<28} {r['status']:<11} {started:<20} {r['run_dir'] or ''}")
    return 0


async def cmd_server(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or RunLayout(args.run_dir).temporal_dir).absolute()
    if args.stop:
        stopped = stop_dev_server(state_dir)
        print(f"stopped the dev server pid {stopped.pid}" if stopped else "no dev server running")
        return 0
    address = resolve_address(args.temporal_address)
    server = await ensure_server(address, state_dir)
    if server is None:
        print(f"a Temporal server already answers at {address}")
    else:
        print(f"Temporal dev server pid {server.pid} on {server.address}; Web UI {server.ui_url}")
    return 0


# ---------------------------------------------------------------------------- start + follow


def _spawn_worker(args: argparse.Namespace, address: str, log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "deeplm.cli",
        "worker",
        "--temporal-address",
        address,
        "--namespace",
        args.namespace,
        "--task-queue-prefix",
        args.task_queue_prefix,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop_worker(proc: subprocess.Popen, timeout_s: float = 150.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _follow(client: Any, handle: Any, wid: str, interval_s: float = 2.0) -> int:
    """Print stage changes and live training progress until the workflow closes."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import CancelledError
    from temporalio.service import RPCError

    async def result() -> Any:
        while True:
            try:
                return await handle.result()
            except RPCError:  # the server restarted: follow again
                await asyncio.sleep(1.0)

    task = asyncio.create_task(result())
    seen: dict[str, str] = {}
    last_live = 0.0
    shown: dict[str, str] = {}  # the last line printed per stage, without its heartbeat age
    while not task.done():
        await asyncio.wait([task], timeout=interval_s)
        if task.done():
            break
        try:
            info = await describe_run(client, wid, query_timeout_s=3.0)
        except Exception:
            continue
        if info is None:
            continue
        for s in (info.get("progress") or {}).get("stages", []):
            if seen.get(s["name"]) != s["status"]:
                seen[s["name"]] = s["status"]
                if s["status"] != "pending":
                    extra = f" {s['summary']}" if s.get("summary") else ""
                    print(f"{time.strftime('%H:%M:%S')} {s['name']}: {s['status']}{extra}")
        now = time.monotonic()
        if info["activities"] and now - last_live >= 10:
            last_live = now
            for act in info["activities"]:
                line = format_live(act)
                key = re.sub(r", heartbeat \d+s ago", "", line)
                if shown.get(act["id"]) != key:  # unchanged progress is not printed again
                    shown[act["id"]] = key
                    print(f"{time.strftime('%H:%M:%S')} {line}")
        sys.stdout.flush()
    try:
        out = task.result()
    except WorkflowFailureError as exc:
        if isinstance(exc.cause, CancelledError):
            print(f"{wid} was cancelled; start it again to resume")
            return 3
        message = getattr(exc.cause, "message", None) or str(exc.cause or exc)
        print(f"deeplm: error: {message}", file=sys.stderr)
        return 2
    order = out.get("stage_order") or list(out["stages"])
    done = ", ".join(
        f"{n} {'skipped' if out['stages'][n].get('skipped') else 'done'}" for n in order
    )
    print(f"{wid}: pipeline done ({done}); report: {RunLayout(out['run_dir']).report}")
    return 0


async def cmd_start(args: argparse.Namespace, cfg: RunConfig | None = None) -> int:
    cfg = cfg or _load_cfg(args)
    run_dir = Path(getattr(args, "run_dir", None) or f"runs/{cfg.name}").absolute()
    namespace = getattr(args, "namespace", None) or default_namespace()
    prefix = getattr(args, "task_queue_prefix", None) or os.environ.get(ENV_QUEUE_PREFIX)
    args.namespace = namespace
    args.task_queue_prefix = prefix or "deeplm"
    queues = task_queues(args.task_queue_prefix)
    timeouts = timeouts_from(args)
    address = resolve_address(getattr(args, "temporal_address", None))
    server = await ensure_server(address, RunLayout(run_dir).temporal_dir)
    client = await connect(address, namespace)
    # a clear error now for a config that does not match
    db = open_run(run_dir, cfg, getattr(args, "allow_config_change", False))
    try:  # as `deeplm run` does: a done stage whose outputs are missing or altered is redone
        for line in reconcile(db, cfg):
            print(f"[integrity] {line}", flush=True)
    finally:
        db.close()
    worker = None
    try:
        if getattr(args, "with_worker", False):
            log_path = RunLayout(run_dir).temporal_worker_log
            worker = _spawn_worker(args, address, log_path)
            print(f"started a worker (pid {worker.pid}, log {log_path})", flush=True)
        else:
            missing = [q for q in queues.values() if not await queue_pollers(client, namespace, q)]
            if missing:
                print(
                    f"warning: no worker polls task queue(s) {', '.join(missing)}; the run waits "
                    "until one does. Start one: python scripts/temporal_worker.py "
                    f"--temporal-address {address} (or use --with-worker)",
                    file=sys.stderr,
                    flush=True,
                )
        wid = getattr(args, "workflow_id", None) or workflow_id_for(cfg.name)
        handle, attached = await start_run(client, run_dir, cfg, queues, timeouts, wid)
        verb = "attached to the running workflow" if attached else "started workflow"
        print(f"{verb} {wid} for {run_dir} on {address}", flush=True)
        if server is not None and server.ui_url:
            print(f"Web UI: {server.workflow_url(wid, namespace)}", flush=True)
        if getattr(args, "detach", False):
            print(
                f"detached; follow it with: python scripts/start_training.py status --run-dir "
                f"{run_dir}"
            )
            return 0
        follow = asyncio.create_task(_follow(client, handle, wid))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([follow, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not follow.done():
            follow.cancel()
            print(
                f"\nstopped following; {wid} goes on in Temporal "
                + ("(its worker stops now, so it waits for another) " if worker else "")
                + "- see status, or cancel it with scripts/start_training.py cancel",
                file=sys.stderr,
            )
            return 130
        return follow.result()
    finally:
        if worker is not None:
            _stop_worker(worker)


def start_command(args: argparse.Namespace, cfg: RunConfig | None = None) -> int:
    """``deeplm run --orchestrator temporal``: like ``deeplm temporal start``."""
    return run_async(cmd_start(args, cfg))


def run_async(coro: Any) -> int:
    """Run a command's coroutine; its errors become one ``deeplm: error`` line and exit 2."""
    from temporalio.service import RPCError

    try:
        return int(asyncio.run(coro) or 0)
    except ConfigError as exc:
        print(f"deeplm: config error: {exc}", file=sys.stderr)
        return 2
    except (RPCError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"deeplm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deeplm: aborted", file=sys.stderr)
        return 130
