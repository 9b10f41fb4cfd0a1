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
from deeplm.config import (
    PHASE_CADENCE_KEYS,
    PHASE_TRAINING_KEYS,
    ConfigError,
    RunConfig,
    config_diff,
    config_from_json,
    config_to_json,
)
from deeplm.data.sources import check_sources
from deeplm.train.checkpoint import DiskFullError
from deeplm.workflows.activities import (
    RunContext,
    StageStopped,
    corrupt_checkpoint_warnings,
    pipeline_stages,
    run_stage,
)
from deeplm.workflows.integrity import reconcile
from deeplm.workflows.state_db import StageRow, StateCorrupt, StateDB, owner_alive

CONFIG_FILE = "config.json"
STATE_FILE = "state.db"
LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process is driving this run directory."""


class ConfigMismatch(ValueError):
    """A run directory holds a run with another configuration."""


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


def open_run(
    run_dir: Path,
    cfg: RunConfig,
    allow_config_change: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> StateDB:
    """Create or reopen a run directory for ``cfg``. A run directory holds exactly one run: a
    different effective configuration is refused before anything is written, naming the keys
    that differ; ``allow_config_change`` admits only changes that cannot invalidate finished
    work (:func:`check_config_change`). Accepted changes are logged and recorded."""
    repair_config_file(run_dir, cfg, log)
    cfg_path = run_dir / CONFIG_FILE
    changed: dict[str, tuple[Any, Any]] = {}
    if cfg_path.is_file():
        changed = check_config_change(run_dir, load_run_config(run_dir), cfg, allow_config_change)
        if changed:
            log(f"[config] applying changes to the run's config: {_describe(changed)}")
    if _stage_statuses(run_dir).get("prepare") != "done":
        check_sources(cfg)  # a missing file is an error now, not after minutes of prepare
    run_dir.mkdir(parents=True, exist_ok=True)
    db = StateDB(run_dir / STATE_FILE)
    try:
        db.init_run(cfg.name, cfg.fingerprint(), replace=True)
    except ValueError:
        db.close()
        raise
    if not cfg_path.exists() or changed:
        atomic_write_text(cfg_path, config_to_json(cfg))
    if changed:
        db.log_event(
            None, "config", "config changed: " + _describe(changed), {"keys": sorted(changed)}
        )
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


def _describe(changed: dict[str, tuple[Any, Any]], limit: int = 12) -> str:
    """The changed keys with old -> new values; when there are many, just their names, nested
    keys cut at the phase's key (``phases.0.sources``) and grouped per phase
    (``phases.0.{lr, sources}``; a phase only one side has is ``phases.2.*``)."""
    if len(changed) <= limit:
        return ", ".join(
            f"{k} ({json.dumps(a)} -> {json.dumps(b)})" for k, (a, b) in changed.items()
        )
    groups: dict[str, list[str]] = {}
    for key in changed:
        parts = key.split(".")
        if parts[0] != "phases" or len(parts) < 3:
            groups.setdefault(key, [])
            continue
        prefix = ".".join(parts[:2])
        one_sided = all(None in v for k, v in changed.items() if k.startswith(prefix + "."))
        names = groups.setdefault(prefix, [])
        name = "*" if one_sided else parts[2]
        if name not in names:
            names.append(name)
    out = []
    for key, names in groups.items():
        if not names:
            out.append(key)
        elif names == ["*"] or len(names) == 1:
            out.append(f"{key}.{names[0]}")
        else:
            out.append(f"{key}.{{{', '.join(names)}}}")
    return ", ".join(out)


def _stage_statuses(run_dir: Path) -> dict[str, str]:
    if not (run_dir / STATE_FILE).is_file():
        return {}
    db = StateDB(run_dir / STATE_FILE, readonly=True)
    try:
        return {r.name: r.status for r in db.stages()}
    finally:
        db.close()


def _allowed_with_flag(key: str, old: RunConfig, new: RunConfig, stages: dict[str, str]) -> bool:
    """Whether a changed key cannot invalidate finished work (see docs/configuration.md)."""
    parts = key.split(".")
    if parts[0] != "phases" or len(parts) < 3 or not parts[1].isdigit():
        return False
    i = int(parts[1])
    if i >= min(len(old.phases), len(new.phases)) or old.phases[i].name != new.phases[i].name:
        return False
    status = stages.get(f"train:{old.phases[i].name}", "pending")
    if parts[2] in PHASE_CADENCE_KEYS:
        return status != "done"
    return parts[2] in PHASE_TRAINING_KEYS and status == "pending"


def check_config_change(
    run_dir: Path, old: RunConfig, new: RunConfig, allow: bool
) -> dict[str, tuple[Any, Any]]:
    """The keys in which ``new`` differs from the run's recorded config ``old``; raises
    ConfigMismatch unless every one is allowed. ``train.*`` (where and how the run executes:
    device, precision, threads, logging) may always differ; keys that cannot invalidate
    finished work (:data:`~deeplm.config.PHASE_TRAINING_KEYS` of a phase whose training has
    not started, :data:`~deeplm.config.PHASE_CADENCE_KEYS` of a phase not finished) only with
    ``allow``; anything else never. ``train.progress`` is not compared."""
    diff = {k: v for k, v in config_diff(old, new).items() if k != "train.progress"}
    changed = {k: v for k, v in diff.items() if not k.startswith("train.")}
    if not changed:
        return diff  # execution settings only: applied (and logged)
    stages = _stage_statuses(run_dir)
    refused = {k: v for k, v in changed.items() if not _allowed_with_flag(k, old, new, stages)}
    if refused or not allow:
        hint = "use a new --run-dir"
        if not refused:
            hint = (
                "these changes cannot invalidate finished work: rerun with "
                "--allow-config-change to apply them, or use a new --run-dir"
            )
        raise ConfigMismatch(
            f"{run_dir} holds run {old.name!r} with a different configuration; keys that "
            f"differ: {_describe(refused or changed)}; {hint} (nothing was changed)"
        )
    return diff


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
        now = time.time()
        for spec in pipeline_stages(cfg):
            r = stage_rows.get(spec.name)
            live = _live_status(db, r)
            stages.append(
                {
                    "name": spec.name,
                    "status": live,
                    "elapsed_s": round(_elapsed(r, now, live == "running"), 2),
                    "cursor": r.cursor if r else {},
                    "error": r.error if r else None,
                }
            )
        if run.get("status") == "running" and any(s["status"] == "interrupted" for s in stages):
            run["status"] = "interrupted"
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
        prepared = db.stage("prepare").outputs.get("phases", {})
        for st in stages:
            st["progress"] = stage_progress(cfg, st, prepared)
        add_etas(cfg, stages, phases, run)
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


def stage_progress(cfg: RunConfig, st: dict[str, Any], prepared: dict[str, Any]) -> str:
    """A stage's progress in words, from its cursor (sources, documents, steps, eval parts)."""
    cur, name = st["cursor"], st["name"]
    if st["error"]:
        return f"error: {st['error']}"
    if st["status"] == "done" or not cur:
        return ""
    if name == "prepare":
        total = sum(len(p.sources) for p in cfg.phases)
        return f"{len(cur.get('parts', {}))}/{total} sources prepared"
    if name.startswith("tokenize:"):
        docs = prepared.get(name.split(":", 1)[1], {})
        return ", ".join(
            f"{split} doc {v.get('last_doc_index')}/{docs.get(f'{split}_docs', '?')} "
            f"({v.get('n_tokens', 0):,} tokens)"
            for split, v in cur.items()
            if isinstance(v, dict)
        )
    if "last_step_count" in cur:
        total = next((p.total_steps for p in cfg.phases if f"train:{p.name}" == name), "?")
        return f"step {cur['last_step_count']}/{total}"
    if "part" in cur:
        return f"{cur['part']} ({cur.get('parts_done', 0)}/{cur.get('parts_total', '?')} parts)"
    return ""


def add_etas(
    cfg: RunConfig, stages: list[dict[str, Any]], phases: list[dict[str, Any]], run: dict
) -> None:
    """``eta_s`` for the running train stage and the run (training still to do at the last
    measured speed; evaluation not counted), None when nothing was measured yet."""
    rows = {p["name"]: p for p in phases}
    speeds = [p["metrics"].get("tokens_per_s") for p in phases if p["status"] != "done"]
    speeds += [p["metrics"].get("tokens_per_s") for p in phases]
    speed = next((v for v in speeds if v), None)
    total = 0.0
    for phase in cfg.phases:
        st = next(s for s in stages if s["name"] == f"train:{phase.name}")
        if st["status"] == "done":
            continue
        row = rows.get(phase.name, {})
        left = (phase.total_steps - row.get("step", 0)) * phase.tokens_per_step
        eta = left / speed if speed else None
        if st["status"] == "running":
            st["eta_s"] = eta
        total += eta or 0.0
    active = any(s["status"] == "running" for s in stages)
    run["eta_s"] = total if active and speed else None


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _live_status(db: StateDB, r: StageRow | None) -> str:
    """A stage's status, with ``interrupted`` for one recorded as running whose process is gone
    (killed, or it died of a broken pipe): run the same command again to resume it."""
    if r is None:
        return "pending"
    if r.status == "running" and owner_alive(db.stage_owner(r.name)) is False:
        return "interrupted"
    return r.status


def _elapsed(r: StageRow | None, now: float, running: bool) -> float:
    """Wall time in a stage over all attempts, the running one included."""
    if r is None:
        return 0.0
    return r.elapsed_s + (now - r.started_at if running and r.started_at else 0.0)


def format_status(st: dict[str, Any]) -> str:
    run = st["run"]
    head = f"run {run.get('name', '?')} in {st['run_dir']}: {run.get('status', '?')}"
    if run.get("eta_s") is not None:
        head += f", about {_fmt_s(run['eta_s'])} of training left (ETA; evaluation not counted)"
    if run.get("status") == "interrupted":
        head += " (its process is gone: run the same command again to resume)"
    lines = [head, ""]
    lines.append(f"{'stage':<24} {'status':<11} {'time':>8}  progress")
    for s in st["stages"]:
        prog = s.get("progress", "")
        if s.get("eta_s") is not None:
            prog += f", ETA {_fmt_s(s['eta_s'])}"
        lines.append(f"{s['name']:<24} {s['status']:<11} {s['elapsed_s']:>7.1f}s  {prog}")
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
