"""Normalisation, feed-forward and the two Transformer layers built from them.

Symbols used in shapes: B = batch size, T = sequence length (S for the encoder memory seen
by a decoder), D = ``d_model``, F = ``d_ff`` (the feed-forward width).

What is here:

* ``LayerNorm`` (its formula in the docstring, run by PyTorch's fused kernel) and ``RMSNorm``
  (written out, as Llama computes it);
* ``FeedForward``, the position-wise MLP (ReLU, GELU or Llama's SwiGLU);
* ``EncoderLayer`` (self-attention + feed-forward) and ``DecoderLayer`` (masked
  self-attention + cross-attention over the encoder memory + feed-forward), both returning a
  ``LayerOutput``, with ``from_torch`` to copy weights from PyTorch's own layers.

Each sublayer (attention or feed-forward) sits inside a residual connection. Where the norm
goes is the one real design choice:

* post-LN (the 2017 paper, BERT, ``norm_first=False``):  ``x = Norm(x + Sublayer(x))``
* pre-LN  (GPT-2, Llama, ``norm_first=True``):          ``x = x + Sublayer(Norm(x))``

Pre-LN keeps an untouched path from input to output (a layer whose sublayers output zero is
the identity), which is why deep stacks of it train stably even without learning-rate
warm-up (Xiong et al., 2020).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.nn.attention import AttentionOutput, MultiHeadAttention, _check_input
from labkit.nn.cache import DecoderLayerCache, KVCache
from labkit.nn.hooks import HookPoint, run_hook

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layer", "rms")


def _check_last_dim(name: str, x: Tensor, d_model: int) -> None:
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name} expects input of shape (..., d_model={d_model}), got {tuple(x.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Normalisation


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension (Ba et al., 2016).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the mean and the biased variance
    taken over the D features of each position, so every token is rescaled on its own.
    Statistics are computed in at least float32, so fp16/bf16 inputs stay accurate.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., D) -> (..., D), normalised per position.

        The formula above, with the mean and the biased variance (divide by D) of each row,
        runs as PyTorch's fused ``F.layer_norm``: one pass over x forward and one backward
        instead of seven elementwise operations each way, a fifth of a small GPT's training
        step on a CPU (``benchmarks/nanogpt_char.py``). tests/test_layers.py checks it against
        the formula written out.
        """
        _check_last_dim("LayerNorm", x, self.d_model)
        dtype = torch.promote_types(x.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        h = F.layer_norm(x.to(dtype), (self.d_model,), self.weight.to(dtype), bias, self.eps)
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich, 2019), as used by Llama.

    ``y = x / sqrt(mean(x**2) + eps) * weight``: LayerNorm without centring and without a
    bias, cheaper and in practice just as good. Like Llama, the normalisation is computed in
    (at least) float32 and cast back to the input dtype before the weight is applied.
    """

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., D) -> (..., D), normalised per position."""
        _check_last_dim("RMSNorm", x, self.d_model)
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


def _make_norm(norm: str, d_model: int, eps: float, bias: bool) -> nn.Module:
    if norm == "layer":
        return LayerNorm(d_model, eps=eps, bias=bias)
    if norm == "rms":
        return RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# ----------------------------------------------------------------------------------------------
# Feed-forward


class FeedForward(nn.Module):
    """The position-wise MLP: widen to F, apply a non-linearity, project back to D.

    * ``"relu"``, ``"gelu"``, ``"gelu_tanh"``: ``down_proj(dropout(act(up_proj(x))))``
      (the 2017 paper uses ReLU, BERT GELU, GPT-2 the tanh approximation of GELU);
    * ``"swiglu"`` (Llama): ``down_proj(dropout(silu(gate_proj(x)) * up_proj(x)))``, a gated
      unit whose third matrix ``gate_proj`` decides, per feature, how much of ``up_proj`` passes.
      Llama has no biases: use ``bias=False`` to match it.

    Submodules carry Llama's names so checkpoints map onto them in one line each:

    ==============  ===========  ============  =====================  =================
    labkit          Llama        torch layers  GPT-2                  BERT
    ==============  ===========  ============  =====================  =================
    ``up_proj``     up_proj      linear1       mlp.c_fc (transposed)  intermediate.dense
    ``down_proj``   down_proj    linear2       mlp.c_proj (transp.)   output.dense
    ``gate_proj``   gate_proj    --            --                     --
    ==============  ===========  ============  =====================  =================
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d_model = d_model
        self.activation = activation
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, T, D) or any (..., D) -> same shape."""
        _check_last_dim("FeedForward", x, self.d_model)
        if self.gate_proj is not None:  # swiglu
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., F)
        elif self.activation == "relu":
            h = F.relu(self.up_proj(x))
        elif self.activation == "gelu":
            h = F.gelu(self.up_proj(x))
        else:  # gelu_tanh
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(self.dropout(h))


# ----------------------------------------------------------------------------------------------
# Encoder and decoder layers


class LayerOutput(NamedTuple):
    """What ``EncoderLayer`` and ``DecoderLayer`` return.

    hidden: (B, T, D) the layer's output.
    self_weights: (B, H, T, T) self-attention weights (T, past + T with a cache), or None
        unless ``need_weights=True``.
    cross_weights: (B, H, T, S) decoder cross-attention weights over the memory, or None
        (always None for an encoder layer).
    """

    hidden: Tensor
    self_weights: Tensor | None
    cross_weights: Tensor | None


def _torch_activation_name(activation: object) -> str:
    """The labkit name of the activation a torch Transformer layer holds."""
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if isinstance(activation, nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    raise ValueError(f"from_torch supports relu and gelu activations, got {activation!r}")


def _check_torch_layer(layer: nn.Module, expected: type[nn.Module]) -> None:
    if not isinstance(layer, expected):
        raise ValueError(f"expected an nn.{expected.__name__}, got {type(layer).__name__}")
    if not layer.self_attn.batch_first:
        raise ValueError(
            f"from_torch needs nn.{expected.__name__}(..., batch_first=True): labkit tensors are "
            "(batch, seq, d_model), got batch_first=False"
        )


def _copy_weights(ours: nn.Module, theirs: nn.Module, names: dict[str, str]) -> None:
    """Load each ``theirs`` submodule into the ``ours`` submodule named by ``names[theirs]``."""
    for their_name, our_name in names.items():
        their_weights = theirs.get_submodule(their_name).state_dict()
        ours.get_submodule(our_name).load_state_dict(their_weights)


def _config_from_torch(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> dict:
    """The constructor arguments of the labkit layer equivalent to a torch Transformer layer."""
    return dict(
        d_model=layer.linear1.in_features,
        n_heads=layer.self_attn.num_heads,
        d_ff=layer.linear1.out_features,
        dropout=layer.dropout.p,
        activation=_torch_activation_name(layer.activation),
        norm_first=layer.norm_first,
        eps=layer.norm1.eps,
        bias=layer.linear1.bias is not None,
    )


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside a residual connection.

    post-LN (``norm_first=False``, the paper and ``nn.TransformerEncoderLayer``'s default)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(ffn(x)))

    pre-LN (``norm_first=True``)::

        x = x + dropout1(self_attn(norm1(x)))
        x = x + dropout2(ffn(norm2(x)))

    Submodules: ``self_attn`` (labkit ``MultiHeadAttention``), ``ffn`` (``FeedForward``),
    ``norm1``/``norm2`` (``LayerNorm`` or ``RMSNorm``, chosen by ``norm``), ``dropout1``/
    ``dropout2``. ``dropout`` is also used on the attention weights and inside the
    feed-forward, as in torch. ``bias`` switches the biases of every linear and LayerNorm
    (RMSNorm has none); ``n_kv_heads`` < ``n_heads`` gives grouped-query attention.

    Hook points (each (B, T, D); ``labkit.nn.hooks``): ``hook_resid_pre`` (the input),
    ``hook_attn_out`` (what attention adds to the residual stream), ``hook_resid_mid`` (after
    the attention residual), ``hook_mlp_out`` (what the feed-forward adds) and
    ``hook_resid_post`` (the output); ``self_attn`` has ``hook_pattern`` and ``hook_z``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layer",
        eps: float = 1e-5,
        bias: bool = True,
        n_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, n_kv_heads, bias=bias, dropout=dropout
        )
        self.ffn = FeedForward(d_model, d_ff, activation, dropout=dropout, bias=bias)
        self.norm1 = _make_norm(norm, d_model, eps, bias)
        self.norm2 = _make_norm(norm, d_model, eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        need_weights: bool = False,
        rotary: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> LayerOutput:
        """Encode ``x``.

        Args:
            x: (B, T, D).
            mask: bool (True = may attend) or float bias, broadcastable to (B, H, T, T); a key
                padding mask is ``padding_mask(lengths)``, shape (B, 1, 1, T).
            is_causal: each position sees only itself and earlier positions (ANDed with mask).
            need_weights: also return the self-attention weights (B, H, T, T).
            rotary: e.g. ``RotaryEmbedding(head_dim)``, applied to queries and keys.
            positions: (T,) or (B, T) positions for ``rotary``, default
                ``arange(past, past + T)`` where past = ``cache.seq_len``.
            cache: a ``KVCache`` for incremental decoding in a decoder-only stack (GPT,
                Llama use this layer with ``is_causal=True``), updated in place; the mask
                then covers the k_len = past + T cached and new keys.

        Returns:
            LayerOutput(hidden (B, T, D), self_weights (B, H, T, k_len) or None, None).
        """
        _check_input("x", x, self.d_model)
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")

        def self_attention(h: Tensor) -> AttentionOutput:
            return self.self_attn(
                h, mask=mask, is_causal=is_causal, need_weights=need_weights,
                rotary=rotary, positions=positions, cache=cache,
            )

        pre = self.norm_first
        x = run_hook(self.hook_resid_pre, x)
        attn = self_attention(self.norm1(x) if pre else x)
        attn_out = run_hook(self.hook_attn_out, self.dropout1(attn.output))
        x = run_hook(self.hook_resid_mid, x + attn_out if pre else self.norm1(x + attn_out))
        mlp_out = run_hook(self.hook_mlp_out, self.dropout2(self.ffn(self.norm2(x) if pre else x)))
        x = x + mlp_out if pre else self.norm2(x + mlp_out)
        return LayerOutput(run_hook(self.hook_resid_post, x), attn.weights, None)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> EncoderLayer:
        """A labkit copy of ``nn.TransformerEncoderLayer(..., batch_first=True)``, same weights.

        Size, heads, d_ff, dropout, norm_first, eps, bias and activation (relu or gelu) are
        read from ``layer``; the result is on its device and dtype, in its train/eval mode.
        Its masks use True = blocked: pass ``mask=~src_key_padding_mask[:, None, None, :]``.
        """
        _check_torch_layer(layer, nn.TransformerEncoderLayer)
        ours = cls(**_config_from_torch(layer))
        ours.to(device=layer.linear1.weight.device, dtype=layer.linear1.weight.dtype)
        ours.self_attn = MultiHeadAttention.from_torch(layer.self_attn)
        torch_to_labkit = {
            "linear1": "ffn.up_proj",
            "linear2": "ffn.down_proj",
            "norm1": "norm1",
            "norm2": "norm2",
        }
        _copy_weights(ours, layer, torch_to_labkit)
        return ours.train(layer.training)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder memory, then feed-forward.

    post-LN (``norm_first=False``)::

        x = norm1(x + dropout1(self_attn(x)))               # causal: no peeking ahead
        x = norm2(x + dropout2(cross_attn(x, memory)))      # queries from x, keys from memory
        x = norm3(x + dropout3(ffn(x)))

    pre-LN (``norm_first=True``) moves each norm onto the sublayer's input:
    ``x = x + dropout_i(sublayer(norm_i(x)))``.

    Submodules: ``self_attn``, ``cross_attn`` (torch: ``multihead_attn``), ``ffn``,
    ``norm1``..``norm3``, ``dropout1``..``dropout3``; arguments as for ``EncoderLayer``.

    Hook points as in ``EncoderLayer``, plus ``hook_cross_attn_out`` (what cross-attention
    adds) and ``hook_resid_cross`` (after the cross-attention residual); ``hook_resid_mid``
    follows the self-attention residual.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layer",
        eps: float = 1e-5,
        bias: bool = True,
        n_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, n_kv_heads, bias=bias, dropout=dropout
        )
        self.cross_attn = MultiHeadAttention(
            d_model, n_heads, n_kv_heads, bias=bias, dropout=dropout
        )
        self.ffn = FeedForward(d_model, d_ff, activation, dropout=dropout, bias=bias)
        self.norm1 = _make_norm(norm, d_model, eps, bias)
        self.norm2 = _make_norm(norm, d_model, eps, bias)
        self.norm3 = _make_norm(norm, d_model, eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        names = ("resid_pre", "attn_out", "resid_mid", "cross_attn_out", "resid_cross",
                 "mlp_out", "resid_post")  # fmt: skip
        for name in names:
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        self_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        is_causal: bool = True,
        need_weights: bool = False,
        cache: DecoderLayerCache | None = None,
        rotary: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        positions: Tensor | None = None,
    ) -> LayerOutput:
        """Decode ``x`` while attending to ``memory``.

        Args:
            x: (B, T, D) target positions (T = 1 when decoding one token at a time).
            memory: (B, S, D) encoder output. With a cache it is projected on the first step
                only; later steps reuse the cached projections.
            self_mask: bool (True = may attend) or float bias, broadcastable to
                (B, H, T, past + T), e.g. ``padding_mask`` of the target; ANDed with the
                causal mask when ``is_causal``.
            memory_mask: broadcastable to (B, H, T, S), e.g. ``padding_mask`` of the source.
            is_causal: causal self-attention, bottom-right aligned, so it also holds with a
                cache (the new token sees every cached one).
            need_weights: also return both attention weights.
            cache: ``DecoderLayerCache()`` for incremental decoding, updated in place.
            rotary: e.g. ``RotaryEmbedding(head_dim)``, applied to the self-attention's
                queries and keys (not to cross-attention).
            positions: (T,) or (B, T) positions for ``rotary``, default
                ``arange(past, past + T)``.

        Returns:
            LayerOutput(hidden (B, T, D), self_weights (B, H, T, past + T) or None,
            cross_weights (B, H, T, S) or None).
        """
        _check_input("x", x, self.d_model)
        _check_input("memory", memory, self.d_model)
        if memory.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and memory batch sizes differ: x {tuple(x.shape)}, memory {tuple(memory.shape)}"
            )
        if cache is not None and not isinstance(cache, DecoderLayerCache):
            raise ValueError(f"cache must be a DecoderLayerCache, got {type(cache).__name__}")

        def self_attention(h: Tensor) -> AttentionOutput:
            return self.self_attn(
                h, mask=self_mask, is_causal=is_causal, need_weights=need_weights,
                cache=None if cache is None else cache.self_attn, rotary=rotary,
                positions=positions,
            )

        def cross_attention(h: Tensor) -> AttentionOutput:
            return self.cross_attn(
                h, memory, mask=memory_mask, need_weights=need_weights,
                cache=None if cache is None else cache.cross_attn,
            )

        pre = self.norm_first
        x = run_hook(self.hook_resid_pre, x)
        self_out = self_attention(self.norm1(x) if pre else x)
        attn_out = run_hook(self.hook_attn_out, self.dropout1(self_out.output))
        x = run_hook(self.hook_resid_mid, x + attn_out if pre else self.norm1(x + attn_out))
        cross_out = cross_attention(self.norm2(x) if pre else x)
        cross = run_hook(self.hook_cross_attn_out, self.dropout2(cross_out.output))
        x = run_hook(self.hook_resid_cross, x + cross if pre else self.norm2(x + cross))
        mlp_out = run_hook(self.hook_mlp_out, self.dropout3(self.ffn(self.norm3(x) if pre else x)))
        x = x + mlp_out if pre else self.norm3(x + mlp_out)
        return LayerOutput(run_hook(self.hook_resid_post, x), self_out.weights, cross_out.weights)

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> DecoderLayer:
        """A labkit copy of ``nn.TransformerDecoderLayer(..., batch_first=True)``, same weights.

        Read from ``layer`` as in ``EncoderLayer.from_torch``. Torch's masks use True =
        blocked: ``self_mask=~tgt_key_padding_mask[:, None, None, :]``,
        ``memory_mask=~memory_key_padding_mask[:, None, None, :]``; ``tgt_is_causal=True``
        (or a causal ``tgt_mask``) is ``is_causal=True``.
        """
        _check_torch_layer(layer, nn.TransformerDecoderLayer)
        ours = cls(**_config_from_torch(layer))
        ours.to(device=layer.linear1.weight.device, dtype=layer.linear1.weight.dtype)
        ours.self_attn = MultiHeadAttention.from_torch(layer.self_attn)
        ours.cross_attn = MultiHeadAttention.from_torch(layer.multihead_attn)
        torch_to_labkit = {
            "linear1": "ffn.up_proj",
            "linear2": "ffn.down_proj",
            "norm1": "norm1",
            "norm2": "norm2",
            "norm3": "norm3",
        }
        _copy_weights(ours, layer, torch_to_labkit)
        return ours.train(layer.training)
