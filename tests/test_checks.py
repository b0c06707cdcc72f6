"""labkit.course.checks: a learner's answer vs the reference solution, failures that say by how
much, the summary, and strict mode (CI, grading).

The cells run in a real (in-process) IPython shell, as in a notebook: ``run_cell`` fires the
same ``post_run_cell`` events a Jupyter kernel does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.course import checks

STARTER = "answer = None  # your answer: a float"
SOLUTION = (
    "from labkit.course.checks import solution_cell\n"
    "solution_cell()\n"
    "if answer is None:\n"
    "    answer = 0.5 * 3.0\n"
)
CHECK = (
    "from labkit.course.checks import assert_close, check\n"
    "with check('Task 1', answers=['answer'], hint='half of three'):\n"
    "    assert_close(answer, 1.5, atol=1e-6, what='answer')\n"
    "after_check = True\n"
)


@pytest.fixture
def shell(monkeypatch, capsys):
    """A fresh IPython shell, non-strict checks, no results from another test."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    monkeypatch.delenv(checks.REPORT_ENV, raising=False)
    checks.reset()
    ip = InteractiveShell.instance()
    yield ip
    checks.reset()
    InteractiveShell.clear_instance()


def run(shell, source: str):
    result = shell.run_cell(source)
    return result


def status(task: str = "Task 1") -> checks.TaskResult:
    return next(r for r in checks.results() if r.task == task)


def test_untouched_starter_is_not_answered_and_never_correct(shell, capsys):
    run(shell, STARTER)
    result = run(shell, CHECK)
    assert result.success and shell.user_ns["after_check"]  # the cell went on
    assert status().status == "todo" and "`answer` is still None" in status().message
    out = capsys.readouterr().out
    assert "○ Task 1: not answered yet" in out and "hint: half of three" in out
    assert "correct" not in out and "passed" not in out


def test_reference_solution_is_reported_as_such(shell, capsys):
    for cell in (STARTER, SOLUTION, CHECK):
        assert run(shell, cell).success
    assert status().status == "reference" and status().ok
    out = capsys.readouterr().out
    assert "checked the reference solution: replace it with your own" in out
    assert "✓" not in out and "passed" not in out


def test_learners_answer_passes_even_when_it_equals_the_reference(shell, capsys):
    for cell in (STARTER, SOLUTION, CHECK):
        run(shell, cell)
    assert status().status == "reference"
    run(shell, "answer = 1.5  # the learner's own")  # the same value as the reference's
    run(shell, CHECK)
    assert status().status == "passed"
    run(shell, "answer = 3 // 2")  # a small int: the very object the reference could bind
    run(shell, "answer = None")
    for cell in (SOLUTION.replace("0.5 * 3.0", "1"), CHECK.replace("1.5", "1")):
        run(shell, cell)
    assert status().status == "reference"
    run(shell, "answer = 1")  # identical object (cached int), but the learner wrote it
    run(shell, CHECK.replace("1.5", "1"))
    assert status().status == "passed"
    assert "✓ Task 1: passed" in capsys.readouterr().out


def test_learners_answer_before_the_solution_cell_is_kept(shell):
    for cell in ("answer = 1.5", SOLUTION, CHECK):  # Run All after editing the starter
        run(shell, cell)
    assert status().status == "passed"


def test_failure_says_by_how_much_gives_the_hint_and_goes_on(shell, capsys):
    run(shell, "answer = 1.25")
    result = run(shell, CHECK)
    assert result.success and shell.user_ns["after_check"]
    assert status().status == "failed"
    assert "answer: got 1.25, expected 1.5 (|difference| 0.25" in status().message
    out = capsys.readouterr().out
    assert "✗ Task 1: failed" in out and "hint: half of three" in out


def test_an_error_in_the_learners_code_is_a_failure_not_a_crash(shell):
    run(shell, "def f(x):\n    return None")
    body = "with check('Task 2', answers=['f']):\n    assert f(2).shape == (2,)\n"
    result = run(shell, "from labkit.course.checks import check\n" + body)
    assert result.success
    assert status("Task 2").status == "failed"
    assert status("Task 2").message.startswith("your code raised AttributeError")


def test_summary_lists_every_task(shell, capsys):
    run(shell, STARTER)
    run(shell, CHECK)
    run(shell, "x = 2")
    run(shell, "from labkit.course.checks import check\nwith check('Task 2', answers=['x']):\n"
               "    assert x == 2")  # fmt: skip
    capsys.readouterr()
    result = run(shell, "from labkit.course.checks import summary\nsummary()")
    assert result.success
    out = capsys.readouterr().out
    assert "Exercise checks: 1 passed, 0 failed, 1 not answered, 0 on the reference" in out
    assert out.index("○ Task 1") < out.index("✓ Task 2")
    assert checks.passed("Task 2") and not checks.passed("Task 1", "Task 2")


def test_strict_mode_raises_in_the_check_and_in_the_summary(shell, monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    run(shell, "answer = 2.0")
    result = run(shell, CHECK)
    assert isinstance(result.error_in_exec, checks.CheckFailed)
    assert "Task 1" in str(result.error_in_exec) and "expected 1.5" in str(result.error_in_exec)
    assert isinstance(result.error_in_exec, AssertionError)  # an autograder's failing test
    assert "after_check" not in shell.user_ns
    with pytest.raises(checks.CheckFailed, match="1 of 1 tasks did not pass"):
        checks.summary()
    for cell in ("answer = None", SOLUTION, CHECK):  # CI: the reference solution must pass
        assert run(shell, cell).success
    checks.summary()  # all passed: no exception
    monkeypatch.setenv(checks.STRICT_ENV, "0")
    run(shell, "answer = 0.0")
    assert run(shell, CHECK).success  # not strict: reported, not raised
    with pytest.raises(checks.CheckFailed, match=r"^1 of 1 tasks did not pass: \['Task 1'\]$"):
        checks.summary(strict=True)


def test_report_file_gets_one_json_line_per_check(shell, monkeypatch, tmp_path: Path):
    report = tmp_path / "checks.jsonl"
    monkeypatch.setenv(checks.REPORT_ENV, str(report))
    run(shell, STARTER)
    run(shell, CHECK)
    run(shell, "answer = 1.5")
    run(shell, CHECK)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["task"], r["status"], r["ok"]) for r in rows] == [
        ("Task 1", "todo", False),
        ("Task 1", "passed", True),
    ]
    assert rows[0]["answers"] == ["answer"] and rows[0]["hint"] == "half of three"


def test_without_ipython_nothing_is_marked_as_the_reference(monkeypatch, capsys):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    checks.reset()
    env = {"answer": None}
    c = checks.Checks()
    c.solution_cell(env)  # a plain namespace, no shell: nothing to observe
    env["answer"] = 1.5
    with c.check("Task 1", answers=["answer"], env=env):
        checks.assert_close(env["answer"], 1.5)
    assert c.results["Task 1"].status == "passed"
    with pytest.raises(ValueError, match="list of names"):
        c.check("Task 1", answers="answer", env=env)


def test_assert_close_reports_size_and_place_of_the_mismatch():
    checks.assert_close(torch.ones(2, 3), np.ones((2, 3)))
    checks.assert_close(np.zeros(4), 0.0)  # a scalar expectation broadcasts
    got = torch.zeros(2, 3)
    got[1, 2] = 0.3
    got[0, 0] = 0.01
    with pytest.raises(AssertionError) as error:
        checks.assert_close(got, torch.zeros(2, 3), atol=1e-3, what="the weights")
    message = str(error.value)
    assert "the weights: 2 of 6 values differ; largest |difference| 0.3 at (1, 2)" in message
    assert "got 0.3, expected 0" in message and "atol=0.001" in message
    with pytest.raises(AssertionError, match=r"shape \(2, 3\), expected \(3, 2\)"):
        checks.assert_close(torch.zeros(2, 3), torch.zeros(3, 2), what="x")
    with pytest.raises(AssertionError, match="x is None: fill in your answer"):
        checks.assert_close(None, 1.0, what="x")
    with pytest.raises(AssertionError, match="1 of 1 values differ"):
        checks.assert_close([float("nan")], [0.0])  # NaN is a mismatch
