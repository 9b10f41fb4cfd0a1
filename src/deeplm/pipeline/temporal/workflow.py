"""The Temporal workflow of a run and the payloads it exchanges with its activities.

``DeeplmPipeline`` runs the stages that :func:`deeplm.pipeline.plan.pipeline_stages` lists (the
client passes that list in, so the workflow holds no stage logic and imports nothing heavy: this
module imports only ``temporalio`` and the standard library, so Temporal's workflow sandbox can
re-import it cheaply), one Temporal activity per stage, on the stage's task queue
(``<prefix>-cpu`` or ``<prefix>-gpu``). Workflow code is deterministic: no I/O, clocks or
randomness, only ``workflow.*`` calls. The activities are in
:mod:`deeplm.pipeline.temporal.activities`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

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
    """One stage as the workflow schedules it (from :class:`deeplm.pipeline.plan.StageSpec`)."""

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
