"""Serve a trained run with ``deeplm serve`` and ask it through the official ``openai`` client.

A check for the end of a playbook run (``bench/gpu_playbook.sh``), not a test. It starts
``python -m deeplm.cli serve`` on a free port as a subprocess, waits for ``GET /health``, lists
the models, then asks one chat completion, one text completion and one streamed chat completion
with ``openai.OpenAI``, writes every answer and its timing as JSON, and stops the server. Exit
status 0 only when every request was answered with text.

    python bench/ask_served.py --run-dir runs/60m --json out/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until ``url`` answered 200; raises if the server exits or the time runs out."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"deeplm serve exited with status {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def ask(base_url: str, max_tokens: int) -> dict[str, Any]:
    """The three requests through the openai client; each with its answer and seconds."""
    from openai import OpenAI  # the client under test; only this script needs it

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    out: dict[str, Any] = {"model": model}
    t0 = time.perf_counter()
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is deeplm?"}],
        max_tokens=max_tokens,
        temperature=0.7,
    )
    out["chat"] = {
        "prompt": "What is deeplm?",
        "answer": chat.choices[0].message.content,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump() if chat.usage else None,
        "seconds": time.perf_counter() - t0,
    }
    t0 = time.perf_counter()
    comp = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=max_tokens, temperature=0.8
    )
    out["completion"] = {
        "prompt": "Once upon a time",
        "answer": comp.choices[0].text,
        "finish_reason": comp.choices[0].finish_reason,
        "seconds": time.perf_counter() - t0,
    }
    t0 = time.perf_counter()
    pieces = []
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the history of the"}],
        max_tokens=max_tokens,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    out["stream"] = {
        "chunks": len(pieces),
        "answer": "".join(pieces),
        "seconds": time.perf_counter() - t0,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--json", required=True, help="where to write the answers")
    ap.add_argument("--log", help="the server's output (default: beside --json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    port = free_port()
    log_path = Path(args.log or Path(args.json).with_suffix(".log"))
    cmd = [sys.executable, "-m", "deeplm.cli", "serve", "--run-dir", args.run_dir]
    cmd += ["--port", str(port), "--device", args.device]
    result: dict[str, Any] = {"command": " ".join(cmd)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            health = f"http://127.0.0.1:{port}/health"
            result["ready_s"] = wait_healthy(health, proc, args.ready_timeout)
            result.update(ask(f"http://127.0.0.1:{port}/v1", args.max_tokens))
            answers = [result[k]["answer"] for k in ("chat", "completion", "stream")]
            result["ok"] = all(isinstance(a, str) and a.strip() for a in answers)
        except Exception as exc:  # reported in the JSON and the exit status
            result["ok"], result["error"] = False, f"{type(exc).__name__}: {exc}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
