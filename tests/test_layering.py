"""The house rules of the package layout (docs/architecture.md), checked on every import.

Imports flow one way, from the command line down to the safety net:

    cli -> evaluate, verify, experiment -> train, inference, export -> checkpoint
        -> data, tokenizer, model -> safety, config, errors, events

Every `import` counts, including those inside functions (they hide cycles from Python
but not from a reader). Only `cli/` talks to the terminal libraries, and importing it
must not pull in torch, so `fragment --help` stays instant.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fragment_llm"
MAX_MODULE_LINES = 600
MAX_BARE_ANY = 15

# Lower numbers sit lower: a module may import its own layer or the ones below.
LAYERS = {
    "fragment_llm": 0, "errors": 0, "config": 0, "events": 0, "safety": 0,
    "data": 1, "tokenizer": 1, "model": 1,
    "checkpoint": 2,
    "train": 3, "inference": 3, "export": 3, "finetune": 3,
    "evaluate": 4, "verify": 4, "serve": 4, "experiment": 4,
    "cli": 5, "__main__": 5,
}
TERMINAL_LIBRARIES = ("click", "rich")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every absolute name an `import` statement anywhere in the module brings in."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return names


def internal_edges(modules: dict[str, Path], name: str, source: str) -> set[str]:
    """The package's modules that `name` imports (`from a.b import c`: a.b.c if c is a
    module, else a.b), plus the packages whose __init__ that runs."""
    edges = set()
    for imported in imported_names(source, name, modules[name].name == "__init__.py"):
        while imported and imported not in modules:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            edges.add(imported)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: internal_edges(modules, name, path.read_text(encoding="utf-8"))
            for name, path in modules.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, targets in graph.items() for dst in targets
                  if layer_of(dst) > layer_of(src))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, found by depth-first search (the graph is small)."""
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


# ------------------------------------------------------------ the checker itself


def test_the_checker_sees_a_back_edge_inside_a_function():
    planted = "def f():\n    from fragment_llm.checkpoint.load import load_checkpoint\n"
    modules = {"fragment_llm.model.gpt": Path("gpt.py"),
               "fragment_llm.checkpoint.load": Path("load.py")}
    graph = {"fragment_llm.model.gpt": internal_edges(modules, "fragment_llm.model.gpt", planted)}
    assert back_edges(graph) == ["fragment_llm.model.gpt -> fragment_llm.checkpoint.load"]


def test_the_checker_sees_a_cycle_and_a_relative_import():
    modules = {"fragment_llm.data.a": Path("a.py"), "fragment_llm.data.b": Path("b.py")}
    graph = {"fragment_llm.data.a": internal_edges(modules, "fragment_llm.data.a",
                                                   "from . import b\n"),
             "fragment_llm.data.b": internal_edges(modules, "fragment_llm.data.b",
                                                   "import fragment_llm.data.a\n")}
    assert cycles(graph) == [["fragment_llm.data.a", "fragment_llm.data.b",
                              "fragment_llm.data.a"]]


def test_every_module_has_a_layer():
    assert all(layer_of(name) >= 0 for name in package_modules())


# ----------------------------------------------------------------- the package


def test_imports_flow_one_way():
    assert back_edges(import_graph()) == []


def test_there_are_no_import_cycles():
    assert cycles(import_graph()) == []


def test_nothing_below_the_command_line_imports_it():
    graph = import_graph()
    importers = {src for src, targets in graph.items()
                 if any(t.startswith("fragment_llm.cli") for t in targets)}
    assert {m for m in importers if not m.startswith(("fragment_llm.cli", "fragment_llm.__main__"))
            } == set()


def test_only_the_command_line_imports_click_or_rich():
    offenders = []
    for name, path in package_modules().items():
        if name.startswith("fragment_llm.cli"):
            continue
        imported = imported_names(path.read_text(encoding="utf-8"), name, False)
        offenders += [f"{name}: {lib}" for lib in imported
                      if lib.split(".")[0] in TERMINAL_LIBRARIES]
    assert offenders == []


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def bare_any_annotations(source: str) -> int:
    """Annotations that are `Any` or `Any | None` (a JSON `dict[str, Any]` is fine)."""
    def bare(annotation: ast.expr | None) -> bool:
        if isinstance(annotation, ast.Name):
            return annotation.id == "Any"
        if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
            sides = {ast.unparse(annotation.left), ast.unparse(annotation.right)}
            return sides == {"Any", "None"}
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            return annotation.value.replace(" ", "") in ("Any", "Any|None")
        return False

    count = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arg | ast.AnnAssign):
            count += bare(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            count += bare(node.returns)
    return count


def test_the_any_counter_counts_what_it_should():
    source = ("def f(a: Any, b: Any | None, c: dict[str, Any], d: 'Any') -> Any:\n"
              "    e: int = 1\n")
    assert bare_any_annotations(source) == 4


def test_few_annotations_are_a_bare_any():
    total = sum(bare_any_annotations(path.read_text(encoding="utf-8"))
                for path in package_modules().values())
    assert total <= MAX_BARE_ANY


@pytest.mark.parametrize("module", ["fragment_llm.cli", "fragment_llm.cli.app"])
def test_importing_the_command_line_imports_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] " \
           "in ('torch', 'numpy', 'pyarrow')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_tests_mirror_the_package():
    """tests/<name>/ holds the tests of fragment_llm/<name>/ and is a package, so its
    modules import as tests.<name>.test_x whatever other folders name theirs."""
    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir()
               if p.is_dir() and p.name != "fixtures" and not p.name.startswith((".", "_"))}
    assert folders <= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert [name for name in folders if not (tests / name / "__init__.py").is_file()] == []
