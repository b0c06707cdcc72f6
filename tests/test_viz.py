"""labkit.viz: heatmaps, head summaries, rollout, training and confusion-matrix helpers."""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from labkit import interp, viz  # noqa: E402

CDN = re.compile(r"cdn|unpkg|jsdelivr|cdnjs|require\.js|https?://(?!www\.w3\.org/2000/svg)", re.I)


pytestmark = pytest.mark.usefixtures("close_figures")


def softmax_rows(n_q, n_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_q, n_k, generator=g).softmax(-1)


# --- heatmaps ------------------------------------------------------------------------------------


def test_static_heatmap_axes_and_labels():
    w = softmax_rows(3, 4)
    fig = viz.attention_heatmap(w, ["a", "b", "c"], ["w", "x", "y", "z"], title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w", "x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "t" and "key" in ax.get_xlabel() and "query" in ax.get_ylabel()
    assert np.allclose(ax.images[0].get_array(), w.numpy())
    assert ax.images[0].get_cmap().name == "viridis"


def test_static_heatmap_into_given_axes_and_defaults():
    fig, ax = plt.subplots()
    out = viz.attention_heatmap(np.eye(3), ["a", "b", "a"], ax=ax, colorbar=False)
    assert out is fig and len(fig.axes) == 1
    assert ax.images[0].get_clim() == (0.0, 1.0)


def test_interactive_heatmap_hover_and_repeated_tokens():
    w = softmax_rows(3, 2)
    fig = viz.attention_heatmap(
        w, ["the", "cat", "the"], ["x", "y"], interactive=True, title="cross"
    )
    trace = fig.data[0]
    assert trace.type == "heatmap" and np.allclose(np.asarray(trace.z), w.numpy())
    # repeated "the" keeps two rows: numeric axes with token tick labels
    assert list(fig.layout.yaxis.ticktext) == ["the", "cat", "the"]
    assert list(fig.layout.xaxis.ticktext) == ["x", "y"]
    assert tuple(np.asarray(trace.customdata)[2, 1]) == ("the", "y")
    assert "customdata[0]" in trace.hovertemplate and "customdata[1]" in trace.hovertemplate
    assert "%{z:.3f}" in trace.hovertemplate


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        viz.attention_heatmap(np.zeros((2, 3, 4)), None)
    with pytest.raises(ValueError, match=r"\(3, 4\).*3 query tokens and 3 key tokens"):
        viz.attention_heatmap(np.zeros((3, 4)), ["a", "b", "c"])


def test_show_plotly_has_no_cdn_and_fixed_div():
    fig = viz.attention_heatmap(np.eye(2), ["a", "b"], interactive=True)
    html = viz.show_plotly(fig, "nb11-test-map").data
    assert 'id="nb11-test-map"' in html
    assert "<script src=" not in html and not CDN.search(html)
    assert "MathJax" not in html.split("Plotly.newPlot")[0]
    fig2 = viz.attention_heatmap(np.eye(2), ["a", "b"], interactive=True, div_id="remembered")
    assert 'id="remembered"' in viz.plotly_html(fig2)
    assert viz.show_plotly(fig2).div_id == "remembered"
    with pytest.raises(ValueError, match="div_id"):
        viz.show_plotly(fig)
    with pytest.raises(ValueError, match="div_id"):
        viz.show_plotly(fig, "bad id")


# One output, one representation per front end (labkit.viz "Plotly everywhere ...").

ROOT = Path(__file__).resolve().parents[1]
PLOTLY_JS_BANNER = "* plotly.js v"  # the first lines of plotly.min.js


def _figure_bundle(div_id: str = "nb-test-map") -> tuple[object, dict]:
    weights = np.array([[1.0, 0.0], [0.25, 0.75]])
    fig = viz.attention_heatmap(weights, ["a", "b"], interactive=True)
    return fig, viz.show_plotly(fig, div_id)._repr_mimebundle_()


def test_live_front_ends_get_plotlys_own_json():
    """JupyterLab 4, Notebook 7 and VS Code draw application/vnd.plotly.v1+json themselves."""
    fig, bundle = _figure_bundle()
    spec = json.loads(json.dumps(bundle[viz.PLOTLY_MIME]))  # what the kernel sends
    assert spec["data"][0]["type"] == "heatmap"
    z = spec["data"][0]["z"]
    if isinstance(z, dict):  # plotly >= 6: numpy arrays travel as typed arrays
        shape = [int(n) for n in str(z.get("shape", "-1")).split(",")]
        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
    assert np.allclose(z, [[1.0, 0.0], [0.25, 0.75]])
    assert spec["layout"] == json.loads(fig.to_json())["layout"]
    assert spec["config"] == {"responsive": True}


def test_jupyterlab_has_plotlys_renderer_installed():
    """The plotly package installs the JupyterLab / Notebook 7 renderer of its MIME type."""
    package = Path(sys.prefix) / "share/jupyter/labextensions/jupyterlab-plotly/package.json"
    assert package.is_file(), f"no jupyterlab-plotly extension at {package}"
    meta = json.loads(package.read_text())
    assert meta["jupyterlab"]["mimeExtension"], meta["jupyterlab"]


def test_the_book_picks_the_html_and_it_loads_nothing():
    """myst-nb's priority for the html builder, with the book's overrides, picks text/html:
    the plotly JSON is never rendered, and the HTML carries no plotly.js and no URL."""
    import yaml  # jupyter-book's dependencies (the book extra CI installs): imported, not skipped
    from myst_nb.core import render as myst_render
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())["sphinx"]["config"]
    priority = dict(myst_render.base_render_priority()["html"])
    for builder, mime, rank in config["nb_mime_priority_overrides"]:
        if builder == "html":
            priority[mime] = rank
    _, bundle = _figure_bundle()
    shown = [mime for mime in bundle if priority.get(mime) is not None]
    assert min(shown, key=priority.__getitem__) == "text/html", shown
    assert priority.get(viz.PLOTLY_MIME) is None
    html = bundle["text/html"]
    assert "Plotly.newPlot(" in html  # what book/_ext looks for to serve plotly.js
    assert "window.Plotly" in html and PLOTLY_JS_BANNER not in html and not CDN.search(html)
    assert len(html) < 20_000


def test_exported_html_inlines_plotly_js_once(tmp_path: Path):
    """nbconvert keeps the text/html; labkit's export adds plotly.js once per file."""
    import nbformat
    from nbconvert import HTMLExporter

    from labkit.course.notebooks import export_html

    cells = [nbformat.v4.new_markdown_cell("# two figures")]
    for div_id in ("nb-test-a", "nb-test-b"):
        cell = nbformat.v4.new_code_cell("show_plotly(fig)")
        cell.outputs = [nbformat.v4.new_output("display_data", data=_figure_bundle(div_id)[1])]
        cells.append(cell)
    notebook = tmp_path / "figures.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), notebook)
    plain, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(notebook, 4))
    assert plain.count("Plotly.newPlot(") == 2 and PLOTLY_JS_BANNER not in plain
    assert "labkit notebooks export" in plain  # the note shown where plotly.js is missing
    exported = export_html(notebook, tmp_path / "out" / "figures.html").read_text()
    assert exported.count("Plotly.newPlot(") == 2
    assert exported.count(PLOTLY_JS_BANNER) == 1
    assert exported.index(PLOTLY_JS_BANNER) < exported.index("</head>")
    empty = tmp_path / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells[:1]), empty)
    assert PLOTLY_JS_BANNER not in export_html(empty, tmp_path / "empty.html").read_text()


def test_text_front_ends_get_a_description():
    fig = viz.attention_heatmap(np.eye(2), ["a", "b"], interactive=True, title="A map")
    shown = viz.show_plotly(fig, "nb-test-text")
    assert shown._repr_mimebundle_()["text/plain"] == repr(shown)
    assert "nb-test-text" in repr(shown)


def test_compare_heatmaps_shared_scale_and_difference():
    a, b = softmax_rows(4, 4, 0), softmax_rows(4, 4, 1)
    tokens = list("abcd")
    fig = viz.compare_heatmaps({"trained": a, "untrained": b}, tokens, difference=True)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    top = float(max(a.max(), b.max()))
    assert images[0].get_clim() == images[1].get_clim() == pytest.approx((0, top))
    lo, hi = images[2].get_clim()
    assert lo == pytest.approx(-hi) and hi == pytest.approx(float((a - b).abs().max()))
    assert np.allclose(images[2].get_array(), (a - b).numpy())
    assert images[2].get_cmap().name == "RdBu_r"
    with pytest.raises(ValueError, match="exactly two"):
        viz.compare_heatmaps({"a": a, "b": b, "c": a}, tokens, difference=True)
    with pytest.raises(ValueError, match="one shape"):
        viz.compare_heatmaps({"a": a, "b": b[:3]}, None)


def test_compare_heatmaps_interactive_shares_coloraxis():
    a, b = softmax_rows(2, 3, 0), softmax_rows(2, 3, 1)
    fig = viz.compare_heatmaps(
        {"A": a, "B": b},
        ["p", "q"],
        ["x", "y", "z"],
        difference=True,
        interactive=True,
        div_id="cmp",
    )
    assert [t.coloraxis for t in fig.data] == ["coloraxis", "coloraxis", "coloraxis2"]
    assert fig.layout.coloraxis.cmax == pytest.approx(float(max(a.max(), b.max())))
    assert fig.layout.coloraxis2.cmin == pytest.approx(-fig.layout.coloraxis2.cmax)
    assert 'id="cmp"' in viz.plotly_html(fig)


# --- head summaries ------------------------------------------------------------------------------


def test_entropy_uniform_is_log_k_and_one_hot_is_zero():
    k = 7
    uniform = np.full((3, 5, k), 1 / k)  # (H, q, k)
    assert np.allclose(interp.head_entropy(uniform), math.log(k))
    one_hot = np.zeros((2, 5, k))
    one_hot[..., 3] = 1
    assert np.allclose(interp.head_entropy(one_hot), 0.0)
    assert interp.head_entropy(np.full((4, 2, 5, k), 1 / k)).shape == (4, 2)


def test_entropy_query_mask():
    w = np.stack([np.full(4, 0.25), np.eye(4)[0]])  # (2 queries, 4 keys)
    assert interp.head_entropy(w, query_mask=[True, False]) == pytest.approx(math.log(4))
    assert interp.head_entropy(w, query_mask=[False, True]) == pytest.approx(0.0)


def test_mean_attention_distance():
    t = 6
    prev = np.zeros((t, t))
    prev[0, 0] = 1
    prev[np.arange(1, t), np.arange(t - 1)] = 1
    assert interp.mean_attention_distance(prev) == pytest.approx((t - 1) / t)
    assert interp.mean_attention_distance(np.eye(t)) == pytest.approx(0.0)
    first = np.zeros((t, t))
    first[:, 0] = 1
    assert interp.mean_attention_distance(first) == pytest.approx(np.mean(np.arange(t)))
    # a KV cache: 2 new queries over 5 keys sit at positions 3 and 4
    cached = np.zeros((2, 5))
    cached[:, 0] = 1
    assert interp.mean_attention_distance(cached) == pytest.approx(3.5)


def test_head_summary_and_figure():
    atts = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(4)]  # 4 layers, B=2, H=3
    table = interp.head_summary(atts)
    assert list(table.columns) == ["layer", "head", "entropy", "distance"] and len(table) == 12
    assert np.isclose(table.entropy.iloc[4], interp.head_entropy(atts[1][0, 1].numpy()))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = interp.head_summary(atts, attention_mask=mask)
    assert np.isclose(
        masked.distance.iloc[0], interp.mean_attention_distance(atts[0][0, 0, :3, :3].numpy())
    )
    fig = viz.head_summary_figure(atts, title="entropy")
    assert [a.get_xlabel() for a in fig.axes[:2]] == ["head", "head"]
    assert fig.axes[0].images[0].get_array().shape == (4, 3)
    pfig = viz.head_summary_figure(atts, interactive=True, div_id="hs")
    assert len(pfig.data) == 2
    with pytest.raises(ValueError, match="need_weights"):
        interp.head_summary([None, None])


def test_rollout_rows_sum_to_one_and_identity_chain():
    atts = [torch.softmax(torch.randn(1, 2, 6, 6), -1) for _ in range(3)]
    r = interp.attention_rollout(atts)
    assert r.shape == (6, 6) and np.allclose(r.sum(-1), 1.0)
    # identity attention in every layer -> identity rollout
    eye = [torch.eye(4).expand(1, 2, 4, 4) for _ in range(3)]
    assert np.allclose(interp.attention_rollout(eye), np.eye(4))
    assert np.allclose(interp.attention_rollout(eye, add_residual=False), np.eye(4))
    # without the residual it is the plain product A3 A2 A1 of head-averaged maps
    mean = [a[0].mean(0).numpy() for a in atts]
    rollout = interp.attention_rollout(atts, add_residual=False)
    assert np.allclose(rollout, mean[2] @ mean[1] @ mean[0])
    # with it, each factor is 0.5 A + 0.5 I
    half = [0.5 * m + 0.5 * np.eye(6) for m in mean]
    assert np.allclose(r, half[2] @ half[1] @ half[0])
    with pytest.raises(ValueError, match="square"):
        interp.attention_rollout([torch.softmax(torch.randn(1, 2, 3, 5), -1)])


# --- training curves and confusion matrices ------------------------------------------------------


def test_plot_training_curves():
    history = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "train_loss": [2.0, 1.5, 1.0, 0.8],
            "eval_loss": [np.nan, 1.6, np.nan, 1.1],
            "lr": [1e-3, 2e-3, 2e-3, 1e-3],
        }
    )
    fig = viz.plot_training_curves(history)
    ax, lr_ax = fig.axes  # the metrics, and the learning rate on a twin axis
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"train_loss", "eval_loss"}
    assert list(lines["eval_loss"].get_xdata()) == [2, 4]  # NaNs skipped
    assert lines["eval_loss"].get_marker() == "o" and lines["train_loss"].get_marker() == "None"
    assert ax.get_title() == "train_loss fell from 2 to 0.8 in 4 steps"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("optimizer step", "loss (nats)")
    assert list(lr_ax.get_lines()[0].get_ydata()) == [1e-3, 2e-3, 2e-3, 1e-3]
    assert lr_ax.get_ylabel() == "learning rate"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train_loss", "eval_loss", "lr"]
    assert len(viz.plot_training_curves(history, lr=False).axes) == 1

    rising = history.assign(train_loss=history["train_loss"][::-1].to_numpy())
    fig2 = viz.plot_training_curves({"a": history, "b": rising}, ["train_loss"], x="epoch")
    ax2 = fig2.axes[0]
    assert [line.get_label() for line in ax2.get_lines()] == ["a: train_loss", "b: train_loss"]
    assert [line.get_label() for line in fig2.axes[1].get_lines()] == ["a: lr", "b: lr"]
    # with several runs each lr line takes the colour of its run's loss curve
    assert [line.get_color() for line in fig2.axes[1].get_lines()] == [
        line.get_color() for line in ax2.get_lines()
    ]
    # no "epoch" column: the row number stands in for it
    assert ax2.get_title() == "a: train_loss fell from 2 to 0.8 by epoch 3"

    pfig = viz.plot_training_curves(history, interactive=True, div_id="curves")
    assert [(t.name, t.yaxis or "y") for t in pfig.data] == [
        ("train_loss", "y"),
        ("eval_loss", "y"),
        ("lr", "y2"),
    ]
    assert list(pfig.data[1].y) == [1.6, 1.1] and pfig.layout.yaxis2.overlaying == "y"
    assert pfig.layout.meta["labkit_div_id"] == "curves"
    assert list(viz.plot_training_curves({"loss": [3, 2, 1]}, interactive=True).data[0].y) == [
        3,
        2,
        1,
    ]
    with pytest.raises(ValueError, match="not in history"):
        viz.plot_training_curves(history, ["accuracy"])
    with pytest.raises(ValueError, match="history is empty"):
        viz.plot_training_curves(history.iloc[:0])
    plt.close("all")


def test_confusion_matrix_figure():
    y_true = ["neg", "neg", "pos", "pos", "pos"]
    y_pred = ["neg", "pos", "pos", "pos", "neg"]
    fig = viz.confusion_matrix_figure(y_true, y_pred, ["neg", "pos"])
    assert fig.labkit_counts.tolist() == [[1, 1], [1, 2]]
    ax = fig.axes[0]
    assert "60.0%" in ax.get_title()
    assert np.allclose(ax.images[0].get_array(), [[0.5, 0.5], [1 / 3, 2 / 3]])
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    pfig = viz.confusion_matrix_figure(
        torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["a", "b"], interactive=True
    )
    assert pfig.layout.meta["counts"] == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="entries"):
        viz.confusion_matrix_figure([0, 1], [0], ["a", "b"])
