"""The layout of ``captum_daam.cli``: one module per command, no import cycle.

Each module's imports are read from its source with ``ast`` (imports inside functions
included), so that an import that would only run with the command is seen too.
"""

import argparse
import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Dict, List, Set

import pytest

import captum_daam.cli

PACKAGE = "captum_daam.cli"
FOLDER = Path(captum_daam.cli.__file__).parent
SUBCOMMANDS = ["demo", "explain", "check", "explain-dataset", "compare", "view"]


def _module_name(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


MODULES = {_module_name(path): path for path in sorted(FOLDER.glob("*.py"))}
COMMAND_MODULES = sorted(
    name for name in MODULES if not name.rpartition(".")[2].startswith("_") and name != PACKAGE
)


def _imported_modules(source: str, module: str, is_package: bool, modules: Set[str]) -> Set[str]:
    """The modules of ``captum_daam.cli`` that ``source`` (the text of ``module``) imports,
    relatively or absolutely, anywhere in it. ``from X import name`` counts as an import of
    ``X.name`` when that is one of ``modules``, else of ``X``."""
    package = module if is_package else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name(
                "." * node.level + (node.module or ""), package
            ) if node.level else node.module
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found.update(
            target for target in targets
            if target == PACKAGE or target.startswith(PACKAGE + ".")
        )
    found.discard(module)
    return found


def _import_graph(sources: Dict[str, str]) -> Dict[str, Set[str]]:
    return {
        module: _imported_modules(source, module, module == PACKAGE, set(sources))
        for module, source in sources.items()
    }


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` as a list of modules (first == last), or []."""
    done: Set[str] = set()

    def visit(module: str, path: List[str]) -> List[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


GRAPH = _import_graph({module: path.read_text() for module, path in MODULES.items()})


def test_the_package_has_one_module_per_command():
    assert COMMAND_MODULES == [f"{PACKAGE}.{name}" for name in
                               ("check", "compare", "demo", "explain", "explain_dataset", "view")]
    assert {f"{PACKAGE}._common", f"{PACKAGE}.__main__"} <= set(MODULES)
    # the two modules the package replaced are gone
    assert not (FOLDER.parent / "cli.py").exists()
    assert not (FOLDER.parent / "_dataset_cli.py").exists()


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_a_command_module_imports_neither_the_package_nor_another_command(command):
    imported = GRAPH[command]
    assert PACKAGE not in imported, f"{command} imports {PACKAGE} (its __init__)"
    assert not imported & set(COMMAND_MODULES), (
        f"{command} imports the command modules {sorted(imported & set(COMMAND_MODULES))}"
    )


def test_the_package_imports_every_command_module():
    assert set(COMMAND_MODULES) <= GRAPH[PACKAGE]
    assert GRAPH[f"{PACKAGE}.__main__"] == {PACKAGE}


def test_the_modules_of_the_command_line_import_one_another_without_a_cycle():
    assert _cycle(GRAPH) == []


def test_the_cycle_finder_finds_the_cycle_the_package_used_to_have():
    # cli.py and _dataset_cli.py imported each other, one relatively inside a function, the
    # other absolutely; and a command that imports the package's __init__ closes a cycle too
    graph = _import_graph({
        PACKAGE: "from . import demo\n",
        f"{PACKAGE}.demo": "def run():\n    from captum_daam.cli import main\n",
        f"{PACKAGE}._common": "",
    })
    assert _cycle(graph) == [PACKAGE, f"{PACKAGE}.demo", PACKAGE]
    graph = _import_graph({
        f"{PACKAGE}.explain": "from .check import add_parser\n",
        f"{PACKAGE}.check": "import captum_daam.cli.explain\nfrom .. import DAAM\n",
    })
    assert _cycle(graph) == [f"{PACKAGE}.check", f"{PACKAGE}.explain", f"{PACKAGE}.check"]


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_each_command_module_has_add_parser(command):
    tree = ast.parse(MODULES[command].read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "add_parser" in functions
    assert callable(importlib.import_module(command).add_parser)


def test_build_parser_lists_the_subcommands():
    parser = captum_daam.cli.build_parser()
    (commands,) = [action for action in parser._actions
                   if isinstance(action, argparse._SubParsersAction)]
    assert list(commands.choices) == SUBCOMMANDS
