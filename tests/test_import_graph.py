"""The architecture, checked: deeplm's parts import each other in one direction only, with no
cycle between them, and only :mod:`deeplm.run.layout` spells the run directory's file names.

The parts are the subpackages and top-level modules of ``src/deeplm``. :data:`LAYERS` lists them
from the bottom up; a part may import only parts of lower layers::

    cli, smoke                 the commands
      └─ pipeline              the stages and their orchestrators (local, Temporal)
           └─ serve            the HTTP server
                └─ train       the training loop (it evaluates while it trains)
                     └─ eval   the evaluation suite and report
                          └─ export   loading a model; the Hugging Face format
                               └─ data      sources, cleaning, shards, batches
                                    └─ run        the run directory: layout, lock, state,
                                         │        config file, checkpoint folders
                                         └─ model     the Transformer
                                              └─ chat → tokenizer → atomic, config, device

Every import counts: at module top, inside a function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "deeplm"

LAYERS: list[set[str]] = [
    {"atomic", "config", "device"},
    {"tokenizer"},
    {"chat"},
    {"model"},
    {"run"},
    {"data"},
    {"export"},
    {"eval"},
    {"train"},
    {"serve"},
    {"pipeline"},
    {"cli", "smoke"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}

# The run directory's file names: only run/layout.py spells them. export/hf.py writes the
# Hugging Face format's own ``config.json`` (a model config, not a run's): allowed there only.
RUN_FILE_NAMES = ("state.db", "config.json")
ALLOWED_SPELLERS = {
    "state.db": {"run/layout.py"},
    "config.json": {"run/layout.py", "export/hf.py"},
}


def part_of(path: Path, src: Path = SRC) -> str:
    """``src/deeplm/eval/suite.py`` -> ``eval``; ``src/deeplm/cli.py`` -> ``cli``."""
    rel = path.relative_to(src)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["deeplm", *parts])


def imported_modules(path: Path, src: Path = SRC) -> Iterable[tuple[str, int]]:
    """``(module, line)`` of every import in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path, src).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "deeplm":  # from deeplm import device: the names are the parts
                for alias in node.names:
                    yield f"deeplm.{alias.name}", node.lineno
            else:
                yield module, node.lineno


def import_graph(src: Path = SRC) -> dict[tuple[str, str], list[str]]:
    """``{(importing part, imported part): ["file:line", ...]}`` between different parts."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(src.rglob("*.py")):
        if path == src / "__init__.py":
            continue
        a = part_of(path, src)
        for module, line in imported_modules(path, src):
            names = module.split(".")
            if names[0] != "deeplm" or len(names) < 2 or names[1] == a:
                continue
            edges.setdefault((a, names[1]), []).append(f"{path.relative_to(src)}:{line}")
    return edges


def find_cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layering_violations(
    edges: dict[tuple[str, str], list[str]], rank: dict[str, int] = RANK
) -> list[str]:
    """Every import of a part by a part of the same or a lower layer, and every unplaced part."""
    problems = []
    for (a, b), where in sorted(edges.items()):
        if a not in rank or b not in rank:
            unplaced = a if a not in rank else b
            problems.append(f"{unplaced}: not in LAYERS (place it in test_import_graph.py)")
        elif rank[a] <= rank[b]:
            problems.append(f"{a} imports {b} against the layering: {', '.join(where)}")
    return problems


# ------------------------------------------------------------------------------ the checks


def test_the_checks_can_fail():
    """Self-check on synthetic graphs: a cycle and an upward import are both reported."""
    assert find_cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert find_cycles([("a", "b"), ("b", "c")]) == []
    edges = {("model", "train"): ["model/x.py:1"], ("train", "model"): ["train/y.py:2"]}
    assert find_cycles(edges) == [["model", "train"]]
    assert layering_violations(edges) == ["model imports train against the layering: model/x.py:1"]
    assert layering_violations({("run", "eval"): ["run/z.py:3"]}) != []
    assert layering_violations({("newpart", "run"): ["newpart/a.py:1"]}) != []


def test_imports_are_found_wherever_they_are(tmp_path):
    pkg = tmp_path / "deeplm"
    (pkg / "eval").mkdir(parents=True)
    (pkg / "eval" / "__init__.py").write_text("")
    (pkg / "eval" / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import y\n"
        "from ..train import trainer\n"
        "if TYPE_CHECKING:\n"
        "    from deeplm.pipeline import stages\n"
        "def f():\n"
        "    import deeplm.serve.server\n"
        "    from deeplm import run\n"
    )
    edges = import_graph(pkg)
    assert set(edges) == {("eval", p) for p in ("train", "pipeline", "serve", "run")}


def test_every_part_is_placed_in_a_layer():
    parts = {part_of(p) for p in SRC.rglob("*.py") if p != SRC / "__init__.py"}
    assert parts - set(RANK) == set(), "place new parts in LAYERS"


def test_no_cycle_between_parts():
    edges = import_graph()
    assert find_cycles(edges) == [], {e: w for e, w in edges.items()}


def test_imports_follow_the_layering():
    assert layering_violations(import_graph()) == []


def test_only_the_layout_spells_the_run_files():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES:
                if rel not in ALLOWED_SPELLERS[node.value]:
                    found.append(f"{rel}:{node.lineno} spells {node.value!r}")
    assert found == [], "ask deeplm.run.layout.RunLayout for the path"
