"""The live path: the course in JupyterLab 4, driven by headless Chromium as a learner uses it.

A JupyterLab server runs on 127.0.0.1 (a free port, a token) over a temporary copy of the
course (``notebooks/`` as shipped, plus the starter of ``ex_4_1``); Debian's Chromium
(``/usr/bin/chromium``, through playwright: no browser is downloaded) opens ``00``, ``07``,
``11`` and the starter. For each: the notebook opens unmodified; the ``parameters`` cell is
edited through the editor (``SMOKE = True``; in ``11`` also ``INTERACTIVE = True``, the live
explorer widget); Run All is chosen from the Run menu; all four run at once, in their own
kernels. Then it asserts: every kernel idle with no error output, every plotly output drawn as
SVG by JupyterLab's plotly renderer (none showing the "needs plotly.js" note), every
matplotlib image loaded, no JavaScript error on the page; in ``11`` the explorer widget
redraws on a head and a layer change and on a new text, and exercise 2's check, re-run after
that, still reads the explorer's original examples; the starter ran to its summary with every
task reported as not passed. Screenshots go to ``build/screenshots/jupyterlab-*.png``.

JupyterLab's notebook windowing is set to ``none`` for this server (every cell in the page),
so the page's DOM can be checked cell by cell.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from labkit.course.checks import STRICT_ENV
from labkit.course.exercises import check_call, starter_notebook
from labkit.course.notebooks import export_html

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
TOKEN = "labkit-browser-test"
LESSONS = ["00_welcome.ipynb", "07_efficient_attention.ipynb", "11_attention_heatmaps.ipynb"]
STARTER = "starters/ex_4_1_self_attention.ipynb"
RUN_TIMEOUT_S = 900  # a generous limit for a loaded machine; the test prints its wall time

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# JavaScript helpers (JupyterLab's application object: --LabApp.expose_app_in_browser)
PANEL = """path => Array.from(jupyterapp.shell.widgets('main'))
    .find(w => w.context && w.context.path === path)"""
STATE = f"""path => {{
  const panel = ({PANEL})(path);
  if (!panel || !panel.sessionContext.session || !panel.sessionContext.session.kernel)
    return null;
  const cells = panel.content.widgets.map(c => c.model.toJSON());
  const code = cells.filter(c => c.cell_type === 'code');
  const outputs = code.flatMap(c => c.outputs || []);
  return {{
    kernel: panel.sessionContext.session.kernel.status,
    dirty: panel.context.model.dirty,
    executed: code.filter(c => c.execution_count !== null).length,
    code: code.length,
    errors: outputs.filter(o => o.output_type === 'error')
      .map(o => o.ename + ': ' + o.evalue),
    plotly: outputs.filter(o => o.data && o.data['application/vnd.plotly.v1+json']).length,
    png: outputs.filter(o => o.data && o.data['image/png'] && !o.data['text/html']).length,
    text: outputs.map(o => o.text || (o.data && o.data['text/plain']) || '').join('\\n'),
  }};
}}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """A throwaway copy of the course: notebooks/ as shipped and one starter."""
    root = tmp_path_factory.mktemp("jupyterlab")
    course = root / "course"
    shutil.copytree(ROOT / "notebooks", course)
    (course / "starters").mkdir()
    source = ROOT / "notebooks" / "exercises" / Path(STARTER).name
    nbformat.write(starter_notebook(nbformat.read(source, as_version=4)), course / STARTER)
    return course


@pytest.fixture(scope="module")
def lab(course: Path) -> Iterator[str]:
    """JupyterLab on 127.0.0.1 with a token, serving ``course``; yields its base URL."""
    home = course.parent
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {k: v for k, v in os.environ.items() if k != STRICT_ENV and not k.startswith("JUPYTER")}
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    port = _free_port()
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--ServerApp.root_dir={course}", f"--IdentityProvider.token={TOKEN}",
        "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=False",
    ]  # fmt: skip
    if hasattr(os, "getuid") and os.getuid() == 0:
        command.append("--allow-root")
    log = (home / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; see {home / 'jupyterlab.log'}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _state(page, path: str) -> dict | None:
    return page.evaluate(f"({STATE})({json.dumps(path)})")


def _open(page, base: str, path: str) -> dict:
    """Open ``path`` in JupyterLab's main area and wait for its kernel to be idle."""
    page.evaluate(
        f"jupyterapp.commands.execute('docmanager:open', {{path: {json.dumps(path)}}})"
        ".then(() => null)"
    )
    deadline = time.monotonic() + 120
    while True:
        state = _state(page, path)
        if state and state["kernel"] == "idle":
            page.wait_for_timeout(1500)  # what JupyterLab would rewrite on open, it has by now
            return _state(page, path)
        assert time.monotonic() < deadline, f"{path}: no idle kernel after 120 s ({state})"
        page.wait_for_timeout(250)


def _activate(page, path: str) -> None:
    page.evaluate(f"jupyterapp.shell.activateById(({PANEL})({json.dumps(path)}).id); null")
    page.wait_for_timeout(300)


def _edit_parameters(page, path: str, lines: list[str]) -> None:
    """Append ``lines`` to the parameters cell, typing into its editor."""
    _activate(page, path)
    index = page.evaluate(
        f"""path => ({PANEL})(path).content.widgets.findIndex(
            c => (c.model.getMetadata('tags') || []).includes('parameters'))""",
        path,
    )
    assert index >= 0, f"{path}: no parameters cell"
    panel = page.locator(".jp-NotebookPanel:visible")
    editor = panel.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+End")
    for line in lines:
        page.keyboard.press("Enter")
        page.keyboard.type(line)
    page.keyboard.press("Escape")
    source = page.evaluate(
        f"([path, i]) => ({PANEL})(path).content.widgets[i].model.sharedModel.getSource()",
        [path, index],
    )
    for line in lines:
        assert line in source.splitlines(), f"{path}: typing {line!r} gave {source!r}"


def _run_all_from_the_menu(page, path: str) -> None:
    _activate(page, path)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def _wait_done(page, paths: list[str]) -> dict[str, dict]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        states = {path: _state(page, path) for path in paths}
        done = {
            p: s["kernel"] == "idle" and (s["executed"] == s["code"] or bool(s["errors"]))
            for p, s in states.items()
        }
        if all(done.values()):
            return states
        assert time.monotonic() < deadline, f"not finished after {RUN_TIMEOUT_S} s: {states}"
        page.wait_for_timeout(1000)


def _image_of_explorer(page) -> str:
    return page.evaluate(
        """() => { const w = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) '
             + '.labkit-explorer-widget, .jp-NotebookPanel:not(.lm-mod-hidden) .widget-vbox');
           const img = w && w.querySelector('.widget-output img');
           return img ? img.src : ''; }"""
    )


def _wait_new_image(page, before: str, what: str) -> str:
    for _ in range(120):
        now = _image_of_explorer(page)
        if now and now != before:
            return now
        page.wait_for_timeout(500)
    raise AssertionError(f"the explorer widget did not redraw after {what}")


def test_course_runs_in_jupyterlab(lab: str, course: Path, browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    foreign: list[str] = []

    def route(route) -> None:
        if route.request.url.startswith(lab):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    start = time.perf_counter()
    page.goto(f"{lab}/lab?token={TOKEN}", wait_until="load")
    page.wait_for_function("window.jupyterapp && jupyterapp.shell", timeout=120_000)
    page.evaluate("() => jupyterapp.restored.then(() => true)")
    page.wait_for_function("jupyterapp.commands.hasCommand('docmanager:open')", timeout=60_000)
    paths = [*LESSONS, STARTER]
    edits = {path: ["SMOKE = True"] for path in paths}
    edits["11_attention_heatmaps.ipynb"].append("INTERACTIVE = True")
    for path in paths:
        opened = _open(page, lab, path)
        assert not opened["dirty"], f"{path} is marked modified as soon as it is open"
        _edit_parameters(page, path, edits[path])
        _run_all_from_the_menu(page, path)
    states = _wait_done(page, paths)
    seconds = time.perf_counter() - start
    print(f"JupyterLab: opened and ran {len(paths)} notebooks in {seconds:.0f} s")

    for path in paths:
        _activate(page, path)
        state = states[path]
        shot = SCREENSHOTS / f"jupyterlab-{Path(path).stem}.png"
        assert not state["errors"], f"{path}: error outputs {state['errors']}"
        assert state["executed"] == state["code"], f"{path}: not every cell ran: {state}"
        panel = page.locator(".jp-NotebookPanel:visible")
        assert panel.locator(".labkit-plotly-missing").count() == 0, f"{path}: plotly.js note"
        drawn = 0
        for _ in range(60):  # plotly draws asynchronously
            drawn = panel.locator(".js-plotly-plot").evaluate_all(
                "els => els.filter(e => e.querySelector('svg.main-svg')).length"
            )
            if drawn >= state["plotly"]:
                break
            page.wait_for_timeout(500)
        assert drawn == state["plotly"], f"{path}: {drawn} of {state['plotly']} plotly drawn"
        images = panel.locator(".jp-RenderedImage img").evaluate_all(
            "els => els.filter(e => e.complete && e.naturalWidth > 0).length"
        )
        assert images >= state["png"], f"{path}: {images} of {state['png']} images loaded"
        page.screenshot(path=str(shot))
    for path in LESSONS:  # the full notebooks: every check passes, on the reference solution
        text = states[path]["text"]
        assert "✗" not in text and "○" not in text, f"{path}: a check did not pass"
        assert "Exercise checks: 0 passed, 0 failed, 0 not answered" in text, path
    assert states["07_efficient_attention.ipynb"]["plotly"] >= 1
    assert states["11_attention_heatmaps.ipynb"]["plotly"] >= 2
    assert all(states[p]["png"] >= 1 for p in LESSONS)

    # the starter ran to its summary: every task reported, none passed, no reference solution
    text = states[STARTER]["text"]
    assert "Exercise checks: 0 passed" in text, text[-2000:]
    summary = text[text.index("Exercise checks:") :]
    for task in ("Task 1", "Task 2", "Task 3", "Task 4"):
        assert f"{task}: " in summary and f"✓ {task}" not in summary, summary
    assert "◐" not in summary  # no reference solution in a starter

    # 11: the live explorer widget redraws on a head, a layer and a new text
    path = "11_attention_heatmaps.ipynb"
    _activate(page, path)
    widget = (
        page.locator(".jp-NotebookPanel:visible .widget-vbox")
        .filter(has=page.locator("button", has_text="run"))
        .first
    )
    widget.scroll_into_view_if_needed()
    image = _image_of_explorer(page)
    assert image, "the explorer widget shows no map"
    head = widget.locator(".widget-dropdown", has_text="head").locator("select")
    head.select_option(index=2)
    image = _wait_new_image(page, image, "a head change")
    slider = widget.locator(".widget-hslider, .widget-slider").first.locator(".noUi-handle")
    slider.focus()
    page.keyboard.press("ArrowRight")
    image = _wait_new_image(page, image, "a layer change")
    widget.locator("input[type=text]").fill("The dog chased the ball across the park.")
    widget.locator("button", has_text="run").click()
    _wait_new_image(page, image, "a new text")
    page.screenshot(path=str(SCREENSHOTS / "jupyterlab-11-widget.png"))
    # exercise 2's check reads mini_explorer.stack(example=1): still there after the new text
    cells = nbformat.read(course / path, as_version=4).cells  # the same cells, in order
    index = next(
        i
        for i, c in enumerate(cells)
        if "check" in c.metadata.get("tags", []) and check_call(c.source)[0] == "Exercise 2"
    )
    page.evaluate(
        f"""([path, i]) => {{ const panel = ({PANEL})(path);
            panel.content.activeCellIndex = i;
            return jupyterapp.commands.execute('notebook:run-cell').then(() => null); }}""",
        [path, index],
    )
    state = _wait_done(page, [path])[path]
    assert not state["errors"], state["errors"]
    output = page.evaluate(
        f"""([path, i]) => JSON.stringify(({PANEL})(path).content.widgets[i].model
            .toJSON().outputs)""",
        [path, index],
    )
    assert "Exercise 2: checked the reference solution" in output, output

    # the executed 07, saved: Jupyter Notebook 7 draws its stored figure, and so does the HTML
    # file that `labkit notebooks export` makes of it
    path = "07_efficient_attention.ipynb"
    _activate(page, path)
    page.evaluate("jupyterapp.commands.execute('docmanager:save').then(() => null)")
    page.wait_for_timeout(1000)
    saved = nbformat.read(course / path, as_version=4)
    assert any("application/vnd.plotly.v1+json" in o.get("data", {})
               for c in saved.cells for o in c.get("outputs", []))  # fmt: skip
    other = browser.new_page(viewport={"width": 1300, "height": 900})
    other_errors: list[str] = []
    other.on("pageerror", lambda error: other_errors.append(str(error)))
    other.route(  # nbconvert's page asks cdnjs for MathJax and require.js: refused, not needed
        "**/*",
        lambda r: r.continue_() if r.request.url.startswith((lab, "file:")) else r.abort(),
    )
    try:
        import notebook  # noqa: F401  (Jupyter Notebook 7: the same renderers as JupyterLab)
    except ImportError:
        print("Jupyter Notebook 7 is not installed: its check is left out")
    else:
        other.goto(f"{lab}/notebooks/{path}?token={TOKEN}", wait_until="load")
        other.wait_for_selector(".js-plotly-plot svg.main-svg", timeout=120_000)
        other.screenshot(path=str(SCREENSHOTS / "notebook7-07.png"))
        # reported, not asserted: seen once from Notebook 7's own start-up ("reading
        # 'schema'"), not from the course's outputs
        print(f"Jupyter Notebook 7 page errors: {other_errors}")
        other_errors.clear()
    exported = export_html(course / path, course.parent / "export" / "07.html")
    other.goto(exported.as_uri(), wait_until="load")
    other.wait_for_selector(".js-plotly-plot svg.main-svg", timeout=60_000)
    assert other.locator(".labkit-plotly-missing").count() == 0
    assert not other_errors, f"JavaScript errors in the exported HTML: {other_errors}"
    other.close()

    assert not errors, f"JavaScript errors: {errors}"
    assert not foreign, f"requests left 127.0.0.1: {sorted(set(foreign))}"
