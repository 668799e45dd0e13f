"""No module of src/ckptscope imports another that imports it back, directly or through others.

Every `import` statement counts, also those inside functions (a lazy import is still a
dependency); the graph's strongly connected components must all be single modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "ckptscope").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ckptscope modules `name` imports (a `from package import module` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif base in known:
                    found.add(base)
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    assert len(graph) > 30 and graph["ckptscope.pipeline.driver"]  # the walk sees the package
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_workers_and_rows_do_not_need_duckdb():
    """Rows and the per-step work are built in worker processes, which never touch the store."""
    found = modules()
    for name in ("ckptscope.rows", "ckptscope.pipeline.tasks", "ckptscope.analyzers.contract"):
        text = found[name].read_text()
        assert "import duckdb" not in text and "ckptscope.store" not in text, name


def test_worker_imports_do_not_load_duckdb():
    """What a worker process imports to build rows and run a step must not load DuckDB."""
    import subprocess
    import sys

    code = "import sys, ckptscope.rows, ckptscope.pipeline.tasks; print('duckdb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_ckptscope_import_names_an_existing_module():
    """A lazy import of a module that was renamed fails only when its function runs: find it here."""
    found = modules()
    missing = []
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            missing += [f"{name} imports {t}" for t in targets if t.startswith("ckptscope.") and t not in found]
    assert missing == []
