"""The evaluation report: renders the results of the suite (:mod:`deeplm.eval.suite`) as
Markdown — loss, perplexity and bits per byte on every phase's validation data, forgetting,
behavioral probes, grammar accuracy, vocabulary richness, a table of samples, stage timings — and
the loss curves as PNG (all phases in one figure plus one per phase).

:func:`deeplm.eval.suite.evaluate` writes it: the pipeline's ``evaluate`` stage to
``<run_dir>/report.md`` (results in ``<run_dir>/report/eval.json``), ``deeplm eval`` to
``<run_dir>/eval/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deeplm.config import RunConfig
from deeplm.eval.forgetting import warning_line
from deeplm.run.layout import RunLayout
from deeplm.run.state_db import StateDB
from deeplm.tokenizer import Tokenizer


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn or invalid line is skipped; none: [])."""
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_losses(
    run_dir: Path, phases: list[str], out: Path, replayed: frozenset[str] = frozenset()
) -> bool:
    """Render train and validation loss per phase to one PNG; False when there is nothing.
    Phases in ``replayed`` train partly on earlier phases' text, and their train curve says so."""
    # imported here: matplotlib takes a second to import, and only plotting needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    drawn = False
    for ax, name in zip(axes[0], phases):
        recs = read_jsonl(RunLayout(run_dir).metrics(name))
        tr = [(r["tokens"], r["loss"]) for r in recs if r.get("loss") is not None]
        va = [(r["tokens"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        unw = [(r["tokens"], r["loss_unweighted"]) for r in recs if "loss_unweighted" in r]
        if tr:
            # with rare-token weighting the optimised loss counts rare tokens up to
            # rare_token_max_weight times: it sits above validation; the plain loss is beside it
            label = "train (rare-token weighted)" if unw else "train"
            if name in replayed:
                label += ", with replay"
            ax.plot(*zip(*tr), label=label, lw=1)
            drawn = True
        if unw:
            ax.plot(*zip(*unw), label="train (unweighted)", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="validation", ms=3)
            drawn = True
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 800k, 1.6M: labels never collide
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return drawn


def write_loss_plots(run_dir: Path, cfg: RunConfig, out_dir: Path) -> list[tuple[str, Path]]:
    """``loss_curves.png`` (every phase side by side) and ``loss_<phase>.png`` per phase in
    ``out_dir``; returns ``[(title, path)]``."""
    names = [p.name for p in cfg.phases]
    replayed = frozenset(p.name for p in cfg.phases if p.replay)
    out = [("all phases", out_dir / "loss_curves.png")]
    plot_losses(run_dir, names, out[0][1], replayed)
    for name in names:
        path = out_dir / f"loss_{name}.png"
        plot_losses(run_dir, [name], path, replayed)
        out.append((name, path))
    return out


def _cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _f(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, fmt)


def render_report(
    cfg: RunConfig,
    results: dict[str, Any],
    tokenizer: Tokenizer,
    checkpoint: Path | str,
    db: StateDB | None,
    pngs: list[tuple[str, str]],
    title: str | None = None,
) -> str:
    """The Markdown report of one suite run; ``pngs`` is ``[(title, path relative to the
    report)]``."""
    lines = [f"# {title or f'deeplm run report: {cfg.name}'}", ""]
    lines += [
        f"Checkpoint: `{checkpoint}`",
        f"Tokenizer: `{tokenizer.hash[:16]}` (vocab {tokenizer.vocab_size})",
        "",
    ]
    if db is not None:
        lines += ["## Stages", "", "| stage | status | wall time (s) |", "|---|---|---|"]
        for row in db.stages():
            status = "writing this report" if row.status == "running" else row.status
            lines.append(f"| {row.name} | {status} | {row.elapsed_s:.1f} |")
        lines += [
            "",
            "## Phases",
            "",
            "| phase | steps | tokens | val loss at start | val loss at end | tokens/s |",
            "|---|---|---|---|---|---|",
        ]
        for p in db.phases():
            m = p.metrics
            first, end, tps = m.get("first_val_loss"), m.get("val_loss"), m.get("tokens_per_s")
            lines.append(
                f"| {p.name} | {p.step} | {p.tokens:,} | {first:.4f} | {end:.4f} | {tps:,.0f} |"
                if None not in (first, end, tps)
                else f"| {p.name} | {p.step} | {p.tokens:,} | - | - | - |"
            )
        lines.append("")
    lines += _training_lines(results.get("training", {}))
    lines += [
        "## Final model on each phase's validation data",
        "",
        "| phase | val loss (nats/token) | perplexity | bits per byte | bytes/token | tokens |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.get("per_phase", {}).items():
        lines.append(
            f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} | {_f(r['bpb'])} | "
            f"{_f(r['bytes_per_token'], '.2f')} | {r['tokens']:,} |"
        )
    lines += _forgetting_lines(results.get("forgetting", {}))
    lines += ["", "## Loss curves", ""]
    for name, rel in pngs:
        lines += [f"![loss curves: {name}]({rel})", ""]
    lines += [
        "## Samples (temperature 0.8, top-k 50)",
        "",
        "| prompt | completion |",
        "|---|---|",
    ]
    for s in results.get("samples", []):
        lines.append(f"| **{_cell(s['prompt'])}** | {_cell(s['completion'])} |")
    lines += _probe_lines(results.get("probes", {}))
    lines += _grammar_lines(results.get("grammar", {}))
    lines += _richness_lines(results.get("richness", {}))
    secs = results.get("seconds", {})
    if secs:
        lines += ["", "## Evaluation time", ""]
        lines.append(", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
    lines.append("")
    return "\n".join(lines)


def _training_lines(timing: dict[str, Any]) -> list[str]:
    """Per phase (and per curriculum stage where a phase had several): the seconds of training
    steps and apart from them, tokens/s and MFU over the training seconds, peak memory."""
    if not timing:
        return []
    lines = [
        "## Training time",
        "",
        "Training seconds exclude the first step of each graph state (compile and warm-up), "
        "evaluations, samples and checkpoints, which are listed apart; tokens/s and MFU are over "
        "the training seconds.",
        "",
        "| phase | context | frozen | training (s) | compile (s) | eval + samples (s) | "
        "checkpoints (s) | tokens/s | MFU | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in timing.items():
        stages = t.get("stages", [])
        seq = ", ".join(str(s["seq_len"]) for s in stages) if stages else "-"
        frozen = ", ".join(str(s["frozen_layers"]) for s in stages) if stages else "-"
        lines.append(_timing_row(name, seq, frozen, t))
        if len(stages) > 1:
            for s in stages:
                lines.append(_timing_row(f"  {name}", s["seq_len"], s["frozen_layers"], s))
    lines.append("")
    return lines


def _timing_row(name: str, seq: Any, frozen: Any, t: dict[str, Any]) -> str:
    evals = None
    if "eval_s" in t:
        evals = t["eval_s"] + t.get("samples_s", 0.0)
    mfu = t.get("mfu")
    return (
        f"| {name} | {seq} | {frozen} | {_f(t.get('train_s'), '.1f')} | "
        f"{_f(t.get('compile_s'), '.1f')} | {_f(evals, '.1f')} | "
        f"{_f(t.get('checkpoint_s'), '.1f')} | {_f(t.get('tokens_per_s'), ',.0f')} | "
        f"{'-' if mfu is None else f'{100 * mfu:.1f} %'} | {_f(t.get('peak_memory_gb'), '.1f')} |"
    )


def _forgetting_lines(f: dict[str, Any]) -> list[str]:
    """The forgetting table (rows: data of a phase; columns: the final model of a phase) and one
    warning line per phase that raised an earlier phase's val loss by more than the margin."""
    matrix = f.get("matrix") or {}
    later = list(dict.fromkeys(j for row in matrix.values() for j in row))
    if len(later) < 2:
        return []
    lines = [
        "",
        "## Forgetting across phases",
        "",
        "Val loss (nats/token) on each phase's validation data (rows) of each phase's final "
        f"model (columns). Margin: {f['margin']:g} nats.",
        "",
        "| data \\ model after | " + " | ".join(later) + " |",
        "|---|" + "---|" * len(later),
    ]
    for name, row in matrix.items():
        lines.append(f"| {name} | " + " | ".join(_f(row.get(j)) for j in later) + " |")
    lines.append("")
    warnings = f.get("warnings") or []
    for w in warnings:
        lines.append(f"- **{warning_line(w)}**")
    if not warnings:
        lines.append(f"No phase raised an earlier phase's val loss by more than {f['margin']:g}.")
    return lines


def _probe_lines(p: dict[str, Any]) -> list[str]:
    if not p:
        return []
    info = p.get("probe_file", {})
    lines = [
        "",
        "## Behavioral probes",
        "",
        f"Probe file `{info.get('name')}` version {info.get('version')} "
        f"(sha256 `{str(p.get('sha256'))[:12]}`). Multiple choice by log-likelihood of each "
        "candidate continuation.",
        "",
        "| probe set | items | accuracy | chance | mean rank of the answer |",
        "|---|---|---|---|---|",
    ]
    for section in ("completion", "reasoning"):
        r = p.get(section)
        if r and r["n"]:
            lines.append(
                f"| {section} | {r['n']} | {r['accuracy']:.1%} | {r['chance']:.1%} | "
                f"{r['mean_rank']:.2f} |"
            )
    for section in ("completion", "reasoning"):
        r = p.get(section)
        if not r or not r["n"]:
            continue
        lines += [
            "",
            f"<details><summary>{section} items</summary>",
            "",
            "| id | prompt | answer | model's choice | rank |",
            "|---|---|---|---|---|",
        ]
        for it in r["items"]:
            mark = "" if it["correct"] else " ✗"
            lines.append(
                f"| {it['id']} | {_cell(it['prompt'])} | {_cell(it['answer'])} | "
                f"{_cell(it['predicted'])}{mark} | {it['rank']} |"
            )
        lines += ["", "</details>"]
    mem = p.get("memorization")
    if mem and mem.get("phases"):
        lines += [
            "",
            f"Memorisation: mean loss of {mem['passage_tokens']}-token passages seen in training "
            "vs held out (gap near 0: the model generalises; large: it memorised).",
            "",
            "| phase | passages | seen loss | unseen loss | gap | P(seen < unseen) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in mem["phases"].items():
            if "seen_loss" not in r:
                continue
            lines.append(
                f"| {name} | {r['n_seen']}+{r['n_unseen']} | {r['seen_loss']:.4f} | "
                f"{r['unseen_loss']:.4f} | {r['gap']:+.4f} | {r['seen_lower_fraction']:.2f} |"
            )
    return lines


def _grammar_lines(g: dict[str, Any]) -> list[str]:
    if not g or not g.get("n"):
        return []
    lines = [
        "",
        "## Grammar (minimal pairs)",
        "",
        f"{g['n']} pairs (suite version {g['version']}), overall accuracy **{g['accuracy']:.1%}** "
        "(chance 50%): the grammatical sentence must get the higher log-likelihood.",
        "",
        "| category | pairs | accuracy |",
        "|---|---|---|",
    ]
    for name, r in g["categories"].items():
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.1%} |")
    lines += ["", "| paradigm | pairs | accuracy |", "|---|---|---|"]
    for name, r in g["paradigms"].items():
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.1%} |")
    if g.get("examples"):
        lines += ["", "Some pairs the model gets wrong (preferred the second):", ""]
        for ex in g["examples"]:
            lines.append(f"- {_cell(ex['good'])} / *{_cell(ex['bad'])}*")
    return lines


def _richness_lines(r: dict[str, Any]) -> list[str]:
    if not r or "model" not in r:
        return []
    cols = [("generated samples", r["model"])]
    if "reference" in r:
        cols.append(("validation text", r["reference"]))
    lines = [
        "",
        "## Vocabulary richness",
        "",
        "| measure | " + " | ".join(c for c, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    keys = [
        ("words", "words", "d"),
        ("distinct-1", "distinct_1", ".3f"),
        ("distinct-2", "distinct_2", ".3f"),
        ("distinct-3", "distinct_3", ".3f"),
        ("type-token ratio", "type_token_ratio", ".3f"),
        ("MATTR (window 50)", "mattr_50", ".3f"),
        ("rare-word rate (outside top 1000)", "rare_word_rate", ".3f"),
        ("out-of-vocabulary rate", "oov_rate", ".3f"),
    ]
    for label, key, fmt in keys:
        if any(key in c for _, c in cols):
            lines.append(f"| {label} | " + " | ".join(_f(c.get(key), fmt) for _, c in cols) + " |")
    return lines
