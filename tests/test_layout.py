"""The package's layout holds (docs/architecture.md): no import cycle among its modules, counting imports inside
functions, and imports that point down only — cli → commands → io (files) → kinds → (models, data, train) → the
manifest's types and io's primitives → core → the foundation (memory, runtime, distributed, progress,
errors)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "modellego"

# Each layer may import itself and the layers after it in this list, never one before it.
LAYERS = ["__main__", "launch", "cli", "benchmarking", "box", "commands", "viz", "io.export", "io.modelfile", "io.profiles", "io.masks", "io.artifacts", "kinds",
          "models", "data", "train", "io.manifest", "io.safetensors", "io.atomic", "io.fields", "core", "memory",
          "runtime", "distributed", "progress", "startup", "errors", "io"]  # io: its package module, which imports nothing


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """Every module's imports of the package's modules, at any depth (inside functions too)."""
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_package else name.split(".")[:-1]
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != PACKAGE and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        item = stack.pop()
                        on_stack.discard(item)
                        component.append(item)
                        if item == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def layer_of(module: str) -> int | None:
    relative = module[len(PACKAGE) + 1:]
    for position, layer in enumerate(LAYERS):
        if relative == layer or relative.startswith(layer + "."):
            return position
    return None


def test_cycles_are_found_by_the_check_itself():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    assert cycles(imports(modules())) == []


def test_imports_point_down_only():
    known = modules()
    wrong = []
    for name, targets in imports(known).items():
        own = layer_of(name)
        for target in targets:
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs < own:
                wrong.append(f"{name} imports {target}")
    assert wrong == []
    assert all(layer_of(name) is not None for name in known if name != PACKAGE), \
        [name for name in known if name != PACKAGE and layer_of(name) is None]
