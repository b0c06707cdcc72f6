"""Starter versions of the course notebooks: the same notebooks without their solutions.

Every notebook of the course (the lessons ``notebooks/NN_topic.ipynb`` and the hands-on
``notebooks/exercises/ex_4_N_topic.ipynb``) holds 2-4 exercises, each a run of cells tagged as
``notebooks/README.md`` describes::

    exercise          (markdown)  the task
    starter           (code)      the learner's answer variables, set to None; runs as is
    solution-heading  (markdown)  "Solution": says the cell below is hidden
    solution          (code)      the worked answer (collapsed in JupyterLab and in the book)
    check             (code)      ``with labkit.course.checks.check(...)``: asserts on the answer

CI runs the full notebooks, so every solution is executed and checked. A learner starts from
the starter notebook instead: :func:`starter_notebook` drops the solution cells and their
headings and keeps everything else. Each check then reports its task (not answered, failed by
how much, or passed) without stopping the notebook, and the last cell
(``labkit.course.checks.summary()``) lists them all. A later cell that uses an answer (a figure of
it) runs only once that task's check has passed: in the starter it is wrapped in
``if passed("Task N"):``, so Run All reaches the end. :func:`write_starters` writes the
starters of a whole course folder (``labkit exercises --out DIR``).
"""

from __future__ import annotations

import ast
import copy
import textwrap
from pathlib import Path

import nbformat

from labkit.course.notebooks import EXERCISE_GLOB

LESSON_GLOB = "NN_topic.ipynb"  # labkit.course.notebooks.lesson_notebooks: 00, 00b, 01, ...
SOLUTION_TAG = "solution"
DROPPED_TAGS = {SOLUTION_TAG, "solution-heading"}
STARTER_NOTE = (
    "> **Starter notebook.** The solutions were removed: fill in every cell that sets an answer "
    "to `None`, then run the check cell below it. Each check says whether its task passed, "
    "failed (by how much, with a hint) or is not answered yet, and Run All goes on to the end, "
    "where the last cell lists every task. A cell that uses an answer runs once its check "
    "passes."
)


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def check_call(source: str) -> tuple[str, list[str]] | None:
    """(task, answers) of the ``check("Task", answers=[...])`` call in a check cell's source."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "check"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            answers: list[str] = []
            for keyword in node.keywords:
                if keyword.arg == "answers" and isinstance(keyword.value, ast.List | ast.Tuple):
                    answers = [e.value for e in keyword.value.elts if isinstance(e, ast.Constant)]
            return str(node.args[0].value), answers
    return None


def _names_read(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _guarded(source: str, tasks: list[str], names: list[str]) -> str:
    """``source`` run only once ``tasks`` passed (a starter cell that uses their answers)."""
    quoted = ", ".join(repr(t) for t in tasks)
    uses = ", ".join(f"`{n}`" for n in names)
    return (
        "from labkit.course.checks import passed\n\n"
        f"if passed({quoted}):  # starter: this cell uses your answer ({uses})\n"
        f"{textwrap.indent(source, '    ')}\n"
        "else:\n"
        f"    print({f'skipped until {quoted} passes: this cell uses {uses}'!r})"
    )


def starter_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of the notebook ``nb`` without its solution cells.

    Cells tagged ``solution`` or ``solution-heading`` are dropped; every other cell (tasks,
    starters, checks, the explanatory cells) is kept in order, with outputs and execution
    counts cleared. A code cell after a check that reads one of that check's ``answers`` is
    wrapped in ``if passed("Task N"):``. A short note after the first cell tells the learner
    what to do. ``nb`` itself is not changed. Raises ValueError when ``nb`` has no solution
    cell (it has no exercises, or it is already a starter).
    """
    if not any(SOLUTION_TAG in _tags(cell) for cell in nb.cells):
        raise ValueError("the notebook has no cell tagged 'solution': nothing to remove")
    starter = copy.deepcopy(nb)
    cells = []
    answers: dict[str, str] = {}  # answer name -> its task
    for cell in starter.cells:
        tags = _tags(cell)
        if tags & DROPPED_TAGS:
            continue
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            if "check" in tags:
                found = check_call(cell.source)
                if found is not None:
                    answers.update({name: found[0] for name in found[1]})
            elif not tags & {"starter", "checks-summary"}:
                used = sorted(_names_read(cell.source) & answers.keys())
                if used:
                    tasks = list(dict.fromkeys(answers[name] for name in used))
                    cell.source = _guarded(cell.source, tasks, used)
        cells.append(cell)
    note = nbformat.v4.new_markdown_cell(STARTER_NOTE)
    if "id" in cells[0]:  # nbformat >= 4.5: a fixed id, so the file is the same every time
        note["id"] = "starter-note"
    else:
        note.pop("id", None)
    starter.cells = [cells[0], note, *cells[1:]]
    return starter


def course_notebooks(src_dir: str | Path) -> list[Path]:
    """The notebooks with exercises under ``src_dir``: lessons (``NN_topic.ipynb``,
    ``NNb_topic.ipynb``) and ``ex_*.ipynb``, in ``src_dir`` and in its ``exercises/`` folder, in
    that order."""
    from labkit.course.notebooks import lesson_notebooks

    src_dir = Path(src_dir)
    found: list[Path] = []
    for folder in (src_dir, src_dir / "exercises"):
        if folder.is_dir():
            found += lesson_notebooks(folder) + sorted(folder.glob(EXERCISE_GLOB))
    return found


def write_starters(src_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the starter version of every notebook with exercises under ``src_dir``.

    ``src_dir`` is the course folder (``notebooks``: its lessons and ``exercises/``) or a
    folder of exercise notebooks. Each starter keeps its notebook's file name and sub-folder,
    so it runs from ``out_dir`` as the original runs from ``src_dir``. Notebooks without a
    solution cell are skipped. Returns the written paths, in order. Raises ValueError when
    ``src_dir`` holds no notebook with exercises, or when ``out_dir`` is ``src_dir`` (that
    would overwrite the solutions).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(
            f"out_dir is the source folder {str(src_dir)!r}: the starters would overwrite the "
            "notebooks with their solutions; choose another folder"
        )
    written = []
    for path in course_notebooks(src_dir):
        nb = nbformat.read(path, as_version=4)
        if not any(SOLUTION_TAG in _tags(cell) for cell in nb.cells):
            continue
        target = out_dir / path.relative_to(src_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(starter_notebook(nb), target)
        written.append(target)
    if not written:
        raise ValueError(
            f"no notebooks with exercises ({LESSON_GLOB}, {EXERCISE_GLOB}) in {str(src_dir)!r}"
        )
    return written
