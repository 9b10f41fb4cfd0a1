"""``deeplm import``: nanoGPT / llm.c token files and a tokenizer.json become a run's shards and
tokenizer with every id unchanged; bad inputs are refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deeplm.cli import main
from deeplm.data.shards import Shard
from deeplm.run.layout import RunLayout
from deeplm.run.run_config import load_run_config
from deeplm.tokenizer import Tokenizer


@pytest.fixture()
def foreign(corpus, tmp_path):
    """A tokenizer.json whose document separator is ``<|endoftext|>`` (id 0) and which has no
    ``<pad>``/``<eos>``, plus token files encoded with it (docs start with the separator)."""
    t = json.loads(corpus["tokenizer"].path.read_text())
    names = {"<pad>": "<|endoftext|>", "<bos>": "<|x1|>", "<eos>": "<|x2|>"}
    vocab = t["model"]["vocab"]
    for old, new in names.items():
        vocab[new] = vocab.pop(old)
    for a in t["added_tokens"]:
        a["content"] = names.get(a["content"], a["content"])
    assert vocab["<|endoftext|>"] == 0
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(t))
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[0], rng.integers(10, 500, size=n)]) for n in (300, 200, 400, 250)]
    train = np.concatenate(docs * 3).astype("<u2")
    val = np.concatenate(docs[:2]).astype("<u2")
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    return {"dir": tmp_path, "tokenizer": path, "train": train, "val": val}


def _import(foreign, run_dir, *extra: str, train: str = "train.bin") -> int:
    d = foreign["dir"]
    return main(
        [
            "import",
            "--preset",
            "tiny",
            "--train",
            str(d / train),
            "--val",
            str(d / "val.bin"),
            "--tokenizer",
            str(foreign["tokenizer"]),
            "--run-dir",
            str(run_dir),
            *extra,
        ]
    )


def test_import_keeps_every_token_id_and_makes_a_data_run(foreign, tmp_path):
    run = tmp_path / "run"
    assert _import(foreign, run) == 0
    tok = Tokenizer.load(RunLayout(run).tokenizer)
    assert tok.bos_id == 0 and tok.eos_id != tok.pad_id and tok.vocab_size == 514
    cfg = load_run_config(run)
    assert cfg.model.vocab_size == cfg.tokenizer.vocab_size == tok.vocab_size
    phase = cfg.phases[0].name
    for split in ("train", "val"):
        shard = Shard.open(RunLayout(run).shard(phase, split), tok.hash)
        assert np.array_equal(np.asarray(shard.tokens), foreign[split])
        assert shard.n_docs == int((foreign[split] == 0).sum())
        assert int(shard.doc(1)[0]) == 0  # every document starts at the separator
    # a run directory holds one run: importing again is refused
    assert _import(foreign, run) == 2


def test_llmc_format_is_detected(foreign, tmp_path):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(foreign["train"]))
    with open(foreign["dir"] / "llmc.bin", "wb") as fh:
        fh.write(header.tobytes() + foreign["train"].tobytes())
    run = tmp_path / "llmc-run"
    assert _import(foreign, run, train="llmc.bin") == 0
    tok = Tokenizer.load(RunLayout(run).tokenizer)
    shard = Shard.open(RunLayout(run).shard("grammar", "train"), tok.hash)
    assert np.array_equal(np.asarray(shard.tokens), foreign["train"])
    header[2] += 5  # the header promises more tokens than the file has
    with open(foreign["dir"] / "short.bin", "wb") as fh:
        fh.write(header.tobytes() + foreign["train"].tobytes())
    assert _import(foreign, tmp_path / "short-run", train="short.bin") == 2


@pytest.mark.parametrize(
    "name,data,extra,message",
    [
        ("big-id.bin", np.array([0, 5, 9000], dtype="<u2").tobytes(), (), "outside the tokenizer"),
        ("odd.bin", b"\x00\x00\x05", (), "whole number of uint16"),
        ("u32.bin", np.arange(1, 100, dtype="<u4").tobytes(), (), "looks like uint32"),
        ("ok.bin", np.array([0, 5, 7], dtype="<u2").tobytes(), ("--bos-token", "<s>"), "<s>"),
        ("ok.bin", np.array([0, 5, 7], dtype="<u2").tobytes(), ("--phase", "nope"), "nope"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(
    foreign, tmp_path, capsys, name, data, extra, message
):
    (foreign["dir"] / name).write_bytes(data)
    run = tmp_path / "bad"
    assert _import(foreign, run, *extra, train=name) == 2
    assert message in capsys.readouterr().err
    assert not (run / "config.json").exists() and not (run / "shards").exists()
