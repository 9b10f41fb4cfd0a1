"""Hugging Face export: transformers reproduces deeplm's logits; import gives the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from deeplm.chat import encode_chat
from deeplm.config import ModelConfig
from deeplm.export import ExportError, export_hf, import_hf, load_model
from deeplm.model import Transformer
from tests.finished_run import micro_run, run_cli

transformers = pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_logits(folder, idx: torch.Tensor) -> tuple[torch.Tensor, object]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return hf(idx).logits, hf


def random_model(activation: str, tie: bool, vocab: int, qk_norm: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        qk_norm=qk_norm,
        n_layers=3,
        d_model=48,
        n_heads=3,
        vocab_size=vocab,
        max_seq_len=40,
        activation=activation,
        tie_embeddings=tie,
        init_std=0.2,
        rope_theta=500.0,
        norm_eps=1e-6,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            elif type(m).__name__ == "HeadNorm":
                m.weight.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize(
    "activation,tie,arch,qk_norm",
    [
        ("gelu", True, "GPTNeoXForCausalLM", False),
        ("gelu", False, "GPTNeoXForCausalLM", False),
        ("relu2", True, "GPTNeoXForCausalLM", False),
        ("swiglu", True, "StableLmForCausalLM", False),
        ("swiglu", False, "StableLmForCausalLM", False),
        ("swiglu", True, "StableLmForCausalLM", True),
    ],
)
def test_random_model_logits_match(corpus, tmp_path, activation, tie, arch, qk_norm) -> None:
    tok = corpus["tokenizer"]
    model = random_model(activation, tie, tok.vocab_size, qk_norm)
    out = export_hf(model, tok, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]
    idx = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    theirs, hf = hf_logits(out, idx)
    assert type(hf).__name__ == arch
    with torch.no_grad():
        ours = model(idx)[0]
    assert (ours - theirs).abs().max().item() < TOL
    # import back: identical weights, ties and tokenizer
    back, tok2 = import_hf(out)
    assert back.cfg == model.cfg
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (back.lm_head.weight is back.tok_emb.weight) == tie
    assert tok2.hash == tok.hash


def test_trained_model_export_tokenizer_and_cli(tmp_path_factory, tmp_path) -> None:
    run_dir = micro_run(tmp_path_factory)
    out = tmp_path / "hf"
    r = run_cli(
        "export", "--format", "hf", "--run-dir", str(run_dir), "--out", str(out), "--verify"
    )
    assert r.returncode == 0, r.stderr
    assert "GPTNeoXForCausalLM" in r.stdout and "max |logit difference|" in r.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    lm = load_model(run_dir=run_dir, device="cpu")
    idx = torch.randint(0, lm.cfg.vocab_size, (3, 64), generator=torch.Generator().manual_seed(2))
    theirs, hf = hf_logits(out, idx)
    with torch.no_grad():
        ours = lm.model(idx)[0]
    assert (ours - theirs).abs().max().item() < TOL
    # the tokenizer loads offline and gives deeplm's ids; the chat template is the same
    hft = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "The  President said, naïvely — “yes”.\n"
    assert hft.encode(text, add_special_tokens=False) == lm.tokenizer.encode(text)
    assert hft.decode(lm.tokenizer.encode(text)) == text
    assert (hft.bos_token_id, hft.eos_token_id, hft.pad_token_id) == (1, 2, 0)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    ids = hft.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == encode_chat(lm.tokenizer, msgs, add_generation_prompt=True).ids
    # transformers' greedy generation continues like deeplm's
    prompt = [lm.tokenizer.bos_id] + lm.tokenizer.encode("The")
    with torch.no_grad():
        g = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    from deeplm.model import generate

    assert (
        g[0].tolist() == generate(lm.model, torch.tensor([prompt]), 8, temperature=0.0)[0].tolist()
    )
    # deeplm generate loads the export folder (import) and gives the run's greedy text
    a = run_cli(
        "generate",
        "--model",
        str(out),
        "--prompt",
        "The",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    )
    b = run_cli(
        "generate",
        "--run-dir",
        str(run_dir),
        "--prompt",
        "The",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    )
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout


def test_refusals(corpus, tmp_path) -> None:
    tok = corpus["tokenizer"]
    model = random_model("gelu", True, tok.vocab_size)
    model.cfg.activation = "relu"  # no transformers class computes this model exactly
    with pytest.raises(ExportError, match="no transformers class"):
        export_hf(model, tok, tmp_path / "x")
    model.cfg.activation = "gelu"
    qk = random_model("gelu", True, tok.vocab_size, qk_norm=True)
    with pytest.raises(ExportError, match="QK-norm"):  # GPT-NeoX has none
        export_hf(qk, tok, tmp_path / "qk")
    out = export_hf(model, tok, tmp_path / "ok")
    config = json.loads((out / "config.json").read_text())
    for key, value, match in [
        ("use_parallel_residual", True, "parallel"),
        ("rotary_pct", 0.25, "whole head"),
        ("hidden_act", "relu", "hidden_act"),
        ("hidden_act", "silu", "hidden_act"),
        ("model_type", "llama", "model_type"),
    ]:
        bad = dict(config) | {key: value}
        if key == "rotary_pct":
            bad["rope_parameters"] = dict(bad["rope_parameters"], partial_rotary_factor=0.25)
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ExportError, match=match):
            import_hf(out)
    # a real bias where deeplm has none cannot be imported exactly
    from safetensors.torch import load_file, save_file

    (out / "config.json").write_text(json.dumps(config))
    w = load_file(str(out / "model.safetensors"))
    w["gpt_neox.layers.0.mlp.dense_h_to_4h.bias"] += 0.5
    save_file(w, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="bias"):
        import_hf(out)
