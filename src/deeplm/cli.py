"""The ``deeplm`` command: run the pipeline, show a run's status, sample from a run, list presets.

Every subcommand prints a clear one-line error (and exits 2) for bad input: an unknown preset,
an invalid config key or value, a missing run directory.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from deeplm.config import ConfigError, RunConfig, list_presets, load_config


def _load_cfg(args: argparse.Namespace) -> RunConfig:
    if args.preset and args.config:
        raise ConfigError("give either --preset or --config, not both")
    if not args.preset and not args.config:
        args.preset = "tiny"
    return load_config(preset=args.preset, config_file=args.config, overrides=args.set or [])


class _StopFlag:
    """First Ctrl-C: stop at the next safe point (checkpoint written). Second: abort."""

    def __init__(self) -> None:
        self.stop = False

    def install(self) -> None:
        def handler(signum: int, frame: object) -> None:
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            print("\nstopping at the next safe point (Ctrl-C again to abort)...", file=sys.stderr)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def __call__(self) -> bool:
        return self.stop


def cmd_run(args: argparse.Namespace) -> int:
    from deeplm.workflows.local import run_local

    cfg = _load_cfg(args)
    if args.no_progress:
        cfg.train.progress = False
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    flag = _StopFlag()
    flag.install()
    print(f"deeplm run: preset/config {args.preset or args.config} -> {run_dir}", flush=True)
    summary = run_local(run_dir, cfg, should_stop=flag)
    return 0 if summary["status"] in ("done",) else 3


def cmd_status(args: argparse.Namespace) -> int:
    from deeplm.workflows.local import format_status, status

    st = status(Path(args.run_dir))
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from deeplm.model import generate
    from deeplm.tokenizer import Tokenizer
    from deeplm.train import checkpoint as ckpt
    from deeplm.train.device import select_device
    from deeplm.train.trainer import build_model
    from deeplm.workflows.activities import latest_model_checkpoint, tokenizer_path
    from deeplm.workflows.local import load_run_config

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    path = Path(args.checkpoint) if args.checkpoint else latest_model_checkpoint(run_dir, cfg)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint yet; train first (deeplm run)")
    tok = Tokenizer.load(tokenizer_path(run_dir))
    meta = ckpt.read_meta(path)
    if meta.get("tokenizer_hash") not in (None, tok.hash):
        raise RuntimeError(f"{path} was trained with another tokenizer than {run_dir}'s")
    device = select_device(args.device)
    model = build_model(cfg, cfg.seed)
    ckpt.load_weights(path, model)
    model.to(device).eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    ids = [tok.bos_id] + tok.encode(args.prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        out = generate(
            model,
            idx,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p or None,
            eos_id=tok.eos_id,
            generator=gen,
        )
        new = out[0, len(ids) :].tolist()
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(new), flush=True)
    print(f"(checkpoint: {path})", file=sys.stderr)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from deeplm.model import describe

    for name in list_presets():
        cfg = load_config(preset=name)
        tokens = sum(p.tokens for p in cfg.phases)
        print(f"{name:<8} {describe(cfg.model)}; {len(cfg.phases)} phases, {tokens:,} tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def cfg_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", help=f"a preset ({', '.join(list_presets())}); default tiny")
        p.add_argument("--config", help="a TOML config file (instead of --preset)")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set phases.0.lr=1e-3 (repeatable)",
        )

    p = sub.add_parser("run", help="run the whole pipeline (resumes; skips what is done)")
    cfg_args(p)
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("status", help="show a run's stages, phases, progress and metrics")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the newest)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("presets", help="list presets with their exact parameter counts")
    p.set_defaults(fn=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        from deeplm.workflows.local import RunLocked

        kind = (
            "config error"
            if isinstance(exc, ConfigError)
            else ("busy" if isinstance(exc, RunLocked) else "error")
        )
        print(f"deeplm: {kind}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deeplm: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
