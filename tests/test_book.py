"""The course book: how it is assembled (fast unit tests), that it builds, and that it works in a
real browser.

* Unit tests (no marker): the table of contents, the reuse-if-fresh rule for executed notebooks,
  the preparation of a notebook for its page, the API pages and the CDN check.
* ``book``: ``labkit.course.book.build_book(smoke=True)`` renders ``book/_build/html`` from the
  executed copies that tests/test_notebooks.py left in ``build/executed/smoke/`` (conftest.py
  runs these tests after all others); every warning fails the build. Then the HTML is checked
  statically: nothing is loaded from another host, plotly.js and MathJax come from ``_static``,
  solutions are folded away, pages stay small.
* ``browser``: the built book served on 127.0.0.1 and driven by Debian's headless Chromium
  (``/usr/bin/chromium``) through playwright; see :func:`test_chapter_pages_in_a_browser`.
  Under ``CI=true`` a missing Chromium fails these tests; elsewhere they are skipped.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

from labkit.course import book
from labkit.course.book import Page
from labkit.course.notebooks import FINGERPRINT_KEY

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
PAGE_BUDGET_BYTES = 1_500_000  # one HTML page; an inlined plotly.js alone is 4.8 MB
# Everything else one page loads (theme, search index, images, fonts), leaving out the two
# shared libraries SHARED_LIBRARIES (plotly.js 4.8 MB, at most once; MathJax about 1.5 MB).
PAGE_TOTAL_BUDGET_BYTES = 6_000_000
SHARED_LIBRARIES = ("/_static/plotly.min.js", "/_static/mathjax/")
FIGURE_OUTPUTS = ("image/png", "image/svg+xml", "Plotly.newPlot(", "data-labkit-explorer")
CDN_HOSTS = (
    "cdn.jsdelivr.net",
    "cdnjs.cloudflare.com",
    "unpkg.com",
    "cdn.plot.ly",
    "cdn.mathjax.org",
    "polyfill.io",
    "fonts.googleapis.com",
    "code.jquery.com",
)
# JavaScript errors (uncaught exceptions and console.error messages) that are known, harmless
# theme noise and allowed on a page: (regular expression, why it is harmless). Nothing else is.
ALLOWED_PAGE_ERRORS: list[tuple[str, str]] = [
    (
        r"^console: Got invalid theme mode: \. Resetting to auto\.$",
        "pydata-sphinx-theme logs this with console.error on a first visit, before a light or "
        "dark mode is stored in localStorage; the page then uses 'auto' as intended",
    ),
]


def _notebook(cells: list[dict], metadata: dict | None = None) -> dict:
    return {"cells": cells, "metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 5}


def _markdown(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def _code(source: str = "", outputs: list | None = None, tags: list[str] | None = None) -> dict:
    return {
        "cell_type": "code",
        "metadata": {"tags": tags or []},
        "source": source,
        "outputs": outputs or [],
        "execution_count": None,
    }


def _write(path: Path, notebook: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(notebook))
    return path


def _executed(
    smoke: bool, *, finished: bool = True, error: bool = False, fingerprint: str | None = None
) -> dict:
    papermill = {
        "parameters": {"SMOKE": smoke},
        "end_time": "2026-11-26T12:00:00" if finished else None,
        "exception": None,
    }
    failure = {"output_type": "error", "ename": "E", "evalue": "", "traceback": []}
    outputs = [failure] if error else []
    metadata = {"papermill": papermill, FINGERPRINT_KEY: fingerprint}
    return _notebook([_markdown("# 01 · Title"), _code("1", outputs)], metadata)


# ----------------------------------------------------------------------------------------------
# Table of contents
# ----------------------------------------------------------------------------------------------


def test_notebook_title_is_the_first_cells_heading(tmp_path: Path):
    path = _write(tmp_path / "01_x.ipynb", _notebook([_markdown("# 01 · Self-attention\n\ntext")]))
    assert book.notebook_title(path) == "01 · Self-attention"
    untitled = _write(tmp_path / "02_y.ipynb", _notebook([_code("x = 1")]))
    assert book.notebook_title(untitled) == "02_y"


def test_toc_puts_lessons_in_parts_then_exercises_then_reference():
    lessons = [Page(Path(f"{n}.ipynb"), f"notebooks/{n}", n) for n in ("00_a", "03_b", "11_c")]
    exercises = [Page(Path("ex_4_1_d.ipynb"), "notebooks/exercises/ex_4_1_d", "d")]
    toc = book.make_toc(lessons, exercises)
    assert toc["format"] == "jb-book" and toc["root"] == "intro"
    files = [[c["file"] for c in part["chapters"]] for part in toc["parts"]]
    assert files == [
        ["notebooks/00_a"],
        ["notebooks/03_b"],
        ["notebooks/11_c"],
        ["notebooks/exercises/index"],
        list(book.REFERENCE_PAGES),
    ]
    assert toc["parts"][3]["chapters"][0]["sections"] == [{"file": "notebooks/exercises/ex_4_1_d"}]
    assert [part["caption"] for part in toc["parts"]][-2:] == ["Exercises", "Reference"]
    # No exercise notebooks yet: the Exercises part is its index page alone.
    assert "sections" not in book.make_toc(lessons, [])["parts"][3]["chapters"][0]


def test_a_lettered_notebook_sorts_between_two_numbers(tmp_path: Path):
    for name in ("01_b", "00_a", "00b_tok", "07_c", "0_bad", "001_bad"):
        _write(tmp_path / f"{name}.ipynb", _notebook([_markdown(f"# {name[:3]} · {name}")]))
    lessons, _ = book.course_pages(tmp_path)
    assert [p.source.stem for p in lessons] == ["00_a", "00b_tok", "01_b", "07_c"]
    assert [p.prefix for p in lessons] == ["00", "00b", "01", "07"]
    toc = book.make_toc(lessons, [])
    assert [c["file"] for c in toc["parts"][1]["chapters"]] == [
        "notebooks/00b_tok",
        "notebooks/01_b",
    ]
    table = book.contents_table(lessons, [])
    assert "| Building the Transformer | [`00b_tok`](notebooks/00b_tok.ipynb) | 00b_tok |" in table


def test_toc_of_the_repository_lists_every_notebook_once():
    lessons, exercises = book.course_pages(ROOT / "notebooks")
    assert lessons, "no lesson notebooks found"
    toc_text = book.toc_yaml(book.make_toc(lessons, exercises))
    for page in [*lessons, *exercises]:
        assert toc_text.count(f"file: {page.docname}\n") == 1, page.docname
        assert page.title and not page.title.startswith("#")
    assert "Generated by labkit/course/book.py" in toc_text


def test_exercises_index_links_each_exercise_by_title():
    pages = [Page(Path("ex_4_1_a.ipynb"), "notebooks/exercises/ex_4_1_a", "4.1 · Masks")]
    text = book.exercises_index(pages)
    assert text.startswith("# Exercises") and "- [4.1 · Masks](ex_4_1_a.ipynb)" in text
    assert "No exercise notebooks yet" in book.exercises_index([])


def test_api_pages_cover_every_public_module():
    pages = book.api_pages(ROOT / "labkit")
    modules = {name.removeprefix("api/") for name in pages if name != "api/index"}
    expected = {"labkit.nn.attention", "labkit.models", "labkit.models.gpt", "labkit.interp"}
    assert expected <= modules
    assert not [m for m in modules if m.startswith("labkit.course")]  # tooling, not library
    assert "labkit.__main__" not in modules  # running it would call the CLI
    assert ":no-members:" in pages["api/labkit.models"]  # members documented once, in gpt.py
    automodule = "```{eval-rst}\n.. automodule:: labkit.nn.attention\n```"
    assert automodule in pages["api/labkit.nn.attention"]
    for name in modules:
        assert f"({name}.md)" in pages["api/index"]


# ----------------------------------------------------------------------------------------------
# Reuse an executed copy only when it is fresh
# ----------------------------------------------------------------------------------------------


def test_executed_mode_reads_papermills_record(tmp_path: Path):
    assert book.executed_mode(_write(tmp_path / "a.ipynb", _executed(True))) == "smoke"
    assert book.executed_mode(_write(tmp_path / "b.ipynb", _executed(False))) == "full"
    unfinished = _write(tmp_path / "c.ipynb", _executed(True, finished=False))
    assert book.executed_mode(unfinished) is None
    assert book.executed_mode(_write(tmp_path / "d.ipynb", _executed(True, error=True))) is None
    assert book.executed_mode(tmp_path / "missing.ipynb") is None


def _fake_package(tmp_path: Path) -> Path:
    package = tmp_path / "pkg"
    _write_text(package / "nn" / "attention.py", "def attend(): return 1\n")
    _write_text(package / "nn" / "__pycache__" / "attention.cpython-311.pyc", "cache")
    return package


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_copy_is_fresh_only_for_the_same_sources_same_mode_and_clean(tmp_path: Path):
    source = _write(tmp_path / "notebooks" / "01_x.ipynb", _notebook([_markdown("# 01")]))
    package = _fake_package(tmp_path)
    stamp = book.source_fingerprint(source, package)
    copy = _write(
        book.executed_path(source, smoke=True, root=tmp_path), _executed(True, fingerprint=stamp)
    )
    assert copy == tmp_path / "build" / "executed" / "smoke" / "01_x.ipynb"
    fresh = lambda smoke=True: book.is_fresh(source, copy, smoke=smoke, package_dir=package)  # noqa: E731
    assert fresh()
    assert not fresh(smoke=False)  # run in the other mode
    # Times say nothing: a copy older than its notebook is still fresh if nothing changed.
    os.utime(copy, (time.time() - 100,) * 2)
    assert fresh()
    # labkit changed since the run (however old the edit's time stamp): stale.
    module = package / "nn" / "attention.py"
    module.write_text("def attend(): return 2\n", encoding="utf-8")
    os.utime(module, (time.time() - 1000,) * 2)
    assert not fresh()
    module.write_text("def attend(): return 1\n", encoding="utf-8")
    assert fresh()
    (package / "nn" / "__pycache__" / "attention.cpython-311.pyc").write_text("other")
    assert fresh()  # caches are not sources
    _write_text(package / "nn" / "new.py", "")
    assert not fresh()  # a new module is a change too
    (package / "nn" / "new.py").unlink()
    # The notebook itself was edited: stale.
    _write(source, _notebook([_markdown("# 01 edited")]))
    assert not fresh()
    _write(source, _notebook([_markdown("# 01")]))
    assert fresh()
    _write(copy, _executed(True, error=True, fingerprint=stamp))
    assert not fresh()  # a failed run is never reused
    _write(copy, _executed(True))
    assert not fresh()  # no fingerprint recorded: cannot tell what it ran
    assert not book.is_fresh(source, tmp_path / "nothing.ipynb", smoke=True, package_dir=package)


def test_ensure_executed_reuses_a_fresh_copy_and_runs_a_stale_one(tmp_path: Path):
    calls = []
    package = _fake_package(tmp_path)

    def fake_runner(source: Path, target: Path, *, smoke: bool) -> None:
        calls.append((source.name, smoke))
        _write(target, _executed(smoke, fingerprint=book.source_fingerprint(source, package)))

    def ensure(**kwargs):
        return book.ensure_executed(
            source, root=tmp_path, runner=fake_runner, package_dir=package, **kwargs
        )

    source = _write(tmp_path / "notebooks" / "01_x.ipynb", _notebook([_markdown("# 01")]))
    first = ensure(smoke=True)
    assert not first.reused and calls == [("01_x.ipynb", True)]
    again = ensure(smoke=True)
    assert again.reused and again.executed == first.executed and len(calls) == 1
    full = ensure(smoke=False)
    assert not full.reused and calls[-1] == ("01_x.ipynb", False)
    assert full.executed.parent.name == "full"
    forced = ensure(smoke=True, force=True)
    assert not forced.reused and len(calls) == 3
    (package / "nn" / "attention.py").write_text("changed", encoding="utf-8")
    assert not ensure(smoke=True).reused and len(calls) == 4  # labkit changed: run again


def test_run_notebook_replaces_the_executed_copy_atomically(tmp_path: Path, monkeypatch):
    """papermill writes elsewhere; the copy is renamed into place with its fingerprint, so a
    concurrent reader sees the old copy or the whole new one, never a half-written file."""
    import papermill

    from labkit.course import notebooks

    source = _write(tmp_path / "01_x.ipynb", _notebook([_markdown("# 01")]))
    output = _write(tmp_path / "out" / "01_x.ipynb", _executed(True, fingerprint="old"))
    seen = []

    def fake_execute(input_path, output_path, **kwargs):
        seen.append(Path(output_path))
        assert Path(output_path) != output and Path(output_path).parent == output.parent
        assert book.executed_fingerprint(output) == "old"  # untouched while the run goes on
        Path(output_path).write_text(json.dumps(_executed(True)), encoding="utf-8")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    notebooks.run_notebook(source, output, smoke=True)
    assert len(seen) == 1 and not seen[0].exists()
    assert book.executed_fingerprint(output) == book.source_fingerprint(source)
    assert book.executed_mode(output) == "smoke"
    assert sorted(p.name for p in output.parent.iterdir()) == ["01_x.ipynb"]  # no leftovers


def test_prepare_for_book_drops_widgets_and_hides_injected_parameters():
    widget = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    explorer = {
        "output_type": "display_data",
        "metadata": {},
        "data": {book.WIDGET_VIEW: widget, "text/html": "<div>view</div>", "text/plain": "x"},
    }
    progress = {
        "output_type": "display_data",
        "metadata": {},
        "data": {book.WIDGET_VIEW: widget, "text/plain": "HBox(...)"},
    }
    notebook = _notebook(
        [
            _markdown("# 01 · Title"),
            _code("SMOKE = True", tags=["injected-parameters"]),
            _code("show()", [explorer, progress]),
        ],
        {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {"abc": {}}}}},
    )
    page = book.prepare_for_book(notebook, smoke=True)
    assert "widgets" not in page["metadata"] and "widgets" in notebook["metadata"]  # a copy
    note = page["cells"][1]
    assert note["cell_type"] == "markdown" and "smoke mode" in note["source"]
    assert "remove-cell" in page["cells"][2]["metadata"]["tags"]
    outputs = page["cells"][3]["outputs"]
    assert len(outputs) == 1 and set(outputs[0]["data"]) == {"text/html", "text/plain"}
    assert len(book.prepare_for_book(notebook, smoke=False)["cells"]) == 3  # no note


def test_prepare_for_book_keeps_the_html_of_a_plotly_figure():
    """show_plotly's output: the page gets the book-safe HTML, not plotly's JSON (myst-nb has
    no renderer for it and warns, which fails the -W build)."""
    import numpy as np

    from labkit import viz

    fig = viz.attention_heatmap(np.eye(2), ["a", "b"], interactive=True)
    bundle = viz.show_plotly(fig, "nb-book-test")._repr_mimebundle_()
    figure = {"output_type": "display_data", "metadata": {}, "data": bundle}
    json_only = {"output_type": "display_data", "metadata": {}, "data": {book.PLOTLY_MIME: {}}}
    notebook = _notebook([_markdown("# 01 · Title"), _code("show()", [figure, json_only])])
    outputs = book.prepare_for_book(notebook, smoke=False)["cells"][1]["outputs"]
    assert set(outputs[0]["data"]) == {"text/html", "text/plain"}
    assert "Plotly.newPlot(" in outputs[0]["data"]["text/html"]
    assert book.PLOTLY_MIME in notebook["cells"][1]["outputs"][0]["data"]  # a copy
    assert set(outputs[1]["data"]) == {book.PLOTLY_MIME}  # nothing else to show: left alone
    assert book.PLOTLY_MIME == viz.PLOTLY_MIME


# ----------------------------------------------------------------------------------------------
# Nothing from a CDN
# ----------------------------------------------------------------------------------------------


def test_remote_assets_finds_what_a_page_loads_not_what_it_links():
    html = """<html><head>
      <script src="https://cdn.jsdelivr.net/npm/x.js"></script>
      <script src="_static/plotly.min.js"></script>
      <link rel="stylesheet" href="//fonts.googleapis.com/css">
      <link rel="next" href="https://example.org/next.html">
      <style>@font-face { src: url('https://fonts.gstatic.com/a.woff2') }</style>
      </head><body>
      <a href="https://arxiv.org/abs/1706.03762">paper</a>
      <img src="_images/fig.png"><img src="http://example.org/x.png">
      </body></html>"""
    found = book.remote_assets(html)
    assert found[0] == "https://cdn.jsdelivr.net/npm/x.js"
    assert found[1] == "//fonts.googleapis.com/css"
    assert "fonts.gstatic.com" in found[2]
    assert found[3] == "http://example.org/x.png"
    assert len(found) == 4


# ----------------------------------------------------------------------------------------------
# The built book (static checks)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_book() -> book.BookBuild:
    """The smoke-mode book, built once per session from the executed copies (or executing)."""
    try:
        return book.build_book(ROOT, smoke=True, log=lambda line: print(line, flush=True))
    except book.BookBuildError as err:
        pytest.fail(str(err), pytrace=False)


def _chapter_pages() -> list[str]:
    """The book's chapter pages (relative paths), in table-of-contents order."""
    lessons, exercises = book.course_pages(ROOT / "notebooks")
    docnames = ["intro", *(p.docname for p in lessons), "notebooks/exercises/index"]
    docnames += [p.docname for p in exercises] + list(book.REFERENCE_PAGES)
    return [f"{name}.html" for name in docnames]


def _notebook_has(docname: str, needle: str, *, executed: bool = False) -> bool:
    """Whether the page's notebook (the stripped source, or the executed copy staged for the
    book) contains ``needle``."""
    source = ROOT / (book.STAGE_DIR if executed else "") / f"{docname}.ipynb"
    return source.exists() and needle in source.read_text(encoding="utf-8")


@pytest.mark.book
def test_book_has_a_page_per_notebook(built_book: book.BookBuild):
    for page in _chapter_pages():
        assert (built_book.html_dir / page).is_file(), f"no page {page}"
    reused = [run.source.name for run in built_book.executions if run.reused]
    print(
        f"book: {len(reused)}/{len(built_book.executions)} executed copies reused; "
        f"execute {built_book.execute_seconds:.0f} s, render {built_book.render_seconds:.0f} s"
    )


@pytest.mark.book
def test_book_loads_nothing_from_other_hosts(built_book: book.BookBuild):
    html_dir = built_book.html_dir
    assert book.find_remote_assets(html_dir) == []
    for page in html_dir.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for host in CDN_HOSTS:
            assert host not in text, f"{page.relative_to(html_dir)} mentions {host}"
        assert "THEBE_JS_URL" not in text, f"{page.relative_to(html_dir)} still declares thebe"
        assert "widget-state+json" not in text and "embed-amd" not in text, page.name
    assert (html_dir / "_static" / "mathjax" / "tex-chtml-full.js").is_file()
    assert (html_dir / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    assert (html_dir / "_static" / "plotly.min.js").is_file()


@pytest.mark.book
def test_plotly_js_is_loaded_once_and_only_where_needed(built_book: book.BookBuild):
    pages = list(built_book.html_dir.rglob("*.html"))
    assert len(pages) >= len(_chapter_pages())  # an empty folder would pass the loop below
    with_plotly = 0
    for page in pages:
        text = page.read_text(encoding="utf-8")
        loads = len(re.findall(r'<script[^>]+src="[^"]*plotly\.min\.js', text))
        assert loads == (1 if "Plotly.newPlot(" in text else 0), page.name
        with_plotly += loads
        assert len(text.encode()) < PAGE_BUDGET_BYTES, f"{page.name}: {len(text.encode())} bytes"
    assert with_plotly > 0, "no page draws a plotly figure: the check above saw none"


@pytest.mark.book
def test_solutions_are_folded_behind_a_toggle(built_book: book.BookBuild):
    checked = 0
    for page in _chapter_pages():
        text = (built_book.html_dir / page).read_text(encoding="utf-8")
        solutions = re.findall(r'<div class="cell tag_solution[^"]*"', text)
        folded = re.findall(
            r'<div class="cell tag_solution[^"]*tag_hide-input[^"]*"[^>]*>\s*'
            r'<details class="[^"]*\bhide above-input">',  # folded: no "open" attribute
            text,
        )
        assert len(folded) == len(solutions), f"{page}: a solution is not folded"
        assert _notebook_has(page.removesuffix(".html"), '"solution"') == bool(solutions), page
        checked += len(solutions)
    assert checked > 0, "no solution cells found in the book"


# ----------------------------------------------------------------------------------------------
# The built book in a real browser
# ----------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # no request log on stderr
        pass


@pytest.fixture(scope="session")
def book_server(built_book: book.BookBuild) -> Iterator[str]:
    """The built book served over HTTP on 127.0.0.1 (a free port), for the session."""
    handler = functools.partial(_QuietHandler, directory=str(built_book.html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _local_target(html_dir: Path, page_url: str, href: str, base: str) -> tuple[Path, str] | None:
    """The file and fragment an internal link points to (None for external links)."""
    url = urlparse(urljoin(page_url, href))
    if url.scheme not in ("http", "https") or not urljoin(page_url, href).startswith(base):
        return None
    path = unquote(url.path)[len(urlparse(base).path) :] or "index.html"
    if path.endswith("/"):
        path += "index.html"
    return html_dir / path, url.fragment


@pytest.mark.book  # it builds the book too: "-m 'not book'" leaves it out
@pytest.mark.browser
def test_chapter_pages_in_a_browser(built_book: book.BookBuild, book_server: str, browser):
    """Every chapter page, in headless Chromium:

    * is served with HTTP 200, and no request it makes leaves 127.0.0.1 (every request is
      routed through a handler that aborts and records any other host);
    * raises no JavaScript error (ALLOWED_PAGE_ERRORS is the explicit allow-list) and never
      shows "Loading widget...";
    * renders its math with MathJax (``mjx-container``) where its HTML has math;
    * draws its figures: every output image decodes (naturalWidth > 0), every plotly figure has
      an SVG drawn by plotly.js;
    * stays within the size budgets: the HTML itself, and everything the page loads apart from
      plotly.js (loaded at most once) and MathJax;
    * has internal links that resolve: the target file exists and so does the ``#fragment``.

    Full-page screenshots of three pages (the intro, the first chapter with a plotly figure, the
    glossary) and one screen of that chapter at its first figure go to build/screenshots/.
    """
    html_dir = built_book.html_dir
    pages = _chapter_pages()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    foreign: list[str] = []

    def route(route) -> None:
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    problems: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    figure_pages = [
        name
        for name in pages
        if _notebook_has(name.removesuffix(".html"), "Plotly.newPlot(", executed=True)
    ]
    chapter_shot = (figure_pages or pages[2:])[0]
    shots = {pages[0], chapter_shot, "glossary.html"}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name in pages:
        page = context.new_page()
        errors: list[str] = []
        loaded: list[tuple[str, int]] = []
        page.on("pageerror", lambda err, errors=errors: errors.append(str(err)))
        page.on(
            "console",
            lambda msg, errors=errors: (
                errors.append(f"console: {msg.text}") if msg.type == "error" else None
            ),
        )
        page.on(
            "response",
            lambda r, loaded=loaded: loaded.append(
                (urlparse(r.url).path, int(r.headers.get("content-length", "0")))
            ),
        )
        response = page.goto(book_server + name, wait_until="load")
        where = f"{name}:"
        if response is None or response.status != 200:
            problems.append(f"{where} HTTP {response.status if response else 'no response'}")
            page.close()
            continue
        html = (html_dir / name).read_text(encoding="utf-8")
        if 'class="math' in html:
            try:
                page.wait_for_selector("mjx-container", state="attached", timeout=20_000)
            except Exception:  # playwright's TimeoutError
                problems.append(f"{where} math present but MathJax rendered nothing")
        if "plotly-graph-div" in html:
            try:
                page.wait_for_selector(
                    ".plotly-graph-div .main-svg", state="attached", timeout=20_000
                )
            except Exception:
                problems.append(f"{where} plotly figure not drawn")
            undrawn = page.eval_on_selector_all(
                ".plotly-graph-div", "els => els.filter(e => !e.querySelector('svg')).length"
            )
            if undrawn:
                problems.append(f"{where} {undrawn} plotly figure(s) without an SVG")
        broken = page.eval_on_selector_all(
            ".cell_output img",
            "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)",
        )
        if broken:
            problems.append(f"{where} images not drawn: {broken}")
        docname = name.removesuffix(".html")
        if any(_notebook_has(docname, kind, executed=True) for kind in FIGURE_OUTPUTS):
            drawn = page.eval_on_selector_all(
                ".cell_output img, .plotly-graph-div .main-svg, .labkit-explorer svg",
                "els => els.length",
            )
            if not drawn:
                problems.append(f"{where} the notebook has figures but the page draws none")
        if "Loading widget" in page.inner_text("body"):
            problems.append(f"{where} shows 'Loading widget...'")
        for error in errors:
            if not any(re.search(pattern, error) for pattern, _ in ALLOWED_PAGE_ERRORS):
                problems.append(f"{where} JavaScript error: {error}")
        html_bytes = len(html.encode())
        own = sum(n for path, n in loaded if not path.startswith(SHARED_LIBRARIES))
        sizes[name] = (html_bytes, own, sum(n for _, n in loaded))
        if html_bytes > PAGE_BUDGET_BYTES or own > PAGE_TOTAL_BUDGET_BYTES:
            problems.append(f"{where} over the size budget: {sizes[name]} bytes")
        plotly_loads = sum(path.endswith("/plotly.min.js") for path, _ in loaded)
        if plotly_loads > 1:
            problems.append(f"{where} plotly.js loaded {plotly_loads} times")
        hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.getAttribute('href'))")
        for href in hrefs:
            target = _local_target(html_dir, page.url, href, book_server)
            if target is None:
                continue
            path, fragment = target
            if not path.is_file():
                problems.append(f"{where} link {href!r} has no target")
            elif fragment and f'id="{unquote(fragment)}"' not in path.read_text(encoding="utf-8"):
                problems.append(f"{where} link {href!r}: no #{fragment} there")
        if name in shots:
            stem = name.removesuffix(".html").replace("/", "_")
            page.screenshot(path=str(SCREENSHOTS / f"{stem}.png"), full_page=True)
            if name == chapter_shot:  # as in the README (book/screenshot.png): its first figure
                for selector in (".labkit-explorer", ".plotly-graph-div"):  # explorer first
                    if page.locator(selector).count():
                        page.locator(selector).first.scroll_into_view_if_needed()
                        break
                page.screenshot(path=str(SCREENSHOTS / "chapter-figure.png"))
        page.close()
    context.close()
    print("page sizes in bytes: HTML, loaded without plotly.js/MathJax, loaded in all")
    for name, (html_bytes, own, total) in sizes.items():
        print(f"  {name:<54} {html_bytes:>9,} {own:>11,} {total:>11,}")
    assert not foreign, f"requests left 127.0.0.1: {sorted(set(foreign))}"
    assert not problems, "\n".join(problems)


@pytest.mark.book  # it builds the book too: "-m 'not book'" leaves it out
@pytest.mark.browser
def test_attention_explorer_responds_in_the_browser(
    built_book: book.BookBuild, book_server: str, browser
):
    """In every attention explorer of the book (labkit.viz's client-side view), choosing
    another head or layer redraws the SVG: its draw counter and its cells change."""
    lessons, exercises = book.course_pages(ROOT / "notebooks")
    pages = [
        p
        for p in [*lessons, *exercises]
        if _notebook_has(p.docname, "data-labkit-explorer", executed=True)
    ]
    # Notebook 11 shows one; without any this test would check nothing, so it fails instead.
    assert pages, "no executed notebook displays an AttentionExplorer"
    page = browser.new_page()
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if urlparse(route.request.url).hostname == "127.0.0.1"
            else route.abort()
        ),
    )
    checked = 0
    for source in pages:
        page.goto(book_server + f"{source.docname}.html", wait_until="load")
        roots = page.eval_on_selector_all(
            "[data-labkit-explorer]", "els => els.map(e => e.dataset.labkitExplorer)"
        )
        assert roots, f"{source.docname}: the notebook shows an explorer, the page has none"
        for view in roots:
            prefix = f"#labkit-explorer-{view}"
            svg = f"{prefix}-svg"
            page.wait_for_selector(svg)
            before = page.inner_html(f"{prefix}-plot")
            draws = int(page.get_attribute(prefix, "data-draws"))
            heads = page.eval_on_selector_all(f"{prefix}-head option", "os => os.map(o => o.value)")
            page.select_option(f"{prefix}-head", heads[1])  # from "all heads" to head 0
            page.wait_for_function(
                f"() => Number(document.querySelector('{prefix}').dataset.draws) > {draws}"
            )
            assert page.get_attribute(prefix, "data-head") == heads[1]
            after = page.inner_html(f"{prefix}-plot")
            assert after != before, f"{view}: choosing {heads[1]} did not change the drawing"
            cells = page.eval_on_selector_all(f"{svg} rect[data-w]", "rs => rs.length")
            assert cells > 0, f"{view}: no weight cells drawn"
            checked += 1
    page.close()
    assert checked > 0


def test_readmes_list_every_notebook():
    """README.md's contents table is the generated one (run `labkit book readme` to update
    it); notebooks/README.md's table names every notebook."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lessons, exercises = book.course_pages(ROOT / "notebooks")
    table = book.contents_table(lessons, exercises)
    assert f"{book.README_BEGIN}\n{table}{book.README_END}" in readme, (
        "README.md's contents table is out of date: run `labkit book readme`"
    )
    notebooks_readme = (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")
    for page in [*lessons, *exercises]:
        assert f"`{page.source.stem}`" in notebooks_readme, (
            f"notebooks/README.md's table has no row for {page.source.name}"
        )


def test_update_readme_rewrites_only_the_marked_table(tmp_path: Path):
    _write(tmp_path / "notebooks" / "01_x.ipynb", _notebook([_markdown("# 01 · First")]))
    _write(
        tmp_path / "notebooks" / "exercises" / "ex_1_y.ipynb",
        _notebook([_markdown("# Exercise 1 · Why")]),
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{book.README_BEGIN}\nold\n{book.README_END}\nrest\n")
    assert book.update_readme(tmp_path)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{book.README_END}\nrest\n")
    assert "| Building the Transformer | [`01_x`](notebooks/01_x.ipynb) | First |" in text
    assert "| Exercises | [`ex_1_y`](notebooks/exercises/ex_1_y.ipynb) | 1 · Why |" in text
    assert not book.update_readme(tmp_path)  # already up to date


def test_cli_book_build_parses_and_reports_a_missing_course(tmp_path: Path, capsys):
    from labkit.course.cli import build_parser, main

    args = build_parser().parse_args(["book", "build", "--smoke", "--jobs", "2"])
    assert args.smoke and args.jobs == 2 and not args.force and args.root == "."
    assert not build_parser().parse_args(["book", "build"]).smoke  # full mode by default
    (tmp_path / "notebooks").mkdir()
    assert main(["book", "build", "--smoke", "--root", str(tmp_path)]) == 1
    assert "no notebooks matching" in capsys.readouterr().err
