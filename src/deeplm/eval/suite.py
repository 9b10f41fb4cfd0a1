"""The evaluation suite: everything ``deeplm eval`` and the pipeline's ``evaluate`` stage measure.

For one model of a run:

* per phase, on that phase's validation windows: loss, perplexity, bits per byte
  (:mod:`deeplm.eval.bpb`);
* behavioral probes from the versioned probe file: completion, reasoning, memorisation of seen
  (train) vs unseen (val) passages (:mod:`deeplm.eval.probes`);
* the grammar suite of minimal pairs, accuracy per category (:mod:`deeplm.eval.grammar`);
* samples from the phases' prompts, and vocabulary richness of generated text next to the same
  numbers for real validation text (:mod:`deeplm.eval.richness`).

Results are one JSON-able dict (:func:`run_suite`). :func:`evaluate` is the one evaluation of a
loaded model: the suite, ``eval.json``, the Markdown report (:mod:`deeplm.eval.report`) with its
loss-curve PNGs, both files recorded as artifacts in the run's StateDB and an event with the
headline numbers. Its two callers: :func:`evaluate_checkpoint` (``deeplm eval``: the run's newest
or a given checkpoint, everything, into ``<run_dir>/eval/`` by default so the pipeline's own
report is left alone) and the pipeline's ``evaluate`` stage (the last phase's final checkpoint,
:meth:`SuiteOptions.quick` caps, into ``<run_dir>/report.md``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deeplm.atomic import atomic_write_text
from deeplm.config import RunConfig
from deeplm.data.shards import Shard, is_shard_complete
from deeplm.device import autocast_dtype
from deeplm.eval.bpb import evaluate_bpb, token_byte_lengths
from deeplm.eval.forgetting import FORGETTING_MARGIN, forgetting_matrix, forgetting_warnings
from deeplm.eval.grammar import evaluate_grammar
from deeplm.eval.probes import load_probes, run_probes
from deeplm.eval.report import render_report, write_loss_plots
from deeplm.eval.richness import richness, word_counts, words
from deeplm.eval.samples import sample_texts
from deeplm.eval.timing import training_timing
from deeplm.export.loading import LoadedModel, load_model
from deeplm.model.transformer import Transformer
from deeplm.run.layout import RunLayout
from deeplm.run.state_db import StateDB
from deeplm.tokenizer import Tokenizer

RESULTS_VERSION = 1
SUITE_PARTS = ("bpb", "forgetting", "probes", "grammar", "samples", "richness")
GENERIC_PROMPTS = ["The", "It was", "In the", "When the", "She said", "There is"]


@dataclass
class SuiteOptions:
    """Caps for the suite (None = everything / the run's own setting)."""

    eval_batches: int | None = None  # validation batches per phase (None: phase.eval_batches)
    grammar_pairs: int | None = None  # None: the whole suite (450 pairs)
    probe_items: int | None = None  # per multiple-choice section
    memorization_passages: int | None = None  # per phase and side (None: the probe file's)
    probe_file: str | None = None  # None: the packaged probes_v1.json
    sample_tokens: int = 64
    richness_samples: int = 16
    richness_tokens: int = 96
    reference_chars: int = 2_000_000  # training text read for the rare-word reference
    seed: int = 0
    # nats a later phase may add to an earlier phase's val loss before a warning
    forgetting_margin: float = FORGETTING_MARGIN

    @classmethod
    def quick(cls) -> SuiteOptions:
        """The pipeline's ``evaluate`` stage: a few seconds on the tiny preset on CPU."""
        return cls(
            grammar_pairs=150,
            memorization_passages=8,
            richness_samples=8,
            richness_tokens=64,
            reference_chars=1_000_000,
        )


def _docs(path: Path, max_docs: int | None = None) -> list[str]:
    out: list[str] = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["text"])
            if max_docs is not None and len(out) >= max_docs:
                break
    return out


def _reference_texts(run_dir: Path, cfg: RunConfig, n_words: int) -> list[str]:
    """Pieces of validation text (~``n_words`` words over the phases), for richness baselines."""
    per_phase = max(1, n_words // len(cfg.phases))
    out = []
    for phase in cfg.phases:
        got = 0
        for doc in _docs(RunLayout(run_dir).docs(phase.name, "val"), 200):
            piece = " ".join(doc.split()[:80])
            out.append(piece)
            got += len(words(piece))
            if got >= per_phase:
                break
    return out


def run_suite(
    model: Transformer,
    tokenizer: Tokenizer,
    run_cfg: RunConfig | None,
    run_dir: Path | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    options: SuiteOptions | None = None,
    on_part: Callable[[str, int, int], None] = lambda part, done, total: None,
) -> dict[str, Any]:
    """Run every evaluation on ``model``; parts that need the run's data (per-phase bpb,
    memorisation, rare-word reference) are skipped when ``run_dir`` has none. ``on_part(name,
    parts done, parts in all)`` is called as each part starts (progress)."""
    opt = options or SuiteOptions()
    parts = iter(enumerate(SUITE_PARTS))
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"version": RESULTS_VERSION, "options": asdict(opt)}
    model.eval()
    has_run = run_cfg is not None and run_dir is not None
    t0 = 0.0

    def start(name: str) -> None:
        nonlocal t0
        for i, part in parts:
            if part == name:
                on_part(name, i, len(SUITE_PARTS))
                break
        t0 = time.perf_counter()

    def took(name: str) -> None:
        timings[name] = time.perf_counter() - t0

    start("bpb")
    shards: dict[str, tuple[Shard, Shard]] = {}
    results["per_phase"] = {}
    if has_run:
        shards = _phase_shards(run_dir, run_cfg, tokenizer)
        results["per_phase"] = _phase_bpb(model, tokenizer, run_cfg, shards, device, dtype, opt)
    took("bpb")
    if has_run:
        start("forgetting")
        matrix = forgetting_matrix(Path(run_dir), run_cfg, tokenizer, device, dtype)
        results["forgetting"] = {
            "matrix": matrix,
            "margin": opt.forgetting_margin,
            "warnings": forgetting_warnings(matrix, run_cfg, opt.forgetting_margin),
        }
        took("forgetting")
    start("probes")
    results["probes"] = run_probes(
        model,
        tokenizer,
        device,
        dtype,
        shards=shards,
        probes=load_probes(opt.probe_file),
        max_items=opt.probe_items,
        passages=opt.memorization_passages,
    )
    took("probes")
    start("grammar")
    results["grammar"] = evaluate_grammar(model, tokenizer, device, dtype, opt.grammar_pairs)
    took("grammar")
    start("samples")
    prompts = [p for phase in run_cfg.phases for p in phase.prompts] if run_cfg else []
    prompts = prompts or GENERIC_PROMPTS[:2]
    results["samples"] = sample_texts(  # config prompts are trusted: chat tokens allowed
        model, tokenizer, prompts, opt.sample_tokens, device, seed=opt.seed, allow_special=True
    )
    took("samples")
    start("richness")
    run = (run_dir, run_cfg) if has_run else None
    results["richness"] = _richness(model, tokenizer, prompts, run, device, opt)
    took("richness")
    results["seconds"] = timings
    return results


def _phase_shards(
    run_dir: Path, cfg: RunConfig, tokenizer: Tokenizer
) -> dict[str, tuple[Shard, Shard]]:
    """Every phase's complete (train, val) shards made with ``tokenizer``, by phase name."""
    shards = {}
    for phase in cfg.phases:
        prefixes = [RunLayout(run_dir).shard(phase.name, s) for s in ("train", "val")]
        if all(is_shard_complete(p, tokenizer.hash) for p in prefixes):
            train, val = (Shard.open(p, tokenizer.hash) for p in prefixes)
            shards[phase.name] = (train, val)
    return shards


def _phase_bpb(
    model: Transformer,
    tokenizer: Tokenizer,
    cfg: RunConfig,
    shards: dict[str, tuple[Shard, Shard]],
    device: torch.device,
    dtype: torch.dtype | None,
    opt: SuiteOptions,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte on each phase's validation windows."""
    table = token_byte_lengths(tokenizer)
    per_phase = {}
    for phase in cfg.phases:
        if phase.name not in shards:
            continue
        seq_len = min(phase.seq_len, model.cfg.max_seq_len)
        n_batches = opt.eval_batches or phase.eval_batches
        val = shards[phase.name][1]
        per_phase[phase.name] = evaluate_bpb(
            model, val, table, seq_len, phase.micro_batch, n_batches, device, dtype
        )
    return per_phase


def _richness(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    run: tuple[Path, RunConfig] | None,
    device: torch.device,
    opt: SuiteOptions,
) -> dict[str, Any]:
    """Vocabulary richness of generated samples, next to real validation text of similar size
    (with the run's training text as the rare-word reference, when there is a run)."""
    pool = prompts + GENERIC_PROMPTS
    rich_prompts = [pool[i % len(pool)] for i in range(opt.richness_samples)]
    generated = sample_texts(
        model, tokenizer, rich_prompts, opt.richness_tokens, device, seed=opt.seed + 1000
    )
    texts = [g["completion"] for g in generated]
    reference = None
    reference_texts: list[str] = []
    if run is not None:
        run_dir, run_cfg = run
        train_docs = (
            doc
            for phase in run_cfg.phases
            for doc in _docs(RunLayout(run_dir).docs(phase.name, "train"))
        )
        reference = word_counts(train_docs, opt.reference_chars) or None
        n_words = sum(len(t.split()) for t in texts)
        reference_texts = _reference_texts(run_dir, run_cfg, n_words)
    return {
        "model": richness(texts, reference),
        **({"reference": richness(reference_texts, reference)} if reference_texts else {}),
    }


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of :func:`run_suite`'s results (for events and stage outputs)."""
    p = results.get("probes", {})
    g = results.get("grammar", {})
    mem = (p.get("memorization") or {}).get("phases", {})
    return {
        "per_phase": results.get("per_phase", {}),
        "forgetting_warnings": results.get("forgetting", {}).get("warnings", []),
        "probes": {
            "completion_accuracy": p.get("completion", {}).get("accuracy"),
            "reasoning_accuracy": p.get("reasoning", {}).get("accuracy"),
            "memorization_gap": {k: v.get("gap") for k, v in mem.items()},
        },
        "grammar": {
            "accuracy": g.get("accuracy"),
            "n": g.get("n"),
            "categories": {k: v["accuracy"] for k, v in g.get("categories", {}).items()},
        },
        "richness": {
            k: results.get("richness", {}).get("model", {}).get(k)
            for k in ("distinct_1", "distinct_2", "type_token_ratio", "rare_word_rate")
        },
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write results as pretty JSON, atomically (NaN is written as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    atomic_write_text(path, json.dumps(clean(results), indent=2, sort_keys=True) + "\n")


def evaluate(
    loaded: LoadedModel,
    options: SuiteOptions | None,
    json_path: Path,
    report_path: Path,
    db: StateDB | None = None,
    producer: str = "eval",
    title: str | None = None,
    on_part: Callable[[str, int, int], None] = lambda part, done, total: None,
) -> dict[str, Any]:
    """Evaluate a run's loaded model: the suite, its results as ``json_path`` with the
    loss-curve PNGs beside it, the Markdown report as ``report_path``; with ``db``, both files
    are recorded as artifacts of ``producer`` and an ``eval`` event logs the headline numbers.
    Returns the results with ``paths``."""
    cfg, run_dir = loaded.run_cfg, loaded.run_dir
    if cfg is None or run_dir is None:
        raise ValueError(f"{loaded.source}: evaluation needs a run's model, not an export folder")
    dtype = autocast_dtype(loaded.device, cfg.train.precision)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_suite(
        loaded.model, loaded.tokenizer, cfg, run_dir, loaded.device, dtype, options, on_part
    )
    results["checkpoint"] = str(loaded.source)
    results["total_seconds"] = time.perf_counter() - t0
    results["training"] = training_timing(run_dir, cfg)
    pngs = write_loss_plots(run_dir, cfg, json_path.parent)
    write_results(json_path, results)
    rel = [(name, os.path.relpath(p, report_path.parent)) for name, p in pngs]
    text = render_report(cfg, results, loaded.tokenizer, loaded.source, db, rel, title)
    atomic_write_text(report_path, text)
    if db is not None:
        meta = {"checkpoint": str(loaded.source)}
        db.record_artifact(json_path, "eval", producer, meta)
        db.record_artifact(report_path, "report", producer, meta)
        db.log_event(producer, "eval", f"evaluated {loaded.source}", summary(results))
    results["paths"] = {"eval_json": str(json_path), "report": str(report_path)}
    return results


def evaluate_checkpoint(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    options: SuiteOptions | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    log: Any = print,
) -> dict[str, Any]:
    """``deeplm eval``: :func:`evaluate` (the full suite by default) on a run's newest (or given)
    checkpoint, into ``out_dir`` (default ``<run_dir>/eval``): ``eval.json`` + ``report.md``
    (+ loss-curve PNGs), recorded in the StateDB with an event. Returns the results with
    ``paths``."""
    layout = RunLayout(run_dir)
    if layout.state_db.is_file():  # a damaged state database fails now, not after the suite
        StateDB(layout.state_db, readonly=True).close()
    loaded = load_model(run_dir=layout.root, checkpoint=checkpoint, device=device)
    for line in loaded.warnings:
        log(f"[eval] warning: {line}")
    assert loaded.run_cfg is not None
    out = Path(out_dir) if out_dir is not None else layout.eval_dir
    log(f"[eval] {loaded.source} on {loaded.device}")
    db = StateDB(layout.state_db) if layout.state_db.is_file() else None
    try:
        title = f"deeplm evaluation: {loaded.run_cfg.name}"
        return evaluate(loaded, options, out / "eval.json", out / "report.md", db, "eval", title)
    finally:
        if db is not None:
            db.close()
