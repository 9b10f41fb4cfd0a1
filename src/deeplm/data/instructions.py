"""Instruction/response pairs for fine-tuning, formatted with the chat template.

A JSONL file holds one ``{"prompt": ..., "response": ...}`` object per line (field names
configurable). Each pair becomes one document ``<|user|>prompt<|end|><|assistant|>response<|end|>``;
the shard writer adds ``<bos>``/``<eos>`` around it, which gives exactly the ids of
:func:`deeplm.chat.encode_chat` for that conversation plus a closing ``<eos>``. Special-token
strings inside the user's text are removed, so data can never forge a role marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from deeplm.chat import ASSISTANT, END, USER
from deeplm.config import SourceConfig
from deeplm.data.sources import Document, SourceError, SourceStats

_SPECIALS = (USER, ASSISTANT, END, "<bos>", "<eos>", "<pad>")


def scrub_special(text: str) -> str:
    """``text`` without any special-token string (no forged role markers or boundaries)."""
    for token in _SPECIALS:
        text = text.replace(token, "")
    return text.strip()


def format_pair(prompt: str, response: str) -> str:
    """One instruction pair as chat-template text (special tokens as strings)."""
    return f"{USER}{scrub_special(prompt)}{END}{ASSISTANT}{scrub_special(response)}{END}"


def iter_instructions(
    src: SourceConfig, base_dir: Path, stats: SourceStats | None = None
) -> Iterator[Document]:
    """Documents from a JSONL file of instruction/response pairs; bad lines are counted skips."""
    stats = stats if stats is not None else SourceStats()
    path = Path(src.path).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise SourceError(f"{path}: instruction file not found")
    if path.suffix != ".jsonl":
        raise SourceError(f"{path}: instruction data must be a .jsonl file")
    good = 0
    with open(path, "rb") as fh:
        stats.files_read += 1
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                prompt, response = rec[src.prompt_field], rec[src.response_field]
                if not isinstance(prompt, str) or not isinstance(response, str):
                    raise TypeError("prompt and response must be strings")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                stats.skip("bad instruction line")
                if good == 0 and lineno > 1000:
                    raise SourceError(f"{path}: no valid instruction pair in 1000 lines") from exc
                continue
            text = format_pair(prompt, response)
            good += 1
            stats.docs += 1
            stats.chars += len(text)
            yield Document(text, f"instructions:{path}", f"{path.name}:{lineno}")
            if src.max_docs and good >= src.max_docs:
                break
    if good == 0:
        raise SourceError(
            f"{path}: no valid instruction pair (each line needs string fields "
            f"{src.prompt_field!r} and {src.response_field!r})"
        )
