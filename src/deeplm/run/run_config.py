"""The run's recorded configuration file: load it, tell what is wrong with it, repair it from
the StateDB's record."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from deeplm.atomic import atomic_write_text
from deeplm.config import ConfigError, RunConfig, config_from_json, config_to_json
from deeplm.run.layout import CONFIG_FILE, STATE_FILE, RunLayout
from deeplm.run.state_db import StateDB


def load_run_config(run_dir: Path) -> RunConfig:
    """The config of the run in ``run_dir`` (its ``config.json``); a damaged file raises
    ConfigError naming the file, the problem and the repair."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a deeplm run directory (no {CONFIG_FILE})")
    try:
        return config_from_json(path.read_text(encoding="utf-8"), CONFIG_FILE)
    except (UnicodeDecodeError, json.JSONDecodeError, ConfigError) as exc:
        raise ConfigError(
            f"{path}: the run's config file is damaged ({exc}). Repair it by running "
            f"`deeplm run` once more with the run's --preset/--config and --run-dir {run_dir}: "
            f"the config is checked against the one recorded in {STATE_FILE} and the file "
            "rewritten"
        ) from None


def config_file_problem(path: Path) -> str | None:
    """None when ``path`` holds a valid run config, else what is wrong with it."""
    try:
        config_from_json(path.read_text(encoding="utf-8"), CONFIG_FILE)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ConfigError) as exc:
        return str(exc)
    return None


def repair_config_file(run_dir: Path, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """A damaged ``config.json`` (invalid JSON or config) is rewritten from ``cfg`` when the
    state database confirms ``cfg`` is this run's config (same fingerprint); otherwise
    ConfigError naming the file. An intact or absent file is left alone."""
    layout = RunLayout(run_dir)
    path = layout.config
    if not path.is_file() or (problem := config_file_problem(path)) is None:
        return
    recorded = None
    if layout.state_db.is_file():
        db = StateDB(layout.state_db, readonly=True)
        try:
            recorded = (db.run_info() or {}).get("config_json")
        finally:
            db.close()
    if recorded != cfg.fingerprint():
        raise ConfigError(
            f"{path}: the run's config file is damaged ({problem}), and the config given is not "
            f"the one recorded in {layout.state_db}: give the run's own --preset/--config "
            "(its file is then rewritten), or restore the file"
        )
    atomic_write_text(path, config_to_json(cfg))
    log(f"[integrity] {path} was damaged ({problem}); rewritten from the run's config")
