"""Repetition penalty, stop sequences and text streaming (stop strings, exact text)."""

from __future__ import annotations

import pytest
import torch

from deeplm.config import ModelConfig
from deeplm.model import Transformer, generate, stream_generate
from deeplm.model.generate import (
    TextAssembler,
    TextStream,
    apply_repetition_penalty,
    generate_text,
)

MAX_LEN = 24


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(vocab: int, seed: int = 0) -> Transformer:
    # A large init std gives peaked, position-dependent predictions (varied greedy output).
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=4, vocab_size=vocab, max_seq_len=MAX_LEN, init_std=1.0
    )
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return random_model(64)


def test_repetition_penalty_rescales_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0), logits)
    with pytest.raises(ValueError):
        apply_repetition_penalty(logits, torch.tensor([[0]]), 0.0)


def test_repetition_penalty_in_decoding(model: Transformer) -> None:
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    plain = generate(model, idx, 16, temperature=0.0)
    assert torch.equal(generate(model, idx, 16, temperature=0.0, repetition_penalty=1.0), plain)
    pen = generate(model, idx, 16, temperature=0.0, repetition_penalty=50.0)
    # a huge penalty makes greedy decoding avoid repeats while fresh tokens remain
    for row in pen[:, 4:].tolist():
        assert len(set(row)) > len(set(plain[0, 4:].tolist())) - 1
        assert len(set(row)) >= 12
    # the KV cache path and the recompute path agree with the penalty on
    cached = generate(model, idx, 16, temperature=0.0, repetition_penalty=1.7, use_cache=True)
    full = generate(model, idx, 16, temperature=0.0, repetition_penalty=1.7, use_cache=False)
    assert torch.equal(cached, full)
    streamed = list(stream_generate(model, idx[0], 16, temperature=0.0, repetition_penalty=1.7))
    assert streamed == cached[0, 4:].tolist()


def test_stop_sequences(model: Transformer) -> None:
    idx = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(1))
    ref = generate(model, idx, 12, temperature=0.0)
    row0 = ref[0, 3:].tolist()
    assert len(set(row0)) > 6  # a varied sequence
    stop = row0[4:6]
    first = next(i for i in range(len(row0) - 1) if row0[i : i + 2] == stop)
    one = generate(model, idx[:1], 12, temperature=0.0, stop_sequences=[stop])
    assert one[0].tolist() == ref[0, : 3 + first + 2].tolist()
    assert list(stream_generate(model, idx[0], 12, temperature=0.0, stop_sequences=[stop])) == (
        row0[: first + 2]
    )
    # several rows: a finished row is padded with pad_id; decoding runs on for the others
    both = generate(model, idx, 12, temperature=0.0, stop_sequences=[stop], pad_id=63)
    assert both[0, : 3 + first + 2].tolist() == ref[0, : 3 + first + 2].tolist()
    assert set(both[0, 3 + first + 2 :].tolist()) <= {63}
    with pytest.raises(ValueError, match="pad_id or eos_id"):
        generate(model, idx, 4, temperature=0.0, stop_sequences=[[1]])
    # several stop ids for streaming (eos and <|end|>, say)
    stops = [row0[2], 99]
    n = row0.index(row0[2]) + 1
    assert list(stream_generate(model, idx[0], 12, temperature=0.0, eos_id=stops)) == row0[:n]


# ---------------------------------------------------------------------- text level


TEXT = "Hello, wörld! Ünïcödé — 日本語 text ends here. Bye now."


def feed_all(asm: TextAssembler, ids: list[int]) -> list[str]:
    pieces = []
    for i in ids:
        pieces.append(asm.feed(i))
        if asm.done:
            break
    pieces.append(asm.finish())
    return pieces


def test_assembler_streams_exact_text(corpus) -> None:
    tok = corpus["tokenizer"]
    ids = tok.encode(TEXT)
    assert len(ids) > 20
    # multi-byte characters really are split across tokens with this small vocabulary
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    asm = TextAssembler(tok)
    pieces = feed_all(asm, ids)
    assert "".join(pieces) == asm.text == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert asm.finish_reason is None  # ran out of tokens: the caller says "length"
    # one token at a time, spaces included: nothing lost between pieces
    words = [p for p in pieces if p.startswith(" ")]
    assert words, pieces


@pytest.mark.parametrize("stop", ["ends", "日本", "ö", "here. Bye", "t e"])
def test_assembler_stop_strings(corpus, stop: str) -> None:
    tok = corpus["tokenizer"]
    ids = tok.encode(TEXT)
    asm = TextAssembler(tok, stop=[stop, "never-there"])
    pieces = feed_all(asm, ids)
    expected = TEXT[: TEXT.find(stop)] if stop in TEXT else TEXT
    assert "".join(pieces) == asm.text == expected
    assert asm.finish_reason == ("stop" if stop in TEXT else None)
    # text that could be a stop string's start is held back: no piece reveals the stop string
    assert all(stop not in p for p in pieces)


def test_assembler_stop_tokens(corpus) -> None:
    tok = corpus["tokenizer"]
    ids = tok.encode("one two") + [tok.eos_id] + tok.encode(" three")
    asm = TextAssembler(tok)
    assert "".join(feed_all(asm, ids)) == "one two"
    assert asm.finish_reason == "stop"
    end = tok.token_to_id("<|end|>")
    asm = TextAssembler(tok, stop_token_ids=[end])
    # other special tokens are dropped from the text, the stop id ends it
    assert "".join(feed_all(asm, tok.encode("a b") + [tok.bos_id, end, 7])) == "a b"


def test_text_stream_matches_decode(corpus) -> None:
    tok = corpus["tokenizer"]
    model = random_model(tok.vocab_size, seed=3)
    prompt = [tok.bos_id] + tok.encode("The  café — naïve")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        stream = TextStream(model, tok, prompt, 20, temperature=1.0, generator=g)
        pieces = list(stream)
        ids = [i for i in stream.token_ids if i != tok.eos_id]
        # a random model writes stray byte tokens: they are dropped, never shown as U+FFFD
        assert "".join(pieces) == stream.text == tok.decode_generated(ids, True)
        assert "\ufffd" not in stream.text
        assert stream.finish_reason in ("stop", "length")
    # greedy text equals the greedy token ids decoded; a stop string cuts it
    full = generate_text(model, tok, prompt, 16, temperature=0.0)
    ids = generate(model, torch.tensor([prompt]), 16, temperature=0.0)[0, len(prompt) :].tolist()
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    assert full.text == tok.decode_generated(ids, skip_special_tokens=True)
    assert full.finish_reason == ("stop" if len(ids) < 16 else "length")
    cut = full.text[len(full.text) // 2 :][:3]
    if cut.strip():
        short = generate_text(model, tok, prompt, 16, temperature=0.0, stop=[cut])
        assert short.text == full.text[: full.text.find(cut)]
        assert short.finish_reason == "stop"
    # max_new_tokens 0: nothing generated
    empty = generate_text(model, tok, prompt, 0)
    assert empty.text == "" and empty.finish_reason == "length" and empty.token_ids == []
