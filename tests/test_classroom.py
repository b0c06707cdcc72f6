"""The exercises in nbgrader's terms: cell metadata from the course's tags, and nbgrader's own
``generate_assignment`` and ``autograde`` on an exercise notebook (full solutions: full marks;
the untouched starter: zero; a partly solved starter: exactly the solved tasks' points)."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest

from labkit.course.classroom import with_nbgrader_metadata
from labkit.course.exercises import course_notebooks, starter_notebook

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = ROOT / "notebooks" / "exercises" / "ex_4_1_self_attention.ipynb"


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _grader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _demo():
    from test_grade import course_notebook  # tests/ is on sys.path (pytest prepend mode)

    return course_notebook()


def test_metadata_follows_the_tags():
    nb = with_nbgrader_metadata(_demo())
    meta = {c["id"]: _grader(c) for c in nb.cells}
    assert meta["t1"] == {"grade": False, "grade_id": "task1", "locked": True,
                          "schema_version": 3, "solution": False, "task": False}  # fmt: skip
    assert meta["t1-start"]["solution"] and not meta["t1-start"]["locked"]
    assert meta["t1-start"]["grade_id"] == "task1_answer"
    assert meta["t2-check"]["grade"] and meta["t2-check"]["locked"]
    assert (meta["t2-check"]["grade_id"], meta["t2-check"]["points"]) == ("task2_check", 1)
    assert meta["t3-check"]["points"] == 2  # set by hand: kept
    for plain in ("title", "params", "t1-sol", "end"):  # solutions and other cells: none
        assert meta[plain] == {}, plain
    assert with_nbgrader_metadata(nb) == nb  # idempotent


def test_metadata_needs_a_task_first():
    nb = _demo()
    nb.cells.insert(1, copy.deepcopy(nb.cells[3]))  # a starter before any exercise cell
    with pytest.raises(ValueError, match="before any 'exercise' cell"):
        with_nbgrader_metadata(nb)


def _solved(release: nbformat.NotebookNode, course: nbformat.NotebookNode, tasks: set[int]):
    """``release`` with the answer cells of ``tasks`` (1-based) holding the reference code."""
    nb = copy.deepcopy(release)
    solutions: dict[str, list[str]] = {}
    answer = None
    for cell in course.cells:
        if "starter" in _tags(cell):
            answer = _grader(cell)["grade_id"]
        elif "solution" in _tags(cell) and answer is not None:
            solutions.setdefault(answer, []).append(cell.source)
    for cell in nb.cells:
        grade_id = _grader(cell).get("grade_id", "")
        task = grade_id.removeprefix("task").split("_")[0]
        if grade_id in solutions and int(task) in tasks:
            cell.source = "\n\n".join([cell.source, *solutions[grade_id]])
    return nb


@pytest.mark.slow
def test_nbgrader_generate_assignment_and_autograde(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_STRICT_CHECKS", raising=False)  # NBGRADER_CONFIG sets it
    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    from labkit.course.classroom import NBGRADER_CONFIG

    course = with_nbgrader_metadata(nbformat.read(EXERCISE, as_version=4))
    for cell in course.cells:  # smoke mode for the test: the copy in source/ says so
        if "parameters" in _tags(cell):
            cell.source = cell.source.replace("SMOKE = False", "SMOKE = True")
            assert "SMOKE = True" in cell.source
    root = tmp_path / "course"
    name, assignment = EXERCISE.stem, "ex_4_1"
    (root / "source" / assignment).mkdir(parents=True)
    nbformat.write(course, root / "source" / assignment / f"{name}.ipynb")
    (root / "nbgrader_config.py").write_text("c = get_config()  # noqa: F821\n" + NBGRADER_CONFIG)
    config = Config()
    config.CourseDirectory.root = str(root)
    config.CourseDirectory.course_id = "labkit"
    exec(NBGRADER_CONFIG, {"c": config})  # the lines the instructor guide gives
    api = NbGraderAPI(config=config)

    run = api.generate_assignment(assignment, force=True, create=True)
    assert run["success"], run["log"]
    release = nbformat.read(root / "release" / assignment / f"{name}.ipynb", as_version=4)
    expected_release = starter_notebook(course)  # labkit's starter, with read-only cells
    assert [c.source for c in release.cells] == [c.source for c in expected_release.cells]
    checks = [c for c in release.cells if _grader(c).get("grade")]
    assert len(checks) == 4 and all(c.metadata.get("editable") is False for c in checks)

    submissions = {
        "full": course,  # the complete notebook, reference solutions included
        "starter": release,
        "partial": _solved(release, course, {1, 3}),
    }
    for student, nb in submissions.items():
        folder = root / "submitted" / student / assignment
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{name}.ipynb")
        run = api.autograde(assignment, student, force=True, create=True)
        assert run["success"], run["log"]
    with Gradebook(f"sqlite:///{root}/gradebook.db", "labkit") as gb:
        scores = {}
        for student in submissions:
            grades = gb.find_submission_notebook(name, assignment, student).grades
            scores[student] = {g.name: g.score for g in grades}
    assert scores["full"] == {f"task{k}_check": 1.0 for k in (1, 2, 3, 4)}
    assert scores["starter"] == {f"task{k}_check": 0.0 for k in (1, 2, 3, 4)}
    assert scores["partial"] == {"task1_check": 1.0, "task2_check": 0.0,
                                 "task3_check": 1.0, "task4_check": 0.0}  # fmt: skip


COURSE_NOTEBOOKS = course_notebooks(ROOT / "notebooks")  # lessons and exercises/


@pytest.mark.parametrize("path", COURSE_NOTEBOOKS, ids=[p.stem for p in COURSE_NOTEBOOKS])
def test_exercises_carry_nbgrader_metadata(path):
    nb = nbformat.read(path, as_version=4)
    fix = f"python -m labkit.course.classroom {path.relative_to(ROOT)}"
    assert with_nbgrader_metadata(nb) == nb, f"nbgrader metadata out of step with the tags: {fix}"
    cells = [c for c in nb.cells if _grader(c)]
    ids = [_grader(c)["grade_id"] for c in cells]
    assert len(ids) == len(set(ids)), f"duplicate grade_ids in {path.name}: {ids}"
    checks = [c for c in cells if _grader(c)["grade"]]
    answers = [c for c in cells if _grader(c)["solution"]]
    exercises = [c for c in nb.cells if "exercise" in _tags(c)]
    assert len(checks) >= len(exercises) >= 2 and len(answers) >= len(exercises)
    assert all(_grader(c)["points"] > 0 and _grader(c)["locked"] for c in checks)
