"""Opening a run directory for a configuration: one run directory holds one run, so a different
effective configuration is refused before anything is written (naming the keys that differ);
changes that cannot invalidate finished work are admitted on request, logged and recorded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deeplm.atomic import atomic_write_text
from deeplm.config import (
    PHASE_CADENCE_KEYS,
    PHASE_TRAINING_KEYS,
    RunConfig,
    config_diff,
    config_to_json,
)
from deeplm.data.sources import check_sources
from deeplm.run.layout import RunLayout
from deeplm.run.run_config import load_run_config, repair_config_file
from deeplm.run.state_db import StateDB


class ConfigMismatch(ValueError):
    """A run directory holds a run with another configuration."""


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
    layout = RunLayout(run_dir)
    repair_config_file(run_dir, cfg, log)
    cfg_path = layout.config
    changed: dict[str, tuple[Any, Any]] = {}
    if cfg_path.is_file():
        changed = check_config_change(run_dir, load_run_config(run_dir), cfg, allow_config_change)
        if changed:
            log(f"[config] applying changes to the run's config: {_describe(changed)}")
    if _stage_statuses(run_dir).get("prepare") != "done":
        check_sources(cfg)  # a missing file is an error now, not after minutes of prepare
    run_dir.mkdir(parents=True, exist_ok=True)
    db = StateDB(layout.state_db)
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
    path = RunLayout(run_dir).state_db
    if not path.is_file():
        return {}
    db = StateDB(path, readonly=True)
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
