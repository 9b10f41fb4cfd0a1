"""Bad input never gets a traceback (issue 18, items 1-6), through the real ``deeplm`` CLI.

Each test copies the shared finished micro run (tests/finished_run.py) and damages the copy: a
garbage ``state.db``, an invalid ``config.json``, a truncated newest checkpoint; or passes bad
flags and config values. Every command must exit with a clear one-line error naming the file or
key (exit 2), or go on with a warning that says what it skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.fault_injection import to_toml
from deeplm.config import ConfigError, load_config
from tests.finished_run import micro_run, run_cli
from tests.helpers import drop_none


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return micro_run(tmp_path_factory)


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def _config_toml(run: Path, tmp_path: Path) -> Path:
    """The run's own config as a TOML file (what its user would pass to ``deeplm run``)."""
    data = json.loads((run / "config.json").read_text())
    path = tmp_path / "run.toml"
    path.write_text(to_toml(drop_none(data)))
    return path


def _error(proc, *needles: str) -> str:
    """Exit 2, one clear message with every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    return proc.stderr


def _ok(proc) -> str:
    assert proc.returncode == 0, (proc.stdout[-500:], proc.stderr[-2000:])
    return proc.stdout + proc.stderr


def test_garbage_state_db_status_run_eval_then_rebuild(run, tmp_path) -> None:
    """Item 1."""
    toml = _config_toml(run, tmp_path)
    for extra in run.glob("state.db-*"):
        extra.unlink()
    (run / "state.db").write_bytes(b"\x00garbage" * 4096)
    db = str(run / "state.db")
    _error(run_cli("status", "--run-dir", str(run)), db, "damaged", "--rebuild-state")
    _error(run_cli("eval", "--run-dir", str(run), "--quick"), db, "damaged", "--rebuild-state")
    _error(run_cli("run", "--config", str(toml), "--run-dir", str(run)), db, "--rebuild-state")
    out = _ok(run_cli("run", "--config", str(toml), "--run-dir", str(run), "--rebuild-state"))
    assert "moved the damaged state database aside" in out
    assert len(list(run.glob("state.db.corrupt-*"))) == 1
    proc = run_cli("status", "--run-dir", str(run), "--json")
    _ok(proc)
    status = json.loads(proc.stdout)
    assert status["run"]["status"] == "done"
    assert all(s["status"] == "done" for s in status["stages"])


def test_invalid_config_json_named_then_repaired(run, tmp_path) -> None:
    """Item 2."""
    toml = _config_toml(run, tmp_path)
    cfg_file = str(run / "config.json")
    (run / "config.json").write_text('{"name": "usemodel", oops: 1}')
    _error(run_cli("status", "--run-dir", str(run)), cfg_file, "damaged")
    _error(run_cli("generate", "--run-dir", str(run), "--prompt", "The"), cfg_file, "damaged")
    _error(run_cli("eval", "--run-dir", str(run), "--quick"), cfg_file, "damaged")
    other = run_cli("run", "--preset", "tiny", "--run-dir", str(run))  # not this run's config
    _error(other, cfg_file, "not the one recorded")
    assert (run / "config.json").read_text() == '{"name": "usemodel", oops: 1}'
    out = _ok(run_cli("run", "--config", str(toml), "--run-dir", str(run)))
    assert "config.json was damaged" in out and "rewritten" in out
    _ok(run_cli("generate", "--run-dir", str(run), "--prompt", "The", "--max-new-tokens", "2"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("phases.0.lr=nan", "phases.0.lr"),
        ("phases.0.lr=inf", "phases.0.lr"),
        ("clean.min_chars=-5", "clean.min_chars"),
        ("model.resid_dropout=1.5", "model.resid_dropout"),
        ("train.stall_timeout_s=-1", "train.stall_timeout_s"),
    ],
)
def test_numeric_config_values_checked_at_load(override: str, key: str) -> None:
    """Item 3: every numeric key, finite and in range, the error names the key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(preset="tiny", overrides=[override])


def test_nan_lr_on_the_command_line(tmp_path) -> None:
    """Item 3 through the CLI: refused before any stage runs (TOML: bench/hostile_inputs.py)."""
    run_dir = tmp_path / "never"
    proc = run_cli("run", "--preset", "tiny", "--set", "phases.0.lr=nan", "--run-dir", str(run_dir))
    _error(proc, "phases.0.lr", "finite")
    assert not run_dir.exists()


def test_run_dir_that_is_a_file_or_empty(tmp_path) -> None:
    """Item 4."""
    _error(run_cli("run", "--preset", "tiny", "--run-dir", "/etc/passwd"), "/etc/passwd", "a file")
    _error(run_cli("run", "--preset", "tiny", "--run-dir", ""), "--run-dir", "empty")
    _error(run_cli("prepare", "--preset", "tiny", "--run-dir", " "), "--run-dir", "empty")


def test_generate_bad_sampling_flags(finished) -> None:
    """Item 5."""
    base = ("generate", "--run-dir", str(finished), "--prompt", "The")
    _error(run_cli(*base, "--temperature", "nan"), "--temperature")
    _error(run_cli(*base, "--temperature", "-1"), "--temperature")
    _error(run_cli(*base, "--top-p", "inf"), "--top-p")
    _error(run_cli(*base, "--max-new-tokens", "100000"), "--max-new-tokens", "4096")


def test_truncated_newest_checkpoint_is_reported_everywhere(run, tmp_path) -> None:
    """Item 6: generate, eval and status say the newest checkpoint is corrupt; run says so."""
    toml = _config_toml(run, tmp_path)
    steps = sorted(run.glob("checkpoints/*/step-*"))
    newest = max(steps, key=lambda p: (p.parent.name, p.name))  # "<index>-<phase>/step-N"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = _ok(
        run_cli("generate", "--run-dir", str(run), "--prompt", "The", "--max-new-tokens", "2")
    )
    assert f"checkpoint {newest}.corrupt is corrupt" in out and "using the newest intact" in out
    out = _ok(
        run_cli(
            "eval", "--run-dir", str(run), "--quick", "--grammar-pairs", "4",
            "--eval-batches", "1", "--samples", "1", "--out", str(tmp_path / "ev"),
        )  # fmt: skip
    )
    assert "is corrupt" in out
    out = _ok(run_cli("status", "--run-dir", str(run)))
    assert f"warning: checkpoint {newest}.corrupt is corrupt" in out
    out = _ok(run_cli("run", "--config", str(toml), "--run-dir", str(run), "--no-progress"))
    assert "corrupt" in out
    assert "missing" not in out
    # trained again past it: the corrupt copy stays for inspection, the warnings stop
    assert (newest.parent / f"{newest.name}.corrupt").is_dir()
    assert "warning" not in _ok(run_cli("status", "--run-dir", str(run)))
