"""The course notebooks run, and follow the conventions of notebooks/README.md.

Every ``notebooks/NN_topic.ipynb`` and every exercise notebook ``notebooks/exercises/ex_*.ipynb``
is executed with papermill in smoke mode (``SMOKE=True``, kernel ``python3``, working directory
the notebook's folder); a failing cell fails its test with the cell's source and traceback.
The executed copy is kept in ``build/executed/smoke/`` (labkit.course.book.executed_path), where the
book build (``tests/test_book.py``, run after these tests) reuses it instead of executing the
notebook a second time. Each notebook's wall time is printed in a table at the end of the
session (run without ``-n``: under pytest-xdist the table lives in the workers, but
``--durations`` still lists every notebook's time).

The conventions checked on the stored (stripped) notebook: a ``parameters`` cell followed by a
cell that calls ``smoke_banner(SMOKE, ...)``, a first cell that introduces the notebook, 2-4
exercises tagged as README's "Exercises" section describes, no stored outputs, and code
lines that fit the book's column (88 characters). On the
executed smoke copy: the banner "smoke mode: numbers below come from a tiny run" is printed
right after the parameters, so a page built in smoke mode never passes for a full run.
"""

import ast
import re
import time
import unicodedata
from pathlib import Path

import nbformat
import pytest

from labkit.course.book import executed_path
from labkit.course.exercises import check_call
from labkit.course.notebooks import (
    EXERCISE_GLOB,
    NOTEBOOK_GLOB,
    SMOKE_BANNER,
    NotebookError,
    kernel_metadata,
    lesson_notebooks,
    run_notebook,
    smoke_banner,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
LESSONS = lesson_notebooks(NOTEBOOK_DIR)  # NN_topic / NNb_topic, in reading order
EXERCISES = sorted((NOTEBOOK_DIR / "exercises").glob(EXERCISE_GLOB))
NOTEBOOKS = LESSONS + EXERCISES  # the exercise notebooks follow the same conventions
CELL_TIMEOUT_S = 600

params = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _banner_cell(cells) -> int:
    """Index of the cell after the ``parameters`` cell (and after papermill's injected one)."""
    index = next(i for i, c in enumerate(cells) if "parameters" in _tags(c)) + 1
    while index < len(cells) and "injected-parameters" in _tags(cells[index]):
        index += 1
    return index


def _printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


# ----------------------------------------------------------------------------------------------
# Timing table, printed once at the end of the session
# ----------------------------------------------------------------------------------------------


class _NotebookTimes:
    """A plugin registered at run time: collects wall times, prints them in the summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        terminalreporter.section("notebook wall times (smoke mode)")
        width = max(len(name) for name, _, _ in self.rows)
        for name, seconds, outcome in self.rows:
            terminalreporter.write_line(f"{name:<{width}}  {seconds:7.1f} s  {outcome}")
        total = sum(seconds for _, seconds, _ in self.rows)
        terminalreporter.write_line(f"{'total':<{width}}  {total:7.1f} s")


@pytest.fixture(scope="session")
def notebook_times(pytestconfig) -> _NotebookTimes:
    times = _NotebookTimes()
    pytestconfig.pluginmanager.register(times, "labkit-notebook-times")
    return times


# ----------------------------------------------------------------------------------------------
# The notebooks run
# ----------------------------------------------------------------------------------------------


def test_notebooks_are_found():
    """An empty glob must fail the suite, not silently skip every notebook test."""
    assert LESSONS, f"no notebooks matching {NOTEBOOK_GLOB} in {NOTEBOOK_DIR}"


@params
def test_notebook_runs_in_smoke_mode(path: Path, notebook_times, record_property):
    start = time.perf_counter()
    error = None
    output = executed_path(path, smoke=True, root=ROOT)  # reused by the book build
    try:
        run_notebook(path, output, smoke=True, cell_timeout_s=CELL_TIMEOUT_S)
    except NotebookError as err:
        error = err
    seconds = time.perf_counter() - start
    notebook_times.rows.append((path.name, seconds, "FAILED" if error else "ok"))
    record_property("wall_time_s", round(seconds, 2))
    if error is not None:  # the message holds the failing cell's source and traceback
        pytest.fail(str(error), pytrace=False)
    cells = _read(output).cells
    banner = cells[_banner_cell(cells)] if _banner_cell(cells) < len(cells) else {}
    assert SMOKE_BANNER in _printed(banner), (
        f"{path.name}: the executed smoke copy does not print {SMOKE_BANNER!r} in the cell "
        f"after the parameters (it printed {_printed(banner)[:200]!r})"
    )


def test_smoke_banner_names_the_mode(capsys):
    smoke = smoke_banner(True, seed=3)
    full = smoke_banner(False, seed=3)
    assert smoke.startswith(SMOKE_BANNER) and "SEED = 3" in smoke
    assert SMOKE_BANNER not in full and full.startswith("full mode") and "SEED = 3" in full
    assert capsys.readouterr().out == f"{smoke}\n{full}\n"


# ----------------------------------------------------------------------------------------------
# The notebooks follow the conventions
# ----------------------------------------------------------------------------------------------


@params
def test_parameters_cell(path: Path):
    cells = [c for c in _read(path).cells if "parameters" in _tags(c)]
    assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    cell = cells[0]
    assert cell.cell_type == "code", f"{path.name}: the 'parameters' cell must be a code cell"
    assigned = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    assigned[target.id] = node.value
    missing = {"SMOKE", "DEVICE", "SEED"} - assigned.keys()
    assert not missing, f"{path.name}: the parameters cell does not define {sorted(missing)}"
    smoke = assigned["SMOKE"]
    assert isinstance(smoke, ast.Constant) and smoke.value is False, (
        f"{path.name}: SMOKE must default to False (CI passes SMOKE=True)"
    )


@params
def test_smoke_banner_follows_the_parameters(path: Path):
    cells = _read(path).cells
    index = _banner_cell(cells)
    source = cells[index].source if index < len(cells) else ""
    assert cells[index].cell_type == "code" and "smoke_banner(SMOKE" in source, (
        f"{path.name}: the cell after the parameters cell must call smoke_banner(SMOKE, SEED) "
        "(from labkit.course.notebooks), so a smoke-built page says so at the top"
    )


@params
def test_first_cell_introduces_the_notebook(path: Path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be markdown"
    text = first.source
    assert re.match(r"#\s+\S", text), f"{path.name}: the first cell must start with a '# title'"
    lowered = text.lower()
    for heading in ["what you will learn", "prerequisites", "run time"]:
        assert heading in lowered, f"{path.name}: the first cell lacks '{heading}'"
    learn = lowered.split("what you will learn", 1)[1]
    bullets = []
    for line in learn.splitlines()[1:]:
        if re.match(r"\s*([-*]|\d+\.)\s+", line):
            bullets.append(line)
        elif bullets and line.strip() == "":
            break
    assert 3 <= len(bullets) <= 5, (
        f"{path.name}: 'what you will learn' needs 3-5 bullets, found {len(bullets)}"
    )


def _readme_times() -> dict[str, tuple[str, str]]:
    """notebook stem -> (idle, under load) cells of the README's full-mode time table."""
    rows = re.findall(
        r"^\| `([\w]+)` \| ([^|]*) \| ([^|]*) \|$", (ROOT / "README.md").read_text(), re.M
    )
    return {name: (idle.strip(), load.strip()) for name, idle, load in rows}


@params
def test_header_run_time_matches_the_readme(path: Path):
    """The run times a notebook's first cell quotes are the README table's, so the two never
    disagree: the idle full-mode time rounded to seconds, and each under-load wall time and
    CPU-seconds."""
    times = _readme_times()
    assert path.stem in times, f"README.md: no row for {path.stem} in the full-mode time table"
    idle, loaded = times[path.stem]
    header = " ".join(_read(path).cells[0].source.split())  # line breaks as spaces

    def quoted(number: str, unit: str) -> bool:
        return re.search(rf"(?<![\d.-]){re.escape(number)} {unit}\b", header) is not None

    if idle != "-":
        seconds = str(round(float(idle.split()[0])))
        assert quoted(seconds, "s"), f"{path.name}: header lacks the README's '{seconds} s'"
    for wall, cpu in re.findall(r"([\d.-]+) / ([\d.]+)", loaded):
        assert quoted(wall, "s") and quoted(cpu, "CPU-seconds"), (
            f"{path.name}: header lacks the README's under-load '{wall} s' / '{cpu} CPU-seconds'"
        )


@params
def test_exercises_have_starter_solution_and_check(path: Path):
    cells = _read(path).cells
    starts = [i for i, c in enumerate(cells) if "exercise" in _tags(c)]
    assert 2 <= len(starts) <= 4, f"{path.name}: needs 2-4 exercises, found {len(starts)}"
    ends = [*starts[1:], len(cells)]
    for number, (begin, end) in enumerate(zip(starts, ends, strict=True), start=1):
        where = f"{path.name}, exercise {number} (cell {begin})"
        assert cells[begin].cell_type == "markdown", f"{where}: the task must be markdown"
        roles = {}
        for index in range(begin + 1, end):
            for role in ("starter", "solution", "check"):
                if role in _tags(cells[index]):
                    roles.setdefault(role, index)
        for role in ("starter", "solution", "check"):
            assert role in roles, f"{where}: no code cell tagged '{role}' before the next exercise"
            assert cells[roles[role]].cell_type == "code", f"{where}: '{role}' must be code"
        assert roles["starter"] < roles["solution"] < roles["check"], (
            f"{where}: cells must come in the order starter, solution, check"
        )
        solution = cells[roles["solution"]]
        assert "hide-input" in _tags(solution), (
            f"{where}: the solution cell must also be tagged 'hide-input' (hidden in the book)"
        )
        assert solution.metadata.get("jupyter", {}).get("source_hidden") is True, (
            f"{where}: the solution cell must be collapsed in JupyterLab "
            "(metadata.jupyter.source_hidden)"
        )
        heading = cells[roles["solution"] - 1]
        level = len(cells[begin].source) - len(cells[begin].source.lstrip("#"))
        assert "solution-heading" in _tags(heading) and heading.source.startswith(
            "#" * (level + 1) + " Solution"
        ), (
            f"{where}: a markdown cell tagged 'solution-heading' comes right before the "
            f"solution, a 'Solution' heading one level below the task's ({'#' * (level + 1)})"
        )
        assert "solution_cell()" in solution.source.split("\n", 3)[2], (
            f"{where}: the solution cell starts by calling labkit.course.checks.solution_cell()"
        )
        check = cells[roles["check"]].source
        assert "assert" in check, f"{where}: the check cell must assert"
        found = check_call(check)
        assert found is not None and "with check(" in check, (
            f"{where}: the check cell runs its asserts inside `with check(task, answers=...)`"
        )
        answers = found[1]
        assert answers and all(name in cells[roles["starter"]].source for name in answers), (
            f"{where}: check(..., answers={answers}) must name the starter cell's answers"
        )
        assert not re.search(r"\bcorrect\b", check), (
            f"{where}: the check cell must not print 'correct' (labkit.course.checks says it)"
        )
    summaries = [c for c in cells if "checks-summary" in _tags(c)]
    assert len(summaries) == 1 and "summary()" in summaries[0].source, (
        f"{path.name}: needs one cell tagged 'checks-summary' calling checks.summary()"
    )
    assert cells.index(summaries[0]) > starts[-1], f"{path.name}: the summary comes last"


@params
def test_no_stored_outputs(path: Path):
    for index, cell in enumerate(_read(path).cells):
        if cell.cell_type != "code":
            continue
        assert not cell.get("outputs"), f"{path.name}: cell {index} has stored outputs"
        assert cell.get("execution_count") is None, (
            f"{path.name}: cell {index} has an execution count (strip with nbstripout)"
        )


BOOK_COLUMN = 88  # characters of code the book's page shows without horizontal scrolling


def _width(line: str) -> int:
    """Columns a line takes, wide characters (emoji, CJK) counted twice, as ruff counts them."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)


@params
def test_code_fits_the_book_column(path: Path):
    too_wide = [
        (index, line)
        for index, cell in enumerate(_read(path).cells)
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if _width(line) > BOOK_COLUMN
    ]
    assert not too_wide, (
        f"{path.name}: code lines wider than {BOOK_COLUMN} columns scroll sideways in the book "
        f"(ruff format --line-length {BOOK_COLUMN}, then wrap comments and strings): "
        + "; ".join(f"cell {i}: {line[:60]!r}..." for i, line in too_wide[:5])
    )


@params
def test_kernel_metadata_matches_the_installed_kernel(path: Path):
    """JupyterLab rewrites a notebook's kernelspec and language_info to the kernel's on open; a
    notebook that stores anything else opens as modified and asks to be saved on close."""
    stored = _read(path).metadata
    expected = kernel_metadata()
    assert stored.get("kernelspec") == expected["kernelspec"], (
        f"{path.name}: kernelspec {stored.get('kernelspec')} is not the installed kernel's "
        f"{expected['kernelspec']}"
    )
    info, want = dict(stored.get("language_info", {})), expected["language_info"]
    # the patch release is the machine's: JupyterLab updates it on another Python 3.11.x
    version, want_version = info.pop("version", ""), want.pop("version")
    assert info == want, f"{path.name}: language_info {info} is not the kernel's {want}"
    assert version.split(".")[:2] == want_version.split(".")[:2], (
        f"{path.name}: written for Python {version!r}, the kernel runs {want_version}"
    )
