"""The ``deeplm`` command: train, inspect, sample, chat, evaluate, export and serve models.

Subcommands: run the pipeline, show a run's status, sample from or chat with a model, evaluate a
checkpoint, export it for Hugging Face ``transformers``, serve an OpenAI-compatible API, list
presets, and ``deeplm temporal ...``: the pipeline through Temporal (start, status, cancel,
list, server, worker; ``scripts/start_training.py`` and ``scripts/temporal_worker.py`` are thin
wrappers around ``deeplm temporal`` and ``deeplm worker``).

Every subcommand prints a clear one-line error (and exits 2) for bad input: an unknown preset,
an invalid config key or value, a missing run directory.

Each subcommand imports what it needs when it runs (never to dodge an import cycle): building
the parser, ``--help`` and a bad flag must not pay for importing torch or the Temporal SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
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


def console_log(flag: _StopFlag) -> Callable[[str], None]:
    """How ``deeplm run`` prints a line: above any progress bar (not into it), and a closed
    stdout (``deeplm run ... | head``) stops the run at the next safe point, as Ctrl-C does,
    instead of killing it in the middle of a stage."""

    def log(line: str) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # later writes (and exit's flush) go nowhere
            os.close(devnull)
            if not flag.stop:
                flag.stop = True
                print(
                    "deeplm: stdout was closed; stopping at the next safe point (run the same "
                    "command again to resume)",
                    file=sys.stderr,
                    flush=True,
                )

    return log


def cmd_run(args: argparse.Namespace) -> int:
    from deeplm.pipeline.local import run_local

    cfg = _load_cfg(args)
    if args.no_progress:
        cfg.train.progress = False
    if getattr(args, "orchestrator", "local") == "temporal":
        from deeplm.pipeline.temporal.client import hard_exit, start_command

        hard_exit(start_command(args, cfg))  # leaves via os._exit (temporalio/sdk-python#300)
    run_dir = _run_dir_arg(args.run_dir, cfg.name)
    if getattr(args, "rebuild_state", False):
        _rebuild_state(run_dir)
    flag = _StopFlag()
    flag.install()
    log = console_log(flag)
    log(f"deeplm run: preset/config {args.preset or args.config} -> {run_dir}")
    summary = run_local(
        run_dir,
        cfg,
        log=log,
        should_stop=flag,
        data_only=args.command == "prepare",
        allow_config_change=args.allow_config_change,
    )
    return 0 if summary["status"] in ("done",) else 3


def _run_dir_arg(value: str | None, name: str) -> Path:
    """``--run-dir`` of ``run``/``prepare`` (default ``runs/<name>``); empty or a file: error."""
    if value is None:
        return Path(f"runs/{name}")
    if not value.strip():
        raise ValueError("--run-dir is empty; give a folder (default: runs/<config name>)")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--run-dir {path}: is a file, not a folder; give a folder for the run")
    return path


def _rebuild_state(run_dir: Path) -> None:
    from deeplm.run.layout import RunLayout
    from deeplm.run.state_db import rebuild_state

    aside = rebuild_state(run_dir)
    if aside is None:
        print(f"{RunLayout(run_dir).state_db}: readable or absent; nothing to rebuild", flush=True)
    else:
        print(
            f"moved the damaged state database aside to {aside}; rebuilding the state from the "
            "files on disk",
            flush=True,
        )


def cmd_worker(args: argparse.Namespace) -> int:
    from deeplm.pipeline.temporal.worker import hard_exit, run_worker_command

    hard_exit(run_worker_command(args))  # leaves via os._exit (temporalio/sdk-python#300)


def cmd_temporal(args: argparse.Namespace) -> int:
    """``deeplm temporal start|status|cancel|list|server``."""
    from deeplm.pipeline.temporal import client

    fn = {
        "start": client.cmd_start,
        "status": client.cmd_status,
        "cancel": client.cmd_cancel,
        "list": client.cmd_list,
        "server": client.cmd_server,
    }[args.temporal_command]
    client.hard_exit(client.run_async(fn(args)))  # leaves via os._exit (sdk-python#300)


def cmd_status(args: argparse.Namespace) -> int:
    from deeplm.pipeline.status import format_status, status

    st = status(Path(args.run_dir))
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """Where a model comes from: a run, a checkpoint, or an export folder."""
    p.add_argument("--run-dir", help="a run directory (uses its newest checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest)")
    p.add_argument("--model", help="an export folder (deeplm export --format hf) instead of a run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _load_model(args: argparse.Namespace):  # -> deeplm.export.LoadedModel
    from deeplm.export import load_model

    if not (args.run_dir or args.checkpoint or args.model):
        raise ValueError("give --run-dir, --checkpoint or --model")
    lm = load_model(
        run_dir=args.run_dir, checkpoint=args.checkpoint, hf_dir=args.model, device=args.device
    )
    for line in lm.warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return lm


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.0, help="0 = off")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off"
    )
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )
    p.add_argument("--seed", type=int, default=0)


#: The most tokens one ``generate``/``chat`` call may ask for.
MAX_NEW_TOKENS = 4096


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Finite, in-range sampling flags (ValueError naming the flag)."""
    import math

    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(
            f"--max-new-tokens must be between 0 and {MAX_NEW_TOKENS}, got {args.max_new_tokens}"
        )
    checks = (
        ("--temperature", args.temperature, 0.0, 100.0, "0 = greedy"),
        ("--top-p", args.top_p, 0.0, 1.0, "0 = off"),
        ("--repetition-penalty", args.repetition_penalty, 0.01, 100.0, "1 = off"),
    )
    for flag, value, lo, hi, note in checks:
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{flag} must be a number between {lo} and {hi} ({note}), got {value}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    _check_sampling_args(args)
    return dict(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p or None,
        repetition_penalty=args.repetition_penalty,
        stop=[s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop],  # --stop '\n'
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from deeplm.model.generate import TextStream

    _check_sampling_args(args)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    lm = _load_model(args)
    tok = lm.tokenizer
    ids = [tok.bos_id] + tok.encode(args.prompt)
    gen = torch.Generator(device=lm.device)
    gen.manual_seed(args.seed)
    kwargs = _sampling_kwargs(args)
    if not args.stream and args.max_new_tokens > 256:
        print(
            f"(generating up to {args.max_new_tokens} tokens; --stream prints them as they come)",
            file=sys.stderr,
            flush=True,
        )
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---", flush=True)
        stream = TextStream(lm.model, tok, ids, args.max_new_tokens, generator=gen, **kwargs)
        if args.stream:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            print(args.prompt + "".join(stream), flush=True)
    print(f"(checkpoint: {lm.source})", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from deeplm.chat import format_chat, stop_token_ids
    from deeplm.model.generate import TextStream

    _check_sampling_args(args)
    lm = _load_model(args)
    tok = lm.tokenizer
    budget = lm.cfg.max_seq_len - args.max_new_tokens
    if budget < 8:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the "
            f"context of {lm.cfg.max_seq_len} tokens"
        )
    stops = stop_token_ids(tok)  # also checks that the tokenizer has the chat tokens
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    gen = torch.Generator(device=lm.device)
    gen.manual_seed(args.seed)
    kwargs = _sampling_kwargs(args)
    interactive = sys.stdin.isatty()
    print(
        f"chatting with {lm.name} ({lm.source}); /reset clears the history, /exit quits",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        enc = format_chat(tok, system + history, budget)
        if enc.dropped_messages:
            history = history[enc.dropped_messages :]
            print(
                f"(dropped the {enc.dropped_messages} oldest messages to fit the context)",
                file=sys.stderr,
            )
        stream = TextStream(
            lm.model,
            tok,
            enc.ids,
            args.max_new_tokens,
            stop_token_ids=stops,
            generator=gen,
            **kwargs,
        )
        sys.stdout.write("assistant> ")
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": stream.text})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from deeplm.eval.forgetting import warning_line
    from deeplm.eval.suite import SuiteOptions, evaluate_checkpoint, summary

    opts = SuiteOptions.quick() if args.quick else SuiteOptions()
    if args.grammar_pairs is not None:
        opts.grammar_pairs = args.grammar_pairs
    if args.eval_batches is not None:
        opts.eval_batches = args.eval_batches
    if args.probe_file:
        opts.probe_file = args.probe_file
    if args.samples is not None:
        opts.richness_samples = args.samples
    if args.forgetting_margin is not None:
        opts.forgetting_margin = args.forgetting_margin
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(
            f"--checkpoint {args.checkpoint}: no such checkpoint folder (a checkpoint is a "
            "folder like <run-dir>/checkpoints/1-grammar/step-0000100; `deeplm status` lists "
            "each phase's last one)"
        )
    if args.checkpoint and not args.run_dir:
        from deeplm.run.layout import RunLayout

        found = RunLayout.of_checkpoint(args.checkpoint)
        args.run_dir = found.root if found is not None else None
    if not args.run_dir:
        raise ValueError("give --run-dir (and optionally --checkpoint)")
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    res = evaluate_checkpoint(
        args.run_dir, args.checkpoint, opts, args.out, device=args.device, log=log
    )
    head = summary(res) | {"paths": res["paths"], "checkpoint": res["checkpoint"]}
    if args.json:
        print(json.dumps(head, indent=2, default=str))
        return 0
    for name, r in head["per_phase"].items():
        print(
            f"{name}: val loss {r['val_loss']:.4f}, perplexity {r['val_ppl']:.1f}, "
            f"{r['bpb']:.4f} bits/byte"
        )
    pr = head["probes"]
    print(
        f"probes: completion {pr['completion_accuracy']:.1%}, "
        f"reasoning {pr['reasoning_accuracy']:.1%}"
    )
    g = head["grammar"]
    cats = ", ".join(f"{k} {v:.1%}" for k, v in g["categories"].items())
    print(f"grammar: {g['accuracy']:.1%} of {g['n']} pairs ({cats})")
    rich = head["richness"]
    print("richness: " + ", ".join(f"{k} {v:.3f}" for k, v in rich.items() if v is not None))
    for w in head["forgetting_warnings"]:
        print(warning_line(w))
    print(f"results: {res['paths']['eval_json']}\nreport: {res['paths']['report']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from deeplm.export import export_hf
    from deeplm.export.hf import ARCHITECTURES, verify_export

    if args.format != "hf":
        raise ValueError(f"unknown export format {args.format!r} (supported: hf)")
    args.model = None
    lm = _load_model(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = export_hf(
        lm.model,
        lm.tokenizer,
        args.out,
        dtype=dtype,
        source={"run": lm.name, "checkpoint": str(lm.source)},
    )
    arch = ARCHITECTURES[lm.cfg.activation]
    print(f"exported {lm.source} -> {out} (transformers {arch})")
    if args.verify:
        try:
            diff = verify_export(out, lm.model)
        except ImportError as exc:
            msg = f"--verify needs transformers: pip install 'deeplm[hf]' ({exc})"
            raise RuntimeError(msg) from None
        print(f"verified with transformers: max |logit difference| {diff:.3g}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from deeplm.serve import Limits, serve

    limits = Limits(
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
    limits.check()
    lm = _load_model(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable from other machines", file=sys.stderr)
    serve(
        lm,
        host=args.host,
        port=args.port,
        model_id=args.model_name,
        api_key=args.api_key or os.environ.get("DEEPLM_API_KEY") or None,
        quiet=args.quiet,
        log=lambda s: print(s, flush=True),
        limits=limits,
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from deeplm.data.importer import ImportError_
    from deeplm.pipeline.import_run import import_tokens

    cfg = _load_cfg(args)
    try:
        import_tokens(
            Path(args.run_dir),
            cfg,
            Path(args.train),
            Path(args.val),
            Path(args.tokenizer),
            phase=args.phase,
            bos_token=args.bos_token,
            dtype=args.dtype,
        )
    except ImportError_ as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"imported into {args.run_dir}: train with `python bench/compare.py --data "
        f"{args.run_dir} --phase {args.phase or cfg.phases[0].name} ...`"
    )
    return 0


def _serve_limit_args(p: argparse.ArgumentParser) -> None:
    """The server's limits (defaults: :class:`deeplm.serve.Limits`)."""
    p.add_argument(
        "--max-batch", type=int, default=8, help="sequences generated at a time, in one batch"
    )
    p.add_argument(
        "--queue-size", type=int, default=64, help="sequences that may wait; beyond: 429"
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a request may wait and generate (queued past it: 503)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)"
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds before an idle connection is closed",
    )
    p.add_argument(
        "--max-connections", type=int, default=256, help="open connections at most (503 beyond)"
    )


def cmd_presets(args: argparse.Namespace) -> int:
    from deeplm.model import describe

    for name in list_presets():
        cfg = load_config(preset=name)
        tokens = sum(p.tokens for p in cfg.phases)
        print(f"{name:<8} {describe(cfg.model)}; {len(cfg.phases)} phases, {tokens:,} tokens")
    return 0


def _port(text: str) -> int:
    """A TCP port for ``serve --port``: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 to 65535; 0 = any free)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _add_pipeline_commands(sub)
    p = sub.add_parser("status", help="show a run's stages, phases, progress and metrics")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_status)

    _add_model_commands(sub)
    p = sub.add_parser("presets", help="list presets with their exact parameter counts")
    p.set_defaults(fn=cmd_presets)
    return parser


def _cfg_args(p: argparse.ArgumentParser) -> None:
    """Which config: a preset or a TOML file, overrides, config changes on resume."""
    p.add_argument("--preset", help=f"a preset ({', '.join(list_presets())}); default tiny")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run with a changed config when no change can invalidate finished "
        "work (training keys of a phase not started, eval/save cadence of a phase not "
        "finished; docs/configuration.md)",
    )
    p.add_argument("--config", help="a TOML config file (instead of --preset)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set phases.0.lr=1e-3 (repeatable)",
    )


def _add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """``run``, ``worker``, ``temporal ...``, ``prepare``, ``import``."""
    p = sub.add_parser("run", help="run the whole pipeline (resumes; skips what is done)")
    _cfg_args(p)
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--rebuild-state",
        action="store_true",
        help="a damaged state.db: move it aside and rebuild the state from the files on disk",
    )
    p.add_argument(
        "--orchestrator",
        choices=("local", "temporal"),
        default="local",
        help="local: in this process (default); temporal: through a Temporal workflow",
    )
    p.add_argument(
        "--temporal-address",
        help="Temporal server host:port (default $DEEPLM_TEMPORAL_ADDRESS, else 127.0.0.1:7233, "
        "where a local dev server is started when none answers)",
    )
    p.add_argument(
        "--with-worker", action="store_true", help="temporal: also run a worker for this run"
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("worker", help="run a Temporal worker for the pipeline's task queues")
    _worker_args(p)
    p.set_defaults(fn=cmd_worker)

    _temporal_parser(sub)

    p = sub.add_parser(
        "prepare", help="only the data stages: prepare, tokenizer, tokenize (resumable)"
    )
    _cfg_args(p)
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--rebuild-state",
        action="store_true",
        help="a damaged state.db: move it aside and rebuild the state from the files on disk",
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "import", help="make a data run from pre-tokenized files (nanoGPT / llm.c .bin)"
    )
    _cfg_args(p)
    p.add_argument("--train", required=True, help="training tokens (.bin: raw uint16 or llm.c)")
    p.add_argument("--val", required=True, help="validation tokens (same format)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer.json they were encoded with")
    p.add_argument("--run-dir", required=True, help="a new run directory")
    p.add_argument("--phase", help="the phase whose shards these are (default: the first)")
    p.add_argument("--bos-token", help="the token that starts each document (default: detected)")
    p.add_argument("--dtype", default="uint16", choices=["uint16", "uint32"], help="raw files")
    p.set_defaults(fn=cmd_import)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """``generate``, ``chat``, ``eval``, ``export``, ``serve``: what uses a trained model."""
    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    _sampling_args(p, temperature=0.8)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model (multi-turn; reads stdin)")
    _model_args(p)
    _sampling_args(p, temperature=0.7)
    p.add_argument("--system", help="a system message put before the conversation")
    p.set_defaults(fn=cmd_chat, max_new_tokens=128)

    p = sub.add_parser("eval", help="evaluate a checkpoint: loss, bits/byte, probes, grammar")
    p.add_argument("--run-dir", help="the run directory")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest)")
    p.add_argument("--out", help="output folder (default <run-dir>/eval)")
    p.add_argument("--quick", action="store_true", help="the capped suite of the pipeline")
    p.add_argument("--grammar-pairs", type=int, help="score at most this many grammar pairs")
    p.add_argument("--eval-batches", type=int, help="validation batches per phase")
    p.add_argument("--probe-file", help="a probe file (default: the packaged probes_v1.json)")
    p.add_argument("--samples", type=int, help="generated samples for vocabulary richness")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--forgetting-margin",
        type=float,
        help="warn when a later phase raised an earlier phase's val loss by more than this "
        "many nats (default 0.1)",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint for Hugging Face transformers")
    p.add_argument("--format", default="hf", choices=["hf"])
    p.add_argument("--run-dir", help="a run directory (uses its newest checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument(
        "--verify", action="store_true", help="load it with transformers and compare logits"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    p.add_argument("--model-name", help="the model id clients use (default: the run's name)")
    p.add_argument("--api-key", help="require this bearer key (or set DEEPLM_API_KEY)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    _serve_limit_args(p)
    p.set_defaults(fn=cmd_serve)


def _worker_args(p: argparse.ArgumentParser) -> None:
    """``deeplm worker`` (``scripts/temporal_worker.py``): serve the pipeline's task queues."""
    from deeplm.pipeline.temporal.server import add_connection_args

    add_connection_args(p)
    p.add_argument(
        "--queues",
        default="cpu,gpu",
        help="which task queues to serve: cpu, gpu or cpu,gpu (default both)",
    )
    p.add_argument("--cpu-slots", type=int, default=2, help="concurrent CPU stages (default 2)")
    p.add_argument("--gpu-slots", type=int, default=1, help="concurrent GPU stages (default 1)")
    p.add_argument(
        "--graceful",
        type=float,
        default=120.0,
        help="seconds a shutdown waits for running stages to checkpoint and stop (default 120)",
    )
    p.add_argument(
        "--wait-for-server",
        type=float,
        default=0.0,
        help="give up when no server answers within this many seconds (default 0: wait forever)",
    )
    p.add_argument(
        "--start-server",
        action="store_true",
        help="start a local dev server when none answers (state in --state-dir)",
    )
    p.add_argument(
        "--state-dir",
        default="runs/temporal",
        help="dev server state folder for --start-server (default runs/temporal)",
    )


def _temporal_parser(sub: argparse._SubParsersAction) -> None:
    """``deeplm temporal ...`` (``scripts/start_training.py``): the pipeline through Temporal."""
    from deeplm.pipeline.temporal.server import add_connection_args

    top = sub.add_parser(
        "temporal", help="run the pipeline through Temporal: start, status, cancel, list, ..."
    )
    tsub = top.add_subparsers(dest="temporal_command", required=True)

    def which_run(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", help="a preset (default tiny)")
        p.add_argument("--config", help="a TOML config file (instead of --preset)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
        p.add_argument("--run-dir", help="the run directory")
        p.add_argument("--workflow-id", help="the workflow id (default deeplm-<run name>)")
        add_connection_args(p)
        p.set_defaults(fn=cmd_temporal)

    p = tsub.add_parser("start", help="start the pipeline (or attach to it) and follow it")
    which_run(p)
    p.add_argument("--with-worker", action="store_true", help="run a worker for this run too")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="apply config changes that cannot invalidate finished work (as deeplm run)",
    )
    p.add_argument("--detach", action="store_true", help="return once the workflow has started")
    p.add_argument("--heartbeat-timeout", type=float, help="seconds (default 120)")
    p.add_argument("--train-timeout", type=float, help="hours a training stage may take (336)")
    p.add_argument("--max-attempts", type=int, help="attempts per stage (default 10)")

    p = tsub.add_parser("status", help="workflow status, live progress and the run's StateDB")
    which_run(p)
    p.add_argument("--json", action="store_true")

    p = tsub.add_parser("cancel", help="stop a run cleanly (training checkpoints first)")
    which_run(p)
    p.add_argument("--no-wait", action="store_true", help="do not wait for it to stop")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")

    p = tsub.add_parser("list", help="list deeplm workflows")
    add_connection_args(p)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_temporal)

    p = tsub.add_parser("server", help="start (or --stop) a local Temporal dev server")
    add_connection_args(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", help="the server's state goes in <run-dir>/temporal")
    where.add_argument("--state-dir", help="or in this folder")
    p.add_argument("--stop", action="store_true")
    p.set_defaults(fn=cmd_temporal)

    p = tsub.add_parser("worker", help="run a Temporal worker (same as deeplm worker)")
    _worker_args(p)
    p.set_defaults(fn=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        from deeplm.run.lock import RunLocked

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
    except BrokenPipeError:  # `deeplm status | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


if __name__ == "__main__":
    sys.exit(main())
