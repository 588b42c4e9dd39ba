"""The architecture's import rules (docs/dev/ARCHITECTURE.md), checked on the source.

Every module of the package is parsed (ast, nothing imported) and each
``import``/``from ... import`` naming a project module becomes an edge of the
import graph, wherever it stands (top level or inside a function: a lazy
import is still a dependency).  The rules:

- the read path never imports the writer (``vmafs.writer``);
- the writer imports of ``vmafs`` only the shared layers: the format
  (``vmafs.format``, ``vmafs.zstd_seekable``), ``vmafs.errors``,
  ``vmafs.names``, ``vmafs.common`` and the NBD core ``vmafs.nbd`` -
  except ``vmafs.writer.recompress``, which converts archives and so reads
  them through ``vmafs.source`` and ``vmafs.index``, and
  ``vmafs.writer.restore``, which serves an archive's disks to QEMU
  (``vmafs.archive``, ``vmafs.serve``);
- the format layer imports nothing of the project but ``vmafs.errors``;
- ``vmafs.common`` and ``vmafs.errors`` import nothing of the project above them;
- only ``vmafs.__main__`` imports ``vmafs.cli``, which loads every command
  module by name (an import of it from a command is a cycle the graph
  cannot see);
- nobody imports a top-level ``writer`` (it installs as ``vmafs.writer``);
- no import cycles among project modules.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: The shared layers: what both halves may import.
FORMAT_LAYER = ("vmafs.format", "vmafs.zstd_seekable")
SHARED = (*FORMAT_LAYER, "vmafs.errors", "vmafs.names", "vmafs.common", "vmafs.nbd")
#: Writer modules allowed more, and what (see the module docs).
WRITER_READS = {
    "vmafs.writer.recompress": ("vmafs.source", "vmafs.index"),
    "vmafs.writer.restore": ("vmafs.archive", "vmafs.serve"),
}
#: Not the read path: the writer, the shared layers, the CLI's table.
NOT_READ_PATH = ("vmafs.writer", *SHARED, "vmafs.cli", "vmafs.__main__")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules(repo: Path = REPO) -> dict[str, Path]:
    """Module name -> file, for vmafs/ and writer/ (installed as vmafs.writer)."""
    found = {}
    for root, prefix in ((repo / "vmafs", "vmafs"), (repo / "writer", "vmafs.writer")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules *name* imports (the longest known module each import names)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule when there is one (and
            # needs nothing of pkg's __init__); any other name comes from pkg
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = [t if t in known else mod for t in subs]
        else:
            continue
        for target in targets:
            if target == "writer" or target.startswith("writer."):
                out.add(target)  # the old top-level name: always wrong
                continue
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    modules = _modules(repo)
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each (empty: the layering holds)."""
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if dep == "writer" or dep.startswith("writer."):
                bad.append(f"{mod} imports top-level {dep} (it is vmafs.writer)")
            elif _within(mod, ("vmafs.writer",)):
                allowed = ("vmafs.writer", *SHARED, *WRITER_READS.get(mod, ()))
                if not _within(dep, allowed):
                    bad.append(f"{mod} (writer) imports {dep} (the read path)")
            elif _within(mod, FORMAT_LAYER):
                if dep != "vmafs.errors":
                    bad.append(f"{mod} (format layer) imports {dep}")
            elif _within(mod, ("vmafs.common", "vmafs.errors")):
                if not _within(dep, ("vmafs.common", "vmafs.errors")):
                    bad.append(f"{mod} (shared utility) imports {dep}")
            elif not _within(mod, NOT_READ_PATH) and _within(dep, ("vmafs.writer",)):
                bad.append(f"{mod} (read path) imports {dep}")
    bad += [
        f"{mod} imports vmafs.cli (it loads the command modules: use vmafs.common.console)"
        for mod, deps in sorted(graph.items())
        if "vmafs.cli" in deps and mod != "vmafs.__main__"
    ]
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_one_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle through the component, for the failure message."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in component)
        back = [w for w in nxt if w in seen]
        if back:
            return path[path.index(back[0]) :] + [back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


@functools.cache
def _real_graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(deps) for name, deps in import_graph().items()}


def test_the_layering_holds():
    assert violations(_real_graph()) == []


def test_the_graph_sees_the_known_edges():
    # The checker parses what it should: a few edges that must be there.
    graph = _real_graph()
    assert "vmafs.errors" in graph["vmafs.format"]
    assert "vmafs.writer.packer" in graph["vmafs.writer.backup"]
    assert "vmafs.common.atomic" in graph["vmafs.writer.output"]
    assert "vmafs.format" in graph["vmafs.writer.packer"]
    assert "vmafs.writer" in graph  # writer/ is read as vmafs.writer


@pytest.mark.parametrize(
    "module, source, broken",
    [
        ("vmafs.archive", "from .writer import packer", "(read path) imports vmafs.writer.packer"),
        ("vmafs.writer.packer", "from vmafs.archive import Archive", "(writer) imports vmafs"),
        ("vmafs.writer.packer", "import writer.nbd", "imports top-level writer.nbd"),
        ("vmafs.format", "from .names import Entry", "(format layer) imports vmafs.names"),
        ("vmafs.common.atomic", "from ..source import open_source", "(shared utility)"),
        ("vmafs.index", "def f():\n    from . import archive", "import cycle: vmafs.archive"),
        ("vmafs.commands.list", "from ..cli import main", "imports vmafs.cli"),
    ],
)
def test_a_broken_rule_is_reported(tmp_path, module, source, broken):
    """Each rule can fail: one module of the real tree gets one offending import."""
    modules = _modules()
    changed = tmp_path / modules[module].name  # same name: __init__.py stays a package
    changed.write_text(modules[module].read_text() + "\n" + source + "\n")
    graph = dict(_real_graph())
    graph[module] = _imports(module, changed, set(modules))
    found = violations(graph)
    assert any(broken in line for line in found), found
