"""The import graph: every module of sparsedist (launch and kernels included) imports, and no two modules
or packages import each other, directly or through others. Every import counts, also one inside a
function or under TYPE_CHECKING: a lazy import hides a cycle, it does not remove it."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ROOTS = {"sparsedist": REPO / "sparsedist", "sparsedist_launch": REPO / "launch",
         "sparsedist_kernels": REPO / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for file in sorted(root.rglob("*.py")):
            parts = [p for p in file.relative_to(root).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = file
    return found


def imports(name: str, file: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports: `from package import x` counts as the submodule x where x is one
    (Python runs the package's __init__ first for any submodule; that implicit step is not an edge)."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    """sparsedist.train.trainer -> sparsedist.train; sparsedist.cli -> itself; sparsedist_kernels.mvue -> its root."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "sparsedist" else parts[0]


MODULES = modules()
GRAPH = {name: imports(name, file, set(MODULES)) for name, file in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_module_imports_its_importers():
    assert cycles(GRAPH) == []


def test_no_package_imports_its_importers():
    graph: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        graph.setdefault(package_of(name), set()).update(package_of(t) for t in targets if t != "sparsedist")
    graph = {package: targets - {package} for package, targets in graph.items()}
    assert cycles(graph) == []


def test_the_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_kernels_folder_never_shadows_an_installed_kernels_package():
    """Run from the repository root (the path `python -m pytest` and `python -m sparsedist` put first),
    `import kernels` must find Hugging Face's package, which transformers imports, not kernels/."""
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert found.stdout.strip() != str(REPO / "kernels" / "__init__.py")
    if importlib.util.find_spec("transformers") is not None:
        subprocess.run([sys.executable, "-c", "import transformers.activations"], cwd=REPO, check=True)
