"""Exercise checks that tell a learner where each task stands, and let Run All reach the end.

Every exercise in the course (lessons and ``notebooks/exercises/``) is a run of cells tagged as
``notebooks/README.md`` describes: the task, a ``starter`` cell (answers set to ``None``), a
hidden ``solution`` cell and a ``check`` cell. This module is what the solution and check cells
call::

    # solution cell (hidden): its first two lines
    from labkit.course.checks import solution_cell
    solution_cell()  # what this cell fills in is the reference solution, not the learner's
    if my_answer is None:
        my_answer = ...

    # check cell
    from labkit.course.checks import assert_close, check
    with check("Task 1", answers=["my_answer"], hint="divide by sqrt(d_k) before the softmax"):
        assert_close(my_answer, reference, atol=1e-6, what="the weights")

``check`` reports one line per task and never stops the notebook (outside strict mode):

* ``✓ passed``: the learner's own answer passed;
* ``◐ reference``: the answer came from the hidden solution cell ("checked the reference
  solution: replace it with your own"); never reported as the learner's success;
* ``✗ failed``: the check raised; the message says what differs and by how much
  (``assert_close`` gives the largest difference, where, and the tolerance), then the hint;
* ``○ not answered``: an answer named in ``answers`` is still ``None``.

``summary()`` (the last cell of each notebook) lists every task with its status.

Strict mode, for CI and grading: with the environment variable ``LABKIT_STRICT_CHECKS=1``
(``labkit.course.notebooks.run_notebook`` sets it for the kernels it starts, so the test suite, the
book build and ``labkit notebooks run`` use it) a failed or unanswered task raises
``CheckFailed`` (an ``AssertionError``) in its check cell, and ``summary()`` raises if any task
did not pass. An autograder (nbgrader's autograded test cells, ``labkit grade``) runs check cells
in strict mode: a cell that raises scores 0. ``LABKIT_CHECKS_REPORT=path`` also appends each
task's result to ``path`` as one JSON object per line (``TaskResult.to_dict``).

How the reference solution is recognised: ``solution_cell()`` remembers every global the cell
(re)binds, as the object it bound. A check whose answer is still that very object is checking
the reference solution. Running any other cell that assigns the name (the learner's starter
cell) forgets the mark, so an answer that happens to equal the reference's is the learner's
once the learner has written it. This needs IPython (any Jupyter kernel); elsewhere no answer
is ever marked as the reference's.
"""

from __future__ import annotations

import ast
import html
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "CheckFailed",
    "Checks",
    "TaskResult",
    "assert_close",
    "check",
    "passed",
    "reset",
    "results",
    "solution_cell",
    "summary",
]

STRICT_ENV = "LABKIT_STRICT_CHECKS"
REPORT_ENV = "LABKIT_CHECKS_REPORT"
MARKS = {"passed": "✓", "reference": "◐", "failed": "✗", "todo": "○"}
LABELS = {
    "passed": "passed",
    "reference": "checked the reference solution",
    "failed": "failed",
    "todo": "not answered yet",
}
COLOURS = {"passed": "#1a7f37", "reference": "#9a6700", "failed": "#cf222e", "todo": "#57606a"}


class CheckFailed(AssertionError):
    """A task's check failed (or was not answered) in strict mode; the message says which."""


def strict_mode() -> bool:
    """Whether ``LABKIT_STRICT_CHECKS`` asks failed checks to raise (CI, grading)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class TaskResult:
    """The latest check of one task.

    ``status``: ``passed`` (the learner's answer), ``reference`` (the hidden solution's answer
    passed), ``failed`` or ``todo`` (an answer is still None). ``message``: what failed.
    """

    task: str
    status: str
    message: str = ""
    hint: str = ""
    answers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The check passed, on the learner's answer or on the reference solution."""
        return self.status in {"passed", "reference"}

    def line(self) -> str:
        text = f"{MARKS[self.status]} {self.task}: {LABELS[self.status]}"
        if self.status == "reference":
            text += ": replace it with your own"
        if self.message:
            text += f" ({self.message})" if self.status == "reference" else f": {self.message}"
        if self.hint and self.status in {"failed", "todo"}:
            text += f"\n  hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---------------------------------------------------------------------------------------------
# Mismatch messages
# ---------------------------------------------------------------------------------------------


def _as_array(value: Any, what: str):
    import numpy as np

    if value is None:
        raise AssertionError(f"{what} is None: fill in your answer")
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AssertionError(
            f"{what} must be numbers (a float, an array or a tensor), got {type(value).__name__}"
        ) from None


def assert_close(
    actual: Any, expected: Any, *, atol: float = 1e-6, rtol: float = 0.0, what: str = "the answer"
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` everywhere, saying by how much.

    Floats, arrays and tensors of the same shape. On a mismatch the AssertionError names the
    shapes, or how many values differ, the largest difference, where it is, both values there
    and the tolerance, e.g. ``the weights: 12 of 108 values differ; largest |difference| 0.31
    at (0, 1, 2) (got 0.52, expected 0.21; tolerance atol=1e-06)``.
    """
    import numpy as np

    got, want = _as_array(actual, what), _as_array(expected, f"the expected {what}")
    if got.shape != want.shape:
        try:  # a scalar or a broadcastable expectation (``allclose(x, 0)``) is fine
            broadcast = np.broadcast_shapes(got.shape, want.shape)
        except ValueError:
            broadcast = None
        if broadcast != got.shape:
            raise AssertionError(f"{what}: shape {got.shape}, expected {want.shape}")
        want = np.broadcast_to(want, got.shape)
    diff = np.abs(got - want)
    bad = ~(diff <= atol + rtol * np.abs(want))  # NaN counts as a mismatch
    if not bad.any():
        return
    tolerance = f"atol={atol:g}" + (f", rtol={rtol:g}" if rtol else "")
    worst = np.where(np.isnan(diff), np.inf, diff)
    index = np.unravel_index(int(np.argmax(worst)), diff.shape) if diff.ndim else ()
    largest = float(worst[index]) if diff.ndim else float(worst)
    g, w = float(got[index]), float(want[index])
    if got.ndim == 0:
        raise AssertionError(
            f"{what}: got {g:.6g}, expected {w:.6g} (|difference| {largest:.3g}, tolerance "
            f"{tolerance})"
        )
    where = tuple(int(i) for i in index)
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.size} values differ; largest |difference| "
        f"{largest:.3g} at {where} (got {g:.6g}, expected {w:.6g}; tolerance {tolerance})"
    )


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, AssertionError):
        return text or "an assert in the check failed"
    return f"your code raised {type(error).__name__}" + (f": {text}" if text else "")


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def _caller_globals(depth: int = 2) -> dict[str, Any]:
    return sys._getframe(depth).f_globals


def _assigned_names(source: str) -> set[str]:
    """Global names a cell's source binds (assignments, defs, imports, for targets)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


class _Task:
    """The context manager ``check`` returns; see :meth:`Checks.check`."""

    def __init__(self, owner: Checks, name: str, answers: list[str], hint: str, env: dict):
        self.owner, self.name, self.answers, self.hint, self.env = owner, name, answers, hint, env

    def __enter__(self) -> _Task:
        self.owner._in_checks_cell = True
        self.todo = [a for a in self.answers if self.env.get(a) is None]
        self.reference = [a for a in self.answers if self.owner._is_reference(a, self.env)]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt and friends go through
        if exc is None:
            status, message = ("reference", "") if self.reference else ("passed", "")
            if self.reference:
                message = "fill in " + ", ".join(f"`{a}`" for a in self.reference) + " yourself"
        elif self.todo:
            status = "todo"
            message = ", ".join(f"`{a}`" for a in self.todo) + (
                " is still None" if len(self.todo) == 1 else " are still None"
            )
        else:
            status, message = "failed", _describe(exc)
        result = TaskResult(self.name, status, message, self.hint, list(self.answers))
        self.owner._record(result)
        if not result.ok and strict_mode():
            raise CheckFailed(result.line()) from exc
        return True


class Checks:
    """The check results of one kernel (one notebook); the module-level functions use one.

    ``results`` maps each task to its latest :class:`TaskResult`, in the order the tasks were
    first checked.
    """

    def __init__(self) -> None:
        self.results: dict[str, TaskResult] = {}
        self._reference: dict[str, Any] = {}  # name -> the object the solution bound
        self._pending: tuple[dict[str, Any], dict[str, int]] | None = None
        self._in_checks_cell = False
        self._hooked: Any = None

    # --- the reference solution ---------------------------------------------------------------

    def solution_cell(self, env: dict[str, Any] | None = None) -> None:
        """Mark what the calling cell binds from here on as the reference solution's.

        Call it first thing in a solution cell. In IPython the cell's new bindings are
        recorded when the cell finishes; elsewhere this does nothing.
        """
        env = _caller_globals() if env is None else env
        shell = self._shell()
        if shell is None:
            return
        self._pending = (env, {name: id(value) for name, value in env.items()})
        self._in_checks_cell = True

    def _is_reference(self, name: str, env: dict[str, Any]) -> bool:
        return name in self._reference and env.get(name) is self._reference[name]

    def _shell(self):
        try:
            from IPython import get_ipython
        except ImportError:
            return None
        shell = get_ipython()
        if shell is not None and self._hooked is not shell:
            shell.events.register("post_run_cell", self._post_run_cell)
            self._hooked = shell
        return shell

    def _post_run_cell(self, result: Any) -> None:
        if self._pending is not None:
            env, before = self._pending
            for name, value in env.items():
                if not name.startswith("_") and before.get(name) != id(value):
                    self._reference[name] = value
        elif not self._in_checks_cell:  # a learner's cell: what it assigns is theirs now
            source = getattr(getattr(result, "info", None), "raw_cell", "") or ""
            for name in _assigned_names(source):
                self._reference.pop(name, None)
        self._pending, self._in_checks_cell = None, False

    # --- checks -------------------------------------------------------------------------------

    def check(
        self,
        task: str,
        *,
        answers: Iterable[str] = (),
        hint: str = "",
        env: dict[str, Any] | None = None,
    ) -> _Task:
        """A context manager around a task's asserts: reports the task, keeps the notebook going.

        ``answers``: the global names the learner fills in (an answer still None makes the task
        "not answered"; one that is still the reference solution's object makes it
        "checked the reference solution"). ``hint``: shown when the task fails. Any exception
        in the block fails the task (its message is reported); in strict mode the failure is
        raised as ``CheckFailed``.
        """
        if isinstance(answers, str):
            raise ValueError(f"answers must be a list of names, e.g. [{answers!r}]")
        self._shell()
        env = _caller_globals() if env is None else env
        return _Task(self, str(task), list(answers), hint, env)

    def _record(self, result: TaskResult) -> None:
        self.results[result.task] = result
        self._show(result.line(), result.status)
        report = os.environ.get(REPORT_ENV)
        if report:
            with open(report, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(result.to_dict()) + "\n")

    def passed(self, *tasks: str) -> bool:
        """Whether every task named has been checked and passed (reference solution included)."""
        return all(t in self.results and self.results[t].ok for t in tasks)

    def summary(self, *, strict: bool | None = None) -> None:
        """Show every checked task and its status; in strict mode raise unless all passed."""
        results = list(self.results.values())
        counts = {s: sum(r.status == s for r in results) for s in MARKS}
        head = (
            f"Exercise checks: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['todo']} not answered, {counts['reference']} on the reference solution"
        )
        lines = [head] + ["  " + r.line().replace("\n", "\n  ") for r in results]
        if not results:
            lines.append("  (no check has run yet)")
        status = "passed" if all(r.ok for r in results) else "failed"
        if counts["reference"] and status == "passed":
            status = "reference"
        self._show("\n".join(lines), status)
        strict = strict_mode() if strict is None else strict
        failed = [r.task for r in results if not r.ok]
        if strict and failed:
            raise CheckFailed(f"{len(failed)} of {len(results)} tasks did not pass: {failed}")

    def reset(self) -> None:
        """Forget every result and reference mark (a fresh notebook run)."""
        self.results.clear()
        self._reference.clear()

    @staticmethod
    def _show(text: str, status: str) -> None:
        shell = None
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            pass
        if shell is None or not hasattr(shell, "kernel"):
            print(text, flush=True)
            return
        from IPython.display import display

        colour = COLOURS[status]
        body = html.escape(text).replace("\n", "<br>")
        markup = (
            f'<div class="labkit-check labkit-check-{status}" style="border-left:4px solid '
            f'{colour};padding:2px 8px;font-family:monospace;white-space:pre-wrap">{body}</div>'
        )
        display({"text/plain": text, "text/html": markup}, raw=True)


_CHECKS = Checks()


def check(task: str, *, answers: Iterable[str] = (), hint: str = ""):
    """``Checks.check`` on this kernel's results (the namespace is the calling cell's)."""
    return _CHECKS.check(task, answers=answers, hint=hint, env=_caller_globals())


def solution_cell() -> None:
    """``Checks.solution_cell`` on this kernel's results (call it first in a solution cell)."""
    _CHECKS.solution_cell(_caller_globals())


def passed(*tasks: str) -> bool:
    """Whether every task named has passed its check (the learner's or the reference answer)."""
    return _CHECKS.passed(*tasks)


def summary(*, strict: bool | None = None) -> None:
    """Show every task's status (``Checks.summary``); strict mode raises unless all passed."""
    _CHECKS.summary(strict=strict)


def results() -> list[TaskResult]:
    """The latest result of every task checked in this kernel, in order."""
    return list(_CHECKS.results.values())


def reset() -> None:
    """Forget this kernel's results and reference marks."""
    _CHECKS.reset()
