"""The package layers, checked on the source: which part may import which, and no import cycles.

Why an AST walk and not import-linter: it needs no extra dependency, it sees imports inside
functions and ``if TYPE_CHECKING:`` blocks too (an arrow is an arrow wherever it is written), and
its failure message names the file, the line and the rule an import breaks.

The layers (docs/architecture.md, "The house"):

- ``storage`` is the contract layer: it imports nothing of the project but itself;
- ``dataprep`` and ``train`` are siblings: each imports only ``storage`` and itself;
- ``flows`` may import every part;
- none of ``storage``, ``dataprep``, ``train`` imports Prefect;
- no part imports ``tools/``, ``bench/`` or ``tests/`` (not installed);
- no module imports itself through a chain of other modules (a cycle).
"""
from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("storage", "dataprep", "train", "flows")
"""The folders pyproject.toml maps to ``shardflow.<part>``."""

ALLOWED = {
    "storage": {"storage"},
    "dataprep": {"storage", "dataprep"},
    "train": {"storage", "train"},
    "flows": set(PARTS),
}
NO_PREFECT = {"storage", "dataprep", "train"}


def _modules() -> dict[str, Path]:
    """``shardflow.<part>.<module>`` -> file, for every module of every part."""
    out = {}
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            rel = path.relative_to(ROOT / part).with_suffix("")
            names = [n for n in rel.parts if n != "__init__"]
            out[".".join(["shardflow", part, *names])] = path
    return out


def _imports(name: str, source: str, is_package: bool, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported name, line) of every import in a module's source, wherever it is written, resolved
    to absolute names; ``from pkg import mod`` resolves to the module ``pkg.mod`` when there is one."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in modules else target, node.lineno))
    return out


@functools.lru_cache(maxsize=1)
def _graph() -> tuple[dict[str, Path], dict[str, dict[str, int]], list[tuple[str, str, int]]]:
    modules = _modules()
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    foreign = []  # (module, third-party name, line)
    for name, path in modules.items():
        for target, line in _imports(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", modules):
            if target.startswith("shardflow."):
                edges[name].setdefault(target, line)
            else:
                foreign.append((name, target, line))
    return modules, edges, foreign


def _where(modules: dict[str, Path], name: str, line: int) -> str:
    return f"{modules[name].relative_to(ROOT)}:{line}"


def _part(name: str) -> str:
    return name.split(".")[1]


def test_every_part_imports_only_the_layers_below_it():
    modules, edges, _ = _graph()
    broken = []
    for name, targets in sorted(edges.items()):
        part = _part(name)
        for target, line in sorted(targets.items(), key=lambda t: t[1]):
            if _part(target) not in ALLOWED[part]:
                allowed = " and ".join(f"shardflow.{p}" for p in sorted(ALLOWED[part]))
                broken.append(f"{_where(modules, name, line)}: imports {target}, but {part} may import only {allowed}")
    assert not broken, "layer rules broken (docs/architecture.md):\n" + "\n".join(broken)


def test_only_flows_import_prefect():
    modules, _, foreign = _graph()
    broken = [f"{_where(modules, name, line)}: imports {target}, but {_part(name)} must not import Prefect (only flows does)"
              for name, target, line in foreign if _part(name) in NO_PREFECT and target.split(".")[0] in ("prefect", "prefect_ray")]
    assert not broken, "\n".join(broken)


def test_no_part_imports_tooling_that_is_not_installed():
    modules, _, foreign = _graph()
    broken = [f"{_where(modules, name, line)}: imports {target}, which is not part of the installed package"
              for name, target, line in foreign if target.split(".")[0] in ("tools", "bench", "tests")]
    assert not broken, "\n".join(broken)


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, {})))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in edges.get(node, {}):
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    modules, edges, _ = _graph()
    problems = []
    for comp in _cycles(edges):
        members = set(comp)
        arrows = [f"  {_where(modules, a, line)}: {a} -> {b}"
                  for a in comp for b, line in sorted(edges[a].items()) if b in members]
        problems.append("cycle among " + ", ".join(comp) + ":\n" + "\n".join(arrows))
    assert not problems, "import cycles (break one arrow of each):\n" + "\n\n".join(problems)


def test_the_checks_see_a_broken_rule_and_a_cycle():
    """The walker must notice what it is for: a sideways arrow inside a function, and a cycle."""
    edges = {"shardflow.train.a": {"shardflow.train.b": 1}, "shardflow.train.b": {"shardflow.train.a": 2},
             "shardflow.train.c": {}}
    assert _cycles(edges) == [["shardflow.train.a", "shardflow.train.b"]]
    source = "def f():\n    from shardflow.dataprep.tokenize import doc_split\n    from . import data\n"
    found = _imports("shardflow.train.probe", source, False, _modules())
    assert found == [("shardflow.dataprep.tokenize", 2), ("shardflow.train.data", 3)]
