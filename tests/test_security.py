"""Security properties of the whole source tree, checked on its syntax tree, plus the loopback
defaults of the servers: no shell=True, pickles only through weights_only=True, no remote code
from the Hugging Face hub, servers bound to loopback unless told otherwise."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import deeplm
from deeplm.pipeline.temporal.server import TemporalServerError, start_dev_server
from deeplm.serve import server

SRC = Path(deeplm.__file__).parent
ROOTS = [SRC, SRC.parents[1] / "scripts", SRC.parents[1] / "bench"]


def _calls():
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path, node


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_tree_is_scanned():
    assert sum(1 for _ in _calls()) > 1000


def test_no_shell_true():
    bad = [
        f"{p}:{c.lineno}"
        for p, c in _calls()
        if isinstance(_kw(c, "shell"), ast.Constant) and _kw(c, "shell").value is True
    ]
    assert not bad, bad


def test_torch_load_only_with_weights_only():
    loads = [(p, c) for p, c in _calls() if _name(c).endswith("torch.load")]
    assert loads  # the trainer state is loaded somewhere
    bad = []
    for p, c in loads:
        value = _kw(c, "weights_only")
        if not (isinstance(value, ast.Constant) and value.value is True):
            bad.append(f"{p}:{c.lineno}")
    assert not bad, bad


def test_no_remote_code_from_the_hub():
    bad = [
        f"{p}:{c.lineno}"
        for p, c in _calls()
        if isinstance(_kw(c, "trust_remote_code"), ast.Constant)
        and _kw(c, "trust_remote_code").value is True
    ]
    assert not bad, bad


def test_servers_default_to_loopback(tmp_path):
    hosts = [
        p.default
        for _, fn in inspect.getmembers(server, inspect.isfunction)
        for name, p in inspect.signature(fn).parameters.items()
        if name == "host" and p.default is not inspect.Parameter.empty
    ]
    assert hosts and set(hosts) == {"127.0.0.1"}
    with pytest.raises(TemporalServerError):
        start_dev_server(tmp_path, address="0.0.0.0:7233", wait_s=1)
