"""The chat template: how a conversation becomes token ids (shared by chat, serving, fine-tuning).

Template (``[...]`` optional, ``*`` repeated)::

    <bos> [system text <|end|>]
    ( <|user|> text <|end|> | <|assistant|> text <|end|> )*
    [<|assistant|>]

* ``<bos>``, ``<|user|>``, ``<|assistant|>`` and ``<|end|>`` are single special tokens; no newlines
  or spaces are added around them. Message text is encoded with ``allow_special=False``, so a user
  who types ``<|end|>`` gets ordinary text, never the special token (no role injection).
* A ``system`` message (at most one, first) is plain text right after ``<bos>``, closed by
  ``<|end|>`` (the vocabulary has no system token).
* With ``add_generation_prompt`` the ids end with ``<|assistant|>``: the model writes the reply
  and closes it with ``<|end|>``. Generation should stop at ``<|end|>`` (or ``<eos>``, or a new
  ``<|user|>``): :func:`stop_token_ids`.
* :func:`encode_chat` also returns which ids belong to assistant replies (their text and their
  closing ``<|end|>``): the loss mask for supervised fine-tuning on this same template.
* :func:`format_chat` fits a conversation into a token budget by dropping the oldest turns (a
  user message and the replies after it go together; the system message is kept).

The Hugging Face export writes the same template as a Jinja ``chat_template``
(:data:`JINJA_TEMPLATE`), so ``tokenizer.apply_chat_template`` gives identical ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deeplm.tokenizer import Tokenizer

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
ROLES = ("system", "user", "assistant")

#: The same template for ``transformers`` (``tokenizer_config.json``'s ``chat_template``).
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatError(ValueError):
    """A conversation is malformed, or does not fit the token budget."""


@dataclass(frozen=True)
class ChatTokens:
    """Ids of the chat special tokens of a tokenizer."""

    bos: int
    eos: int
    user: int
    assistant: int
    end: int


@dataclass
class ChatEncoding:
    """Token ids of a conversation and, per id, whether it belongs to an assistant reply."""

    ids: list[int]
    assistant_mask: list[bool]
    dropped_messages: int = 0  # oldest messages left out by :func:`format_chat`


def chat_tokens(tokenizer: Tokenizer) -> ChatTokens:
    """The chat special ids of ``tokenizer``; :class:`ChatError` if it lacks one."""
    ids = {}
    for name, token in (("user", USER), ("assistant", ASSISTANT), ("end", END)):
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ChatError(
                f"the tokenizer has no {token} token; chat needs {USER}, {ASSISTANT} and {END} "
                "among tokenizer.special_tokens"
            )
        ids[name] = i
    return ChatTokens(bos=tokenizer.bos_id, eos=tokenizer.eos_id, **ids)


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant reply: ``<|end|>``, ``<eos>`` and ``<|user|>``."""
    t = chat_tokens(tokenizer)
    return [t.end, t.eos, t.user]


def _content(message: Mapping[str, object], i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI-style content parts: keep the text parts
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ChatError(f"messages[{i}].content: only text parts are supported")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    if not isinstance(content, str):
        raise ChatError(f"messages[{i}].content must be a string")
    return content


def _validate(messages: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    if not messages:
        raise ChatError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if role == "system" and i != 0:
            raise ChatError(f"messages[{i}]: a system message may only come first")
        out.append((str(role), _content(m, i)))
    return out


def _encode_messages(
    tokenizer: Tokenizer, msgs: list[tuple[str, str]], t: ChatTokens
) -> list[tuple[list[int], list[bool]]]:
    """Per message: its ids and assistant mask (without bos / generation prompt)."""
    out = []
    for role, text in msgs:
        body = tokenizer.encode(text) if text else []
        if role == "system":
            out.append((body + [t.end], [False] * (len(body) + 1)))
        elif role == "user":
            out.append(([t.user] + body + [t.end], [False] * (len(body) + 2)))
        else:  # the role token is the prompt; the reply and its <|end|> are learned
            out.append(([t.assistant] + body + [t.end], [False] + [True] * (len(body) + 1)))
    return out


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, object]],
    add_generation_prompt: bool = False,
) -> ChatEncoding:
    """Ids of the whole conversation (no trimming) and its assistant mask."""
    return format_chat(tokenizer, messages, None, add_generation_prompt)


def format_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, object]],
    max_tokens: int | None,
    add_generation_prompt: bool = True,
) -> ChatEncoding:
    """Format ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``) into ids.

    With ``max_tokens``, the oldest turns are dropped until the ids fit: a turn is a user message
    with the assistant replies that follow it, and the system message is always kept. The last
    message is never dropped; if it cannot fit, :class:`ChatError` is raised. Callers reserve
    room for the reply: ``max_tokens = context_length - max_new_tokens``.
    """
    t = chat_tokens(tokenizer)
    msgs = _validate(messages)
    encoded = _encode_messages(tokenizer, msgs, t)
    head = [t.bos]
    tail = [t.assistant] if add_generation_prompt else []
    first = 0
    if msgs[0][0] == "system":
        head_ids, _ = encoded[0]
        head = head + head_ids
        first = 1
    body = encoded[first:]

    def total(start: int) -> int:
        return len(head) + sum(len(ids) for ids, _ in body[start:]) + len(tail)

    start = 0
    if max_tokens is not None:
        while total(start) > max_tokens:
            if start >= len(body) - 1:
                raise ChatError(
                    f"the conversation needs {total(start)} tokens but only {max_tokens} fit "
                    "(the last message alone is too long)"
                )
            start += 1  # drop the oldest message, then the rest of its turn (its replies)
            while start < len(body) - 1 and msgs[first + start][0] == "assistant":
                start += 1
    ids = list(head)
    mask = [False] * len(head)
    for part_ids, part_mask in body[start:]:
        ids += part_ids
        mask += part_mask
    ids += tail
    mask += [False] * len(tail)
    return ChatEncoding(ids, mask, dropped_messages=start)
