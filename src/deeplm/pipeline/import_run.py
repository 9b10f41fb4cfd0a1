"""``deeplm import``: a data run made from pre-tokenized files (nanoGPT / llm.c ``.bin`` and a
``tokenizer.json``), so that recipes train and are scored on exactly those tokens.

The result is what ``deeplm prepare`` leaves for ``bench/compare.py --data``: ``config.json``
(the chosen preset or config with its vocabulary set to the tokenizer's), the adapted tokenizer
(see :mod:`deeplm.data.importer`) and one phase's ``train`` / ``val`` shards. Every input is
checked before anything is written; an existing run directory is never overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deeplm.atomic import atomic_write_text
from deeplm.config import RunConfig, config_to_json
from deeplm.data.importer import (
    ImportError_,
    adapt_tokenizer,
    check_tokens,
    read_token_file,
    write_shard,
)
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import Tokenizer


def import_tokens(
    run_dir: Path,
    cfg: RunConfig,
    train: Path,
    val: Path,
    tokenizer: Path,
    phase: str | None = None,
    bos_token: str | None = None,
    dtype: str = "uint16",
    log: Any = print,
) -> dict[str, Any]:
    """Import ``train``/``val`` token files and ``tokenizer`` into ``run_dir`` as ``phase``'s
    shards (default: the config's first phase). Returns a summary."""
    phase = phase or cfg.phases[0].name
    if phase not in [p.name for p in cfg.phases]:
        names = ", ".join(p.name for p in cfg.phases)
        raise ImportError_(f"the config has no phase {phase!r} (its phases: {names})")
    layout = RunLayout(run_dir)
    _check_run_dir(layout)
    files = {
        split: read_token_file(path, dtype) for split, path in (("train", train), ("val", val))
    }
    staging = layout.tokenizer_staging
    staged = staging / layout.tokenizer.name
    tok = adapt_tokenizer(tokenizer, staged, bos_token)
    for tf in files.values():
        check_tokens(tf, tok.vocab_size)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size = tok.vocab_size
    cfg.validate()
    final_tok = layout.tokenizer
    staged.replace(final_tok)
    staging.rmdir()
    tok = Tokenizer.load(final_tok)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "phase": phase,
        "vocab_size": tok.vocab_size,
    }
    for split, tf in files.items():
        meta = write_shard(tf, layout.shard(phase, split), tok)
        summary[split] = {"tokens": meta.n_tokens, "docs": meta.n_docs, "format": tf.fmt}
        log(f"{split}: {meta.n_tokens:,} tokens, {meta.n_docs:,} documents ({tf.fmt})")
    atomic_write_text(layout.config, config_to_json(cfg))
    return summary


def _check_run_dir(layout: RunLayout) -> None:
    if layout.root.exists() and not layout.root.is_dir():
        raise ImportError_(f"{layout.root}: exists and is not a folder")
    for path in (layout.config, layout.state_db):
        if path.exists():
            raise ImportError_(
                f"{path} exists: a run directory holds one run; import into a new one"
            )
