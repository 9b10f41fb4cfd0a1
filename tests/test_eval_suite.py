"""The evaluation suite: bits per byte, probes, grammar, richness, report and ``deeplm eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from deeplm.config import ModelConfig
from deeplm.eval.bpb import evaluate_bpb, token_byte_lengths
from deeplm.eval.grammar import PARADIGMS, evaluate_grammar, grammar_pairs, subsample
from deeplm.eval.perplexity import evaluate_loss
from deeplm.eval.probes import (
    load_probes,
    memorization_probe,
    run_choice_probes,
    score_candidates,
    sequence_logprobs,
)
from deeplm.eval.richness import distinct_n, mattr, rare_word_rate, richness, word_counts, words
from deeplm.model import Transformer
from deeplm.run.state_db import StateDB
from tests.finished_run import micro_run, run_cli

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_model(vocab: int, seed: int = 0, max_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=vocab, max_seq_len=max_len)
    return Transformer(cfg).eval()


# ---------------------------------------------------------------------- grammar suite


def test_grammar_pairs_are_many_deterministic_and_minimal() -> None:
    pairs = grammar_pairs()
    assert len(pairs) >= 300
    assert pairs == grammar_pairs()  # a pure function
    assert len({(p.good, p.bad) for p in pairs}) == len(pairs)
    cats = {p.category for p in pairs}
    assert cats == {"agreement", "tense", "clause_nesting", "word_order"}
    for cat in cats:
        assert sum(p.category == cat for p in pairs) >= 60
    for p in pairs:
        assert p.good != p.bad
        assert len(p.good.split()) == len(p.bad.split()), p  # minimal: same number of words
        assert sorted(p.good.lower().split()) != sorted(p.bad.lower().split()) or (
            p.category in ("word_order", "clause_nesting")
        )
    sub = subsample(pairs, 45)
    assert len(sub) == 45
    n_paradigms = sum(len(v) for v in PARADIGMS.values())
    assert len({(p.category, p.paradigm) for p in sub}) == n_paradigms  # spread evenly


def test_grammar_scoring_follows_log_likelihood(corpus) -> None:
    tok = corpus["tokenizer"]
    model = small_model(tok.vocab_size)
    res = evaluate_grammar(model, tok, CPU, max_pairs=30)
    assert res["n"] == 30 and 0.0 <= res["accuracy"] <= 1.0
    assert sum(c["n"] for c in res["categories"].values()) == 30
    # accuracy is exactly "log p(good) > log p(bad)" recomputed by hand for one pair
    p = subsample(grammar_pairs(), 1)[0]

    def ll(text: str) -> float:
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
        with torch.no_grad():
            logp = F.log_softmax(model(ids)[0][0, :-1], dim=-1)
        return float(logp.gather(-1, ids[0, 1:, None]).sum())

    one = evaluate_grammar(model, tok, CPU, max_pairs=1)
    assert one["accuracy"] == float(ll(p.good) > ll(p.bad))


# ---------------------------------------------------------------------- richness


def test_richness_measures() -> None:
    assert words("Don't STOP, the end-game 42!") == ["don't", "stop", "the", "end", "game"]
    texts = ["the cat sat on the mat", "the cat sat"]
    assert distinct_n(texts, 1) == pytest.approx(5 / 9)  # the cat sat on mat / 9 words
    assert distinct_n(texts, 2) == pytest.approx(5 / 7)  # bigrams never cross texts
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert mattr(["a", "b"] * 10, window=4) == pytest.approx(0.5)
    ref = word_counts(["the the the cat cat dog"])
    r = rare_word_rate(["the", "cat", "dog", "zebra"], ref, top_k=2)
    assert r == {"rare_word_rate": 0.5, "oov_rate": 0.25}
    full = richness(texts, ref, top_k=2)
    assert full["words"] == 9 and full["type_token_ratio"] == pytest.approx(5 / 9)
    assert "rare_word_rate" in full and "rare_word_rate" not in richness(texts)


# ---------------------------------------------------------------------- bits per byte


def test_bpb_matches_loss_and_byte_counts(corpus) -> None:
    tok, val = corpus["tokenizer"], corpus["val"]
    table = token_byte_lengths(tok)
    text = "Plain text, naïve café — 日本語.\n"
    assert sum(table[i] for i in tok.encode(text)) == len(text.encode("utf-8"))
    assert table[tok.bos_id] == table[tok.eos_id] == 0
    model = small_model(tok.vocab_size)
    r = evaluate_bpb(model, val, table, 32, 4, 3, CPU)
    assert r["val_loss"] == pytest.approx(evaluate_loss(model, val, 32, 4, 3, CPU), rel=1e-5)
    assert r["tokens"] == 3 * 4 * 32
    # by hand: nats of text targets / ln 2 / their bytes
    from deeplm.data.loader import eval_batches

    nats, n_bytes = 0.0, 0
    for x, y in eval_batches(val, 32, 4, 3):
        with torch.no_grad():
            ce = F.cross_entropy(
                model(x)[0].reshape(-1, tok.vocab_size), y.reshape(-1), reduction="none"
            )
        b = torch.as_tensor(table)[y.reshape(-1)]
        nats += float((ce.double() * (b > 0)).sum())
        n_bytes += int(b.sum())
    assert r["bytes"] == n_bytes
    assert r["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


# ---------------------------------------------------------------------- probes


def test_sequence_logprobs_is_exact_and_padding_free(corpus) -> None:
    tok = corpus["tokenizer"]
    model = small_model(tok.vocab_size, max_len=16)
    seqs = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55], [1] + list(range(60, 80))]
    batched = sequence_logprobs(model, seqs, [2, 1, 5], CPU, batch_size=8)
    for s, start, (lp, n) in zip(seqs, [2, 1, 5], batched):
        single = sequence_logprobs(model, [s], [start], CPU)[0]
        assert lp == pytest.approx(single[0], abs=1e-4) and n == single[1]
    # exact for a sequence that fits; a longer one keeps its last max_seq_len tokens
    s = seqs[1]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([s]))[0][0, :-1], dim=-1)
    assert batched[1][0] == pytest.approx(
        float(logp.gather(-1, torch.tensor(s[1:])[:, None]).sum()), abs=1e-4
    )
    assert batched[2][1] == 15  # 21 tokens cut to 16: 15 targets scored


def test_probe_file_is_valid() -> None:
    probes = load_probes()
    assert probes["version"] == 1 and len(probes["sha256"]) == 64
    assert len(probes["completion"]) >= 20 and len(probes["reasoning"]) >= 12
    assert {i["steps"] for i in probes["reasoning"]} == {2, 3}
    assert probes["memorization"]["passage_tokens"] > 0


def test_probes_rank_a_learned_sentence_first(corpus) -> None:
    """A model trained briefly on one sentence must rank its ending first, and find that
    sentence (seen) more likely than other text (unseen)."""
    tok = corpus["tokenizer"]
    model = small_model(tok.vocab_size, seed=1)
    sentence = "The capital of France is Paris."
    ids = torch.tensor([[tok.bos_id] + tok.encode(sentence)])
    item = {
        "id": "france",
        "prompt": "The capital of France is",
        "candidates": [" London", " Paris", " Rome", " Berlin"],
        "answer": 1,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    scores = score_candidates(model, tok, item["prompt"], item["candidates"], CPU)
    assert max(range(4), key=lambda i: scores[i]) == 1
    res = run_choice_probes(model, tok, [item, dict(item, answer=0)], CPU)
    assert [r["correct"] for r in res["items"]] == [True, False]
    assert res["items"][1]["rank"] > 1 and res["accuracy"] == 0.5 and res["chance"] == 0.25
    unseen = [[tok.bos_id] + tok.encode("A quiet river runs through the old town.")]
    mem = memorization_probe(model, ids.tolist(), unseen, CPU)
    assert mem["seen_loss"] < mem["unseen_loss"] and mem["gap"] > 0
    assert mem["seen_lower_fraction"] == 1.0


# ---------------------------------------------------------------------- report and CLI


def test_pipeline_report_has_every_section(tmp_path_factory) -> None:
    run_dir = micro_run(tmp_path_factory)
    report = (run_dir / "report.md").read_text()
    for heading in (
        "## Final model on each phase's validation data",
        "## Loss curves",
        "## Samples",
        "## Behavioral probes",
        "## Grammar (minimal pairs)",
        "## Vocabulary richness",
    ):
        assert heading in report, heading
    assert "bits per byte" in report and "| prompt | completion |" in report
    for png in ("loss_curves.png", "loss_grammar.png", "loss_vocabulary.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000
        assert f"report/{png}" in report
    results = json.loads((run_dir / "report" / "eval.json").read_text())
    assert set(results["per_phase"]) == {"grammar", "vocabulary"}
    assert 0 < results["per_phase"]["grammar"]["bpb"] < 20
    assert results["grammar"]["n"] == 150 and results["probes"]["probe_file"]["version"] == 1
    db = StateDB(run_dir / "state.db", readonly=True)
    try:
        out = db.stage("evaluate").outputs
        assert set(out["per_phase"]) == {"grammar", "vocabulary"}
        assert "accuracy" in out["grammar"] and "completion_accuracy" in out["probes"]
        assert db.artifact(run_dir / "report" / "eval.json")["kind"] == "eval"
        assert any(e["kind"] == "eval" for e in db.events(stage="evaluate"))
    finally:
        db.close()


def test_eval_cli_full_suite(tmp_path_factory) -> None:
    run_dir = micro_run(tmp_path_factory)
    r = run_cli("eval", "--run-dir", str(run_dir), "--samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    assert head["grammar"]["n"] == len(grammar_pairs())  # the whole suite
    assert set(head["per_phase"]) == {"grammar", "vocabulary"}
    eval_json = run_dir / "eval" / "eval.json"
    assert head["paths"]["eval_json"] == str(eval_json)
    assert "## Grammar (minimal pairs)" in (run_dir / "eval" / "report.md").read_text()
    assert (run_dir / "eval" / "loss_vocabulary.png").is_file()
    db = StateDB(run_dir / "state.db", readonly=True)
    try:
        assert {a["kind"] for a in db.artifacts(producer="eval")} == {"eval", "report"}
        ev = [e for e in db.events(stage="eval") if e["kind"] == "eval"]
        assert ev and ev[-1]["data"]["grammar"]["n"] == len(grammar_pairs())
    finally:
        db.close()
    # the pipeline's own report is untouched: a re-run redoes nothing
    from deeplm.config import config_from_dict
    from deeplm.pipeline.local import run_local
    from tests.finished_run import micro_run_config

    summary = run_local(run_dir, config_from_dict(micro_run_config()), log=lambda s: None)
    assert all(s["skipped"] for s in summary["stages"].values())
    r = run_cli("eval", "--run-dir", str(run_dir / "nope"))
    assert r.returncode == 2 and "not a deeplm run directory" in r.stderr
