"""The package's import graph, read from the source with ``ast`` (nothing is imported):
dependencies point one way, so no module reaches itself through its imports, and no
module imports another's private (underscore) name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "metapeft_dist"
ROOT = Path(__file__).resolve().parent.parent
SOURCES = (ROOT / PACKAGE, ROOT / "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module name of a ``from ... import`` (relative ones resolved)."""
    if not node.level:
        return node.module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported module, line, names taken from it) for every import of a package module
    in ``path``, at module level or inside a function; ``from pkg import sub`` names the
    submodule ``pkg.sub`` when there is one."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield alias.name, node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            if source is None or not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            names = []
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    yield f"{source}.{alias.name}", node.lineno, ()
                else:
                    names.append(alias.name)
            if names:
                yield source, node.lineno, tuple(names)


def _graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: line of its first import there}}."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        for target, line, _ in _imports(module, path, modules):
            if target in modules and target != module:
                graph[module][target] = min(line, graph[module].get(target, line))
    return graph


def _cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no cycle through it)
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = _modules()
    return "\n".join(f"  {a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) imports {b}"
                     for a, b in zip(cycle[:-1], cycle[1:], strict=True))


def test_no_import_cycle():
    graph = _graph()
    cycle = _cycle(graph)
    assert cycle is None, (f"import cycle {' -> '.join(cycle)}:\n{_describe(cycle, graph)}")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_attributes(module: str, path: Path, modules: dict[str, Path]):
    """(line, module, name) for every ``mod._name`` where ``mod`` is a package module
    bound by an import in ``path`` (``from pkg import mod``, ``import pkg.mod as mod``)."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            for alias in node.names:
                if source and f"{source}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and _private(node.attr)
                and bound[node.value.id] != module):
            yield node.lineno, bound[node.value.id], node.attr


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    found = []
    for directory in SOURCES:
        for path in sorted(directory.rglob("*.py")):
            module = _module_name(path)
            for target, line, names in _imports(module, path, modules):
                private = [n for n in names if _private(n)]
                if private and target != module:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports "
                                 f"{', '.join(private)} from {target}")
            for line, target, name in _private_attributes(module, path, modules):
                found.append(f"{path.relative_to(ROOT)}:{line} reads {target}.{name}")
    assert not found, "private names used across modules:\n  " + "\n  ".join(found)


def test_the_walk_sees_cycles_and_private_names(tmp_path):
    """The checks themselves: a cycle through a function-level import and a
    ``from pkg import submodule`` edge is found and named, and so is a private import."""
    graph = {"p.a": {"p.b": 3}, "p.b": {"p.c": 7}, "p.c": {"p.a": 12}, "p.d": {"p.a": 1}}
    assert _cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert _cycle({"p.a": {"p.b": 1}, "p.b": {}}) is None

    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("def f():\n    from metapeft_dist import top\n")
    (package / "top.py").write_text(f"from {PACKAGE}.sub import leaf\n"
                                    f"from {PACKAGE}.sub.leaf import _hidden, f\n")
    modules = {f"{PACKAGE}.top": package / "top.py", f"{PACKAGE}.sub": package / "sub",
               f"{PACKAGE}.sub.leaf": package / "sub" / "leaf.py"}
    leaf = list(_imports(f"{PACKAGE}.sub.leaf", modules[f"{PACKAGE}.sub.leaf"], modules))
    top = list(_imports(f"{PACKAGE}.top", modules[f"{PACKAGE}.top"], modules))
    assert leaf == [(f"{PACKAGE}.top", 2, ())]
    assert top == [(f"{PACKAGE}.sub.leaf", 1, ()), (f"{PACKAGE}.sub.leaf", 2, ("_hidden", "f"))]
    (package / "user.py").write_text(f"from {PACKAGE}.sub import leaf\n"
                                     "x = leaf._cache + leaf.public + leaf.__name__\n")
    modules[f"{PACKAGE}.user"] = package / "user.py"
    assert list(_private_attributes(f"{PACKAGE}.user", package / "user.py", modules)) == [
        (2, f"{PACKAGE}.sub.leaf", "_cache")]


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
DECLARATION_LISTS = {"metapeft_dist/config/schema.py"}  # the spec's fields, one by one


def test_modules_and_functions_are_short_enough_to_read_at_once():
    """No package module over MAX_MODULE_LINES (declaration lists aside) and no function
    over MAX_FUNCTION_LINES: a part that grows past them is split by concept."""
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        name = str(path.relative_to(ROOT))
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES and name not in DECLARATION_LISTS:
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source, name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not found, "too long:\n  " + "\n  ".join(found)
