"""The pack's layout rules (ARCHITECTURE.md section 7, STYLE.md section 1), read from the sources.

- The import graph of the pack's modules is acyclic. Relative imports and absolute `wanbench.`
  imports count, wherever they stand: a function-local import that dodges a cycle at import time is
  still a cycle.
- One module writes files atomically: `util/atomic.py`.
- No file in `wan_core/`, `profiling/` or `nodes/` is over the size limit.

The pack's sources are the `.py` files under the repository root except tests, benchmarks, docs,
the web extension, virtual environments, caches and build folders.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "wanbench"  # the import name of the repository root (pyproject's package-dir)
NOT_SOURCES = frozenset({"tests", "bench", "docs", "web", "build", "dist", "wanbench_out", "__pycache__"})
SIZE_LIMITED = ("wan_core", "profiling", "nodes")
MAX_LINES = 650
ATOMIC_MODULE = ("util", "atomic")
# Calls that move a finished file into place: only the atomic writer may make them.
RENAMES = frozenset({("os", "replace"), ("os", "rename"), ("shutil", "move")})

Module = tuple[str, ...]  # path parts below the root without ".py"; a package is its folder's parts


def _is_source(relative: Path) -> bool:
    folders = relative.parts[:-1]
    return not any(
        part in NOT_SOURCES or part.startswith(".") or part.endswith(".egg-info") for part in folders
    )


def pack_modules(root: Path = ROOT) -> dict[Module, Path]:
    """Every source module of the pack: `("nodes", "context")` -> nodes/context.py."""
    modules: dict[Module, Path] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not _is_source(relative):
            continue
        parts = relative.with_suffix("").parts
        modules[parts[:-1] if parts[-1] == "__init__" else parts] = path
    return modules


def _package_of(module: Module, path: Path) -> Module:
    return module if path.name == "__init__.py" else module[:-1]


def _imported(module: Module, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[Module]:
    """The dotted names one import statement brings in, as pack module candidates.

    `from .pkg import name` yields `pkg.name`: `_owner` maps it to the submodule when there is one,
    else to `pkg` itself (the name is defined there). Imports from outside the pack yield nothing.
    """
    if isinstance(node, ast.Import):
        for alias in node.names:
            head, *rest = alias.name.split(".")
            if head == PACKAGE:
                yield tuple(rest)
        return
    dotted = tuple(part for part in (node.module or "").split(".") if part)
    if node.level:
        package = _package_of(module, path)
        if node.level - 1 > len(package):
            return
        base = package[: len(package) - (node.level - 1)] + dotted
    elif dotted[:1] == (PACKAGE,):
        base = dotted[1:]
    else:
        return
    for alias in node.names:
        yield base + (alias.name,)


def _owner(candidate: Module, modules: dict[Module, Path]) -> Module | None:
    """The module a dotted name resolves to: itself, or the longest enclosing module that exists."""
    for end in range(len(candidate), -1, -1):
        if candidate[:end] in modules:
            return candidate[:end]
    return None


def import_graph(modules: dict[Module, Path]) -> dict[Module, set[Module]]:
    """module -> the pack modules it imports (at module level or inside functions)."""
    graph: dict[Module, set[Module]] = {module: set() for module in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for candidate in _imported(module, path, node):
                owner = _owner(candidate, modules)
                if owner is not None and owner != module:
                    graph[module].add(owner)
    return graph


def find_cycles(graph: dict[Module, set[Module]]) -> list[list[Module]]:
    """One cycle (first module repeated at the end) per strongly connected group of modules."""
    index: dict[Module, int] = {}
    low: dict[Module, int] = {}
    stack: list[Module] = []
    on_stack: set[Module] = set()
    groups: list[set[Module]] = []

    def connect(start: Module) -> None:
        # Tarjan's algorithm, iterative (deep graphs must not hit the recursion limit).
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[Module], graph: dict[Module, set[Module]]) -> list[Module]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    previous: dict[Module, Module] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & group):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {sorted(group)}")  # a strongly connected group always has one


def _name(module: Module, modules: dict[Module, Path]) -> str:
    return modules[module].relative_to(ROOT).as_posix()


@pytest.fixture(scope="module")
def modules() -> dict[Module, Path]:
    found = pack_modules()
    assert ("runner",) in found and ("nodes", "context") in found, sorted(found)
    return found


def test_the_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The reader itself, on a made-up pack: relative, absolute `wanbench.` and function-local
    imports all make edges (to a submodule, or to the package a name is defined in), imports from
    outside the pack and files outside its sources make none, and a cycle is named module by module."""
    files = {
        "__init__.py": "from .a import x\n",
        "a.py": "import os\nfrom torch import nn\nfrom .pkg import b\nfrom .pkg import NAME\n",
        "pkg/__init__.py": "NAME = 1\n",
        "pkg/b.py": "import wanbench.pkg.c\n",
        "pkg/c.py": "def f():\n    from ..a import x\n    return x\n",
        "tests/test_x.py": "from wanbench import a\n",
        "bench/b.py": "from wanbench.a import x\n",
        ".venv/lib/site.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    found = pack_modules(tmp_path)
    assert sorted(found) == [(), ("a",), ("pkg",), ("pkg", "b"), ("pkg", "c")]
    graph = import_graph(found)
    assert graph == {
        (): {("a",)},
        ("a",): {("pkg",), ("pkg", "b")},
        ("pkg",): set(),
        ("pkg", "b"): {("pkg", "c")},
        ("pkg", "c"): {("a",)},
    }
    assert find_cycles(graph) == [[("a",), ("pkg", "b"), ("pkg", "c"), ("a",)]]
    graph[("pkg", "c")] = set()  # the function-local import removed: no cycle left
    assert find_cycles(graph) == []


def test_the_writer_check_sees_helpers_and_renames() -> None:
    source = (
        "import os, shutil\n"
        "def write_json_atomic(path): ...\n"
        "def save(tmp, path):\n"
        "    os.replace(tmp, path)\n"
        "    shutil.move(tmp, path)\n"
        "    return str(path).replace('a', 'b')\n"  # a string replace is not a rename
    )
    tree = ast.parse(source)
    assert list(_atomic_helpers(tree)) == ["def write_json_atomic (line 2)"]
    assert list(_renames(tree)) == ["os.replace (line 4)", "shutil.move (line 5)"]


def test_no_import_cycle(modules: dict[Module, Path]) -> None:
    cycles = find_cycles(import_graph(modules))
    named = [" -> ".join(_name(m, modules) for m in cycle) for cycle in cycles]
    assert not named, "import cycles (function-local imports count; move the shared part down a layer):\n" + (
        "\n".join(named)
    )


def _renames(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) in RENAMES
        ):
            yield f"{node.func.value.id}.{node.func.attr} (line {node.lineno})"


def _atomic_helpers(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "atomic" in node.name.lower():
            yield f"def {node.name} (line {node.lineno})"


def test_one_atomic_writer(modules: dict[Module, Path]) -> None:
    """Only util/atomic.py defines atomic-write helpers or renames files into place."""
    assert ATOMIC_MODULE in modules, "util/atomic.py, the one atomic writer, is missing"
    writers: dict[str, list[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [*_atomic_helpers(tree), *_renames(tree)]
        if found:
            writers[_name(module, modules)] = found
    assert list(writers) == ["util/atomic.py"], (
        f"files that write atomically on their own: {writers}; write through util/atomic.py's "
        "atomic_output / atomic_write_text instead"
    )


def test_core_files_stay_small(modules: dict[Module, Path]) -> None:
    too_long = {}
    for module, path in modules.items():
        if module and module[0] in SIZE_LIMITED:
            num_lines = len(path.read_text(encoding="utf-8").splitlines())
            if num_lines > MAX_LINES:
                too_long[_name(module, modules)] = num_lines
    assert not too_long, f"files over {MAX_LINES} lines (split them by responsibility): {too_long}"
