"""The local driver: runs the pipeline's stages in order, in this process, with no server. A run
directory holds everything (see :class:`~deeplm.run.layout.RunLayout`); only one process may
drive it at a time (:func:`~deeplm.run.lock.run_lock`).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplm.config import RunConfig
from deeplm.pipeline.integrity import reconcile
from deeplm.pipeline.open_run import open_run
from deeplm.pipeline.plan import pipeline_stages
from deeplm.pipeline.stages import RunContext, StageStopped, run_stage
from deeplm.run.checkpoint import DiskFullError
from deeplm.run.layout import RunLayout
from deeplm.run.lock import run_lock


def run_local(
    run_dir: Path,
    cfg: RunConfig,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[dict[str, Any]], None] = lambda info: None,
    data_only: bool = False,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Run every stage in order (with ``data_only``: only the data stages, up to the shards);
    stages already done are skipped. Returns a summary. ``allow_config_change``: see
    :func:`open_run`."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        db = open_run(run_dir, cfg, allow_config_change, log)
        ctx = RunContext(
            run_dir=run_dir, cfg=cfg, db=db, progress=progress, should_stop=should_stop, log=log
        )
        summary: dict[str, Any] = {"stages": {}, "status": "running"}
        t_run = time.perf_counter()
        try:
            findings = reconcile(db, cfg)
            for line in findings:
                log(f"[integrity] {line}")
            if findings:
                summary["integrity"] = findings
            db.set_run_status("running")
            for spec in pipeline_stages(cfg):
                if data_only and spec.queue != "cpu":
                    continue
                t0 = time.perf_counter()
                try:
                    out = run_stage(ctx, spec)
                except StageStopped as exc:
                    db.set_run_status("paused")
                    log(f"stopped: {exc}. Run the same command again to resume.")
                    summary["status"] = "paused"
                    return summary
                except OSError as exc:
                    db.set_run_status("failed")
                    if exc.errno == errno.ENOSPC:
                        raise DiskFullError(
                            f"no space left on the device during stage {spec.name} of {run_dir}; "
                            "everything committed before is intact and the stage resumes from "
                            "its cursor: free some space and run the same command again"
                        ) from exc
                    raise
                except Exception:
                    db.set_run_status("failed")
                    raise
                dt = time.perf_counter() - t0
                skipped = bool(out.get("skipped"))
                summary["stages"][spec.name] = {"skipped": skipped, "seconds": dt}
                log(f"[{spec.name}] {'already done, skipped' if skipped else f'done in {dt:.1f}s'}")
            db.set_run_status("data ready" if data_only else "done")
            summary["status"] = "done"
            summary["seconds"] = time.perf_counter() - t_run
            if all(s["skipped"] for s in summary["stages"].values()):
                log(
                    f"nothing to do: all {len(summary['stages'])} stages of {run_dir} were "
                    "already done (nothing was redone)"
                )
                summary["nothing_redone"] = True
            elif data_only:
                shards = RunLayout(run_dir).shards_root
                log(f"data ready in {summary['seconds']:.1f}s: {shards}")
            else:
                report = RunLayout(run_dir).report
                log(f"pipeline done in {summary['seconds']:.1f}s; report: {report}")
            return summary
        finally:
            db.close()
