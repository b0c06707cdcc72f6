"""A local Sphinx extension that keeps the course book self-contained (no CDN, ever).

* MathJax 3: copied from the ``sphinx-mathjax-offline`` package (MathJax 3.2.2, installed by the
  ``book`` extra) into ``_static/mathjax``; ``_config.yml`` points ``mathjax_path`` at it.
* plotly.js: copied once from the installed ``plotly`` package into ``_static/plotly.min.js``
  and loaded, blocking, in the ``<head>`` of exactly the pages that draw a plotly figure (the
  notebooks emit figures through ``labkit.viz.show_plotly`` with ``include_plotlyjs=False``).
* sphinx-thebe: the book has no launch buttons, so thebe's page script is not added at all
  (with sphinx-book-theme it declares ``THEBE_JS_URL`` twice: a console error on every page).
* The API reference: labkit's docstrings are written to be read as plain text (aligned columns,
  ``|i - j|``), and not all of them are valid reStructuredText. A docstring that docutils
  parses without a complaint is rendered as reST; any other is shown exactly as written, in a
  literal block, instead of as garbled reST with build warnings.
"""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

PLOTLY_JS = "plotly.min.js"
PLOTLY_CALL = "Plotly.newPlot("
SPHINX_ROLE = re.compile(r":(?:[\w-]+:)?[\w-]+:(?=`)")  # :func:`x`, :py:class:`x`


def mathjax_source() -> Path:
    """The MathJax 3 folder inside the installed ``sphinx-mathjax-offline`` package."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise ExtensionError(
            "MathJax is served from the book itself: pip install sphinx-mathjax-offline "
            "(part of labkit's 'book' extra)"
        )
    return Path(spec.origin).parent / "static" / "mathjax"


def plotly_source() -> Path:
    """``plotly.min.js`` as shipped inside the installed ``plotly`` Python package."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def _copy_assets(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    shutil.copytree(mathjax_source(), static / "mathjax", dirs_exist_ok=True)
    shutil.copy2(plotly_source(), static / PLOTLY_JS)


def _is_thebe(script: Any) -> bool:
    """sphinx-thebe's two scripts: its inline config (``const THEBE_JS_URL = ...``) and loader."""
    name = str(getattr(script, "filename", script) or "")
    body = str(getattr(script, "attributes", {}).get("body", ""))
    return "thebe" in name or "THEBE_JS_URL" in body


def _page_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """Per page: drop sphinx-thebe; add plotly.js where the body calls ``Plotly.newPlot``."""
    scripts = context.get("script_files")
    if scripts is not None:  # the builder's own list, restored after this page
        scripts[:] = [script for script in scripts if not _is_thebe(script)]
    if PLOTLY_CALL in context.get("body", ""):
        # priority < 200: before Sphinx's own scripts; no async/defer, so the inline figure
        # scripts further down the page find ``Plotly`` defined.
        app.add_js_file(PLOTLY_JS, priority=100)


def is_clean_rest(text: str) -> bool:
    """Whether plain docutils parses ``text`` without a warning (Sphinx roles count as valid)."""
    from docutils.core import publish_doctree

    stream = io.StringIO()
    settings = {
        "report_level": 2,  # collect warnings and errors
        "halt_level": 5,  # never raise on them
        "warning_stream": stream,
        "file_insertion_enabled": False,
        "raw_enabled": False,
    }
    try:
        publish_doctree(SPHINX_ROLE.sub("", text), settings_overrides=settings)
    except Exception:  # e.g. a Sphinx-only directive that needs a build environment
        return False
    return not stream.getvalue()


def _docstring_as_written_unless_rest(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if not any(line.strip() for line in lines) or is_clean_rest("\n".join(lines)):
        return
    lines[:] = ["::", "", *(f"    {line}" if line.strip() else "" for line in lines), ""]


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("build-finished", _copy_assets)
    app.connect("html-page-context", _page_scripts)
    # after napoleon (priority 500), which turns "Args:" sections into reST fields
    app.connect("autodoc-process-docstring", _docstring_as_written_unless_rest, priority=600)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
