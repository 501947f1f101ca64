"""The package layering and the absence of import cycles, read from the source (AST, no import is run).

Layers, lowest first (issue 16 item 4)::

    jaxtok (core: config, registry, data, metrics, ...)  <  models  <  decode  <  train  <  bench

A module may import its own layer and the layers below it; ``bench`` may import all of them. The command-line
modules of ``jaxtok/`` (:data:`COMMAND_LINE`) sit on top of everything: they may import any layer and nothing
imports them. Every import counts: module-level and function-local ones, ``import a.b`` and ``from a import b``
(relative imports resolved against the importing module's package), type-only ones (``if TYPE_CHECKING:``)
included. Imports done by name through ``importlib`` (the handler table of :mod:`jaxtok.handlers`, the registries'
``import_registering_modules``) are not imports here: they load plug-ins by configuration.

A cycle is a strongly connected component of more than one module in the module-level import graph of the imports
that run: function-local ones included (a function-local import that closes a loop still ties the two modules
together), type-only ones left out (they never run).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = ("jaxtok", "models", "decode", "train", "bench")  # lowest first
# What each layer may import (its own layer included).
ALLOWED = {
    "jaxtok": {"jaxtok"},
    "models": {"jaxtok", "models"},
    "decode": {"jaxtok", "models", "decode"},
    "train": {"jaxtok", "models", "decode", "train"},
    "bench": set(LAYERS),
}
# The command line: it dispatches to every layer, so it may import every layer (and nothing below imports it).
# (jaxtok.recipe runs the same handlers through jaxtok.handlers' table, by name, so it is an ordinary core module.)
COMMAND_LINE = {
    "jaxtok.cli",  # `jaxtok list presets` and `jaxtok convert` import jaxtok.models.presets / jaxtok.models.hf
}


def package_dirs() -> dict[str, Path]:
    """``{package: directory}`` of the installed packages, as pyproject.toml maps them."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / cfg["package-dir"][pkg] for pkg in cfg["packages"]}


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of every package (``__init__`` as the package itself)."""
    out = {}
    for pkg, d in package_dirs().items():
        for f in sorted(d.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def layer_of(module: str) -> str:
    """The layer of a ``jaxtok...`` module: ``jaxtok.<layer>...`` for models/decode/train/bench, else core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[1:] else "jaxtok"


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import nodes inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            out |= {n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def imports_of(module: str, path: Path, known: set[str], *, type_only: bool = True) -> set[str]:
    """The ``jaxtok`` modules that ``module`` imports anywhere in its file (``type_only=False``: without the imports
    under ``if TYPE_CHECKING:``). ``from a import b`` names ``a.b`` when that is a module, else ``a``; relative
    imports resolve against the module's package."""
    is_pkg = path.stem == "__init__"
    package = module if is_pkg else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if type_only else _type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for name in names:
            # `import jaxtok.decode.diffusion` names the module itself; a name below a module (a.b.attr) its module
            while name and name not in known and "." in name:
                name = name.rpartition(".")[0]
            if name in known and name != module:
                found.add(name)
    return found


def import_graph(*, type_only: bool = True) -> dict[str, set[str]]:
    """``{module: the jaxtok modules it imports}`` over every module of every package."""
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known, type_only=type_only) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(out, key=lambda c: (-len(c), c))


def test_the_package_map_covers_every_layer():
    mods = modules()
    assert {layer_of(m) for m in mods} == set(LAYERS)
    assert COMMAND_LINE <= set(mods)
    assert len(mods) > 50  # every package's modules were found


def test_each_layer_imports_only_the_layers_below_it():
    """``jaxtok/`` imports no models/train/decode/bench (the command line aside); ``models/`` only ``jaxtok``;
    ``decode/`` ``jaxtok`` + ``models``; ``train/`` those and ``decode``; ``bench/`` anything."""
    violations = []
    for module, targets in sorted(import_graph().items()):
        if module in COMMAND_LINE:
            continue
        allowed = ALLOWED[layer_of(module)]
        for target in sorted(targets):
            if layer_of(target) not in allowed or target in COMMAND_LINE:
                violations.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_no_import_cycles():
    found = cycles(import_graph(type_only=False))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_are_for():
    """The helpers themselves: a relative import resolves, a function-local import counts, a cycle is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "jaxtok.decode.generate" in graph["jaxtok.decode"]  # `from .generate import generate` in decode/__init__
    assert "jaxtok.bench.decode" in graph["jaxtok.bench.train"]  # `from .decode import execution_options`
    assert layer_of("jaxtok.train.objectives.distill") == "train" and layer_of("jaxtok.tasks.arith") == "jaxtok"


def test_relative_function_local_and_type_only_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from jaxtok.plan import RunPlan\n\n\n"
                 "def f():\n    from . import registry\n    from .models.cache import KVCache\n")
    known = {"jaxtok.plan", "jaxtok.registry", "jaxtok.m", "jaxtok.models", "jaxtok.models.cache"}
    assert imports_of("jaxtok.m", f, known) == {"jaxtok.plan", "jaxtok.registry", "jaxtok.models.cache"}
    assert imports_of("jaxtok.m", f, known, type_only=False) == {"jaxtok.registry", "jaxtok.models.cache"}
