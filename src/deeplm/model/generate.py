"""Autoregressive sampling from a :class:`~deeplm.model.transformer.Transformer`.

Owns next-token selection (greedy / temperature / top-k / top-p, repetition penalty), the
decoding loop with or without the KV cache, token-level stop sequences, and text-level streaming
with stop strings (:class:`TextStream`, used by ``deeplm generate``, ``deeplm chat`` and the
server).

Context longer than ``max_seq_len``: without the cache every step runs the model on the last
``max_seq_len`` tokens (positions restart at 0 for the cropped window). With the cache, decoding
is incremental while the sequence fits in ``max_seq_len``; once it no longer fits, each further
step falls back to recomputing over the cropped window exactly like the no-cache path. So
``use_cache=True`` and ``use_cache=False`` compute the same thing (up to float rounding) for any
length.

The model is put in eval mode for the duration of the call and its previous mode is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deeplm.model.transformer import KVCache, Transformer

if TYPE_CHECKING:
    from deeplm.tokenizer import Tokenizer


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` ``[B, V]`` -> LongTensor ``[B]``.

    ``temperature == 0`` is greedy (argmax; top-k/top-p are then irrelevant). Otherwise the logits
    are divided by ``temperature``, filtered to the ``top_k`` largest (ties at the k-th value are
    kept) and to the smallest set of tokens whose probability mass reaches ``top_p`` (the most
    likely token is always kept), and sampled with ``generator``. Sampling happens on the
    generator's device, so a seeded CPU generator gives the same tokens whatever the model's
    device.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    out = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return out.to(logits.device)


def apply_repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """CTRL / Hugging Face repetition penalty: for every token id present in ``context``
    ``[B, T]``, its logit in ``logits`` ``[B, V]`` is divided by ``penalty`` when positive and
    multiplied by it when negative (so ``penalty > 1`` discourages repeats, ``1`` is a no-op).
    Returns a new tensor."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    logits = logits.float()
    if penalty == 1.0 or context.numel() == 0:
        return logits
    context = context.to(logits.device)
    score = logits.gather(-1, context)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, context, score)


def _check_stop_sequences(stop_sequences: Sequence[Sequence[int]] | None) -> list[list[int]]:
    out = [list(map(int, s)) for s in (stop_sequences or [])]
    if any(len(s) == 0 for s in out):
        raise ValueError("stop sequences must not be empty")
    return out


def _ends_with_any(tokens: list[int], stops: list[list[int]]) -> bool:
    return any(len(tokens) >= len(s) and tokens[-len(s) :] == s for s in stops)


def _token_steps(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    use_cache: bool,
    generator: torch.Generator | None,
    repetition_penalty: float = 1.0,
) -> Iterator[Tensor]:
    """Yield the next token ``[B]`` of every row, ``max_new_tokens`` times (no stopping)."""
    max_len = model.cfg.max_seq_len
    seq = idx
    cache: KVCache | None = None
    for _ in range(max_new_tokens):
        n = seq.size(1)
        if use_cache and n <= max_len:
            if cache is None:  # prefill with the whole prompt
                cache = model.new_kv_cache()
                logits = model.forward_with_cache(seq, cache, start_pos=0)
            else:  # only the newest token is not cached yet
                logits = model.forward_with_cache(seq[:, -1:], cache, start_pos=n - 1)
        else:
            logits, _ = model(seq[:, -max_len:])
        last = logits[:, -1, :]
        if repetition_penalty != 1.0:
            last = apply_repetition_penalty(last, seq, repetition_penalty)
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        yield nxt


def _prepare(model: Transformer, idx: Tensor) -> Tensor:
    if idx.dim() != 2:
        raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
    if idx.size(1) == 0:
        raise ValueError("idx must hold at least one token (e.g. <bos>)")
    device = model.tok_emb.weight.device
    return idx.to(device=device, dtype=torch.long)


@torch.no_grad()
def generate(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    pad_id: int | None = None,
) -> Tensor:
    """Extend ``idx`` ``[B, T]`` by up to ``max_new_tokens`` tokens; returns ``[B, T + n]``.

    With ``eos_id``, a row that produced it keeps being padded with ``eos_id`` and decoding stops
    as soon as every row has produced it (so ``n`` may be less than ``max_new_tokens``; the eos
    token itself is included). See the module docstring for the context-length behaviour.

    ``repetition_penalty`` (> 0, 1 = off) rescales the logits of every token already in the row
    (prompt included) before selection, see :func:`apply_repetition_penalty`.
    ``stop_sequences`` are token-id sequences: a row whose generated tokens end with one of them
    is finished like a row that produced ``eos_id`` (the stop tokens are included). Finished rows
    are padded with ``pad_id``, or ``eos_id`` when ``pad_id`` is None (with several rows, one of
    the two is then required).
    """
    idx = _prepare(model, idx)
    stops = _check_stop_sequences(stop_sequences)
    fill = pad_id if pad_id is not None else eos_id
    if stops and fill is None and idx.size(0) > 1:
        raise ValueError("stop_sequences with several rows need pad_id or eos_id for padding")
    was_training = model.training
    model.eval()
    try:
        out = [idx]
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        rows: list[list[int]] = [[] for _ in range(idx.size(0))]
        steps = _token_steps(
            model,
            idx,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            use_cache,
            generator,
            repetition_penalty,
        )
        for nxt in steps:
            if fill is not None:
                nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            if eos_id is not None:
                done |= nxt == eos_id
            if stops:
                for r, tok in enumerate(nxt.tolist()):
                    if not bool(done[r]):
                        rows[r].append(tok)
                        if _ends_with_any(rows[r], stops):
                            done[r] = True
            out.append(nxt[:, None])
            if (eos_id is not None or stops) and bool(done.all()):
                break
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()  # torch re-enters no_grad on each resume only, not while the caller runs
def stream_generate(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Iterable[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
    stop_sequences: Sequence[Sequence[int]] | None = None,
) -> Iterator[int]:
    """Like :func:`generate` for ONE sequence (``idx`` ``[T]`` or ``[1, T]``), yielding each new
    token id as a Python int as soon as it is chosen; ``eos_id`` (one id or several, e.g. eos and
    ``<|end|>``) is yielded, then it stops. So does the last token of a ``stop_sequences``
    match."""
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"stream_generate takes one sequence, got shape {tuple(idx.shape)}")
    idx = _prepare(model, idx)
    stops = _check_stop_sequences(stop_sequences)
    eos_ids = _id_set(eos_id)
    was_training = model.training
    model.eval()  # stays in eval mode until the generator is exhausted or closed
    try:
        steps = _token_steps(
            model,
            idx,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            use_cache,
            generator,
            repetition_penalty,
        )
        produced: list[int] = []
        for nxt in steps:
            tok = int(nxt.item())
            yield tok
            if tok in eos_ids:
                return
            if stops:
                produced.append(tok)
                if _ends_with_any(produced, stops):
                    return
    finally:
        model.train(was_training)


def _id_set(ids: int | Iterable[int] | None) -> set[int]:
    if ids is None:
        return set()
    if isinstance(ids, int):
        return {ids}
    return {int(i) for i in ids}


# ---------------------------------------------------------------------- text-level streaming


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (text
    that must not be shown yet because the next tokens may complete a stop string)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class TextResult:
    """A finished text generation (see :func:`generate_text`)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or stop string) or "length"
    prompt_tokens: int


class TextAssembler:
    """Turns generated token ids, one at a time, into final text pieces, applying stops.

    * Tokens are decoded with the tokenizer's stream decoder (special tokens dropped), so the
      pieces concatenate to exactly the decoded text: leading spaces of byte-level tokens are
      kept and a multi-byte character split across tokens is released once complete.
    * A token in ``stop_token_ids`` ends the text (it is not part of it).
    * A ``stop`` string ends the text just before it; text that could still become the start
      of a stop string is held back until the following tokens decide.

    :meth:`feed` returns the new final piece (maybe ``""``); once :attr:`done` is set, feed no
    more tokens. :meth:`finish` returns what is left (call it at the end in any case). The
    concatenation of every returned piece equals :attr:`text`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] | str | None = None,
        stop_token_ids: Iterable[int] | None = None,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in (stop or []) if s]
        self.stop_token_ids = (
            {tokenizer.eos_id} if stop_token_ids is None else {int(i) for i in stop_token_ids}
        )
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._full = ""  # everything decoded so far (may run past a stop string)
        self._emitted = 0  # characters of _full already returned
        self.done = False
        self._cut = False  # the text was cut at a stop string
        self.finish_reason: str | None = None  # "stop" once a stop token/string was seen

    @property
    def text(self) -> str:
        """The final text returned so far (after :meth:`finish`: all of it)."""
        return self._full[: self._emitted]

    def _find_stop(self) -> int | None:
        hits = [i for i in (self._full.find(s, self._emitted) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        piece = self._full[self._emitted : upto]
        self._emitted = max(self._emitted, upto)
        return piece

    def feed(self, token_id: int) -> str:
        """Add one generated id; return the text that became final."""
        if self.done:
            raise RuntimeError("the text is finished; feed no more tokens")
        if token_id in self.stop_token_ids:
            self.done, self.finish_reason = True, "stop"
            return ""
        self._full += self._decoder.step(token_id)
        cut = self._find_stop()
        if cut is not None:
            self.done, self.finish_reason, self._cut = True, "stop", True
            self._full = self._full[:cut]
            return self._release(cut)
        hold = _stop_holdback(self._full[self._emitted :], self.stop)
        return self._release(len(self._full) - hold)

    def finish(self) -> str:
        """Flush held-back text at the end of generation (stop strings still apply)."""
        if not self._cut:
            self._full += self._decoder.flush()
            cut = self._find_stop()
            if cut is not None:
                self.finish_reason, self._cut = "stop", True
                self._full = self._full[:cut]
        self.done = True
        return self._release(len(self._full))


class TextStream:
    """Generate text for one prompt, yielding text pieces as they become final.

    Iterating yields ``str`` pieces whose concatenation is exactly :attr:`text` (see
    :class:`TextAssembler` for decoding and stops). A token in ``stop_token_ids`` (default: the
    tokenizer's ``<eos>``) or a ``stop`` string ends the text and is not part of it. After
    iteration :attr:`finish_reason` is ``"stop"`` or ``"length"`` (``max_new_tokens`` reached)
    and :attr:`token_ids` holds every generated id (stop tokens included).

    ``lock``: an optional context manager (e.g. a ``threading.Lock``) held around each model
    step, so several streams can interleave on one model without running it concurrently.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | str | None = None,
        stop_token_ids: Iterable[int] | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        lock: Any = None,
    ) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("the prompt must hold at least one token (e.g. <bos>)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self._model = model
        self._prompt = [int(i) for i in prompt_ids]
        self._max_new = max_new_tokens
        self._kw = dict(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            use_cache=use_cache,
            generator=generator,
        )
        self._lock = lock
        self._asm = TextAssembler(tokenizer, stop, stop_token_ids)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = len(self._prompt)
        self._started = False

    @property
    def text(self) -> str:
        return self._asm.text

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a TextStream can be iterated only once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[str]:
        asm = self._asm
        if self._max_new > 0:
            idx = torch.tensor([self._prompt], dtype=torch.long)
            steps = stream_generate(self._model, idx, self._max_new, **self._kw)  # type: ignore[arg-type]
            lock = self._lock if self._lock is not None else contextlib.nullcontext()
            try:
                while not asm.done:
                    with lock:
                        tok = next(steps, None)
                    if tok is None:
                        break
                    self.token_ids.append(tok)
                    piece = asm.feed(tok)
                    if piece:
                        yield piece
            finally:
                steps.close()
        piece = asm.finish()
        self.finish_reason = asm.finish_reason or "length"
        if piece:
            yield piece


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    **kwargs: Any,
) -> TextResult:
    """Run a :class:`TextStream` to the end and return the whole text (same keyword arguments)."""
    stream = TextStream(model, tokenizer, prompt_ids, max_new_tokens, **kwargs)
    for _ in stream:
        pass
    return TextResult(
        stream.text, stream.token_ids, stream.finish_reason or "length", stream.prompt_tokens
    )
