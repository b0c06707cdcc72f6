"""Pictures of training and evaluation: loss and metric curves, confusion matrices.

``plot_training_curves(history)`` (the one training-curve plot: a ``Trainer.history``
DataFrame, a dict of lists, a list of records or several runs by name, with the learning rate
on a twin axis) and ``confusion_matrix_figure(y_true, y_pred, labels)``; both draw with
matplotlib by default and plotly with ``interactive=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from labkit.viz.heatmaps import _check_div_id, _plotly_scale


def _history_frame(history: Any):
    import pandas as pd

    if isinstance(history, pd.DataFrame):
        frame = history
    elif isinstance(history, Mapping):
        lengths = {k: len(v) for k, v in history.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"history columns must have one length, got {lengths}")
        frame = pd.DataFrame(dict(history))
    elif isinstance(history, Sequence) and history and isinstance(history[0], Mapping):
        frame = pd.DataFrame(list(history))
    else:
        raise ValueError(
            "history must be a DataFrame (Trainer.history), a dict of equal-length lists or a "
            f"list of dicts, got {type(history).__name__}"
        )
    if frame.empty:
        raise ValueError("history is empty")
    return frame


def plot_training_curves(
    history: Any,
    columns: Sequence[str] | None = None,
    *,
    x: str = "step",
    lr: bool = True,
    title: str | None = None,
    ax: Any = None,
    logy: bool = False,
    ylabel: str | None = None,
    interactive: bool = False,
    div_id: str | None = None,
):
    """Plot metrics of one or several training histories against ``x``, the lr on a twin axis.

    history: ``Trainer.history`` (DataFrame), a dict of lists or a list of dicts; to compare
    runs, a dict ``{"run name": history}`` of DataFrames (each run's curves are labelled
    ``"run name: column"``). ``columns`` default to every column with "loss" in its name.
    Evaluation columns are only filled on evaluation steps: NaNs are skipped and such sparse
    series are drawn with markers. With ``lr`` and an ``lr`` column, the learning rate is drawn
    dashed against a second y axis on the right. The default title states the result, e.g.
    "train_loss fell from 2.4 to 0.31 in 500 steps". Returns a matplotlib ``Figure`` (its first
    axes hold the metrics) or, with ``interactive=True``, a plotly ``Figure``.
    """
    import pandas as pd

    if (
        isinstance(history, Mapping)
        and history
        and all(isinstance(v, pd.DataFrame) for v in history.values())
    ):
        frames = [(f"{name}: ", _history_frame(h)) for name, h in history.items()]
    else:
        frames = [("", _history_frame(history))]
    series, lr_series = [], []
    for prefix, frame in frames:
        first = len(series)  # this run's first curve: its lr line takes the same colour
        if x not in frame:
            frame = frame.reset_index(drop=True).rename_axis(x).reset_index()
        cols = list(columns) if columns is not None else [c for c in frame if "loss" in str(c)]
        if not cols:
            raise ValueError(f"no columns to plot; pass columns=..., history has {list(frame)}")
        missing = [c for c in cols if c not in frame]
        if missing:
            raise ValueError(f"columns {missing} not in history; it has {list(frame)}")
        for c in cols:
            points = frame[[x, c]].dropna()
            sparse = len(points) < len(frame)
            series.append((f"{prefix}{c}", points[x].to_numpy(), points[c].to_numpy(), sparse))
        if lr and "lr" in frame:
            points = frame[[x, "lr"]].dropna()
            lr_series.append((f"{prefix}lr", points[x].to_numpy(), points["lr"].to_numpy(), first))
    if title is None:
        title = _trend_title(series[0], x)
    ylabel = ylabel or ("loss (nats)" if all("loss" in s[0] for s in series) else "value")
    xlabel = "optimizer step" if x == "step" else x
    if interactive:
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, xs, ys, sparse in series:
            fig.add_trace(
                go.Scatter(x=xs, y=ys, name=name, mode="lines+markers" if sparse else "lines")
            )
        for name, xs, ys, _ in lr_series:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=name, yaxis="y2", line={"dash": "dash"}))
        fig.update_layout(
            title=title,
            xaxis_title=xlabel,
            yaxis_title=ylabel,
            yaxis_type="log" if logy else None,
            width=720,
            height=420,
        )
        if lr_series:
            fig.update_layout(
                yaxis2={"title": "learning rate", "overlaying": "y", "side": "right"},
                legend={"x": 1.12},
            )
        if div_id is not None:
            fig.update_layout(meta={"labkit_div_id": _check_div_id(div_id)})
        return fig

    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    fig = ax.figure
    lines = [
        ax.plot(xs, ys, marker="o" if sparse else None, markersize=3, label=name)[0]
        for name, xs, ys, sparse in series
    ]
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr_series:
        lr_ax = ax.twinx()
        for name, xs, ys, first in lr_series:
            color = "gray" if len(frames) == 1 else lines[first].get_color()
            lr_ax.plot(xs, ys, color=color, linestyle="--", linewidth=1, label=name)
        lr_ax.set_ylabel("learning rate")
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="best")
    return fig


def _trend_title(series: tuple, x: str) -> str:
    """ "train_loss fell from 2.4 to 0.31 in 500 steps" for the first curve drawn."""
    name, xs, ys, _ = series
    if not len(ys):
        return f"{name}: no values"
    trend = "fell" if ys[-1] < ys[0] else "rose"
    span = f"in {xs[-1]:g} steps" if x == "step" else f"by {x} {xs[-1]:g}"
    return f"{name} {trend} from {ys[0]:.3g} to {ys[-1]:.3g} {span}"


def confusion_matrix_figure(
    y_true: Any,
    y_pred: Any,
    labels: Sequence[Any],
    *,
    normalize: bool = True,
    title: str | None = None,
    ax: Any = None,
    cmap: str = "cividis",
    interactive: bool = False,
    div_id: str | None = None,
):
    """Confusion matrix: rows = true class, columns = predicted class.

    ``y_true``/``y_pred`` hold class indices 0..C-1 or values from ``labels`` (C names).
    ``normalize`` colours each row by its share (recall per class) and writes counts and
    shares in the cells. The default title states the accuracy. Returns a matplotlib or
    plotly ``Figure``; the counts are in ``fig.labkit_counts`` (matplotlib) or
    ``fig.layout.meta["counts"]`` (plotly).
    """
    labels = list(labels)
    if not labels:
        raise ValueError("labels must name at least one class")
    yt, yp = list(np.asarray(_seq(y_true)).ravel()), list(np.asarray(_seq(y_pred)).ravel())
    if len(yt) != len(yp):
        raise ValueError(f"y_true has {len(yt)} entries but y_pred has {len(yp)}")

    def index(v: Any) -> int:
        if v in labels:
            return labels.index(v)
        if isinstance(v, (int, np.integer)) and 0 <= int(v) < len(labels):
            return int(v)
        raise ValueError(
            f"label {v!r} is neither in labels {labels} nor an index below {len(labels)}"
        )

    n = len(labels)
    counts = np.zeros((n, n), dtype=int)
    for t, p in zip(yt, yp, strict=True):
        counts[index(t), index(p)] += 1
    shares = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    accuracy = np.trace(counts) / max(1, counts.sum())
    title = title or f"accuracy {accuracy:.1%} on {counts.sum()} examples"
    z = shares if normalize else counts
    names = [str(v) for v in labels]
    text = [[f"{counts[i, j]}<br>{shares[i, j]:.0%}" for j in range(n)] for i in range(n)]
    if interactive:
        import plotly.graph_objects as go

        fig = go.Figure(go.Heatmap(
            z=z, x=list(range(n)), y=list(range(n)), colorscale=_plotly_scale(cmap), text=text,
            texttemplate="%{text}", zmin=0, zmax=1 if normalize else None,
            hovertemplate="true %{y}, predicted %{x}<br>%{text}<extra></extra>",
        ))  # fmt: skip
        fig.update_xaxes(
            tickmode="array", tickvals=list(range(n)), ticktext=names, title="predicted class"
        )
        fig.update_yaxes(
            tickmode="array",
            tickvals=list(range(n)),
            ticktext=names,
            title="true class",
            autorange="reversed",
        )
        meta = {"counts": counts.tolist()}
        if div_id is not None:
            meta["labkit_div_id"] = _check_div_id(div_id)
        fig.update_layout(
            title=title, width=max(400, 120 + 60 * n), height=max(360, 120 + 50 * n), meta=meta
        )
        return fig

    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(2.5 + 0.8 * n, 2.2 + 0.7 * n), constrained_layout=True)
    fig = ax.figure
    image = ax.imshow(z, cmap=cmap, vmin=0, vmax=1 if normalize else None)
    bar_label = "share of the true class" if normalize else "count"
    fig.colorbar(image, ax=ax, shrink=0.8, label=bar_label)
    for i in range(n):
        for j in range(n):
            light = (z[i, j] / (z.max() or 1)) < 0.5
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{shares[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if light else "black",
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.labkit_counts = counts
    return fig


def _seq(values: Any) -> Any:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return list(values) if not isinstance(values, np.ndarray) else values
