"""``AttentionExplorer``: every layer and head of a labkit model, live and in a static book.

``AttentionExplorer(model, tokenizer, text)`` runs any labkit model (``GPT``, ``Llama``,
``BertEncoder`` and its task heads, the encoder-decoder ``Transformer``) on a text or a
padded batch of texts and keeps every layer's weights of the real (unpadded) tokens.

* ``explorer.widget()``: an ipywidgets UI (example, attention type, layer slider, head
  dropdown with "all heads", query-token highlight, a text box and button to re-run on a
  new text). It needs a live kernel.
* ``explorer.to_html()``: a self-contained client-side view: the weights (rounded to 3
  decimals) as JSON, a few kB of inline vanilla JavaScript that draws an inline SVG, no
  network access, no CDN. Displaying the explorer (``explorer`` as a cell's last line)
  emits this HTML plus a PNG fallback (``explorer.to_png()``), so the static book shows a
  working view without a kernel.
* ``explorer.figure(...)`` / ``explorer.to_png(...)``: the same view in matplotlib.

DOM contract of ``to_html()`` (``V`` is the ``view_id``; ids are ``labkit-explorer-V-...``)

    ``div#labkit-explorer-V``            root, attribute ``data-labkit-explorer="V"``; its
                                         attributes ``data-example``, ``data-attention``,
                                         ``data-layer`` (the model's layer number),
                                         ``data-head`` (a number or ``all``), ``data-token``
                                         (highlighted query index, ``-1`` for none) and
                                         ``data-draws`` (a counter) are updated on every draw.
    ``script#labkit-explorer-V-data``    ``type="application/json"``: the precomputed weights.
    ``select#labkit-explorer-V-example`` which text of the batch (hidden if only one).
    ``select#labkit-explorer-V-attention`` attention type: ``self``, or ``encoder``,
                                         ``decoder``, ``cross`` (hidden if only one).
    ``input#labkit-explorer-V-layer``    ``type="range"``: index into the stored layers;
                                         ``span#labkit-explorer-V-layer-value`` shows the layer.
    ``select#labkit-explorer-V-head``    ``all`` (grid of every head) or ``0`` .. ``H-1``.
    ``select#labkit-explorer-V-token``   ``-1`` or a query index: that row is outlined and the
                                         other rows are dimmed.
    ``div#labkit-explorer-V-plot``       holds ``svg#labkit-explorer-V-svg`` (redrawn on every
                                         ``input``/``change`` event of the controls); its
                                         ``data-layer``/``data-head`` repeat the state; each
                                         cell is a ``rect`` with ``data-q``, ``data-k``,
                                         ``data-w`` (the weight) and a ``title`` tooltip
                                         "query -> key: weight". In the all-heads grid each
                                         head is a ``g`` with ``data-head``; clicking it
                                         selects that head.
    ``div#labkit-explorer-V-legend``     the colour scale (0 to the largest weight shown).
    ``div#labkit-explorer-V-note``       truncation and padding notes.

    Several explorers may share a page as long as their ``view_id`` differ.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labkit.device import model_device
from labkit.nn.masks import pad_sequences
from labkit.viz.heatmaps import attention_heatmap

__all__ = ["AttentionExplorer", "display_token", "model_kind"]

VIEW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

ATTENTION_LABELS = {
    "self": "self-attention",
    "encoder": "encoder self-attention",
    "decoder": "decoder self-attention (causal)",
    "cross": "cross-attention (decoder -> encoder)",
}
KINDS = ("encoder", "decoder", "encoder-decoder")


def display_token(token: str) -> str:
    """A token as a readable axis label: newlines and tabs shown, blanks as a visible mark."""
    shown = token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\u0120", " ")
    shown = shown.strip()
    return shown if shown else "\u2423"


def model_kind(model: nn.Module) -> str:
    """ "encoder" (BERT family), "decoder" (GPT, Llama) or "encoder-decoder" (Transformer).

    Raises ValueError for a model that cannot return attention weights.
    """
    from labkit.models import GPT, BertEncoder, Llama, Transformer

    if isinstance(model, Transformer):
        return "encoder-decoder"
    if isinstance(model, (GPT, Llama)):
        return "decoder"
    if isinstance(model, BertEncoder) or isinstance(getattr(model, "bert", None), BertEncoder):
        return "encoder"
    raise ValueError(
        f"{type(model).__name__} is not a labkit attention model: AttentionExplorer needs a "
        "GPT, Llama, BertEncoder (or a Bert task head) or Transformer, whose forward accepts "
        "need_weights=True"
    )


class _TokenizerAdapter:
    """One interface over labkit tokenizers, Hugging Face tokenizers and no tokenizer (ids)."""

    def __init__(self, tokenizer: Any) -> None:
        from labkit.data.tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self.is_labkit = isinstance(tokenizer, Tokenizer)
        if tokenizer is not None and not self.is_labkit and not callable(tokenizer):
            raise ValueError(
                f"tokenizer must be a labkit tokenizer, a Hugging Face tokenizer or None, got "
                f"{type(tokenizer).__name__}"
            )

    @property
    def pad_id(self) -> int:
        if self.tokenizer is None:
            return 0
        if self.is_labkit:
            return self.tokenizer.pad_id
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("text needs a tokenizer; pass token ids as a tensor instead")
        if self.is_labkit:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return str(token_id)
        return self.tokenizer.decode([int(token_id)])

    @property
    def bos_id(self) -> int | None:
        if self.is_labkit:
            return self.tokenizer.bos_id
        return getattr(self.tokenizer, "bos_token_id", None)


class AttentionExplorer:
    """Every layer's and head's attention of a labkit model on a text, to browse.

    Args:
        model: ``GPT``, ``Llama``, ``BertEncoder`` (or ``BertForSequenceClassification``,
            ``BertForMaskedLM``, ``BertForQuestionAnswering``) or ``Transformer``.
        tokenizer: a labkit tokenizer, a Hugging Face tokenizer, or None when ``text`` is ids.
        text: a str, a list of str (a padded batch; padding is removed from every map), or a
            (T,) / (B, T) tensor of token ids (then ``attention_mask`` may mark padding).
        kind: "auto" (from the model's class), "encoder", "decoder" or "encoder-decoder".
        target: encoder-decoder only: the target text(s), teacher-forced as ``<bos> target``;
            None generates greedily (up to ``max_new_tokens``) and shows what the model wrote.
        view_id: identifies this view's HTML elements (``labkit-explorer-<view_id>-...``);
            unique per page, letters, digits, ``-`` and ``_``.
        max_tokens: longer inputs are truncated to this many tokens (with a note) so the
            HTML view stays small; ``layers`` keeps only these layers (default all).
        add_special_tokens: default True for Hugging Face tokenizers, for labkit tokenizers
            True for encoders (``<bos>`` plays [CLS]) and False otherwise.

    Attributes: ``kind``, ``attention_types`` (``["self"]`` or ``["encoder", "decoder",
    "cross"]``), ``examples``: one dict per text with ``label``, ``maps`` {type: (tokens_q,
    tokens_k, weights (L, H, q, k) numpy float32)}, and ``notes``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        text: str | Sequence[str] | Tensor,
        *,
        kind: str = "auto",
        target: str | Sequence[str] | None = None,
        attention_mask: Tensor | None = None,
        view_id: str = "explorer",
        max_tokens: int = 48,
        layers: Sequence[int] | None = None,
        max_new_tokens: int = 24,
        add_special_tokens: bool | None = None,
        title: str | None = None,
    ) -> None:
        detected = model_kind(model)
        if kind != "auto":
            if kind not in KINDS:
                raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
            if kind != detected:
                raise ValueError(f"kind={kind!r} but {type(model).__name__} is a {detected} model")
        if not isinstance(view_id, str) or not VIEW_ID.match(view_id):
            raise ValueError(
                f"view_id must be letters, digits, '-' and '_' (it names HTML ids), got {view_id!r}"
            )
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model, self.kind, self.view_id = model, detected, view_id
        self.tok = _TokenizerAdapter(tokenizer)
        self.max_tokens, self.max_new_tokens = int(max_tokens), int(max_new_tokens)
        self.layer_ids_requested = None if layers is None else [int(i) for i in layers]
        if add_special_tokens is None:
            add_special_tokens = not self.tok.is_labkit or detected == "encoder"
        self.add_special_tokens = bool(add_special_tokens)
        self.title = title
        self.attention_types = (
            ["self"] if detected != "encoder-decoder" else ["encoder", "decoder", "cross"]
        )
        self._controls: dict[str, Any] = {}
        self.run(text, target=target, attention_mask=attention_mask)

    # --- computing ---------------------------------------------------------------------------

    def _encode(self, text: Any, attention_mask: Any, add_special: bool):
        """-> ids (B, T) long, mask (B, T) long, notes; truncated to max_tokens."""
        notes = []
        if isinstance(text, Tensor):
            ids = text.detach().long().cpu()
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2:
                raise ValueError(f"token ids must be (T,) or (B, T), got shape {tuple(text.shape)}")
            if attention_mask is None:
                mask = torch.ones_like(ids)
            else:
                mask = torch.as_tensor(attention_mask).long().cpu()
                if mask.dim() == 1:
                    mask = mask[None]
                if mask.shape != ids.shape:
                    raise ValueError(
                        f"attention_mask {tuple(mask.shape)} must match the ids {tuple(ids.shape)}"
                    )
            rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a str, a non-empty list of str, or a tensor of ids")
            rows = [self.tok.encode(t, add_special) for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("a text encodes to zero tokens; nothing to attend to")
        for b, r in enumerate(rows):
            if len(r) > self.max_tokens:
                notes.append(
                    f"example {b}: truncated from {len(r)} to the first "
                    f"{self.max_tokens} tokens (max_tokens)"
                )
                rows[b] = r[: self.max_tokens]
        ids, mask = pad_sequences(rows, self.tok.pad_id)
        if len(rows) > 1 and (mask == 0).any():
            notes.append("padded batch: padding positions are removed from every map")
        return ids, mask, notes

    def _labels(self, ids: Tensor, mask: Tensor) -> list[list[str]]:
        return [
            [self.tok.token(i) for i in ids[b][mask[b].bool()].tolist()]
            for b in range(ids.shape[0])
        ]

    def _select_layers(self, stack: list[Tensor], name: str) -> tuple[list[int], list[Tensor]]:
        n = len(stack)
        wanted = list(range(n)) if self.layer_ids_requested is None else self.layer_ids_requested
        bad = [i for i in wanted if not -n <= i < n]
        if bad:
            raise ValueError(f"layers {bad} out of range for the {n} {name} layers")
        wanted = [i % n for i in wanted]
        return wanted, [stack[i] for i in wanted]

    @torch.no_grad()
    def run(self, text: Any, target: Any = None, attention_mask: Any = None) -> AttentionExplorer:
        """(Re)compute every map for a new text (and target); returns self."""
        model = self.model
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            ids, mask, notes = self._encode(text, attention_mask, self.add_special_tokens)
            labels = self._labels(ids, mask)
            ids_d, mask_d = ids.to(device), mask.to(device)
            per_type: dict[
                str, tuple[list[list[str]], list[list[str]], list[Tensor], Tensor, Tensor]
            ] = {}
            if self.kind in ("encoder", "decoder"):
                out = model(ids_d, attention_mask=mask_d, need_weights=True)
                per_type["self"] = (labels, labels, out.attentions, mask, mask)
            else:
                tgt_ids, tgt_mask = self._targets(ids_d, mask_d, target, notes)
                encoded = model.encoder_output(ids_d, mask_d, need_weights=True)
                out = model.decode(
                    tgt_ids.to(device),
                    encoded.memory,
                    src_mask=mask_d,
                    tgt_mask=tgt_mask.to(device),
                    need_weights=True,
                )
                tgt_labels = self._labels(tgt_ids.cpu(), tgt_mask.cpu())
                per_type["encoder"] = (labels, labels, encoded.attentions, mask, mask)
                per_type["decoder"] = (
                    tgt_labels,
                    tgt_labels,
                    out.self_attentions,
                    tgt_mask.cpu(),
                    tgt_mask.cpu(),
                )
                per_type["cross"] = (tgt_labels, labels, out.cross_attentions, tgt_mask.cpu(), mask)
        finally:
            model.train(was_training)

        self.layer_ids: dict[str, list[int]] = {}
        examples = []
        texts = [text] if isinstance(text, str) else text
        for b in range(ids.shape[0]):
            label = texts[b] if not isinstance(texts, Tensor) else f"example {b}"
            examples.append({"label": str(label), "maps": {}})
        for name, (lab_q, lab_k, weights, mq, mk) in per_type.items():
            if weights is None or any(w is None for w in weights):
                raise ValueError(f"{type(model).__name__} returned no {name} attention weights")
            layer_ids, chosen = self._select_layers(list(weights), name)
            self.layer_ids[name] = layer_ids
            stack = torch.stack([w.detach().float().cpu() for w in chosen], 1)  # (B, L, H, q, k)
            for b in range(ids.shape[0]):
                rq, rk = mq[b].bool(), mk[b].bool()
                w = stack[b][:, :, rq][:, :, :, rk].numpy().astype(np.float32)
                examples[b]["maps"][name] = (lab_q[b], lab_k[b], w)
        self.examples, self.notes = examples, notes
        self.text, self.target = text, target
        for note in notes:
            if "truncated" in note:
                warnings.warn(note, stacklevel=2)
        return self

    def with_text(
        self, text: Any, target: Any = None, attention_mask: Any = None
    ) -> AttentionExplorer:
        """A new explorer of the same model and settings on another text; ``self`` is unchanged.

        The widget's "run" button uses it, so the examples that a notebook (or an exercise
        check) reads from ``self`` stay what they were, however often a reader re-runs the view.
        """
        view = copy.copy(self)
        view._controls = {}
        return view.run(text, target=target, attention_mask=attention_mask)

    def _targets(self, src: Tensor, src_mask: Tensor, target: Any, notes: list[str]):
        """Decoder input ``<bos> y`` (B, T) and its mask, teacher-forced or generated."""
        config = self.model.config
        if target is None:
            from labkit.generation import generate

            gen = generate(
                self.model, src, attention_mask=src_mask, max_new_tokens=self.max_new_tokens
            )
            rows = []
            for r in gen.new_tokens.cpu().tolist():
                rows.append(r[: r.index(config.eos_id)] if config.eos_id in r else r)
            notes.append("decoder input: <bos> + the model's greedy output")
        else:
            targets = [target] if isinstance(target, str) else list(target)
            if len(targets) != src.shape[0]:
                raise ValueError(f"got {len(targets)} targets for {src.shape[0]} source texts")
            rows = [self.tok.encode(t, False) for t in targets]
        rows = [[config.bos_id, *r][: self.max_tokens] for r in rows]
        return pad_sequences(rows, config.pad_id or 0)

    # --- access ------------------------------------------------------------------------------

    def _check_view(self, example: int, attention: str | None, layer: int | None):
        if not 0 <= example < len(self.examples):
            raise ValueError(f"example {example} out of range: {len(self.examples)} examples")
        attention = attention or self.attention_types[-1]
        if attention not in self.attention_types:
            raise ValueError(f"attention must be one of {self.attention_types}, got {attention!r}")
        tq, tk, w = self.examples[example]["maps"][attention]
        ids = self.layer_ids[attention]
        if layer is None:
            layer = ids[0]
        if layer not in ids:
            raise ValueError(f"layer {layer} is not stored; stored {attention} layers: {ids}")
        return tq, tk, w, ids.index(layer), attention

    def weights(
        self, layer: int, head: int | None = None, *, example: int = 0, attention: str | None = None
    ) -> np.ndarray:
        """(q, k) map of one head, or (H, q, k) for ``head=None``; ``layer`` is the model's."""
        _, _, w, li, _ = self._check_view(example, attention, layer)
        if head is None:
            return w[li]
        if not 0 <= head < w.shape[1]:
            raise ValueError(f"head {head} out of range: the model has {w.shape[1]} heads")
        return w[li, head]

    def tokens(self, *, example: int = 0, attention: str | None = None):
        """(query tokens, key tokens) of an example's map, as the model's token strings."""
        tq, tk, _, _, _ = self._check_view(example, attention, None)
        return tq, tk

    def stack(self, *, example: int = 0, attention: str | None = None) -> np.ndarray:
        """All stored layers (L, H, q, k) of one example."""
        return self._check_view(example, attention, None)[2]

    # --- static pictures ---------------------------------------------------------------------

    def figure(
        self,
        layer: int | None = None,
        head: int | None = None,
        *,
        example: int = 0,
        attention: str | None = None,
        token: int | None = None,
    ):
        """A matplotlib Figure: one head, or (``head=None``) a grid of every head."""
        import matplotlib.pyplot as plt

        tq, tk, w, li, attention = self._check_view(example, attention, layer)
        layer = self.layer_ids[attention][li]
        lq, lk = [display_token(t) for t in tq], [display_token(t) for t in tk]
        name = ATTENTION_LABELS[attention]
        if head is not None:
            fig = attention_heatmap(
                self.weights(layer, head, example=example, attention=attention),
                lq,
                lk,
                title=f"{name}: layer {layer}, head {head}",
            )
            axes = [fig.axes[0]]
        else:
            n_heads = w.shape[1]
            cols = min(n_heads, 4)
            rows = math.ceil(n_heads / cols)
            size = min(3.2, 0.6 + 0.12 * len(tk))
            fig, grid = plt.subplots(
                rows,
                cols,
                figsize=(size * cols + 1, size * rows + 0.6),
                constrained_layout=True,
                squeeze=False,
            )
            top = float(max(w[li].max(), 1e-9))
            axes = []
            for h, ax in enumerate(grid.ravel()):
                if h >= n_heads:
                    ax.axis("off")
                    continue
                ax.imshow(
                    w[li, h],
                    cmap="viridis",
                    vmin=0,
                    vmax=top,
                    aspect="auto",
                    interpolation="nearest",
                )
                ax.set_title(f"head {h}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                axes.append(ax)
            fig.colorbar(
                grid.ravel()[0].images[0],
                ax=list(grid.ravel()),
                shrink=0.6,
                label="attention weight",
            )
            fig.suptitle(f"{name}: layer {layer}, all heads (one colour scale)")
        if token is not None:
            if not 0 <= token < len(tq):
                raise ValueError(f"token {token} out of range: {len(tq)} query tokens")
            from matplotlib.patches import Rectangle

            for ax in axes:
                ax.add_patch(
                    Rectangle(
                        (-0.5, token - 0.5), len(tk), 1, fill=False, edgecolor="red", linewidth=1.5
                    )
                )
        return fig

    def to_png(
        self,
        layer: int | None = None,
        head: int | None = None,
        *,
        example: int = 0,
        attention: str | None = None,
        dpi: int = 80,
    ) -> bytes:
        """The ``figure`` as PNG bytes (the fallback where no JavaScript runs)."""
        import matplotlib.pyplot as plt

        fig = self.figure(layer, head, example=example, attention=attention)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        plt.close(fig)
        return buffer.getvalue()

    # --- client-side HTML --------------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        """The JSON the HTML view embeds: weights as integers in thousandths (3 decimals)."""
        types = []
        for name in self.attention_types:
            w = self.examples[0]["maps"][name][2]
            types.append(
                {
                    "key": name,
                    "label": ATTENTION_LABELS[name],
                    "layers": self.layer_ids[name],
                    "heads": int(w.shape[1]),
                }
            )
        examples = []
        for ex in self.examples:
            maps = {}
            for name, (tq, tk, w) in ex["maps"].items():
                milli = np.rint(np.clip(w, 0, 1) * 1000).astype(np.int64)  # (L, H, q, k)
                maps[name] = {
                    "q": [display_token(t) for t in tq],
                    "k": [display_token(t) for t in tk],
                    "w": [[m.ravel().tolist() for m in layer] for layer in milli],
                }
            examples.append({"label": ex["label"][:80], "maps": maps})
        return {
            "id": self.view_id,
            "title": self.title or "",
            "types": types,
            "examples": examples,
            "notes": list(self.notes),
        }

    def to_html(self, *, png_fallback: bool = False) -> str:
        """A self-contained HTML view (no external resources); see the module's DOM contract.

        ``png_fallback`` adds the PNG (base64) inside ``<noscript>`` for readers without
        JavaScript (it roughly doubles the size).
        """
        vid = self.view_id
        pre = f"labkit-explorer-{vid}"
        data = json.dumps(self.payload(), separators=(",", ":"), ensure_ascii=True)
        data = data.replace("</", "<\\/")  # never close the <script> early
        first = self.examples[0]["maps"]
        default_type = self.attention_types[-1]
        n_layers = len(self.layer_ids[default_type])
        n_heads = first[default_type][2].shape[1]
        q_tokens = first[default_type][0]
        style_sel = "font:12px sans-serif;margin-right:10px"
        hide_ex = "" if len(self.examples) > 1 else "display:none;"
        hide_ty = "" if len(self.attention_types) > 1 else "display:none;"
        opts_ex = "".join(
            f'<option value="{i}">{html.escape(e["label"][:40])}</option>'
            for i, e in enumerate(self.examples)
        )
        opts_ty = "".join(
            f'<option value="{t}"{" selected" if t == default_type else ""}>'
            f"{html.escape(ATTENTION_LABELS[t])}</option>"
            for t in self.attention_types
        )
        opts_head = '<option value="all">all heads</option>' + "".join(
            f'<option value="{h}">head {h}</option>' for h in range(n_heads)
        )
        opts_tok = '<option value="-1">none</option>' + "".join(
            f'<option value="{i}">{i}: {html.escape(display_token(t))}</option>'
            for i, t in enumerate(q_tokens)
        )
        fallback = ""
        if png_fallback:
            png = base64.b64encode(self.to_png()).decode("ascii")
            fallback = (
                f'<noscript><img alt="attention map" src="data:image/png;base64,{png}"></noscript>'
            )
        title = ""
        if self.title:
            title = (
                "<div style='font:bold 13px sans-serif;margin:4px 0'>"
                f"{html.escape(self.title)}</div>"
            )
        layer0 = self.layer_ids[default_type][0]
        return (
            f'<div id="{pre}" class="labkit-explorer" data-labkit-explorer="{vid}" '
            f'data-example="0" data-attention="{default_type}" data-layer="{layer0}" '
            f'data-head="all" data-token="-1" data-draws="0" '
            f'style="border:1px solid #ccc;padding:6px;margin:4px 0;overflow-x:auto">'
            f"{title}"
            f'<div style="margin-bottom:4px">'
            f'<label style="{hide_ex}{style_sel}">text <select id="{pre}-example">{opts_ex}'
            f"</select></label>"
            f'<label style="{hide_ty}{style_sel}">attention <select id="{pre}-attention">'
            f"{opts_ty}</select></label>"
            f'<label style="{style_sel}">layer <input type="range" id="{pre}-layer" min="0" '
            f'max="{n_layers - 1}" step="1" value="0"> <span id="{pre}-layer-value">{layer0}'
            f"</span></label>"
            f'<label style="{style_sel}">head <select id="{pre}-head">{opts_head}</select></label>'
            f'<label style="{style_sel}">highlight query <select id="{pre}-token">{opts_tok}'
            f"</select></label></div>"
            f'<div id="{pre}-plot"></div><div id="{pre}-legend" style="font:11px sans-serif">'
            f'</div><div id="{pre}-note" style="font:11px sans-serif;color:#555"></div>{fallback}'
            f'<script type="application/json" id="{pre}-data">{data}</script>'
            f"<script>{_EXPLORER_JS.replace('__PREFIX__', pre)}</script></div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {
            "text/html": self.to_html(),
            "image/png": base64.b64encode(self.to_png()).decode("ascii"),
            "text/plain": repr(self),
        }

    def __repr__(self) -> str:
        shapes = {t: self.examples[0]["maps"][t][2].shape for t in self.attention_types}
        return (
            f"AttentionExplorer({type(self.model).__name__}, kind={self.kind!r}, "
            f"examples={len(self.examples)}, maps (L, H, q, k) of example 0: {shapes})"
        )

    # --- ipywidgets ----------------------------------------------------------------------------

    def widget(self):
        """An ipywidgets UI: example, attention type, layer slider, head (or all heads),
        query-token highlight, and a text box + button to run the model on a new text. Needs a
        kernel; the widgets are kept in ``self.controls`` (tests drive them by setting values).

        "run" shows a new explorer (``with_text``), kept in ``self.widget_view``: ``self``'s own
        examples never change, so code that reads them (an exercise's check) gives the same
        answer before and after a reader plays with the widget."""
        import ipywidgets as w
        import matplotlib.pyplot as plt
        from IPython.display import display

        first_text = (
            self.text
            if isinstance(self.text, str)
            else (self.text[0] if isinstance(self.text, (list, tuple)) else "")
        )
        c = {
            "example": w.Dropdown(description="text"),
            "attention": w.Dropdown(description="attention"),
            "layer": w.SelectionSlider(description="layer", options=[0]),
            "head": w.Dropdown(description="head"),
            "token": w.Dropdown(description="highlight"),
            "text": w.Text(value=first_text, description="new text", layout=w.Layout(width="60%")),
            "run": w.Button(description="run"),
            "output": w.Output(),
            "status": w.HTML(),
        }
        self._controls = c
        self.widget_view = self
        busy = {"on": False}

        def refill(*_):
            busy["on"] = True
            try:
                view = self.widget_view
                c["example"].options = [(e["label"][:40], i) for i, e in enumerate(view.examples)]
                c["example"].value = 0
                c["attention"].options = [(ATTENTION_LABELS[t], t) for t in view.attention_types]
                c["attention"].value = view.attention_types[-1]
                refill_view()
            finally:
                busy["on"] = False

        def refill_view():
            view = self.widget_view
            attention = c["attention"].value or view.attention_types[-1]
            ex = c["example"].value or 0
            tq, _, w_, _, _ = view._check_view(ex, attention, None)
            layer, head, token = c["layer"].value, c["head"].value, c["token"].value
            c["layer"].options = view.layer_ids[attention]
            c["layer"].value = (
                layer if layer in view.layer_ids[attention] else view.layer_ids[attention][0]
            )
            c["head"].options = [("all heads", -1)] + [(f"head {h}", h) for h in range(w_.shape[1])]
            c["head"].value = head if head is not None and head < w_.shape[1] else -1
            c["token"].options = [("none", -1)] + [
                (f"{i}: {display_token(t)}", i) for i, t in enumerate(tq)
            ]
            c["token"].value = token if token is not None and token < len(tq) else -1

        def redraw(*_):
            if busy["on"]:
                return
            head = c["head"].value
            token = c["token"].value
            fig = self.widget_view.figure(
                c["layer"].value,
                None if head in (None, -1) else head,
                example=c["example"].value or 0,
                attention=c["attention"].value,
                token=None if token in (None, -1) else token,
            )
            self.last_view = dict(
                example=c["example"].value,
                attention=c["attention"].value,
                layer=c["layer"].value,
                head=head,
                token=token,
            )
            with c["output"]:
                c["output"].clear_output(wait=True)
                display(fig)
            plt.close(fig)

        def on_type(*_):
            if busy["on"]:
                return
            busy["on"] = True
            try:
                refill_view()
            finally:
                busy["on"] = False
            redraw()

        def on_run(*_):
            try:
                target = None
                self.widget_view = self.with_text(c["text"].value, target=target)
                c["status"].value = ""
            except ValueError as err:
                c["status"].value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
                return
            refill()
            redraw()

        refill()
        c["example"].observe(on_type, names="value")
        c["attention"].observe(on_type, names="value")
        for name in ("layer", "head", "token"):
            c[name].observe(redraw, names="value")
        c["run"].on_click(on_run)
        c["text"].observe(lambda change: None, names="value")
        redraw()
        row1 = w.HBox([c["example"], c["attention"]])
        row2 = w.HBox([c["layer"], c["head"], c["token"]])
        row3 = w.HBox([c["text"], c["run"]])
        return w.VBox([row1, row2, row3, c["status"], c["output"]])

    @property
    def controls(self) -> dict[str, Any]:
        """The widgets of the last ``widget()`` call, by name."""
        return self._controls


# The static view's JavaScript is package data (labkit/viz/explorer.js), read once: it ships in
# the wheel, and an editor shows it as JavaScript. "__PREFIX__" stands for the view's id.
_EXPLORER_JS = "\n" + resources.files("labkit.viz").joinpath("explorer.js").read_text("utf-8")
