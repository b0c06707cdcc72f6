"""``labkit grade``: check cells restored from the course, scores and reports, and a class of
hostile submissions graded in the sandbox without harm.

The course here is a tiny exercise notebook made by the test (three tasks, no torch), so each
submission costs one kernel start. The hostile submissions aim only at canary files and
folders this test creates under ``tmp_path`` (``HOME`` points there) and at a TCP server it
opens on 127.0.0.1; never at a real home or the checkout.
"""

from __future__ import annotations

import csv
import os
import socket
import threading
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.course import sandbox
from labkit.course.exercises import starter_notebook
from labkit.course.grade import (
    Options,
    collect_submissions,
    course_checks,
    grade,
    prepare,
)

EXERCISE = "ex_9_1_demo"


def _cell(kind, cell_id, source, tags=(), nbgrader=None):
    cell = (new_code_cell if kind == "code" else new_markdown_cell)(source)
    cell["id"] = cell_id
    if tags:
        cell.metadata["tags"] = list(tags)
    if nbgrader:
        cell.metadata["nbgrader"] = nbgrader
    return cell


def course_notebook() -> nbformat.NotebookNode:
    """Three tasks in the course's cell convention; task 3's check is worth 2 points and has an
    nbgrader grade_id (so both ways of matching cells are used)."""
    cells = [
        _cell("md", "title", "# Exercise 9.1 · A demo\n\nThree small tasks."),
        _cell("code", "params", "SMOKE = False", ["parameters"]),
        _cell("md", "t1", "## Task 1: double\n\nWrite `double(x)`.", ["exercise"]),
        _cell("code", "t1-start", "def double(x):\n    return None", ["starter"]),
        _cell(
            "code",
            "t1-sol",
            "if double(1) is None:\n\n    def double(x):\n        return 2 * x",
            ["solution", "hide-input"],
        ),
        _cell(
            "code",
            "t1-check",
            'assert double(3) == 6, f"double(3) is {double(3)}, not 6"',
            ["check"],
        ),
        _cell("md", "t2", "## Task 2: squares\n\nThe squares of 0..4 in a list.", ["exercise"]),
        _cell("code", "t2-start", "squares = None", ["starter"]),
        _cell(
            "code",
            "t2-sol",
            "if squares is None:\n    squares = [i * i for i in range(5)]",
            ["solution", "hide-input"],
        ),
        _cell(  # the course's check helper: it raises only in strict mode, as labkit grade runs it
            "code",
            "t2-check",
            "from labkit.course.checks import check\n\n"
            'with check("Task 2", answers=["squares"]):\n'
            "    assert squares == [0, 1, 4, 9, 16], squares",
            ["check"],
        ),
        _cell("md", "t3", "## Task 3: a word\n\nThe course's favourite word.", ["exercise"]),
        _cell("code", "t3-start", "word = None", ["starter"]),
        _cell(
            "code", "t3-sol", 'if word is None:\n    word = "attention"', ["solution", "hide-input"]
        ),
        _cell(
            "code",
            "t3-check",
            'import os\n\nassert word == "attention", word\n'
            "# another student planted this file in their own /tmp: it must not be visible here\n"
            'assert not os.path.exists("/tmp/planted-by-another-student")',
            ["check"],
            {"grade": True, "solution": False, "grade_id": "task3_word", "points": 2},
        ),
        _cell("md", "end", "## Going further\n\nNothing to do here."),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


RIGHT = {
    "t1-start": "def double(x):\n    return 2 * x",
    "t2-start": "squares = [0, 1, 4, 9, 16]",
    "t3-start": 'word = "attention"',
}


def submission(answers: dict[str, str], edits: dict[str, str] | None = None):
    """The starter with ``answers`` filled in (cell id -> source) and other cells edited."""
    nb = starter_notebook(course_notebook())
    for cell in nb.cells:
        if cell.get("id") in answers:
            cell.source = answers[cell["id"]]
        if cell.get("id") in (edits or {}):
            cell.source = edits[cell["id"]]
    return nb


@pytest.fixture
def course(tmp_path):
    folder = tmp_path / "course"
    folder.mkdir()
    nbformat.write(course_notebook(), folder / f"{EXERCISE}.ipynb")
    return folder


# ----------------------------------------------------------------------------------------------
# Without running anything
# ----------------------------------------------------------------------------------------------


def test_course_checks_points_and_tasks():
    checks = course_checks(course_notebook())
    assert [c.key for c in checks] == ["t1-check", "t2-check", "task3_word"]
    assert [c.points for c in checks] == [1, 1, 2]
    assert checks[0].task == "Task 1: double" and checks[2].task == "Task 3: a word"


def test_prepare_restores_checks_and_keeps_answers():
    course = course_notebook()
    sub = submission(
        {"t1-start": "def double(x):\n    return x + x"},
        edits={"t1-check": "assert True", "t1": "## Task 1: made easy"},
    )
    del sub.cells[[c.get("id") for c in sub.cells].index("t3-check")]
    mine = new_code_cell("print('scratch work')")
    sub.cells.insert([c.get("id") for c in sub.cells].index("t2-start") + 1, mine)
    prepared, notes = prepare(course, sub)
    by_id = {c.get("id"): c for c in prepared.cells}
    course_ids = {c["id"]: c for c in course.cells}
    assert by_id["t1-check"].source == course_ids["t1-check"].source  # edit undone
    assert by_id["t1"].source == course_ids["t1"].source
    assert by_id["t3-check"].source == course_ids["t3-check"].source  # deletion undone
    assert by_id["t1-start"].source == "def double(x):\n    return x + x"  # the answer stays
    assert not any("solution" in c.metadata.get("tags", []) for c in prepared.cells)
    ids = [c.get("id") for c in prepared.cells]
    assert ids.index(mine["id"]) == ids.index("t2-start") + 1  # scratch cell kept in place
    assert any("t1-check" in n and "t1" in n for n in notes), notes
    assert any("task3_word" in n and "put back" in n for n in notes), notes  # by grade_id


def test_prepare_drops_copied_reference_solutions():
    course = course_notebook()
    prepared, notes = prepare(course, course)  # the full course notebook handed in
    assert not any(c.get("id", "").endswith("-sol") for c in prepared.cells)
    assert any("reference-solution" in n for n in notes), notes


def test_collect_submissions_student_ids(tmp_path):
    nb = nbformat.writes(submission(RIGHT))
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / f"{EXERCISE}.ipynb").write_text(nb)
    (tmp_path / f"ben_{EXERCISE}.ipynb").write_text(nb)
    (tmp_path / "cat.ipynb").write_text(nb)
    import zipfile

    with zipfile.ZipFile(tmp_path / "dan.zip", "w") as z:
        z.writestr(f"dan/{EXERCISE}.ipynb", nb)
        z.writestr("dan/.ipynb_checkpoints/x-checkpoint.ipynb", nb)
    paths = [tmp_path / "ann", tmp_path / f"ben_{EXERCISE}.ipynb", tmp_path / "cat.ipynb"]
    subs = collect_submissions([*paths, tmp_path / "dan.zip"], [EXERCISE])
    assert [(s.student, s.exercise) for s in subs] == [
        ("ann", EXERCISE),
        ("ben", EXERCISE),
        ("cat", None),  # named by its title at grading time
        ("dan", EXERCISE),
    ]


def test_sandbox_environment_is_an_allow_list(monkeypatch):
    monkeypatch.setenv("GRADER_SECRET", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    env = sandbox.sandbox_env("/tmp/submission", {"OMP_NUM_THREADS": "1"})
    assert "s3cret" not in env.values()
    assert "GRADER_SECRET" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["HOME"] == "/tmp/submission" and env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == os.environ["PATH"] and env["HF_HUB_OFFLINE"] == "1"


# ----------------------------------------------------------------------------------------------
# A hostile class, graded for real
# ----------------------------------------------------------------------------------------------


def _require_bwrap() -> None:
    iso = sandbox.isolation()
    if iso.mode != "bwrap":
        message = f"the sandbox needs bubblewrap here: {iso.detail}"
        if os.environ.get("CI") == "true":  # .ci/run installs bubblewrap
            pytest.fail(message)
        pytest.skip(message)


def _listing(root: Path, skip: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(root.rglob("*"))
        if skip not in p.parents and p != skip
    }


class Server:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_hostile_class(tmp_path, course, monkeypatch):
    _require_bwrap()
    home = tmp_path / "home"  # the grader's home: hidden from submissions
    (home / "canary-dir").mkdir(parents=True)
    (home / "canary.txt").write_text("canary")
    (home / "canary-dir" / "inside.txt").write_text("canary")
    shared = tmp_path / "shared"  # readable by submissions (--allow-read), never writable
    shared.mkdir()
    (shared / "canary.txt").write_text("canary")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GRADER_SECRET", "grader-token-123")
    subs = tmp_path / "submissions"
    subs.mkdir()
    server = Server()
    secret_answer = "SECRET-ANSWER-42"
    alice = submission({**RIGHT, "t3-start": f'word = "attention"  # {secret_answer}'})
    hostile = {
        "alice": alice,  # all right: full marks despite everyone else
        "bob": submission({"t1-start": RIGHT["t1-start"]}),  # task 1 only
        "carol": submission({**RIGHT, "t2-start": "while True:\n    pass"}),  # infinite loop
        "dave": submission(  # memory bomb
            {
                **RIGHT,
                "t2-start": "def bomb():\n    blocks = []\n    while True:\n"
                "        blocks.append(bytearray(64 << 20))\n\n\nbomb()\n" + RIGHT["t2-start"],
            }
        ),
        "erin": submission(  # a socket to the grader's 127.0.0.1
            {
                **RIGHT,
                "t1-start": "import socket\n\n"
                f'socket.create_connection(("127.0.0.1", {server.port}), timeout=5).sendall(b"x")\n'
                + RIGHT["t1-start"],
            }
        ),
        "frank": submission(  # reads another student's file
            {
                **RIGHT,
                "t3-start": f"stolen = open({str(subs / 'alice.ipynb')!r}).read()\n"
                'word = "attention" if "attention" in stolen else None',
            }
        ),
        "grace": submission(  # deletes and overwrites canaries, plants a file, reads secrets
            {
                "t1-start": f"import shutil\nfrom pathlib import Path\n\n"
                f"shutil.rmtree({str(home / 'canary-dir')!r})\n"
                f"Path({str(home / 'canary.txt')!r}).write_text('overwritten')\n"
                + RIGHT["t1-start"],
                "t2-start": "import os\n\n"
                'open("/tmp/planted-by-another-student", "w").write("x")\n'
                'print("secret:", os.environ.get("GRADER_SECRET"))\n' + RIGHT["t2-start"],
                "t3-start": f"import os\n\nprint(open({str(shared / 'canary.txt')!r}).read())\n"
                f"os.remove({str(shared / 'canary.txt')!r})\n" + RIGHT["t3-start"],
            }
        ),
        "henry": submission(  # weakens a check cell, wrong answer
            {**RIGHT, "t3-start": 'word = "wrong"'}, edits={"t3-check": "assert True"}
        ),
        "judy": submission(  # a 200 MB output, then a 200 MB file
            {
                **RIGHT,
                "t2-start": 'print("x" * (200 << 20))\n' + RIGHT["t2-start"],
                "t3-start": 'open("big.bin", "wb").write(b"0" * (200 << 20))\n' + RIGHT["t3-start"],
            }
        ),
    }
    for name, nb in hostile.items():
        nbformat.write(nb, subs / f"{name}.ipynb")
    (subs / "ivan.ipynb").write_text('{"cells": [')  # not valid JSON
    out = tmp_path / "grades"
    before = _listing(tmp_path, out)
    try:
        # the class, with a time limit no honest notebook reaches even on a loaded machine
        results = grade(
            sorted(p for p in subs.glob("*.ipynb") if p.stem != "carol"),
            out,
            course_dir=course,
            options=Options(timeout_s=120, memory_mb=2048, allow_read=[shared]),
            jobs=2,
            exercise=EXERCISE,
            log=print,  # shown on failure
        )
        # the infinite loop, with a short one (the loop would use all of it)
        results += grade(
            [subs / "carol.ipynb"],
            tmp_path / "grades-carol",
            course_dir=course,
            options=Options(timeout_s=20, memory_mb=2048, allow_read=[shared]),
            exercise=EXERCISE,
            log=print,
        )
    finally:
        server.close()
    after = {k: v for k, v in _listing(tmp_path, tmp_path / "grades-carol").items()
             if not k.startswith("grades")}  # fmt: skip

    # nothing outside the sandbox changed, nothing reached the grader's 127.0.0.1
    assert after == before
    assert (home / "canary.txt").read_text() == "canary"
    assert (shared / "canary.txt").read_text() == "canary"
    assert server.connections == 0

    res = {r.student: r for r in results}
    assert set(res) == set(hostile) | {"ivan"}
    points = {s: [c.points for c in r.checks] for s, r in res.items()}
    errors = {s: [c.error for c in r.checks] for s, r in res.items()}
    assert points["alice"] == [1, 1, 2], errors["alice"]
    assert points["bob"] == [1, 0, 0]
    assert "CheckFailed" in errors["bob"][1]  # strict mode reached the sandbox
    assert points["carol"] == [1, 0, 0]
    assert "time limit of 20 s" in res["carol"].error and "not run" in errors["carol"][1]
    assert points["dave"] == [1, 0, 2]
    assert "MemoryError" in errors["dave"][1]
    assert points["erin"] == [0, 1, 2]
    assert "ConnectionRefusedError" in errors["erin"][0] or "unreachable" in errors["erin"][0]
    assert points["frank"] == [1, 1, 0]
    assert "FileNotFoundError" in errors["frank"][2]
    assert points["grace"] == [0, 1, 0]
    assert "FileNotFoundError" in errors["grace"][0]
    assert "Read-only file system" in errors["grace"][2]
    assert points["henry"] == [1, 1, 0]
    assert "AssertionError: wrong" in errors["henry"][2]
    assert any("task3_word" in n and "course's version" in n for n in res["henry"].notes)
    assert points["ivan"] == [0, 0, 0] and "not a valid notebook" in res["ivan"].error
    assert points["judy"] == [1, 0, 0]
    assert "200.0 MB of output" in errors["judy"][1]
    assert "File too large" in errors["judy"][2]

    # the reports
    grades = _rows(out / "grades.csv")
    assert len(grades) == 3 * (len(res) - 1)  # carol's are in grades-carol
    row = next(r for r in grades if r["student"] == "henry" and r["check"] == "task3_word")
    assert (row["points"], row["max_points"], row["passed"]) == ("0", "2", "False")
    summary = {r["student"]: r for r in _rows(out / "summary.csv")}
    assert summary["alice"]["points"] == "4" and summary["alice"]["percent"] == "100.0"
    (carol,) = _rows(tmp_path / "grades-carol" / "summary.csv")
    assert carol["points"] == "1" and "time limit" in carol["problems"]
    feedback = (out / "feedback" / "frank.md").read_text()
    assert "Total: 2 / 4 points" in feedback and "FileNotFoundError" in feedback
    executed = {p.parent.name: p.read_text() for p in out.glob("executed/*/*.ipynb")}
    assert secret_answer not in executed["frank"]
    assert "grader-token-123" not in executed["grace"] and "secret: None" in executed["grace"]
    assert len(executed["judy"]) < 5 << 20  # the 200 MB output was not kept
    report = (out / "report.md").read_text()
    assert "isolation: **bwrap**" in report and "Warnings" not in report


@pytest.mark.slow
def test_cli_cell_timeout_interrupts_one_cell(tmp_path, course, capsys):
    from labkit.course.cli import main

    _require_bwrap()
    path = tmp_path / f"dave_{EXERCISE}.ipynb"
    nbformat.write(submission({**RIGHT, "t2-start": "while True:\n    pass"}), path)
    out = tmp_path / "out"
    code = main(["grade", str(path), "--out", str(out), "--course", str(course),
                 "--cell-timeout", "3", "--timeout", "60"])  # fmt: skip
    assert code == 0
    assert "graded 1 notebook(s) of 1 student(s)" in capsys.readouterr().out
    (row,) = _rows(out / "summary.csv")
    assert (row["student"], row["points"], row["max_points"]) == ("dave", "3", "4")
    task2 = next(r for r in _rows(out / "grades.csv") if r["check"] == "t2-check")
    assert "ran longer than 3 s" in task2["error"] and task2["passed"] == "False"


def test_cli_rejects_bad_input(tmp_path, course, capsys):
    from labkit.course.cli import main

    assert main(["grade", str(tmp_path / "nope.ipynb"), "--out", str(tmp_path / "o"),
                 "--course", str(course)]) == 2  # fmt: skip
    assert "no submission at" in capsys.readouterr().err
    (tmp_path / "a.ipynb").write_text("{}")
    assert main(["grade", str(tmp_path / "a.ipynb"), "--out", str(tmp_path / "o"),
                 "--course", str(course), "--exercise", "ex_nope"]) == 2  # fmt: skip
    assert "no exercise 'ex_nope'" in capsys.readouterr().err


def test_isolation_warnings_name_what_is_missing():
    assert sandbox.isolation_warnings(sandbox.Isolation("bwrap", "")) == []
    (fs,) = sandbox.isolation_warnings(sandbox.Isolation("unshare", "bwrap is not installed"))
    assert "no filesystem isolation" in fs and "bwrap is not installed" in fs
    fs, net = sandbox.isolation_warnings(sandbox.Isolation("none", "why"))
    assert "no network isolation" in net and "127.0.0.1" in net
    with pytest.raises(ValueError, match="isolation must be one of"):
        sandbox.isolation("docker")


def test_bwrap_mounts_hide_and_rebind(tmp_path):
    home = tmp_path / "home"
    (home / "venv").mkdir(parents=True)
    (home / "venv" / "subs").mkdir()
    secret = tmp_path / "grades.csv"
    secret.write_text("x")
    cmd = sandbox._bwrap_prefix("bwrap", tmp_path / "work", [home, home / "venv" / "subs", secret],
                                [home / "venv"])  # fmt: skip
    text = " ".join(cmd)
    assert cmd[:4] == ["bwrap", "--die-with-parent", "--new-session", "--unshare-all"]
    assert "--ro-bind / /" in text and "--tmpfs /tmp" in text
    # home lies in /tmp (already empty): not mounted over; the venv inside is bound back
    # read-only, and the submissions folder inside the venv hidden again
    assert f"--tmpfs {home} " not in text + " "
    venv = text.index(f"--ro-bind-try {home / 'venv'} {home / 'venv'}")
    assert text.index(f"--tmpfs {home / 'venv' / 'subs'}") > venv
    assert f"/dev/null {secret}" not in text  # in /tmp: invisible anyway
    assert text.endswith(f"--bind {tmp_path / 'work'} /tmp/submission --chdir /tmp/submission")
    if os.geteuid() == 0:  # root keeps its capabilities in the namespace unless dropped
        assert "--cap-drop ALL" in text


@pytest.mark.slow
def test_unshare_fallback_blocks_the_network_and_warns(tmp_path, course):
    if sandbox.isolation("unshare").mode != "unshare":
        pytest.skip(f"no network namespace here: {sandbox.isolation('unshare').detail}")
    server = Server()
    code = f'import socket\n\nsocket.create_connection(("127.0.0.1", {server.port}), timeout=5)\n'
    path = tmp_path / f"erin_{EXERCISE}.ipynb"
    nbformat.write(submission({**RIGHT, "t1-start": code + RIGHT["t1-start"]}), path)
    lines = []
    try:
        (result,) = grade([path], tmp_path / "out", course_dir=course, log=lines.append,
                          options=Options(timeout_s=60, isolation="unshare"))  # fmt: skip
    finally:
        server.close()
    assert server.connections == 0
    assert [c.points for c in result.checks] == [0, 1, 2]
    assert "unreachable" in result.checks[0].error or "Refused" in result.checks[0].error
    assert any("WARNING: no filesystem isolation" in line for line in lines)
    assert "no filesystem isolation" in (tmp_path / "out" / "report.md").read_text()
