"""The package layout: the subpackages of atdiff_jax import each other without a cycle.

Read from the sources (``ast``), nothing is imported: every ``import atdiff_jax.x...`` and
``from atdiff_jax.x... import ...`` of a module under ``atdiff_jax/`` (at module level or inside a
function) is an edge from the module's package (``train``, ``eval``, ``diffusion``, ...; a
top-level module such as ``cli.py`` or ``samplers.py`` is its own node) to ``x``. The graph of
these packages must have no cycle, so that each package can be read, tested and changed with only
the packages below it in mind.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "atdiff_jax"


def _node(parts: tuple[str, ...]) -> str:
    """The package-level node of a module path under atdiff_jax (``("train", "loop")`` ->
    ``"train"``, ``("cli",)`` -> ``"cli"``, ``()`` -> ``"atdiff_jax"``)."""
    return parts[0] if parts else PACKAGE


def _imported_modules(tree: ast.AST, module: tuple[str, ...], is_package: bool) -> set[tuple]:
    """The atdiff_jax modules (as paths below atdiff_jax) that ``tree`` imports."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                parts = a.name.split(".")
                if parts[0] == PACKAGE:
                    out.add(tuple(parts[1:]))
        elif isinstance(n, ast.ImportFrom):
            if n.level:   # relative: resolved against the importing module's package
                base = module if is_package else module[:-1]
                base = base[:len(base) - (n.level - 1)]
                parts = base + tuple((n.module or "").split(".") if n.module else ())
            elif n.module and n.module.split(".")[0] == PACKAGE:
                parts = tuple(n.module.split(".")[1:])
            else:
                continue
            if parts:
                out.add(parts)
            else:   # `from atdiff_jax import train, eval`
                out.update((a.name,) for a in n.names)
    return out


def package_import_graph(root: pathlib.Path = ROOT / PACKAGE) -> dict[str, set[str]]:
    """``{package: packages it imports}`` over every module under ``root`` (self-edges left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        is_package = rel[-1] == "__init__"
        module = rel[:-1] if is_package else rel
        src = _node(module)
        graph.setdefault(src, set())
        for imported in _imported_modules(ast.parse(path.read_text(), str(path)), module,
                                          is_package):
            dst = _node(imported)
            if dst != src:
                graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_packages():
    graph = package_import_graph()
    assert {"train", "eval", "diffusion", "consistency", "adversarial", "models", "data",
            "convert", "experiment"} <= set(graph), sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, ("the packages of atdiff_jax import each other in a cycle: "
                           + " -> ".join(cycle) + "; edges: "
                           + "; ".join(f"{a} -> {sorted(b)}" for a, b in sorted(graph.items())))


def test_the_cycle_check_finds_cycles(tmp_path):
    """The check can fail: a two-package cycle, through a function-level and a relative import."""
    pkg = tmp_path / PACKAGE
    for sub in ("a", "b", "c"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from atdiff_jax.b.y import f\n")
    (pkg / "b" / "y.py").write_text("def f():\n    from ..c import z\n")
    (pkg / "c" / "z.py").write_text("import atdiff_jax.b\n")
    graph = package_import_graph(pkg)
    assert graph == {PACKAGE: set(), "a": {"b"}, "b": {"c"}, "c": {"b"}}
    assert find_cycle(graph) == ["b", "c", "b"]
    (pkg / "c" / "z.py").write_text("import numpy\n")
    assert find_cycle(package_import_graph(pkg)) is None
