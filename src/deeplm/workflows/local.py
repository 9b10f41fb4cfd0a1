"""The embedded orchestrator: runs the pipeline's activities in order, in this process, with no
server. A run directory holds everything: ``config.json``, ``state.db``, data, tokenizer, shards,
checkpoints, metrics and the report. Only one process may drive a run directory at a time.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deeplm.atomic import atomic_write_text
from deeplm.config import ConfigError, RunConfig, config_from_json, config_to_json
from deeplm.train.checkpoint import DiskFullError
from deeplm.workflows.activities import (
    RunContext,
    StageStopped,
    corrupt_checkpoint_warnings,
    pipeline_stages,
    run_stage,
)
from deeplm.workflows.integrity import reconcile
from deeplm.workflows.state_db import StateCorrupt, StateDB

CONFIG_FILE = "config.json"
STATE_FILE = "state.db"
LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process is driving this run directory."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the run directory (POSIX: Linux and macOS)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fh = open(path, "a+")  # noqa: SIM115
    try:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX: no advisory lock available
            pass
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunLocked(
                f"{run_dir} is in use by {holder}; wait for it to finish or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()


def open_run(run_dir: Path, cfg: RunConfig, log: Callable[[str], None] = print) -> StateDB:
    """Create or reopen a run directory for ``cfg``; a different config there is an error."""
    repair_config_file(run_dir, cfg, log)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / CONFIG_FILE
    db = StateDB(run_dir / STATE_FILE)
    try:
        db.init_run(cfg.name, cfg.fingerprint())
    except ValueError:
        db.close()
        raise
    if not cfg_path.exists():
        atomic_write_text(cfg_path, config_to_json(cfg))
    return db


def repair_config_file(run_dir: Path, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """A damaged ``config.json`` (invalid JSON or config) is rewritten from ``cfg`` when the
    state database confirms ``cfg`` is this run's config (same fingerprint); otherwise
    ConfigError naming the file. An intact or absent file is left alone."""
    path = run_dir / CONFIG_FILE
    if not path.is_file() or (problem := config_file_problem(path)) is None:
        return
    recorded = None
    if (run_dir / STATE_FILE).is_file():
        db = StateDB(run_dir / STATE_FILE, readonly=True)
        try:
            recorded = (db.run_info() or {}).get("config_json")
        finally:
            db.close()
    if recorded != cfg.fingerprint():
        raise ConfigError(
            f"{path}: the run's config file is damaged ({problem}), and the config given is not "
            f"the one recorded in {run_dir / STATE_FILE}: give the run's own --preset/--config "
            "(its file is then rewritten), or restore the file"
        )
    atomic_write_text(path, config_to_json(cfg))
    log(f"[integrity] {path} was damaged ({problem}); rewritten from the run's config")


def config_file_problem(path: Path) -> str | None:
    """None when ``path`` holds a valid run config, else what is wrong with it."""
    try:
        config_from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError) as exc:
        return str(exc)
    return None


def load_run_config(run_dir: Path) -> RunConfig:
    """The config of the run in ``run_dir`` (its ``config.json``); a damaged file raises
    ConfigError naming the file, the problem and the repair."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a deeplm run directory (no {CONFIG_FILE})")
    try:
        return config_from_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ConfigError) as exc:
        raise ConfigError(
            f"{path}: the run's config file is damaged ({exc}). Repair it by running "
            f"`deeplm run` once more with the run's --preset/--config and --run-dir {run_dir}: "
            "the config is checked against the one recorded in state.db and the file rewritten"
        ) from None


def rebuild_state(run_dir: Path) -> Path | None:
    """Move a damaged ``state.db`` (and its WAL files) aside to ``state.db.corrupt-<time>``
    so the next run starts a fresh state; returns where it went (None: nothing to move, or the
    database is readable and is kept)."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        StateDB(path, readonly=True).close()
        return None  # readable: nothing to rebuild
    except StateCorrupt:
        pass
    aside = path.with_name(f"{STATE_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(STATE_FILE + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    return aside


def run_local(
    run_dir: Path,
    cfg: RunConfig,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[dict[str, Any]], None] = lambda info: None,
    data_only: bool = False,
) -> dict[str, Any]:
    """Run every stage in order (with ``data_only``: only the data stages, up to the shards);
    stages already done are skipped. Returns a summary."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        db = open_run(run_dir, cfg, log=log)
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
                log(f"data ready in {summary['seconds']:.1f}s: {run_dir / 'shards'}")
            else:
                log(f"pipeline done in {summary['seconds']:.1f}s; report: {run_dir / 'report.md'}")
            return summary
        finally:
            db.close()


def status(run_dir: Path) -> dict[str, Any]:
    """A JSON-able snapshot of a run: stages, phases, progress, last metrics and events."""
    run_dir = Path(run_dir)
    db_path = run_dir / STATE_FILE
    if not db_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a deeplm run directory (no {STATE_FILE})")
    db = StateDB(db_path, readonly=True)
    try:
        run = db.run_info() or {}
        run.pop("config_json", None)
        cfg = load_run_config(run_dir)
        stage_rows = {r.name: r for r in db.stages()}
        stages = []
        for spec in pipeline_stages(cfg):
            r = stage_rows.get(spec.name)
            stages.append(
                {
                    "name": spec.name,
                    "status": r.status if r else "pending",
                    "elapsed_s": round(r.elapsed_s, 2) if r else 0.0,
                    "cursor": r.cursor if r else {},
                    "error": r.error if r else None,
                }
            )
        phases = []
        for p in db.phases():
            phases.append(
                {
                    "name": p.name,
                    "status": p.status,
                    "step": p.step,
                    "total_steps": p.total_steps,
                    "tokens": p.tokens,
                    "last_checkpoint": p.last_checkpoint,
                    "final_checkpoint": p.final_checkpoint,
                    "metrics": p.metrics,
                }
            )
        events = db.events(limit=15)
        return {
            "run_dir": str(run_dir),
            "run": run,
            "stages": stages,
            "phases": phases,
            "events": events,
            "warnings": corrupt_checkpoint_warnings(run_dir, cfg),
        }
    finally:
        db.close()


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run {st['run'].get('name', '?')} in {st['run_dir']}: {st['run'].get('status', '?')}"]
    lines.append("")
    lines.append(f"{'stage':<24} {'status':<9} {'time':>8}  progress")
    for s in st["stages"]:
        cur = s["cursor"]
        prog = ""
        if "last_step_count" in cur:
            prog = f"step {cur['last_step_count']}"
        elif cur.get("parts"):
            prog = f"{len(cur['parts'])} sources prepared"
        elif cur:
            prog = ", ".join(
                f"{k}: doc {v.get('last_doc_index')}" for k, v in cur.items() if isinstance(v, dict)
            )
        if s["error"]:
            prog = f"error: {s['error']}"
        lines.append(f"{s['name']:<24} {s['status']:<9} {s['elapsed_s']:>7.1f}s  {prog}")
    if st["phases"]:
        lines.append("")
        lines.append(f"{'phase':<16} {'status':<9} {'step':>13} {'tokens':>12}  metrics")
        for p in st["phases"]:
            m = p["metrics"]
            mtxt = " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, int | float))
            lines.append(
                f"{p['name']:<16} {p['status']:<9} {p['step']:>6}/{p['total_steps']:<6} "
                f"{p['tokens']:>12,}  {mtxt}"
            )
    if st["events"]:
        lines.append("")
        lines.append("recent events:")
        for e in st["events"][-8:]:
            ts = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
            lines.append(f"  {ts} {e['stage'] or '-':<20} {e['kind']:<8} {e['message']}")
    for line in st.get("warnings", []):
        lines.append(f"warning: {line}")
    return "\n".join(lines)


def status_json(run_dir: Path) -> str:
    return json.dumps(status(run_dir), indent=2, default=str)
