"""Export to, and import from, a Hugging Face ``transformers`` folder.

Which ``transformers`` class, and why (checked against the ``transformers`` source, not guessed):

* ``activation = "gelu"`` -> ``GPTNeoXForCausalLM`` with ``use_parallel_residual=False``,
  ``attention_bias=False`` and ``rotary_pct`` (``partial_rotary_factor``) ``1.0``. GPT-NeoX has,
  like deeplm: LayerNorm *with* bias (``input_layernorm``, ``post_attention_layernorm``,
  ``final_layer_norm``), the sequential pre-norm block ``x = x + attn(ln1(x));
  x = x + mlp(ln2(x))`` when ``use_parallel_residual`` is false, rotate-half RoPE over the whole
  head (``inv_freq = 1/theta^(2i/hd)``, ``cat(freqs, freqs)``), attention scaled by
  ``head_dim**-0.5``, a non-gated MLP with exact (erf) GELU (``hidden_act="gelu"`` is
  ``nn.functional.gelu``), a bias-free LM head and optional tied embeddings. Its only extra
  parameters are the MLP biases (``dense_h_to_4h.bias``, ``dense_4h_to_h.bias``, always present),
  exported as zeros. Its fused ``query_key_value`` projection is laid out per head
  (``[q_h | k_h | v_h]`` for head ``h``), so deeplm's ``[q | k | v]`` rows are permuted.
  Llama would be wrong: RMSNorm without bias and a gated MLP.
* ``activation = "swiglu"`` -> ``StableLmForCausalLM`` with ``use_parallel_residual=False``,
  ``qk_layernorm=False``, ``use_qkv_bias=False``, ``partial_rotary_factor=1.0`` and
  ``hidden_act="silu"``: LayerNorm with bias, the same sequential pre-norm block, rotate-half
  RoPE, separate bias-free q/k/v/o projections (deeplm's head layout is theirs) and the gated MLP
  ``down(silu(gate(x)) * up(x))`` without biases (deeplm's ``up`` rows are ``[gate | up]``).

* ``activation = "relu2"`` -> ``GPTNeoXForCausalLM`` as for gelu, with ``hidden_act="relu2"``
  (``transformers``' ``ReLUSquaredActivation``: ``relu(x)**2``).
* ``qk_norm`` -> StableLM's ``qk_layernorm=True`` (a bias-free LayerNorm per head on q and k
  before RoPE; deeplm's ``[n_heads, head_dim]`` weight row ``h`` is ``norms.h.weight``). GPT-NeoX
  has no such norm, so ``qk_norm`` exports only with ``activation = "swiglu"``.

All are exact (logits equal within fp32 rounding: tested). Anything else is refused.

An export folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
tokenizer (``tokenizer.json`` byte-identical to the run's, ``tokenizer_config.json`` with the chat
template, ``special_tokens_map.json``), loadable offline with ``AutoModelForCausalLM`` /
``AutoTokenizer``. ``transformers`` is not needed to export or import. Note: like deeplm, the
exported tokenizer adds no ``<bos>`` by itself; prepend ``tokenizer.bos_token_id`` to prompts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from deeplm.atomic import FILE_MODE, atomic_write_text
from deeplm.chat import JINJA_TEMPLATE
from deeplm.config import ModelConfig
from deeplm.model.transformer import Transformer, mlp_hidden_dim
from deeplm.tokenizer import Tokenizer

ARCHITECTURES = {
    "gelu": "GPTNeoXForCausalLM",
    "relu2": "GPTNeoXForCausalLM",
    "swiglu": "StableLmForCausalLM",
}
MODEL_TYPES = {"gelu": "gpt_neox", "relu2": "gpt_neox", "swiglu": "stablelm"}
HF_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class ExportError(ValueError):
    """A model cannot be represented exactly by a ``transformers`` class, or a folder is not a
    deeplm-compatible export."""


# ---------------------------------------------------------------------------- config


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for ``cfg`` (keys for both transformers 4.x and 5.x)."""
    if cfg.activation not in ARCHITECTURES:
        raise ExportError(
            f"no transformers class matches activation {cfg.activation!r} exactly "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if cfg.qk_norm and cfg.activation != "swiglu":
        raise ExportError(
            f"qk_norm with activation {cfg.activation!r}: GPT-NeoX has no QK-norm; only "
            "activation = 'swiglu' (StableLM, qk_layernorm) exports a QK-norm model exactly"
        )
    theta = float(cfg.rope_theta)
    end_id = tokenizer.token_to_id("<|end|>")
    common: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.activation]],
        "model_type": MODEL_TYPES[cfg.activation],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": mlp_hidden_dim(cfg),
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "use_parallel_residual": False,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "rope_theta": theta,
        "partial_rotary_factor": 1.0,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": theta,
            "partial_rotary_factor": 1.0,
        },
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
        # Everything needed to rebuild the deeplm model exactly (import_hf reads it).
        "deeplm": {"model": _model_dict(cfg), "end_token_id": end_id},
    }
    if cfg.activation in ("gelu", "relu2"):
        common |= {
            "hidden_act": cfg.activation,
            "attention_bias": False,
            "rotary_pct": 1.0,
            "rotary_emb_base": theta,
            "classifier_dropout": 0.0,
        }
    else:
        common |= {
            "hidden_act": "silu",
            "num_key_value_heads": cfg.n_heads,
            "use_qkv_bias": False,
            "qk_layernorm": bool(cfg.qk_norm),
        }
    return common


def _model_dict(cfg: ModelConfig) -> dict[str, Any]:
    return asdict(cfg)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


# ---------------------------------------------------------------------------- weights


def _qkv_to_neox(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """deeplm rows ``[q | k | v]`` (head-major inside each) -> NeoX rows ``[q_h | k_h | v_h]``."""
    d_in = w.size(1)
    return w.view(3, n_heads, head_dim, d_in).transpose(0, 1).reshape(3 * n_heads * head_dim, d_in)


def _qkv_from_neox(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    d_in = w.size(1)
    return w.view(n_heads, 3, head_dim, d_in).transpose(0, 1).reshape(3 * n_heads * head_dim, d_in)


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The ``transformers`` state dict (names and layouts) of a deeplm model."""
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hidden = mlp_hidden_dim(cfg)
    out: dict[str, Tensor] = {}
    if cfg.activation in ("gelu", "relu2"):
        p = "gpt_neox."
        out[p + "embed_in.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layers):
            s, t = f"blocks.{i}.", f"{p}layers.{i}."
            for a, b in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                out[f"{t}{b}.weight"] = sd[f"{s}{a}.weight"]
                out[f"{t}{b}.bias"] = sd[f"{s}{a}.bias"]
            out[t + "attention.query_key_value.weight"] = _qkv_to_neox(
                sd[s + "attn.qkv.weight"], cfg.n_heads, cfg.head_dim
            )
            out[t + "attention.dense.weight"] = sd[s + "attn.proj.weight"]
            up, down = sd[s + "mlp.up.weight"], sd[s + "mlp.down.weight"]
            out[t + "mlp.dense_h_to_4h.weight"] = up
            out[t + "mlp.dense_h_to_4h.bias"] = up.new_zeros(up.size(0))
            out[t + "mlp.dense_4h_to_h.weight"] = down
            out[t + "mlp.dense_4h_to_h.bias"] = down.new_zeros(down.size(0))
        out[p + "final_layer_norm.weight"] = sd["norm_f.weight"]
        out[p + "final_layer_norm.bias"] = sd["norm_f.bias"]
        if not cfg.tie_embeddings:
            out["embed_out.weight"] = sd["lm_head.weight"]  # renamed lm_head by transformers 5
    elif cfg.activation == "swiglu":
        p = "model."
        out[p + "embed_tokens.weight"] = sd["tok_emb.weight"]
        d = cfg.d_model
        for i in range(cfg.n_layers):
            s, t = f"blocks.{i}.", f"{p}layers.{i}."
            for a, b in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                out[f"{t}{b}.weight"] = sd[f"{s}{a}.weight"]
                out[f"{t}{b}.bias"] = sd[f"{s}{a}.bias"]
            qkv = sd[s + "attn.qkv.weight"]
            out[t + "self_attn.q_proj.weight"] = qkv[:d]
            out[t + "self_attn.k_proj.weight"] = qkv[d : 2 * d]
            out[t + "self_attn.v_proj.weight"] = qkv[2 * d :]
            out[t + "self_attn.o_proj.weight"] = sd[s + "attn.proj.weight"]
            if cfg.qk_norm:
                for n in ("q", "k"):
                    for h, row in enumerate(sd[f"{s}attn.{n}_norm.weight"]):
                        out[f"{t}self_attn.{n}_layernorm.norms.{h}.weight"] = row
            up = sd[s + "mlp.up.weight"]
            out[t + "mlp.gate_proj.weight"] = up[:hidden]
            out[t + "mlp.up_proj.weight"] = up[hidden:]
            out[t + "mlp.down_proj.weight"] = sd[s + "mlp.down.weight"]
        out[p + "norm.weight"] = sd["norm_f.weight"]
        out[p + "norm.bias"] = sd["norm_f.bias"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        raise ExportError(f"no transformers class matches activation {cfg.activation!r} exactly")
    return {k: v.contiguous() for k, v in out.items()}


def _take(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ExportError(f"model.safetensors lacks {key!r}")
    return sd.pop(key)


def _take_zero_bias(sd: dict[str, Tensor], key: str) -> None:
    bias = sd.pop(key, None)
    if bias is not None and bool(bias.float().abs().max() > 0):
        raise ExportError(
            f"{key} is not zero: deeplm Linear layers have no bias, so this model cannot be "
            "imported exactly"
        )


def from_hf_state_dict(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`to_hf_state_dict`: a deeplm state dict (unknown keys are an error)."""
    sd = dict(hf)
    out: dict[str, Tensor] = {}
    hidden = mlp_hidden_dim(cfg)
    if cfg.activation in ("gelu", "relu2"):
        p = "gpt_neox."
        out["tok_emb.weight"] = _take(sd, p + "embed_in.weight")
        for i in range(cfg.n_layers):
            s, t = f"blocks.{i}.", f"{p}layers.{i}."
            for a, b in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                out[f"{s}{a}.weight"] = _take(sd, f"{t}{b}.weight")
                out[f"{s}{a}.bias"] = _take(sd, f"{t}{b}.bias")
            out[s + "attn.qkv.weight"] = _qkv_from_neox(
                _take(sd, t + "attention.query_key_value.weight"), cfg.n_heads, cfg.head_dim
            )
            _take_zero_bias(sd, t + "attention.query_key_value.bias")
            out[s + "attn.proj.weight"] = _take(sd, t + "attention.dense.weight")
            _take_zero_bias(sd, t + "attention.dense.bias")
            out[s + "mlp.up.weight"] = _take(sd, t + "mlp.dense_h_to_4h.weight")
            _take_zero_bias(sd, t + "mlp.dense_h_to_4h.bias")
            out[s + "mlp.down.weight"] = _take(sd, t + "mlp.dense_4h_to_h.weight")
            _take_zero_bias(sd, t + "mlp.dense_4h_to_h.bias")
        out["norm_f.weight"] = _take(sd, p + "final_layer_norm.weight")
        out["norm_f.bias"] = _take(sd, p + "final_layer_norm.bias")
        head_keys = ("embed_out.weight", "lm_head.weight")
    else:
        p = "model."
        out["tok_emb.weight"] = _take(sd, p + "embed_tokens.weight")
        for i in range(cfg.n_layers):
            s, t = f"blocks.{i}.", f"{p}layers.{i}."
            for a, b in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                out[f"{s}{a}.weight"] = _take(sd, f"{t}{b}.weight")
                out[f"{s}{a}.bias"] = _take(sd, f"{t}{b}.bias")
            out[s + "attn.qkv.weight"] = torch.cat(
                [_take(sd, f"{t}self_attn.{n}_proj.weight") for n in ("q", "k", "v")], dim=0
            )
            out[s + "attn.proj.weight"] = _take(sd, t + "self_attn.o_proj.weight")
            if cfg.qk_norm:
                for n in ("q", "k"):
                    rows = [
                        _take(sd, f"{t}self_attn.{n}_layernorm.norms.{h}.weight")
                        for h in range(cfg.n_heads)
                    ]
                    out[f"{s}attn.{n}_norm.weight"] = torch.stack(rows)
            gate = _take(sd, t + "mlp.gate_proj.weight")
            up = _take(sd, t + "mlp.up_proj.weight")
            if gate.size(0) != hidden:
                raise ExportError(f"intermediate size {gate.size(0)} != deeplm's {hidden}")
            out[s + "mlp.up.weight"] = torch.cat([gate, up], dim=0)
            out[s + "mlp.down.weight"] = _take(sd, t + "mlp.down_proj.weight")
        out["norm_f.weight"] = _take(sd, p + "norm.weight")
        out["norm_f.bias"] = _take(sd, p + "norm.bias")
        head_keys = ("lm_head.weight",)
    head = next((sd.pop(k) for k in head_keys if k in sd), None)
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, out["tok_emb.weight"]):
            raise ExportError("config says tie_word_embeddings but the LM head differs")
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        if head is None:
            raise ExportError("untied model without an LM head weight")
        out["lm_head.weight"] = head
    if sd:
        raise ExportError(f"unexpected weights in model.safetensors: {sorted(sd)[:5]}")
    return out


# ---------------------------------------------------------------------------- export / import


def export_hf(
    model: Transformer,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write an export folder (see the module docstring); returns its path.

    The folder is assembled under a temporary name and renamed into place, replacing an
    existing export there. ``source`` (e.g. run name, checkpoint) is stored in ``config.json``.
    """
    cfg = model.cfg
    config = hf_config(cfg, tokenizer, dtype)
    if source:
        config["deeplm"]["source"] = source
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.to(device="cpu", dtype=dtype) for k, v in to_hf_state_dict(model).items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", FILE_MODE)  # safetensors writes 0600; match the rest
    _write_json(tmp / "config.json", config)
    end_id = tokenizer.token_to_id("<|end|>")
    eos = [tokenizer.eos_id] + ([end_id] if end_id is not None else [])
    _write_json(
        tmp / "generation_config.json",
        {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tokenizer.pad_id,
        },
    )
    shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")  # byte-identical: same hash
    specials = tokenizer.special_tokens
    extra = [s for s in specials if s not in ("<pad>", "<bos>", "<eos>")]
    _write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "additional_special_tokens": extra,
            "extra_special_tokens": extra,
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": JINJA_TEMPLATE,
        },
    )
    _write_json(
        tmp / "special_tokens_map.json",
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "additional_special_tokens": extra,
        },
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` looks like an export folder (config.json + model.safetensors)."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def model_config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """The deeplm :class:`ModelConfig` of a ``config.json``; refuses anything not exact."""
    mtype = config.get("model_type")
    if mtype not in ("gpt_neox", "stablelm"):
        raise ExportError(f"model_type {mtype!r} is not importable (gpt_neox or stablelm)")
    rope = config.get("rope_parameters") or {}
    factor = rope.get(
        "partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct"))
    )
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base")))
    problems = []
    if config.get("use_parallel_residual", mtype == "gpt_neox"):
        problems.append("use_parallel_residual must be false")
    if factor is None or float(factor) != 1.0:
        problems.append(f"RoPE must cover the whole head (partial_rotary_factor {factor})")
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        problems.append("RoPE scaling is not supported")
    if theta is None:
        problems.append("no rope_theta")
    act = config.get("hidden_act")
    want_act = ("gelu", "relu2") if mtype == "gpt_neox" else ("silu",)
    if act not in want_act:
        problems.append(f"hidden_act must be {' or '.join(map(repr, want_act))}, not {act!r}")
    if mtype == "stablelm":
        if config.get("use_qkv_bias"):
            problems.append("use_qkv_bias is not supported")
        kv = config.get("num_key_value_heads", config.get("num_attention_heads"))
        if kv != config.get("num_attention_heads"):
            problems.append("grouped-query attention is not supported")
    if problems:
        raise ExportError("cannot import exactly: " + "; ".join(problems))
    base = dict((config.get("deeplm") or {}).get("model") or {})
    known = set(ModelConfig.__dataclass_fields__)
    base = {k: v for k, v in base.items() if k in known}
    base.update(
        n_layers=int(config["num_hidden_layers"]),
        d_model=int(config["hidden_size"]),
        n_heads=int(config["num_attention_heads"]),
        vocab_size=int(config["vocab_size"]),
        max_seq_len=int(config["max_position_embeddings"]),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        rope_theta=float(theta),  # type: ignore[arg-type]
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        activation=act if mtype == "gpt_neox" else "swiglu",
        qk_norm=bool(config.get("qk_layernorm", False)) if mtype == "stablelm" else False,
        grad_checkpointing=False,
    )
    cfg = ModelConfig(**base)
    cfg.validate()
    inter = int(config["intermediate_size"])
    if inter != mlp_hidden_dim(cfg):
        # deeplm derives the MLP width from mlp_ratio; find the ratio that reproduces it.
        ratio = inter / cfg.d_model if cfg.activation != "swiglu" else inter * 1.5 / cfg.d_model
        cfg.mlp_ratio = ratio
        if mlp_hidden_dim(cfg) != inter:
            raise ExportError(
                f"intermediate_size {inter} cannot be expressed as a deeplm mlp_ratio"
            )
    return cfg


def import_hf(
    folder: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[Transformer, Tokenizer]:
    """Load an export folder back into a deeplm :class:`Transformer` (eval mode, fp32) and its
    :class:`Tokenizer`. Weights round-trip exactly (an fp32 export gives identical tensors)."""
    p = Path(folder)
    if not is_hf_folder(p):
        raise FileNotFoundError(
            f"{p}: not an export folder (needs config.json and model.safetensors)"
        )
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{p / 'config.json'}: invalid JSON ({exc})") from None
    cfg = model_config_from_hf(config)
    tokenizer = Tokenizer.load(p / "tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ExportError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    with torch.device("meta"):
        model = Transformer(cfg)
    hf = load_file(str(p / "model.safetensors"))
    sd = {k: v.float() for k, v in from_hf_state_dict(hf, cfg).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.rope.reset_parameters(device="cpu")
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def verify_export(
    folder: str | os.PathLike[str], model: Transformer, n_tokens: int | None = None, seed: int = 0
) -> float:
    """Load ``folder`` with ``transformers`` (``AutoModelForCausalLM``, fp32, CPU) and return the
    max absolute difference between its logits and ``model``'s on random tokens (one batch of 2
    rows of ``n_tokens``, default the full context). Needs ``transformers``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (2, n_tokens or cfg.max_seq_len), generator=g)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ours = model(idx.to(dev))[0].float().cpu()
    finally:
        model.train(was_training)
    theirs = hf(idx).logits.float()
    return float((ours - theirs).abs().max())
