"""A grammar suite of minimal pairs generated from templates, scored by log-likelihood.

Each pair is a grammatical sentence and an ungrammatical one that differs minimally (one word
changed, or the same words in another order: both have the same number of words). The model
"prefers" the right one when ``log p(good) > log p(bad)`` (sums over all tokens after ``<bos>``),
as in BLiMP. Four categories, each with several paradigms (templates):

* ``agreement``: subject-verb number agreement, plain, across a prepositional phrase or a relative
  clause whose noun has the other number (an "attractor"), and with the copula;
* ``tense``: time adverbs against verb tense, perfect participles, do-support;
* ``clause_nesting``: centre-embedded relative clauses, gaps in object relatives, the position
  of a complementizer;
* ``word_order``: subject-verb-object order, determiner and adjective order, negation and
  question word order.

The pairs are a pure function of :data:`SUITE_VERSION` and the templates (no randomness outside a
fixed-seed ``random.Random``): :func:`grammar_pairs` returns the same list every call.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deeplm.eval.probes import sequence_logprobs
from deeplm.model.transformer import Transformer
from deeplm.tokenizer import Tokenizer

SUITE_VERSION = 1
PAIRS_PER_PARADIGM = 30


@dataclass(frozen=True)
class MinimalPair:
    category: str
    paradigm: str
    good: str
    bad: str


# ------------------------------------------------------------------------------ vocabulary

# (singular, plural)
PEOPLE = [
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("doctor", "doctors"),
    ("girl", "girls"),
    ("boy", "boys"),
    ("king", "kings"),
    ("soldier", "soldiers"),
    ("student", "students"),
    ("woman", "women"),
    ("man", "men"),
    ("child", "children"),
    ("writer", "writers"),
]
ANIMALS = [("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds")]
NOUNS = PEOPLE + ANIMALS
# intransitive verbs: (3rd singular present, plural present, past)
INTRANSITIVE = [
    ("sleeps", "sleep", "slept"),
    ("laughs", "laugh", "laughed"),
    ("sings", "sing", "sang"),
    ("waits", "wait", "waited"),
    ("smiles", "smile", "smiled"),
    ("works", "work", "worked"),
    ("walks", "walk", "walked"),
    ("runs", "run", "ran"),
]
# transitive verbs: (3rd singular present, plural present, past)
TRANSITIVE = [
    ("likes", "like", "liked"),
    ("sees", "see", "saw"),
    ("helps", "help", "helped"),
    ("follows", "follow", "followed"),
    ("watches", "watch", "watched"),
    ("calls", "call", "called"),
]
# irregular verbs: (base, past, past participle)
IRREGULAR = [
    ("eat", "ate", "eaten"),
    ("write", "wrote", "written"),
    ("hide", "hid", "hidden"),
    ("see", "saw", "seen"),
    ("take", "took", "taken"),
    ("give", "gave", "given"),
    ("throw", "threw", "thrown"),
    ("break", "broke", "broken"),
    ("choose", "chose", "chosen"),
    ("drive", "drove", "driven"),
    ("sing", "sang", "sung"),
    ("begin", "began", "begun"),
    ("forget", "forgot", "forgotten"),
    ("steal", "stole", "stolen"),
]
# regular intransitive verbs: (base, past)
REGULAR = [
    ("walk", "walked"),
    ("work", "worked"),
    ("wait", "waited"),
    ("laugh", "laughed"),
    ("play", "played"),
    ("stay", "stayed"),
    ("cook", "cooked"),
    ("listen", "listened"),
]
THINGS = ["book", "letter", "house", "car", "song", "picture", "coat", "boat"]
BOUGHT = ["bought", "sold", "found", "painted", "wanted", "described"]
ADJ = ["old", "new", "small", "large", "strange", "beautiful", "expensive", "famous"]
SIZES = ["big", "small", "large", "little", "tiny", "huge"]
OBJECTS = ["ball", "box", "car", "coat", "hat", "boat", "house", "door"]
COLORS = ["red", "blue", "green", "black", "white", "brown"]
PREPS = ["near", "behind", "beside", "with"]
STATES = ["happy", "tired", "hungry", "ready", "angry", "late"]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ------------------------------------------------------------------------------ paradigms


def _agreement_simple() -> Iterator[tuple[str, str]]:
    for (sg, pl), (v_sg, v_pl, _) in itertools.product(NOUNS, INTRANSITIVE):
        yield f"The {sg} {v_sg}.", f"The {sg} {v_pl}."
        yield f"The {pl} {v_pl}.", f"The {pl} {v_sg}."


def _agreement_pp() -> Iterator[tuple[str, str]]:
    for (sg, pl), (a_sg, a_pl), prep, (v_sg, v_pl, _) in itertools.product(
        NOUNS, PEOPLE, PREPS, INTRANSITIVE
    ):
        if sg == a_sg:
            continue
        yield f"The {sg} {prep} the {a_pl} {v_sg}.", f"The {sg} {prep} the {a_pl} {v_pl}."
        yield f"The {pl} {prep} the {a_sg} {v_pl}.", f"The {pl} {prep} the {a_sg} {v_sg}."


def _agreement_relative() -> Iterator[tuple[str, str]]:
    for (sg, _), (a_sg, a_pl), (_, t_pl, _), (v_sg, v_pl, _) in itertools.product(
        NOUNS, PEOPLE, TRANSITIVE, INTRANSITIVE
    ):
        if sg == a_sg:
            continue
        yield (
            f"The {sg} that the {a_pl} {t_pl} {v_sg}.",
            f"The {sg} that the {a_pl} {t_pl} {v_pl}.",
        )


def _agreement_copula() -> Iterator[tuple[str, str]]:
    for (sg, pl), state in itertools.product(NOUNS, STATES):
        yield f"The {sg} is {state}.", f"The {sg} are {state}."
        yield f"The {pl} are {state}.", f"The {pl} is {state}."
        yield f"The {sg} was {state}.", f"The {sg} were {state}."
        yield f"The {pl} were {state}.", f"The {pl} was {state}."


def _tense_adverb() -> Iterator[tuple[str, str]]:
    for (sg, _), (base, past) in itertools.product(PEOPLE, REGULAR):
        yield f"Yesterday the {sg} {past}.", f"Yesterday the {sg} {base}s."
        yield f"Tomorrow the {sg} will {base}.", f"Tomorrow the {sg} will {past}."


def _tense_participle() -> Iterator[tuple[str, str]]:
    for (sg, pl), (_, past, part) in itertools.product(PEOPLE, IRREGULAR):
        if past == part:
            continue
        yield f"The {sg} has {part} it.", f"The {sg} has {past} it."
        yield f"The {pl} have {part} it.", f"The {pl} have {past} it."


def _tense_do_support() -> Iterator[tuple[str, str]]:
    for (sg, _), (base, past, _) in itertools.product(PEOPLE, IRREGULAR):
        yield f"Did the {sg} {base} it?", f"Did the {sg} {past} it?"
        yield f"The {sg} did not {base} it.", f"The {sg} did not {past} it."


def _nesting_center() -> Iterator[tuple[str, str]]:
    for (n1, _), (n2, _), (_, _, t_past), (_, _, i_past) in itertools.product(
        NOUNS, NOUNS, TRANSITIVE, INTRANSITIVE
    ):
        if n1 == n2:
            continue
        yield (
            f"The {n1} that the {n2} {t_past} {i_past}.",
            f"The {n1} that the {n2} {i_past} {t_past}.",
        )


def _nesting_gap() -> Iterator[tuple[str, str]]:
    for thing, (person, _), verb, adj in itertools.product(THINGS, PEOPLE, BOUGHT, ADJ):
        yield (
            f"The {thing} that the {person} {verb} yesterday was {adj}.",
            f"The {thing} that the {person} {verb} it was {adj}.",
        )


def _nesting_complementizer() -> Iterator[tuple[str, str]]:
    for (p1, _), (n2, _), (v_sg, _, v_past) in itertools.product(PEOPLE, NOUNS, INTRANSITIVE):
        if p1 == n2:
            continue
        yield (
            f"The {p1} said that the {n2} {v_past}.",
            f"The {p1} said the {n2} that {v_past}.",
        )
        yield (
            f"The {p1} knows that the {n2} {v_sg}.",
            f"The {p1} knows the that {n2} {v_sg}.",
        )


def _order_svo() -> Iterator[tuple[str, str]]:
    for (n1, _), (n2, _), (_, _, t_past) in itertools.product(NOUNS, NOUNS, TRANSITIVE):
        if n1 == n2:
            continue
        yield f"The {n1} {t_past} the {n2}.", f"The {n1} the {n2} {t_past}."


def _order_adjectives() -> Iterator[tuple[str, str]]:
    for size, color, thing in itertools.product(SIZES, COLORS, OBJECTS):
        yield f"She has a {size} {color} {thing}.", f"She has a {color} {size} {thing}."


def _order_determiner() -> Iterator[tuple[str, str]]:
    for adj, (sg, _), (v_sg, _, _) in itertools.product(ADJ, NOUNS, INTRANSITIVE):
        yield f"The {adj} {sg} {v_sg}.", f"{_cap(adj)} the {sg} {v_sg}."


def _order_negation() -> Iterator[tuple[str, str]]:
    for (sg, _), (base, _) in itertools.product(NOUNS, REGULAR):
        yield f"The {sg} does not {base}.", f"The {sg} not does {base}."


def _order_question() -> Iterator[tuple[str, str]]:
    for (sg, _), (base, _, _), wh in itertools.product(PEOPLE, IRREGULAR, ["Where", "Why", "When"]):
        yield f"{wh} did the {sg} {base} it?", f"{wh} the {sg} did {base} it?"


PARADIGMS: dict[str, list[tuple[str, Callable[[], Iterator[tuple[str, str]]]]]] = {
    "agreement": [
        ("simple", _agreement_simple),
        ("across_pp", _agreement_pp),
        ("across_relative", _agreement_relative),
        ("copula", _agreement_copula),
    ],
    "tense": [
        ("time_adverb", _tense_adverb),
        ("perfect_participle", _tense_participle),
        ("do_support", _tense_do_support),
    ],
    "clause_nesting": [
        ("center_embedding", _nesting_center),
        ("object_gap", _nesting_gap),
        ("complementizer", _nesting_complementizer),
    ],
    "word_order": [
        ("svo", _order_svo),
        ("adjective_order", _order_adjectives),
        ("determiner", _order_determiner),
        ("negation", _order_negation),
        ("question", _order_question),
    ],
}


def grammar_pairs(per_paradigm: int = PAIRS_PER_PARADIGM) -> list[MinimalPair]:
    """The suite: ``per_paradigm`` pairs of every paradigm (all of them if fewer), picked with a
    fixed seed, in a fixed order. 15 paradigms x 30 = 450 pairs by default."""
    out = []
    for category, paradigms in PARADIGMS.items():
        for name, gen in paradigms:
            pairs = list(dict.fromkeys(gen()))  # unique, in generation order
            rng = random.Random(f"deeplm-grammar-v{SUITE_VERSION}/{category}/{name}")
            picked = rng.sample(pairs, min(per_paradigm, len(pairs)))
            out += [MinimalPair(category, name, good, bad) for good, bad in picked]
    return out


def subsample(pairs: list[MinimalPair], limit: int | None) -> list[MinimalPair]:
    """At most ``limit`` pairs, spread evenly over the paradigms (deterministic)."""
    if limit is None or limit >= len(pairs):
        return pairs
    groups: dict[tuple[str, str], list[MinimalPair]] = {}
    for p in pairs:
        groups.setdefault((p.category, p.paradigm), []).append(p)
    out: list[MinimalPair] = []
    i = 0
    while len(out) < limit:
        for g in groups.values():
            if i < len(g) and len(out) < limit:
                out.append(g[i])
        i += 1
    return out


def score_pairs(
    model: Transformer,
    tokenizer: Tokenizer,
    pairs: list[MinimalPair],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Log-likelihood of both sentences of every pair; ``correct`` when good > bad."""
    seqs = []
    for p in pairs:
        seqs.append([tokenizer.bos_id] + tokenizer.encode(p.good))
        seqs.append([tokenizer.bos_id] + tokenizer.encode(p.bad))
    scores = sequence_logprobs(model, seqs, [1] * len(seqs), device, dtype, batch_size=64)
    out = []
    for i, p in enumerate(pairs):
        good, bad = scores[2 * i][0], scores[2 * i + 1][0]
        out.append(asdict(p) | {"good_logprob": good, "bad_logprob": bad, "correct": good > bad})
    return out


def evaluate_grammar(
    model: Transformer,
    tokenizer: Tokenizer,
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_pairs: int | None = None,
) -> dict[str, Any]:
    """Accuracy overall, per category and per paradigm (``max_pairs`` caps the pairs scored)."""
    pairs = subsample(grammar_pairs(), max_pairs)
    scored = score_pairs(model, tokenizer, pairs, device, dtype)

    def acc(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}

    by_cat: dict[str, list[dict[str, Any]]] = {}
    by_par: dict[str, list[dict[str, Any]]] = {}
    for r in scored:
        by_cat.setdefault(r["category"], []).append(r)
        by_par.setdefault(f"{r['category']}/{r['paradigm']}", []).append(r)
    return {
        "version": SUITE_VERSION,
        "n": len(scored),
        "accuracy": acc(scored)["accuracy"] if scored else float("nan"),
        "categories": {k: acc(v) for k, v in by_cat.items()},
        "paradigms": {k: acc(v) for k, v in by_par.items()},
        "examples": [r for r in scored if not r["correct"]][:5],
    }
