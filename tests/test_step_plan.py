"""How a training step runs on a device (deeplm.train.compile): the per-device plan, CUDA-graph
fallbacks, micro-batch regrouping, the full-logits head, whole-model compile (same loss as
eager, resume, no recompile storm under curriculum and freezing), compiled Newton-Schulz."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file

from deeplm.config import ConfigError, config_from_dict, load_config
from deeplm.model import Transformer
from deeplm.run import checkpoint as ckpt
from deeplm.train.compile import fit_plan, regroup, step_plan
from deeplm.train.optim import build_optimizer, newton_schulz
from deeplm.train.trainer import PhaseTrainer, TrainHooks
from tests.helpers import micro_config

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def _cfg(train: dict | None = None, **phase):
    d = micro_config(**phase)
    d["model"]["resid_dropout"] = 0.0
    d["model"]["embd_dropout"] = 0.0
    d["train"].update(train or {})
    return config_from_dict(d)


def _run(corpus, run_dir, cfg, stop_after=None):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return stop_after is not None and calls["n"] > stop_after

    hooks = TrainHooks(should_stop=should_stop, log=lambda s: None)
    trainer = PhaseTrainer(
        cfg, 0, run_dir, corpus["tokenizer"], corpus["train"], corpus["val"], hooks=hooks
    )
    return trainer.run(), trainer


def _weights(outcome):
    return load_file(f"{outcome.last_checkpoint}/{ckpt.WEIGHTS}")


# ---------------------------------------------------------------------------- the plan


def test_auto_plan_per_device():
    train = load_config(preset="60m").train
    cpu = step_plan(train, CPU)
    assert (cpu.compile, cpu.loss_head, cpu.micro_batch_tokens) == (False, "chunked", 0)
    cuda = step_plan(train, CUDA)
    assert (cuda.compile, cuda.scope, cuda.mode, cuda.loss_head) == (
        True,
        "model",
        "reduce-overhead",  # CUDA graphs: the same loss curve, 1.5x (bench/NOTES.md)
        "logits",
    )
    block = step_plan(dataclasses.replace(train, compile_scope="block"), CUDA)
    assert block.mode == "default"  # 60 graphs of blocks are not replayed as CUDA graphs
    assert cuda.micro_batch_tokens == 32_768
    assert cuda.uniform_weights and not cpu.uniform_weights
    phase = load_config(preset="60m").phases[0]
    assert not fit_plan(cuda, phase, distributed=True).uniform_weights  # blocks under DDP
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.compile is not used on MPS"
        mps = step_plan(dataclasses.replace(train, compile="on"), MPS)
    assert mps.compile is False and mps.loss_head == "chunked"
    forced = step_plan(dataclasses.replace(train, compile="on", compile_mode="auto"), CPU)
    assert (forced.compile, forced.scope, forced.mode) == (True, "block", "default")
    ro = step_plan(dataclasses.replace(train, compile="on", compile_mode="reduce-overhead"), CPU)
    assert ro.mode == "default"  # CUDA graphs exist only on CUDA


@pytest.mark.parametrize("mode", ["auto", "reduce-overhead"])
def test_cuda_graphs_only_for_one_micro_batch_of_one_process(mode):
    cfg = load_config(preset="60m")
    plan = step_plan(dataclasses.replace(cfg.train, compile_mode=mode), CUDA)
    one = regroup(cfg.phases[0], plan.micro_batch_tokens)
    assert one.grad_accum == 1 and one.micro_batch == 64
    assert fit_plan(plan, one).mode == "reduce-overhead"
    assert fit_plan(plan, cfg.phases[0]).mode == "default"  # 8 micro-batches per step
    ddp = fit_plan(plan, one, distributed=True)
    assert (ddp.scope, ddp.mode) == ("block", "default")


def test_compile_keys_read_old_booleans_and_reject_unknown_values():
    assert _cfg({"compile": True}).train.compile == "on"
    assert _cfg({"compile": False}).train.compile == "off"
    with pytest.raises(ConfigError, match="train.compile_mode must be one of"):
        _cfg({"compile_mode": "fast"})
    with pytest.raises(ConfigError, match="train.loss_head"):
        _cfg({"loss_head": "fused"})
    with pytest.raises(ConfigError, match="train.micro_batch_tokens must be >= 0"):
        _cfg({"micro_batch_tokens": -1})


# ---------------------------------------------------------------------------- regrouping


def test_regroup_keeps_tokens_per_step():
    phase = _cfg(micro_batch=2, grad_accum=8).phases[0]
    assert regroup(phase, 0) is phase
    assert regroup(phase, 64) is phase  # below one more window: unchanged
    four = regroup(phase, 4 * 64)
    assert (four.micro_batch, four.grad_accum) == (4, 4)
    whole = regroup(phase, 10**6)
    assert (whole.micro_batch, whole.grad_accum) == (16, 1)
    for p in (four, whole):
        assert p.tokens_per_step == phase.tokens_per_step
        assert p.total_steps == phase.total_steps
    six = regroup(_cfg(micro_batch=1, grad_accum=6).phases[0], 5 * 64)
    assert (six.micro_batch, six.grad_accum) == (3, 2)  # only divisors of grad_accum


def test_regrouped_training_is_the_same_computation(corpus, tmp_path):
    kw = dict(micro_batch=2, grad_accum=4, tokens=6 * 8 * 64, eval_every=0, save_every=0)
    fp32 = {"precision": "fp32"}  # bf16 rounding would differ per micro-batch shape
    plain, _ = _run(corpus, tmp_path / "plain", _cfg(fp32, **kw))
    grouped, trainer = _run(
        corpus, tmp_path / "grouped", _cfg({**fp32, "micro_batch_tokens": 512}, **kw)
    )
    assert (trainer.phase.micro_batch, trainer.phase.grad_accum) == (8, 1)
    assert grouped.step == plain.step == 6 and grouped.tokens == plain.tokens
    a, b = _weights(plain), _weights(grouped)
    # same windows in the same order: only the float summation order differs (Adam's first,
    # sign-like step turns that into at most ~3 % of one update, 9.5e-5 here, and no more later)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4, msg=k)
    assert abs(plain.val_loss - grouped.val_loss) < 1e-5  # evaluated on the same windows


# ---------------------------------------------------------------------------- loss heads


@pytest.mark.parametrize("weighted", [False, True])
def test_logits_head_equals_chunked_head(weighted):
    torch.manual_seed(0)
    cfg = _cfg().model
    x = torch.randint(0, cfg.vocab_size, (3, 32))
    y = torch.randint(0, cfg.vocab_size, (3, 32))
    y[0, :5] = -100
    w = torch.rand(3, 32) + 0.5 if weighted else None
    results = []
    for head in ("chunked", "logits"):
        torch.manual_seed(1)
        model = Transformer(cfg)
        model.set_loss_head(head)
        loss, unweighted = model.loss(x, y, w)
        loss.backward()
        results.append((unweighted, loss, [p.grad.clone() for p in model.parameters()]))
    (u1, l1, g1), (u2, l2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(u1, u2)
    assert not u2.requires_grad
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="chunked or logits"):
        Transformer(cfg).set_loss_head("fused")


# ---------------------------------------------------------------------------- whole-model compile

MODEL_COMPILE = {"compile": "on", "compile_scope": "model", "loss_head": "logits"}


def test_whole_model_compile_matches_eager_and_resumes(corpus, tmp_path):
    kw = dict(tokens=6 * 4 * 64, eval_every=0, save_every=2)
    fp32 = {"precision": "fp32"}  # bf16 rounds fused and unfused kernels differently
    compiled = {**MODEL_COMPILE, **fp32}
    eager, _ = _run(corpus, tmp_path / "eager", _cfg(fp32, **kw))
    full, trainer = _run(corpus, tmp_path / "full", _cfg(compiled, **kw))
    assert trainer.plan.compile and trainer.plan.scope == "model"
    for k, v in _weights(eager).items():  # fused kernels: float-rounding differences only
        torch.testing.assert_close(_weights(full)[k], v, rtol=0, atol=2e-4, msg=k)
    assert abs(full.val_loss - eager.val_loss) < 1e-3
    part, _ = _run(corpus, tmp_path / "split", _cfg(compiled, **kw), stop_after=3)
    assert part.status == "stopped"
    resumed, _ = _run(corpus, tmp_path / "split", _cfg(compiled, **kw))
    a, b = _weights(full), _weights(resumed)
    # compiled kernels are reproducible to the last bit or two only (two uninterrupted compiled
    # runs differ by ~7e-9 here): a resumed run lands within that of the uninterrupted one
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_curriculum_and_freezing_compile_once_per_shape_and_freeze_state(corpus, tmp_path):
    curriculum = [
        {"at": 0.0, "seq_len": 16},
        {"at": 0.3, "seq_len": 32},
        {"at": 0.7, "seq_len": 64},
    ]
    freeze = [{"at": 0.25, "layers": 1}, {"at": 0.5, "layers": 2}]
    cfg = _cfg(
        MODEL_COMPILE, tokens=10 * 4 * 64, curriculum=curriculum, freeze=freeze, eval_every=0
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, _ = _run(corpus, tmp_path, cfg)
    assert out.status == "done"
    # (context, frozen) pairs met over the 10 steps: (16,0) (32,1) (32,2) (64,2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, f"{graphs} graphs compiled for 4 (context, frozen) states"


def test_phases_with_and_without_token_weights_share_one_compiled_graph(corpus, tmp_path):
    kw = dict(tokens=3 * 4 * 64, eval_every=0, save_every=0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain, trainer = _run(corpus, tmp_path / "plain", _cfg(MODEL_COMPILE, **kw))
    assert plain.status == "done" and trainer.plan.uniform_weights
    assert trainer.token_weight_table is None  # an unweighted phase, run through the weights
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    weighted, trainer = _run(
        corpus, tmp_path / "rare", _cfg(MODEL_COMPILE, rare_token_alpha=0.5, **kw)
    )
    assert weighted.status == "done" and trainer.token_weight_table is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled


def test_weights_of_one_give_the_unweighted_loss_to_the_bit():
    torch.manual_seed(0)
    cfg = _cfg().model
    x = torch.randint(0, cfg.vocab_size, (3, 32))
    y = torch.randint(0, cfg.vocab_size, (3, 32))
    y[0, :5] = -100
    model = Transformer(cfg)
    model.set_loss_head("logits")
    loss, plain = model.loss(x, y)
    ones_loss, ones_plain = model.loss(x, y, torch.ones(3, 32))
    assert torch.equal(loss, ones_loss) and torch.equal(plain, ones_plain)


def _newton_schulz_fp32(g: torch.Tensor, coefficients, steps: int) -> torch.Tensor:
    a, b, c = coefficients
    x = g.float().mT if g.size(-2) > g.size(-1) else g.float()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


def test_compiled_newton_schulz_is_as_accurate_as_eager():
    """The compiled iteration rounds differently in bf16 (it fuses the elementwise steps in
    float32), so it is compared with the float32 iteration: no further from it than eager."""
    cfg = _cfg(optimizer="muon")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (4, 32))
    _, loss = model(x, x)
    loss.backward()
    grads = [torch.randn(4, 192, 64), torch.stack([b.mlp.up.weight.grad for b in model.blocks])]
    opt = build_optimizer(model, cfg.phases[0], CPU, compile_=True)
    coefficients = opt.muon.param_groups[0]["ns_coefficients"]
    assert opt.muon._ns is not newton_schulz
    for g in grads:
        ref = _newton_schulz_fp32(g, coefficients, 5)
        eager = newton_schulz(g, coefficients, 5, 1e-7).float()
        compiled = opt.muon._ns(g, coefficients, 5, 1e-7).float()
        err_eager = ((eager - ref).norm() / ref.norm()).item()
        err_compiled = ((compiled - ref).norm() / ref.norm()).item()
        assert err_compiled <= 1.25 * err_eager + 1e-3, (err_compiled, err_eager)
    opt.step()  # the compiled iteration inside a real step
    assert all(torch.isfinite(p).all() for p in model.parameters())
