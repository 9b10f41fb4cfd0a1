"""PhaseConfig in documented sections, with every key still a flat key of the phase: TOML,
``--set phases.0.<key>``, ``config.json`` and the checks work as before the sections existed."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import deeplm.config as config_mod
from deeplm.config import (
    PHASE_SECTIONS,
    ConfigError,
    PhaseConfig,
    config_from_json,
    config_to_json,
    load_config,
)

# Every phase key a config file, an override or a run's config.json may hold (as before the
# sections): none may disappear or be renamed.
PHASE_KEYS = {
    "name", "kind", "sources", "exclude_kinds", "tokens", "max_epochs", "val_fraction", "seq_len",
    "micro_batch", "grad_accum", "optimizer", "lr", "min_lr_ratio", "warmup_frac", "schedule",
    "decay_frac", "adamw_lr", "muon_momentum", "muon_ns_steps", "muon_adjust_lr",
    "weight_decay", "beta1", "beta2", "grad_clip", "eval_every", "eval_batches", "save_every",
    "keep_last", "sample_every", "sample_tokens", "long_sample_tokens", "prompts", "curriculum",
    "freeze", "rare_token_alpha", "rare_token_max_weight", "plateau_patience",
    "plateau_min_delta", "lora_rank", "lora_alpha", "lora_targets", "max_rollbacks",
    "spike_factor", "replay",
}  # fmt: skip


def _field_docs() -> dict[str, dict[str, str]]:
    """``{section class: {field: docstring}}`` read from config.py's source (litgpt style: a
    string right below each field)."""
    tree = ast.parse(Path(config_mod.__file__).read_text(encoding="utf-8"))
    names = {s.__name__ for s in PHASE_SECTIONS}
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            docs: dict[str, str] = {}
            body = node.body
            for stmt, after in zip(body, body[1:] + [None]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    docs[stmt.target.id] = after.value.value if is_doc else ""
            out[node.name] = docs
    return out


def test_every_phase_key_is_kept_in_exactly_one_documented_section():
    assert {f.name for f in dataclasses.fields(PhaseConfig)} == PHASE_KEYS
    docs = _field_docs()
    owners: dict[str, list[str]] = {}
    for section, fields in docs.items():
        for name, doc in fields.items():
            owners.setdefault(name, []).append(section)
            assert doc.strip(), f"{section}.{name} has no docstring"
    assert set(owners) == PHASE_KEYS
    assert all(len(v) == 1 for v in owners.values()), owners
    for section in PHASE_SECTIONS:
        assert section.__doc__ and issubclass(PhaseConfig, section)


def test_flat_keys_still_load_override_and_round_trip(tmp_path):
    cfg = load_config("tiny", overrides=["phases.0.lr=0.002", "phases.0.plateau_patience=3"])
    assert cfg.phases[0].lr == 0.002 and cfg.phases[0].plateau_patience == 3
    text = config_to_json(cfg)
    assert "sections" not in text and '"warmup_frac"' in text  # flat in config.json
    assert config_to_json(config_from_json(text)) == text
    assert json.loads(text)["phases"][0].keys() == PHASE_KEYS


def test_unknown_phase_keys_and_bad_values_name_the_flat_key():
    with pytest.raises(ConfigError, match=r"did you mean 'phases\[0\]\.warmup_frac'"):
        load_config("tiny", overrides=["phases.0.warmup_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"phases\[0\]\.spike_factor must be >= 0"):
        load_config("tiny", overrides=["phases.0.spike_factor=-1"])
    with pytest.raises(ConfigError, match=r"phases\.0\.plateau_min_delta must be >= 0"):
        load_config("tiny", overrides=["phases.0.plateau_min_delta=-1"])  # the generic check
    with pytest.raises(ConfigError, match=r"phases\[0\]\.muon_ns_steps must be in 1\.\.99"):
        load_config("tiny", overrides=["phases.0.muon_ns_steps=100"])
