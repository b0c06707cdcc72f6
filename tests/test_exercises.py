"""The starters of every notebook's exercises: no solutions, and checks that can fail.

``tests/test_notebooks.py`` runs the full notebooks (solutions included) in smoke mode and
checks their conventions. This file checks ``labkit.course.exercises``: the starter notebook a
learner gets keeps every task, starter and check cell but no solution cell (nor its heading),
for the lessons and the exercise notebooks alike; executed as shipped, a starter runs to its
end (each check reports its task, the summary lists them, none passed), and in strict mode (CI,
grading) it stops with ``CheckFailed`` at its first check.
"""

from pathlib import Path

import nbformat
import pytest

from labkit.course.exercises import (
    STARTER_NOTE,
    check_call,
    course_notebooks,
    starter_notebook,
    write_starters,
)
from labkit.course.notebooks import NotebookError, run_notebook

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_DIR = ROOT / "notebooks" / "exercises"
EXERCISES = sorted(EXERCISE_DIR.glob("ex_*.ipynb"))
COURSE = course_notebooks(ROOT / "notebooks")  # the lessons, then the exercise notebooks
params = pytest.mark.parametrize("path", EXERCISES, ids=[p.stem for p in EXERCISES])
course_params = pytest.mark.parametrize("path", COURSE, ids=[p.stem for p in COURSE])


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _count(nb, tag: str) -> int:
    return sum(tag in _tags(cell) for cell in nb.cells)


def test_the_five_exercises_exist():
    numbers = sorted(p.name[len("ex_4_")] for p in EXERCISES)
    assert numbers == ["1", "2", "3", "4", "5"], [p.name for p in EXERCISES]


@course_params
def test_starter_drops_only_the_solutions(path: Path):
    nb = _read(path)
    starter = starter_notebook(nb)
    assert _count(starter, "solution") == _count(starter, "solution-heading") == 0
    assert _count(nb, "solution") == _count(nb, "solution-heading") == _count(nb, "exercise") >= 2
    for tag in ("exercise", "starter", "check", "parameters", "checks-summary"):
        assert _count(starter, tag) == _count(nb, tag), tag
    kept = [c for c in nb.cells if not _tags(c) & {"solution", "solution-heading"}]
    # the same cells in the same order, plus the note after the title; a cell that uses an
    # answer runs only once its task passed
    assert len(starter.cells) == len(kept) + 1 and starter.cells[1].source == STARTER_NOTE
    for original, cell in zip(kept, [starter.cells[0], *starter.cells[2:]], strict=True):
        if cell.source != original.source:
            assert cell.source.startswith(
                "from labkit.course.checks import passed\n\nif passed("
            ), path
            assert "    " + original.source.splitlines()[0] in cell.source
    nbformat.validate(starter)


def test_starter_guards_the_cells_that_use_an_answer():
    starter = starter_notebook(_read(EXERCISE_DIR / "ex_4_1_self_attention.ipynb"))
    guarded = [c.source for c in starter.cells if "if passed(" in c.source]
    # the cost plot and the classifier's training (task 2), the entropy map (task 3), the
    # previous-token map (task 4)
    assert len(guarded) == 4, guarded
    assert all("if passed('Task 2'):" in cell for cell in guarded[:2])
    assert "if passed('Task 3'):" in guarded[2] and "`mean_entropy`" in guarded[2]
    assert "if passed('Task 4'):" in guarded[3]
    assert check_call('with check("Task 2", answers=["a", "b"]):\n    pass') == (
        "Task 2", ["a", "b"])  # fmt: skip


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
    written = write_starters(ROOT / "notebooks", tmp_path / "starters")
    relative = [p.relative_to(tmp_path / "starters") for p in written]
    assert relative == [p.relative_to(ROOT / "notebooks") for p in COURSE]
    assert Path("exercises/ex_4_1_self_attention.ipynb") in relative
    assert Path("00_welcome.ipynb") in relative  # the lessons' exercises too
    for path in written:
        starter = _read(path)
        assert _count(starter, "solution") == 0 and _count(starter, "check") >= 2
        assert starter.cells[1].source == STARTER_NOTE
    again = write_starters(ROOT / "notebooks", tmp_path / "starters")  # deterministic files
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]
    only = write_starters(EXERCISE_DIR, tmp_path / "exercises-only")  # a folder of ex_*
    assert [p.name for p in only] == [p.name for p in EXERCISES]


def test_write_starters_refuses_bad_folders(tmp_path: Path):
    with pytest.raises(ValueError, match="no notebooks with exercises"):
        write_starters(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="overwrite"):
        write_starters(EXERCISE_DIR, EXERCISE_DIR)


def _outputs_text(path: Path) -> str:
    texts = []
    for cell in _read(path).cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.slow
@params
def test_starter_runs_to_its_summary(path: Path, tmp_path: Path):
    """Executed as shipped (smoke mode, as a learner's Run All), a starter runs to its end:
    each check reports its task, none passes, the summary lists them all, and the cells that
    use an answer say they were skipped."""
    starter_path = tmp_path / path.name
    starter = starter_notebook(_read(path))
    nbformat.write(starter, starter_path)
    executed = tmp_path / "executed.ipynb"
    run_notebook(starter_path, executed, smoke=True, cell_timeout_s=300, strict_checks=False)
    text = _outputs_text(executed)
    tasks = [check_call(c.source)[0] for c in starter.cells if "check" in _tags(c)]
    summary = text[text.index("Exercise checks: 0 passed") :]
    for task in tasks:
        assert f"{task}: " in summary, (task, summary)
    assert "✓" not in text and "◐" not in text  # nothing passed, no reference solution
    guarded = sum("if passed(" in c.source for c in starter.cells)
    assert text.count("skipped until") == guarded, text


@pytest.mark.slow
def test_starter_fails_at_its_first_check_in_strict_mode(tmp_path: Path):
    """CI and grading (strict mode): the first unsolved task raises CheckFailed in its cell."""
    path = EXERCISE_DIR / "ex_4_1_self_attention.ipynb"
    starter_path = tmp_path / path.name
    starter = starter_notebook(_read(path))
    nbformat.write(starter, starter_path)
    with pytest.raises(NotebookError) as failure:
        run_notebook(starter_path, tmp_path / "executed.ipynb", smoke=True, cell_timeout_s=300)
    message = str(failure.value)
    assert "raised CheckFailed: ✗ Task 1: failed" in message, message
    first_check = next(c.source for c in starter.cells if "check" in _tags(c))
    assert f"----- cell source -----\n{first_check}\n" in message, message
