"""The Temporal workflow of a run, and the activity wrappers around the pipeline's stages.

``DeeplmPipeline`` runs the stages that ``activities.pipeline_stages`` lists (the client passes
that list in, so the workflow holds no stage logic and imports nothing heavy), one Temporal
activity per stage, on the stage's task queue (``<prefix>-cpu`` or ``<prefix>-gpu``). Workflow
code is deterministic: no I/O, clocks or randomness, only ``workflow.*`` calls.

Each activity wrapper (``deeplm.prepare``, ``deeplm.train_phase``, ...) is a plain synchronous
function run in the worker's thread pool, so it never blocks the worker's event loop. It

- holds the run directory's lock (``run_lock``) while it runs, so a ``deeplm run`` on the same
  directory is refused; a killed worker releases it (flock);
- opens the StateDB and calls the *same* activity function as the local orchestrator
  (``activities.run_stage``);
- heartbeats the stage's live cursor (tokenize: split, document index, tokens; train: phase,
  step, tokens, loss, latest checkpoint) from a helper thread every second, well
  inside the heartbeat timeout, also while a stage is busy without reporting progress;
- on a retry (``attempt > 1``) reads the last heartbeat and resumes from the durable cursor the
  StateDB holds, which is written before each heartbeat and so is never behind it;
- turns a Temporal cancel into ``should_stop()``: training writes a checkpoint and stops at the
  next step boundary, then the activity reports itself cancelled; a worker shutting down does
  the same but reports a retryable error, so another worker resumes the stage;
- maps bad input (config, source, data errors, a diverged loss) to a non-retryable
  ``ApplicationError`` carrying the message the user sees.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ApplicationErrorCategory,
    CancelledError,
)

WORKFLOW_NAME = "DeeplmPipeline"
PROGRESS_QUERY = "progress"
STAGE_ACTIVITY_NAMES = ("prepare", "train_tokenizer", "tokenize", "train_phase", "evaluate")
MARK_RUN_ACTIVITY = "deeplm.mark_run"
NON_RETRYABLE_TYPES = [
    "ConfigError",
    "SourceError",
    "TokenizerError",
    "ValueError",
    "UnicodeDecodeError",
    "TrainingDiverged",
    "ShardError",
]


def activity_name(stage_activity: str) -> str:
    """The Temporal activity type of a stage activity: ``train_phase`` -> ``deeplm.train_phase``."""
    return f"deeplm.{stage_activity}"


# ---------------------------------------------------------------------------- payloads


@dataclass
class StagePlan:
    """One stage as the workflow schedules it (from ``activities.StageSpec``)."""

    name: str
    activity: str
    arg: int | None = None
    queue: str = "cpu"


@dataclass
class Timeouts:
    """Per-stage limits. Training gets days; the heartbeat timeout is what detects a dead
    worker, so keep it short enough to retry quickly and long enough for slow I/O."""

    heartbeat_s: float = 120.0
    train_s: float = 14 * 24 * 3600.0
    stage_s: float = 24 * 3600.0
    evaluate_s: float = 6 * 3600.0
    max_attempts: int = 10
    retry_initial_s: float = 2.0
    retry_max_s: float = 120.0


@dataclass
class PipelineInput:
    """What a run's workflow gets: where the run lives, its config and the stages to run."""

    run_dir: str
    run_name: str
    config_json: str
    stages: list[StagePlan]
    cpu_queue: str
    gpu_queue: str
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class StageInput:
    """What one stage activity gets (small and JSON-able)."""

    run_dir: str
    config_json: str
    stage: str
    activity: str
    arg: int | None = None
    heartbeat_every_s: float = 1.0


@dataclass
class MarkRunInput:
    run_dir: str
    status: str
    message: str = ""


# ---------------------------------------------------------------------------- workflow


@workflow.defn(name=WORKFLOW_NAME)
class DeeplmPipeline:
    """Run every stage of a run in order; each is skipped by its activity when already done."""

    def __init__(self) -> None:
        self._status = "starting"
        self._current: str | None = None
        self._run_name = ""
        self._run_dir = ""
        self._stages: dict[str, dict[str, Any]] = {}

    @workflow.run
    async def run(self, inp: PipelineInput) -> dict[str, Any]:
        self._run_name, self._run_dir = inp.run_name, inp.run_dir
        for plan in inp.stages:
            self._stages[plan.name] = {"name": plan.name, "queue": plan.queue, "status": "pending"}
        self._status = "running"
        results: dict[str, Any] = {}
        for plan in inp.stages:
            results[plan.name] = await self._run_stage(inp, plan)
        self._current = None
        await self._mark_run(inp, "done")
        self._status = "done"
        return {
            "status": "done",
            "run_name": inp.run_name,
            "run_dir": inp.run_dir,
            "stages": results,
            "stage_order": [plan.name for plan in inp.stages],
            "skipped": [n for n, r in results.items() if r.get("skipped")],
        }

    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> dict[str, Any]:
        """The workflow's view of the run: status, current stage, every stage's state and a
        short summary of each finished stage's result. (Live step/loss of the running stage
        is in its activity's heartbeat; ``start_training.py status`` shows both.)"""
        return {
            "run_name": self._run_name,
            "run_dir": self._run_dir,
            "status": self._status,
            "stage": self._current,
            "stages": list(self._stages.values()),
        }

    async def _run_stage(self, inp: PipelineInput, plan: StagePlan) -> dict[str, Any]:
        t = inp.timeouts
        timeout = {"train_phase": t.train_s, "evaluate": t.evaluate_s}.get(plan.activity, t.stage_s)
        queue = inp.gpu_queue if plan.queue == "gpu" else inp.cpu_queue
        state = self._stages[plan.name]
        state.update(status="running", started=workflow.now().isoformat())
        self._current = plan.name
        handle = workflow.start_activity(
            activity_name(plan.activity),
            StageInput(
                run_dir=inp.run_dir,
                config_json=inp.config_json,
                stage=plan.name,
                activity=plan.activity,
                arg=plan.arg,
                heartbeat_every_s=max(0.5, min(1.0, t.heartbeat_s / 5)),
            ),
            activity_id=plan.name,
            task_queue=queue,
            result_type=dict,
            start_to_close_timeout=timedelta(seconds=timeout),
            heartbeat_timeout=timedelta(seconds=t.heartbeat_s),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=t.retry_initial_s),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=t.retry_max_s),
                maximum_attempts=t.max_attempts,
                non_retryable_error_types=NON_RETRYABLE_TYPES,
            ),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        try:
            # Shielded: a workflow cancel lands here, and we decide what the activity does.
            out = await asyncio.shield(handle)
        except asyncio.CancelledError:
            await self._stop_stage(inp, plan, handle)
            raise
        except ActivityError as err:
            message = _failure_message(err)
            state.update(status="failed", error=message, finished=workflow.now().isoformat())
            self._status = "failed"
            await self._mark_run(inp, "failed", f"{plan.name}: {message}")
            raise ApplicationError(
                f"stage {plan.name} failed: {message}",
                type=_failure_type(err),
                non_retryable=True,
            ) from err
        state.update(
            status="skipped" if out.get("skipped") else "done",
            finished=workflow.now().isoformat(),
            summary=_summary(out),
        )
        return out

    async def _stop_stage(
        self, inp: PipelineInput, plan: StagePlan, handle: workflow.ActivityHandle
    ) -> None:
        """The workflow was cancelled: ask the running stage to stop (training writes a
        checkpoint first), wait for it, record the run as paused, then end as cancelled."""
        self._status = "cancelling"
        state = self._stages[plan.name]
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):
            task.uncancel()
        handle.cancel()
        try:
            out = await handle
            state.update(status="done", summary=_summary(out))
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                state.update(status="cancelled")
            else:
                state.update(status="failed", error=_failure_message(err))
        except asyncio.CancelledError:
            state.update(status="cancelled")
        state["finished"] = workflow.now().isoformat()
        await self._mark_run(inp, "paused", f"cancelled during {plan.name}")
        self._status = "cancelled"

    async def _mark_run(self, inp: PipelineInput, status: str, message: str = "") -> None:
        try:
            await workflow.execute_activity(
                MARK_RUN_ACTIVITY,
                MarkRunInput(run_dir=inp.run_dir, status=status, message=message),
                task_queue=inp.cpu_queue,
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=timedelta(minutes=10),
                retry_policy=RetryPolicy(maximum_attempts=5),
            )
        except ActivityError:
            workflow.logger.warning("could not record run status %r in the StateDB", status)


def _failure_message(err: ActivityError) -> str:
    """The message of the error the activity raised (what the user should read)."""
    cause = err.cause
    if cause is None:
        return str(err)
    return str(getattr(cause, "message", None) or cause)


def _failure_type(err: ActivityError) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type:
        return cause.type
    return type(cause).__name__ if cause is not None else "StageFailed"


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    """A few scalar fields of a stage result, for the progress query."""
    keep = ("skipped", "steps", "tokens", "val_loss", "first_val_loss", "vocab_size")
    summary = {k: out[k] for k in keep if k in out}
    if isinstance(out.get("hash"), str):
        summary["hash"] = out["hash"][:12]
    for split in ("train", "val"):
        if isinstance(out.get(split), dict) and "tokens" in out[split]:
            summary[f"{split}_tokens"] = out[split]["tokens"]
    return summary


# ---------------------------------------------------------------------------- activities


class _Heartbeat:
    """Keeps the latest progress of a stage and heartbeats it from a helper thread.

    The stage thread only updates a dict (cheap, never blocks training); the helper sends it
    every ``every_s`` seconds, also while a stage reports nothing for a while (tokenizer
    training, evaluation, model start-up). Each heartbeat is also the channel through which a
    cancel request reaches the activity.
    """

    def __init__(self, stage: str, attempt: int, every_s: float) -> None:
        self._ctx = contextvars.copy_context()  # the activity's context, for activity.heartbeat
        self._every_s = every_s
        self._lock = threading.Lock()
        self.latest: dict[str, Any] = {
            "stage": stage,
            "attempt": attempt,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat:{stage}", daemon=True)

    def start(self) -> None:
        self._send()
        self._thread.start()

    def update(self, info: dict[str, Any]) -> None:
        with self._lock:
            self.latest.update(_json_safe(info))
            self.latest["updated"] = time.time()

    def _send(self) -> None:
        with self._lock:
            details = dict(self.latest)
        try:
            self._ctx.run(activity.heartbeat, details)
        except Exception:  # the activity is ending, or the event loop is busy: next tick
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self._send()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _should_stop() -> bool:
    return activity.is_cancelled() or activity.is_worker_shutdown()


def _worker_log(stage: str) -> Any:
    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {stage}: {message}", flush=True)

    return log


def _note_resume(db: Any, inp: StageInput, info: activity.Info, log: Any) -> None:
    """On a retry, say where the last attempt got to (its last heartbeat) and where this one
    resumes from (the StateDB cursor, durable before every heartbeat)."""
    if info.attempt <= 1:
        return
    last = info.heartbeat_details[0] if info.heartbeat_details else {}
    last = last if isinstance(last, dict) else {}
    cursor = db.stage(inp.stage).cursor
    hb_step, db_step = last.get("step"), cursor.get("last_step_count")
    where = ", ".join(
        f"{k} {last[k]}"
        for k in ("phase", "split", "last_doc_index", "step", "last_checkpoint")
        if last.get(k) is not None
    )
    message = (
        f"attempt {info.attempt}: the last attempt's heartbeat reached {where or 'no progress'}; "
        f"resuming from the saved cursor {json.dumps(cursor, sort_keys=True)}"
    )
    if isinstance(hb_step, int) and isinstance(db_step, int) and hb_step > db_step:
        message += f" (the StateDB cursor is behind the heartbeat: step {db_step} < {hb_step})"
    log(message)
    db.log_event(
        inp.stage,
        "retry",
        message,
        {"attempt": info.attempt, "heartbeat": last, "cursor": cursor},
    )


def _non_retryable(exc: BaseException) -> bool:
    from deeplm.data.shards import ShardError, ShardResumeError
    from deeplm.train.trainer import TrainingDiverged

    if isinstance(exc, ShardResumeError):
        return False
    return isinstance(exc, ValueError | TrainingDiverged | ShardError)


def _public_type(exc: BaseException) -> str:
    """The name of the first public class of an error (``_FileProblem`` -> ``SourceError``)."""
    return next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))


def execute_stage(inp: StageInput) -> dict[str, Any]:
    """Run one stage through ``activities.run_stage`` inside a Temporal activity."""
    from deeplm.config import ConfigError, config_from_json, config_to_json
    from deeplm.workflows.activities import RunContext, StageSpec, StageStopped, run_stage
    from deeplm.workflows.local import RunLocked, open_run, run_lock

    info = activity.info()
    log = _worker_log(inp.stage)
    beat = _Heartbeat(inp.stage, info.attempt, inp.heartbeat_every_s)
    beat.start()
    try:
        # The client validated the config, so a worker that cannot read it back unchanged runs
        # another deeplm version (it would also see "a different configuration" in the run
        # directory). Retryable: a matching worker, or this one restarted, takes the retry.
        worker = f"{socket.gethostname()}:{os.getpid()}"
        try:
            cfg = config_from_json(inp.config_json)
        except ConfigError as exc:
            raise ApplicationError(
                f"this worker ({worker}) cannot read the run's config ({exc}): run workers on "
                "the same deeplm version as the client",
                type="WorkerVersionMismatch",
            ) from None
        if json.loads(config_to_json(cfg)) != json.loads(inp.config_json):
            raise ApplicationError(
                f"this worker ({worker}) reads the run's config with other fields than the "
                "client that started it: run workers on the same deeplm version as the client",
                type="WorkerVersionMismatch",
            )
        run_dir = Path(inp.run_dir)
        log(f"starting (attempt {info.attempt}, run dir {run_dir})")
        with run_lock(run_dir):
            db = open_run(run_dir, cfg)
            try:
                _note_resume(db, inp, info, log)
                if (db.run_info() or {}).get("status") != "running":
                    db.set_run_status("running")
                ctx = RunContext(
                    run_dir=run_dir,
                    cfg=cfg,
                    db=db,
                    progress=beat.update,
                    should_stop=_should_stop,
                    log=log,
                )
                try:
                    out = run_stage(ctx, StageSpec(inp.stage, inp.activity, inp.arg))
                except StageStopped as exc:
                    if activity.is_cancelled():
                        log(f"cancelled: {exc}")
                        raise CancelledError(f"{inp.stage} cancelled: {exc}") from None
                    log(f"worker shutting down: {exc}")
                    raise ApplicationError(
                        f"{inp.stage}: the worker shut down ({exc}); another attempt resumes "
                        "from the saved cursor",
                        type="WorkerShutdown",
                        category=ApplicationErrorCategory.BENIGN,
                    ) from None
            finally:
                db.close()
        log("skipped (already done)" if out.get("skipped") else "done")
        return _json_safe(out)
    except RunLocked as exc:
        log(f"waiting: {exc}")
        raise ApplicationError(
            str(exc), type="RunLocked", category=ApplicationErrorCategory.BENIGN
        ) from None
    except (ApplicationError, CancelledError):
        raise
    except Exception as exc:
        if _non_retryable(exc):
            log(f"failed: {type(exc).__name__}: {exc}")
            raise ApplicationError(str(exc), type=_public_type(exc), non_retryable=True) from exc
        log(f"error (will be retried): {type(exc).__name__}: {exc}")
        raise
    finally:
        beat.stop()


def _stage_activity(stage_activity: str) -> Any:
    @activity.defn(name=activity_name(stage_activity), no_thread_cancel_exception=True)
    def run(inp: StageInput) -> dict[str, Any]:
        return execute_stage(inp)

    run.__name__ = run.__qualname__ = f"{stage_activity}_activity"
    return run


STAGE_ACTIVITIES = {name: _stage_activity(name) for name in STAGE_ACTIVITY_NAMES}


@activity.defn(name=MARK_RUN_ACTIVITY, no_thread_cancel_exception=True)
def mark_run(inp: MarkRunInput) -> None:
    """Record the run's status (done, paused, failed) in its StateDB."""
    from deeplm.workflows.local import STATE_FILE, RunLocked, run_lock
    from deeplm.workflows.state_db import StateDB

    path = Path(inp.run_dir) / STATE_FILE
    if not path.exists():
        return
    try:
        with run_lock(Path(inp.run_dir)):
            db = StateDB(path)
            try:
                db.set_run_status(inp.status)
                if inp.message:
                    db.log_event(None, "run", inp.message)
            finally:
                db.close()
    except RunLocked as exc:
        raise ApplicationError(str(exc), type="RunLocked") from None


def all_activities() -> list[Any]:
    return [*STAGE_ACTIVITIES.values(), mark_run]
