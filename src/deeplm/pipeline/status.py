"""A run's status as ``deeplm status`` shows it: stages with live status (a running stage whose
process is gone is ``interrupted``), progress in words from each cursor, ETAs, phases, recent
events and warnings. Read-only: it never blocks or changes a running pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from deeplm.config import RunConfig
from deeplm.pipeline.plan import pipeline_stages
from deeplm.run.layout import STATE_FILE, RunLayout
from deeplm.run.run_config import load_run_config
from deeplm.run.state_db import StageRow, StateDB, owner_alive


def status(run_dir: Path) -> dict[str, Any]:
    """A JSON-able snapshot of a run: stages, phases, progress, last metrics and events."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    db_path = layout.state_db
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
            "warnings": layout.corrupt_checkpoint_warnings(cfg),
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
