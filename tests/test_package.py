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


# Each module's floor, from the bottom up (README, "Code map"): a module may import only modules
# of its own floor or of floors below it.  A new module gets a floor here before it lands.
FLOORS = {
    "minicompact": 0, "minicompact.backend": 0, "minicompact.system": 0,
    # kernels: the arithmetic a layer runs, on NumPy and as CUDA kernels
    "minicompact.cuda": 1, "minicompact.im2col": 1, "minicompact.winograd": 1, "minicompact.separable_maxpool": 1,
    # layers, each a forward and a backward, and the gradient checker that proves them
    "minicompact.layers": 2, "minicompact.gradcheck": 2,
    "minicompact.layers.residual": 2, "minicompact.layers.global_pool": 2,
    # the model and the maths of eq. 1: regularizers, losses, metrics, the optimizer, probes
    "minicompact.model": 3, "minicompact.regularizers": 3, "minicompact.losses": 3, "minicompact.metrics": 3,
    "minicompact.architectures": 3, "minicompact.graph_metrics": 3, "minicompact.folding": 3,
    "minicompact.group_scale": 3, "minicompact.objective": 3, "minicompact.optim": 3,
    "minicompact.linear_probe": 3, "minicompact.reference": 3, "minicompact.exercises": 3,
    # images and processes
    "minicompact.data": 4, "minicompact.distributed": 4,
    # the training loop, and the maths that works on trained models
    "minicompact.training": 5, "minicompact.thin": 5, "minicompact.thin_graph": 5, "minicompact.transfer": 5, "minicompact.export": 5,
    # the command line, the sweep over it, the script
    "minicompact.cli": 6, "minicompact.sweep": 7, "run": 8,
}


def floor(module):
    """The floor of ``module``: that of the longest prefix of it in FLOORS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no floor in tests/test_package.py FLOORS: give it one")


def upward_imports():
    """Every import, lazy ones included, that runs up: 'module (floor) -> target (floor)'."""
    return [f"{m} ({floor(m)}) -> {t} ({floor(t)})" for m, edges in sorted(_package_imports().items())
            for t in sorted({t for t, _ in edges}) if floor(t) > floor(m)]


def test_every_import_points_down():
    """backend, system → kernels → layers → model, regularizers → data → training → cli →
    sweep → run.py: each import goes to the importer's floor or one below it."""
    up = upward_imports()
    assert not up, "imports that run up:\n" + "\n".join(up)


def test_no_import_cycles():
    """No module reaches itself through its imports, lazy ones included (within one floor too)."""
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
    assert "minicompact.training.trainer" in graph and graph["run"]


def test_no_private_name_is_imported_across_modules():
    private = [f"{m}: {t}.{n}" for m, edges in _package_imports().items() for t, names in edges
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private


if __name__ == "__main__":  # python tests/test_package.py: the import-floor check's output
    lines = upward_imports()
    print(f"{len(_package_imports())} modules, {sum(len(e) for e in _package_imports().values())} imports; "
          f"{len(lines)} run up" + "".join("\n  " + line for line in lines))
