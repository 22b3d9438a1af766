"""The lesson notebooks: each one runs top to bottom, checks what it claims, and copies nothing.

Every ``lessons/NN_*.ipynb`` is picked up without editing this file.  Executing them is the
slow part of the suite (a Jupyter kernel per notebook); the static checks are instant.

"Implement it" exercises are functions named ``my_...`` whose body sits between the answer
markers of ``lessons/execute.py``; they are the one kind of function a lesson may write in the
library's place, and even they must not be a copy of the library's body.  The stored answers
must pass their check cells, and the blank copies (``execute.py --blank``) must fail exactly
those cells, with ExerciseError's "not implemented yet", and no other.
"""
import ast
import glob
import os
import re

import nbformat
import pytest

from lessons.execute import BEGIN_ANSWER, DEVICE_LINE, blank, execute, lesson_paths, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = lesson_paths()
IDS = [os.path.basename(p)[:-6] for p in NOTEBOOKS]
MAX_FOLDER_BYTES = 5 * 2**20     # outputs (figures included) are committed: keep them small
EXERCISE_PREFIX = "my_"


def exercises(nb):
    """The names of the lesson's exercise functions (``def my_...`` holding an answer marker)."""
    names = []
    for cell in nb.cells:
        if cell.cell_type == "code" and any(BEGIN_ANSWER.match(line) for line in cell.source.splitlines()):
            names += [n.name for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.FunctionDef)
                      and n.name.startswith(EXERCISE_PREFIX)]
    return names


CIFAR_ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10-train.tar.gz")
DATA_SWITCH = "MINICOMPACT_LESSON_DATA"     # "generated" (default) or "cifar", read by the training lesson
TRAINING = [p for p in NOTEBOOKS if DATA_SWITCH in open(p, encoding="utf-8").read()]
WITH_EXERCISES = [p for p in NOTEBOOKS if exercises(nbformat.read(p, as_version=4))]


def code_cells(nb):
    """The code cells' sources, IPython magics and shell lines (%, !) blanked out."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.strip():
            lines = ["" if line.lstrip().startswith(("%", "!")) else line
                     for line in cell.source.splitlines()]
            out.append("\n".join(lines))
    return out


def _body_key(node):
    """A def's body as a string, its docstring dropped: equal keys mean copied code."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return "\n".join(ast.dump(stmt) for stmt in body), sum(1 for _ in ast.walk(ast.Module(body, [])))


def library_definitions():
    """(top-level names, {body key: qualified name}) of every def and class in minicompact/."""
    names, bodies = set(), {}
    for path in glob.glob(os.path.join(ROOT, "minicompact", "**", "*.py"), recursive=True):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                key, size = _body_key(node)
                if size >= 12:  # one-line bodies ("return x") are not copies worth naming
                    bodies[key] = f"{os.path.relpath(path, ROOT)}:{node.name}"
    return names, bodies


@pytest.fixture(scope="module")
def library():
    return library_definitions()


def test_there_is_a_path_of_at_least_ten_lessons():
    assert len(NOTEBOOKS) >= 10, [os.path.basename(p) for p in NOTEBOOKS]


def printed_sources(nb):
    """{cell index: printed text} of the code cells that print library source (``getsource``)."""
    return {i: "".join(o.get("text", "") for o in c.outputs if o.get("output_type") == "stream")
            for i, c in enumerate(nb.cells) if c.cell_type == "code" and "getsource(" in c.source}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_lesson_runs_top_to_bottom(path, device):
    """It runs; and the library source it prints is today's (its saved outputs are not stale)."""
    stored = printed_sources(nbformat.read(path, as_version=4))
    ran, _ = execute(path, device)
    fresh = printed_sources(ran)
    stale = [i for i in fresh if fresh[i] != stored.get(i)]
    assert not stale, (f"cells {stale} print library source that changed since the lesson was saved: "
                       f"run python lessons/execute.py {os.path.basename(path)[:2]}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_lesson_checks_itself_and_imports_the_library(path, library):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert cells and DEVICE_LINE.search(cells[0]), 'the first code cell must set DEVICE = "cpu"'
    trees = [ast.parse(src) for src in cells]
    nodes = [n for tree in trees for n in ast.walk(tree)]
    imports = [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert any((getattr(n, "module", None) or "").startswith("minicompact")
               or any(a.name.startswith("minicompact") for a in n.names) for n in imports), \
        "a lesson imports the library"
    asserts = [n for n in nodes if isinstance(n, ast.Assert)
               or (isinstance(n, ast.Call) and "assert" in ast.unparse(n.func).rsplit(".", 1)[-1])]
    assert asserts, "a lesson asserts what it claims"
    names, bodies = library
    answers = set(exercises(nb))
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            assert node.name not in names, \
                f"{node.name} shadows minicompact's {node.name}: import it instead"
            assert not node.name.startswith(EXERCISE_PREFIX) or node.name in answers, \
                f"{node.name}: a my_... function is an exercise, its body between answer markers"
            key, _ = _body_key(node)
            assert key not in bodies, f"{node.name} copies {bodies[key]}: import it instead"


def test_the_training_lesson_shows_what_a_reader_gets():
    """Its stored outputs come from the generated data, which is also what every default run
    (the suite's included) trains on; the development checkout's CIFAR photos are opt-in."""
    assert TRAINING, f"no lesson reads {DATA_SWITCH}"
    for path in TRAINING:
        nb = nbformat.read(path, as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "generated demo data" in text and "CIFAR-10 photos:" not in text


@pytest.mark.skipif(not os.path.isfile(CIFAR_ARCHIVE), reason="no CIFAR-10 archive beside the checkout")
@pytest.mark.parametrize("path", TRAINING, ids=[os.path.basename(p)[:-6] for p in TRAINING])
def test_the_training_lesson_holds_on_the_cifar_photos(path):
    ran, _ = execute(path, env={DATA_SWITCH: "cifar"})
    assert any("CIFAR-10 photos" in o.get("text", "") for c in ran.cells if c.cell_type == "code"
               for o in c.outputs)


def test_lessons_have_exercises_to_implement():
    names = {n for p in NOTEBOOKS for n in exercises(nbformat.read(p, as_version=4))}
    assert {"my_im2col", "my_conv_backward", "my_batchnorm_backward", "my_max_pool_backward",
            "my_softmax_cross_entropy_grad", "my_gamma_subgradient", "my_group_soft_threshold",
            "my_sgd_momentum_step", "my_layer_metrics", "my_winograd_tile"} <= names, names


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=[os.path.basename(p)[:-6] for p in WITH_EXERCISES])
def test_blank_copies_fail_the_checks_and_only_them(path):
    """Stored answers pass (``test_lesson_runs_top_to_bottom``); the blanked copy, run up to its
    last check, fails the cells that call ``check_exercise`` on an exercise, with "not
    implemented yet", and no other."""
    nb, count = blank(nbformat.read(path, as_version=4))
    names = exercises(nbformat.read(path, as_version=4))
    assert count == len(names)
    last_check = max(i for i, c in enumerate(nb.cells)
                     if any(f"check_exercise({name}" in c.source for name in names))
    nb.cells = nb.cells[:last_check + 1]          # what follows is the stored run's business
    ran, _ = run(nb, allow_errors=True)
    failed, checks = [], []
    for i, cell in enumerate(ran.cells):
        if cell.cell_type != "code":
            continue
        if any(f"check_exercise({name}" in cell.source for name in names):
            checks.append(i)
        failed += [(i, o) for o in cell.outputs if o.output_type == "error"]
    assert len(checks) >= len(names), "every exercise has a check cell"
    assert [i for i, _ in failed] == checks, [(i, o.ename, o.evalue[:200]) for i, o in failed]
    for _, out in failed:
        assert out.ename == "ExerciseError" and "not implemented yet" in out.evalue, out.evalue


CHECKED = re.compile(r"check_exercise\(\s*my_\w+\s*,\s*([\w.]+)")


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=[os.path.basename(p)[:-6] for p in WITH_EXERCISES])
def test_blank_copies_show_no_answer(path):
    """A blank copy never prints the library function an exercise re-implements (the stored
    lesson shows it after the check, in a cell tagged "answer", which blank copies leave out)."""
    nb = nbformat.read(path, as_version=4)
    solutions = {m.split(".")[-1] for c in nb.cells if c.cell_type == "code" for m in CHECKED.findall(c.source)}
    assert solutions, "every exercise is checked against a library function"
    blanked, _ = blank(nb)
    shown = [(i, name) for i, c in enumerate(blanked.cells) for name in solutions
             if re.search(rf"getsource\([\w.]*\b{name}\b", c.source)]
    assert not shown, f"blank copy cells print the solution: {shown}"


def test_blank_refuses_unbalanced_markers():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("def my_f():\n    # --- your code here ---\n    return 1\n")]
    with pytest.raises(ValueError, match="never closed"):
        blank(nb)


def test_the_kernel_imports_this_checkout(tmp_path):
    """The kernel runs in lessons/ and imports the minicompact beside it, whatever PYTHONPATH says."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, minicompact\nprint(os.getcwd())\nprint(minicompact.__file__)")]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tmp_path)      # a path with no minicompact in it
    try:
        ran, _ = run(nb)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    cwd, module = ran.cells[0].outputs[0].text.split()
    assert os.path.samefile(cwd, os.path.join(ROOT, "lessons"))
    assert os.path.samefile(module, os.path.join(ROOT, "minicompact", "__init__.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_lesson_opens_with_its_aim_and_ends_with_exercises(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    last_md = [c for c in nb.cells if c.cell_type == "markdown"][-1]
    assert "what to try next" in last_md.source.lower()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_lesson_outputs_are_committed_from_one_clean_run(path):
    """The saved outputs come from one top-to-bottom run (``python lessons/execute.py``)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]["ename"] if errors else None


def test_lessons_folder_stays_small():
    folder = os.path.join(ROOT, "lessons")
    size = sum(os.path.getsize(os.path.join(top, f)) for top, _, files in os.walk(folder)
               for f in files if ".ipynb_checkpoints" not in top)
    assert size < MAX_FOLDER_BYTES, f"lessons/ holds {size / 2**20:.1f} MB"
