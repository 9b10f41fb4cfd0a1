"""StateDB: the SQLite record of a run — stages with their cursors, artifacts, phases, metrics
and an append-only event log.

One database per run directory (``<run_dir>/state.db``), in WAL mode with a busy timeout, so
``deeplm status`` can read while a pipeline writes. The schema is versioned; migrations run on
open. Every state change also appends an event, which ``deeplm status`` shows.

Stage status values: ``pending`` → ``running`` → ``done`` (or ``failed``). A stage's ``cursor``
is a JSON object the stage defines (``{"last_doc_index": ...}``, ``{"last_step_count": ...}``);
a re-run resumes from it.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeplm.atomic import sha256_file
from deeplm.run.layout import RunLayout

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE runs (
        name TEXT PRIMARY KEY,
        config_json TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
    );
    CREATE TABLE stages (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL DEFAULT 'pending',
        cursor_json TEXT NOT NULL DEFAULT '{}',
        outputs_json TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        started_at REAL,
        finished_at REAL,
        elapsed_s REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE artifacts (
        path TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        producer TEXT NOT NULL,
        meta_json TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE TABLE phases (
        name TEXT PRIMARY KEY,
        idx INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        last_checkpoint TEXT,
        final_checkpoint TEXT,
        metrics_json TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        stage TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data_json TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_stage ON events(stage);
    """,
}


def owner_id() -> dict[str, Any]:
    """This process, as recorded for the stages it starts."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """Whether a stage's owner process still exists: None when it cannot be told (unknown
    owner, or another machine), else True/False."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, KeyError):
        return True
    return True


@dataclass
class StageRow:
    name: str
    status: str
    cursor: dict[str, Any]
    outputs: dict[str, Any]
    error: str | None
    started_at: float | None
    finished_at: float | None
    elapsed_s: float
    attempts: int


@dataclass
class PhaseRow:
    name: str
    idx: int
    status: str
    step: int
    total_steps: int
    tokens: int
    last_checkpoint: str | None
    final_checkpoint: str | None
    metrics: dict[str, Any]


class StateCorrupt(RuntimeError):
    """The state database is not a readable SQLite database (its message says what to do)."""


def corrupt_message(path: Path, exc: BaseException) -> str:
    """What is wrong with the state database ``path`` and how to recover."""
    return (
        f"{path}: the run's state database is damaged ({exc}). The run's files (data, "
        "tokenizer, shards, checkpoints) are not affected: rebuild the state from them with "
        "`deeplm run --rebuild-state` and the run's usual --preset/--config and --run-dir (the "
        f"damaged file is kept as {path.name}.corrupt-<time>; stages re-check their outputs, "
        "training resumes from the newest checkpoint)"
    )


class StateDB:
    """Thread-safe handle on a run's SQLite state (one connection, serialised by a lock).

    A file that is not a SQLite database raises :class:`StateCorrupt` on open."""

    def __init__(self, path: str | Path, readonly: bool = False, timeout_s: float = 30.0):
        self.path = Path(path)
        self.readonly = readonly
        try:
            self._open(readonly, timeout_s)
        except sqlite3.DatabaseError as exc:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, unreachable: not damage
                raise
            raise StateCorrupt(corrupt_message(self.path, exc)) from None

    def _open(self, readonly: bool, timeout_s: float) -> None:
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(
                    f"{self.path}: no state database (is this a run directory?)"
                )
            uri = f"file:{self.path}?mode=ro"
            self._conn = sqlite3.connect(
                uri, uri=True, timeout=timeout_s, check_same_thread=False, isolation_level=None
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if not readonly:
            self._migrate()

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {current} is newer than this deeplm "
                    f"({SCHEMA_VERSION}); upgrade deeplm"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        c.execute(statement)
            if row is None:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        return int(self._query("SELECT version FROM schema_version")[0][0])

    def _event(
        self,
        c: sqlite3.Connection,
        stage: str | None,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        c.execute(
            "INSERT INTO events (ts, stage, kind, message, data_json) VALUES (?, ?, ?, ?, ?)",
            (time.time(), stage, kind, message, json.dumps(data or {}, sort_keys=True)),
        )

    # ------------------------------------------------------------------ runs

    def init_run(self, name: str, config_json: str, replace: bool = False) -> bool:
        """Record the run; returns True when it is new. A database holds one run: another name
        is an error, and so is a different config unless ``replace`` (the caller checked that
        the change is allowed)."""
        now = time.time()
        with self._tx() as c:
            rows = c.execute("SELECT name, config_json FROM runs").fetchall()
            if not rows:
                c.execute(
                    "INSERT INTO runs (name, config_json, created_at, updated_at) VALUES (?,?,?,?)",
                    (name, config_json, now, now),
                )
                self._event(c, None, "run", f"run {name!r} created")
                return True
            names = [r[0] for r in rows]
            if names != [name] or (rows[0][1] != config_json and not replace):
                held = ", ".join(repr(n) for n in names)
                raise ValueError(
                    f"{self.path}: this run directory holds run {held} with a different "
                    "configuration; use a new --run-dir (nothing was changed)"
                )
            if rows[0][1] != config_json:
                c.execute(
                    "UPDATE runs SET config_json = ?, updated_at = ? WHERE name = ?",
                    (config_json, now, name),
                )
            return False

    def run_info(self) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM runs LIMIT 1")
        return dict(rows[0]) if rows else None

    def set_run_status(self, status: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET status = ?, updated_at = ?", (status, time.time()))
            self._event(c, None, "run", f"run {status}")

    # ------------------------------------------------------------------ stages

    def stage(self, name: str) -> StageRow:
        rows = self._query("SELECT * FROM stages WHERE name = ?", (name,))
        if not rows:
            return StageRow(name, "pending", {}, {}, None, None, None, 0.0, 0)
        return self._stage_row(rows[0])

    @staticmethod
    def _stage_row(r: sqlite3.Row) -> StageRow:
        return StageRow(
            name=r["name"],
            status=r["status"],
            cursor=json.loads(r["cursor_json"]),
            outputs=json.loads(r["outputs_json"]),
            error=r["error"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            elapsed_s=r["elapsed_s"],
            attempts=r["attempts"],
        )

    def stages(self) -> list[StageRow]:
        return [self._stage_row(r) for r in self._query("SELECT * FROM stages ORDER BY rowid")]

    def start_stage(self, name: str) -> StageRow:
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO stages (name, status, started_at, attempts)"
                " VALUES (?, 'running', ?, 1)"
                " ON CONFLICT(name) DO UPDATE SET status='running', started_at=excluded.started_at,"
                " attempts=attempts+1, error=NULL",
                (name, now),
            )
            row = c.execute("SELECT * FROM stages WHERE name = ?", (name,)).fetchone()
            resumed = bool(json.loads(row["cursor_json"]))
            self._event(
                c,
                name,
                "start",
                f"{name} {'resumed' if resumed else 'started'}",
                {
                    "cursor": json.loads(row["cursor_json"]),
                    "attempt": row["attempts"],
                    "owner": owner_id(),
                },
            )
        return self._stage_row(row)

    def stage_owner(self, name: str) -> dict[str, Any] | None:
        """``{"host", "pid"}`` of the process that last started stage ``name`` (from its start
        event), or None when unknown."""
        rows = self._query(
            "SELECT data_json FROM events WHERE stage = ? AND kind = 'start' "
            "ORDER BY id DESC LIMIT 1",
            (name,),
        )
        owner = json.loads(rows[0]["data_json"]).get("owner") if rows else None
        return owner if isinstance(owner, dict) else None

    def set_cursor(self, name: str, cursor: dict[str, Any]) -> None:
        """Persist a stage's resume cursor (called after the data it describes is durable)."""
        with self._tx() as c:
            c.execute(
                "UPDATE stages SET cursor_json = ? WHERE name = ?",
                (json.dumps(cursor, sort_keys=True), name),
            )

    @staticmethod
    def _elapsed(c: sqlite3.Connection, name: str, now: float) -> float:
        """Wall time spent in a stage over all attempts, including the running one."""
        r = c.execute("SELECT started_at, elapsed_s FROM stages WHERE name = ?", (name,)).fetchone()
        if r is None:
            return 0.0
        return (r["elapsed_s"] or 0.0) + (now - r["started_at"] if r["started_at"] else 0.0)

    def finish_stage(
        self, name: str, outputs: dict[str, Any] | None = None, message: str | None = None
    ) -> None:
        now = time.time()
        with self._tx() as c:
            elapsed = self._elapsed(c, name, now)
            c.execute(
                "UPDATE stages SET status='done', outputs_json=?, finished_at=?, elapsed_s=? "
                "WHERE name=?",
                (json.dumps(outputs or {}, sort_keys=True), now, elapsed, name),
            )
            self._event(c, name, "done", message or f"{name} done in {elapsed:.1f}s", outputs)

    def fail_stage(self, name: str, error: str) -> None:
        now = time.time()
        with self._tx() as c:
            elapsed = self._elapsed(c, name, now)
            c.execute(
                "UPDATE stages SET status='failed', error=?, elapsed_s=?, started_at=NULL "
                "WHERE name=?",
                (error, elapsed, name),
            )
            self._event(c, name, "failed", error)

    def pause_stage(self, name: str, reason: str) -> None:
        """Stop a running stage without failing it (cancel, interrupt): the cursor stays."""
        now = time.time()
        with self._tx() as c:
            elapsed = self._elapsed(c, name, now)
            c.execute(
                "UPDATE stages SET status='paused', elapsed_s=?, started_at=NULL WHERE name=?",
                (elapsed, name),
            )
            self._event(c, name, "paused", reason)

    def reset_stage(self, name: str, reason: str) -> None:
        """Forget a stage's progress (its artifacts are gone or invalid); it will run again."""
        with self._tx() as c:
            c.execute(
                "UPDATE stages SET status='pending', cursor_json='{}', outputs_json='{}', "
                "finished_at=NULL WHERE name=?",
                (name,),
            )
            self._event(c, name, "reset", reason)

    # ------------------------------------------------------------------ artifacts

    def record_artifact(
        self,
        path: str | Path,
        kind: str,
        producer: str,
        meta: dict[str, Any] | None = None,
        sha256: str | None = None,
    ) -> str:
        """Record a finished file with its size and sha256; returns the digest.

        Files inside the run directory (the database's folder) are recorded by their path
        relative to it, so a run directory can be moved or copied to another machine."""
        p = self._abs(path)
        digest = sha256 or sha256_file(p)
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO artifacts (path, kind, bytes, sha256, producer, meta_json,"
                " created_at) VALUES (?,?,?,?,?,?,?)",
                (
                    self._key(p),
                    kind,
                    p.stat().st_size,
                    digest,
                    producer,
                    json.dumps(meta or {}, sort_keys=True),
                    time.time(),
                ),
            )
        return digest

    @staticmethod
    def _abs(path: str | Path) -> Path:
        return Path(path).resolve()

    def _key(self, path: str | Path) -> str:
        """How a path is stored: relative to the run directory when inside it."""
        p = self._abs(path)
        try:
            return str(p.relative_to(self.path.parent.resolve()))
        except ValueError:
            return str(p)

    def _row(self, row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        out["path"] = str(self.path.parent.resolve() / out["path"])  # absolute keys stay as is
        return out

    def artifact(self, path: str | Path) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM artifacts WHERE path = ?", (self._key(path),))
        return self._row(rows[0]) if rows else None

    def artifacts(self, producer: str | None = None) -> list[dict[str, Any]]:
        if producer is None:
            rows = self._query("SELECT * FROM artifacts ORDER BY created_at")
        else:
            rows = self._query(
                "SELECT * FROM artifacts WHERE producer = ? ORDER BY created_at", (producer,)
            )
        return [self._row(r) for r in rows]

    def artifact_ok(self, path: str | Path, verify_hash: bool = False) -> bool:
        """True when the artifact is recorded and the file on disk still matches it."""
        rec = self.artifact(path)
        p = self._abs(path)
        if rec is None or not p.is_file() or p.stat().st_size != rec["bytes"]:
            return False
        return not verify_hash or sha256_file(p) == rec["sha256"]

    # ------------------------------------------------------------------ phases

    def upsert_phase(self, name: str, idx: int, **fields: Any) -> None:
        allowed = {
            "status",
            "step",
            "total_steps",
            "tokens",
            "last_checkpoint",
            "final_checkpoint",
            "metrics",
        }
        bad = set(fields) - allowed
        if bad:
            raise KeyError(f"unknown phase fields {sorted(bad)}")
        with self._tx() as c:
            c.execute(
                "INSERT INTO phases (name, idx, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO NOTHING",
                (name, idx, time.time()),
            )
            for key, value in fields.items():
                col = "metrics_json" if key == "metrics" else key
                if key == "metrics":
                    value = json.dumps(value, sort_keys=True)
                c.execute(
                    f"UPDATE phases SET {col} = ?, updated_at = ? WHERE name = ?",
                    (value, time.time(), name),
                )

    def phase(self, name: str) -> PhaseRow | None:
        rows = self._query("SELECT * FROM phases WHERE name = ?", (name,))
        return self._phase_row(rows[0]) if rows else None

    @staticmethod
    def _phase_row(r: sqlite3.Row) -> PhaseRow:
        return PhaseRow(
            name=r["name"],
            idx=r["idx"],
            status=r["status"],
            step=r["step"],
            total_steps=r["total_steps"],
            tokens=r["tokens"],
            last_checkpoint=r["last_checkpoint"],
            final_checkpoint=r["final_checkpoint"],
            metrics=json.loads(r["metrics_json"]),
        )

    def phases(self) -> list[PhaseRow]:
        return [self._phase_row(r) for r in self._query("SELECT * FROM phases ORDER BY idx")]

    # ------------------------------------------------------------------ events

    def log_event(
        self, stage: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self._tx() as c:
            self._event(c, stage, kind, message, data)

    def events(self, limit: int = 50, stage: str | None = None) -> list[dict[str, Any]]:
        if stage is None:
            rows = self._query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                "SELECT * FROM events WHERE stage = ? ORDER BY id DESC LIMIT ?", (stage, limit)
            )
        out = [dict(r) | {"data": json.loads(r["data_json"])} for r in rows]
        for e in out:
            e.pop("data_json", None)
        return list(reversed(out))


def rebuild_state(run_dir: Path) -> Path | None:
    """Move a damaged ``state.db`` (and its WAL files) aside to ``state.db.corrupt-<time>``
    so the next run starts a fresh state; returns where it went (None: nothing to move, or the
    database is readable and is kept)."""
    path = RunLayout(run_dir).state_db
    if not path.exists():
        return None
    try:
        StateDB(path, readonly=True).close()
        return None  # readable: nothing to rebuild
    except StateCorrupt:
        pass
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    return aside
