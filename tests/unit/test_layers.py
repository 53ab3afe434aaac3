"""The package's layers are its folders, read from its own imports: ``core/`` (pure torch) -> ``formats/`` (file
formats and layouts, pure torch) -> ``nemo/`` (NeMo glue) -> ``tools/`` -> ``apps/`` (cli, entry scripts, demo,
study, bench). At the package root, ``__init__`` and ``_autoregister`` count as NeMo glue (they register the scheme
with NeMo, lazily) and ``__main__`` as an application.

Every module of ``nemo_tiedlora`` is parsed with ``ast`` (module-level and function-level imports). Asserted: every
module lives in a layer folder (or is one of the three root modules); no import cycle among module-level imports; no
import from a lower layer to a higher one (function-level included); no NeMo / megatron-core import at module level
in a core or formats module, and a fresh interpreter that imports them has imported neither; no two modules share a
file name; no module over 500 lines and no function over 80.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_tiedlora"
LAYERS = ("core", "formats", "nemo", "tools", "apps")
PURE_TORCH = ("core", "formats")
ROOT_MODULES = {"nemo_tiedlora": "nemo", "nemo_tiedlora._autoregister": "nemo", "nemo_tiedlora.__main__": "apps"}
MAX_LINES = 500
MAX_FUNCTION_LINES = 80



def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """The layer of `module`: the folder under the package it lives in (the root modules by ROOT_MODULES)."""
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    folder = module.split(".")[1]
    if folder not in LAYERS:
        raise AssertionError(f"{module} is in no layer folder ({', '.join(LAYERS)})")
    return folder


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of `module` (package modules only for
    ours; third-party modules by their full dotted name)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child)
                for alias in child.names:
                    candidate = f"{target}.{alias.name}"
                    found.append((candidate if candidate in MODULES else target, top))
            visit(child, inner)

    visit(tree, True)
    return found


def _ours(name: str) -> str | None:
    """The package module `name` refers to (a name inside a module counts as that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges(*, module_level_only: bool) -> set[tuple[str, str]]:
    edges = set()
    for module in MODULES:
        for name, top in imports(module):
            if module_level_only and not top:
                continue
            target = _ours(name) if name.startswith("nemo_tiedlora") else None
            if target is not None and target != module:
                edges.add((module, target))
    return edges


def _cycles(edges: set[tuple[str, str]]) -> set[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def upward_imports() -> set[tuple[str, str]]:
    return {(a, b) for a, b in _edges(module_level_only=False) if LAYERS.index(layer(b)) > LAYERS.index(layer(a))}


def long_modules() -> set[str]:
    return {module for module, path in MODULES.items() if len(path.read_text().splitlines()) > MAX_LINES}


def test_every_module_has_a_layer():
    """Every module lives in a layer folder (or is one of the root modules), and every layer holds modules."""
    assert {layer(module) for module in MODULES} == set(LAYERS)
    assert layer("nemo_tiedlora.core.config") == "core" and layer("nemo_tiedlora.nemo.peft") == "nemo"


def test_no_two_modules_share_a_file_name():
    """One name per feature: a file name says which module it is, whatever folder it is in (``__init__`` aside)."""
    seen: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            seen.setdefault(path.stem, []).append(module)
    assert {stem: found for stem, found in seen.items() if len(found) > 1} == {}


def test_no_module_level_import_cycle():
    assert _cycles(_edges(module_level_only=True)) == set(), "import cycles (module-level imports)"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = upward_imports()
    described = sorted(f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, b in upward)
    assert described == [], "imports going up a layer"


def test_core_imports_no_nemo_or_megatron_at_module_level():
    bad = sorted(
        f"{module}: {name}"
        for module in MODULES if layer(module) in PURE_TORCH
        for name, top in imports(module)
        if top and name.split(".")[0] in ("nemo", "megatron", "lightning", "pytorch_lightning")
    )
    assert bad == []


def test_importing_the_core_imports_no_nemo():
    core = sorted(module for module in MODULES if layer(module) in PURE_TORCH)
    script = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('nemo', 'megatron', 'lightning'))\n"
        "print('\\n'.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [], "the core (and `import nemo_tiedlora`) imported NeMo / megatron-core"


def test_no_function_over_80_lines():
    """Functions (and methods) are split along their seams before they reach MAX_FUNCTION_LINES."""
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name} ({length} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: split them"


def test_no_module_over_500_lines():
    assert long_modules() == set(), f"modules over {MAX_LINES} lines: split them"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_says_what_it_is_for(module):
    tree = ast.parse(MODULES[module].read_text())
    assert ast.get_docstring(tree), f"{module} has no module docstring"
