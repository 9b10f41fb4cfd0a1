"""Resources: device out-of-memory names the knobs, a stalled step is reported, a full disk
while checkpointing leaves the earlier state intact with a clear error (faults injected into the
real trainer and checkpoint writer)."""

from __future__ import annotations

import errno
import time

import pytest
import torch

from deeplm.config import config_from_dict
from deeplm.pipeline.local import run_local
from deeplm.run import checkpoint as ckpt
from deeplm.train.trainer import OutOfMemory, PhaseTrainer, TrainHooks
from tests.helpers import micro_config, two_phase_config


def _trainer(cls, corpus, tmp_path, events, stall_timeout_s: float = 0.5, **phase):
    d = micro_config(**phase)
    d["train"]["stall_timeout_s"] = stall_timeout_s
    cfg = config_from_dict(d)
    hooks = TrainHooks(log=lambda s: None, on_event=lambda k, m, data: events.append((k, m)))
    return cls(cfg, 0, tmp_path, corpus["tokenizer"], corpus["train"], corpus["val"], hooks=hooks)


class OOMAtStep3(PhaseTrainer):
    def _forward_loss(self, model, x, y):
        if self.current_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._forward_loss(model, x, y)


def test_out_of_memory_names_the_knobs(corpus, tmp_path):
    events: list = []
    trainer = _trainer(OOMAtStep3, corpus, tmp_path, events, save_every=2)
    with pytest.raises(OutOfMemory, match=r"phases\[0\]\.micro_batch.*grad_checkpointing"):
        trainer.run()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints" / "1-p1").step == 2  # kept


class SlowStep(PhaseTrainer):
    def _forward_loss(self, model, x, y):
        if self.current_step == 2:
            time.sleep(5.0)
        return super()._forward_loss(model, x, y)


def test_stalled_step_is_reported_once(corpus, tmp_path):
    """A step running past ``stall_timeout_s`` (2 s here; the micro model's steps take ~0.05 s,
    under a loaded CI machine well below 1 s) is reported once, not once per watchdog tick."""
    events: list = []
    out = _trainer(SlowStep, corpus, tmp_path, events, stall_timeout_s=2.0).run()
    assert out.status == "done"
    stalls = [m for k, m in events if k == "stall"]
    assert sum("step 3 has run for" in m for m in stalls) == 1, stalls
    steps = [m.split(" has run")[0] for m in stalls]
    assert len(steps) == len(set(steps)), stalls


def test_full_disk_while_checkpointing_keeps_earlier_state(tmp_path, monkeypatch):
    cfg = config_from_dict(two_phase_config())
    real = ckpt.save_model
    calls = {"n": 0}

    def full_disk_on_third(model, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(model, path)

    monkeypatch.setattr(ckpt, "save_model", full_disk_on_third)
    with pytest.raises(ckpt.DiskFullError, match="no space left.*earlier checkpoints are intact"):
        run_local(tmp_path, cfg, log=lambda s: None)
    phase_dir = tmp_path / "checkpoints" / "1-grammar"
    assert not list(phase_dir.glob(".step-*"))  # no half-written checkpoint left behind
    good = ckpt.list_checkpoints(phase_dir)
    assert [c.step for c in good] == [16]  # the newest kept checkpoint (keep_last = 1)
    for c in good:
        ckpt.verify(c.path)
    monkeypatch.setattr(ckpt, "save_model", real)
    summary = run_local(tmp_path, cfg, log=lambda s: None)  # space is back: it resumes
    assert summary["status"] == "done"
