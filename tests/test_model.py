"""Tests of the Transformer, RoPE, loss, initialisation and parameter/FLOP accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplm.config import ModelConfig
from deeplm.model import (
    RotaryEmbedding,
    Transformer,
    apply_rotary,
    count_parameters,
    describe,
    flops_per_token,
    mlp_hidden_dim,
)


def small_cfg(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops: one thread avoids OpenMP spin-wait slowdowns on busy shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_60m() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig())  # the default config is the 60m seed model


# ---------------------------------------------------------------------- causality


def test_causality_every_position() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg(init_std=0.2)).eval()
    idx = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref, _ = model(idx)
        for t in range(idx.size(1)):
            changed = idx.clone()
            changed[0, t] = (idx[0, t] + 1) % 64
            out, _ = model(changed)
            torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
            # the change is visible from position t on, so the check above is not vacuous
            assert not torch.allclose(out[:, t], ref[:, t], atol=1e-4)


# ---------------------------------------------------------------------- RoPE


def _reference_rotation(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE pair by pair: dims (i, i + d/2) rotate by pos * theta^(-2i/d)."""
    d = x.numel()
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(half):
        ang = pos * theta ** (-2 * i / d)
        a, b = float(x[i]), float(x[i + half])
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + half] = b * math.cos(ang) + a * math.sin(ang)
    return out


def test_rope_matches_rotate_half_reference() -> None:
    rope = RotaryEmbedding(16, 64, theta=10000.0)
    x = torch.randn(16)
    cos, sin = rope(x, 64)
    for pos in (0, 1, 7, 63):
        got = apply_rotary(x, cos[pos], sin[pos]).double()
        torch.testing.assert_close(got, _reference_rotation(x, pos, 10000.0), atol=1e-5, rtol=0)


def test_rope_score_depends_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, 128, theta=10000.0)
    q, k = torch.randn(32), torch.randn(32)
    cos, sin = rope(q, 128)

    def score(m: int, n: int) -> float:
        return float(apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n]))

    for m, n, s in [(0, 0, 5), (3, 1, 10), (10, 2, 50), (5, 40, 60), (0, 17, 100)]:
        assert score(m, n) == pytest.approx(score(m + s, n + s), abs=1e-4)
    # ... and it does depend on the relative position
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    # rotation preserves the norm
    rotated = apply_rotary(q, cos[37], sin[37])
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def test_rope_cache_dtype_device_and_offset() -> None:
    rope = RotaryEmbedding(8, 16)
    assert rope.cos_cached.dtype == torch.float32
    assert "cos_cached" not in rope.state_dict()  # persistent=False
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    cos, sin = rope(x, 5)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert cos.device == x.device and cos.shape == (5, 8)
    full_cos, full_sin = rope(torch.zeros(1), 16)
    off_cos, off_sin = rope(torch.zeros(1), 4, offset=9)
    torch.testing.assert_close(off_cos, full_cos[9:13], atol=0, rtol=0)
    torch.testing.assert_close(off_sin, full_sin[9:13], atol=0, rtol=0)
    with pytest.raises(ValueError):
        rope(x, 4, offset=13)
    # casting the module keeps full-precision tables (recomputed, not rounded)
    rope.to(torch.bfloat16)
    assert rope.cos_cached.dtype == torch.float32
    torch.testing.assert_close(rope.cos_cached, full_cos, atol=0, rtol=0)


def test_model_owns_single_rope_and_meta_materialisation() -> None:
    cfg = small_cfg()
    assert sum(isinstance(m, RotaryEmbedding) for m in Transformer(cfg).modules()) == 1
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    torch.testing.assert_close(model.rope.cos_cached, ref.cos_cached, atol=0, rtol=0)
    assert float(model.norm_f.weight.detach().min()) == 1.0


# ---------------------------------------------------------------------- init and parameter count


def test_init_std_60m(model_60m: Transformer) -> None:
    cfg = model_60m.cfg
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    n_resid = 0
    for name, m in model_60m.named_modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            w = m.weight.detach()
            expect = resid_std if getattr(m, "residual_proj", False) else cfg.init_std
            n_resid += bool(getattr(m, "residual_proj", False))
            assert float(w.std()) == pytest.approx(expect, rel=0.03), name
            assert abs(float(w.mean())) < 0.05 * expect, name
            assert getattr(m, "bias", None) is None, name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert n_resid == 2 * cfg.n_layers
    assert model_60m.lm_head.weight is model_60m.tok_emb.weight


def test_parameter_count_60m(model_60m: Transformer) -> None:
    d, v, layers, h = 320, 32000, 60, 640
    layer_norm = 2 * d
    per_block = 4 * d * d + 2 * d * h + 2 * layer_norm
    expected = v * d + layers * per_block + layer_norm
    assert expected == 59_469_440
    assert model_60m.num_parameters() == expected
    assert model_60m.num_parameters(exclude_embedding=True) == expected - v * d
    assert count_parameters(ModelConfig()) == expected
    assert abs(expected - 59.5e6) < 0.1e6
    assert describe(ModelConfig()) == (
        "60 layers x 320 (5 heads x 64), MLP 2.0x gelu, vocab 32000: 59,469,440 parameters"
    )
    assert count_parameters(ModelConfig(tie_embeddings=False)) == expected + v * d


def test_flops_per_token() -> None:
    cfg = ModelConfig()
    assert flops_per_token(cfg, 512) == 6 * 59_469_440 + 12 * 60 * 320 * 512


def test_flops_per_token_leaves_out_the_backward_of_frozen_layers() -> None:
    cfg = ModelConfig()
    per_block = sum(p.numel() for p in Transformer(ModelConfig(n_layers=1)).blocks[0].parameters())
    full = flops_per_token(cfg, 512)
    skipped = 40 * (4 * per_block + 8 * 320 * 512)
    assert flops_per_token(cfg, 512, frozen_layers=40) == full - skipped
    # every block frozen: the forward of everything (2N + 4LdT) and the head's backward remain
    assert flops_per_token(cfg, 512, frozen_layers=60) == pytest.approx(
        2 * 59_469_440 + 4 * 60 * 320 * 512 + 4 * (59_469_440 - 60 * per_block)
    )


# ---------------------------------------------------------------------- loss


def test_loss_at_init_is_log_vocab() -> None:
    torch.manual_seed(0)
    cfg = small_cfg(d_model=64, vocab_size=256, n_layers=3)
    model = Transformer(cfg)
    idx = torch.randint(0, 256, (4, 32))
    targets = torch.randint(0, 256, (4, 32))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 256) and logits.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(math.log(256), abs=0.1)


def test_loss_weights_and_ignore_index() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg(init_std=0.2))
    idx = torch.randint(0, 64, (2, 10))
    targets = torch.randint(0, 64, (2, 10))
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    ref = F.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    # all-ones weights == unweighted; a constant scale changes nothing
    _, loss_ones = model(idx, targets, torch.ones(2, 10))
    torch.testing.assert_close(loss_ones, ref)
    _, loss_scaled = model(idx, targets, torch.full((2, 10), 3.0))
    torch.testing.assert_close(loss_scaled, ref)
    # zero weight on row 1 == the loss of row 0 alone (weights of ignored positions don't count)
    w = torch.zeros(2, 10)
    w[0] = 1.0
    _, loss_row0 = model(idx, targets, w)
    ref0 = F.cross_entropy(logits[0], targets[0], ignore_index=-100)
    torch.testing.assert_close(loss_row0, ref0)
    assert not torch.allclose(loss_row0, ref)
    # nothing counts -> 0, not NaN
    _, loss_none = model(idx, targets, torch.zeros(2, 10))
    assert loss_none.item() == 0.0


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_head_matches_full_logits_loss_and_gradients(weighted: bool, bf16: bool) -> None:
    """The training head (chunked, gradients computed in the forward pass) gives the loss and
    gradients of the plain logits path: fp32 up to summation order; under bf16 autocast the
    same bf16 GEMMs, its weight gradient summed in fp32 across chunks (closer than the
    reference's own bf16 rounding)."""
    from deeplm.model import fused_loss

    torch.manual_seed(0)
    model = Transformer(small_cfg(init_std=0.2))
    idx = torch.randint(0, 64, (3, 20))
    targets = torch.randint(0, 64, (3, 20))
    targets[1, :5] = -100
    weights = torch.rand(3, 20) * 2 if weighted else None
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def run(chunked: bool, scale: float = 1.0):
        model.zero_grad(set_to_none=True)
        with ctx:
            if chunked:
                loss, first = model.loss(idx, targets, weights)
            else:
                first, loss = model(idx, targets, weights)
        (scale * loss).backward()
        return first, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, ref_loss, ref_grads = run(False, 2.0)
    old = fused_loss.CHUNK_ELEMENTS
    fused_loss.CHUNK_ELEMENTS = 7 * 64  # 7 rows per chunk: 60 rows in 9 chunks, one partial
    try:
        unweighted, loss, grads = run(True, 2.0)
    finally:
        fused_loss.CHUNK_ELEMENTS = old
    atol = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    plain = F.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(unweighted, plain.detach(), atol=1e-5, rtol=1e-5)
    assert not unweighted.requires_grad
    if weighted:
        assert abs(float(unweighted) - float(loss)) > 1e-3
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=atol, rtol=1e-2, msg=name)
    # evaluation: no gradients kept, same loss
    with torch.no_grad(), ctx:
        loss_eval, _ = model.loss(idx, targets, weights)
    torch.testing.assert_close(loss_eval, ref_loss, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- checkpointing, variants


def test_grad_checkpointing_same_gradients() -> None:
    cfg = small_cfg(n_layers=3, embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    idx = torch.randint(0, 64, (2, 16))
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(flag: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.set_grad_checkpointing(flag)
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(123)
        _, loss = model(idx, idx)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, g_plain = grads(False)
    assert len(calls) == 1
    loss_ckpt, g_ckpt = grads(True)
    assert len(calls) == 2  # the block really was recomputed in backward
    assert loss_plain == loss_ckpt
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5)
    # no checkpointing (and no recompute) outside training
    model.eval()
    calls.clear()
    model(idx, idx)[1].backward()
    assert len(calls) == 1


def test_swiglu_runs_and_matches_gelu_size() -> None:
    assert mlp_hidden_dim(ModelConfig(activation="swiglu")) == 424
    n_gelu = count_parameters(ModelConfig())
    n_swiglu = count_parameters(ModelConfig(activation="swiglu"))
    assert n_swiglu != n_gelu
    assert abs(n_swiglu - n_gelu) / n_gelu < 0.01
    torch.manual_seed(0)
    model = Transformer(small_cfg(activation="swiglu"))
    assert model.blocks[0].mlp.up.out_features == 2 * mlp_hidden_dim(model.cfg)
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.blocks[0].mlp.up.weight.grad.abs().sum() > 0


def test_untied_head_and_length_check() -> None:
    model = Transformer(small_cfg(tie_embeddings=False))
    assert model.lm_head.weight is not model.tok_emb.weight
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_forward_with_cache_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg(init_std=0.2)).eval()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache()
        parts = [
            model.forward_with_cache(idx[:, :5], cache, 0),  # prefill (causal)
            model.forward_with_cache(idx[:, 5:9], cache, 5),  # chunk after a prefix (mask)
            model.forward_with_cache(idx[:, 9:10], cache, 9),  # one token
            model.forward_with_cache(idx[:, 10:12], cache, 10),
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_training_loss_module_is_model_loss() -> None:
    """What DDP wraps in training: a module whose forward is ``Transformer.loss``."""
    from deeplm.model import TrainingLoss

    torch.manual_seed(0)
    model = Transformer(small_cfg())
    idx = torch.randint(0, 64, (2, 10))
    wrapped = TrainingLoss(model)
    assert list(wrapped.parameters()) == list(model.parameters())
    loss, unweighted = wrapped(idx, idx)
    ref, ref_unweighted = model.loss(idx, idx)
    assert torch.equal(loss, ref) and torch.equal(unweighted, ref_unweighted)
    _, full = model(idx, idx)  # forward keeps (logits, loss)
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=1e-5)
