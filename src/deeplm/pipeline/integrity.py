"""Reconcile a run's StateDB with its files on start.

For every stage marked ``done``, each artifact it recorded (``artifacts.producer == stage``) must
still be on disk with the recorded size and sha256 (the hash is only computed when the size
matches). A stage with a missing or altered output is reset so it runs again, and so are the
stages that consume that output:

* docs (``prepare``) feed the tokenizer and the shards: ``tokenizer``, ``tokenize:*``, ``train:*``
  and ``evaluate`` are reset too (they re-check their own outputs and redo only what differs);
* a changed tokenizer invalidates ``tokenize:*``, ``train:*`` and ``evaluate``;
* a shard of phase P (``tokenize:P``) invalidates ``train:P``, later phases and ``evaluate``;
* a final checkpoint of phase P (``train:P``) invalidates later phases and ``evaluate``;
* the report (``evaluate``) invalidates nothing.

An altered file is moved aside with a ``.corrupt`` suffix (kept for inspection, never read
again); a corrupted checkpoint's whole folder is moved aside, so training resumes from the
previous good checkpoint. Returns the findings as human-readable lines.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deeplm.atomic import sha256_file
from deeplm.config import RunConfig
from deeplm.pipeline.plan import downstream, pipeline_stages
from deeplm.run.checkpoint import move_aside_corrupt
from deeplm.run.state_db import StateDB


def move_aside(path: Path) -> Path:
    """Rename ``path`` (file or folder) to ``<path>.corrupt``, replacing an older one."""
    aside = path.with_name(path.name + ".corrupt")
    if aside.is_dir():
        shutil.rmtree(aside)
    elif aside.exists():
        aside.unlink()
    os.replace(path, aside)
    return aside


def check_artifact(db: StateDB, rec: dict) -> str | None:
    """None when the recorded artifact is intact, else what is wrong with it."""
    p = Path(rec["path"])
    if not p.is_file():
        aside = p.parent.with_name(p.parent.name + ".corrupt") / p.name
        if rec["kind"] == "checkpoint" and aside.exists():
            return f"corrupt (found so earlier and moved aside to {aside.parent})"
        return "missing"
    size = p.stat().st_size
    if size != rec["bytes"]:
        return f"size {size} bytes, recorded {rec['bytes']}"
    if sha256_file(p) != rec["sha256"]:
        return "sha256 differs from the recorded one"
    return None


def reconcile(db: StateDB, cfg: RunConfig) -> list[str]:
    """Reset every ``done`` stage whose recorded outputs are missing or altered (and the stages
    downstream of it); move altered files aside. Returns the findings (empty: all intact)."""
    findings: list[str] = []
    order = [s.name for s in pipeline_stages(cfg)]
    done = {r.name for r in db.stages() if r.status == "done"}
    to_reset: dict[str, str] = {}
    for stage in order:
        if stage not in done:
            continue
        for rec in db.artifacts(producer=stage):
            problem = check_artifact(db, rec)
            if problem is None:
                continue
            p = Path(rec["path"])
            msg = f"{stage}: {p} {problem}"
            if p.is_file():  # altered here and now (not missing, not moved aside earlier)
                if rec["kind"] == "checkpoint":
                    aside = move_aside_corrupt(p.parent, f"{p.name} {problem}")
                else:
                    aside = move_aside(p)
                msg += f"; moved aside to {aside}"
            findings.append(msg + "; the stage will be redone")
            to_reset.setdefault(stage, f"{p.name} {problem}")
            for d in downstream(cfg, stage):
                to_reset.setdefault(d, f"its input from {stage} changed")
    for stage in order:
        if stage in to_reset and stage in done:
            db.reset_stage(stage, f"reconcile: {to_reset[stage]}")
    return findings
