"""The project's modules import one another one way: no circle, counting every import at any depth
(inside a function too), read with ast."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path) -> dict:
    """{dotted name: path} of the top-level modules and of the packages' modules under `root`."""
    found = {p.stem: p for p in root.glob("*.py")}
    for init in root.glob("*/__init__.py"):
        pkg = init.parent.name
        found[pkg] = init
        found.update({f"{pkg}.{p.stem}": p for p in init.parent.glob("*.py") if p.stem != "__init__"})
    return found


def imports(root: Path) -> dict:
    """{module: the project's modules it imports}: `import a`, `from a import b` (a.b when it is a
    module, else a), `from a.b import c`, and relative imports inside a package."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        pkg = name.rsplit(".", 1)[0] if "." in name else (name if path.name == "__init__.py" else "")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(filter(None, [pkg, base]))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        graph[name] = sorted(d for d in deps if d in mods and d != name)
    return graph


def circle(graph: dict) -> list | None:
    """A circle of imports (a, b, ..., a), or None."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_project_has_no_import_circle():
    graph = imports(ROOT)
    assert {"checkpoint", "support.released", "scoring.etbench", "scoring.rules"} <= set(graph)
    assert "support.released" in graph["checkpoint"] and "checkpoint" not in graph["support.released"]
    found = circle(graph)
    assert found is None, "import circle: " + " -> ".join(found)


def test_a_circle_is_found_wherever_its_imports_are(tmp_path):
    """The check finds a circle made by a function-level import, through a package and a relative import."""
    (tmp_path / "a.py").write_text("import c\n")
    (tmp_path / "c.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "b.py").write_text("from .d import x\n")
    (tmp_path / "pkg" / "d.py").write_text("import a\nx = 1\n")
    graph = imports(tmp_path)
    assert graph["c"] == ["pkg.b"] and graph["pkg.b"] == ["pkg.d"]
    assert circle(graph) == ["a", "c", "pkg.b", "pkg.d", "a"]
    (tmp_path / "pkg" / "d.py").write_text("x = 1\n")
    assert circle(imports(tmp_path)) is None
