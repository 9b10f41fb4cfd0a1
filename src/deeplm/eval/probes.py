"""Behavioral probes from a versioned file, scored by log-likelihood (no sampling involved).

The probe file (default ``deeplm/eval/data/probes_v1.json``, shipped with the package) holds:

* ``completion``: short completions ("The capital of France is" -> " Paris" among four
  candidates);
* ``reasoning``: 2-3-step inferences posed as multiple choice;
* ``memorization``: how many passages of how many tokens to compare between the training data
  (seen) and the validation data (unseen).

Multiple choice: each candidate is scored by the sum of its tokens' log-probabilities after
``<bos>`` + prompt (:func:`score_candidates`); an item is correct when its answer has the highest
score. Results report accuracy next to chance (the mean of ``1 / n_candidates``) and the mean
rank of the answer. Memorisation reports the mean per-token loss of seen and unseen passages, the
gap (unseen - seen: near 0 for a model that generalises, large for one that memorised), and the
fraction of (seen, unseen) pairs where the seen passage has the lower loss (0.5 = no difference).

A released probe file never changes: results record its ``version`` and sha256.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deeplm.atomic import sha256_bytes
from deeplm.data.shards import Shard
from deeplm.device import autocast_context
from deeplm.model.transformer import Transformer
from deeplm.tokenizer import Tokenizer

DEFAULT_PROBES = "probes_v1.json"


def load_probes(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read and check a probe file (default: the packaged ``probes_v1.json``)."""
    if path is None:
        raw = resources.files("deeplm.eval").joinpath("data", DEFAULT_PROBES).read_bytes()
        where = DEFAULT_PROBES
    else:
        raw = Path(path).read_bytes()
        where = str(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(data.get("version"), int):
        raise ValueError(f"{where}: needs an integer 'version'")
    for section in ("completion", "reasoning"):
        for i, item in enumerate(data.get(section, [])):
            cands = item.get("candidates")
            if not item.get("prompt") or not isinstance(cands, list) or len(cands) < 2:
                raise ValueError(f"{where}: {section}[{i}] needs a prompt and >= 2 candidates")
            if not 0 <= int(item.get("answer", -1)) < len(cands):
                raise ValueError(f"{where}: {section}[{i}].answer is not a candidate index")
    data["sha256"] = sha256_bytes(raw)
    return data


@torch.no_grad()
def sequence_logprobs(
    model: Transformer,
    seqs: Sequence[Sequence[int]],
    score_from: Sequence[int],
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
) -> list[tuple[float, int]]:
    """For each sequence, ``(sum of log p(token_i | tokens_<i), count)`` over the positions
    ``i >= score_from`` (``score_from >= 1``). Sequences longer than the context keep their last
    ``max_seq_len`` tokens. Batched with right padding (causal attention: padding never affects
    the scored positions)."""
    if len(seqs) != len(score_from):
        raise ValueError("seqs and score_from must have the same length")
    max_len = model.cfg.max_seq_len
    items = []
    for s, start in zip(seqs, score_from):
        s = list(s)
        if start < 1 or start >= len(s):
            raise ValueError(f"score_from {start} must be in [1, {len(s) - 1}]")
        cut = max(0, len(s) - max_len)
        items.append((s[cut:], max(1, start - cut)))
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # less padding
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            width = max(len(items[i][0]) for i in chunk)
            x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for r, i in enumerate(chunk):
                x[r, : len(items[i][0])] = torch.tensor(items[i][0])
            x = x.to(device)
            with autocast_context(device, dtype):
                logits, _ = model(x)
            logp = F.log_softmax(logits.float()[:, :-1], dim=-1)
            tok_lp = logp.gather(-1, x[:, 1:, None]).squeeze(-1).double().cpu()
            for r, i in enumerate(chunk):
                seq, start = items[i]
                vals = tok_lp[r, start - 1 : len(seq) - 1]
                out[i] = (float(vals.sum()), int(vals.numel()))
    finally:
        model.train(was_training)
    return out


def score_candidates(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    candidates: Sequence[str],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Sum of log-probabilities of each candidate continuation after ``<bos>`` + prompt."""
    ctx = [tokenizer.bos_id] + tokenizer.encode(prompt)
    seqs = [ctx + tokenizer.encode(c) for c in candidates]
    return [lp for lp, _ in sequence_logprobs(model, seqs, [len(ctx)] * len(seqs), device, dtype)]


def run_choice_probes(
    model: Transformer,
    tokenizer: Tokenizer,
    items: Sequence[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Score multiple-choice items; per-item results and accuracy / chance / mean rank."""
    seqs: list[list[int]] = []
    starts: list[int] = []
    spans = []
    for item in items:
        ctx = [tokenizer.bos_id] + tokenizer.encode(item["prompt"])
        first = len(seqs)
        for cand in item["candidates"]:
            seqs.append(ctx + tokenizer.encode(cand))
            starts.append(len(ctx))
        spans.append((first, len(seqs)))
    scores = sequence_logprobs(model, seqs, starts, device, dtype) if seqs else []
    results = []
    for item, (a, b) in zip(items, spans):
        s = [lp for lp, _ in scores[a:b]]
        answer = int(item["answer"])
        rank = 1 + sum(1 for v in s if v > s[answer])
        results.append(
            {
                "id": item.get("id", item["prompt"][:30]),
                "prompt": item["prompt"],
                "answer": item["candidates"][answer],
                "predicted": item["candidates"][int(np.argmax(s))],
                "correct": rank == 1,
                "rank": rank,
                "scores": s,
                **({"steps": item["steps"]} if "steps" in item else {}),
            }
        )
    n = len(results)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in results) / n if n else float("nan"),
        "chance": sum(1 / len(i["candidates"]) for i in items) / n if n else float("nan"),
        "mean_rank": sum(r["rank"] for r in results) / n if n else float("nan"),
        "items": results,
    }


def sample_passages(shard: Shard, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` passages of ``length`` tokens at seeded random offsets of ``shard`` (fewer if the
    shard is too small; never overlapping)."""
    total = len(shard)
    slots = total // length
    if slots == 0:
        return []
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(slots, size=min(n, slots), replace=False))
    return [np.asarray(shard.tokens[p * length : (p + 1) * length]).tolist() for p in picks]


def memorization_probe(
    model: Transformer,
    seen: Sequence[Sequence[int]],
    unseen: Sequence[Sequence[int]],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Mean per-token loss (nats) of seen vs unseen passages (the first token is context)."""

    def losses(passages: Sequence[Sequence[int]]) -> list[float]:
        res = sequence_logprobs(model, passages, [1] * len(passages), device, dtype)
        return [-lp / n for lp, n in res]

    ls, lu = losses(seen), losses(unseen)
    if not ls or not lu:
        return {"n_seen": len(ls), "n_unseen": len(lu)}
    pairs = [(a < b) + 0.5 * (a == b) for a in ls for b in lu]
    return {
        "n_seen": len(ls),
        "n_unseen": len(lu),
        "seen_loss": float(np.mean(ls)),
        "unseen_loss": float(np.mean(lu)),
        "gap": float(np.mean(lu) - np.mean(ls)),
        "seen_lower_fraction": float(np.mean(pairs)),
    }


def run_probes(
    model: Transformer,
    tokenizer: Tokenizer,
    device: torch.device,
    dtype: torch.dtype | None = None,
    shards: dict[str, tuple[Shard, Shard]] | None = None,
    probes: dict[str, Any] | None = None,
    max_items: int | None = None,
    passages: int | None = None,
) -> dict[str, Any]:
    """Every probe of ``probes`` (default: the packaged file). ``shards`` maps a phase name to
    its ``(train, val)`` shards for the memorisation probe; ``max_items`` caps the items per
    multiple-choice section and ``passages`` the passages per phase and side."""
    probes = probes if probes is not None else load_probes()
    out: dict[str, Any] = {
        "probe_file": {"name": probes.get("name"), "version": probes["version"]},
        "sha256": probes.get("sha256"),
    }
    for section in ("completion", "reasoning"):
        items = list(probes.get(section, []))[:max_items]
        out[section] = run_choice_probes(model, tokenizer, items, device, dtype)
    spec = probes.get("memorization") or {}
    if shards and spec:
        n = passages if passages is not None else int(spec.get("passages", 16))
        length = min(int(spec.get("passage_tokens", 64)), model.cfg.max_seq_len)
        seed = int(spec.get("seed", 0))
        mem: dict[str, Any] = {}
        for phase, (train, val) in shards.items():
            seen = sample_passages(train, n, length, seed)
            unseen = sample_passages(val, n, length, seed)
            mem[phase] = memorization_probe(model, seen, unseen, device, dtype)
        out["memorization"] = {"passage_tokens": length, "phases": mem}
    return out
