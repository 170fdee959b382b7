"""The code's layout stays what README's Layout section and docs/DESIGN.md say: no import circles between the
package's modules (function-level imports included), and every path the Layout section names exists."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"fasttrain": REPO / "fasttrain", "fasttrain_kernels": REPO / "kernels" / "fasttrain_kernels"}


def _module_name(path: Path) -> str:
    for package, root in PACKAGES.items():
        if root in path.parents or path.parent == root:
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise AssertionError(path)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file, function-level imports included."""
    modules = {_module_name(p): p for root in PACKAGES.values() for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's first appearance in a depth-first walk (enough to name each circle once)."""
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 20 and sum(map(len, graph.values())) > 40  # the scan saw the package
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_find_cycles_sees_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_readme_layout_names_existing_paths():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"`([\w./-]+(?:/|\.py|\.md|\.sh|\.yaml))`", layout))
    assert len(paths) > 10
    missing = []
    for p in sorted(paths):
        candidates = [REPO / p, REPO / "fasttrain" / p, REPO / "fasttrain" / "model" / p, REPO / "benchmarks" / p,
                      REPO / "kernels" / "fasttrain_kernels" / p, REPO / "tools" / p]
        if not any(c.exists() for c in candidates):
            missing.append(p)
    assert not missing, f"README's Layout names paths that do not exist: {missing}"
    # and the other way round: every module of the code folders is named, by itself or by its folder
    unnamed = []
    for folder in ("fasttrain", "kernels", "benchmarks", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO)
            if path.name == "__init__.py" or "demo" in rel.parts[:2]:
                continue
            named = f"`{path.name}`" in layout or f"`{rel}`" in layout or any(f"`{part}/`" in layout for part in rel.parts[1:-1])
            if not named:
                unnamed.append(str(rel))
    assert not unnamed, f"README's Layout does not name: {unnamed}"


def test_code_metrics_follow_the_config_through_a_run_set_up():
    """tools/code_metrics.py (issue 16's before/after numbers) still runs on this tree: the demo run's set-up
    is traced up to its first loss, and the config reaches the assembly."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import code_metrics
    finally:
        sys.path.remove(str(REPO / "tools"))
    lines = code_metrics.lines_per_folder(REPO)
    assert all(lines[f] > 100 for f in ("fasttrain", "kernels", "benchmarks", "tests")), lines
    longest = code_metrics.longest_functions(REPO, 3)
    assert len(longest) == 3 and longest[0][0] >= longest[2][0]
    trace = code_metrics.config_trace(REPO)
    assert trace["visits"].get("fasttrain/assembly.py", 0) >= 1 and trace["touched"] > 10, trace
    assert 0 < trace["climbs"] <= sum(trace["visits"].values()), trace
