"""No import cycles in ovis2/ and server/, counting imports inside functions and names ovis2 loads lazily."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ovis2", "server")


def module_files(root: Path) -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def lazy_exports(files: dict[str, Path]) -> dict[str, dict[str, str]]:
    """package -> {public name: module} from the `_EXPORTS` tables that `lazy_getattr` serves."""
    exports = {}
    for name, path in files.items():
        if path.name != "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "_EXPORTS" for t in node.targets
            ):
                table = ast.literal_eval(node.value)
                exports[name] = {public: f"{name}.{module}" for public, module in table.items()}
    return exports


def imported_modules(name: str, path: Path, files: dict[str, Path], exports) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                lazy = exports.get(base, {}).get(alias.name)
                found.add(submodule if submodule in files else lazy or base)
    return {module for module in found if module in files and module != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    exports = lazy_exports(files)
    return {name: imported_modules(name, path, files, exports) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions_and_lazy_names():
    graph = import_graph()
    assert "ovis2.weights" in graph["ovis2.modeling"]  # imported inside from_pretrained
    assert (
        "ovis2.engine.async_engine" in graph["server.engine_api"]
    )  # `from ovis2 import AsyncEngine`, lazily


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def collapsed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each subpackage (ovis2.engine, ...) as one node: a subpackage and a module must not import each other."""
    name = lambda module: ".".join(module.split(".")[:2])  # noqa: E731
    merged: dict[str, set[str]] = {}
    for module, targets in graph.items():
        merged.setdefault(name(module), set()).update(name(t) for t in targets if name(t) != name(module))
    return merged


def test_no_cycles_between_a_subpackage_and_the_modules_around_it():
    assert cycles(collapsed(import_graph())) == []
