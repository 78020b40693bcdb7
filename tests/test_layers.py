"""The core's layers import each other in one direction (ARCHITECTURE.md): no import cycle, and
no function-local import between them (which is how a cycle hides)."""

from __future__ import annotations

import ast
import pathlib

import normkit

SRC = pathlib.Path(normkit.__file__).parent
CORE = ["errors", "contract", "reference", "validation", "_torch_private", "backends/__init__", "backends/base",
        "backends/reference", "backends/cpu", "backends/triton", "ops", "paths", "distributed",
        "compile_policy", "fused_options", "dispatch", "functional", "functional_channels", "norm_linear"]
# Deliberately lazy: the compiled extension (its build record is checked before it loads) and the
# Triton kernels (imported on the first launch, never at `import normkit`).
LAZY = {("backends/cpu", "normkit"), ("backends/cpu", "normkit._C"), ("backends/triton", "normkit.backends")}


def _module_name(rel: str) -> str:
    return "normkit." + rel.replace("/__init__", "").replace("/", ".")


def _imports(tree: ast.AST, package: str):
    """``(module, at_top_level)`` for each import of a normkit module in ``tree``."""
    top = set(map(id, getattr(tree, "body", [])))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "normkit" or node.module.startswith("normkit.")):
            names = [f"{node.module}.{a.name}" for a in node.names]
            yield node.module, names, id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("normkit"):
                    yield a.name, [a.name], id(node) in top


def _graph():
    known = {_module_name(rel): rel for rel in CORE}
    edges, local = {}, []
    for rel in CORE:
        tree = ast.parse((SRC / f"{rel}.py").read_text())
        deps = set()
        for module, names, at_top in _imports(tree, _module_name(rel)):
            if not at_top:
                local.append((rel, module))
                continue
            for name in [module] + names:  # `from normkit import ops` names the module normkit.ops
                if name in known and name != _module_name(rel):
                    deps.add(name)
        edges[_module_name(rel)] = deps
    return edges, local


def test_no_function_local_imports_between_core_layers():
    _, local = _graph()
    assert [x for x in local if x not in LAZY] == []


def test_the_core_import_graph_has_no_cycle():
    edges, _ = _graph()
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(path + [node])
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            visit(dep, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        visit(node, [])


def test_the_check_can_fail():
    """A module importing its importer is reported (the guard is not vacuous)."""
    edges, _ = _graph()
    edges["normkit.contract"] = edges["normkit.contract"] | {"normkit.dispatch"}
    state = {}

    def has_cycle(node):
        if state.get(node) == "done":
            return False
        if state.get(node) == "open":
            return True
        state[node] = "open"
        found = any(has_cycle(dep) for dep in edges.get(node, ()))
        state[node] = "done"
        return found

    assert any(has_cycle(n) for n in sorted(edges))
