"""The playbook's mechanisms, each on real components: context curriculum, layer freezing (with
and without torch.compile), rare-token weighting, plateau stop, divergence rollback, LoRA,
text-kind filters, instruction data, source fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deeplm.config import SourceConfig, config_from_dict
from deeplm.data.instructions import format_pair, iter_instructions
from deeplm.data.kinds import excluded_kind, text_kinds
from deeplm.data.sources import SourceStats
from deeplm.model import build_model
from deeplm.model.lora import apply_lora, has_lora, merge_lora
from deeplm.pipeline.stages import source_documents
from deeplm.run import checkpoint as ckpt
from deeplm.train.trainer import PhaseTrainer, TrainHooks, TrainingDiverged
from deeplm.train.weighting import token_weights
from tests.helpers import micro_config


def _cfg(**phase):
    d = micro_config(**phase)
    d["model"]["resid_dropout"] = 0.0
    d["model"]["embd_dropout"] = 0.0
    return config_from_dict(d)


def _run(corpus, run_dir, cfg, trainer_cls=PhaseTrainer, stop_after=None, events=None):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return stop_after is not None and calls["n"] > stop_after

    hooks = TrainHooks(
        should_stop=should_stop,
        log=lambda s: None,
        on_event=lambda kind, msg, data: (events if events is not None else []).append(kind),
    )
    trainer = trainer_cls(
        cfg, 0, run_dir, corpus["tokenizer"], corpus["train"], corpus["val"], hooks=hooks
    )
    return trainer.run(), trainer


def _records(run_dir, phase="p1"):
    return [json.loads(line) for line in (run_dir / "metrics" / f"{phase}.jsonl").open()]


CURRICULUM = [{"at": 0.0, "seq_len": 16}, {"at": 0.3, "seq_len": 32}, {"at": 0.7, "seq_len": 64}]


def test_context_curriculum_keeps_tokens_per_step(corpus, tmp_path):
    cfg = _cfg(tokens=10 * 4 * 64, curriculum=CURRICULUM, eval_every=0)
    out, _ = _run(corpus, tmp_path, cfg)
    train = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["seq_len"] for r in train] == [16, 16, 16, 32, 32, 32, 32, 64, 64, 64]
    assert all(r["seq_len"] * r["micro_batch"] == 4 * 64 for r in train)
    assert [r["tokens"] for r in train] == [256 * (i + 1) for i in range(10)]
    assert out.status == "done"


FREEZE = [{"at": 0.25, "layers": 1}, {"at": 0.5, "layers": 2}]


@pytest.mark.parametrize("compile_", [False, True])
def test_frozen_layers_stay_bit_identical(corpus, tmp_path, compile_):
    d = micro_config(tokens=8 * 4 * 64, freeze=FREEZE, eval_every=0, save_every=0)
    d["train"]["compile"] = compile_
    d["model"]["resid_dropout"] = 0.0
    d["model"]["embd_dropout"] = 0.0
    cfg = config_from_dict(d)
    events: list[str] = []
    out, _ = _run(corpus, tmp_path, cfg, events=events)
    phase_dir = tmp_path / "checkpoints" / "1-p1"
    kept = {c.step: c for c in ckpt.list_checkpoints(phase_dir)}
    # checkpoints written just before each freeze (steps 2 and 4 of 8) are kept
    assert {2, 4, 8} <= set(kept) and ckpt.is_kept(kept[2]) and ckpt.is_kept(kept[4])
    assert events.count("freeze") == 2
    before1, before2 = load_file(kept[2].path / ckpt.WEIGHTS), load_file(
        kept[4].path / ckpt.WEIGHTS
    )
    final = load_file(kept[8].path / ckpt.WEIGHTS)
    for key in final:
        if key.startswith("blocks.0."):  # frozen from step 2 on
            assert torch.equal(final[key], before1[key]), key
        elif key.startswith("blocks.1."):  # frozen from step 4 on
            assert torch.equal(final[key], before2[key]), key
            assert not torch.equal(before2[key], before1[key]) or "ln" in key
        else:  # not frozen: keeps learning
            assert not torch.equal(final[key], before2[key]), key
    train = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["frozen_layers"] for r in train] == [0, 0, 1, 1, 2, 2, 2, 2]


def test_frozen_blocks_have_no_grad_and_no_graph():
    cfg = _cfg()
    model = build_model(cfg, 0)
    model.set_frozen_layers(1)
    x = torch.randint(0, 512, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is None for p in model.blocks[0].parameters())
    assert all(p.grad is not None for p in model.blocks[1].parameters())
    model.set_frozen_layers(0)
    assert all(p.requires_grad for p in model.parameters())


def test_resume_across_curriculum_and_freeze_is_exact(corpus, tmp_path):
    kw = dict(tokens=10 * 4 * 64, curriculum=CURRICULUM, freeze=FREEZE, eval_every=0)
    full, _ = _run(corpus, tmp_path / "full", _cfg(**kw))
    part, _ = _run(corpus, tmp_path / "split", _cfg(**kw), stop_after=6)
    assert part.status == "stopped" and part.step == 6
    resumed, _ = _run(corpus, tmp_path / "split", _cfg(**kw))
    a = load_file(f"{full.final_checkpoint}/{ckpt.WEIGHTS}")
    b = load_file(f"{resumed.final_checkpoint}/{ckpt.WEIGHTS}")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rare_token_weights(corpus):
    tokens = np.array([5] * 900 + [6] * 90 + [7] * 10, dtype=np.uint16)
    w = token_weights(tokens, 10, alpha=0.5, max_weight=4.0)
    freq = np.bincount(tokens, minlength=10) / len(tokens)
    assert (freq * w).sum() == pytest.approx(1.0, abs=1e-5)
    assert w[7] > w[6] > 1.0 > w[5]
    assert w.max() <= 4.0 * 1.001 and w.min() >= 0.25 * 0.999  # clipped (then renormalised)
    real = token_weights(corpus["train"].tokens, 512, alpha=0.3)
    tok = corpus["tokenizer"]
    comma, the = tok.encode(",")[0], tok.encode(" the")[0]
    assert real[comma] < 1.0 and real[the] < 1.0  # punctuation and stop words weigh less


def test_weighted_loss_reported_next_to_unweighted(corpus, tmp_path):
    out, _ = _run(corpus, tmp_path, _cfg(rare_token_alpha=0.5))
    train = [r for r in _records(tmp_path) if "loss" in r]
    assert all("loss_unweighted" in r for r in train)
    assert any(abs(r["loss"] - r["loss_unweighted"]) > 1e-3 for r in train)
    samples = [r for r in _records(tmp_path) if "distinct_1" in r]
    assert samples and all("rare_token_rate" in r for r in samples)


def test_plateau_stops_phase_early(corpus, tmp_path):
    events: list[str] = []
    cfg = _cfg(tokens=12 * 4 * 64, eval_every=2, plateau_patience=2, plateau_min_delta=50.0)
    out, _ = _run(corpus, tmp_path, cfg, events=events)
    assert out.status == "done" and out.step == 4 and "plateau" in out.stop_reason
    meta = ckpt.read_meta(Path(out.final_checkpoint))
    assert meta["final"] and "plateau" in meta["stop_reason"]
    assert "plateau" in events


class NaNOnce(PhaseTrainer):
    """Injects a NaN loss at given optimizer steps (fault injection, real trainer otherwise)."""

    nan_steps: frozenset[int] = frozenset({5})

    def _forward_loss(self, model, x, y):
        loss, unweighted = super()._forward_loss(model, x, y)
        if self.current_step in self.nan_steps:
            self.nan_steps = self.nan_steps - {self.current_step}
            loss = loss * float("nan")
        return loss, unweighted


def test_nan_loss_rolls_back_and_lowers_lr(corpus, tmp_path):
    events: list[str] = []
    cfg = _cfg(tokens=8 * 4 * 64, save_every=2, eval_every=0)
    out, trainer = _run(corpus, tmp_path, cfg, trainer_cls=NaNOnce, events=events)
    assert out.status == "done" and out.rollbacks == 1
    assert events.count("rollback") == 1
    assert trainer.guard.lr_scale == 0.5 and trainer.guard.warmup_scale == 2.0
    train = [r for r in _records(tmp_path) if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in train)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)) and steps[-1] == 8


class AlwaysNaN(NaNOnce):
    def _forward_loss(self, model, x, y):
        loss, unweighted = PhaseTrainer._forward_loss(self, model, x, y)
        return loss * float("nan"), unweighted


def test_repeated_divergence_stops_with_clear_message(corpus, tmp_path):
    cfg = _cfg(tokens=6 * 4 * 64, max_rollbacks=2, eval_every=0)
    with pytest.raises(TrainingDiverged, match=r"2 rollbacks did not help; lower phases\[0\]\.lr"):
        _run(corpus, tmp_path, cfg, trainer_cls=AlwaysNaN)


def test_lora_adapters_train_and_merge(corpus, tmp_path):
    cfg = _cfg()
    model = build_model(cfg, 0).eval()
    x = torch.randint(0, 512, (2, 16))
    ref, _ = model(x)
    n = apply_lora(model, 4, 8.0, ["attn.qkv", "mlp.down"])
    assert n == 4 and has_lora(model)
    same, _ = model(x)
    assert torch.allclose(ref, same)  # B starts at zero: identical function
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_b"):
                m.lora_b.normal_(0, 0.05)
    adapted, _ = model(x)
    assert merge_lora(model) == 4 and not has_lora(model)
    merged, _ = model(x)
    assert torch.allclose(adapted, merged, atol=1e-5)
    # a whole phase with LoRA: the final checkpoint holds merged, plain weights
    out, _ = _run(corpus, tmp_path, _cfg(lora_rank=4, lora_alpha=8.0))
    weights = load_file(f"{out.final_checkpoint}/{ckpt.WEIGHTS}")
    assert not any("lora" in k for k in weights)
    plain = build_model(cfg, 0)
    ckpt.load_weights(Path(out.final_checkpoint), plain)


@pytest.mark.parametrize(
    "text,kind",
    [
        ("def f(x):\n    return x + 1\n\nclass A:\n    pass\nimport os;\n", "code"),
        ("- apples\n- pears\n- plums\n- figs\n- dates\n", "lists"),
        ("Q: What is it?\nA: A thing.\nQ: Why?\nA: Because.\n", "lists"),
        ("Let $x^2 + y^2 = z^2$ and \\frac{a}{b} = c, so a = b c = z^2 - y^2 = x^2.", "math"),
        ("[12:01] <bob> hi\n[12:02] <amy> hey\n[12:03] <bob> what's up\n", "chat"),
        ("Posted by dave\nRe: the thing\nReply\nQuote\n@amy agreed\n12 points\n", "forum"),
    ],
)
def test_text_kinds_detected(text, kind):
    assert kind in text_kinds(text)
    assert excluded_kind(text, [kind]) == kind


def test_prose_is_not_excluded():
    prose = (
        '"Is it you, Watson?" said he. "I had not expected you."\n\n'
        "The room was small, and the fire burned low; outside, the rain fell on Baker Street.\n\n"
        "1. The first point of the essay is that the evidence was thin.\n"
        "He wrote: the sum was 4 + 5 = 9, no more."
    )
    assert text_kinds(prose) == set()
    assert excluded_kind(prose, ["code", "lists", "math", "chat", "forum"]) is None


def test_instruction_pairs_become_chat_documents(tmp_path, corpus):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi <|end|>there", "response": "Hello."})
        + "\n"
        + "not json\n"
        + json.dumps({"prompt": 3, "response": "x"})
        + "\n"
    )
    src = SourceConfig(kind="files", path=str(path), format="instruction")
    stats = SourceStats()
    docs = list(iter_instructions(src, tmp_path, stats))
    assert [d.text for d in docs] == [format_pair("Hi there", "Hello.")]
    assert docs[0].text == "<|user|>Hi there<|end|><|assistant|>Hello.<|end|>"
    assert stats.skipped == {"bad instruction line": 2}
    tok = corpus["tokenizer"]
    ids = tok.encode(docs[0].text, allow_special=True)
    assert tok.token_to_id("<|user|>") in ids and tok.token_to_id("<|assistant|>") in ids


def test_unreachable_source_falls_back_with_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fallback = tmp_path / "local.txt"
    fallback.write_text("Plain local prose for the fallback source. " * 20)
    src = SourceConfig(
        kind="hf",
        name="someone/not-cached-anywhere",
        fallback=[SourceConfig(kind="files", path=str(fallback))],
    )
    logs: list[str] = []
    used: list[str] = []
    docs = list(source_documents(src, tmp_path, SourceStats(), logs.append, used))
    assert len(docs) == 1 and docs[0].text.startswith("Plain local prose")
    assert used == [f"files:{fallback}"]
    assert any("fallback" in line and "not-cached-anywhere" in line for line in logs)
