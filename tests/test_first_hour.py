"""A new user's first hour (issue 16), through the CLI where it is user-facing: a run directory
holds one configuration, errors come before work, a stage whose process is gone shows as
interrupted, a closed stdout stops a run cleanly, the smoke test's sample has no replacement
characters, forgetting across phases is measured and flagged, replay mixes earlier data in."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fault_injection import to_toml
from deeplm.config import config_from_dict
from deeplm.data.clean import split_for, split_score
from deeplm.data.shards import Shard
from deeplm.eval.forgetting import forgetting_warnings
from deeplm.pipeline.local import run_local
from deeplm.pipeline.stages import VAL_CHARS_PER_TOKEN
from deeplm.pipeline.status import status
from deeplm.run.layout import RunLayout
from deeplm.run.state_db import StateDB
from deeplm.tokenizer import Tokenizer
from tests.finished_run import cli_env, micro_run, one_thread, run_cli
from tests.helpers import two_phase_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    return micro_run(tmp_path_factory)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _config(tmp_path: Path, data: dict, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(data))
    return path


def _runs_in(run_dir: Path) -> list[str]:
    db = StateDB(run_dir / "state.db", readonly=True)
    try:
        return [r[0] for r in db._query("SELECT name FROM runs")]
    finally:
        db.close()


# ------------------------------------------------------------------ one run directory, one config


def test_another_config_in_a_run_dir_is_refused_naming_the_keys(done_run, tmp_path):
    run = _copy(done_run, tmp_path / "run")
    before = (run / "config.json").read_text()
    r = run_cli("run", "--preset", "tiny", "--run-dir", str(run))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "different configuration" in r.stderr
    for key in ("name", "model.n_layers", "phases.2.*"):  # tiny's third phase is new here
        assert key in r.stderr
    assert re.search(r"phases\.0\.\{[^}]*\btokens\b", r.stderr)
    assert "nothing to do" not in r.stdout
    assert (run / "config.json").read_text() == before
    assert len(_runs_in(run)) == 1


def test_config_change_flag_admits_only_changes_that_keep_finished_work(tmp_path):
    d = two_phase_config("flagged")
    d["phases"][1]["sources"][0]["max_chars"] = 100_000
    cfg = _config(tmp_path, d)
    run = tmp_path / "run"
    base = ["prepare", "--config", str(cfg), "--run-dir", str(run)]
    assert run_cli(*base).returncode == 0
    # a phase that has not started may get another learning rate, but only when asked for
    r = run_cli(*base, "--set", "phases.1.lr=5e-4")
    assert r.returncode == 2 and "phases.1.lr" in r.stderr and "--allow-config-change" in r.stderr
    r = run_cli(*base, "--set", "phases.1.lr=5e-4", "--allow-config-change")
    assert r.returncode == 0, r.stderr
    assert "applying changes" in r.stdout and "phases.1.lr" in r.stdout
    assert json.loads((run / "config.json").read_text())["phases"][1]["lr"] == 5e-4
    # its data may not change: the prepared documents would no longer match
    r = run_cli(*base, "--set", "phases.1.val_fraction=0.1", "--allow-config-change")
    assert r.returncode == 2 and "phases.1.val_fraction" in r.stderr
    # how the run executes may change; it is said, not silent
    r = run_cli(*base, "--set", "phases.1.lr=5e-4", "--set", "train.log_every=5")
    assert r.returncode == 0, r.stderr
    assert "train.log_every (1 -> 5)" in r.stdout
    assert _runs_in(run) == ["flagged"]


def test_finished_phase_keys_are_refused_even_with_the_flag(done_run, tmp_path):
    run = _copy(done_run, tmp_path / "run")
    d = json.loads((run / "config.json").read_text())
    d["phases"][0]["eval_every"] = 3
    cfg = _config(tmp_path, {k: v for k, v in d.items() if k != "base_dir"})
    r = run_cli("run", "--config", str(cfg), "--run-dir", str(run), "--allow-config-change")
    assert r.returncode == 2 and "phases.0.eval_every" in r.stderr


# ------------------------------------------------------------------ errors before work


def test_missing_source_path_fails_before_any_work(tmp_path):
    d = two_phase_config("missing")
    d["phases"][1]["sources"] = [{"kind": "files", "path": "my_corpus/"}]
    cfg = _config(tmp_path, d)
    run = tmp_path / "run"
    t0 = time.perf_counter()
    r = run_cli("run", "--config", str(cfg), "--run-dir", str(run))
    assert r.returncode == 2
    assert "phases[1] (vocabulary).sources[0].path" in r.stderr
    assert "does not exist" in r.stderr and "config file's folder" in r.stderr
    assert time.perf_counter() - t0 < 30
    assert not (run / "state.db").exists() and not (run / "data").exists()


def test_copied_preset_says_which_relative_path_to_change(tmp_path):
    shutil.copy(REPO / "src" / "deeplm" / "configs" / "tiny.toml", tmp_path / "tiny.toml")
    r = run_cli("run", "--config", str(tmp_path / "tiny.toml"), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "phases[2] (finetune).sources[0].path: 'docs'" in r.stderr
    assert "change the path there, or give an absolute path" in r.stderr


def _finetune_docs(folder: Path, seed: int, val_fraction: float, n_train: int = 30) -> None:
    """Short documents (about 300 characters) for a fine-tune phase: ``n_train`` for training,
    exactly 1 for validation, and one too short to keep."""
    words = "the a model reads writes short plain prose line river house green old new".split()
    words += "quiet slow evening morning garden letter friend city road window small".split()
    folder.mkdir()
    kept = {"train": 0, "val": 0}
    i = 0
    while kept["train"] < n_train or kept["val"] < 1:
        rng = random.Random(i)
        text = f"Note {i}: " + " ".join(rng.choice(words) for _ in range(45)) + "."
        split = split_for(text, val_fraction, seed)
        if kept[split] < (n_train if split == "train" else 1):
            (folder / f"{i:03d}.txt").write_text(text)
            kept[split] += 1
        i += 1
    (folder / "zz-tiny.txt").write_text("Too short to keep.")


def _finetune_config(tmp_path: Path, name: str, n_train: int) -> Path:
    """Two phases, the second a fine-tune at context 256 on :func:`_finetune_docs` (in
    ``tmp_path / "ft"``) plus the too-short file as a source of its own."""
    d = two_phase_config(name)
    d["model"]["max_seq_len"] = 256
    _finetune_docs(tmp_path / "ft", d["seed"], 0.1, n_train)
    d["phases"][1] = dict(
        d["phases"][1],
        name="finetune",
        kind="finetune",
        seq_len=256,
        micro_batch=1,
        val_fraction=0.1,
        sources=[
            {"kind": "files", "path": "ft"},
            {"kind": "files", "path": "ft/zz-tiny.txt"},
        ],
    )
    return _config(tmp_path, d)


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open()]


def test_too_small_finetune_shard_fails_before_the_first_training_step(tmp_path):
    # 5 training documents hold fewer characters than validation would need, so none can move
    # there: the validation split stays one short document
    cfg = _finetune_config(tmp_path, "small-ft", n_train=5)
    run = tmp_path / "run"
    r = run_cli("run", "--config", str(cfg), "--run-dir", str(run))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "moved to validation" not in r.stdout
    assert "phase 'finetune' (phases[1]): its val shard holds" in r.stderr
    assert "fewer than one window of 257 tokens at context 256" in r.stderr
    assert not (run / "checkpoints").exists()  # phase 1 did not train first
    # the source the filters dropped entirely is a console warning naming it and why
    assert "warning: finetune: source files:ft/zz-tiny.txt was dropped entirely" in r.stdout
    assert "too short" in r.stdout


def test_too_small_val_split_is_topped_up_from_training_documents(tmp_path):
    cfg = _finetune_config(tmp_path, "topped-up", n_train=30)
    seed = two_phase_config()["seed"]
    run = tmp_path / "run"
    r = run_cli("prepare", "--config", str(cfg), "--run-dir", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    layout = RunLayout(run)
    train, val = (_texts(layout.docs("finetune", s)) for s in ("train", "val"))
    # the hash split gave validation one short document; the rest are training documents
    (val_doc,) = [t for t in train + val if split_for(t, 0.1, seed) == "val"]
    assert val[0] == val_doc
    moved = val[1:]
    assert moved and all(split_for(t, 0.1, seed) == "train" for t in moved)
    m = re.search(r"\[prepare\] finetune: (\d+) training documents moved to validation", r.stdout)
    assert m and int(m.group(1)) == len(moved), r.stdout
    need = VAL_CHARS_PER_TOKEN * 257
    assert sum(map(len, val)) >= need
    assert sum(map(len, train)) >= need  # the training split keeps enough too
    assert not set(train) & set(val)
    assert len(train) + len(moved) == 30
    # the moved ones were training documents of the source, nearest the val side of the split
    sources = {p.read_text() for p in (tmp_path / "ft").glob("*.txt")}
    assert set(moved) <= sources
    scores = sorted(split_score(t, seed) for t in train)
    assert max(split_score(t, seed) for t in moved) < scores[0]
    # the tokenize stage saw the topped-up split: one window at context 256 now fits
    m = re.search(r"\[tokenize:finetune\] val: .* -> ([\d,]+) tokens", r.stdout)
    n_val = int(m.group(1).replace(",", "")) if m else None
    tok = Tokenizer.load(layout.tokenizer)
    assert Shard.open(layout.shard("finetune", "val"), tok.hash).meta.n_tokens == n_val >= 257
    # the same configuration prepares the same files
    again = tmp_path / "again"
    r = run_cli("prepare", "--config", str(cfg), "--run-dir", str(again))
    assert r.returncode == 0, r.stdout + r.stderr
    for s in ("train", "val"):
        path = layout.docs("finetune", s)
        assert RunLayout(again).docs("finetune", s).read_bytes() == path.read_bytes()


# ------------------------------------------------------------------ interrupted runs


def _start(cfg: Path, run: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deeplm.cli", "run", "--config", str(cfg), "--run-dir", str(run)]
    return subprocess.Popen(cmd, env=cli_env(), text=True, **kw)


def _wait_for(pred, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.2)


def _running(run: Path) -> list[str]:
    if not (run / "config.json").is_file() or not (run / "state.db").is_file():
        return []
    return [s["name"] for s in status(run)["stages"] if s["status"] == "running"]


def test_killed_run_shows_as_interrupted(tmp_path):
    cfg = _config(tmp_path, two_phase_config("killed"))
    run = tmp_path / "run"
    proc = _start(cfg, run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _running(run))
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = run_cli("status", "--run-dir", str(run))
    assert r.returncode == 0 and "interrupted" in r.stdout
    st = json.loads(run_cli("status", "--run-dir", str(run), "--json").stdout)
    assert st["run"]["status"] == "interrupted"
    statuses = {s["status"] for s in st["stages"]}
    assert "interrupted" in statuses and "running" not in statuses


def test_closed_stdout_stops_the_run_at_a_safe_point(tmp_path):
    cfg = _config(tmp_path, two_phase_config("piped"))
    run = tmp_path / "run"
    proc = _start(cfg, run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith("deeplm run:")
    proc.stdout.close()  # `deeplm run ... | head -1`
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 3), err
    assert "Traceback" not in err
    st = status(run)
    assert not [s for s in st["stages"] if s["status"] in ("running", "interrupted", "failed")]
    if proc.returncode == 3:
        assert "stdout was closed" in err and st["run"]["status"] == "paused"


# ------------------------------------------------------------------ generated text


def test_smoke_test_sample_has_no_replacement_characters():
    r = subprocess.run(
        [sys.executable, "scripts/train.py", "--smoke-test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert r.returncode == 0, r.stderr
    line = next(x for x in (r.stdout + r.stderr).splitlines() if "greedy sample" in x)
    assert "\ufffd" not in line and "\\ufffd" not in line


def test_train_script_help_mentions_the_smoke_test():
    r = subprocess.run(
        [sys.executable, "scripts/train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert r.returncode == 0 and "--smoke-test" in r.stdout


# ------------------------------------------------------------------ forgetting


def test_report_has_the_forgetting_table(done_run):
    report = (done_run / "report.md").read_text()
    assert "## Forgetting across phases" in report
    assert "| grammar |" in report


def test_eval_flags_every_phase_that_raised_an_earlier_loss(done_run, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--run-dir", str(done_run), "--quick", "--out", str(out)]
    r = run_cli(*args, "--forgetting-margin", "-1", "--grammar-pairs", "10", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "eval.json").read_text())["forgetting"]
    grammar = res["matrix"]["grammar"]
    assert set(grammar) == {"grammar", "vocabulary"}
    raised = grammar["vocabulary"] > grammar["grammar"]
    assert bool(res["warnings"]) == raised
    assert ("warning: phase 'vocabulary' raised phase 'grammar'" in r.stdout) == raised
    assert ("warning: phase" in (out / "report.md").read_text()) == raised


def test_forgetting_warnings_name_the_phase_that_raised_the_loss():
    cfg = config_from_dict(two_phase_config())
    matrix = {"grammar": {"grammar": 5.0, "vocabulary": 5.3}, "vocabulary": {"vocabulary": 4.0}}
    (w,) = forgetting_warnings(matrix, cfg, margin=0.1)
    assert (w["phase"], w["earlier"]) == ("vocabulary", "grammar")
    assert w["rise"] == pytest.approx(0.3)
    assert forgetting_warnings(matrix, cfg, margin=0.5) == []


def test_replay_mixes_earlier_training_documents_into_a_phase(tmp_path):
    d = two_phase_config("replay")
    d["phases"][1]["replay"] = 0.3
    cfg = config_from_dict(d)
    with one_thread():
        summary = run_local(tmp_path / "run", cfg, log=lambda s: None, data_only=True)
    assert summary["status"] == "done"

    def texts(phase: str, split: str) -> list[str]:
        path = tmp_path / "run" / "data" / phase / f"{split}.jsonl"
        return [json.loads(line)["text"] for line in path.open()]

    grammar = set(texts("grammar", "train"))
    vocab = texts("vocabulary", "train")
    replayed = [t for t in vocab if t in grammar]
    share = sum(map(len, replayed)) / sum(map(len, vocab))
    assert 0.2 < share < 0.4, share
    assert vocab[-len(replayed) :] == replayed  # after the phase's own documents
    assert not set(texts("vocabulary", "val")) & grammar  # validation stays the phase's own
    db = StateDB(tmp_path / "run" / "state.db", readonly=True)
    info = db.stage("prepare").outputs["phases"]["vocabulary"]
    db.close()
    assert info["replay_docs"] == len(replayed)


# ------------------------------------------------------------------ clear errors, small things


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "--preset", "tiny", "--set", "phases.9.lr=1e-3"],
            "the config has 3 phases (0: grammar, 1: vocabulary, 2: finetune)",
        ),
        (["run", "--preset", "tiny", "--set", "model.n_layer=4"], "did you mean 'model.n_layers'"),
        (
            ["run", "--preset", "tiny", "--set", "phases.0.learning_rate=1e-3"],
            "did you mean 'phases[0].lr'",
        ),
        (["serve", "--run-dir", "x", "--port", "99999"], "99999 is not a TCP port"),
        (["eval", "--checkpoint", "no/such/step-0000001"], "no such checkpoint folder"),
    ],
)
def test_clear_errors_instead_of_tracebacks(args, message, tmp_path):
    r = run_cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_export_files_share_one_mode(done_run, tmp_path):
    out = tmp_path / "export"
    r = run_cli("export", "--run-dir", str(done_run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_status_shows_progress_elapsed_time_and_eta(done_run, tmp_path):
    from deeplm.pipeline.status import add_etas, stage_progress

    cfg = config_from_dict(two_phase_config())
    st = {"name": "prepare", "status": "running", "error": None, "cursor": {"parts": {"a": 1}}}
    assert stage_progress(cfg, st, {}) == "1/2 sources prepared"
    st = {"name": "tokenize:grammar", "status": "running", "error": None}
    st["cursor"] = {"train": {"last_doc_index": 5, "n_tokens": 900}}
    assert stage_progress(cfg, st, {"grammar": {"train_docs": 50}}) == "train doc 5/50 (900 tokens)"
    st = {"name": "evaluate", "status": "running", "error": None}
    st["cursor"] = {"part": "grammar", "parts_done": 3, "parts_total": 6}
    assert stage_progress(cfg, st, {}) == "grammar (3/6 parts)"
    stages = [{"name": f"train:{p.name}", "status": "pending"} for p in cfg.phases]
    stages[0]["status"] = "running"
    phases = [
        {"name": "grammar", "status": "running", "step": 12, "metrics": {"tokens_per_s": 256}}
    ]
    run: dict = {}
    add_etas(cfg, stages, phases, run)
    per_step = cfg.phases[0].tokens_per_step
    assert stages[0]["eta_s"] == pytest.approx(12 * per_step / 256)
    assert run["eta_s"] == pytest.approx((12 + cfg.phases[1].total_steps) * per_step / 256)
    # a finished run: every stage shows the time it took, nothing is running
    assert "ETA" not in run_cli("status", "--run-dir", str(done_run)).stdout
    done = status(done_run)
    assert done["run"]["eta_s"] is None
    assert all(s["elapsed_s"] > 0 for s in done["stages"] if s["name"].startswith("train:"))


def test_temporal_console_eta_and_worker_names():
    from deeplm.pipeline.temporal.client import format_live
    from deeplm.pipeline.temporal.worker import worker_identity

    hb = {"phase": "grammar", "step": 10, "total_steps": 70, "tokens": 10_240, "tokens_per_s": 1024}
    line = format_live({"id": "train:grammar", "attempt": 1, "heartbeat": hb})
    assert "ETA 1m00s" in line
    assert worker_identity("deeplm-gpu", "cpu", "h:1") == "deeplm-gpu queue on cpu@h:1"


def test_log_lines_are_printed_above_the_progress_bar(monkeypatch):
    import io

    from tqdm import tqdm

    from deeplm.cli import _StopFlag, console_log

    screen = io.StringIO()  # stdout and the bar share one terminal
    monkeypatch.setattr(sys, "stdout", screen)
    bar = tqdm(total=10, file=screen, desc="grammar", mininterval=0)
    bar.update(3)
    console_log(_StopFlag())("[grammar] step 3/10 val loss 5.0000")
    bar.close()
    text = screen.getvalue()
    at = text.index("[grammar] step 3/10")
    assert text[at - 1] in "\r\n", repr(text[max(0, at - 40) : at + 10])  # not glued to the bar
    assert text[at:].split("\n")[0] == "[grammar] step 3/10 val loss 5.0000"
