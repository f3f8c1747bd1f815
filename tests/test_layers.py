"""The layering, pinned: the pure core imports no model stack and the package has no import
cycle. The graph is read from the source (every import statement, lazy ones included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "coordexp"
CORE = ("codec", "boxes", "losses", "decode", "lmhead", "parsing", "matching", "diagnostics",
        "eval")
FORBIDDEN = ("transformers", "accelerate", "coordexp.model", "coordexp.rollout",
             "coordexp.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(every imported module name, those imported at module level outside TYPE_CHECKING)."""
    every, top = set(), set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            every.update(names)
            if at_top:
                top.update(names)
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
                isinstance(child, ast.If) and _is_type_checking(child))
            visit(child, at_top and not nested)

    visit(tree, True)
    return every, top


def package_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """module -> every name it imports, and module -> coordexp modules imported at load time."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    every, load = {}, {}
    for name, path in files.items():
        names, top = imports_of(ast.parse(path.read_text(encoding="utf-8")))
        every[name] = names
        load[name] = {n for n in top if n in files and n != name}
    return every, load


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def layer_violations(every: dict[str, set[str]]) -> list[str]:
    """'core.module -> forbidden' for every core module that reaches a forbidden import,
    directly or through other coordexp modules."""
    internal = {m: {n for n in names if n in every} for m, names in every.items()}
    out = []
    for module in sorted(m for m in every if "." in m):
        if module.split(".")[1] not in CORE:  # coordexp.<top>[.sub]
            continue
        for m in sorted({module} | reachable(module, internal)):
            bad = sorted(n for n in every[m] for f in FORBIDDEN if n == f or n.startswith(f + "."))
            out += [f"{module} -> {m} imports {n}" for n in bad]
    return out


def cycles(load: dict[str, set[str]]) -> list[str]:
    return sorted(m for m in load if m in reachable(m, load))


def test_pure_core_imports_no_model_stack():
    assert layer_violations(package_graph()[0]) == []


def test_package_has_no_import_cycle():
    assert cycles(package_graph()[1]) == []


def test_the_checks_catch_a_forbidden_import_and_a_cycle():
    """A synthetic graph: the core's losses reaching transformers through a helper module,
    and two modules importing each other at load time."""
    every = {"coordexp.losses": {"torch", "coordexp.helpers"},
             "coordexp.helpers": {"transformers"}, "coordexp.codec": {"math"}}
    assert layer_violations(every) == ["coordexp.losses -> coordexp.helpers imports transformers"]
    assert cycles({"coordexp.a": {"coordexp.b"}, "coordexp.b": {"coordexp.a"},
                   "coordexp.c": {"coordexp.a"}}) == ["coordexp.a", "coordexp.b"]


@pytest.mark.parametrize("module", ["coordexp.train.stage2", "coordexp.eval.evaluate"])
def test_the_real_graph_is_read(module):
    every, load = package_graph()
    assert module in every and load[module]  # a parser that reads nothing would pass the rest
