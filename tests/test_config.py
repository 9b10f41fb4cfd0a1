"""Config loading: presets, strict keys and types, overrides, clear errors naming the key."""

from __future__ import annotations

import pytest

from deeplm.config import ConfigError, config_from_dict, list_presets, load_config
from tests.helpers import micro_config


def test_presets_load_and_validate():
    assert {"tiny", "60m"} <= set(list_presets())
    tiny = load_config(preset="tiny")
    big = load_config(preset="60m")
    assert (big.model.n_layers, big.model.d_model, big.model.n_heads) == (60, 320, 5)
    assert big.model.vocab_size == 32000 and big.model.head_dim == 64
    assert tiny.model.n_layers <= 8 and len(tiny.phases) >= 2


def test_wide_preset_extends_the_60m_playbook():
    """``wide`` is the 60m playbook with a 12 x 512, MLP 4x model of about the same size."""
    from deeplm.model import count_parameters

    wide, big = load_config(preset="wide"), load_config(preset="60m")
    assert (wide.model.n_layers, wide.model.d_model, wide.model.mlp_ratio) == (12, 512, 4.0)
    assert count_parameters(wide.model) == 54_158_336
    assert [p.name for p in wide.phases] == [p.name for p in big.phases]
    assert [p.tokens for p in wide.phases] == [p.tokens for p in big.phases]
    assert wide.phases[0].sources == big.phases[0].sources and wide.phases[0].lr == big.phases[0].lr
    assert wide.phases[0].freeze == big.phases[0].freeze == []  # measured: no freezing
    assert [f.layers for f in wide.phases[2].freeze] == [8]  # the fine-tune's, at 2/3 depth


def test_extends_merges_tables_and_phases_and_rejects_loops(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'extends = "tiny"\nname = "mine"\n[model]\nn_layers = 5\n' "[[phases]]\nlr = 1e-3\n"
    )
    cfg, tiny = load_config(config_file=path), load_config(preset="tiny")
    assert cfg.name == "mine" and cfg.model.n_layers == 5
    assert cfg.model.d_model == tiny.model.d_model  # the rest of [model] comes from tiny
    assert cfg.phases[0].lr == 1e-3 and cfg.phases[0].tokens == tiny.phases[0].tokens
    assert len(cfg.phases) == len(tiny.phases)
    path.write_text('extends = "nope"\n')
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(config_file=path)
    path.write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends must be a preset name"):
        load_config(config_file=path)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_config(preset="nope")


def test_unknown_key_is_named_with_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[model]\nn_layer = 3\n')
    with pytest.raises(ConfigError, match=r"c\.toml.*unknown key 'model\.n_layer'"):
        load_config(config_file=path)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"phases\[0\]\.lr: expected a number"):
        load_config(preset="tiny", overrides=['phases.0.lr="fast"'])


@pytest.mark.parametrize(
    "override,match",
    [
        ("phases.0.tokens=0", "tokens must be positive"),
        ("phases.0.tokens=-5", "tokens must be positive"),
        ("phases.0.min_lr_ratio=1.5", "min_lr_ratio"),
        ("model.n_heads=5", "divisible"),
        ("train.device='tpu'", "train.device"),
        ("phases.0.seq_len=4096", "exceeds model.max_seq_len"),
    ],
)
def test_invalid_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(preset="tiny", overrides=[override])


def test_overrides_apply():
    cfg = load_config(preset="tiny", overrides=["phases.1.lr=5e-4", "train.compile=true"])
    assert cfg.phases[1].lr == 5e-4 and cfg.train.compile == "on"


def test_not_utf8_and_bad_toml(tmp_path):
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.toml: not UTF-8"):
        load_config(config_file=bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        load_config(config_file=broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(config_file=tmp_path / "missing.toml")


def test_vocab_mismatch_and_phase_names():
    d = micro_config()
    d["tokenizer"]["vocab_size"] = 1024
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        config_from_dict(d)
    d = micro_config()
    d["phases"].append(dict(d["phases"][0]))
    with pytest.raises(ConfigError, match="unique"):
        config_from_dict(d)


def test_relative_file_sources_resolve_against_config_dir(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'name = "x"\n[model]\nvocab_size = 512\n[tokenizer]\nvocab_size = 512\n'
        '[[phases]]\nname = "a"\n[[phases.sources]]\nkind = "files"\npath = "docs"\n'
    )
    cfg = load_config(config_file=path)
    assert cfg.base_dir == str(tmp_path)
