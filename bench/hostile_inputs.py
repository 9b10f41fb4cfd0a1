"""Hostile inputs: every bad input gets a clear error naming the file/key, or a counted skip,
and a previously finished run directory is never touched.

Each case builds its input in a temporary folder and runs the real code path (the source
readers and the cleaner that ``prepare`` uses, the config loader, or ``deeplm run`` in-process
through ``deeplm.cli.main``). Outcomes:

* ``error``: the expected exception type, with the file name or config key in its message;
* ``skip``: the bad part was skipped and counted in the source stats, the good part was read.

Usage: ``python bench/hostile_inputs.py [--full] [--workdir DIR]``; ``--full`` makes the
single-line file 100 MB (default 5 MB). Prints one line per case and ``M/M hostile inputs
handled``; a case listed in ``KNOWN_FAILURES`` is reported as such (never hidden).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplm.config import CleanConfig, ConfigError, SourceConfig, load_config
from deeplm.data.clean import CleanStats, clean_documents
from deeplm.data.sources import SourceError, SourceStats, iter_source

# Cases that currently fail, with the reason; reported as KNOWN FAILURE, not counted handled.
KNOWN_FAILURES: dict[str, str] = {}


class NotHandled(AssertionError):
    """The input was not handled as required (the message says how)."""


@dataclass
class Ctx:
    tmp: Path  # a fresh folder for this case
    big_mb: int  # size of the single-line file
    finished_run: Path  # a finished run directory that must stay untouched


# ---------------------------------------------------------------------------- helpers


def read_files(path: Path, base_dir: Path) -> tuple[list[str], SourceStats]:
    """Read a files source the way ``prepare`` does (reader, then the cleaner)."""
    stats = SourceStats()
    src = SourceConfig(kind="files", path=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = [
            d.text
            for d in clean_documents(iter_source(src, base_dir, stats), CleanConfig(), CleanStats())
        ]
    return docs, stats


def expect_error(fn: Callable[[], object], exc_type: type, *needles: str) -> str:
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        missing = [n for n in needles if n not in msg]
        if missing:
            raise NotHandled(f"error does not name {missing}: {msg}") from None
        return f"error: {msg[:110]}"
    except Exception as exc:  # the wrong kind of error: a crash, not a clear message
        raise NotHandled(f"unexpected {type(exc).__name__}: {exc}") from None
    raise NotHandled(f"accepted silently (expected {exc_type.__name__})")


def expect_skip(folder: Path, reason: str, good_docs: int = 1) -> str:
    try:
        docs, stats = read_files(folder, folder.parent)
    except Exception as exc:
        raise NotHandled(f"{type(exc).__name__} instead of a counted skip: {exc}") from None
    if stats.skipped.get(reason, 0) < 1:
        raise NotHandled(f"no {reason!r} skip counted (skipped: {stats.skipped})")
    if len(docs) < good_docs:
        raise NotHandled(f"the good file was lost too ({len(docs)} docs)")
    return f"skip: {reason} x{stats.skipped[reason]}, {len(docs)} good doc(s) kept"


_WORDS = (
    "the of and to in is was he that it for on with as his at by be this had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long"
).split()


def prose(sentences: int, seed: int = 0) -> str:
    """Varied English-like text that passes the cleaner's quality filters."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16)))
        out.append(words.capitalize() + ".")
    return " ".join(out)


GOOD = prose(30) + "\n"


def folder_with(ctx: Ctx, name: str, data: bytes) -> Path:
    folder = ctx.tmp / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text(GOOD)
    (folder / name).write_bytes(data)
    return folder


def write_config(ctx: Ctx, edit: Callable[[str], str] | None = None, extra: str = "") -> Path:
    from bench.fault_injection import micro_two_phase, to_toml

    d = micro_two_phase()
    d["phases"] = d["phases"][:1]
    text = to_toml(d) + extra
    if edit is not None:
        text = edit(text)
    path = ctx.tmp / "config.toml"
    path.write_text(text)
    return path


def cli(*argv: str) -> tuple[int, str]:
    from deeplm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


# ---------------------------------------------------------------------------- cases

BINARY = bytes(range(256)) * 64


def case_binary_file_named(ctx: Ctx) -> str:
    f = ctx.tmp / "data.txt"
    f.write_bytes(BINARY)
    return expect_error(lambda: read_files(f, ctx.tmp), SourceError, "data.txt", "binary")


def case_binary_file_in_folder(ctx: Ctx) -> str:
    return expect_skip(folder_with(ctx, "blob.txt", BINARY), "binary file")


def case_invalid_utf8_named(ctx: Ctx) -> str:
    f = ctx.tmp / "latin1.txt"
    f.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)
    return expect_error(lambda: read_files(f, ctx.tmp), SourceError, "latin1.txt", "UTF-8")


def case_invalid_utf8_in_folder(ctx: Ctx) -> str:
    data = "caf\xe9 ".encode("latin-1") * 100
    return expect_skip(folder_with(ctx, "latin1.txt", data), "non-utf8 file")


def case_invalid_utf8_jsonl_line(ctx: Ctx) -> str:
    data = b'{"text": "caf\xe9"}\n' + json.dumps({"text": prose(30, seed=7)}).encode() + b"\n"
    return expect_skip(folder_with(ctx, "mixed.jsonl", data), "bad jsonl line", good_docs=2)


def case_nul_bytes_after_sniff(ctx: Ctx) -> str:
    """NULs past the binary sniff window: the file is text, the cleaner drops the NULs."""
    f = ctx.tmp / "late_nul.txt"
    f.write_text(prose(400, seed=3) + " tail\x00with\x00nuls" * 50)
    docs, _ = read_files(f, ctx.tmp)
    if not docs:
        raise NotHandled("no documents left")
    if any("\x00" in d for d in docs):
        raise NotHandled("NUL bytes reached the cleaned documents")
    return f"cleaned: NULs dropped, {len(docs)} docs"


def case_nul_in_jsonl_text(ctx: Ctx) -> str:
    f = ctx.tmp / "nul.jsonl"
    f.write_text(json.dumps({"text": GOOD + "a\x00b\x00c"}) + "\n")
    docs, _ = read_files(f, ctx.tmp)
    if not docs or any("\x00" in d for d in docs):
        raise NotHandled("NUL characters reached the cleaned documents")
    return f"cleaned: NULs dropped, {len(docs)} docs"


def case_empty_file_named(ctx: Ctx) -> str:
    f = ctx.tmp / "empty.txt"
    f.write_bytes(b"")
    return expect_error(lambda: read_files(f, ctx.tmp), SourceError, "empty.txt", "empty")


def case_whitespace_file_in_folder(ctx: Ctx) -> str:
    return expect_skip(folder_with(ctx, "blank.md", b" \n\t\n" * 100), "empty file")


def case_empty_jsonl_named(ctx: Ctx) -> str:
    f = ctx.tmp / "empty.jsonl"
    f.write_bytes(b"\n\n")
    return expect_error(lambda: read_files(f, ctx.tmp), SourceError, "empty.jsonl")


def case_huge_single_line(ctx: Ctx) -> str:
    f = ctx.tmp / "one_line.txt"
    block = (prose(8000, seed=1) + " ").encode()  # ~0.6 MB, repeated (dedup drops repeats)
    with open(f, "wb") as fh:
        for _ in range(ctx.big_mb * (1 << 20) // len(block) + 1):
            fh.write(block)
    t0 = time.perf_counter()
    docs, _ = read_files(f, ctx.tmp)
    longest = max((len(d) for d in docs), default=0)
    if not docs or longest > CleanConfig().chunk_chars * 2:
        raise NotHandled(f"{len(docs)} docs, longest {longest} chars (not chunked)")
    secs = time.perf_counter() - t0
    return f"chunked: {ctx.big_mb} MB line -> {len(docs)} docs in {secs:.1f}s"


def case_huge_jsonl_document(ctx: Ctx) -> str:
    f = ctx.tmp / "huge.jsonl"
    block = prose(8000, seed=2) + " "
    text = block * (ctx.big_mb * (1 << 20) // len(block) + 1)
    f.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": prose(30, seed=7)}) + "\n")
    docs, _ = read_files(f, ctx.tmp)
    longest = max((len(d) for d in docs), default=0)
    if not docs or longest > CleanConfig().chunk_chars * 2:
        raise NotHandled(f"{len(docs)} docs, longest {longest} chars (not chunked)")
    return f"chunked: {len(text) >> 20} MB record -> {len(docs)} docs"


def case_invalid_jsonl_lines(ctx: Ctx) -> str:
    lines = [
        b'{"text": "unterminated',
        b"not json at all",
        b'["a", "list"]',
        b'{"other": "no text field"}',
        json.dumps({"text": prose(30, seed=7)}).encode(),
    ]
    data = b"\n".join(lines) + b"\n"
    return expect_skip(folder_with(ctx, "bad.jsonl", data), "bad jsonl line", good_docs=2)


def case_deeply_nested_jsonl(ctx: Ctx) -> str:
    depth = 200_000
    data = b"[" * depth + b"]" * depth + b"\n"
    data += b'{"text": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}\n"
    data += json.dumps({"text": prose(30, seed=7)}).encode() + b"\n"
    return expect_skip(folder_with(ctx, "nested.jsonl", data), "bad jsonl line", good_docs=2)


def case_wrong_typed_jsonl_text(ctx: Ctx) -> str:
    data = (
        b'{"text": 5}\n{"text": null}\n{"text": ["a"]}\n'
        + json.dumps({"text": prose(30, seed=7)}).encode()
    )
    return expect_skip(folder_with(ctx, "typed.jsonl", data + b"\n"), "bad jsonl line", 2)


def case_all_lines_bad_jsonl_named(ctx: Ctx) -> str:
    f = ctx.tmp / "allbad.jsonl"
    f.write_bytes(b"{\n[\nnope\n")
    return expect_error(lambda: read_files(f, ctx.tmp), SourceError, "allbad.jsonl", "bad")


def case_unsupported_suffix_named(ctx: Ctx) -> str:
    f = ctx.tmp / "weights.bin"
    f.write_bytes(BINARY)
    return expect_error(lambda: read_files(f, ctx.tmp), SourceError, "weights.bin")


def case_source_path_escapes_data_root(ctx: Ctx) -> str:
    outside = ctx.tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(GOOD)
    root = ctx.tmp / "root"
    root.mkdir()
    return expect_error(
        lambda: read_files(Path("../outside/secret.txt"), root), SourceError, "outside the"
    )


def _config_case(ctx: Ctx, edit: Callable[[str], str], *needles: str, extra: str = "") -> str:
    path = write_config(ctx, edit, extra)
    return expect_error(lambda: load_config(config_file=path), ConfigError, *needles)


def case_config_wrong_type(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("tokens = 6144", 'tokens = "many"'), "tokens")


def case_config_wrong_type_table(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("[model]", "model = 5\n[modelx]"), "model")


def case_config_unknown_key(ctx: Ctx) -> str:
    return _config_case(
        ctx, lambda t: t.replace("lr = 0.003", "lr = 0.003\nlearning_rte = 1"), "learning_rte"
    )


def case_config_unknown_top_level_key(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: "epochs = 3\n" + t, "epochs")


def case_config_negative_budget(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("tokens = 6144", "tokens = -6144"), "tokens")


def case_config_zero_budget(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("tokens = 6144", "tokens = 0"), "tokens")


def case_config_negative_max_docs(ctx: Ctx) -> str:
    return _config_case(
        ctx, lambda t: t.replace('name = "sotu"', 'name = "sotu", max_docs = -1'), "max_docs"
    )


def case_config_zero_lr(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("lr = 0.003", "lr = 0.0"), "lr")


def case_config_not_utf8(ctx: Ctx) -> str:
    path = ctx.tmp / "config.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    return expect_error(lambda: load_config(config_file=path), ConfigError, "config.toml", "UTF-8")


def case_config_invalid_toml(ctx: Ctx) -> str:
    path = ctx.tmp / "config.toml"
    path.write_bytes(b"[model\nn_layers = = 2\n")
    return expect_error(lambda: load_config(config_file=path), ConfigError, "config.toml", "TOML")


def case_config_binary_file(ctx: Ctx) -> str:
    path = ctx.tmp / "config.toml"
    path.write_bytes(BINARY)
    return expect_error(lambda: load_config(config_file=path), ConfigError, "config.toml")


def case_run_with_binary_source(ctx: Ctx) -> str:
    """``deeplm run`` on a config naming a binary file: exit 2 and the file in the message."""
    (ctx.tmp / "blob.txt").write_bytes(BINARY)
    cfg = write_config(
        ctx,
        lambda t: t.replace(
            '{kind = "offline", name = "sotu", max_chars = 400000}',
            '{kind = "files", path = "blob.txt"}',
        ),
    )
    rc, err = cli("run", "--config", str(cfg), "--run-dir", str(ctx.tmp / "run"), "--no-progress")
    if rc != 2 or "blob.txt" not in err:
        raise NotHandled(f"exit {rc}, stderr {err.strip()[-200:]!r}")
    return f"error: {err.strip().splitlines()[-1][:110]}"


def case_bad_config_on_finished_run(ctx: Ctx) -> str:
    """A changed config aimed at a finished run directory: refused, nothing changed."""
    cfg = write_config(ctx, lambda t: t.replace("lr = 0.003", "lr = 0.002"))
    rc, err = cli("run", "--config", str(cfg), "--run-dir", str(ctx.finished_run))
    if rc != 2 or "different" not in err:
        raise NotHandled(f"exit {rc}, stderr {err.strip()[-200:]!r}")
    return f"error: {err.strip().splitlines()[-1][:110]}"


def case_wrong_typed_config_on_finished_run(ctx: Ctx) -> str:
    cfg = write_config(ctx, lambda t: t.replace("seed = 11", 'seed = "eleven"'))
    rc, err = cli("run", "--config", str(cfg), "--run-dir", str(ctx.finished_run))
    if rc != 2 or "seed" not in err:
        raise NotHandled(f"exit {rc}, stderr {err.strip()[-200:]!r}")
    return f"error: {err.strip().splitlines()[-1][:110]}"


def case_config_nan_lr(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("lr = 0.003", "lr = nan"), "phases.0.lr", "finite")


def case_config_inf_lr(ctx: Ctx) -> str:
    return _config_case(ctx, lambda t: t.replace("lr = 0.003", "lr = inf"), "phases.0.lr", "finite")


def case_config_negative_min_chars(ctx: Ctx) -> str:
    def edit(text: str) -> str:
        return text.replace("chunk_chars = 4000", "chunk_chars = 4000\nmin_chars = -5")

    return _config_case(ctx, edit, "clean.min_chars")


def _cli_error(*argv: str, needles: tuple[str, ...]) -> str:
    """``deeplm <argv>`` in-process: exit 2 with every needle in the message, no traceback."""
    rc, err = cli(*argv)
    if rc != 2 or any(n not in err for n in needles) or "Traceback" in err:
        raise NotHandled(f"exit {rc}, stderr {err.strip()[-300:]!r}")
    return f"error: {err.strip().splitlines()[-1][:110]}"


def case_set_nan_lr(ctx: Ctx) -> str:
    run = str(ctx.tmp / "run")
    return _cli_error(
        "run", "--preset", "tiny", "--set", "phases.0.lr=nan", "--run-dir", run,
        needles=("phases.0.lr", "finite"),
    )  # fmt: skip


def case_run_dir_is_a_file(ctx: Ctx) -> str:
    path = ctx.tmp / "a-file"
    path.write_text("not a folder\n")
    return _cli_error(
        "run", "--config", str(write_config(ctx)), "--run-dir", str(path),
        needles=(str(path), "is a file"),
    )  # fmt: skip


def case_run_dir_empty(ctx: Ctx) -> str:
    cfg = str(write_config(ctx))
    return _cli_error("run", "--config", cfg, "--run-dir", "", needles=("--run-dir", "empty"))


def case_generate_nan_temperature(ctx: Ctx) -> str:
    run = str(ctx.finished_run)
    return _cli_error(
        "generate", "--run-dir", run, "--prompt", "The", "--temperature", "nan",
        needles=("--temperature",),
    )  # fmt: skip


def case_generate_huge_max_new_tokens(ctx: Ctx) -> str:
    run = str(ctx.finished_run)
    return _cli_error(
        "generate", "--run-dir", run, "--prompt", "The", "--max-new-tokens", "100000",
        needles=("--max-new-tokens", "100000"),
    )  # fmt: skip


def _copy_of_finished_run(ctx: Ctx) -> Path:
    copy = ctx.tmp / "run"
    shutil.copytree(ctx.finished_run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def case_garbage_state_db(ctx: Ctx) -> str:
    """state.db overwritten with garbage (WAL files gone): a clear error from status and run,
    then ``--rebuild-state`` rebuilds the state from the files and the run finishes again."""
    run = _copy_of_finished_run(ctx)
    for extra in run.glob("state.db-*"):
        extra.unlink()
    (run / "state.db").write_bytes(b"garbage " * 512)
    cfg = str(write_config(ctx))
    _cli_error("status", "--run-dir", str(run), needles=("state.db", "--rebuild-state"))
    detail = _cli_error(
        "prepare", "--config", cfg, "--run-dir", str(run), needles=("state.db", "damaged")
    )
    rc, err = cli("prepare", "--config", cfg, "--run-dir", str(run), "--rebuild-state")
    if rc != 0 or not list(run.glob("state.db.corrupt-*")):
        raise NotHandled(f"--rebuild-state: exit {rc}, stderr {err.strip()[-300:]!r}")
    rc, err = cli("status", "--run-dir", str(run))
    if rc != 0:
        raise NotHandled(f"status after the rebuild: exit {rc}, {err.strip()[-200:]!r}")
    return detail + "; rebuilt"


def case_invalid_config_json(ctx: Ctx) -> str:
    """config.json of a run made invalid JSON: status names the file; a run repairs it."""
    run = _copy_of_finished_run(ctx)
    (run / "config.json").write_text('{"name": "x", oops}')
    detail = _cli_error("status", "--run-dir", str(run), needles=("config.json", "damaged"))
    rc, err = cli("prepare", "--config", str(write_config(ctx)), "--run-dir", str(run))
    if rc != 0 or cli("status", "--run-dir", str(run))[0] != 0:
        raise NotHandled(f"the repair run: exit {rc}, stderr {err.strip()[-300:]!r}")
    return detail + "; repaired by the next run"


# ---------------------------------------------------------------------------- the server


@contextlib.contextmanager
def _server(ctx: Ctx, **limits: float) -> Iterator[Any]:
    """``deeplm serve``'s real uvicorn server on a free loopback port, over the finished run's
    tokenizer and its model architecture (untrained weights: these cases test HTTP, not text)."""
    import torch

    from deeplm.export import LoadedModel
    from deeplm.model import build_model
    from deeplm.run.layout import RunLayout
    from deeplm.run.run_config import load_run_config
    from deeplm.serve import Limits, make_server
    from deeplm.tokenizer import Tokenizer

    cfg = load_run_config(ctx.finished_run)
    model = build_model(cfg, cfg.seed).eval()
    tok = Tokenizer.load(RunLayout(ctx.finished_run).tokenizer)
    loaded = LoadedModel(model, tok, cfg.model, cfg.name, ctx.finished_run, torch.device("cpu"))
    srv = make_server(loaded, port=0, quiet=True, limits=Limits(graceful_timeout=1, **limits))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _http(srv: Any, raw: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes; the answer until the server closes, answers a full error, or goes quiet."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as sock:
        sock.sendall(raw)
        out = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                out += chunk
                if out.startswith(b"HTTP/1.1 4") and b"\r\n\r\n" in out:
                    break
        return out


def _expect_status(answer: bytes, status: int) -> str:
    line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    if not line.startswith(f"HTTP/1.1 {status}"):
        raise NotHandled(f"expected {status}, got {line or 'no answer'!r}")
    return f"{line}"


def _post(body: bytes, length: str | None = None) -> bytes:
    size = str(len(body)) if length is None else length
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    if size:
        head += f"Content-Length: {size}\r\n"
    return head.encode() + b"\r\n" + body


def case_server_deeply_nested_json(ctx: Ctx) -> str:
    with _server(ctx) as srv:
        return _expect_status(_http(srv, _post(b"[" * 500_000)), 400)


def case_server_negative_content_length(ctx: Ctx) -> str:
    with _server(ctx) as srv:
        return _expect_status(_http(srv, _post(b"", "-1")), 400)


def case_server_missing_content_length(ctx: Ctx) -> str:
    with _server(ctx) as srv:
        return _expect_status(_http(srv, _post(b"", "")), 411)


def case_server_oversized_body_then_hangup(ctx: Ctx) -> str:
    with _server(ctx, max_body_bytes=1024) as srv:
        detail = _expect_status(_http(srv, _post(b"", "99999999")), 413)
        health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        return detail + "; then " + _expect_status(_http(srv, health), 200)


def case_server_idle_connections(ctx: Ctx) -> str:
    """200 idle connections (one with a never-finished request head) are closed by the server."""
    with _server(ctx, keep_alive_timeout=1.0) as srv:
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(200)]
        socks[0].sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        try:
            for sock in socks:
                sock.settimeout(15)
                if sock.recv(1) != b"":
                    raise NotHandled("an idle connection got data instead of being closed")
        except TimeoutError:
            raise NotHandled("an idle connection stayed open 15 s") from None
        finally:
            for sock in socks:
                sock.close()
        return f"200 idle connections closed after {time.monotonic() - start:.1f} s"


CASES: dict[str, Callable[[Ctx], str]] = {
    name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


# ---------------------------------------------------------------------------- driver


def finish_a_run(workdir: Path) -> Path:
    """A finished (data-only) run of the micro config: the directory that must stay intact."""
    from deeplm.pipeline.local import run_local

    ctx = Ctx(workdir, 0, workdir / "finished")
    cfg = load_config(config_file=write_config(ctx))
    summary = run_local(ctx.finished_run, cfg, log=lambda s: None, data_only=True)
    assert summary["status"] == "done", summary
    return ctx.finished_run


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run directory (the lock file aside)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file() and p.name != ".lock" and not p.name.startswith("state.db-"):
            out[str(p.relative_to(run_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_case(name: str, workdir: Path, big_mb: int, finished_run: Path) -> tuple[bool, str]:
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    try:
        detail = CASES[name](Ctx(tmp, big_mb, finished_run))
        return True, detail
    except NotHandled as exc:
        return False, str(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_all(workdir: Path, big_mb: int, names: list[str] | None = None, say=print) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    finished = finish_a_run(workdir)
    before = snapshot(finished)
    handled = 0
    names = names or list(CASES)
    for name in names:
        ok, detail = run_case(name, workdir, big_mb, finished)
        if ok:
            handled += 1
            say(f"  ok    {name:<38} {detail}")
        elif name in KNOWN_FAILURES:
            say(f"  KNOWN FAILURE {name:<30} {detail} ({KNOWN_FAILURES[name]})")
        else:
            say(f"  FAIL  {name:<38} {detail}")
    after = snapshot(finished)
    total = len(names) + 1
    if before == after:
        handled += 1
        say(f"  ok    {'finished_run_untouched':<38} {len(before)} files unchanged")
    else:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        say(f"  FAIL  {'finished_run_untouched':<38} changed: {changed}")
    say(f"{handled}/{total} hostile inputs handled")
    return handled if handled == total else -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="a 100 MB single line (default 5 MB)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="deeplm-hostile-"))
    return 0 if run_all(workdir, 100 if args.full else 5) >= 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
