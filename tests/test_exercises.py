"""The hands-on exercises: their starter versions have no solutions, and their checks can fail.

``tests/test_notebooks.py`` runs the full exercise notebooks (solutions included) in smoke
mode and checks their conventions. This file checks ``labkit.course.exercises``: the starter
notebook a learner gets keeps every task, starter and check cell but no solution cell, and a
starter executed as shipped stops with an ``AssertionError`` in a check cell (so the checks
really test the answers: the ``None`` starter values fail them).
"""

from pathlib import Path

import nbformat
import pytest

from labkit.course.exercises import STARTER_NOTE, starter_notebook, write_starters
from labkit.course.notebooks import NotebookError, run_notebook

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_DIR = ROOT / "notebooks" / "exercises"
EXERCISES = sorted(EXERCISE_DIR.glob("ex_*.ipynb"))
params = pytest.mark.parametrize("path", EXERCISES, ids=[p.stem for p in EXERCISES])


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _count(nb, tag: str) -> int:
    return sum(tag in _tags(cell) for cell in nb.cells)


def test_the_five_exercises_exist():
    numbers = sorted(p.name[len("ex_4_")] for p in EXERCISES)
    assert numbers == ["1", "2", "3", "4", "5"], [p.name for p in EXERCISES]


@params
def test_starter_drops_only_the_solutions(path: Path):
    nb = _read(path)
    starter = starter_notebook(nb)
    assert _count(starter, "solution") == 0
    assert _count(nb, "solution") == _count(nb, "exercise") >= 2
    for tag in ("exercise", "starter", "check", "parameters"):
        assert _count(starter, tag) == _count(nb, tag), tag
    kept = [c.source for c in nb.cells if "solution" not in _tags(c)]
    # the same cells in the same order, plus the note after the title
    assert [c.source for c in starter.cells] == [kept[0], STARTER_NOTE, *kept[1:]]
    nbformat.validate(starter)


def test_starter_notebook_leaves_its_input_alone():
    nb = _read(EXERCISES[0])
    before = nbformat.writes(nb)
    starter_notebook(nb)
    assert nbformat.writes(nb) == before


def test_starter_notebook_clears_outputs():
    nb = _read(EXERCISES[0])
    code = next(c for c in nb.cells if c.cell_type == "code" and "starter" in _tags(c))
    code.outputs = [nbformat.v4.new_output("stream", text="old output")]
    code.execution_count = 3
    starter = starter_notebook(nb)
    for cell in starter.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_starter_notebook_needs_solutions():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# no exercises")])
    with pytest.raises(ValueError, match="solution"):
        starter_notebook(nb)
    with pytest.raises(ValueError, match="solution"):  # a starter is not an exercise notebook
        starter_notebook(starter_notebook(_read(EXERCISES[0])))


def test_write_starters(tmp_path: Path):
    written = write_starters(EXERCISE_DIR, tmp_path / "starters")
    assert [p.name for p in written] == [p.name for p in EXERCISES]
    for path in written:
        starter = _read(path)
        assert _count(starter, "solution") == 0 and _count(starter, "check") >= 2
        assert starter.cells[1].source == STARTER_NOTE
    again = write_starters(EXERCISE_DIR, tmp_path / "starters")  # deterministic files
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_write_starters_refuses_bad_folders(tmp_path: Path):
    with pytest.raises(ValueError, match="no exercise notebooks"):
        write_starters(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="overwrite"):
        write_starters(EXERCISE_DIR, EXERCISE_DIR)


@pytest.mark.slow
@params
def test_starter_fails_at_its_first_check(path: Path, tmp_path: Path):
    """Executed as shipped (smoke mode), a starter stops with an AssertionError in its first
    check cell: the first task's starter values are None and the check rejects them. Each
    notebook puts a cheap task first, so this takes a few seconds."""
    starter_path = tmp_path / path.name
    starter = starter_notebook(_read(path))
    nbformat.write(starter, starter_path)
    with pytest.raises(NotebookError) as failure:
        run_notebook(starter_path, tmp_path / "executed.ipynb", smoke=True, cell_timeout_s=300)
    message = str(failure.value)
    assert "raised AssertionError" in message, message
    first_check = next(c.source for c in starter.cells if "check" in _tags(c))
    assert f"----- cell source -----\n{first_check}\n" in message, message
