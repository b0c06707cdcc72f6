"""The course's exercises in nbgrader's terms, so a JupyterHub class can release and grade them.

nbgrader (the Jupyter classroom standard) reads cell metadata ``metadata.nbgrader``. The
course's exercise cells are tagged (``notebooks/README.md``: ``exercise``, ``starter``,
``solution``, ``check``); :func:`with_nbgrader_metadata` derives nbgrader's metadata from those
tags, and the notebooks are committed with it:

============  ====================================================================
course tag    nbgrader metadata
============  ====================================================================
``exercise``  read-only task text: ``locked``, ``grade_id`` ``task<k>``
``starter``   the student's answer cell: ``solution``, ``grade_id`` ``task<k>_answer``
``check``     autograded test: ``grade``, ``locked``, ``points`` (1 unless set),
              ``grade_id`` ``task<k>_check``
``solution``  the reference answer: no nbgrader metadata; :class:`RemoveSolutionCells`
              drops it from the released notebook
============  ====================================================================

``k`` counts the notebook's ``exercise`` cells from 1; a second starter or check of one task
gets ``_2``, ``_3``. All other cells stay ordinary cells (students may change the parameters
cell, e.g. ``SMOKE = True``). Points set by hand in a check cell's metadata are kept.

Releasing with nbgrader then needs a few lines of configuration (:data:`NBGRADER_CONFIG`; they
also put ``labkit.course.checks`` in strict mode, where a failed check raises instead of only
reporting, so nbgrader scores it 0):
``nbgrader generate_assignment`` first drops the reference solutions
(:class:`RemoveSolutionCells`) and keeps the starter cells as they are
(:class:`ClearSolutionsKeepStarters`), so the released notebook is the course's starter (what
``labkit exercises`` writes), with nbgrader's read-only cells and checksums. ``nbgrader
autograde`` needs nothing else: it restores the locked and check cells from its database, runs
the notebook and scores each check cell.
"""

from __future__ import annotations

import copy
from typing import Any

import nbformat

SCHEMA_VERSION = 3  # nbgrader's cell metadata schema
NBGRADER_CONFIG = (  # the lines to add to a course's nbgrader_config.py
    "from labkit.course.classroom import generate_assignment_preprocessors\n"
    "c.GenerateAssignment.preprocessors = generate_assignment_preprocessors()\n"
    "import os  # labkit.course.checks: a failed check raises, so its test cell scores 0\n"
    "os.environ['LABKIT_STRICT_CHECKS'] = '1'\n"
)


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _meta(grade_id: str, *, solution=False, grade=False, locked=False, points=None) -> dict:
    meta: dict[str, Any] = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": locked,
        "schema_version": SCHEMA_VERSION,
        "solution": solution,
        "task": False,
    }
    if grade:
        meta["points"] = points
    return meta


def with_nbgrader_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of the course notebook ``nb`` with nbgrader metadata on its exercise cells.

    Idempotent: applied to a notebook that already has it, it returns an equal notebook.
    Raises ValueError when a ``starter`` or ``check`` cell comes before the first
    ``exercise`` cell (it would belong to no task).
    """
    nb = copy.deepcopy(nb)
    task = 0
    counts: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        tags = _tags(cell)
        old = cell.metadata.get("nbgrader", {})
        if "exercise" in tags:
            task += 1
        role = (
            "text"
            if "exercise" in tags
            else "answer"
            if "starter" in tags
            else "check"
            if "check" in tags
            else None
        )
        if role is None or "solution" in tags:
            cell.metadata.pop("nbgrader", None)
            continue
        if task == 0:
            raise ValueError(f"cell {index} is tagged {sorted(tags)} before any 'exercise' cell")
        base = f"task{task}" if role == "text" else f"task{task}_{role}"
        counts[base] = counts.get(base, 0) + 1
        grade_id = base if counts[base] == 1 else f"{base}_{counts[base]}"
        if role == "text":
            cell.metadata["nbgrader"] = _meta(grade_id, locked=True)
        elif role == "answer":
            cell.metadata["nbgrader"] = _meta(grade_id, solution=True)
        else:
            points = old.get("points", 1) if old.get("grade") else 1
            cell.metadata["nbgrader"] = _meta(grade_id, grade=True, locked=True, points=points)
    return nb


try:  # nbgrader is an optional dependency (the dev extra): the rest of labkit works without it
    from nbgrader.preprocessors import ClearSolutions, NbGraderPreprocessor
except ImportError:  # pragma: no cover - exercised only where nbgrader is missing
    ClearSolutions = NbGraderPreprocessor = None


def generate_assignment_preprocessors() -> list:
    """nbgrader's ``generate_assignment`` preprocessors, adapted to the course's cells.

    :class:`RemoveSolutionCells` goes first, and :class:`ClearSolutionsKeepStarters` takes
    the place of nbgrader's ``ClearSolutions``.
    """
    if ClearSolutions is None:
        raise ModuleNotFoundError("nbgrader is not installed: pip install -e '.[dev]'")
    from nbgrader.converters import GenerateAssignment

    defaults = GenerateAssignment.class_traits()["preprocessors"].default()
    keep = "labkit.course.classroom.ClearSolutionsKeepStarters"
    return [
        "labkit.course.classroom.RemoveSolutionCells",
        *(keep if pp is ClearSolutions else pp for pp in defaults),
    ]


if ClearSolutions is not None:

    class RemoveSolutionCells(NbGraderPreprocessor):
        """The course's starter notebook: the cells tagged ``solution`` removed.

        Applies :func:`labkit.course.exercises.starter_notebook` to a notebook with solution cells
        and leaves others alone. First of :func:`generate_assignment_preprocessors`.
        """

        def preprocess(self, nb, resources):
            from labkit.course.exercises import SOLUTION_TAG, starter_notebook

            if any(SOLUTION_TAG in _tags(cell) for cell in nb.cells):
                nb = starter_notebook(nb)
            return nb, resources

    class ClearSolutionsKeepStarters(ClearSolutions):
        """nbgrader's ``ClearSolutions``, except that a ``starter`` cell without a
        ``### BEGIN SOLUTION`` region is released as it is: it already is the starter
        (nbgrader would replace the whole answer cell with ``raise NotImplementedError()``).
        """

        def preprocess_cell(self, cell, resources, cell_index):
            region = self.begin_solution_delimeter in cell.source
            if "starter" in _tags(cell) and not region:
                return cell, resources
            return super().preprocess_cell(cell, resources, cell_index)


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.course.classroom NOTEBOOK...``: write nbgrader metadata into notebooks."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m labkit.course.classroom",
        description="add nbgrader cell metadata to course notebooks, derived from their tags",
    )
    parser.add_argument("notebooks", nargs="+")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        updated = with_nbgrader_metadata(nb)
        if updated != nb:
            nbformat.write(updated, path)
            print(f"{path}: nbgrader metadata written")
        else:
            print(f"{path}: up to date")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
