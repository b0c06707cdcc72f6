"""Execute the course notebooks with papermill: smoke mode for tests, full mode for the book.

Every notebook has a cell tagged ``parameters`` (``SMOKE = False``, ``DEVICE = "auto"``,
``SEED = 0``, ...); papermill injects new values after it. ``labkit notebooks run`` and the
test suite both go through :func:`run_notebook`, so a failing cell is reported the same way
everywhere: the notebook, the cell's source and its traceback, not a papermill stack dump.

Every notebook calls :func:`smoke_banner` in the cell right after its ``parameters`` cell, so
a page executed in smoke mode says so at the top, before any number it shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Lesson notebooks are NN_topic.ipynb; a letter after the number (00b_topic.ipynb) slots a
# chapter in between two numbers without renumbering the ones after it. The glob also matches
# names such as 001_x.ipynb; NOTEBOOK_NAME is the exact rule.
NOTEBOOK_GLOB = "[0-9][0-9]*_*.ipynb"
NOTEBOOK_NAME = re.compile(r"(\d\d[a-z]?)_\w+\.ipynb")
EXERCISE_GLOB = "ex_*.ipynb"  # in notebooks/exercises/


def lesson_notebooks(directory: str | Path) -> list[Path]:
    """The lesson notebooks of ``directory`` in reading order (sorted by name: 00, 00b, 01)."""
    return sorted(p for p in Path(directory).glob(NOTEBOOK_GLOB) if NOTEBOOK_NAME.fullmatch(p.name))


# An executed copy records what it was executed from: a hash of the notebook and of every file of
# the labkit package it imported. The book reuses a copy only while both are unchanged (a file's
# modification time says nothing about the labkit code a notebook ran).
FINGERPRINT_KEY = "labkit_fingerprint"  # in the executed notebook's metadata
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the labkit package (labkit/course/..)


def source_fingerprint(notebook: str | Path, package_dir: str | Path = PACKAGE_DIR) -> str:
    """sha256 of ``notebook``'s bytes and of every file under ``package_dir`` (its relative
    path and bytes, in sorted order; caches such as ``__pycache__`` left out)."""
    digest = hashlib.sha256(b"notebook\0" + Path(notebook).read_bytes())
    package_dir = Path(package_dir)
    files = sorted(
        p for p in package_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )  # fmt: skip
    for path in files:
        digest.update(b"\0" + path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def executed_fingerprint(path: str | Path) -> str | None:
    """The fingerprint recorded in an executed copy; None if missing or unreadable."""
    try:
        notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return notebook.get("metadata", {}).get(FINGERPRINT_KEY)


STRICT_ENV = "LABKIT_STRICT_CHECKS"  # labkit.course.checks.STRICT_ENV
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in IPython tracebacks
SMOKE_BANNER = "smoke mode: numbers below come from a tiny run"  # tests look for this text


def smoke_banner(smoke: bool, seed: int | None = None) -> str:
    """Print (and return) the line that tells a reader which mode made the numbers below.

    In smoke mode (``SMOKE = True``, what CI runs) the line starts with :data:`SMOKE_BANNER`
    and warns that tiny runs check the code, not the findings; in full mode it says the
    numbers come from the full-size run. ``seed`` (the notebook's ``SEED``) is named in both.
    """
    seeded = "" if seed is None else f", SEED = {seed}"
    if smoke:
        line = (
            f"{SMOKE_BANNER} (SMOKE = True{seeded}) that checks the code, not the findings; "
            "the findings the text states need the full run (SMOKE = False)."
        )
    else:
        line = f"full mode: numbers below come from the full-size run (SMOKE = False{seeded})."
    print(line)
    return line


class NotebookError(RuntimeError):
    """A cell of a notebook raised; the message carries the cell's source and traceback."""


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: where the executed copy went and how long it took."""

    notebook: Path
    output: Path
    seconds: float


def kernel_metadata() -> dict[str, Any]:
    """The notebook metadata JupyterLab writes for the installed ``python3`` kernel.

    ``{"kernelspec": {...}, "language_info": {...}}`` exactly as JupyterLab 4 sets them when it
    connects a notebook to ipykernel: the kernelspec's display name ("Python 3 (ipykernel)")
    and the kernel's ``language_info`` (Python version included). A notebook that stores
    these opens unmodified; one that stores anything else is rewritten on open and asks to be
    saved on close. Raises ModuleNotFoundError without ipykernel.
    """
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    return {
        "kernelspec": {
            "display_name": spec.display_name,
            "language": spec.language,
            "name": "python3",
        },
        "language_info": dict(IPythonKernel.language_info),
    }


def find_notebooks(directory: str | Path, names: Iterable[str] = ()) -> list[Path]:
    """The course notebooks ``NN_topic.ipynb`` (or ``NNb_topic.ipynb``) in ``directory``, in order.

    ``names`` selects some of them by stem or prefix (``"01"``, ``"01_self_attention"``); an
    unknown name raises ValueError listing the notebooks that exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"no notebook folder at {str(directory)!r}")
    notebooks = lesson_notebooks(directory)
    chosen = []
    for name in names:
        matches = [p for p in notebooks if p.stem == name or p.stem.startswith(f"{name}_")]
        if not matches:
            raise ValueError(
                f"no notebook {name!r} in {directory}; there are: {[p.stem for p in notebooks]}"
            )
        chosen += [p for p in matches if p not in chosen]
    return chosen or notebooks


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    *,
    smoke: bool,
    parameters: dict[str, Any] | None = None,
    kernel: str = "python3",
    cell_timeout_s: int = 600,
    strict_checks: bool = True,
) -> NotebookRun:
    """Execute ``notebook`` into ``output`` with ``SMOKE=smoke`` (plus ``parameters``).

    papermill writes to a temporary file beside ``output``, which is renamed onto ``output``
    at the end with the notebook's ``source_fingerprint`` in its metadata: a reader (the
    book build, another test process) sees the old copy or the finished new one, never a
    half-written file. The working directory is the notebook's folder, as in JupyterLab.
    Raises NotebookError naming the failing cell, with its source and traceback.
    ``strict_checks`` (default) runs the kernel with ``LABKIT_STRICT_CHECKS=1``: an exercise
    check that fails raises (``labkit.course.checks``), so a wrong solution fails the run;
    ``False`` runs it as a learner's Run All does, every check reported and the notebook run to
    its end.
    """
    try:
        import papermill
        from papermill.exceptions import PapermillExecutionError
    except ImportError as err:
        raise ModuleNotFoundError(
            f"papermill runs the notebooks ({err}); install it with pip install -e '.[dev]'"
        ) from None
    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fingerprint = source_fingerprint(notebook)  # what is about to run
    partial = output.with_name(f".{output.stem}.{os.getpid()}.{time.time_ns()}.partial.ipynb")
    error = None
    saved = os.environ.get(STRICT_ENV)
    os.environ[STRICT_ENV] = "1" if strict_checks else "0"  # the kernel inherits it
    try:
        papermill.execute_notebook(
            str(notebook),
            str(partial),
            parameters={"SMOKE": smoke, **(parameters or {})},
            kernel_name=kernel,
            cwd=str(notebook.parent),
            execution_timeout=cell_timeout_s,
            progress_bar=False,
        )
    except PapermillExecutionError as err:
        error = err
    finally:
        if saved is None:
            os.environ.pop(STRICT_ENV, None)
        else:
            os.environ[STRICT_ENV] = saved
        try:
            if partial.exists():  # also a failed run: its copy shows the error (never reused)
                executed = json.loads(partial.read_text(encoding="utf-8"))
                executed.setdefault("metadata", {})[FINGERPRINT_KEY] = fingerprint
                partial.write_text(json.dumps(executed, indent=1) + "\n", encoding="utf-8")
                os.replace(partial, output)  # atomic on one file system
        finally:
            partial.unlink(missing_ok=True)
    if error is not None:  # raised outside the except block: no chained papermill dump
        traceback = ANSI.sub("", "\n".join(error.traceback))
        raise NotebookError(
            f"{notebook.name}: cell {error.cell_index} of the executed notebook (execution "
            f"count {error.exec_count}) raised {error.ename}: {error.evalue}\n"
            f"----- cell source -----\n{error.source}\n"
            f"----- traceback -----\n{traceback}"
        )
    return NotebookRun(notebook, output, time.perf_counter() - start)


PLOTLY_CALL = "Plotly.newPlot("


def export_html(notebook: str | Path, output: str | Path) -> Path:
    """An executed notebook as one HTML file whose plotly figures draw, with no CDN for them.

    nbconvert's HTML export (the ``lab`` template) keeps each output's ``text/html``; the
    figures of ``labkit.viz.show_plotly`` there need plotly.js, which no output carries. This
    adds the installed ``plotly`` package's ``plotly.min.js`` once, inline in ``<head>``, when
    the page has a figure (about 4.6 MB; a page without one gets nothing). Math and widgets are
    left as nbconvert renders them. Returns ``output``.
    """
    import nbformat
    import plotly
    from nbconvert import HTMLExporter

    notebook, output = Path(notebook), Path(output)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(
        nbformat.read(notebook, as_version=4)
    )
    if PLOTLY_CALL in body:
        js = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text("utf-8")
        js = js.replace("</script", "<\\/script")  # cannot close the inline script early
        head_end = body.index("</head>")
        body = f"{body[:head_end]}<script>{js}</script>\n{body[head_end:]}"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(body, encoding="utf-8")
    return output
