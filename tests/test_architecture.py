"""The architecture of docs/architecture.md, read from the package's own imports (AST): layers, no cycle, size.

Every ``import``/``from … import`` of ``lightning_score`` in every module counts, wherever it is written (module
level, inside a function, under ``TYPE_CHECKING``): an import inside a function that dodges a cycle still closes
it here. ``from package import name`` depends on the package's ``__init__`` (and on the submodule, when ``name``
is one); importing ``a.b.c`` does not count as importing ``a.b``'s ``__init__`` (Python runs it, but a package
initialising its own submodules is no cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_score"

LAYERS: dict[str, float] = {
    "_version": 0,
    "utilities": 0,
    "task_vector": 1,
    "task_vector_files": 0.5,  # the task-vector file layout, below TaskVector
    "merging": 2,
    "analysis": 3,
    "data": 3,
    "plots": 4,
    "models": 4,
    "classifier": 5,
    "expert": 6,
    "callback": 6,
    "merge_module": 6,
    "cli": 8,
    "study": 7,
}
"""Each room's floor: a module may import its own room and the rooms on lower floors only (the root ``__init__``
imports its public names lazily, by name)."""

MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> Iterator[str]:
    """The lightning_score modules ``name`` imports, anywhere in its code."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "lightning_score")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                module = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "lightning_score":
                continue
            yield module
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    yield f"{module}.{alias.name}"


GRAPH: dict[str, set[str]] = {name: set(_imports(name)) - {name} for name in MODULES}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_room_has_a_floor() -> None:
    rooms = {_room(m) for m in MODULES} - {None}
    assert rooms == set(LAYERS), f"rooms without a floor: {rooms - set(LAYERS)}; floors without a room: " + str(
        set(LAYERS) - rooms
    )


def test_imports_point_down() -> None:
    upward = []
    for module, targets in GRAPH.items():
        room = _room(module)
        if room is None:
            continue
        for target in targets:
            other = _room(target)
            if other is None:
                upward.append(f"{module} -> {target} (the package root)")
            elif other != room and LAYERS[other] >= LAYERS[room]:
                upward.append(f"{module} -> {target} ({room} is on floor {LAYERS[room]}, {other} on {LAYERS[other]})")
    assert not upward, "\n".join(sorted(upward))


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        for target in GRAPH.get(current, ()):
            if target in MODULES and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _third_party(module: str) -> set[str]:
    """The top-level names of everything else ``module`` imports (``lightning``, ``open_clip``, ``torch``...)."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {"lightning_score", "__future__"}


MERGING = sorted(m for m in MODULES if m == "lightning_score.merging" or m.startswith("lightning_score.merging."))


@pytest.mark.parametrize("module", MERGING)
def test_the_merge_core_is_pure_torch(module: str) -> None:
    """merging/ reads only merging/, task_vector.py and the leaves; nothing it pulls in imports Lightning or open_clip.

    (The leaves: ``_version`` and ``utilities/``, which import nothing of lightning_score.)
    """
    allowed = ("lightning_score.merging", "lightning_score.task_vector", "lightning_score._version",
               "lightning_score.utilities.")  # fmt: skip
    outside = [t for t in GRAPH[module] if not t.startswith(allowed)]
    assert not outside, f"{module} imports {outside}"
    pulled = {m: _third_party(m) & {"lightning", "pytorch_lightning", "open_clip"} for m in {module} | _closure(module)}
    assert not any(pulled.values()), {m: names for m, names in pulled.items() if names}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _room(m) == "utilities"))
def test_utilities_are_leaves(module: str) -> None:
    assert not GRAPH[module], f"{module} imports {sorted(GRAPH[module])}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, (
        f"{MODULES[module].relative_to(PACKAGE.parent)} has {lines} lines: split it along its steps"
    )
