"""Recipe options: batched Muon (= torch.optim.Muon), Muon + AdamW as one optimizer, the WSD
schedule, squared ReLU, QK-norm and zero-initialised residual projections, and their checks."""

from __future__ import annotations

import pytest
import torch

from deeplm.config import ConfigError, ModelConfig, config_from_dict, load_config
from deeplm.model import Transformer, count_parameters
from deeplm.train.optim import BatchedMuon, MuonAdamW, build_optimizer, newton_schulz, set_lr
from deeplm.train.schedule import lr_at
from tests.helpers import micro_config


def _params(shapes: list[tuple[int, int]], seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_matches_torch_muon(adjust, nesterov):
    shapes = [(96, 32), (96, 32), (96, 32), (32, 64), (32, 64), (40, 40)]
    ours, theirs = _params(shapes, 0), _params(shapes, 0)
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust, nesterov=nesterov, momentum=0.9)
    a, b = BatchedMuon(ours, **kw), torch.optim.Muon(theirs, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):  # the same bf16 iteration, batched: bf16 rounding apart
        assert ((p - q).norm() / q.norm()).item() < 2e-3
    # torch's state layout: a checkpoint of either loads into the other
    a.load_state_dict(b.state_dict())
    assert torch.equal(a.state[ours[0]]["momentum_buffer"], b.state[theirs[0]]["momentum_buffer"])


def test_newton_schulz_orthogonalises_a_batch():
    g = torch.randn(5, 64, 16, generator=torch.Generator().manual_seed(2))
    x = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert x.shape == g.shape
    sv = torch.linalg.svdvals(x)  # the quintic lands singular values near 1 (0.5..1.5)
    assert sv.min() > 0.4 and sv.max() < 1.6


def _model(**model) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16, **model)
    return Transformer(cfg)


def test_muon_trains_block_matrices_and_adamw_the_rest():
    model = _model()
    phase = config_from_dict(micro_config(optimizer="muon", lr=2e-3, adamw_lr=5e-4)).phases[0]
    opt = build_optimizer(model, phase, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
    }
    set_lr(opt, 1e-3)  # the scheduled LR, scaled per group: AdamW at adamw_lr / lr of it
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 2.5e-4, 2.5e-4])
    x = torch.randint(0, 64, (2, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"}
    again = build_optimizer(model, phase, torch.device("cpu"))
    again.load_state_dict(state)
    with pytest.raises(ValueError, match="optimizer changed"):  # an AdamW checkpoint
        again.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_wsd_schedule_holds_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1, "wsd", 0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, 100, 1.0, 0.1, 0.1, "linear")


def test_relu2_has_gelu_parameter_count_and_computes_squared_relu():
    gelu, relu2 = ModelConfig(activation="gelu"), ModelConfig(activation="relu2")
    assert count_parameters(gelu) == count_parameters(relu2)
    model = _model(activation="relu2")
    x = torch.randn(3, 32)
    mlp = model.blocks[0].mlp
    want = mlp.down(torch.relu(mlp.up(x)) ** 2)
    assert torch.allclose(mlp(x), want)


def test_qk_norm_normalises_each_head_and_decodes_with_the_cache():
    model = _model(qk_norm=True).eval()
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == (2, 16)
    with torch.no_grad():
        attn.q_norm.weight.normal_(1.0, 0.3)
    q = torch.randn(4, 2, 16) * 7 + 3
    y = attn.q_norm(q)
    assert torch.allclose(
        y / attn.q_norm.weight, torch.nn.functional.layer_norm(q, (16,)), atol=1e-5
    )
    idx = torch.randint(0, 64, (1, 12))
    with torch.no_grad():  # incremental decoding (KV cache) equals the full forward
        full = model(idx)[0]
        cache = model.new_kv_cache()
        step = torch.cat(
            [model.forward_with_cache(idx[:, :8], cache, 0)]
            + [model.forward_with_cache(idx[:, i : i + 1], cache, i) for i in range(8, 12)],
            dim=1,
        )
    assert torch.allclose(full, step, atol=1e-4)


def test_zero_init_residual_starts_every_block_as_the_identity():
    model = _model(zero_init_residual=True)
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.down.weight.any()
    x = torch.randn(2, 5, 32)
    cos, sin = model.rope(x, 5)
    assert torch.equal(model.blocks[0](x, cos, sin), x)


def test_recipe_keys_are_checked_at_load():
    for key, value, match in [
        ("optimizer", "sgd", "optimizer"),
        ("schedule", "linear", "schedule"),
        ("decay_frac", 0.0, "decay_frac"),
        ("muon_momentum", 1.0, "muon_momentum"),
        ("muon_ns_steps", 0, "muon_ns_steps"),
        ("muon_adjust_lr", "spectral", "muon_adjust_lr"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(micro_config(**{key: value}))
    with pytest.raises(ConfigError, match="activation"):
        d = micro_config()
        d["model"]["activation"] = "relu"
        config_from_dict(d)
    with pytest.raises(ConfigError, match="fsdp2"):  # Muon needs whole matrices
        load_config(preset="60m", overrides=["train.parallel=fsdp2"])


def test_presets_use_the_measured_recipe():
    for preset in ("60m", "wide"):
        cfg = load_config(preset=preset)
        for phase in cfg.phases[:2]:  # grammar and vocabulary
            assert phase.optimizer == "muon" and not phase.curriculum and not phase.freeze
            assert phase.tokens_per_step == 32_768
        assert cfg.phases[1].lr == cfg.phases[0].lr / 2
