"""The quality-per-token harness (bench/compare.py) on the session corpus: two candidates train on
the same shards for the same budget, are scored on the same validation windows and the grammar
suite, and a second invocation re-scores without retraining."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from deeplm.config import config_from_dict, config_to_json
from deeplm.run.layout import RunLayout
from tests.helpers import micro_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare  # noqa: E402


@pytest.fixture()
def data_run(corpus, tmp_path) -> Path:
    run = tmp_path / "data"
    RunLayout(run).tokenizer.parent.mkdir(parents=True)
    shutil.copy(corpus["root"] / "tokenizer.json", RunLayout(run).tokenizer)
    shutil.copytree(corpus["root"] / "shards", RunLayout(run).shard("p1", "train").parent)
    (run / "config.json").write_text(config_to_json(config_from_dict(micro_config())))
    return run


def test_candidates_train_on_the_same_data_and_rerun_only_rescores(
    data_run, tmp_path, capsys, monkeypatch
):
    monkey_results = tmp_path / "results"
    monkeypatch.setattr(compare, "RESULTS", monkey_results)
    small = "model.d_model=32,model.n_heads=1,phases.0.freeze=[],phases.0.curriculum=[]"
    argv = [
        "--data", str(data_run), "--phase", "p1", "--tokens", "4096",
        "--candidate", f"deep=tiny,model.n_layers=4,{small}",
        "--candidate", f"wide=tiny,model.n_layers=1,{small},model.mlp_ratio=4.0",
        "--common", "phases.0.micro_batch=4", "--common", "phases.0.grad_accum=1",
        "--common", "phases.0.seq_len=64", "--common", "phases.0.eval_every=1000",
        "--common", "train.device=cpu",
        "--out", str(tmp_path / "out"), "--eval-seq-len", "64", "--eval-batches", "2",
        "--save", "t",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    first = json.loads((monkey_results / "compare-t.json").read_text())
    rows = {r["name"]: r for r in first["rows"]}
    assert rows["deep"]["model"].startswith("4 layers x 32")
    assert rows["wide"]["model"].startswith("1 layers x 32")
    for r in rows.values():
        assert r["tokens"] == 4096 and 0 < r["val_loss"] < 20
        assert 0.0 <= r["grammar_accuracy"] <= 1.0 and r["tokens_per_s"] > 0
        assert r["train_wall_s"] > 0
    assert rows["deep"]["val_loss"] != rows["wide"]["val_loss"]
    out = capsys.readouterr().out
    assert "| candidate | params | val loss |" in out and "| deep |" in out
    # again: nothing retrained (the final checkpoints stand), same scores, same timings
    assert compare.main(argv) == 0
    second = json.loads((monkey_results / "compare-t.json").read_text())
    assert second["rows"] == first["rows"]


def test_bad_candidate_and_missing_data_are_named(data_run, tmp_path):
    with pytest.raises(SystemExit, match="expected NAME=PRESET"):
        compare.parse_candidate("just-a-name")
    spec = 'a=tiny,phases.0.freeze=[{at=0.2,layers=8},{at=0.5,layers=16}],name="x,y"'
    assert compare.parse_candidate(spec) == (
        "a",
        "tiny",
        ["phases.0.freeze=[{at=0.2,layers=8},{at=0.5,layers=16}]", 'name="x,y"'],
    )
    argv = ["--data", str(tmp_path / "nope"), "--phase", "p1", "--tokens", "10"]
    with pytest.raises(SystemExit, match="config.json: not found"):
        compare.main([*argv, "--candidate", "a=tiny", "--out", str(tmp_path / "o")])
    argv[1] = str(data_run)
    argv[3] = "p9"
    with pytest.raises(SystemExit, match="no phase 'p9'"):
        compare.main([*argv, "--candidate", "a=tiny", "--out", str(tmp_path / "o")])
