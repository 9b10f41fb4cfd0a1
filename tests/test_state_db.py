"""StateDB on real SQLite: WAL, schema version, stages and cursors, artifacts, events, readers."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from deeplm.run.state_db import SCHEMA_VERSION, StateDB


def test_a_database_holds_one_run(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.init_run("mine", '{"a": 1}')
    with pytest.raises(ValueError, match="holds run 'mine'"):
        db.init_run("60m", '{"a": 1}')  # another name is another run: refused, not added
    assert db.init_run("mine", '{"a": 2}', replace=True) is False  # a checked, allowed change
    assert [r[0] for r in db._query("SELECT name FROM runs")] == ["mine"]
    assert db.run_info()["config_json"] == '{"a": 2}'
    db.close()


def test_stage_owner_is_recorded_and_checked(tmp_path):
    import os
    import subprocess
    import sys

    from deeplm.run.state_db import owner_alive

    db = StateDB(tmp_path / "state.db")
    db.start_stage("prepare")
    owner = db.stage_owner("prepare")
    assert owner is not None and owner["pid"] == os.getpid() and owner_alive(owner) is True
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert owner_alive(owner | {"pid": int(gone.stdout)}) is False
    assert owner_alive(owner | {"host": "another-machine"}) is None
    db.close()


def test_wal_schema_and_stage_lifecycle(tmp_path):
    db = StateDB(tmp_path / "state.db")
    mode = db._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert db.schema_version() == SCHEMA_VERSION
    assert db.init_run("r", '{"a": 1}') is True
    assert db.init_run("r", '{"a": 1}') is False
    with pytest.raises(ValueError, match="different configuration"):
        db.init_run("r", '{"a": 2}')
    db.start_stage("tokenize:p")
    db.set_cursor("tokenize:p", {"train": {"last_doc_index": 256}})
    db.pause_stage("tokenize:p", "killed")
    row = db.start_stage("tokenize:p")
    assert row.cursor == {"train": {"last_doc_index": 256}} and row.attempts == 2
    db.finish_stage("tokenize:p", {"tokens": 10})
    row = db.stage("tokenize:p")
    assert row.status == "done" and row.outputs == {"tokens": 10}
    kinds = [e["kind"] for e in db.events(stage="tokenize:p")]
    assert kinds == ["start", "paused", "start", "done"]
    db.close()
    # reopening keeps everything and does not re-run migrations
    db2 = StateDB(tmp_path / "state.db")
    assert db2.stage("tokenize:p").status == "done"
    db2.close()


def test_artifacts_detect_changed_files(tmp_path):
    db = StateDB(tmp_path / "state.db")
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    digest = db.record_artifact(f, "shard", "test")
    assert len(digest) == 64
    assert db.artifact_ok(f, verify_hash=True)
    f.write_bytes(b"hellO")  # same size, other content
    assert db.artifact_ok(f) is True
    assert db.artifact_ok(f, verify_hash=True) is False
    f.unlink()
    assert db.artifact_ok(f) is False
    db.close()


def test_failed_stage_and_reset(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.start_stage("prepare")
    db.set_cursor("prepare", {"parts": {"a": 1}})
    db.fail_stage("prepare", "ValueError: bad file x.txt")
    assert db.stage("prepare").error == "ValueError: bad file x.txt"
    db.reset_stage("prepare", "outputs missing")
    row = db.stage("prepare")
    assert row.status == "pending" and row.cursor == {}
    db.close()


def test_newer_schema_is_refused(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.close()
    con = sqlite3.connect(tmp_path / "state.db")
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer"):
        StateDB(tmp_path / "state.db")


def test_readonly_reader_while_writer_writes(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.init_run("r", "{}")
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            db.log_event("s", "progress", f"event {i}")
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        reader = StateDB(tmp_path / "state.db", readonly=True)
        seen = [len(reader.events(limit=10_000)) for _ in range(50)]
        reader.close()
    finally:
        stop.set()
        t.join()
    assert seen[-1] >= seen[0]
    with pytest.raises(sqlite3.OperationalError):
        ro = StateDB(tmp_path / "state.db", readonly=True)
        ro.log_event(None, "x", "readers cannot write")
