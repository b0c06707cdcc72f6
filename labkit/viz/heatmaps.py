"""Pictures of attention (and of training) that survive a static book.

Heatmaps
    ``attention_heatmap(weights, tokens_q, tokens_k)`` draws one (q, k) weight matrix: a
    matplotlib ``Figure`` by default, a plotly ``Figure`` with ``interactive=True`` (hovering a
    cell shows the query token, the key token and the weight). Query and key axes are separate,
    so a cross-attention map (decoder rows, encoder columns) needs nothing special.
    ``compare_heatmaps({"trained": a, "untrained": b}, tokens)`` puts maps side by side on one
    shared colour scale; ``difference=True`` adds ``A - B`` on a diverging scale centred at 0.
    Colour maps are colour-blind safe: viridis / cividis for weights, RdBu for differences.

Head summaries
    ``head_summary_figure`` draws ``labkit.interp.head_summary`` (entropy and mean attention
    distance of every layer and head) as two layer x head heatmaps; the statistics themselves
    are in ``labkit.interp.stats``.

Training curves and confusion matrices are in ``labkit.viz.curves``.

Plotly everywhere the course is read
    Notebooks display plotly figures ONLY through ``show_plotly(fig, div_id)``. One output
    carries two representations and each front end picks the one it draws:

    * ``application/vnd.plotly.v1+json`` (the figure's JSON): JupyterLab 4 and Notebook 7
      draw it with the renderer the ``plotly`` package installs (``jupyterlab-plotly``),
      VS Code with its built-in notebook renderers. Nothing is downloaded.
    * ``text/html``: ``fig.to_html(full_html=False, include_plotlyjs=False, ...)`` with a
      fixed ``div_id``, the call guarded by ``window.Plotly``. The course book picks it (myst-nb
      ignores the plotly JSON; ``book/_config.yml`` says so explicitly) and serves plotly.js
      once per page; ``labkit notebooks export`` inlines plotly.js once per exported HTML file.
      Where nothing loads plotly.js (``jupyter nbconvert --to html``), the figure's box says so
      instead of staying blank.
    * ``text/plain``: a one-line description (terminals, ``print``).

    plotly.js is never inlined into an output and never fetched from a CDN.

The attention explorer (every layer and head, in a notebook and in the static book) is
``labkit.viz.explorer.AttentionExplorer``.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from labkit.interp.stats import head_summary, to_numpy

__all__ = [
    "attention_heatmap",
    "compare_heatmaps",
    "head_summary_figure",
    "PlotlyFigure",
    "plotly_html",
    "show_plotly",
]

DIV_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
PLOTLY_SCALES = {  # matplotlib name -> plotly name (both colour-blind safe)
    "viridis": "Viridis", "cividis": "Cividis", "magma": "Magma", "inferno": "Inferno",
    "plasma": "Plasma", "rdbu": "RdBu", "rdbu_r": "RdBu_r", "coolwarm": "RdBu_r",
    "bwr": "RdBu_r", "blues": "Blues", "greys": "Greys",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _matrix(
    weights: Any,
    tokens_q: Sequence[str] | None,
    tokens_k: Sequence[str] | None,
    name: str = "weights",
) -> tuple[np.ndarray, list[str], list[str]]:
    """Check a (q, k) map against its token lists; tokens default to positions."""
    w = to_numpy(weights, name)
    if w.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (queries, keys) matrix, got shape {tuple(w.shape)}; select "
            "one layer, example and head first, e.g. attentions[layer][0, head]"
        )
    q, k = w.shape
    tq = [str(t) for t in tokens_q] if tokens_q is not None else [str(i) for i in range(q)]
    tk = [str(t) for t in tokens_k] if tokens_k is not None else tq
    if tokens_k is None and tokens_q is None:
        tk = [str(i) for i in range(k)]
    if len(tq) != q or len(tk) != k:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)} = (queries, keys) but got {len(tq)} query "
            f"tokens and {len(tk)} key tokens"
        )
    return w, tq, tk


def _check_div_id(div_id: str) -> str:
    if not isinstance(div_id, str) or not DIV_ID.match(div_id):
        raise ValueError(
            f"div_id must be a fixed id of letters, digits, '-' and '_' starting with a letter, "
            f"got {div_id!r}"
        )
    return div_id


def _plotly_scale(cmap: str) -> str:
    return PLOTLY_SCALES.get(str(cmap).lower(), cmap)


# ---------------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------------


def _tick_step(n: int, max_labels: int = 60) -> int:
    return max(1, math.ceil(n / max_labels))


def attention_heatmap(
    weights: Any,
    tokens_q: Sequence[str] | None,
    tokens_k: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax: Any = None,
    interactive: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    div_id: str | None = None,
    colorbar: bool = True,
    xlabel: str = "key token (attended to)",
    ylabel: str = "query token (attending)",
):
    """Draw one attention map, rows = queries, columns = keys.

    Args:
        weights: (q, k) array or tensor, e.g. ``out.attentions[layer][0, head]``.
        tokens_q: q query labels; ``tokens_k`` (k key labels) defaults to ``tokens_q``. Pass
            both for cross-attention. None labels the axes by position.
        ax: draw into this matplotlib Axes (static only).
        interactive: return a plotly ``Figure`` (hover: query token, key token, weight);
            display it with ``show_plotly(fig, div_id)``.
        vmin, vmax: colour limits (default 0 and the largest weight).
        div_id: remembered on the plotly figure (``layout.meta``) for ``show_plotly``.

    Returns:
        a matplotlib ``Figure`` (static) or a plotly ``Figure`` (interactive).
    """
    w, tq, tk = _matrix(weights, tokens_q, tokens_k)
    vmin = 0.0 if vmin is None else float(vmin)
    vmax = float(max(w.max(initial=0.0), vmin + 1e-9)) if vmax is None else float(vmax)
    if interactive:
        import plotly.graph_objects as go

        q, k = w.shape
        custom = np.empty((q, k, 2), dtype=object)
        for i in range(q):
            for j in range(k):
                custom[i, j] = (tq[i], tk[j])
        fig = go.Figure(go.Heatmap(
            z=w, x=list(range(k)), y=list(range(q)), customdata=custom, zmin=vmin, zmax=vmax,
            colorscale=_plotly_scale(cmap), colorbar=dict(title="weight"),
            hovertemplate="query %{y}: %{customdata[0]}<br>key %{x}: %{customdata[1]}"
                          "<br>weight: %{z:.3f}<extra></extra>",
        ))  # fmt: skip
        # numeric axes with token tick labels: repeated tokens must stay separate rows/columns
        fig.update_xaxes(
            tickmode="array",
            tickvals=list(range(k)),
            ticktext=tk,
            title=xlabel,
            tickangle=-60,
            side="bottom",
        )
        fig.update_yaxes(
            tickmode="array",
            tickvals=list(range(q)),
            ticktext=tq,
            title=ylabel,
            autorange="reversed",
        )
        fig.update_layout(
            title=title,
            width=max(420, 60 + 22 * k),
            height=max(360, 140 + 20 * q),
            margin=dict(l=90, r=20, t=60, b=90),
        )
        if div_id is not None:
            fig.update_layout(meta={"labkit_div_id": _check_div_id(div_id)})
        return fig

    import matplotlib.pyplot as plt

    if ax is None:
        q, k = w.shape
        fig, ax = plt.subplots(
            figsize=(min(14, 2.5 + 0.32 * k), min(12, 2.0 + 0.3 * q)), constrained_layout=True
        )
    fig = ax.figure
    image = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    sq, sk = _tick_step(len(tq)), _tick_step(len(tk))
    ax.set_xticks(range(0, len(tk), sk), tk[::sk], rotation=90, fontsize=8)
    ax.set_yticks(range(0, len(tq), sq), tq[::sq], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return fig


def compare_heatmaps(
    maps: Mapping[str, Any],
    tokens_q: Sequence[str] | None,
    tokens_k: Sequence[str] | None = None,
    *,
    difference: bool = False,
    title: str | None = None,
    interactive: bool = False,
    cmap: str = "viridis",
    diff_cmap: str = "RdBu_r",
    vmax: float | None = None,
    div_id: str | None = None,
):
    """Maps side by side on ONE colour scale, e.g. ``{"trained": a, "untrained": b}``.

    Every map is (q, k) with the same tokens. ``difference=True`` (exactly two maps) adds a
    panel ``A - B`` on a diverging colour map centred at 0 (red: A larger, blue: B larger).
    Returns a matplotlib ``Figure`` or, with ``interactive=True``, a plotly ``Figure``.
    """
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty dict {name: (q, k) weights}")
    checked = {}
    for name, weights in maps.items():
        w, tq, tk = _matrix(weights, tokens_q, tokens_k, name=f"maps[{name!r}]")
        checked[str(name)] = w
    shapes = {w.shape for w in checked.values()}
    if len(shapes) != 1:
        raise ValueError(f"all maps must have one shape, got {sorted(shapes)}")
    names = list(checked)
    panels = [(n, checked[n]) for n in names]
    if difference:
        if len(names) != 2:
            raise ValueError(f"difference=True needs exactly two maps, got {len(names)}: {names}")
        panels.append((f"{names[0]} - {names[1]}", checked[names[0]] - checked[names[1]]))
    top = float(max(w.max(initial=0.0) for w in checked.values())) if vmax is None else vmax
    top = max(top, 1e-9)
    diff_lim = max(float(np.abs(panels[-1][1]).max(initial=0.0)), 1e-9) if difference else 1.0

    if interactive:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        q, k = next(iter(shapes))
        fig = make_subplots(
            rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.08
        )
        for c, (name, w) in enumerate(panels, start=1):
            is_diff = difference and c == len(panels)
            custom = np.empty((q, k, 2), dtype=object)
            for i in range(q):
                for j in range(k):
                    custom[i, j] = (tq[i], tk[j])
            fig.add_trace(go.Heatmap(
                z=w, x=list(range(k)), y=list(range(q)), customdata=custom,
                coloraxis="coloraxis2" if is_diff else "coloraxis", name=name,
                hovertemplate=f"{html.escape(name)}<br>query %{{y}}: %{{customdata[0]}}<br>"
                              "key %{x}: %{customdata[1]}<br>weight: %{z:.3f}<extra></extra>",
            ), row=1, col=c)  # fmt: skip
            fig.update_xaxes(
                tickmode="array",
                tickvals=list(range(k)),
                ticktext=tk,
                tickangle=-60,
                title="key token",
                row=1,
                col=c,
            )
            fig.update_yaxes(
                tickmode="array",
                tickvals=list(range(q)),
                ticktext=tq,
                autorange="reversed",
                row=1,
                col=c,
            )
        fig.update_yaxes(title="query token", row=1, col=1)
        layout = dict(
            title=title, width=max(500, len(panels) * (80 + 18 * k)), height=max(380, 160 + 18 * q),
            coloraxis=dict(colorscale=_plotly_scale(cmap), cmin=0, cmax=top,
                           colorbar=dict(title="weight", x=1.02)),
        )  # fmt: skip
        if difference:
            layout["coloraxis2"] = dict(
                colorscale=_plotly_scale(diff_cmap),
                cmin=-diff_lim,
                cmax=diff_lim,
                colorbar=dict(title="A - B", x=1.12),
            )
        fig.update_layout(**layout)
        if div_id is not None:
            fig.update_layout(meta={"labkit_div_id": _check_div_id(div_id)})
        return fig

    import matplotlib.pyplot as plt

    q, k = next(iter(shapes))
    width = min(6.0, 1.8 + 0.3 * k)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(width * len(panels), min(10, 2.2 + 0.3 * q)),
        constrained_layout=True,
        squeeze=False,
    )
    axes = axes[0]
    first_image = None
    for c, (name, w) in enumerate(panels):
        is_diff = difference and c == len(panels) - 1
        if is_diff:
            attention_heatmap(
                w,
                tq,
                tk,
                ax=axes[c],
                vmin=-diff_lim,
                vmax=diff_lim,
                cmap=diff_cmap,
                title=name,
                colorbar=False,
            )
            fig.colorbar(axes[c].images[0], ax=axes[c], shrink=0.8, label="difference A - B")
        else:
            attention_heatmap(
                w, tq, tk, ax=axes[c], vmin=0, vmax=top, cmap=cmap, title=name, colorbar=False
            )
            first_image = axes[c].images[0]
        if c:
            axes[c].set_ylabel("")
    n_maps = len(names)
    fig.colorbar(first_image, ax=list(axes[:n_maps]), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


PLOTLY_MIME = "application/vnd.plotly.v1+json"
PLOTLY_MISSING = (
    "This interactive plotly figure needs plotly.js, which this page does not load. It is "
    "drawn in JupyterLab, Jupyter Notebook 7, VS Code and the course book; to save a notebook "
    "as an HTML file that draws it, use <code>labkit notebooks export</code>."
)


def _div_id_of(fig: Any, div_id: str | None) -> str:
    if div_id is None:
        meta = fig.layout.meta
        div_id = meta.get("labkit_div_id") if isinstance(meta, dict) else None
        if div_id is None:
            raise ValueError("show_plotly needs a fixed div_id, e.g. show_plotly(fig, 'nb11-map')")
    return _check_div_id(div_id)


def plotly_html(fig: Any, div_id: str | None = None) -> str:
    """The book-safe HTML fragment of ``show_plotly`` (no plotly.js, no MathJax, fixed div id).

    The ``Plotly.newPlot`` call runs only where the page has loaded plotly.js; elsewhere a
    short note replaces the empty box (class ``labkit-plotly-missing``).
    """
    div_id = _div_id_of(fig, div_id)
    fragment = fig.to_html(
        full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=div_id
    )
    guard = f'if (document.getElementById("{div_id}")) {{'
    if fragment.count(guard) != 1:  # plotly changed its template: fail loudly, not blank
        raise RuntimeError(f"unexpected plotly HTML (no single {guard!r}); plotly changed?")
    guarded = f'if (document.getElementById("{div_id}") && window.Plotly) {{'
    fragment = fragment.replace(guard, guarded)
    note = json.dumps(f'<p class="labkit-plotly-missing" style="color:#555">{PLOTLY_MISSING}</p>')
    return (
        f"{fragment}<script>if (!window.Plotly) {{ var labkitDiv = "
        f'document.getElementById("{div_id}"); if (labkitDiv) {{ labkitDiv.style.height = "auto"; '
        f"labkitDiv.innerHTML = {note}; }} }}</script>"
    )


class PlotlyFigure:
    """What ``show_plotly`` returns: one plotly figure with one representation per front end.

    ``_repr_mimebundle_`` gives ``application/vnd.plotly.v1+json`` (live front ends),
    ``text/html`` (``plotly_html``: the book, exported HTML) and ``text/plain``. ``html`` (also
    ``data``, as ``IPython.display.HTML`` had) is the HTML fragment; ``figure`` the plotly figure.
    """

    def __init__(self, fig: Any, div_id: str) -> None:
        self.figure, self.div_id = fig, div_id
        self.html = plotly_html(fig, div_id)

    @property
    def data(self) -> str:
        return self.html

    def plotly_json(self) -> dict[str, Any]:
        """The figure as plotly's JSON (``data``, ``layout``) plus the display ``config``."""
        spec = json.loads(self.figure.to_json())
        spec["config"] = {"responsive": True}
        return spec

    def __repr__(self) -> str:
        title = self.figure.layout.title.text
        return f"<plotly figure {self.div_id!r}{f': {title}' if title else ''}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {PLOTLY_MIME: self.plotly_json(), "text/html": self.html, "text/plain": repr(self)}


def show_plotly(fig: Any, div_id: str | None = None) -> PlotlyFigure:
    """Display a plotly figure so that every front end of the course draws it.

    Returns a ``PlotlyFigure``: plotly's own JSON for JupyterLab, Notebook 7 and VS Code, and
    the book-safe HTML of ``plotly_html`` (no plotly.js, fixed ``div_id``, unique in the book)
    for the static book and exported HTML. Use it as a cell's last expression (or pass it to
    ``display``). ``div_id`` defaults to the one remembered by ``attention_heatmap(...,
    div_id=...)``; raises ValueError when there is none or it is not a valid HTML id.
    """
    return PlotlyFigure(fig, _div_id_of(fig, div_id))


# ---------------------------------------------------------------------------------------------
# Head summaries
# ---------------------------------------------------------------------------------------------


def head_summary_figure(
    attentions: Any,
    *,
    attention_mask: Any = None,
    batch_index: int = 0,
    title: str | None = None,
    interactive: bool = False,
    div_id: str | None = None,
):
    """Two layer x head heatmaps: mean entropy (nats) and mean attention distance (tokens).

    Low entropy = a focused head; small distance = a local head. Returns a matplotlib or (with
    ``interactive=True``) a plotly ``Figure``.
    """
    table = head_summary(attentions, attention_mask=attention_mask, batch_index=batch_index)
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    ent = table["entropy"].to_numpy().reshape(n_layers, n_heads)
    dist = table["distance"].to_numpy().reshape(n_layers, n_heads)
    title = title or "Per-head entropy and attention distance"
    if interactive:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=["entropy (nats)", "distance (tokens)"])
        for c, (z, scale, name, bar_x) in enumerate(
            [(ent, "Viridis", "entropy", 0.44), (dist, "Cividis", "distance", 1.0)], start=1
        ):
            fig.add_trace(go.Heatmap(
                z=z, colorscale=scale, colorbar=dict(x=bar_x, title=name),
                hovertemplate=f"layer %{{y}}, head %{{x}}<br>{name}: %{{z:.3f}}<extra></extra>",
            ), row=1, col=c)  # fmt: skip
            fig.update_xaxes(title="head", dtick=1, row=1, col=c)
            fig.update_yaxes(title="layer", dtick=1, autorange="reversed", row=1, col=c)
        fig.update_layout(title=title, height=max(320, 120 + 22 * n_layers))  # width: the page's
        if div_id is not None:
            fig.update_layout(meta={"labkit_div_id": _check_div_id(div_id)})
        return fig

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        2,
        figsize=(min(16, 4 + 0.9 * n_heads), min(12, 2 + 0.3 * n_layers)),
        constrained_layout=True,
    )
    for ax, z, cmap, label in [
        (axes[0], ent, "viridis", "mean entropy (nats)"),
        (axes[1], dist, "cividis", "mean attention distance (tokens)"),
    ]:
        image = ax.imshow(z, cmap=cmap, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=label)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        step = _tick_step(n_layers, 32)
        ax.set_yticks(range(0, n_layers, step))
        ax.set_title(label, fontsize=10)
    fig.suptitle(title)
    return fig
