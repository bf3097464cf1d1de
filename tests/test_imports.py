"""The shape of the package: every module under pipeline/ imports, the module-level imports among them form no
cycle, and no module imports another's private (`_name`) names. A cycle works until someone imports the modules
in another order; a private name used elsewhere is an interface nobody declared."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "pipeline"


def pipeline_modules() -> dict[str, Path]:
    """{dotted name: source file} of every module and package under pipeline/."""
    modules = {"pipeline": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        rel = Path(*info.name.split(".")[1:])
        modules[info.name] = PACKAGE_DIR / rel / "__init__.py" if info.ispkg else PACKAGE_DIR / rel.with_suffix(".py")
    return modules


def _module_level(body: list[ast.stmt]):
    """The import statements that run when the module is imported: those of its body and of module-level
    if / try blocks, not those inside functions or classes, and not `if TYPE_CHECKING:` ones."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]):
    """(imported module, names taken from it) for each module an import statement names."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, []
        return
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    names = [alias.name for alias in node.names]
    yield base, [n for n in names if f"{base}.{n}" not in known]
    for n in names:  # `from pipeline.tasks import registry` imports the module pipeline.tasks.registry
        if f"{base}.{n}" in known:
            yield f"{base}.{n}", []


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports at module level. Importing `a.b.c` runs the packages `a` and
    `a.b` first, so they count as imported too."""
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level(tree.body):
            for target, _ in _imported(node, name, path.name == "__init__.py", known):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in known and prefix != name:
                        graph[name].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def private_imports(modules: dict[str, Path]) -> list[str]:
    """`from pipeline.x import _name` in a module other than pipeline.x, anywhere in the file."""
    known = set(modules)
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                for target, names in _imported(node, name, path.name == "__init__.py", known):
                    if target.startswith("pipeline") and target != name:
                        found += [f"{name}: from {target} import {n}" for n in names
                                  if n.startswith("_") and not n.startswith("__")]
    return found


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(pipeline_modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_module_level_imports_form_no_cycle():
    modules = pipeline_modules()
    graph = import_graph(modules)
    assert len(modules) > 40 and sum(map(len, graph.values())) > 50  # the graph is the package's, not empty
    assert "pipeline.tasks.registry" in graph["pipeline.train.loop"] and "pipeline.launcher" in graph["pipeline.demo"]
    assert "pipeline.tasks" in graph["pipeline.tasks.registry"]  # a submodule's import runs its package first
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_imports_another_modules_private_names():
    assert private_imports(pipeline_modules()) == []


def test_private_imports_are_found(tmp_path):
    (tmp_path / "a.py").write_text("_hidden = shown = _also = _inside = 1\n")
    src = tmp_path / "b.py"
    src.write_text("from pipeline.a import _hidden, shown\nfrom .a import _also\n\n"
                   "def f():\n    from pipeline.a import _inside\n")
    found = private_imports({"pipeline.a": tmp_path / "a.py", "pipeline.b": src})
    assert found == ["pipeline.b: from pipeline.a import _hidden", "pipeline.b: from pipeline.a import _also",
                     "pipeline.b: from pipeline.a import _inside"]
