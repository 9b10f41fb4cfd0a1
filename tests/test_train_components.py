"""The trainer's components decide for themselves when to act: evaluation, sampling and saving
cadences, the divergence guard (NaN/Inf, grad-norm spikes, rollbacks), the plateau stop, the
curriculum/freeze plan, and the one-process parallel plan."""

from __future__ import annotations

import math

import pytest
import torch

from deeplm.config import ContextStage, FreezeStage, PhaseConfig, RunConfig
from deeplm.model import Transformer
from deeplm.train.checkpointer import Checkpointer
from deeplm.train.compile import compile_for_training, step_plan
from deeplm.train.curriculum import CurriculumPlan
from deeplm.train.evaluator import Evaluator
from deeplm.train.guard import DivergenceGuard, TrainingDiverged
from deeplm.train.metrics import NullMetrics
from deeplm.train.parallel import Parallel
from deeplm.train.plateau import PlateauStop
from deeplm.train.progress import ProgressReporter
from deeplm.train.sampling import Sampler
from deeplm.train.schedule import lr_at

CPU = torch.device("cpu")


def _phase(**kw) -> PhaseConfig:
    base = {"tokens": 100 * 64 * 8, "seq_len": 64, "micro_batch": 8}  # 100 steps
    return PhaseConfig(**(base | kw))


def test_should_eval_every_n_steps_and_at_the_end():
    ev = Evaluator(_phase(eval_every=3), None, CPU, None, NullMetrics())
    assert [s for s in range(1, 13) if ev.should_eval(s, last=False)] == [3, 6, 9, 12]
    assert ev.should_eval(7, last=True)
    never = Evaluator(_phase(eval_every=0), None, CPU, None, NullMetrics())
    assert not any(never.should_eval(s, last=False) for s in range(1, 50))
    assert never.should_eval(50, last=True)


def test_should_sample_on_its_own_cadence_or_each_evaluation():
    s = Sampler(
        RunConfig(), _phase(eval_every=3, sample_every=4), None, CPU, NullMetrics(), None, None
    )
    assert [k for k in range(1, 13) if s.should_sample(k, last=False)] == [4, 8, 12]
    assert s.should_sample(5, last=True)
    each = Sampler(RunConfig(), _phase(eval_every=3), None, CPU, NullMetrics(), None, None)
    assert [k for k in range(1, 10) if each.should_sample(k, last=False)] == [3, 6, 9]
    assert each.sample(None, 3) == [] and each.samples == []  # a rank that does not sample


def test_should_save_every_n_steps():
    c = Checkpointer(RunConfig(), _phase(save_every=5), 0, None, None, print)
    assert [s for s in range(1, 16) if c.should_save(s)] == [5, 10, 15]
    never = Checkpointer(RunConfig(), _phase(save_every=0), 0, None, None, print)
    assert not any(never.should_save(s) for s in range(1, 50))


def test_progress_logs_every_n_steps_and_at_the_end():
    cfg = RunConfig()
    cfg.train.log_every = 10
    cfg.train.progress = False
    p = ProgressReporter(
        cfg, _phase(), CPU, None, NullMetrics(), lambda i: None, 0, 0, False, False
    )
    assert [s for s in range(1, 101) if p.should_log(s)] == list(range(10, 101, 10))
    short = _phase(tokens=25 * 64 * 8)  # 25 steps: the last one is logged too
    p = ProgressReporter(cfg, short, CPU, None, NullMetrics(), lambda i: None, 0, 0, False, False)
    assert [s for s in range(1, 26) if p.should_log(s)] == [10, 20, 25]
    p.close()


def test_guard_flags_non_finite_values_and_keeps_its_ema_clean():
    g = DivergenceGuard(_phase(), 0)
    assert g.check(1, 2.0, 1.0) is None and g.grad_norm_ema == 1.0
    assert g.check(2, float("nan"), 1.0) == "loss nan"
    assert g.check(2, 2.0, float("inf")) == "loss 2.0"
    assert g.grad_norm_ema == 1.0  # a diverged step does not move the running mean
    assert g.check(3, 2.0, 3.0) is None and g.grad_norm_ema == pytest.approx(1.2)


def test_guard_detects_spikes_only_past_the_warmup_and_when_enabled():
    off = DivergenceGuard(_phase(spike_factor=0.0), 0)
    for step, gn in enumerate([1.0, 1.0, 100.0], start=50):
        assert off.check(step, 2.0, gn) is None
    g = DivergenceGuard(_phase(spike_factor=3.0, warmup_frac=0.1), 0)  # warmup: 10 steps
    assert g.check(2, 2.0, 1.0) is None
    assert g.check(5, 2.0, 10.0) is None  # in the warmup: large norms are expected
    g.grad_norm_ema = 1.0
    assert g.check(20, 2.0, 2.9) is None
    ema = g.grad_norm_ema
    assert g.check(21, 2.0, 10.0) == "grad-norm spike 10"
    assert g.grad_norm_ema == ema


def test_guard_rollbacks_lower_the_lr_lengthen_the_warmup_then_give_up():
    phase = _phase(max_rollbacks=2, lr=1e-3, warmup_frac=0.2)
    g = DivergenceGuard(phase, 1)
    assert g.lr(50) == pytest.approx(lr_at(50, 100, 1e-3, 0.2, 0.1, "cosine", 0.2))
    g.grad_norm_ema = 1.0
    g.rollback(30, "loss nan")
    assert (g.lr_scale, g.warmup_scale, g.rollbacks, g.grad_norm_ema) == (0.5, 2.0, 1, None)
    assert g.warmup_frac() == pytest.approx(0.4)
    assert g.lr(50) == pytest.approx(0.5 * lr_at(50, 100, 1e-3, 0.4, 0.1, "cosine", 0.2))
    g.rollback(30, "loss nan")
    assert g.warmup_frac() == 0.5  # capped at half the phase
    assert "rollback 2/2" in g.describe("loss nan", 20, "step 20")
    with pytest.raises(TrainingDiverged, match=r"2 rollbacks did not help; lower phases\[1\]\.lr"):
        g.rollback(30, "loss nan")


def test_guard_state_round_trips_and_old_checkpoints_get_defaults():
    g = DivergenceGuard(_phase(), 0)
    g.rollback(3, "loss nan")
    h = DivergenceGuard(_phase(), 0)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == {"lr_scale": 0.5, "warmup_scale": 2.0, "rollbacks": 1}
    h.load_state_dict({})
    assert h.state_dict() == {"lr_scale": 1.0, "warmup_scale": 1.0, "rollbacks": 0}


def test_plateau_stops_after_patience_evaluations_without_improvement():
    p = PlateauStop(_phase(plateau_patience=2, plateau_min_delta=0.1))
    assert not p.update(3.0, 10)
    assert not p.update(2.95, 20)  # not better by more than min_delta
    assert p.update(2.99, 30)  # second evaluation without improvement
    assert "no improvement > 0.1 in 2 evaluations (best 3.0000)" in p.reason()
    assert p.best_step == 10  # the step whose weights a plateau stop keeps
    assert not p.update(2.5, 40) and p.evals_since_best == 0  # a real improvement resets
    assert p.best_step == 40


def test_plateau_patience_zero_never_stops_and_state_round_trips():
    p = PlateauStop(_phase(plateau_patience=0))
    assert not any(p.update(5.0, i) for i in range(10))
    assert p.state_dict() == {"best_val_loss": 5.0, "best_step": 0, "evals_since_best": 9}
    q = PlateauStop(_phase())
    assert q.state_dict() == {"best_val_loss": -1.0, "best_step": 0, "evals_since_best": 0}
    q.load_state_dict(q.state_dict())
    assert q.best_val is None
    q.load_state_dict({"best_val_loss": 2.0, "best_step": 7, "evals_since_best": 1})
    assert (q.best_val, q.best_step, q.evals_since_best) == (2.0, 7, 1)
    q.load_state_dict({"best_val_loss": 2.0, "evals_since_best": 1})  # a checkpoint from before
    assert q.best_step == 0


def test_curriculum_plan_changes_context_and_freezes_with_a_kept_checkpoint():
    phase = _phase(
        curriculum=[ContextStage(at=0.0, seq_len=16), ContextStage(at=0.5, seq_len=64)],
        freeze=[FreezeStage(at=0.3, layers=1), FreezeStage(at=0.6, layers=2)],
    )
    plan = CurriculumPlan(phase)
    assert plan.context(0) == 16 and plan.context(50) == 64
    assert plan.new_context(0, 64) == 16 and plan.new_context(10, 16) is None
    assert plan.new_context(50, 16) == 64
    assert phase.micro_batch_for(16) == 32 and phase.micro_batch_at(0) == 32
    assert plan.new_frozen(29, 0) is None and plan.new_frozen(30, 0) == 1
    assert [s for s in range(100) if plan.keep_before_freeze(s)] == [30, 60]
    unfreeze = CurriculumPlan(_phase(freeze=[FreezeStage(at=0.0, layers=2)]))
    assert not unfreeze.keep_before_freeze(0)  # nothing trained yet at step 0


def test_one_process_parallel_plan_is_the_plain_model():
    torch.manual_seed(0)
    cfg = RunConfig().model
    cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len = 1, 32, 2, 50, 16
    model = Transformer(cfg)
    par = Parallel()
    plan = step_plan(RunConfig().train, CPU)  # auto on CPU: eager, chunked head
    assert not par.distributed and not plan.compile
    x = torch.randint(0, 50, (2, 8))
    with par.micro_batch(compile_for_training(model, plan), last=False) as loss_fn:
        loss, unweighted = loss_fn(x, x)
    assert torch.equal(loss, model.loss(x, x)[0]) and math.isfinite(float(unweighted))
    assert par.reduce_losses(loss, unweighted) == (loss, unweighted)
    opt = torch.optim.AdamW(model.parameters())
    saved_model, state = par.gather_for_save(model, opt)
    assert saved_model is model and state == opt.state_dict()
    assert par.sampling_model(model) is model and par.agree(1.5) == 1.5
    assert par.loader_args(8) == {"micro_batch": 8, "rank": 0, "world_size": 1}
