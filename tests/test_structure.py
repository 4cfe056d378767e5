"""The shape of the code a newcomer relies on: imports flow one way, classes stay small, no stage
swaps the process's stdout or stderr."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "storage")


def modules() -> dict[str, ast.Module]:
    return {f"{p.parent.name}.{p.stem}": ast.parse(p.read_text(), str(p))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py")) if p.stem != "__init__"}


def imports(tree: ast.Module, known: set) -> set:
    """Every project module this one imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} & known
            found |= {f"{node.module}.{a.name}" for a in node.names} & known  # from tasks import card
    return found


def test_no_import_cycles():
    trees = modules()
    graph = {name: imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    cycles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set = set()
    for start in graph:
        if start not in done:
            visit(start, [start])
    assert cycles == []
    # one way: storage knows nothing of tasks or flows, tasks nothing of flows
    assert not [(a, b) for a, bs in graph.items() for b in bs if a.startswith("storage.") and not b.startswith("storage.")]
    assert not [(a, b) for a, bs in graph.items() for b in bs if a.startswith("tasks.") and b.startswith("flows.")]


def test_no_class_over_200_lines():
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name, tree in modules().items()
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200]
    assert long == []


def test_nothing_swaps_stdout_or_stderr():
    swaps = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("redirect_stdout", "redirect_stderr"):
                swaps.append((name, node.lineno))
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr in ("stdout", "stderr") for t in node.targets):
                swaps.append((name, node.lineno))
    assert swaps == []
