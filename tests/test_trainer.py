"""Trainer: exact resume (bit-identical weights), checkpoints, retention, metrics, schedule use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deeplm.config import config_from_dict
from deeplm.run import checkpoint as ckpt
from deeplm.train.trainer import PhaseTrainer, TrainHooks
from tests.helpers import micro_config


def _train(corpus, run_dir, cfg_dict, stop_after=None, optimizer="adamw"):
    cfg_dict["phases"][0]["optimizer"] = optimizer
    cfg = config_from_dict(cfg_dict)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return stop_after is not None and calls["n"] > stop_after

    trainer = PhaseTrainer(
        cfg,
        0,
        run_dir,
        corpus["tokenizer"],
        corpus["train"],
        corpus["val"],
        hooks=TrainHooks(should_stop=should_stop, log=lambda s: None),
    )
    return trainer.run(), trainer


def _final_weights(outcome):
    return load_file(f"{outcome.last_checkpoint}/{ckpt.WEIGHTS}")


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adafactor"])
def test_exact_resume_is_bit_identical(corpus, tmp_path, optimizer):
    full, _ = _train(corpus, tmp_path / "full", micro_config(), optimizer=optimizer)
    assert full.status == "done" and full.step == 6
    # stop after 4 steps (a checkpoint is written at the stop), then resume to the end
    part, _ = _train(corpus, tmp_path / "split", micro_config(), stop_after=4, optimizer=optimizer)
    assert part.status == "stopped" and part.step == 4
    resumed, _ = _train(corpus, tmp_path / "split", micro_config(), optimizer=optimizer)
    assert resumed.status == "done" and resumed.step == 6
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_resume_from_periodic_checkpoint_after_crash(corpus, tmp_path):
    """Simulate a kill: drop everything after the step-4 checkpoint, resume from it."""
    full, _ = _train(corpus, tmp_path / "full", micro_config(keep_last=10))
    crash_dir = tmp_path / "crash"
    _train(corpus, crash_dir, micro_config(keep_last=10))
    phase_dir = crash_dir / "checkpoints" / "1-p1"
    import shutil

    for p in phase_dir.glob("step-*"):
        if p.name != "step-0000004":
            shutil.rmtree(p)
    resumed, _ = _train(corpus, crash_dir, micro_config(keep_last=10))
    assert resumed.status == "done" and not resumed.skipped
    a, b = _final_weights(full), _final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file holds one consistent history: no duplicated steps
    recs = [json.loads(line) for line in (crash_dir / "metrics" / "p1.jsonl").open()]
    train_steps = [r["step"] for r in recs if "loss" in r]
    assert train_steps == sorted(set(train_steps))


def test_finished_phase_is_skipped_and_val_loss_falls(corpus, tmp_path):
    out, _ = _train(corpus, tmp_path, micro_config(tokens=20 * 4 * 64, eval_every=10))
    assert out.val_loss < out.first_val_loss
    again, _ = _train(corpus, tmp_path, micro_config(tokens=20 * 4 * 64, eval_every=10))
    assert again.skipped and again.final_checkpoint == out.final_checkpoint


def test_retention_keeps_final_and_last(corpus, tmp_path):
    out, _ = _train(corpus, tmp_path, micro_config(tokens=9 * 4 * 64, save_every=2, keep_last=1))
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "1-p1").iterdir())
    assert names == ["step-0000008", "step-0000009"]
    meta = ckpt.read_meta(tmp_path / "checkpoints" / "1-p1" / "step-0000009")
    assert meta["final"] and meta["keep"] and meta["tokenizer_hash"] == corpus["tokenizer"].hash


def test_trainer_state_loads_with_weights_only(corpus, tmp_path):
    out, _ = _train(corpus, tmp_path, micro_config())
    state = torch.load(f"{out.last_checkpoint}/{ckpt.TRAINER_STATE}", weights_only=True)
    assert state["step"] == 6 and state["tokens"] == 6 * 4 * 64
    assert set(state["loader"]) >= {"epoch", "position"}
    assert "torch" in state["rng"]


def test_corrupted_checkpoint_is_moved_aside(corpus, tmp_path):
    _train(corpus, tmp_path, micro_config(keep_last=10))
    phase_dir = tmp_path / "checkpoints" / "1-p1"
    final = phase_dir / "step-0000006"
    data = bytearray((final / ckpt.WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (final / ckpt.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256 mismatch"):
        ckpt.verify(final)
    latest = ckpt.latest_checkpoint(phase_dir)
    assert latest is not None and latest.step == 4
    assert (phase_dir / "step-0000006.corrupt").is_dir()


def test_metrics_files_have_throughput_and_lr(corpus, tmp_path):
    _train(corpus, tmp_path, micro_config())
    recs = [json.loads(line) for line in (tmp_path / "metrics" / "p1.jsonl").open()]
    train = [r for r in recs if "loss" in r]
    assert len(train) == 6 and all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    header = (tmp_path / "metrics" / "p1.csv").read_text().splitlines()[0]
    assert "tokens_per_s" in header and "mfu" in header
    assert list((tmp_path / "tensorboard" / "p1").glob("events.out.tfevents.*"))


def test_checkpoint_of_another_tokenizer_is_never_resumed(corpus, tmp_path):
    full, _ = _train(corpus, tmp_path / "a", micro_config(keep_last=10))
    run = tmp_path / "b"
    _train(corpus, run, micro_config(keep_last=10), stop_after=4)
    phase_dir = run / "checkpoints" / "1-p1"
    meta_path = phase_dir / "step-0000004" / ckpt.META
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    done = json.loads((phase_dir / "step-0000004" / ckpt.DONE).read_text())
    from deeplm.atomic import sha256_file

    done[ckpt.META] = sha256_file(meta_path)  # a valid checkpoint, only of another tokenizer
    (phase_dir / "step-0000004" / ckpt.DONE).write_text(json.dumps(done))
    out, _ = _train(corpus, run, micro_config(keep_last=10))
    assert (phase_dir / "step-0000004.other-tokenizer").is_dir()
    a, b = _final_weights(full), _final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2, not from step 4


def test_adafactor_with_an_adamw_sized_lr_is_warned_about():
    """torch's Adafactor multiplies its lr by each parameter's RMS: an AdamW-sized lr (3e-4)
    barely trains (measured: docs/depth-vs-width.md), so it is named, with the usual range."""
    import warnings

    from deeplm.model import Transformer
    from deeplm.train.optim import build_optimizer

    cfg = config_from_dict(micro_config(optimizer="adafactor", lr=3e-4))
    model = Transformer(cfg.model)
    with pytest.warns(UserWarning, match=r"Adafactor with lr=0\.0003.*1e-2 to 5e-2"):
        build_optimizer(model, cfg.phases[0], torch.device("cpu"))
    cfg = config_from_dict(micro_config(optimizer="adafactor", lr=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(
            build_optimizer(model, cfg.phases[0], torch.device("cpu")), torch.optim.Adafactor
        )


def test_throughput_keeps_compile_eval_samples_and_checkpoints_apart(corpus, tmp_path):
    """Each record's tokens/s counts training steps only; the first step of each graph state
    (start, new context), evaluations, samples and checkpoints are reported beside it, and
    phase_timing adds them up per curriculum stage."""
    from deeplm.eval.report import render_report
    from deeplm.eval.timing import phase_timing

    cfg = micro_config(curriculum=[{"at": 0.0, "seq_len": 32}, {"at": 0.5, "seq_len": 64}])
    cfg["train"]["log_every"] = 2
    outcome, trainer = _train(corpus, tmp_path, cfg)
    recs = [json.loads(line) for line in (tmp_path / "metrics" / "p1.jsonl").open()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert train[0]["compile_s"] > 0 and "eval_s" not in train[0]  # step 1: the first step
    assert "checkpoint_s" not in train[0]  # the save after step 2 follows its record
    assert train[1]["checkpoint_s"] > 0  # ... and counts in the next window
    assert train[1]["eval_s"] > 0 and train[1]["samples_s"] > 0  # evaluated after step 3
    assert train[1]["compile_s"] > 0  # step 4 starts context 64: a new graph state
    assert "compile_s" not in train[2] and train[2]["checkpoint_s"] > 0
    per_step = 4 * 64
    for r in train:  # one of the window's two steps was excluded in the first two windows
        trained = per_step * (1 if "compile_s" in r else 2)
        assert r["tokens_per_s"] * r["train_s"] == pytest.approx(trained)
        excluded = sum(r.get(f"{k}_s", 0.0) for k in ("compile", "eval", "samples", "checkpoint"))
        assert r["train_s"] > 0 and excluded >= 0
    timing = phase_timing(recs)
    assert timing is not None
    assert timing["tokens"] == per_step * 4  # 6 steps, 2 of them first steps of a graph state
    assert [(s["seq_len"], s["tokens"]) for s in timing["stages"]] == [(32, 256), (64, 768)]
    spent = timing["train_s"] + sum(timing[f"{k}_s"] for k in ("compile", "eval", "samples"))
    assert spent + timing["checkpoint_s"] <= train[-1]["elapsed_s"] + 1e-6
    results = {"training": {"p1": timing}}
    text = render_report(trainer.cfg, results, corpus["tokenizer"], "x", None, [])
    assert "## Training time" in text and "| p1 | 32, 64 | 0, 0 |" in text


def test_max_epochs_cuts_the_budget_to_passes_over_the_shard(corpus, tmp_path):
    shard = corpus["train"].meta.n_tokens
    per_step = 4 * 64
    d = micro_config(tokens=shard * 10, max_epochs=1.5, eval_every=0, save_every=0)
    cfg = config_from_dict(d)
    lines, events = [], []
    hooks = TrainHooks(log=lines.append, on_event=lambda k, m, data: events.append((k, data)))
    trainer = PhaseTrainer(
        cfg, 0, tmp_path, corpus["tokenizer"], corpus["train"], corpus["val"], hooks=hooks
    )
    outcome = trainer.run()
    expected = int(1.5 * shard) // per_step
    assert outcome.status == "done" and outcome.step == outcome.total_steps == expected
    assert outcome.tokens == expected * per_step <= 1.5 * shard
    said = [line for line in lines if "passes over the" in line]
    assert len(said) == 1 and "10.0 passes" in said[0] and "max_epochs = 1.5" in said[0]
    assert events[0] == ("epochs", {"tokens": expected * per_step, "asked": shard * 10})
    # under the cap: the budget is the configured one, and nothing is said
    d = micro_config(max_epochs=4)
    lines.clear()
    trainer = PhaseTrainer(
        config_from_dict(d), 0, tmp_path / "b", corpus["tokenizer"], corpus["train"],
        corpus["val"], hooks=TrainHooks(log=lines.append),
    )  # fmt: skip
    assert trainer.run().step == 6 and not [line for line in lines if "passes over" in line]


def _scripted_val(monkeypatch, by_step: dict[int, float]) -> None:
    """Validation losses by step (the real evaluator still runs at step 0), so that the plateau
    decision is known in advance; everything else trains for real."""
    from deeplm.train.evaluator import Evaluator

    def evaluate(self, model, step, tokens):
        self.val_loss = by_step[step]
        return self.val_loss

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)


@pytest.mark.parametrize("stop_after", [None, 3])
def test_plateau_stop_ends_with_the_best_weights(corpus, tmp_path, monkeypatch, stop_after):
    """val 5.0, 4.0 (best, step 2), 4.5, 4.6: patience 2 stops after step 4 with step 2's
    weights, also when the run was stopped after step 3 and resumed (the best weights are kept
    on disk, not in memory)."""
    _scripted_val(monkeypatch, {1: 5.0, 2: 4.0, 3: 4.5, 4: 4.6, 5: 4.7, 6: 4.8})
    d = micro_config(eval_every=1, save_every=1, keep_last=20, plateau_patience=2)
    d["phases"][0]["plateau_min_delta"] = 0.0
    if stop_after is not None:
        outcome, _ = _train(corpus, tmp_path, json.loads(json.dumps(d)), stop_after=stop_after)
        assert outcome.status == "stopped" and outcome.step == 3
        assert (tmp_path / "checkpoints" / "1-p1" / "best-0000002").is_dir()
    lines = []
    trainer = PhaseTrainer(
        config_from_dict(d), 0, tmp_path, corpus["tokenizer"], corpus["train"], corpus["val"],
        hooks=TrainHooks(log=lines.append),
    )  # fmt: skip
    outcome = trainer.run()
    assert outcome.status == "done" and outcome.step == 4 and "plateau" in outcome.stop_reason
    assert outcome.val_loss == 4.0
    phase_dir = tmp_path / "checkpoints" / "1-p1"
    final = load_file(f"{outcome.final_checkpoint}/{ckpt.WEIGHTS}")
    at_step_2 = load_file(f"{phase_dir / 'step-0000002'}/{ckpt.WEIGHTS}")
    at_step_3 = load_file(f"{phase_dir / 'step-0000003'}/{ckpt.WEIGHTS}")
    assert outcome.final_checkpoint.endswith("step-0000004")  # the step it stopped at ...
    assert all(torch.equal(final[k], at_step_2[k]) for k in final)  # ... with step 2's weights
    assert not all(torch.equal(at_step_3[k], at_step_2[k]) for k in final)  # it trained on
    meta = ckpt.read_meta(Path(outcome.final_checkpoint))
    assert meta["final"] and meta["weights_of_step"] == 2 and meta["val_loss"] == 4.0
    assert any("ending with the weights of step 2" in line for line in lines)
    assert not list(phase_dir.glob("best-*"))  # removed once the phase ended
