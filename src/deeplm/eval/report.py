"""The run report: final model evaluated on every phase's validation data, samples, stage
timings, and loss curves rendered to PNG, written to ``<run_dir>/report.md``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deeplm.atomic import atomic_write_text
from deeplm.data.shards import Shard
from deeplm.eval.perplexity import evaluate_loss, perplexity
from deeplm.eval.samples import sample_texts
from deeplm.train import checkpoint as ckpt
from deeplm.train.device import autocast_dtype, select_device
from deeplm.train.metrics import read_jsonl
from deeplm.train.trainer import build_model

if TYPE_CHECKING:
    from deeplm.workflows.activities import RunContext


def plot_losses(run_dir: Path, phases: list[str], out: Path) -> bool:
    """Render train and validation loss per phase to one PNG; False when there is nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    drawn = False
    for ax, name in zip(axes[0], phases):
        recs = read_jsonl(run_dir / "metrics" / f"{name}.jsonl")
        tr = [(r["tokens"], r["loss"]) for r in recs if r.get("loss") is not None]
        va = [(r["tokens"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), label="train", lw=1)
            drawn = True
        if va:
            ax.plot(*zip(*va), "o-", label="validation", ms=3)
            drawn = True
        ax.set_title(name)
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


def evaluate_run(ctx: RunContext) -> dict[str, Any]:
    from deeplm.workflows.activities import final_checkpoint_of, load_run_tokenizer, shard_prefix

    cfg, run_dir = ctx.cfg, ctx.run_dir
    tok = load_run_tokenizer(ctx)
    last = len(cfg.phases) - 1
    final = final_checkpoint_of(ctx, last)
    if final is None:
        raise RuntimeError("evaluate needs the last phase's final checkpoint; train first")
    device = select_device(cfg.train.device)
    dtype = autocast_dtype(device, cfg.train.precision)
    model = build_model(cfg, cfg.seed)
    ckpt.load_weights(final, model)
    model.to(device).eval()
    t0 = time.perf_counter()
    per_phase = {}
    for phase in cfg.phases:
        val = Shard.open(shard_prefix(run_dir, phase.name, "val"), tok.hash)
        loss = evaluate_loss(
            model, val, phase.seq_len, phase.micro_batch, phase.eval_batches, device, dtype
        )
        per_phase[phase.name] = {"val_loss": loss, "val_ppl": perplexity(loss)}
    prompts = [p for phase in cfg.phases for p in phase.prompts]
    torch.manual_seed(cfg.seed)
    samples = sample_texts(
        model, tok, prompts, max(64, cfg.phases[-1].sample_tokens), device, seed=cfg.seed
    )
    png = run_dir / "report" / "loss_curves.png"
    plot_losses(run_dir, [p.name for p in cfg.phases], png)

    lines = [f"# deeplm run report: {cfg.name}", ""]
    lines += [
        f"Final checkpoint: `{final}`",
        f"Tokenizer: `{tok.hash[:16]}` " f"(vocab {tok.vocab_size})",
        "",
    ]
    lines += ["## Stages", "", "| stage | status | wall time (s) |", "|---|---|---|"]
    for row in ctx.db.stages():
        lines.append(f"| {row.name} | {row.status} | {row.elapsed_s:.1f} |")
    lines += [
        "",
        "## Phases",
        "",
        "| phase | steps | tokens | val loss at start | val loss at end | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for p in ctx.db.phases():
        m = p.metrics
        first = m.get("first_val_loss")
        end = m.get("val_loss")
        tps = m.get("tokens_per_s")
        lines.append(
            f"| {p.name} | {p.step} | {p.tokens:,} | " f"{first:.4f} | {end:.4f} | {tps:,.0f} |"
            if None not in (first, end, tps)
            else f"| {p.name} | {p.step} | {p.tokens:,} | - | - | - |"
        )
    lines += [
        "",
        "## Final model on each phase's validation data",
        "",
        "| phase | val loss | perplexity |",
        "|---|---|---|",
    ]
    for name, r in per_phase.items():
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} |")
    lines += [
        "",
        "## Loss curves",
        "",
        "![loss curves](report/loss_curves.png)",
        "",
        "## Samples (temperature 0.8, top-k 50)",
        "",
    ]
    for s in samples:
        completion = s["completion"].replace("\n", " ")
        lines.append(f"- **{s['prompt']}**{completion}")
    lines.append("")
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return {
        "per_phase": per_phase,
        "samples": samples,
        "report": str(run_dir / "report.md"),
        "seconds": time.perf_counter() - t0,
    }
