"""The pipeline's stages: the functions both orchestrators call (the local driver,
:mod:`deeplm.pipeline.local`, and the Temporal activities, :mod:`deeplm.pipeline.temporal`).

Each stage is a plain idempotent function ``stage(ctx, ...) -> dict`` that
1. checks the StateDB and the files on disk and returns at once when its work is done and intact,
2. otherwise resumes from the cursor the StateDB holds for it,
3. writes its outputs atomically and records them (path, bytes, sha256, producer).

Neither orchestrator holds any stage logic of its own; the order of the stages is
:mod:`deeplm.pipeline.plan`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from deeplm.atomic import atomic_replace, remove_stale_temps
from deeplm.config import PhaseConfig, RunConfig, SourceConfig
from deeplm.data.clean import CleanStats, Deduper, clean_documents, split_for, split_score
from deeplm.data.instructions import iter_instructions, scrub_special
from deeplm.data.kinds import excluded_kind
from deeplm.data.loader import n_windows
from deeplm.data.shards import (
    Shard,
    ShardCursor,
    ShardError,
    ShardMeta,
    ShardResumeError,
    ShardStopped,
    is_shard_complete,
    remove_leftovers,
    tokenize_to_shard,
)
from deeplm.data.sources import Document, SourceError, SourceStats, iter_source
from deeplm.device import select_device
from deeplm.eval.forgetting import warning_line
from deeplm.eval.suite import SuiteOptions, summary
from deeplm.eval.suite import evaluate as evaluate_model
from deeplm.export.loading import LoadedModel, load_checkpoint
from deeplm.pipeline.integrity import move_aside
from deeplm.pipeline.plan import StageSpec
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import SPLITS, RunLayout
from deeplm.run.state_db import StateDB
from deeplm.tokenizer import Tokenizer, train_tokenizer
from deeplm.train import distributed
from deeplm.train.trainer import PhaseOutcome, PhaseTrainer, TrainHooks


class StageStopped(Exception):
    """A stage stopped early on request (cancel/interrupt); its cursor is saved."""


@dataclass
class RunContext:
    """What every activity gets: where the run lives, its config, its StateDB, and callbacks."""

    run_dir: Path
    cfg: RunConfig
    db: StateDB
    progress: Callable[[dict[str, Any]], None] = lambda info: None
    should_stop: Callable[[], bool] = lambda: False
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)


def _done_and_intact(ctx: RunContext, stage: str, files: list[Path]) -> bool:
    row = ctx.db.stage(stage)
    if row.status != "done":
        return False
    if all(ctx.db.artifact_ok(f) for f in files):
        return True
    ctx.db.reset_stage(stage, "an output file is missing or changed; redoing the stage")
    return False


def _record(
    ctx: RunContext, path: Path, kind: str, producer: str, meta: dict | None = None
) -> None:
    ctx.db.record_artifact(path, kind, producer, meta)


# ---------------------------------------------------------------------------- prepare


def source_documents(
    src: SourceConfig,
    base_dir: Path,
    stats: SourceStats,
    log: Callable[[str], None],
    used: list[str],
) -> Iterator[Document]:
    """Documents of ``src``; if it cannot be opened (e.g. the hub is unreachable) and it has
    fallbacks, say so clearly and read the fallbacks instead (their labels go into ``used``)."""
    it = iter_source(src, base_dir, stats)
    try:
        first = next(it)
    except StopIteration:
        return
    except SourceError as exc:
        if not src.fallback:
            raise
        names = ", ".join(f"{f.kind}:{f.name or f.path}" for f in src.fallback)
        log(f"[prepare] {exc} -- using the fallback source(s) instead: {names}")
        for fb in src.fallback:
            used.append(f"{fb.kind}:{fb.name or fb.path}")
            yield from source_documents(fb, base_dir, stats, log, used)
        return
    yield first
    yield from it


def _write_jsonl_atomic(path: Path, docs: Iterator[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for text in docs:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    atomic_replace(tmp, path)
    return n


def _iter_jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)["text"]


def prepare(ctx: RunContext) -> dict[str, Any]:
    """Read every phase's sources, clean/filter/dedup, split train/val, write docs JSONL.

    Work is committed per source (``data/<phase>/parts/<i>.<split>.jsonl``); the cursor records
    the sources finished, so a killed run redoes at most the source it was reading.
    """
    stage = "prepare"
    cfg, layout = ctx.cfg, ctx.layout
    outputs_files = [layout.docs(p.name, s) for p in cfg.phases for s in SPLITS]
    if _done_and_intact(ctx, stage, outputs_files):
        return ctx.db.stage(stage).outputs | {"skipped": True}
    row = ctx.db.start_stage(stage)
    done_parts: dict[str, Any] = dict(row.cursor).get("parts", {})
    report: dict[str, Any] = {}
    try:
        for phase_idx in range(len(cfg.phases)):
            report[cfg.phases[phase_idx].name] = _prepare_phase(ctx, phase_idx, done_parts)
    except StageStopped as exc:
        ctx.db.pause_stage(stage, str(exc))
        raise
    except Exception as exc:
        ctx.db.fail_stage(stage, f"{type(exc).__name__}: {exc}")
        raise
    ctx.db.finish_stage(stage, {"phases": report})
    for phase in cfg.phases:  # per-source parts only serve a resume of this stage
        shutil.rmtree(layout.doc_parts(phase.name), ignore_errors=True)
    return {"phases": report}


def _prepare_phase(ctx: RunContext, phase_idx: int, done_parts: dict[str, Any]) -> dict[str, Any]:
    """One phase of ``prepare``: each source not yet done into its parts (the cursor records
    it), then the phase's split files assembled from them. Returns the phase's report."""
    phase = ctx.cfg.phases[phase_idx]
    dedup = Deduper()
    phase_report: dict[str, Any] = {"sources": []}
    for i in range(len(phase.sources)):
        key = f"{phase.name}/{i}"
        part = {s: ctx.layout.doc_part(phase.name, i, s) for s in SPLITS}
        if key in done_parts and all(p.is_file() for p in part.values()):
            for s in SPLITS:  # rebuild the dedup memory from what is already written
                for text in _iter_jsonl_texts(part[s]):
                    dedup.seen(text)
            phase_report["sources"].append(done_parts[key])
            continue
        if ctx.should_stop():
            raise StageStopped(f"prepare stopped before {key}")
        info = _prepare_source(ctx, phase, i, dedup)
        done_parts[key] = info
        phase_report["sources"].append(info)
        ctx.db.set_cursor("prepare", {"parts": done_parts})
        ctx.db.log_event(
            "prepare",
            "progress",
            f"{key} ({info['source']}) prepared",
            {"train_docs": info["train_docs"], "val_docs": info["val_docs"]},
        )
    _assemble_phase(ctx, phase_idx, phase_report)
    return phase_report


def _source_docs(
    ctx: RunContext,
    phase: PhaseConfig,
    src: SourceConfig,
    dedup: Deduper,
    stats: tuple[SourceStats, CleanStats],
    used: list[str],
) -> Iterator[Document]:
    """A source's documents as the phase keeps them: read, cleaned (or instruction pairs),
    deduplicated, without excluded text kinds, special tokens scrubbed from fine-tuning text."""
    sstats, cstats = stats
    base_dir = Path(ctx.cfg.base_dir or ".")
    if src.format == "instruction":
        docs: Iterator[Document] = (
            d
            for d in iter_instructions(src, base_dir, sstats)
            if not (ctx.cfg.clean.dedup and dedup.seen(d.text))
        )
    else:
        docs = clean_documents(
            source_documents(src, base_dir, sstats, ctx.log, used),
            ctx.cfg.clean,
            cstats,
            deduper=dedup,
        )
    for doc in docs:
        kind = excluded_kind(doc.text, phase.exclude_kinds)
        if kind is not None:
            cstats.drop(f"kind:{kind}")
            continue
        if phase.kind == "finetune" and src.format == "text":
            doc = Document(scrub_special(doc.text), doc.source, doc.doc_id)
        yield doc


def _prepare_source(ctx: RunContext, phase: PhaseConfig, i: int, dedup: Deduper) -> dict[str, Any]:
    """Source ``i`` of ``phase`` into its train/val parts (temporary files renamed into place
    once complete). Returns what was read, cleaned and kept."""
    src = phase.sources[i]
    ctx.log(f"[prepare] {phase.name}: reading {src.kind}:{src.name or src.path}")
    sstats, cstats = SourceStats(), CleanStats()
    used: list[str] = []
    part = {s: ctx.layout.doc_part(phase.name, i, s) for s in SPLITS}
    tmp_files = {s: p.with_name(f".{p.name}.tmp-{os.getpid()}") for s, p in part.items()}
    ctx.layout.doc_parts(phase.name).mkdir(parents=True, exist_ok=True)
    handles = {s: open(tmp_files[s], "w", encoding="utf-8") for s in SPLITS}  # noqa: SIM115
    counts = {s: 0 for s in SPLITS}
    try:
        for doc in _source_docs(ctx, phase, src, dedup, (sstats, cstats), used):
            split = split_for(doc.text, phase.val_fraction, ctx.cfg.seed)
            handles[split].write(json.dumps({"text": doc.text}, ensure_ascii=False))
            handles[split].write("\n")
            counts[split] += 1
            if (counts["train"] + counts["val"]) % 500 == 0:
                ctx.progress(
                    {
                        "stage": "prepare",
                        "phase": phase.name,
                        "source": i,
                        "docs": counts["train"] + counts["val"],
                    }
                )
        for s in SPLITS:
            handles[s].flush()
            os.fsync(handles[s].fileno())
    finally:
        for h in handles.values():
            h.close()
    for s in SPLITS:
        atomic_replace(tmp_files[s], part[s])
    info = {
        "source": f"{src.kind}:{src.name or src.path}",
        "read": asdict(sstats),
        "fallback_used": used,
        "clean": asdict(cstats),
        "train_docs": counts["train"],
        "val_docs": counts["val"],
    }
    if counts["train"] + counts["val"] == 0:
        info["warning"] = dropped_warning(info, ctx.cfg.clean.min_chars)
        ctx.log(f"[prepare] warning: {phase.name}: {info['warning']}")
    return info


# A phase's validation split should hold at least one window at its longest context. Tokens
# are not known before the tokenizer exists: this many characters per token is a generous bound
# (byte-level BPE on English prose averages about 4).
VAL_CHARS_PER_TOKEN = 8


def _val_top_up(ctx: RunContext, phase: PhaseConfig) -> set[str]:
    """Training documents (by text) that move to validation because the hash split left it too
    small for one window: those nearest the val side of the split first, while the training
    split keeps at least as much text as validation needs. A pure function of the parts, so a
    re-run after a kill picks the same ones. Usually empty."""
    need = VAL_CHARS_PER_TOKEN * (max(phase_contexts(phase)) + 1)
    parts = {
        s: [ctx.layout.doc_part(phase.name, i, s) for i in range(len(phase.sources))]
        for s in SPLITS
    }
    val_chars = sum(len(t) for p in parts["val"] for t in _iter_jsonl_texts(p))
    if val_chars >= need:
        return set()
    train = [
        (split_score(t, ctx.cfg.seed), t) for p in parts["train"] for t in _iter_jsonl_texts(p)
    ]
    train_chars = sum(len(t) for _, t in train)
    moved: set[str] = set()
    for _, text in sorted(train):
        if val_chars >= need or train_chars - len(text) < need:
            break
        moved.add(text)
        val_chars += len(text)
        train_chars -= len(text)
    if moved:
        ctx.log(
            f"[prepare] {phase.name}: {len(moved)} training documents moved to validation "
            f"({val_chars:,} characters now) so that it holds a window at context "
            f"{max(phase_contexts(phase))}"
        )
    return moved


def _assemble_phase(ctx: RunContext, phase_idx: int, phase_report: dict[str, Any]) -> None:
    """The phase's split files from its parts (atomic, cheap), topped up as
    :func:`_val_top_up` says; the training split ends with the replayed documents of earlier
    phases (``phase.replay``). Recorded as ``docs`` artifacts."""
    phase = ctx.cfg.phases[phase_idx]
    moved = _val_top_up(ctx, phase)
    for s in SPLITS:
        parts = [ctx.layout.doc_part(phase.name, i, s) for i in range(len(phase.sources))]
        out = ctx.layout.docs(phase.name, s)
        replayed = [0]
        texts = _phase_texts(ctx, phase_idx, parts, s, replayed, moved)
        n = _write_jsonl_atomic(out, texts)
        n -= replayed[0]
        if replayed[0]:
            phase_report["replay_docs"] = replayed[0]
        if n == 0:
            srcs = ", ".join(f"{x.kind}:{x.name or x.path}" for x in phase.sources)
            raise ValueError(
                f"phase {phase.name!r}: no {s} documents left after cleaning "
                f"(sources: {srcs}); add text or lower clean.min_chars"
            )
        meta = {"phase": phase.name, "split": s, "docs": n + replayed[0]}
        _record(ctx, out, "docs", "prepare", meta | {"replay_docs": replayed[0]})
        phase_report[f"{s}_docs"] = n + replayed[0]


def dropped_warning(info: dict[str, Any], min_chars: int) -> str:
    """Why a source contributed no document at all, from its read and clean counters."""
    read, clean = info["read"], info["clean"]
    reasons = dict(read.get("skipped", {}))
    for reason, n in clean.get("dropped", {}).items():
        reasons[reason] = reasons.get(reason, 0) + n
    if clean.get("duplicates"):
        reasons["duplicate"] = clean["duplicates"]
    if not read.get("docs"):
        why = "it yielded no documents"
    else:
        why = f"all {read['docs']} documents were removed"
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    hint = f" (clean.min_chars = {min_chars})" if any("short" in k for k in reasons) else ""
    return f"source {info['source']} was dropped entirely: {why}" + (
        f" ({detail}){hint}" if detail else ""
    )


def _unit_hash(text: str, seed: int, salt: str) -> float:
    """A deterministic number in [0, 1) for a document (the replay sample's coin)."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def replay_texts(run_dir: Path, cfg: RunConfig, phase_idx: int, own_chars: int) -> Iterator[str]:
    """A deterministic sample of the earlier phases' training documents for ``phase.replay``:
    ``replay / (1 - replay)`` times the phase's own training characters, shared equally between
    the earlier phases (all of a phase's documents when it has fewer)."""
    phase = cfg.phases[phase_idx]
    if phase_idx == 0 or not phase.replay:
        return
    target = own_chars * phase.replay / (1.0 - phase.replay) / phase_idx
    for earlier in cfg.phases[:phase_idx]:
        path = RunLayout(run_dir).docs(earlier.name, "train")
        total = sum(len(t) for t in _iter_jsonl_texts(path))
        keep = min(1.0, target / max(1, total))
        for text in _iter_jsonl_texts(path):
            if _unit_hash(text, cfg.seed, phase.name) < keep:
                yield scrub_special(text) if phase.kind == "finetune" else text


def _phase_texts(
    ctx: RunContext,
    phase_idx: int,
    parts: list[Path],
    split: str,
    replayed: list[int],
    moved: set[str],
) -> Iterator[str]:
    """A phase's documents of one split from its parts (``moved`` training documents go to
    validation instead), then (train only) the replayed ones, counted in ``replayed[0]``."""
    own_chars = 0
    for p in parts:
        for text in _iter_jsonl_texts(p):
            if split == "train" and text in moved:
                continue
            own_chars += len(text)
            yield text
    if split != "train":
        if moved:  # in the training parts' order
            phase = ctx.cfg.phases[phase_idx]
            for i in range(len(phase.sources)):
                part = ctx.layout.doc_part(phase.name, i, "train")
                yield from (t for t in _iter_jsonl_texts(part) if t in moved)
        return
    for text in replay_texts(ctx.run_dir, ctx.cfg, phase_idx, own_chars):
        replayed[0] += 1
        yield text


def own_train_docs(ctx: RunContext, phase_name: str) -> int | None:
    """How many of a phase's training documents are its own (the rest are replayed), or None
    when prepare recorded no replay for it."""
    info = ctx.db.stage("prepare").outputs.get("phases", {}).get(phase_name, {})
    if not info.get("replay_docs"):
        return None
    return int(info["train_docs"]) - int(info["replay_docs"])


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer_activity(ctx: RunContext) -> dict[str, Any]:
    """Train the BPE tokenizer on every phase's training documents."""
    stage = "tokenizer"
    path = ctx.layout.tokenizer
    if _done_and_intact(ctx, stage, [path]):
        return ctx.db.stage(stage).outputs | {"skipped": True}
    ctx.db.start_stage(stage)
    try:

        def texts() -> Iterator[str]:
            for phase in ctx.cfg.phases:
                if phase.kind == "pretrain":  # the user's fine-tuning data never shapes the ids
                    docs = _iter_jsonl_texts(ctx.layout.docs(phase.name, "train"))
                    yield from itertools.islice(docs, own_train_docs(ctx, phase.name))

        t0 = time.perf_counter()
        ctx.log(f"[tokenizer] training byte-level BPE, vocab {ctx.cfg.tokenizer.vocab_size}")
        tok = train_tokenizer(texts(), ctx.cfg.tokenizer, path)
        outputs = {
            "path": str(path),
            "hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "seconds": time.perf_counter() - t0,
        }
        _record(ctx, path, "tokenizer", stage, {"hash": tok.hash})
    except Exception as exc:
        ctx.db.fail_stage(stage, f"{type(exc).__name__}: {exc}")
        raise
    ctx.db.finish_stage(stage, outputs)
    return outputs


def load_run_tokenizer(ctx: RunContext) -> Tokenizer:
    path = ctx.layout.tokenizer
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no tokenizer yet (run the pipeline first)")
    return Tokenizer.load(path)


# ---------------------------------------------------------------------------- tokenize


def tokenize(ctx: RunContext, phase_idx: int) -> dict[str, Any]:
    """Tokenize one phase's train and val docs into memmap shards, resuming from
    ``last_doc_index``."""
    phase = ctx.cfg.phases[phase_idx]
    stage = f"tokenize:{phase.name}"
    tok = load_run_tokenizer(ctx)
    layout = ctx.layout
    bins = [Path(f"{layout.shard(phase.name, s)}.bin") for s in SPLITS]
    if _done_and_intact(ctx, stage, bins) and all(
        is_shard_complete(layout.shard(phase.name, s), tok.hash) for s in SPLITS
    ):
        return ctx.db.stage(stage).outputs | {"skipped": True}
    row = ctx.db.start_stage(stage)
    cursors: dict[str, Any] = dict(row.cursor)
    outputs: dict[str, Any] = {}
    try:
        for split in SPLITS:
            prefix = layout.shard(phase.name, split)
            if is_shard_complete(prefix, tok.hash):
                remove_leftovers(prefix)  # a kill between the metadata and the cleanup
                meta = Shard.open(prefix, tok.hash).meta
            else:
                meta = _tokenize_split(ctx, phase_idx, split, tok, cursors)
            _record(
                ctx,
                Path(f"{prefix}.bin"),
                "shard",
                stage,
                {
                    "phase": phase.name,
                    "split": split,
                    "tokens": meta.n_tokens,
                    "tokenizer_hash": tok.hash,
                },
            )
            outputs[split] = {"tokens": meta.n_tokens, "docs": meta.n_docs}
            ctx.log(f"[{stage}] {split}: {meta.n_docs:,} documents -> {meta.n_tokens:,} tokens")
    except ShardStopped as exc:
        ctx.db.pause_stage(stage, "tokenize stopped on request")
        raise StageStopped(str(exc)) from exc
    except Exception as exc:
        ctx.db.fail_stage(stage, f"{type(exc).__name__}: {exc}")
        raise
    ctx.db.finish_stage(stage, outputs)
    return outputs


def _tokenize_split(
    ctx: RunContext, phase_idx: int, split: str, tok: Tokenizer, cursors: dict[str, Any]
) -> ShardMeta:
    """One split's shard, from the cursor in ``cursors`` (updated and saved as batches are
    committed); a cursor that cannot be resumed restarts from the first document."""
    phase = ctx.cfg.phases[phase_idx]
    stage = f"tokenize:{phase.name}"
    c = cursors.get(split)
    start = ShardCursor(c["last_doc_index"], c["n_tokens"]) if c else None
    if start is not None:
        ctx.log(f"[tokenize] {phase.name}/{split}: resuming at document {start.doc_index}")

    def commit(cur: ShardCursor) -> None:
        cursors[split] = {"last_doc_index": cur.doc_index, "n_tokens": cur.n_tokens}
        ctx.db.set_cursor(stage, cursors)
        ctx.progress({"stage": stage, "split": split, **cursors[split]})

    def run(cursor: ShardCursor | None) -> ShardMeta:
        return tokenize_to_shard(
            ctx.layout.docs(phase.name, split),
            tok,
            ctx.layout.shard(phase.name, split),
            cursor=cursor,
            on_progress=commit,
            should_stop=ctx.should_stop,
            allow_special=phase.kind == "finetune",
        )

    try:
        return run(start)
    except ShardResumeError as exc:
        ctx.db.log_event(
            stage, "restart", f"{split}: cannot resume ({exc}); tokenizing from the first document"
        )
        return run(None)


# ---------------------------------------------------------------------------- train


def open_verified_shard(ctx: RunContext, phase_idx: int, split: str, tok: Tokenizer) -> Shard:
    """Open a phase's shard for training after a full check: sizes, tokenizer, the sha256 of its
    data against its metadata and of its ``.bin`` against the StateDB record. A shard that fails
    is moved aside (``.corrupt``), the tokenize stage is reset and the shard rebuilt in place
    (tokenization is deterministic, so the rebuilt shard is byte-identical to the original)."""
    phase = ctx.cfg.phases[phase_idx]
    prefix = ctx.layout.shard(phase.name, split)
    bin_path = Path(f"{prefix}.bin")
    try:
        shard = Shard.open(prefix, tok.hash)
        shard.verify()
        if ctx.db.artifact(bin_path) is not None and not ctx.db.artifact_ok(
            bin_path, verify_hash=True
        ):
            raise ShardError(f"{bin_path}: sha256 differs from the one in the StateDB")
        return shard
    except ShardError as exc:
        problem = str(exc)
    for path in (bin_path, Path(f"{prefix}.idx.npy"), Path(f"{prefix}.json")):
        if path.exists():
            move_aside(path)
    stage = f"tokenize:{phase.name}"
    ctx.log(f"[integrity] {problem}; shard moved aside (.corrupt), rebuilding it")
    ctx.db.reset_stage(stage, f"corrupt shard: {problem}")
    tokenize(ctx, phase_idx)
    return Shard.open(prefix, tok.hash)


def phase_contexts(phase: PhaseConfig) -> list[int]:
    """Every context length a phase trains or evaluates at (its curriculum and ``seq_len``)."""
    return sorted({c.seq_len for c in phase.curriculum} | {phase.seq_len})


def check_shard_windows(ctx: RunContext, tok: Tokenizer) -> None:
    """Before any training step: every phase not yet trained must have train and val shards
    holding at least one window (``context + 1`` tokens) at every context it will use, so a
    too-small fine-tune set fails now, not after the earlier phases have trained."""
    problems = []
    for i, phase in enumerate(ctx.cfg.phases):
        if ctx.db.stage(f"train:{phase.name}").status == "done":
            continue
        for split in SPLITS:
            prefix = ctx.layout.shard(phase.name, split)
            if not is_shard_complete(prefix, tok.hash):
                continue
            n_tokens = Shard.open(prefix, tok.hash).meta.n_tokens
            short = [c for c in phase_contexts(phase) if n_windows(n_tokens, c) < 1]
            if short:
                problems.append(
                    f"phase {phase.name!r} (phases[{i}]): its {split} shard holds {n_tokens} "
                    f"tokens, fewer than one window of {short[-1] + 1} tokens at context "
                    f"{short[-1]}"
                )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Add data to the phase, raise its val_fraction (val), or "
            "lower its seq_len and curriculum contexts; checked before the first training step "
            "so no phase trains first"
        )


def train_phase(ctx: RunContext, phase_idx: int) -> dict[str, Any]:
    """Train phase ``phase_idx`` from its newest checkpoint (or the previous phase's final one)."""
    cfg = ctx.cfg
    phase = cfg.phases[phase_idx]
    stage = f"train:{phase.name}"
    tok = load_run_tokenizer(ctx)
    final = ctx.layout.final_checkpoint(cfg, phase_idx)
    if ctx.db.stage(stage).status == "done" and final is not None:
        return ctx.db.stage(stage).outputs | {"skipped": True}
    init_from = None
    if phase_idx > 0:
        init_from = ctx.layout.final_checkpoint(cfg, phase_idx - 1)
        if init_from is None:
            raise RuntimeError(
                f"phase {phase.name!r} needs the final checkpoint of phase "
                f"{cfg.phases[phase_idx - 1].name!r}, which does not exist yet"
            )
    check_shard_windows(ctx, tok)
    shards = tuple(open_verified_shard(ctx, phase_idx, s, tok) for s in SPLITS)
    ctx.db.start_stage(stage)
    steps = phase.epoch_capped(shards[0].meta.n_tokens).total_steps
    ctx.db.upsert_phase(phase.name, phase_idx, status="running", total_steps=steps)
    try:
        if distributed.world_size_of(cfg.train) > 1 and not distributed.under_torchrun():
            # several devices/nodes: torchrun runs the ranks; this process stays the only
            # StateDB writer (rank 0 reports progress through the job's output)
            hooks = _train_hooks(ctx, phase_idx)
            outcome = distributed.launch_phase(ctx.run_dir, cfg, phase_idx, hooks)
        else:
            train_shard, val_shard = shards
            trainer = PhaseTrainer(
                cfg,
                phase_idx,
                ctx.run_dir,
                tok,
                train_shard,
                val_shard,
                init_from=init_from,
                hooks=_train_hooks(ctx, phase_idx),
            )
            outcome = trainer.run()
    except Exception as exc:
        ctx.db.fail_stage(stage, f"{type(exc).__name__}: {exc}")
        ctx.db.upsert_phase(phase.name, phase_idx, status="failed")
        raise
    if outcome.status == "stopped":
        _record_stopped(ctx, phase_idx, outcome)
    return _record_done(ctx, phase_idx, outcome, tok)


def _train_hooks(ctx: RunContext, phase_idx: int) -> TrainHooks:
    """How a training phase reports to the StateDB: cursor, phase row, events, progress."""
    phase = ctx.cfg.phases[phase_idx]
    stage = f"train:{phase.name}"

    def on_progress(info: dict[str, Any]) -> None:
        cursor = {"last_step_count": info["step"], "last_checkpoint": info.get("last_checkpoint")}
        ctx.db.set_cursor(stage, cursor)
        fields: dict[str, Any] = {"step": info["step"], "tokens": info["tokens"]}
        if info.get("last_checkpoint"):
            fields["last_checkpoint"] = info["last_checkpoint"]
        if "loss" in info:
            fields["metrics"] = {k: info[k] for k in ("loss", "lr", "tokens_per_s") if k in info}
        ctx.db.upsert_phase(phase.name, phase_idx, **fields)
        ctx.progress({"stage": stage, **info})

    return TrainHooks(
        on_progress=on_progress,
        should_stop=ctx.should_stop,
        log=ctx.log,
        on_event=lambda kind, msg, data: ctx.db.log_event(stage, kind, msg, data),
    )


def _record_stopped(ctx: RunContext, phase_idx: int, outcome: PhaseOutcome) -> NoReturn:
    """A phase stopped on request: record where (its checkpoint) and raise StageStopped."""
    phase = ctx.cfg.phases[phase_idx]
    stage = f"train:{phase.name}"
    ctx.db.upsert_phase(
        phase.name,
        phase_idx,
        status="paused",
        step=outcome.step,
        last_checkpoint=outcome.last_checkpoint,
    )
    ctx.db.set_cursor(
        stage, {"last_step_count": outcome.step, "last_checkpoint": outcome.last_checkpoint}
    )
    ctx.db.pause_stage(stage, f"stopped at step {outcome.step}")
    raise StageStopped(f"{stage} stopped at step {outcome.step}")


def _record_done(
    ctx: RunContext, phase_idx: int, outcome: PhaseOutcome, tok: Tokenizer
) -> dict[str, Any]:
    """A finished phase: its final checkpoint recorded as an artifact, the phase row and the
    stage done. Returns the stage's outputs."""
    phase = ctx.cfg.phases[phase_idx]
    stage = f"train:{phase.name}"
    outputs = {
        "final_checkpoint": outcome.final_checkpoint,
        "steps": outcome.step,
        "tokens": outcome.tokens,
        "first_val_loss": outcome.first_val_loss,
        "val_loss": outcome.val_loss,
        "tokens_per_s": outcome.tokens_per_s,
        "samples": outcome.samples,
        "stop_reason": outcome.stop_reason,
        "rollbacks": outcome.rollbacks,
    }
    weights = Path(outcome.final_checkpoint) / ckpt.WEIGHTS
    _record(
        ctx,
        weights,
        "checkpoint",
        stage,
        {"phase": phase.name, "step": outcome.step, "tokenizer_hash": tok.hash},
    )
    ctx.db.upsert_phase(
        phase.name,
        phase_idx,
        status="done",
        step=outcome.step,
        tokens=outcome.tokens,
        final_checkpoint=outcome.final_checkpoint,
        last_checkpoint=outcome.final_checkpoint,
        metrics={
            "first_val_loss": outcome.first_val_loss,
            "val_loss": outcome.val_loss,
            "tokens_per_s": outcome.tokens_per_s,
        },
    )
    ctx.db.finish_stage(stage, outputs)
    return outputs


# ---------------------------------------------------------------------------- evaluate


def evaluate(ctx: RunContext) -> dict[str, Any]:
    """Evaluate the run's final model on every phase's validation shard; write the report."""
    stage = "evaluate"
    if _done_and_intact(ctx, stage, [ctx.layout.report]):
        return ctx.db.stage(stage).outputs | {"skipped": True}
    ctx.db.start_stage(stage)
    try:
        outputs = evaluate_final_model(ctx)
    except Exception as exc:
        ctx.db.fail_stage(stage, f"{type(exc).__name__}: {exc}")
        raise
    ctx.db.finish_stage(stage, outputs)
    return outputs


def evaluate_final_model(ctx: RunContext) -> dict[str, Any]:
    """The suite (:meth:`SuiteOptions.quick` caps unless ``ctx.extra["eval_options"]``) on the
    last phase's final checkpoint, written to ``report.md`` + ``report/eval.json`` (recorded as
    artifacts of ``evaluate``, with an ``eval`` event). Returns the headline numbers."""
    cfg, layout = ctx.cfg, ctx.layout
    tok = load_run_tokenizer(ctx)
    final = layout.final_checkpoint(cfg, len(cfg.phases) - 1)
    if final is None:
        raise RuntimeError("evaluate needs the last phase's final checkpoint; train first")
    device = select_device(cfg.train.device)
    model = load_checkpoint(cfg, final, device)
    loaded = LoadedModel(model, tok, cfg.model, cfg.name, final, device, cfg, ctx.run_dir)
    options = ctx.extra.get("eval_options") or SuiteOptions.quick()
    t0 = time.perf_counter()

    def on_part(part: str, done: int, total: int) -> None:
        cursor = {"part": part, "parts_done": done, "parts_total": total}
        ctx.db.set_cursor("evaluate", cursor)
        ctx.progress({"stage": "evaluate", **cursor})

    eval_json = layout.report_dir / "eval.json"
    results = evaluate_model(
        loaded, options, eval_json, layout.report, ctx.db, "evaluate", on_part=on_part
    )
    for w in results.get("forgetting", {}).get("warnings", []):
        ctx.log(f"[evaluate] {warning_line(w)}")
    return summary(results) | {
        "samples": results["samples"],
        "report": str(layout.report),
        "eval_json": str(eval_json),
        "seconds": time.perf_counter() - t0,
    }


ACTIVITIES: dict[str, Callable[..., dict[str, Any]]] = {
    "prepare": prepare,
    "train_tokenizer": train_tokenizer_activity,
    "tokenize": tokenize,
    "train_phase": train_phase,
    "evaluate": evaluate,
}


def stage_folders(run_dir: Path, cfg: RunConfig, spec: StageSpec) -> list[tuple[Path, bool]]:
    """The folders a stage alone writes into, as ``(folder, recursive)`` (checkpoint folders
    clean up after themselves in :mod:`deeplm.run.checkpoint`)."""
    layout = RunLayout(run_dir)
    if spec.activity == "prepare":
        return [(layout.data_dir, True)]
    if spec.activity == "train_tokenizer":
        return [(layout.tokenizer_dir, False)]
    if spec.activity == "tokenize" and spec.arg is not None:
        return [(layout.shards_dir(cfg.phases[spec.arg].name), False)]
    if spec.activity == "evaluate":
        return [(layout.root, False), (layout.report_dir, False)]
    return []


def run_stage(ctx: RunContext, spec: StageSpec) -> dict[str, Any]:
    """Run one stage. Temp files that a killed earlier attempt left in the stage's own folders
    are removed first: they would never be finished or cleaned otherwise."""
    for folder, recursive in stage_folders(ctx.run_dir, ctx.cfg, spec):
        for path in remove_stale_temps(folder, recursive):
            ctx.log(f"[{spec.name}] removed an unfinished file of an earlier attempt: {path}")
    fn = ACTIVITIES[spec.activity]
    return fn(ctx) if spec.arg is None else fn(ctx, spec.arg)
