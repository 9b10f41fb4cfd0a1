"""The Temporal activities of a run: thin wrappers around the pipeline's stages
(:mod:`deeplm.pipeline.stages`), registered by the worker.

Each activity (``deeplm.prepare``, ``deeplm.train_phase``, ...) is a plain synchronous
function run in the worker's thread pool, so it never blocks the worker's event loop. It

- holds the run directory's lock (``run_lock``) while it runs, so a ``deeplm run`` on the same
  directory is refused; a killed worker releases it (flock);
- opens the StateDB and calls the *same* stage function as the local orchestrator
  (:func:`deeplm.pipeline.stages.run_stage`);
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

import contextvars
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory, CancelledError

from deeplm.config import ConfigError, config_from_json, config_to_json
from deeplm.data.shards import ShardError, ShardResumeError
from deeplm.pipeline.open_run import open_run
from deeplm.pipeline.plan import StageSpec
from deeplm.pipeline.stages import RunContext, StageStopped, run_stage
from deeplm.pipeline.temporal.workflow import (
    MARK_RUN_ACTIVITY,
    STAGE_ACTIVITY_NAMES,
    MarkRunInput,
    StageInput,
    activity_name,
)
from deeplm.run.layout import CONFIG_FILE, RunLayout
from deeplm.run.lock import RunLocked, run_lock
from deeplm.run.state_db import StateDB
from deeplm.train.trainer import TrainingDiverged


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
    if isinstance(exc, ShardResumeError):
        return False
    return isinstance(exc, ValueError | TrainingDiverged | ShardError)


def _public_type(exc: BaseException) -> str:
    """The name of the first public class of an error (``_FileProblem`` -> ``SourceError``)."""
    return next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))


def execute_stage(inp: StageInput) -> dict[str, Any]:
    """Run one stage through :func:`~deeplm.pipeline.stages.run_stage` inside a Temporal
    activity."""
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
            cfg = config_from_json(inp.config_json, CONFIG_FILE)
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
    path = RunLayout(inp.run_dir).state_db
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
