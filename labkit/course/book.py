"""Build the course book: executed notebooks rendered by Jupyter Book 1.x into ``book/_build/html``.

``labkit book build [--smoke]`` runs :func:`build_book`, which

1. finds the lesson notebooks ``notebooks/NN_topic.ipynb`` and the exercise notebooks
   ``notebooks/exercises/ex_*.ipynb``;
2. gets an executed copy of each in ``build/executed/<mode>/`` (mode ``smoke`` or ``full``):
   a copy is **reused** when it was executed from the same notebook and the same labkit
   sources (a hash of both, recorded in the copy by ``run_notebook``), was run in the requested
   mode and finished without error (:func:`is_fresh`), and executed with papermill otherwise.
   Copies are written to a temporary name and renamed, so concurrent runs never leave a
   half-written one. The
   notebook smoke tests (``tests/test_notebooks.py``) write their copies to the same place, so
   ``python -m pytest`` executes every notebook once and the book test renders those copies;
3. stages the book's source in ``build/book-src/``: the committed files of ``book/`` (config,
   intro, glossary, bibliography, local extension), the executed notebooks prepared for the
   page (:func:`prepare_for_book`), and the generated table of contents, exercises index and
   API pages. Nothing generated is committed;
4. runs ``jupyter-book build -W --keep-going --all`` (any warning fails the build; notebook
   execution is off in Sphinx, as step 2 did it), writing ``book/_build/html``;
5. checks that no page loads a script, stylesheet, font or image from another host
   (:func:`find_remote_assets`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from labkit.course.notebooks import (
    EXERCISE_GLOB,
    NOTEBOOK_GLOB,
    NOTEBOOK_NAME,
    PACKAGE_DIR,
    NotebookError,
    executed_fingerprint,
    lesson_notebooks,
    run_notebook,
    source_fingerprint,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository checkout: labkit/course/book.py
EXECUTED_DIR = Path("build") / "executed"  # relative to the repository root
STAGE_DIR = Path("build") / "book-src"
OUTPUT_DIR = Path("book") / "_build" / "html"
# (caption, first, last notebook prefix) of the book's parts, in order. Prefixes compare as
# strings, so "00b" (tokenization, between 00 and 01) falls in "00a".."06z".
PARTS: tuple[tuple[str, str, str], ...] = (
    ("Start here", "00", "00"),
    ("Building the Transformer", "00a", "06z"),
    ("Efficiency, applications and pretrained models", "07", "99z"),
)
REFERENCE_PAGES = ("instructors", "api/index", "glossary", "bibliography")
# Committed files of book/ that are not part of the site.
NOT_STAGED = {"_build", "README.md", "__pycache__", "screenshot.png"}
SMOKE_NOTE = (
    "```{note}\nThis page was built in **smoke mode** (`SMOKE = True`): small data, models and "
    "step counts, every check still run. Its numbers and figures are not the ones the text "
    "discusses; run the notebook (or `labkit book build` without `--smoke`) for those.\n```"
)


def mode_name(smoke: bool) -> str:
    """``"smoke"`` or ``"full"``: the folder name of executed copies in that mode."""
    return "smoke" if smoke else "full"


def executed_path(notebook: str | Path, *, smoke: bool, root: str | Path = ROOT) -> Path:
    """Where the executed copy of ``notebook`` in this mode lives: ``build/executed/<mode>/``."""
    return Path(root) / EXECUTED_DIR / mode_name(smoke) / Path(notebook).name


# ----------------------------------------------------------------------------------------------
# Pages and the table of contents
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """A notebook as a page of the book: its source, its page name and its title."""

    source: Path
    docname: str  # path in the book without suffix, e.g. "notebooks/01_self_attention"
    title: str

    @property
    def prefix(self) -> str | None:
        """The lesson's place ``NN`` or ``NNb`` of ``NN[b]_topic.ipynb`` (None for exercises)."""
        match = NOTEBOOK_NAME.fullmatch(self.source.name)
        return match.group(1) if match else None

    def in_part(self, first: str, last: str) -> bool:
        """Whether the lesson's prefix lies in ``[first, last]`` (a part of PARTS)."""
        return self.prefix is not None and first <= self.prefix <= last


def notebook_title(path: str | Path) -> str:
    """The ``# title`` that opens the notebook's first markdown cell (else the file's stem)."""
    cells = json.loads(Path(path).read_text(encoding="utf-8")).get("cells", [])
    for cell in cells[:1]:
        if cell.get("cell_type") == "markdown":
            text = "".join(cell.get("source", ""))
            match = re.match(r"\s*#\s+(.+)", text)
            if match:
                return match.group(1).strip()
    return Path(path).stem


def course_pages(notebook_dir: str | Path) -> tuple[list[Page], list[Page]]:
    """The lesson pages and the exercise pages, each sorted by file name."""
    notebook_dir = Path(notebook_dir)
    lessons = [
        Page(p, f"notebooks/{p.stem}", notebook_title(p)) for p in lesson_notebooks(notebook_dir)
    ]
    exercises = [
        Page(p, f"notebooks/exercises/{p.stem}", notebook_title(p))
        for p in sorted((notebook_dir / "exercises").glob(EXERCISE_GLOB))
    ]
    return lessons, exercises


def make_toc(
    lessons: Iterable[Page], exercises: Iterable[Page], api_docnames: Iterable[str] = ()
) -> dict[str, Any]:
    """The ``_toc.yml`` (jb-book format): intro, the parts of PARTS, Exercises, Reference.

    ``api_docnames`` are the module pages listed under the API index (see :func:`api_pages`).
    """
    lessons, exercises = list(lessons), list(exercises)
    parts: list[dict[str, Any]] = []
    placed: set[str] = set()
    for caption, first, last in PARTS:
        chapters = [p for p in lessons if p.in_part(first, last)]
        if chapters:
            parts.append({"caption": caption, "chapters": [{"file": p.docname} for p in chapters]})
            placed.update(p.docname for p in chapters)
    unplaced = [p for p in lessons if p.docname not in placed]
    if unplaced:
        raise ValueError(f"no part of the book covers {[p.source.name for p in unplaced]}")
    exercise_index: dict[str, Any] = {"file": "notebooks/exercises/index"}
    if exercises:
        exercise_index["sections"] = [{"file": p.docname} for p in exercises]
    parts.append({"caption": "Exercises", "chapters": [exercise_index]})
    reference: list[dict[str, Any]] = [{"file": f} for f in REFERENCE_PAGES]
    api_sections = [{"file": name} for name in api_docnames if name != "api/index"]
    if api_sections:
        reference[REFERENCE_PAGES.index("api/index")]["sections"] = api_sections
    parts.append({"caption": "Reference", "chapters": reference})
    return {"format": "jb-book", "root": "intro", "parts": parts}


def toc_yaml(toc: dict[str, Any]) -> str:
    """``toc`` as YAML, with a header saying it is generated."""
    import yaml

    header = "# Generated by labkit/course/book.py from the notebooks; do not edit.\n"
    return header + yaml.safe_dump(toc, sort_keys=False)


def exercises_index(exercises: Iterable[Page]) -> str:
    """The Exercises part's first page: a list of the exercise notebooks by title."""
    lines = [
        "# Exercises",
        "",
        "Longer exercises that combine several chapters. Each notebook follows the chapters'",
        "conventions: edit the `starter` cell, run the `check` cell; the solution is hidden",
        "behind a toggle and only fills in answers you left as `None`.",
        "",
    ]
    items = [f"- [{p.title}]({p.source.name})" for p in exercises]
    lines += items or ["No exercise notebooks yet."]
    return "\n".join(lines) + "\n"


def api_pages(package_dir: str | Path) -> dict[str, str]:
    """``{docname: markdown}`` for the labkit API reference: an index and a page per module.

    Modules are found on disk (``labkit/**/*.py``, private names and ``__main__`` left out), so
    a new module appears without editing the book. A package's page shows its docstring only:
    its members are documented once, on the pages of the modules that define them. The
    course's own tooling (``labkit.course``) is not library and is left out.
    """
    package_dir = Path(package_dir)
    modules: list[tuple[str, bool, str]] = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts) or parts[1:2] == ["course"]:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        summary = docstring.strip().split("\n\n")[0].replace("\n", " ")
        modules.append((".".join(parts), is_package, summary))
    pages = {}
    index = [
        "# labkit API",
        "",
        "Generated from labkit's docstrings at build time. Shapes use the symbols of the",
        "[glossary](../glossary.md): `B` batch, `H` heads, `T` length, `d_k` head width.",
        "",
        "| module | what it holds |",
        "| --- | --- |",
    ]
    for name, is_package, summary in modules:
        summary = summary.replace("|", "\\|")
        index.append(f"| [`{name}`]({name}.md) | {summary} |")
        # eval-rst: autodoc emits reStructuredText, which a MyST directive would not parse.
        options = "   :no-members:\n" if is_package else ""
        pages[f"api/{name}"] = (
            f"# `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n{options}```\n"
        )
    pages["api/index"] = "\n".join(index) + "\n"
    return pages


README_BEGIN = "<!-- TOC: generated by `labkit book readme` from the notebooks' first headings -->"
README_END = "<!-- /TOC -->"


def contents_table(lessons: Iterable[Page], exercises: Iterable[Page]) -> str:
    """The README's table of contents: part, notebook (linked) and title, in book order."""
    rows = ["| part | notebook | chapter |", "| --- | --- | --- |"]
    lessons = list(lessons)
    for caption, first, last in PARTS:
        for page in lessons:
            if page.in_part(first, last):
                title = re.sub(r"^\d\d[a-z]?\s*·\s*", "", page.title)
                link = f"[`{page.source.stem}`](notebooks/{page.source.name})"
                rows.append(f"| {caption} | {link} | {title} |")
    for page in exercises:
        title = re.sub(r"^Exercise\s+", "", page.title)
        link = f"[`{page.source.stem}`](notebooks/exercises/{page.source.name})"
        rows.append(f"| Exercises | {link} | {title} |")
    return "\n".join(rows) + "\n"


def update_readme(root: str | Path = ROOT) -> bool:
    """Rewrite the contents table between README.md's TOC markers; True if it changed."""
    readme = Path(root) / "README.md"
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the lines {README_BEGIN!r} ... {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    table = contents_table(*course_pages(Path(root) / "notebooks"))
    new = f"{head}{README_BEGIN}\n{table}{README_END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


# ----------------------------------------------------------------------------------------------
# Executed copies: reuse when fresh, execute otherwise
# ----------------------------------------------------------------------------------------------


def executed_mode(path: str | Path) -> str | None:
    """``"smoke"``/``"full"`` for a papermill run that finished without error, else None.

    None also for a copy that is missing, unreadable, cut off mid-run (papermill saves as it
    goes, and records ``end_time`` only at the end) or holds an error output.
    """
    try:
        notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    papermill = notebook.get("metadata", {}).get("papermill", {})
    if not papermill.get("end_time") or papermill.get("exception"):
        return None
    for cell in notebook.get("cells", []):
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return None
    return mode_name(bool(papermill.get("parameters", {}).get("SMOKE", False)))


def is_fresh(
    source: str | Path, executed: str | Path, *, smoke: bool, package_dir: str | Path = PACKAGE_DIR
) -> bool:
    """Whether ``executed`` can stand for ``source`` in this mode: it was executed from this
    very notebook and these labkit sources (``source_fingerprint``), was run with
    ``SMOKE=smoke`` and finished without error."""
    source, executed = Path(source), Path(executed)
    if executed_mode(executed) != mode_name(smoke):
        return False
    return executed_fingerprint(executed) == source_fingerprint(source, package_dir)


@dataclass(frozen=True)
class Execution:
    """How an executed copy was obtained: reused, or run now (and how long that took)."""

    source: Path
    executed: Path
    reused: bool
    seconds: float


def ensure_executed(
    source: str | Path,
    *,
    smoke: bool,
    root: str | Path = ROOT,
    force: bool = False,
    runner: Callable[..., Any] = run_notebook,
    package_dir: str | Path = PACKAGE_DIR,
) -> Execution:
    """The executed copy of ``source`` in this mode: reused if fresh (and not ``force``),
    else executed with ``runner`` (papermill by default; raises NotebookError on a failing
    cell)."""
    source = Path(source)
    target = executed_path(source, smoke=smoke, root=root)
    if not force and is_fresh(source, target, smoke=smoke, package_dir=package_dir):
        return Execution(source, target, True, 0.0)
    start = time.perf_counter()
    runner(source, target, smoke=smoke)
    return Execution(source, target, False, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Staging: the executed notebooks as book pages
# ----------------------------------------------------------------------------------------------

PLOTLY_MIME = "application/vnd.plotly.v1+json"  # labkit.viz.PLOTLY_MIME
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def prepare_for_book(notebook: dict[str, Any], *, smoke: bool) -> dict[str, Any]:
    """An executed notebook (as JSON) made ready for its page; returns a new dict.

    * widget state is dropped and widget views fall back to their ``text/html`` (labkit.viz's
      explorer ships one); a widget with no HTML fallback (e.g. a tqdm bar) is dropped, so no
      page waits for a widget manager;
    * plotly's JSON (``labkit.viz.show_plotly``'s output for live front ends) is dropped where the
      output has its ``text/html``: the page draws that HTML with the plotly.js it serves
      (myst-nb would otherwise warn about a MIME type it cannot render, failing the ``-W`` build);
    * papermill's ``injected-parameters`` cell is hidden (tag ``remove-cell``);
    * in smoke mode, a note under the title says so.
    """
    notebook = json.loads(json.dumps(notebook))  # a deep copy
    notebook.get("metadata", {}).pop("widgets", None)
    for cell in notebook.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                if "text/html" not in data:
                    continue
                del data[WIDGET_VIEW]
            if PLOTLY_MIME in data and "text/html" in data:
                del data[PLOTLY_MIME]
            outputs.append(output)
        if "outputs" in cell:
            cell["outputs"] = outputs
    if smoke and notebook.get("cells"):
        note = {
            "cell_type": "markdown",
            "id": "smoke-mode-note",
            "metadata": {},
            "source": SMOKE_NOTE,
        }
        notebook["cells"].insert(1, note)
    return notebook


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def stage_book(
    root: str | Path,
    executions: Iterable[tuple[Page, Path]],
    lessons: Iterable[Page],
    exercises: Iterable[Page],
    *,
    smoke: bool,
) -> Path:
    """Lay out the book's source in ``build/book-src``; returns that folder."""
    root = Path(root)
    stage = root / STAGE_DIR
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(root / "book", stage, ignore=shutil.ignore_patterns(*NOT_STAGED))
    for page, executed in executions:
        notebook = json.loads(executed.read_text(encoding="utf-8"))
        text = json.dumps(prepare_for_book(notebook, smoke=smoke), indent=1, ensure_ascii=False)
        _write(stage / f"{page.docname}.ipynb", text)
    exercises = list(exercises)
    _write(stage / "notebooks" / "exercises" / "index.md", exercises_index(exercises))
    api = api_pages(root / "labkit")
    for docname, text in api.items():
        _write(stage / f"{docname}.md", text)
    _write(stage / "_toc.yml", toc_yaml(make_toc(lessons, exercises, api)))
    return stage


# ----------------------------------------------------------------------------------------------
# The rendered site loads nothing from outside
# ----------------------------------------------------------------------------------------------

ASSET_ATTRIBUTES = {
    "script": "src",
    "img": "src",
    "iframe": "src",
    "source": "src",
    "audio": "src",
    "video": "src",
    "embed": "src",
}
ASSET_LINK_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "manifest"}
CSS_URL = re.compile(r"""url\(\s*['"]?(https?:)?//""", re.IGNORECASE)


class _AssetFinder(HTMLParser):
    """Collects the URLs a page loads by itself (not the links a reader may follow)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag in ASSET_ATTRIBUTES and values.get(ASSET_ATTRIBUTES[tag]):
            self.urls.append(values[ASSET_ATTRIBUTES[tag]])
        rels = set(values.get("rel", "").lower().split())
        if tag == "link" and rels & ASSET_LINK_RELS and values.get("href"):
            self.urls.append(values["href"])
        if CSS_URL.search(values.get("style", "")):
            self.urls.append(values["style"])

    def handle_data(self, data: str) -> None:  # inline <style> and scripts
        for match in CSS_URL.finditer(data):
            self.urls.append(data[match.start() : match.start() + 80])


def remote_assets(html: str) -> list[str]:
    """The URLs in ``html`` that make a browser fetch from another host (http(s) or //)."""
    finder = _AssetFinder()
    finder.feed(html)
    return [url for url in finder.urls if re.match(r"\s*(url\(\s*['\"]?)?(https?:)?//", url)]


def find_remote_assets(html_dir: str | Path) -> list[str]:
    """``"page: url"`` for every remote asset in every ``.html`` file under ``html_dir``."""
    html_dir = Path(html_dir)
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        for url in remote_assets(page.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{page.relative_to(html_dir)}: {url}")
    return found


# ----------------------------------------------------------------------------------------------
# The whole build
# ----------------------------------------------------------------------------------------------


class BookBuildError(RuntimeError):
    """The book did not build: a notebook failed, Sphinx warned, or a page loads a CDN."""


@dataclass
class BookBuild:
    """The result of :func:`build_book`."""

    html_dir: Path
    smoke: bool
    executions: list[Execution] = field(default_factory=list)
    execute_seconds: float = 0.0
    render_seconds: float = 0.0

    @property
    def index(self) -> Path:
        return self.html_dir / "index.html"


def build_book(
    root: str | Path = ROOT,
    *,
    smoke: bool = False,
    force: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] = print,
    runner: Callable[..., Any] = run_notebook,
) -> BookBuild:
    """Execute (or reuse) every notebook, stage the book, render it to ``book/_build/html``.

    ``jobs`` notebooks execute at once (each in its own kernel; on a 2-core machine, 2 jobs with
    ``OMP_NUM_THREADS=1`` beat one job with 2 threads, as the course's models are small).

    Raises BookBuildError naming every failing notebook, or carrying Sphinx's warnings.
    """
    root = Path(root)
    lessons, exercises = course_pages(root / "notebooks")
    if not lessons:
        raise BookBuildError(f"no notebooks matching {NOTEBOOK_GLOB} in {root / 'notebooks'}")
    result = BookBuild(root / OUTPUT_DIR, smoke)
    start = time.perf_counter()
    failures = []
    executed: list[tuple[Page, Path]] = []
    mode = mode_name(smoke)
    log(f"notebooks ({mode} mode), executed copies in {EXECUTED_DIR / mode}")
    pages = [*lessons, *exercises]

    def one(page: Page) -> Execution:
        return ensure_executed(page.source, smoke=smoke, root=root, force=force, runner=runner)

    # Each notebook runs in its own kernel process; jobs > 1 runs that many side by side.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, page) for page in pages]
        for page, future in zip(pages, futures, strict=True):
            try:
                run = future.result()
            except NotebookError as err:
                failures.append(str(err))
                log(f"  FAILED   {page.source.name}")
                continue
            result.executions.append(run)
            executed.append((page, run.executed))
            how = "reused" if run.reused else f"executed in {run.seconds:.1f} s"
            log(f"  {page.source.name:<40} {how}")
    result.execute_seconds = time.perf_counter() - start
    if failures:
        raise BookBuildError("\n\n".join(failures))

    stage = stage_book(root, executed, lessons, exercises, smoke=smoke)
    log(f"rendering {stage.relative_to(root)} -> {OUTPUT_DIR}")
    start = time.perf_counter()
    command = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(stage),
        "--path-output",
        str(root / "book"),
        "--builder",
        "html",
        "-W",
        "--keep-going",
        "--all",
    ]
    # Python's DeprecationWarnings from Sphinx extensions are log noise, not Sphinx warnings.
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    result.render_seconds = time.perf_counter() - start
    if proc.returncode != 0 or not result.index.exists():
        output = (proc.stdout + proc.stderr)[-20_000:]
        raise BookBuildError(f"jupyter-book failed (exit {proc.returncode}):\n{output}")
    remote = find_remote_assets(result.html_dir)
    if remote:
        raise BookBuildError("pages load assets from other hosts:\n" + "\n".join(remote))
    log(f"built {result.index} in {result.execute_seconds + result.render_seconds:.1f} s")
    return result
