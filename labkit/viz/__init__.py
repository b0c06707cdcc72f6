"""Visualisation that survives a static book.

``heatmaps`` (attention heatmaps, side-by-side comparisons, head-summary figures, and
``show_plotly``, the one way notebooks display plotly figures), ``curves`` (training curves
and confusion matrices) and ``explorer`` (``AttentionExplorer``: every layer and head of any
labkit model, as a widget in a notebook and as a self-contained view in the book). Every name
is re-exported here, e.g. ``from labkit.viz import attention_heatmap, AttentionExplorer``.
"""

from labkit.viz.curves import (
    confusion_matrix_figure,
    plot_training_curves,
)
from labkit.viz.explorer import (
    AttentionExplorer,
    display_token,
    model_kind,
)
from labkit.viz.heatmaps import (
    PLOTLY_MIME,
    PlotlyFigure,
    attention_heatmap,
    compare_heatmaps,
    head_summary_figure,
    plotly_html,
    show_plotly,
)

__all__ = [
    "PLOTLY_MIME",
    "AttentionExplorer",
    "PlotlyFigure",
    "attention_heatmap",
    "compare_heatmaps",
    "confusion_matrix_figure",
    "display_token",
    "head_summary_figure",
    "model_kind",
    "plot_training_curves",
    "plotly_html",
    "show_plotly",
]
