"""How long ``labkit grade`` takes for a class: 30 submissions of one exercise notebook.

Makes a class of ``--students`` submissions of ``--exercise`` from the course's own notebook:
student ``k`` solves the first ``k mod (tasks + 1)`` tasks (each solved answer cell holds the
starter and, after it, the reference solution's code), so the class spans every score from
zero to full marks. It grades the class once per ``--jobs`` value, in smoke mode by default,
prints the wall time and the mean per submission, and checks that every student got exactly
the points of the tasks they solved (exit code 1 otherwise).

    python benchmarks/grade_class.py                       # 30 x ex_4_1, smoke, --jobs 1 and 2
    python benchmarks/grade_class.py --jobs 2 --students 10
    python benchmarks/grade_class.py --exercise ex_4_2_multi_head_attention --full
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from labkit.course.exercises import starter_notebook
from labkit.course.grade import Options, cell_key, cell_role, course_checks, course_notebooks, grade
from labkit.course.sandbox import isolation

ROOT = Path(__file__).resolve().parents[1]


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def tasks(course: nbformat.NotebookNode) -> list[dict]:
    """Per task (from one ``exercise`` cell to the next): its starter cell ids, the source of
    its reference solution, and the keys of its checks."""
    found: list[dict] = []
    for cell in course.cells:
        if "exercise" in _tags(cell):
            found.append({"starters": [], "solution": [], "checks": []})
        elif found and cell_role(cell) == "answer":
            found[-1]["starters"].append(cell.get("id"))
        elif found and cell_role(cell) == "solution" and cell.cell_type == "code":
            found[-1]["solution"].append(cell.source)
        elif found and cell_role(cell) == "check":
            found[-1]["checks"].append(cell)
    return found


def submission(course: nbformat.NotebookNode, solved: int) -> nbformat.NotebookNode:
    """The starter with the first ``solved`` tasks answered (starter + reference code)."""
    nb = starter_notebook(copy.deepcopy(course))
    for task in tasks(course)[:solved]:
        last = task["starters"][-1]
        for cell in nb.cells:
            if cell.get("id") == last:
                cell.source = "\n\n".join([cell.source, *task["solution"]])
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exercise", default="ex_4_1_self_attention")
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--full", action="store_true", help="full mode (default: smoke)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    course_dir = ROOT / "notebooks"
    path = course_notebooks(course_dir)[args.exercise]
    course = nbformat.read(path, as_version=4)
    n_tasks = len(tasks(course))
    checks = course_checks(course)
    points = {c.key: c.points for c in checks}
    points_by_task = [sum(points[cell_key(c)] for c in t["checks"]) for t in tasks(course)]
    print(f"isolation: {isolation().mode}; {args.exercise}: {n_tasks} tasks, "
          f"{len(checks)} checks; {args.students} students; "
          f"{'full' if args.full else 'smoke'} mode")  # fmt: skip
    failed = False
    with tempfile.TemporaryDirectory(prefix="grade-bench-") as tmp:
        subs = Path(tmp) / "submissions"
        subs.mkdir()
        expected = {}
        for k in range(args.students):
            solved = k % (n_tasks + 1)
            name = f"student{k:02d}"
            nbformat.write(submission(course, solved), subs / f"{name}_{args.exercise}.ipynb")
            expected[name] = sum(points_by_task[:solved])
        for jobs in args.jobs:
            options = Options(
                timeout_s=args.timeout,
                parameters={} if args.full else {"SMOKE": True},
                threads=max(1, (os.cpu_count() or 1) // jobs),
            )
            start = time.perf_counter()
            results = grade(
                sorted(subs.glob("*.ipynb")),
                Path(tmp) / f"out-{jobs}",
                course_dir=course_dir,
                options=options,
                jobs=jobs,
                log=lambda *_: None,
            )
            seconds = time.perf_counter() - start
            wrong = {r.student: (r.points, expected[r.student]) for r in results
                     if r.points != expected[r.student]}  # fmt: skip
            mean = sum(r.seconds for r in results) / len(results)
            print(f"--jobs {jobs} ({options.threads} thread(s) each): {seconds:.1f} s for "
                  f"{len(results)} submissions ({seconds / len(results):.1f} s each overall, "
                  f"{mean:.1f} s per notebook in its sandbox)")  # fmt: skip
            if wrong:
                failed = True
                print(f"  WRONG SCORES (got, expected): {wrong}")
                for r in results:
                    if r.student in wrong:
                        print(
                            r.student, r.error, [c.error[-300:] for c in r.checks if not c.passed]
                        )
                        break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
