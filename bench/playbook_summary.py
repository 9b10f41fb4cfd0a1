"""The figures of one whole playbook run, as Markdown and JSON (``bench/gpu_playbook.sh``).

Reads what the run and the script left behind, computes nothing it cannot read:
* ``deeplm status --json`` (``--status``): each stage's wall time, each phase's steps, tokens and
  val loss at its start and end;
* the phases' metrics (``metrics/<phase>.jsonl``, through :mod:`deeplm.eval.timing`): per phase
  the training seconds apart from compile, evaluation, samples and checkpoints, tokens/s and MFU
  overall and per curriculum stage, peak memory (also while the run is still training);
* the evaluate stage's ``report/eval.json`` (or ``deeplm eval``'s): the val loss of each phase's
  final model on every phase's data (``forgetting``) and the final model's samples;
* optionally the answers of the served model (``--serve``, ``bench/ask_served.py``), the
  ``deeplm export --verify`` output (``--export-log``), the GPU line (``--gpu``) and
  ``bench/trace_trainer.py``'s summary (``--trace``: where a training step's time goes, and
  whether the host or the GPU holds it back).

    python bench/playbook_summary.py runs/60m --status out/status.json --serve out/serve.json \
        --export-log out/export.log --gpu out/gpu.txt --md out/summary.md --json out/summary.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from deeplm.eval.report import read_jsonl
from deeplm.eval.timing import phase_timing


def _load(path: str | Path | None) -> Any:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def _eval_json(run_dir: Path) -> dict[str, Any]:
    for rel in ("report/eval.json", "eval/eval.json"):
        data = _load(run_dir / rel)
        if data is not None:
            return data
    return {}


def _phase_samples(run_dir: Path, phase: str, n: int = 3) -> list[dict[str, Any]]:
    """The last ``n`` samples the training loop wrote for ``phase``."""
    path = run_dir / "metrics" / f"{phase}.samples.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-n:]


def summarize(
    run_dir: Path,
    status: dict,
    serve: dict | None,
    export_log: str,
    gpu: str,
    trace: dict | None = None,
) -> dict:
    ev = _eval_json(run_dir)
    stages = {s["name"]: s for s in status.get("stages", [])}
    phases = []
    for p in status.get("phases", []):
        t = phase_timing(read_jsonl(run_dir / "metrics" / f"{p['name']}.jsonl")) or {}
        wall = stages.get(f"train:{p['name']}", {}).get("elapsed_s")
        known = sum(t.get(k, 0.0) or 0.0 for k in ("train_s", "compile_s", "eval_s"))
        known += sum(t.get(k, 0.0) or 0.0 for k in ("samples_s", "checkpoint_s"))
        phases.append(
            {
                "name": p["name"],
                "status": p["status"],
                "steps": p["step"],
                "tokens": p["tokens"],
                "wall_s": wall,
                "other_s": None if wall is None else wall - known,
                "val_loss_start": p["metrics"].get("first_val_loss"),
                "val_loss_end": p["metrics"].get("val_loss"),
                **{k: v for k, v in t.items()},
                "samples": _phase_samples(run_dir, p["name"]),
            }
        )
    diff = re.search(r"max \|logit difference\| ([0-9.eE+-]+)", export_log or "")
    train_s = sum(p.get("train_s") or 0.0 for p in phases)
    tokens = sum(p["tokens"] for p in phases)
    return {
        "gpu": gpu.strip(),
        "run_dir": str(run_dir),
        "stages": {name: s.get("elapsed_s") for name, s in stages.items()},
        "phases": phases,
        "total": {
            "tokens": tokens,
            "train_s": train_s,
            "tokens_per_s": tokens / train_s if train_s else None,
            "compile_s": sum(p.get("compile_s") or 0.0 for p in phases),
            "eval_samples_s": sum(
                (p.get("eval_s") or 0.0) + (p.get("samples_s") or 0.0) for p in phases
            ),
            "checkpoint_s": sum(p.get("checkpoint_s") or 0.0 for p in phases),
            "phases_wall_s": sum(p["wall_s"] or 0.0 for p in phases),
            "pipeline_wall_s": sum(v or 0.0 for v in (s.get("elapsed_s") for s in stages.values())),
        },
        "forgetting": ev.get("forgetting", {}),
        "final_samples": ev.get("samples", [])[:4],
        "export_max_logit_diff": float(diff.group(1)) if diff else None,
        "serve": serve,
        "trace": _trace_figures(trace),
    }


#: a step whose host needs this share of the step to issue it leaves the GPU waiting
HOST_BOUND_SHARE = 0.9


def _trace_figures(trace: dict | None) -> dict | None:
    """The headline of bench/trace_trainer.py's summary: step times, host issue share, kernel
    time by kind, the largest issuers of GPU idle time, and whether the step is host-bound."""
    if not trace:
        return None
    synced = trace.get("synced") or {}
    gpu = trace.get("gpu_step_ms") or trace.get("host_step_ms") or {}
    share = synced.get("issue_share")
    issuers = (trace.get("gaps") or {}).get("by_issuer") or {}
    return {
        "phase": trace.get("phase"),
        "plan": trace.get("plan"),
        "step_ms_p50": gpu.get("p50"),
        "tokens_per_s_p50": (
            trace["tokens_per_step"] / gpu["p50"] * 1000 if gpu.get("p50") else None
        ),
        "host_issue_ms": synced.get("host_issue_ms"),
        "synced_step_ms": synced.get("step_ms"),
        "host_bound": None if share is None else share >= HOST_BOUND_SHARE,
        "kernel_ms_per_step": (trace.get("profile") or {}).get("kernel_ms_per_step"),
        "kernel_ms_by_kind": (trace.get("profile") or {}).get("by_kind_ms", {}),
        "idle_issuers_ms": {k: v["ms_per_step"] for k, v in list(issuers.items())[:5]},
    }


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(s: dict[str, Any]) -> str:
    tot = s["total"]
    lines = [f"# Playbook run: {s['run_dir']}", "", f"GPU: {s['gpu'] or 'unknown'}", ""]
    lines += [
        f"**{tot['tokens']:,} tokens trained in {_f(tot['train_s'], '.1f')} s of training steps "
        f"({_f(tot['tokens_per_s'], ',.0f')} tokens/s)**; apart from them: compile "
        f"{tot['compile_s']:.1f} s, evaluation and samples {tot['eval_samples_s']:.1f} s, "
        f"checkpoints {tot['checkpoint_s']:.1f} s. The training stages took "
        f"{tot['phases_wall_s']:.1f} s of wall time, the whole pipeline "
        f"{tot['pipeline_wall_s']:.1f} s.",
        "",
        "| phase | tokens | wall (s) | training (s) | compile (s) | eval + samples (s) | "
        "checkpoints (s) | other (s) | tokens/s | MFU | peak GB | val loss start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in s["phases"]:
        ev = (p.get("eval_s") or 0.0) + (p.get("samples_s") or 0.0)
        mfu = p.get("mfu")
        lines.append(
            f"| {p['name']} | {p['tokens']:,} | {_f(p['wall_s'], '.1f')} | "
            f"{_f(p.get('train_s'), '.1f')} | {_f(p.get('compile_s'), '.1f')} | {ev:.1f} | "
            f"{_f(p.get('checkpoint_s'), '.1f')} | {_f(p.get('other_s'), '.1f')} | "
            f"{_f(p.get('tokens_per_s'), ',.0f')} | {'-' if mfu is None else f'{100 * mfu:.1f} %'}"
            f" | {_f(p.get('peak_memory_gb'), '.1f')} | {_f(p['val_loss_start'], '.3f')} -> "
            f"{_f(p['val_loss_end'], '.3f')} |"
        )
    lines += ["", "Per stage of each phase (context, frozen layers):", ""]
    lines += ["| phase | context | frozen | tokens | training (s) | tokens/s | MFU |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for p in s["phases"]:
        for st in p.get("stages", []):
            mfu = st.get("mfu")
            lines.append(
                f"| {p['name']} | {st['seq_len']} | {st['frozen_layers']} | {st['tokens']:,} | "
                f"{st['train_s']:.1f} | {_f(st.get('tokens_per_s'), ',.0f')} | "
                f"{'-' if mfu is None else f'{100 * mfu:.1f} %'} |"
            )
    lines += _forgetting(s["forgetting"], [p["name"] for p in s["phases"]])
    lines += ["", "## Samples", ""]
    for p in s["phases"]:
        for row in p["samples"]:
            text = str(row.get("completion", "")).replace("\n", " ")[:300]
            prompt = row.get("prompt", "")
            lines.append(f"- {p['name']}, step {row.get('step')}: **{prompt}**{text}")
    if s["export_max_logit_diff"] is not None:
        lines += [
            "",
            f"Export verified with transformers: max |logit difference| "
            f"{s['export_max_logit_diff']:.3g}.",
        ]
    serve = s.get("serve")
    if serve:
        lines += ["", f"## Served (`deeplm serve`, openai client): ok = {serve.get('ok')}", ""]
        for k in ("chat", "completion", "stream"):
            if k in serve:
                a = str(serve[k].get("answer", "")).replace("\n", " ")[:300]
                lines.append(f"- {k} ({serve[k].get('seconds', 0):.2f} s): {a}")
        if serve.get("error"):
            lines.append(f"- error: {serve['error']}")
    lines += _trace_lines(s.get("trace"))
    return "\n".join(lines) + "\n"


def _trace_lines(t: dict | None) -> list[str]:
    if not t:
        return []
    lines = ["", f"## Where a training step's time goes ({t['phase']}, bench/trace_trainer.py)", ""]
    lines.append(
        f"- {t['plan']}: step {_f(t['step_ms_p50'], '.1f')} ms (median; "
        f"{_f(t['tokens_per_s_p50'], ',.0f')} tokens/s), of which the GPU's kernels "
        f"{_f(t['kernel_ms_per_step'], '.1f')} ms."
    )
    if t["host_bound"] is not None:
        verdict = "**host-bound**: the GPU waits for" if t["host_bound"] else "GPU-bound: ahead of"
        lines.append(
            f"- Waited for one by one, the host issues a step in {t['host_issue_ms']:.1f} ms of "
            f"{t['synced_step_ms']:.1f} ms: {verdict} the Python that launches its kernels."
        )
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in t["kernel_ms_by_kind"].items())
    lines.append(f"- Kernel ms per step: {kinds}.")
    if t["idle_issuers_ms"]:
        gaps = ", ".join(f"{k} {v:.1f}" for k, v in t["idle_issuers_ms"].items())
        lines.append(f"- GPU idle ms per step (profiled) by what issued the next kernel: {gaps}.")
    return lines


def _forgetting(f: dict[str, Any], order: list[str]) -> list[str]:
    """``f["matrix"][data][model]``: rows are each phase's validation data, columns the final
    model of each phase (in phase order)."""
    matrix = f.get("matrix") if isinstance(f, dict) else None
    if not matrix:
        return []
    lines = ["", "## Val loss on each phase's data (rows) after each phase (columns)", ""]
    lines += ["| data \\ model after | " + " | ".join(order) + " |"]
    lines += ["|---" * (len(order) + 1) + "|"]
    for data in order:
        if data in matrix:
            cells = [_f(matrix[data].get(m), ".4f") for m in order]
            lines.append(f"| {data} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--status", required=True, help="`deeplm status --json` output")
    ap.add_argument("--serve", help="bench/ask_served.py's JSON")
    ap.add_argument("--export-log", help="`deeplm export --verify` output")
    ap.add_argument("--gpu", help="a file with the GPU's description")
    ap.add_argument("--trace", help="bench/trace_trainer.py's trace-summary.json")
    ap.add_argument("--md", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    status = _load(args.status)
    if status is None:
        print(f"error: {args.status}: no status JSON", file=sys.stderr)
        return 2
    text = lambda p: Path(p).read_text() if p and Path(p).is_file() else ""  # noqa: E731
    serve = _load(args.serve)
    s = summarize(
        Path(args.run_dir),
        status,
        serve,
        text(args.export_log),
        text(args.gpu),
        _load(args.trace),
    )
    Path(args.json).write_text(json.dumps(s, indent=2, default=str) + "\n")
    Path(args.md).write_text(render(s))
    print(render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
