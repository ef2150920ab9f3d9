"""The package's shape (docs/ARCHITECTURE.md), checked by reading the source with ``ast``.

* No import cycle between modules of ``napari_medseg``: module-level imports and imports inside
  functions both count (a function-level import only hides a cycle from the interpreter, not
  from the reader); imports under ``if TYPE_CHECKING:`` do not run and do not count.
* No name with a leading underscore imported from another module: what another module needs
  is public there (``from napari_medseg._files import atomic_path`` is fine: ``_files`` is a
  module whose names are public; ``from napari_medseg.core.slides.wsi import _tile_plan`` is
  not).

The layers themselves (widgets | cli > training > core > models > io) are import-linter
contracts in pyproject.toml (``lint-imports``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "napari_medseg"


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for f in package.rglob("*.py"):
        parts = f.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for sub in ast.walk(node))
    return skip


def _imports(
    mods: dict[str, Path], root: str = "napari_medseg"
) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> modules of ours it imports (anywhere in the file), and the private names."""
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                src = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    full = f"{src}.{alias.name}"
                    if full in mods:  # a submodule
                        targets.append(full)
                        continue
                    targets.append(src)
                    if (
                        alias.name.startswith("_")
                        and not alias.name.startswith("__")
                        and src in mods
                        and src != name
                    ):
                        private.append(f"{name} imports {src}.{alias.name}")
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t != root:
                    edges.setdefault(name, set()).add(t)
    return edges, private


def _cycles(nodes: list[str], edges: dict[str, set[str]]) -> list[frozenset]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], dict[str, set[str]], list[str]]:
    mods = _modules()
    edges, private = _imports(mods)
    return mods, edges, private


def test_the_checker_sees_cycles_and_private_names(tmp_path):
    """The checks can fail: a made-up package with a cycle through a function-level import
    and a private import is caught; an import under TYPE_CHECKING is not counted."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "from p.b import shown\n",
        "b.py": "def f():\n    import p.c\n",
        "c.py": "def g():\n    from p.a import _hidden\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n",
        "e.py": "from p.d import thing\nfrom p import d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    mods = _modules(pkg)
    edges, private = _imports(mods, root="p")
    assert _cycles(sorted(mods), edges) == [frozenset({"p.a", "p.b", "p.c"})]
    assert private == ["p.c imports p.a._hidden"]
    assert "p.d" not in edges and edges["p.e"] == {"p.d"}


def test_no_import_cycles_between_modules(graph):
    mods, edges, _ = graph
    assert len(mods) > 50 and sum(len(v) for v in edges.values()) > 100  # it read the package
    found = [sorted(c) for c in _cycles(sorted(mods), edges)]
    assert not found, "import cycles (cut them; see docs/ARCHITECTURE.md):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_no_private_names_imported_from_another_module(graph):
    _, _, private = graph
    assert not private, "make these names public where they live:\n" + "\n".join(private)
