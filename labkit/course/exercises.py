"""Starter versions of the hands-on exercise notebooks: the same notebook without its solutions.

The exercise notebooks ``notebooks/exercises/ex_4_N_topic.ipynb`` hold every task four times
over, in cells tagged as ``notebooks/README.md`` describes::

    exercise   (markdown)  the task
    starter    (code)      the learner's answer variables, set to None; runs as is
    solution   (code)      the worked answer, tagged hide-input too (collapsed in the book)
    check      (code)      asserts on the answer, with explicit tolerances

CI runs the full notebooks, so every solution is executed and checked. A learner starts from
the starter notebook instead: :func:`starter_notebook` drops the solution cells and keeps
everything else, so each check cell fails (``AssertionError``) until the answer above it is
filled in. :func:`write_starters` does that for a whole folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat

EXERCISE_GLOB = "ex_*.ipynb"
SOLUTION_TAG = "solution"
STARTER_NOTE = (
    "> **Starter notebook.** The solutions were removed: fill in every cell that sets an answer "
    "to `None`, then run the check cell below it. A check fails with an `AssertionError` until "
    "the answer is right."
)


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def starter_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of the exercise notebook ``nb`` without its solution cells.

    Cells tagged ``solution`` are dropped; every other cell (tasks, starters, checks, the
    explanatory cells) is kept in order, with outputs and execution counts cleared. A short
    note after the first cell tells the learner what to do. ``nb`` itself is not changed.
    Raises ValueError when ``nb`` has no solution cell (it is not an exercise notebook, or it
    is already a starter).
    """
    if not any(SOLUTION_TAG in _tags(cell) for cell in nb.cells):
        raise ValueError("the notebook has no cell tagged 'solution': nothing to remove")
    starter = copy.deepcopy(nb)
    cells = []
    for cell in starter.cells:
        if SOLUTION_TAG in _tags(cell):
            continue
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    note = nbformat.v4.new_markdown_cell(STARTER_NOTE)
    if "id" in cells[0]:  # nbformat >= 4.5: a fixed id, so the file is the same every time
        note["id"] = "starter-note"
    else:
        note.pop("id", None)
    starter.cells = [cells[0], note, *cells[1:]]
    return starter


def write_starters(src_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the starter version of every ``ex_*.ipynb`` in ``src_dir`` to ``out_dir``.

    Each starter keeps its notebook's file name. Returns the written paths, in name order.
    Raises ValueError when ``src_dir`` holds no exercise notebook, or when ``out_dir`` is
    ``src_dir`` (that would overwrite the solutions).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    notebooks = sorted(src_dir.glob(EXERCISE_GLOB))
    if not notebooks:
        raise ValueError(f"no exercise notebooks ({EXERCISE_GLOB}) in {str(src_dir)!r}")
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(
            f"out_dir is the source folder {str(src_dir)!r}: the starters would overwrite the "
            "notebooks with their solutions; choose another folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        starter = starter_notebook(nbformat.read(path, as_version=4))
        target = out_dir / path.name
        nbformat.write(starter, target)
        written.append(target)
    return written
