"""Imports flow one way: no module of poserft imports from a layer above its own.

The layers, lowest first, follow the package list of the design notes (design.md,
"Layout"): each stage is built on the ones before it. A module may import its own package
(subpackage or top-level module of poserft) and any package of a LOWER layer; packages that
share a layer are independent of each other (``rl`` and ``eval`` both build on ``train``;
neither needs the other). Every import counts: module level, inside functions, under
``TYPE_CHECKING``, relative, and ``importlib.import_module("poserft...")`` with a literal
name. A lower layer that needs something of a higher one gets it moved down (MPJPE lives in
``body.metrics``, Recall@K in ``retrieval.metrics``, ``eval.metrics`` re-exports both; the
default answer-format regex in ``model.config``; the train-split mean poses in
``train.data.SplitPoses``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "poserft"

# Lowest first. A name is a subpackage or top-level module of poserft ("__init__": the
# package itself); names in one tuple share a layer and must not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "configbase", "atomic", "tracking"),   # infrastructure: no domain imports
    ("body",),          # rotations, kinematic tree, FK, joint sets, joint-error metrics
    ("data",),          # HDF5 schema, readers/writers, converters, synthetic world
    ("text",),          # tokenizer, text embedders
    ("retrieval",),     # text-pose retrieval model, its training, Recall@K
    ("model",),         # pose MLLM: backbone, vision, fusion, heads
    ("train",),         # SFT and the training engine shared with RFT
    ("rl", "eval"),     # rollout, rewards, HyGRPO trainer | benchmarks, tables, plots
    ("config",),        # the whole config: assembles every package's section
    ("workflow", "cli"),  # Snakemake glue, the command line
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}

# (importing module, imported module): edges against the layering that stay until code
# outside this change moves. Each must still exist (a test fails once one is fixed, so that
# it leaves the list).
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str:
    """The LAYERS name of ``poserft[.name[...]]``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> int:
    """Layer of ``poserft[.name[...]]``; KeyError for a name not in LAYERS."""
    return LAYER_OF[package_of(module)]


def allowed(importer: str, imported: str) -> bool:
    return (package_of(importer) == package_of(imported)
            or layer_of(imported) < layer_of(importer))


def imported_modules(path: Path, root: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every poserft import in one file."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
        elif (isinstance(node, ast.Call) and node.args
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return [(m, line) for m, line in out if m == "poserft" or m.startswith("poserft.")]


def back_edges(root: Path = ROOT) -> list[tuple[str, str, int]]:
    """(importer, imported, line) of every import of a package of the importer's layer or
    above (other than its own)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for imported, line in imported_modules(path, root):
            if not allowed(importer, imported):
                found.append((importer, imported, line))
    return found


def test_every_module_has_a_layer():
    names = {p.stem if p.parent == ROOT else p.relative_to(ROOT).parts[0]
             for p in ROOT.rglob("*.py")}
    assert names <= set(LAYER_OF), f"add to LAYERS: {sorted(names - set(LAYER_OF))}"


def test_imports_flow_one_way():
    edges = back_edges()
    new = [f"{a} (line {line}) imports {b}: {package_of(b)!r} is not below {package_of(a)!r} "
           f"(layers: {LAYERS})" for a, b, line in edges if (a, b) not in KNOWN_EXCEPTIONS]
    assert not new, "imports against the layering (move the shared piece down):\n" + "\n".join(new)


def test_known_exceptions_are_still_needed():
    stale = KNOWN_EXCEPTIONS - {(a, b) for a, b, _ in back_edges()}
    assert not stale, f"fixed: remove from KNOWN_EXCEPTIONS: {sorted(stale)}"


@pytest.mark.parametrize("source, expected", [
    ("from poserft.eval.metrics import mpjpe", [("poserft.eval.metrics", 1)]),
    ("def f():\n    import poserft.rl.config as c", [("poserft.rl.config", 2)]),
    ("from ..train import data", [("poserft.train", 1)]),
    ("from . import heads", [("poserft.model", 1)]),
    ("from poserft.body import load", [("poserft.body", 1)]),
    ("import importlib\nimportlib.import_module('poserft.eval.runner')", [("poserft.eval.runner", 2)]),
    ("import torch\nfrom typing import Any", []),
])
def test_the_checker_sees_every_kind_of_import(tmp_path, source, expected):
    pkg = tmp_path / "poserft" / "model"
    pkg.mkdir(parents=True)
    (pkg / "policy.py").write_text(source)
    assert imported_modules(pkg / "policy.py", tmp_path / "poserft") == expected
    edges = back_edges(tmp_path / "poserft")
    assert [(b, line) for _, b, line in edges] == [
        (m, line) for m, line in expected if m.split(".")[1] in ("eval", "rl", "train")]


def test_packages_of_one_layer_are_independent():
    assert not allowed("poserft.eval.config", "poserft.rl.config")
    assert not allowed("poserft.rl.rewards", "poserft.eval.metrics")
    assert allowed("poserft.eval.runner", "poserft.train.data")
    assert allowed("poserft.eval.runner", "poserft.eval.metrics")
    assert not allowed("poserft.retrieval.train", "poserft.eval.metrics")
    assert not allowed("poserft.model.testing", "poserft.train.data")
