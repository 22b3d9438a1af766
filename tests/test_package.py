"""minicompact is an installed package: tests, lessons and bench scripts just `import minicompact`."""
import importlib.metadata
import os

import minicompact


def test_installed_version_matches_the_source():
    assert importlib.metadata.version("minicompact") == minicompact.__version__


def test_the_import_is_this_checkout():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.dirname(os.path.abspath(minicompact.__file__))) == root


def _package_imports():
    """{module: [(imported module, [names])]} for every module of minicompact and run.py,
    read with ``ast`` (nothing is imported), relative imports resolved."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in sorted((root / "minicompact").rglob("*.py"))}
    files["run"] = root / "run.py"
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [a.name for a in node.names]
                # "from package import module" imports the module
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in files]
                edges += [(s, []) for s in subs] or [(base, names)]
        graph[name] = [(m, names) for m, names in edges if m in files]
    return graph


def test_no_import_cycles():
    """The package imports in one direction (backend → kernels → layers → model → data →
    harness → run.py): no module reaches itself through its imports, lazy ones included."""
    graph = {m: sorted({t for t, _ in edges}) for m, edges in _package_imports().items()}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for target in graph[module]:
            visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    assert "minicompact.harness.trainer" in graph and graph["run"]


def test_no_private_name_is_imported_across_modules():
    private = [f"{m}: {t}.{n}" for m, edges in _package_imports().items() for t, names in edges
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private
