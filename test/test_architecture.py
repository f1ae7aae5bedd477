"""The layering rules of docs/architecture.md, checked on the source: no import cycles, nothing imports upward.

Imports are read with ``ast`` (module-level and function-level, ``if TYPE_CHECKING:`` blocks excluded), so a lazy
import inside a function counts: a cycle hidden behind a lazy import is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("apr_localizer", "apr_training")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    """Map each module to the project modules it imports (``from pkg import name`` → ``pkg.name`` if a module)."""
    files = {(_module_name(p)): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for t in targets:
                while t and t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
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
                    out.append(sorted(comp))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph):
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_runtime_never_imports_training(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("apr_localizer")
        for t in ts
        if t.startswith("apr_training")
    )
    assert not bad, f"apr_localizer must not import apr_training: {bad}"


def test_nothing_imports_the_cli_package(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        for t in ts
        if t.startswith("apr_training.cli") and not m.startswith("apr_training.cli")
    )
    assert not bad, f"only console scripts enter apr_training.cli: {bad}"


def test_bag_layer_imports_no_sibling(graph):
    if not any(m.startswith("apr_training.bags") for m in graph):
        pytest.skip("apr_training.bags does not exist")
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("apr_training.bags")
        for t in ts
        if t.startswith("apr_training.") and not t.startswith("apr_training.bags")
    )
    assert not bad, f"apr_training.bags imports only apr_localizer and third-party code: {bad}"


def test_runtime_imports_without_ros():
    """``import apr_localizer.<core module>`` works where rclpy and the message packages do not exist."""
    import subprocess
    import sys

    core = sorted(
        _module_name(p) for p in (REPO / "apr_localizer").rglob("*.py") if p.name not in ("node.py", "ros_convert.py")
    )
    code = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        root = name.split('.')[0]\n"
        "        if root in {'rclpy', 'tf2_ros', 'sensor_msgs', 'geometry_msgs', 'std_msgs', 'nav_msgs',\n"
        "                    'diagnostic_msgs', 'lifecycle_msgs', 'tf2_msgs', 'builtin_interfaces', 'rosbags'}:\n"
        "            raise ImportError(f'{name} is blocked (no ROS here)')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import importlib\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
