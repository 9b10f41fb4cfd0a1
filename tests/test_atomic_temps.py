"""Unfinished temp files: which names count, and sweeping a folder."""

from __future__ import annotations

from deeplm.atomic import atomic_write_text, is_temp_name, remove_stale_temps


def test_temp_names_of_every_writer_and_nothing_else():
    for name in (".val.json.a1b2c3.tmp", ".train.jsonl.tmp-4242", ".loss.png.tmp.png"):
        assert is_temp_name(name), name
    for name in ("val.json", "tmp", ".hidden", "train.tmp", ".lock", "notes.tmp-1"):
        assert not is_temp_name(name), name


def test_sweep_removes_only_temps_and_respects_recursion(tmp_path):
    atomic_write_text(tmp_path / "done.json", "{}")
    (tmp_path / ".done.json.x9.tmp").write_text("half")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".part.jsonl.tmp-7").write_text("half")
    assert remove_stale_temps(tmp_path) == [tmp_path / ".done.json.x9.tmp"]
    assert (tmp_path / "sub" / ".part.jsonl.tmp-7").exists()
    assert remove_stale_temps(tmp_path, recursive=True) == [tmp_path / "sub" / ".part.jsonl.tmp-7"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["done.json", "sub"]
    assert remove_stale_temps(tmp_path / "missing") == []
