"""``labkit grade``: grade a class's exercise notebooks without an nbgrader deployment.

For every submitted notebook the grader

1. finds the course notebook it answers (by file name, ``--exercise``, or its title);
2. **prepares** it from the course's copy (:func:`prepare`): every cell the student may not
   change (task text, set-up code, parameters and above all the check cells) is put back as
   the course has it, deleted ones re-inserted, matched by nbgrader ``grade_id`` or else by cell
   id; the student's answer cells and any cells they added are kept; copies of the reference
   solution cells are dropped. Editing a check to ``assert True`` therefore changes nothing;
3. **executes** it in the sandbox of :mod:`labkit.course.sandbox` (own processes, wall-clock
   timeout, rlimits, fresh working directory, no network, allow-list environment, read-only machine)
   with nbclient, continuing after a failing cell (:mod:`labkit.course.grade_worker`);
4. **scores** each check cell: its points (nbgrader ``points``, else 1) when it ran without an
   error, else zero and the first lines of the error;
5. writes ``grades.csv`` (one row per check), ``summary.csv`` (one row per student),
   ``feedback/<student>.md``, the executed notebooks in ``executed/<student>/`` and
   ``report.md`` (limits, isolation and its warnings, problems per student).

Submissions are graded independently (``jobs`` at a time); nothing one does can reach another.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from labkit.course import sandbox
from labkit.course.notebooks import ANSI

MAX_NOTEBOOK_BYTES = 50 << 20  # a submitted notebook larger than this is not read
SOLUTION_TAGS = {"solution", "solution-heading"}  # the reference solution and its heading
LIMIT = "OutputLimitExceeded"  # the worker's error name for too much output
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/var", "/dev")


class GradeError(ValueError):
    """A problem with one submission (unreadable, not a notebook, no matching exercise)."""


# ----------------------------------------------------------------------------------------------
# Cells: roles, keys, checks
# ----------------------------------------------------------------------------------------------


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _nbgrader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def cell_role(cell: dict) -> str:
    """``"answer"`` (the student edits it), ``"solution"`` (the course's reference answer or
    its heading, not part of a starter), ``"check"`` (graded) or ``"locked"`` (all else).

    nbgrader metadata decides where present (``solution``: answer; ``grade`` without
    ``solution``: check), else the course's tags (``starter``, ``solution``, ``check``).
    """
    tags, meta = _tags(cell), _nbgrader(cell)
    if tags & SOLUTION_TAGS:
        return "solution"
    if meta.get("solution") or "starter" in tags:
        return "answer"
    if meta.get("grade") or "check" in tags:
        return "check"
    return "locked"


def cell_key(cell: dict) -> str | None:
    """How a cell is matched between the course and a submission: nbgrader's ``grade_id``,
    else the cell id (nbformat 4.5); None for cells without either."""
    return _nbgrader(cell).get("grade_id") or cell.get("id")


@dataclass(frozen=True)
class Check:
    """A graded check cell of a course notebook."""

    key: str  # grade_id or cell id
    points: float
    task: str  # the heading of the task it checks ("Task 1: attention from scratch")


def _heading(markdown: str) -> str:
    for line in markdown.splitlines():
        if line.strip():
            return line.lstrip("#").strip()
    return ""


def course_checks(nb: nbformat.NotebookNode) -> list[Check]:
    """The check cells of course notebook ``nb``, in order, with their points and task."""
    checks, task = [], ""
    tagged = any("exercise" in _tags(c) for c in nb.cells)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            starts_task = "exercise" in _tags(cell) if tagged else cell.source.lstrip()[:1] == "#"
            if starts_task:
                task = _heading(cell.source)
        if cell_role(cell) == "check":
            key = cell_key(cell)
            if key is None:
                raise GradeError("a check cell has neither a cell id nor an nbgrader grade_id")
            checks.append(Check(key, float(_nbgrader(cell).get("points", 1)), task))
    return checks


# ----------------------------------------------------------------------------------------------
# Preparing a submission from the course's copy
# ----------------------------------------------------------------------------------------------


def _clean_code_cell(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cell = copy.deepcopy(cell)
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    return cell


def prepare(
    course: nbformat.NotebookNode, submission: nbformat.NotebookNode
) -> tuple[nbformat.NotebookNode, list[str]]:
    """The notebook to execute for ``submission``, rebuilt on the course notebook ``course``.

    Course cells in course order: locked and check cells exactly as the course has them,
    answer cells as the student wrote them (the course's starter where the student deleted
    one); the student's own extra cells follow the course cell they followed. Cells the
    student's notebook has with the key of a reference solution cell are dropped, and so are
    any cells tagged ``solution``. Returns the notebook and notes on what was restored.
    """
    notes: list[str] = []
    template = [c for c in course.cells if cell_role(c) != "solution"]
    by_key = {cell_key(c): c for c in template if cell_key(c) is not None}
    solution_keys = {cell_key(c) for c in course.cells if cell_role(c) == "solution"}
    student: dict[str | None, nbformat.NotebookNode] = {}
    extras: dict[str | None, list[nbformat.NotebookNode]] = {}  # after which course cell
    previous: str | None = None
    dropped = 0
    for cell in submission.cells:
        key = cell_key(cell)
        if key in solution_keys or _tags(cell) & SOLUTION_TAGS:
            dropped += 1
            continue
        if key in by_key and key not in student:
            student[key] = cell
            previous = key
            continue
        extra = _clean_code_cell(cell)  # the student's own cell: never graded
        extra.metadata.pop("nbgrader", None)
        extra.metadata["tags"] = sorted(_tags(extra) - {"check", "starter", "parameters"})
        extras.setdefault(previous, []).append(extra)
    if dropped:
        notes.append(f"{dropped} copied reference-solution cell(s) removed before grading")
    cells = list(extras.get(None, []))
    restored, reinserted = [], []
    for cell in template:
        key = cell_key(cell)
        mine = student.get(key)
        if cell_role(cell) == "answer":
            if mine is None:
                reinserted.append(key)
                cells.append(_clean_code_cell(cell))
            else:
                answer = _clean_code_cell(cell)
                answer.source = mine.source if mine.cell_type == "code" else ""
                cells.append(answer)
        else:
            if mine is None:
                reinserted.append(key)
            elif mine.source != cell.source or mine.cell_type != cell.cell_type:
                restored.append(key)
            cells.append(_clean_code_cell(cell))
        cells.extend(extras.get(key, []))
    if restored:
        notes.append(
            f"cell(s) {', '.join(map(str, restored))} differed from the course's copy (task text, "
            "set-up or check code): the course's version was used"
        )
    if reinserted:
        notes.append(f"deleted cell(s) {', '.join(map(str, reinserted))} were put back")
    prepared = copy.deepcopy(course)
    prepared.cells = cells
    return prepared, notes


# ----------------------------------------------------------------------------------------------
# Finding the submissions
# ----------------------------------------------------------------------------------------------


def course_notebooks(course_dir: str | Path) -> dict[str, Path]:
    """The gradable notebooks of a course folder (``NN_*.ipynb`` and ``exercises/ex_*.ipynb``,
    or any ``*.ipynb`` in it with check cells), by stem."""
    course_dir = Path(course_dir)
    if not course_dir.is_dir():
        raise ValueError(f"no course folder at {str(course_dir)!r}")
    found = {}
    paths = [*sorted(course_dir.glob("*.ipynb")), *sorted(course_dir.glob("exercises/*.ipynb"))]
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if any(cell_role(c) == "check" for c in nb.cells):
            found[path.stem] = path
    if not found:
        raise ValueError(f"no notebook with check cells in {str(course_dir)!r}")
    return found


@dataclass
class Submission:
    """One submitted notebook: who, which exercise, from where, and its bytes."""

    student: str
    source: str  # the file (or zip member) it came from
    data: bytes | None
    exercise: str | None = None
    error: str | None = None  # why it cannot be graded


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "student"


def _read_limited(path: Path) -> tuple[bytes | None, str | None]:
    size = path.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        return (
            None,
            f"the file is {size / 2**20:.0f} MB; the limit is {MAX_NOTEBOOK_BYTES >> 20} MB",
        )
    return path.read_bytes(), None


def _split_name(stem: str, exercises: Iterable[str]) -> tuple[str | None, str | None]:
    """(student, exercise) from a file stem such as ``alice_ex_4_1_self_attention``."""
    for name in sorted(exercises, key=len, reverse=True):
        if stem == name:
            return None, name
        for sep in ("_", "-", "."):
            if stem.endswith(sep + name):
                return stem[: -len(name) - 1], name
            if stem.startswith(name + sep):
                return stem[len(name) + 1 :], name
    return stem, None


def collect_submissions(paths: Sequence[str | Path], exercises: Iterable[str]) -> list[Submission]:
    """Each notebook in ``paths`` (notebooks, folders of them, zips of them) as a Submission.

    The student id is the folder's or zip's name for notebooks inside one, else the file name
    without the exercise's name (``alice.ipynb``, ``alice_ex_4_1_self_attention.ipynb``,
    ``alice/ex_4_1_self_attention.ipynb``).
    """
    exercises = list(exercises)
    subs: list[Submission] = []

    def add(student: str | None, stem: str, source: str, data: bytes | None, error=None):
        who, exercise = _split_name(stem, exercises)
        subs.append(Submission(student or who or stem, source, data, exercise, error))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            notebooks = [
                p for p in sorted(path.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts
            ]
            if not notebooks:
                subs.append(
                    Submission(path.name, str(path), None, None, "no notebook in the folder")
                )
            for nb in notebooks:
                add(path.name, nb.stem, str(nb), *_read_limited(nb))
        elif path.suffix == ".zip":
            try:
                with zipfile.ZipFile(path) as archive:
                    members = [
                        m
                        for m in archive.infolist()
                        if m.filename.endswith(".ipynb") and ".ipynb_checkpoints" not in m.filename
                    ]
                    if not members:
                        subs.append(
                            Submission(path.stem, str(path), None, None, "no notebook in the zip")
                        )
                    for m in members:
                        label = f"{path}:{m.filename}"
                        if m.file_size > MAX_NOTEBOOK_BYTES:
                            add(path.stem, Path(m.filename).stem, label, None, "too large")
                            continue
                        with archive.open(m) as f:
                            add(
                                path.stem,
                                Path(m.filename).stem,
                                label,
                                f.read(MAX_NOTEBOOK_BYTES + 1),
                            )
            except (zipfile.BadZipFile, OSError) as err:
                subs.append(
                    Submission(path.stem, str(path), None, None, f"not a readable zip: {err}")
                )
        elif path.is_file():
            who, exercise = _split_name(path.stem, exercises)
            student = who or path.resolve().parent.name
            data, error = _read_limited(path)
            subs.append(Submission(student, str(path), data, exercise, error))
        else:
            raise ValueError(f"no submission at {str(path)!r}")
    return subs


def _title(nb: nbformat.NotebookNode) -> str | None:
    for cell in nb.cells[:1]:
        if cell.cell_type == "markdown":
            return _heading(cell.source)
    return None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    check: Check
    points: float
    passed: bool
    error: str = ""


@dataclass
class Result:
    """The grade of one student's notebook for one exercise."""

    student: str
    exercise: str
    source: str
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # restored cells, truncated output, ...
    error: str = ""  # a problem with the whole notebook (unreadable, timed out, kernel died)
    seconds: float = 0.0

    @property
    def points(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def max_points(self) -> float:
        return sum(c.check.points for c in self.checks)


def _error_text(error: dict[str, Any] | None, lines: int = 6) -> str:
    if not error:
        return ""
    head = f"{error.get('ename')}: {error.get('evalue')}".strip()
    trace = ANSI.sub("", "\n".join(error.get("traceback") or [])).strip().splitlines()
    tail = [line for line in trace if line.strip()][-lines:]
    if tail and head not in tail[-1]:
        tail.append(head)
    return "\n".join(tail) if tail else head


@dataclass
class Options:
    """How submissions are run (see ``labkit grade --help``)."""

    timeout_s: float = 600.0
    cell_timeout_s: int | None = None  # default: timeout_s
    memory_mb: int = 4096
    cpu_s: int | None = None  # default: timeout_s x threads
    file_mb: int = 64
    max_output_mb: float = 1.0
    parameters: dict[str, Any] = field(default_factory=dict)
    data: list[Path] = field(default_factory=list)
    allow_read: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    kernel: str = "python3"
    isolation: str = "bwrap"  # the strongest isolation to try (see labkit.course.sandbox.isolation)


def _zero(checks: list[Check], why: str) -> list[CheckResult]:
    return [CheckResult(c, 0.0, False, why) for c in checks]


def run_submission(
    sub: Submission,
    course: dict[str, Path],
    options: Options,
    stage: Path,
    hide: list[Path],
    default_exercise: str | None = None,
) -> tuple[Result, nbformat.NotebookNode | None]:
    """Grade one submission in the sandbox; returns the result and the executed notebook."""
    exercise = sub.exercise or default_exercise
    result = Result(sub.student, exercise or "?", sub.source)
    nb = None
    if sub.error is None:
        try:
            text = sub.data.decode("utf-8") if sub.data is not None else ""
            nb = nbformat.reads(text, as_version=4)
        except UnicodeDecodeError:
            sub.error = "not a notebook: the file is not UTF-8 text"
        except Exception as err:  # nbformat raises several types for bad JSON
            sub.error = f"not a valid notebook (JSON): {str(err).splitlines()[0][:300]}"
    if nb is not None and exercise is None:
        titles = {_title(nbformat.read(p, as_version=4)): s for s, p in course.items()}
        exercise = titles.get(_title(nb))
        result.exercise = exercise or "?"
        if exercise is None:
            sub.error = (
                "cannot tell which exercise this notebook answers: name the file after it "
                f"(one of {sorted(course)}) or pass --exercise"
            )
    if exercise not in course:
        result.error = sub.error or f"unknown exercise {exercise!r}"
        return result, None
    course_nb = nbformat.read(course[exercise], as_version=4)
    checks = course_checks(course_nb)
    if sub.error is not None:
        result.error = sub.error
        result.checks = _zero(checks, sub.error)
        return result, None

    prepared, result.notes = prepare(course_nb, nb)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=stage))
    name = f"{exercise}.ipynb"
    nbformat.write(prepared, work / name)
    if options.parameters:  # injected after the parameters cell, as papermill -p does
        from papermill.iorw import load_notebook_node
        from papermill.parameterize import parameterize_notebook

        prepared = parameterize_notebook(load_notebook_node(str(work / name)), options.parameters)
        nbformat.write(prepared, work / name)
    for item in options.data:
        target = work / item.name
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)
    cell_timeout = int(options.cell_timeout_s or options.timeout_s)
    cpu = options.cpu_s or int(options.timeout_s * max(1, options.threads)) + 30
    command = [
        sys.executable, "-m", "labkit.course.grade_worker", name,
        "--kernel", options.kernel,
        "--cell-timeout", str(cell_timeout),
        "--memory-mb", str(options.memory_mb),
        "--cpu-s", str(cpu),
        "--file-mb", str(options.file_mb),
        "--max-output-mb", str(options.max_output_mb),
    ]  # fmt: skip
    threads = str(max(1, options.threads))
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "LABKIT_STRICT_CHECKS": "1",  # labkit.course.checks: a failed check raises, so it scores 0
        **options.env,
    }
    iso = sandbox.isolation(options.isolation)
    run = sandbox.run_sandboxed(
        command,
        work,
        timeout_s=options.timeout_s,
        hide=hide,
        allow_read=options.allow_read,
        env=env,
        iso=iso,
    )
    result.seconds = run.seconds
    events = []
    for line in run.lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if iso.mode == "none":  # no PID namespace: the kernel outlives the worker
        for event in events:
            if event.get("event") == "start":
                _kill_quietly(event.get("kernel_pid"))
    shutil.rmtree(work, ignore_errors=True)

    executed = copy.deepcopy(prepared)
    cell_events = {e["index"]: e for e in events if e.get("event") == "cell"}
    died = next((e for e in events if e.get("event") == "died"), None)
    done = any(e.get("event") == "done" for e in events)
    for index, event in cell_events.items():
        cell = executed.cells[index]
        cell.outputs = [nbformat.from_dict(o) for o in event.get("outputs", [])]
        cell.execution_count = event.get("execution_count")
    overflow = [i for i, e in cell_events.items() if (e.get("error") or {}).get("ename") == LIMIT]
    if overflow:
        result.notes.append(
            f"output over {options.max_output_mb:g} MB dropped in cell(s) {overflow}"
        )

    stopped_at, why_stopped = None, ""
    if died is not None:
        stopped_at = died.get("index")
        why_stopped = _death_reason(died, options)
    elif run.timed_out:
        stopped_at = next(
            (
                i
                for i, c in enumerate(executed.cells)
                if c.cell_type == "code" and i not in cell_events and c.source.strip()
            ),
            None,
        )
        why_stopped = (
            f"the notebook ran past its time limit of {options.timeout_s:g} s and was stopped"
        )
    elif not done:
        why_stopped = "the grader's worker failed" + (
            f": {run.stderr_tail.splitlines()[-1]}" if run.stderr_tail else ""
        )
    if why_stopped:
        where = f" (in cell {stopped_at})" if stopped_at is not None else ""
        result.error = why_stopped + where
        if stopped_at is not None:
            executed.cells[stopped_at].outputs = [
                nbformat.v4.new_output(
                    "error", ename="GradingStopped", evalue=why_stopped, traceback=[why_stopped]
                )
            ]

    # score the checks, in course order, from their cells in the executed notebook
    positions = {cell_key(c): i for i, c in enumerate(executed.cells) if cell_role(c) == "check"}
    first_error_since: int = 0
    for check in checks:
        index = positions[check.key]
        event = cell_events.get(index)
        cause = ""
        for i in range(first_error_since, index):  # did a cell of this task fail first?
            e = cell_events.get(i)
            if e and e.get("error") and cell_role(executed.cells[i]) != "check":
                cause = (
                    f"\n(cell {i}, above this check, failed first: {_error_text(e['error'], 1)})"
                )
                break
        overflow = next(
            (
                e["error"]
                for i in range(first_error_since, index)
                if (e := cell_events.get(i)) and (e.get("error") or {}).get("ename") == LIMIT
            ),
            None,
        )
        first_error_since = index + 1
        if event is None:
            why = why_stopped or "not run"
            result.checks.append(CheckResult(check, 0.0, False, f"not run: {why}"))
        elif event.get("error"):
            result.checks.append(
                CheckResult(check, 0.0, False, _error_text(event["error"]) + cause)
            )
        elif overflow is not None:  # printing hundreds of MB is not an answer
            result.checks.append(CheckResult(check, 0.0, False, _error_text(overflow)))
        else:
            result.checks.append(CheckResult(check, check.points, True))
    return result, executed


def _kill_quietly(pid: Any) -> None:
    import signal

    if isinstance(pid, int) and pid > 1:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _death_reason(died: dict[str, Any], options: Options) -> str:
    code = died.get("returncode")
    if code == -24:  # SIGXCPU
        return (
            f"the kernel used up its CPU time limit ({options.cpu_s or 'auto'} s) and was stopped"
        )
    if code in (-9, 137):
        return f"the kernel was killed (most likely out of memory; limit {options.memory_mb} MB)"
    log = (died.get("log") or "").lower()
    if "memoryerror" in log or "cannot allocate" in log or "bad_alloc" in log:
        return f"the kernel died out of memory (limit {options.memory_mb} MB)"
    return f"the kernel died (exit code {code}; memory limit {options.memory_mb} MB)"


# ----------------------------------------------------------------------------------------------
# The class: grade everything, write the reports
# ----------------------------------------------------------------------------------------------


def _hidden_paths(paths: Sequence[str | Path], out: Path, stage: Path) -> list[Path]:
    """What no submission may see: the submissions themselves (their folders where that is
    safe), the grades folder, the staging folder and the grader's home."""

    def safe_dir(d: Path) -> bool:
        d = d.resolve()
        return d != Path("/") and not any(sandbox._under(Path(s), d) for s in SYSTEM_DIRS)

    hide: list[Path] = [out, stage]
    for raw in paths:
        p = Path(raw).resolve()
        hide.append(p)
        if p.is_file() and safe_dir(p.parent):
            hide.append(p.parent)
    home = Path.home()
    if safe_dir(home):
        hide.append(home)
    return [p for p in hide if p.is_file() or safe_dir(p)]


def grade(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    course_dir: str | Path = "notebooks",
    options: Options | None = None,
    jobs: int = 1,
    exercise: str | None = None,
    log=print,
) -> list[Result]:
    """Grade every notebook in ``paths`` against ``course_dir``; write the reports to ``out``.

    Returns one Result per (student, exercise), in student order; an exercise that someone
    submitted but a student did not gets a row with zero points ("not submitted").
    """
    options = options or Options()
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    course = course_notebooks(course_dir)
    if exercise is not None and exercise not in course:
        raise ValueError(
            f"no exercise {exercise!r} in {str(course_dir)!r}; there are {sorted(course)}"
        )
    subs = collect_submissions(paths, course)
    if not subs:
        raise ValueError("no submissions given")
    seen: dict[tuple[str, str | None], str] = {}
    for sub in subs:
        key = (sub.student, sub.exercise or exercise)
        if key in seen and sub.error is None:
            raise ValueError(
                f"two submissions of {key[1]} by {key[0]}: {seen[key]} and {sub.source}"
            )
        seen[key] = sub.source
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    iso = sandbox.isolation(options.isolation)
    warnings = sandbox.isolation_warnings(iso)
    for w in warnings:
        log(f"labkit grade: WARNING: {w}")
    if options.threads < 1:
        options.threads = 1
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        stage = Path(tmp)
        hide = _hidden_paths(paths, out.resolve(), stage)

        def one(sub: Submission) -> tuple[Result, nbformat.NotebookNode | None]:
            result, executed = run_submission(sub, course, options, stage, hide, exercise)
            score = f"{result.points:g}/{result.max_points:g}"
            problem = f"  ({result.error})" if result.error else ""
            took = f"{result.seconds:5.1f} s"
            log(f"  {result.student:<20} {result.exercise:<36} {score:>9} {took}{problem}")
            return result, executed

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            graded = list(pool.map(one, subs))
    results = [r for r, _ in graded]
    for result, executed in graded:
        if executed is not None:
            target = out / "executed" / _safe_name(result.student) / f"{result.exercise}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(executed, target)
    results += _missing(results, course)
    results.sort(key=lambda r: (r.student, r.exercise))
    write_reports(results, out, options, iso, warnings)
    return results


def _missing(results: list[Result], course: dict[str, Path]) -> list[Result]:
    """Rows with zero points for exercises a student did not submit but others did."""
    exercises = sorted({r.exercise for r in results if r.exercise in course})
    have = {(r.student, r.exercise) for r in results}
    rows = []
    for student in sorted({r.student for r in results}):
        for ex in exercises:
            if (student, ex) not in have:
                checks = course_checks(nbformat.read(course[ex], as_version=4))
                rows.append(
                    Result(student, ex, "", _zero(checks, "not submitted"), error="not submitted")
                )
    return rows


GRADES_COLUMNS = ("student", "exercise", "check", "task", "points", "max_points", "passed", "error")
SUMMARY_COLUMNS = (
    "student",
    "points",
    "max_points",
    "percent",
    "checks_passed",
    "checks",
    "problems",
)


def _csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def write_reports(
    results: list[Result], out: Path, options: Options, iso: sandbox.Isolation, warnings: list[str]
) -> None:
    """``grades.csv``, ``summary.csv``, ``feedback/<student>.md`` and ``report.md``."""
    rows = []
    for r in results:
        if not r.checks:
            rows.append((r.student, r.exercise, "", "", 0, 0, False, r.error))
        for c in r.checks:
            rows.append((r.student, r.exercise, c.check.key, c.check.task, f"{c.points:g}",
                         f"{c.check.points:g}", c.passed, c.error))  # fmt: skip
    _csv(out / "grades.csv", GRADES_COLUMNS, rows)
    students = sorted({r.student for r in results})
    summary = []
    for s in students:
        mine = [r for r in results if r.student == s]
        pts, mx = sum(r.points for r in mine), sum(r.max_points for r in mine)
        checks = [c for r in mine for c in r.checks]
        problems = "; ".join(f"{r.exercise}: {r.error}" for r in mine if r.error)
        summary.append((s, f"{pts:g}", f"{mx:g}", f"{100 * pts / mx:.1f}" if mx else "0.0",
                        sum(c.passed for c in checks), len(checks), problems))  # fmt: skip
    _csv(out / "summary.csv", SUMMARY_COLUMNS, summary)
    feedback = out / "feedback"
    feedback.mkdir(exist_ok=True)
    for s in students:
        (feedback / f"{_safe_name(s)}.md").write_text(
            feedback_markdown(s, [r for r in results if r.student == s]), encoding="utf-8"
        )
    (out / "report.md").write_text(
        report_markdown(results, options, iso, warnings), encoding="utf-8"
    )


def _fence(text: str) -> str:
    return "```\n" + text.replace("```", "'''") + "\n```"


def feedback_markdown(student: str, results: list[Result]) -> str:
    """The feedback page of one student: each exercise, each check, pass/fail, the error."""
    pts, mx = sum(r.points for r in results), sum(r.max_points for r in results)
    lines = [f"# Feedback for {student}", "", f"**Total: {pts:g} / {mx:g} points**", ""]
    for r in results:
        lines += [f"## {r.exercise}: {r.points:g} / {r.max_points:g}", ""]
        if r.error:
            lines += [f"**Problem:** {r.error}", ""]
        for note in r.notes:
            lines += [f"- Note: {note}"]
        if r.notes:
            lines.append("")
        if r.checks:
            lines += ["| check | task | points | result |", "| --- | --- | --- | --- |"]
            for c in r.checks:
                mark = "passed" if c.passed else "**failed**"
                task = c.check.task.replace("|", "\\|")
                lines.append(
                    f"| `{c.check.key}` | {task} | {c.points:g} / {c.check.points:g} | {mark} |"
                )
            lines.append("")
        for c in r.checks:
            if not c.passed:
                lines += [f"### `{c.check.key}` ({c.check.task}) failed", "", _fence(c.error), ""]
    return "\n".join(lines)


def report_markdown(
    results: list[Result], options: Options, iso: sandbox.Isolation, warnings: list[str]
) -> str:
    """The instructor's report: isolation, limits, warnings and the problems per student."""
    lines = [
        "# Grading report",
        "",
        f"- isolation: **{iso.mode}**" + (f" ({iso.detail})" if iso.detail else ""),
    ]
    lines += [
        f"- limits per submission: {options.timeout_s:g} s wall clock, "
        f"{options.cell_timeout_s or options.timeout_s:g} s per cell, "
        f"{options.memory_mb} MB memory, {options.file_mb} MB per file, "
        f"{options.max_output_mb:g} MB output per cell",
        f"- submissions: {len(results)}, students: {len({r.student for r in results})}",
        "",
    ]
    if warnings:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in warnings] + [""]
    problems = [r for r in results if r.error or r.notes]
    if problems:
        lines += ["## Problems and notes", ""]
        for r in problems:
            text = "; ".join(([r.error] if r.error else []) + r.notes)
            lines.append(f"- {r.student} / {r.exercise}: {text}")
    return "\n".join(lines) + "\n"
