"""Imports point down the layers, read from the code's own import statements.

Layers, lowest first (README "Layout"): the foundations in ``fedwarden/`` (errors, config,
models, weights, records, attacks, plugins, data, protocol); ``fedwarden.aggregation``;
``fedwarden.server`` and ``fedwarden.clients`` side by side, never importing each other;
``fedwarden.simulations``; the command line ``fedwarden.cli``, the Python API ``fedwarden.api``
and ``fedwarden.__main__``.
A module may import its own layer and the layers below it. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGE_DIRS = {
    "fedwarden": "fedwarden",
    "aggregation": "fedwarden.aggregation",
    "server": "fedwarden.server",
    "clients": "fedwarden.clients",
    "simulations": "fedwarden.simulations",
}
# The Python API (fedwarden.api: simulate, chain) sits on top, beside the command line.
LAYERS = {"aggregation": 1, "server": 2, "clients": 2, "simulations": 3, "cli": 4, "api": 4,
          "__main__": 4}  # fmt: skip
BARE_NAMES = {"server", "clients", "aggregation", "simulations"}
SKIP_PARTS = {"proto_gen", "node_modules", "__pycache__", "site-packages"}  # and hidden dirs


def skipped(relative: Path) -> bool:
    """Generated code, virtualenvs (.venv, bench/.flwr-venv) and other hidden directories."""
    return any(part in SKIP_PARTS or part.startswith(".") for part in relative.parts[:-1])


def layer(module: str) -> tuple[int, str] | None:
    """(layer, subpackage) of a fedwarden module; None for anything else."""
    parts = module.split(".")
    if parts[0] != "fedwarden":
        return None
    sub = parts[1] if len(parts) > 1 else ""
    return LAYERS.get(sub, 0), sub if sub in LAYERS else "foundations"


def package_modules() -> dict[str, Path]:
    modules = {}
    for folder, prefix in SUBPACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if skipped(path.relative_to(ROOT)):
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            modules[".".join([prefix, *rel])] = path
    return modules


def imported_names(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, module name) of every import in the file, relative ones resolved against
    ``module``, plus ``importlib.import_module("...")`` and ``__import__("...")`` with a literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or "").split(".")
    if module is not None and path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` imports the submodule x of the package
                found += (
                    [(node.lineno, f"{name}.{a.name}") for a in node.names]
                    if not node.module
                    else [(node.lineno, name)]
                )
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if callee in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(module: str, path: Path) -> list[str]:
    mine = layer(module)
    problems = []
    for line, name in imported_names(path, module):
        theirs = layer(name)
        if mine is None or theirs is None:
            continue
        (my_level, my_sub), (their_level, their_sub) = mine, theirs
        if their_level > my_level or (their_level == my_level == 2 and their_sub != my_sub):
            problems.append(
                f"{path.relative_to(ROOT)}:{line}: {module} ({my_sub}) imports {name} ({their_sub})"
            )
    return problems


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    cases = {
        "fedwarden.server.x": "from fedwarden.clients.training import LocalTrainer\n",
        "fedwarden.clients.x": "import fedwarden.server.hub\n",
        "fedwarden.aggregation.x": "def f():\n    from fedwarden.server import checkpoint\n",
        "fedwarden.models": "import importlib\nimportlib.import_module('fedwarden.simulations.runner')\n",
        "fedwarden.simulations.x": "from ..cli import main\n",
    }
    for module, source in cases.items():
        path = ROOT / "tests" / "_layer_case.py"  # inside ROOT so the message can name it
        path.write_text(source)
        try:
            assert len(violations(module, path)) == 1, (module, source)
        finally:
            path.unlink()
    allowed = tmp_path / "ok.py"
    allowed.write_text("from fedwarden.aggregation import chain\nfrom . import coordinator\n")
    assert imported_names(allowed, "fedwarden.server.driver")[1] == (
        2,
        "fedwarden.server.coordinator",
    )


def test_imports_only_point_down_the_layers():
    modules = package_modules()
    assert {"fedwarden.server.serve", "fedwarden.clients.agent", "fedwarden.cli.main"} <= set(
        modules
    )
    problems = [p for module, path in sorted(modules.items()) for p in violations(module, path)]
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def python_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not skipped(p.relative_to(ROOT))]


@pytest.mark.parametrize("bare", sorted(BARE_NAMES))
def test_nothing_imports_a_bare_folder_name(bare):
    """The folders install as fedwarden.<name>; ``import server`` would only work from a checkout."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in python_files()
        for line, name in imported_names(path)
        if name.split(".")[0] == bare
    ]
    assert not found, f"imports of the bare name {bare!r}:\n" + "\n".join(found)
