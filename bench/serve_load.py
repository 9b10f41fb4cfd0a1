"""Load benchmark of ``deeplm serve``: total generated tokens/s for 1, 4 and 16 concurrent clients.

A benchmark, not a test. It starts ``python -m deeplm.cli serve`` as a subprocess on a trained
run (``--src`` picks the source tree, so an older version of the server can be measured with the
same script), then for each client count runs that many threads, each sending
``--requests`` completions one after the other (greedy, ``--max-tokens`` each, distinct
prompts), and reports the generated tokens (the server's ``usage.completion_tokens``) per second
of wall time, and the mean request latency.

Without a finished run in ``--run-dir`` it trains one first: the ``tiny`` preset's model
(6 x 192, vocab 8192, context 256) on the fault-injection harness's short two-phase schedule
(about a minute on 2 CPU cores).

    python bench/serve_load.py --run-dir /tmp/serve-bench --label after
    python bench/serve_load.py --run-dir /tmp/serve-bench --src /tmp/old/src --label before
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def ensure_run(run_dir: Path) -> None:
    """Train the benchmark's run into ``run_dir`` unless it is finished already (idempotent)."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from bench.fault_injection import micro_two_phase
    from deeplm.config import config_from_dict, load_config
    from deeplm.pipeline.local import run_local

    tiny = load_config(preset="tiny")
    cfg = micro_two_phase() | {"name": "serve-bench"}
    cfg["model"] = cfg["model"] | {
        "n_layers": tiny.model.n_layers,
        "d_model": tiny.model.d_model,
        "n_heads": tiny.model.n_heads,
        "vocab_size": tiny.model.vocab_size,
        "max_seq_len": tiny.model.max_seq_len,
    }
    cfg["tokenizer"] = {"vocab_size": tiny.model.vocab_size}
    summary = run_local(run_dir, config_from_dict(cfg), log=lambda s: None)
    if summary["status"] != "done":
        raise SystemExit(f"training the benchmark run in {run_dir} failed: {summary}")


def start_server(run_dir: Path, src: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deeplm.cli", "serve", "--run-dir", str(run_dir), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"on http://([\d.]+:\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit("the server did not start")


def one_request(addr: str, model: str, prompt: str, max_tokens: int) -> int:
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers={})
        resp = conn.getresponse()
        data = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data}")
    return int(data["usage"]["completion_tokens"])


def measure(addr: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    tokens = [0] * clients
    latencies: list[float] = []
    errors: list[str] = []

    def client(c: int) -> None:
        for r in range(requests):
            t0 = time.perf_counter()
            try:
                tokens[c] += one_request(addr, model, f"Client {c} asks {r}: the", max_tokens)
            except Exception as exc:  # reported, not raised: one failure must not hide the rest
                errors.append(str(exc))
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": clients * requests,
        "tokens": sum(tokens),
        "seconds": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_latency_s": round(sum(latencies) / len(latencies), 2),
        "errors": errors[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the deeplm source tree")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--label", default="run")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("server_args", nargs="*", help="extra `deeplm serve` flags (after --)")
    args = ap.parse_args()
    ensure_run(args.run_dir)
    proc, addr = start_server(args.run_dir, args.src, args.server_args)
    results: list[dict[str, Any]] = []
    try:
        one_request(addr, "serve-bench", "warm up", 4)
        for clients in args.clients:
            r = measure(addr, "serve-bench", clients, args.requests, args.max_tokens)
            results.append(r)
            print(
                f"{args.label}: {clients:>2} clients: {r['tokens']} tokens in {r['seconds']} s = "
                f"{r['tokens_per_s']} tok/s, mean latency {r['mean_latency_s']} s"
                + (f", errors {r['errors']}" if r["errors"] else ""),
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"label": args.label, "results": results}, indent=2) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
