"""Attention: the explicit scaled dot-product formula, the masks that shape it, and the modules
built on it (multi-head / grouped-query attention with a KV cache), plus the additive attention
of RNN encoder-decoders (Bahdanau et al. 2015) that dot-product attention replaced.

Symbols used in every shape below:
    B       batch size
    H       number of query heads;  H_kv  number of key/value heads (H_kv divides H)
    T       sequence length of a self-attention input
    q_len   number of queries;  k_len  number of keys (= values) they attend over
    d_model model width;  d_k  per-head width (d_model // H);  d_v  value width
    "..."   any number of leading (batch, head) dimensions

Masks: a boolean mask means **True = may attend** everywhere in labkit (the same as the
``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention``, and the opposite of
``nn.MultiheadAttention``'s masks, where True = blocked). A float mask is an additive bias on the
scores (``-inf`` blocks). A mask must broadcast to the scores shape ``(B, H, q_len, k_len)``.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.nn.cache import KVCache
from labkit.nn.hooks import HookPoint, hooked, run_hook
from labkit.nn.masks import causal_mask

BACKENDS = ("auto", "sdpa", "math")


# ----------------------------------------------------------------------------------------------
# Scaled dot-product attention
# ----------------------------------------------------------------------------------------------


def _check_mask(mask: Tensor, scores_shape: torch.Size) -> None:
    """Raise ValueError unless ``mask`` is bool/float and broadcasts to ``scores_shape``."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"mask must be bool (True = may attend) or float (additive bias), got {mask.dtype}"
        )
    try:
        fits = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the attention scores "
            f"of shape {tuple(scores_shape)} (..., q_len, k_len)"
        )


def _combine_masks(
    mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Fold ``is_causal`` into ``mask`` (AND for bool masks, -inf for float masks)."""
    if mask is not None:
        mask = mask.to(device)
    if not is_causal:
        return mask
    causal = causal_mask(q_len, k_len, device=device)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def _fully_masked_rows(mask: Tensor) -> Tensor:
    """(..., q_len, 1) bool: True for queries whose every key is blocked by ``mask``."""
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1, keepdim=True)
    return torch.isneginf(mask).all(dim=-1, keepdim=True)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ / sqrt(d_k) + bias) v, written out so the weights can be inspected.

    Args:
        q: (..., q_len, d_k) queries.
        k: (..., k_len, d_k) keys.
        v: (..., k_len, d_v) values. The leading dims of q, k, v must broadcast together.
        mask: bool (True = may attend) or float (added to the scores), broadcastable to
            (..., q_len, k_len).
        is_causal: query i may attend key j only when j <= i + (k_len - q_len). The diagonal
            is aligned bottom-right, which is what decoding with a KV cache needs (the last
            query is the newest token and sees every key). For square scores this equals
            torch's ``is_causal``; for q_len != k_len torch aligns top-left instead.
            Combined with ``mask`` by AND.
        dropout_p: dropout probability applied to the weights whenever it is > 0 (like
            torch's function, callers pass 0.0 at eval time).
        scale: multiplier of the scores, default 1 / sqrt(d_k).

    Returns:
        (output, weights): output (..., q_len, d_v) and weights (..., q_len, k_len), the
        (post-dropout) weights that multiplied ``v``, so ``output == weights @ v``.

    A query whose every key is masked has nothing to attend to; instead of softmax's NaN its
    weights row and its output row are all zeros (what padding queries need).
    """
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError(
            f"q, k, v need at least 2 dims (..., len, dim), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share the last dim d_k, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length k_len, got k {tuple(k.shape)} and "
            f"v {tuple(v.shape)}"
        )
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading (batch, head) dims do not broadcast: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        ) from None
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    q_len, k_len = q.shape[-2], k.shape[-2]
    if mask is not None:
        _check_mask(mask, torch.Size((*batch, q_len, k_len)))
    mask = _combine_masks(mask, is_causal, q_len, k_len, q.device)

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., q_len, k_len)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.to(scores.dtype)
    # softmax of an all -inf row is NaN: give such rows zero weights instead.
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., q_len, 1)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


# ----------------------------------------------------------------------------------------------
# Named output
# ----------------------------------------------------------------------------------------------


class AttentionOutput(NamedTuple):
    """What an attention module returns.

    output: (B, q_len, d_model).
    weights: (B, H, q_len, k_len) per-head attention weights, or None when not requested.
    """

    output: Tensor
    weights: Tensor | None


def _check_input(name: str, x: Tensor, d_model: int) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name} must be (batch, seq, d_model={d_model}), got shape {tuple(x.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------------------


def _sdpa_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout_p: float
) -> Tensor:
    """torch's fused attention with labkit's semantics (bottom-right causal, zero dead rows).

    k and v may have fewer heads than q (grouped-query attention): H_kv divides H.

    Under bfloat16 autocast on the CPU the attention itself runs in float32 and its output is
    cast back to bfloat16: PyTorch's CPU flash kernel is several times slower in bfloat16
    than in float32 at a small model's head sizes, forward and backward (benchmarks/README.md,
    ``train_step.py``), while the projections around it keep autocast's bfloat16 matmuls.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = _sdpa_backend(q.float(), k.float(), v.float(), mask, is_causal, dropout_p)
        return out.to(torch.bfloat16)
    q_len, k_len = q.shape[-2], k.shape[-2]
    if mask is None and (not is_causal or q_len == k_len):
        # enable_gqa: the kernel shares each key/value head with its query group, no copy.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
        )
    mask = _combine_masks(mask, is_causal, q_len, k_len, q.device)
    # Fused kernels may return NaN for queries with no key left: let them attend to every
    # key (finite, harmless) and zero their output afterwards, as the math backend does.
    dead = _fully_masked_rows(mask)  # (..., q_len, 1)
    if mask.dtype == torch.bool:
        mask = mask | dead
    else:
        mask = mask.masked_fill(dead, 0.0).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True
    )
    return out.masked_fill(dead, 0.0)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with grouped-query heads and a KV cache.

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (GQA, each key/value head is
    shared by n_heads // n_kv_heads consecutive query heads); ``n_kv_heads=1`` is multi-query
    attention (MQA). ``backend``: "math" runs labkit's explicit
    ``scaled_dot_product_attention``, "sdpa" torch's fused kernel, "auto" sdpa unless
    attention weights are requested. Both backends give the same result.

    Hook points (``labkit.nn.hooks``): ``hook_pattern`` sees the weights (B, H, q_len, k_len)
    and ``hook_z`` each head's output (B, H, q_len, d_k) before ``out_proj``; a hook that
    returns a tensor replaces the activation (the output is then computed from it). While
    either has a hook, attention runs the math backend, whatever ``backend`` says.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.backend = backend
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.hook_pattern = HookPoint()  # (B, H, q_len, k_len) attention weights
        self.hook_z = HookPoint()  # (B, H, q_len, d_k) each head's output

    def _split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        """(B, T, n_heads * d_k) -> (B, n_heads, T, d_k)."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        cache: KVCache | None = None,
        rotary: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        positions: Tensor | None = None,
    ) -> AttentionOutput:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (B, q_len, d_model).
            key: (B, k_len, d_model) for cross-attention; None = self-attention on ``query``.
            value: (B, k_len, d_model), defaults to ``key``.
            mask: bool (True = may attend) or float bias, broadcastable to (B, H, q_len, k_len),
                where k_len counts cached positions too.
            is_causal: causal mask, bottom-right aligned (see ``scaled_dot_product_attention``),
                so decoding token by token with a cache equals one causal pass.
            need_weights: also return the (B, H, q_len, k_len) weights (math backend only).
            cache: self-attention: new keys/values (after rotary) are appended and the
                queries attend over everything cached. Cross-attention: the memory ``key`` /
                ``value`` is projected on the first call only (empty cache); later calls
                reuse the cached projections and ignore the ``key``/``value`` passed.
            rotary: self-attention only; ``q, k = rotary(q, k, positions)`` on the
                (B, heads, T, d_k) tensors before caching (e.g. ``RotaryEmbedding``).
            positions: (q_len,) or (B, q_len) positions for ``rotary``; default
                ``arange(cache_len, cache_len + q_len)``.

        Returns:
            AttentionOutput(output (B, q_len, d_model), weights (B, H, q_len, k_len) or None).
        """
        self_attention = key is None
        if self_attention:
            if value is not None:
                raise ValueError("value was given without key; pass key for cross-attention")
            key = value = query
        elif value is None:
            value = key
        _check_input("query", query, self.d_model)
        _check_input("key", key, self.d_model)
        _check_input("value", value, self.d_model)
        if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
            raise ValueError(
                f"query, key and value batch sizes differ: query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value lengths differ: key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if rotary is not None and not self_attention:
            raise ValueError("rotary embeddings apply to self-attention only (key must be None)")
        if positions is not None and rotary is None:
            raise ValueError("positions are only used by rotary, but rotary is None")
        if need_weights and self.backend == "sdpa":
            raise ValueError("backend='sdpa' cannot return weights; use backend 'math' or 'auto'")
        hooks = hooked(self.hook_pattern) or hooked(self.hook_z)
        use_sdpa = not hooks and (
            self.backend == "sdpa" or (self.backend == "auto" and not need_weights)
        )

        batch, q_len, _ = query.shape
        q = self._split_heads(self.q_proj(query), self.n_heads)  # (B, H, q_len, d_k)
        if cache is not None and not self_attention and cache.seq_len > 0:
            k, v = cache.k, cache.v  # memory already projected on the first call
        else:
            k = self._split_heads(self.k_proj(key), self.n_kv_heads)  # (B, H_kv, T, d_k)
            v = self._split_heads(self.v_proj(value), self.n_kv_heads)  # (B, H_kv, T, d_k)
            if rotary is not None:
                if positions is None:
                    past = 0 if cache is None else cache.seq_len
                    positions = torch.arange(past, past + q_len, device=query.device)
                q, k = rotary(q, k, positions)
            if cache is not None:
                k, v = cache.update(k, v)  # (B, H_kv, past + T, d_k)
        if mask is not None:
            _check_mask(mask, torch.Size((batch, self.n_heads, q_len, k.shape[-2])))
        # One query, aligned bottom-right, sees every key: no causal mask to build (decoding).
        is_causal = is_causal and q_len > 1

        dropout_p = self.dropout if self.training else 0.0
        if use_sdpa:
            out, weights = _sdpa_backend(q, k, v, mask, is_causal, dropout_p), None
        else:
            # GQA: each key/value head serves n_heads // n_kv_heads consecutive query heads.
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, H, k_len, d_k)
            v = v.repeat_interleave(groups, dim=1)  # (B, H, k_len, d_k)
            out, weights = scaled_dot_product_attention(q, k, v, mask, is_causal, dropout_p)
            if hooked(self.hook_pattern):
                patched = self.hook_pattern(weights)
                if patched is not weights:  # a hook replaced the pattern: recompute the output
                    weights, out = patched, patched @ v
            out = run_hook(self.hook_z, out)  # (B, H, q_len, d_k)
        # (B, q_len, d_model); (B, q_len, d_model / W) per rank under tensor parallelism
        out = out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim)
        return AttentionOutput(self.out_proj(out), weights if need_weights else None)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A labkit copy of a ``torch.nn.MultiheadAttention`` with the same weights.

        The packed ``in_proj_weight`` (3 * d_model, d_model) is split into q/k/v projections.
        Requires ``batch_first=True``, equal kdim/vdim/embed_dim and no ``add_bias_kv`` /
        ``add_zero_attn``. Beware when porting masks: torch's ``attn_mask`` and
        ``key_padding_mask`` use True = *blocked*, labkit's masks use True = *may attend*
        (pass ``~torch_mask``).
        """
        if not mha.batch_first:
            raise ValueError("from_torch needs nn.MultiheadAttention(batch_first=True)")
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                f"from_torch needs kdim == vdim == embed_dim, got embed_dim={mha.embed_dim}, "
                f"kdim={mha.kdim}, vdim={mha.vdim}"
            )
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch does not support add_bias_kv or add_zero_attn")
        has_bias = mha.in_proj_bias is not None
        weight = mha.in_proj_weight
        labkit_mha = cls(mha.embed_dim, mha.num_heads, bias=has_bias, dropout=mha.dropout)
        labkit_mha.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for proj, w in zip(
                (labkit_mha.q_proj, labkit_mha.k_proj, labkit_mha.v_proj),
                weight.chunk(3),
                strict=True,
            ):
                proj.weight.copy_(w)
            labkit_mha.out_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                for proj, b in zip(
                    (labkit_mha.q_proj, labkit_mha.k_proj, labkit_mha.v_proj),
                    mha.in_proj_bias.chunk(3),
                    strict=True,
                ):
                    proj.bias.copy_(b)
                labkit_mha.out_proj.bias.copy_(mha.out_proj.bias)
        return labkit_mha


# ----------------------------------------------------------------------------------------------
# Additive (Bahdanau) attention
# ----------------------------------------------------------------------------------------------


class AdditiveAttention(nn.Module):
    """Bahdanau et al.'s additive attention (2015), the alignment model of RNN translation.

    Each query (a decoder state s) scores each key (an encoder state h_j) with a one-hidden-layer
    network instead of a dot product,

        e_j = vᵀ tanh(W_q s + W_k h_j),    a = softmax(e),    context = Σ_j a_j value_j,

    so query and key may have different widths and no 1/sqrt(d) scale is needed. Parameters:
    ``query_proj`` (W_q, query_dim -> hidden_dim), ``key_proj`` (W_k, key_dim -> hidden_dim),
    ``score`` (v, hidden_dim -> 1), all without bias as in the paper. Cost: a (B, q_len, k_len,
    hidden_dim) tensor of tanh inputs, where dot-product attention needs only (B, q_len, k_len).
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int) -> None:
        super().__init__()
        if min(query_dim, key_dim, hidden_dim) < 1:
            raise ValueError(
                f"query_dim, key_dim and hidden_dim must be at least 1, got {query_dim}, "
                f"{key_dim}, {hidden_dim}"
            )
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden_dim
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False)
        self.key_proj = nn.Linear(key_dim, hidden_dim, bias=False)
        self.score = nn.Linear(hidden_dim, 1, bias=False)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor | None = None, mask: Tensor | None = None
    ) -> AttentionOutput:
        """Context vectors and alignment weights.

        Args:
            query: (B, q_len, query_dim), e.g. the decoder state before each output step.
            key: (B, k_len, key_dim), e.g. the encoder states.
            value: (B, k_len, d_v); defaults to ``key`` (Bahdanau's context is a sum of h_j).
            mask: bool, True = may attend, broadcastable to (B, q_len, k_len), e.g.
                ``padding_mask(lengths)[:, 0]`` of shape (B, 1, k_len). A query with every key
                masked gets zero weights and a zero context.

        Returns:
            AttentionOutput(output (B, q_len, d_v), weights (B, q_len, k_len)).
        """
        _check_input("query", query, self.query_dim)
        _check_input("key", key, self.key_dim)
        value = key if value is None else value
        if value.dim() != 3 or value.shape[:2] != key.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(
                f"expected query (B, q_len, {self.query_dim}), key (B, k_len, {self.key_dim}) "
                f"and value (B, k_len, d_v) with one B and k_len, got query "
                f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        hidden = self.query_proj(query)[:, :, None] + self.key_proj(key)[:, None]  # (B,q,k,hid)
        scores = self.score(torch.tanh(hidden)).squeeze(-1)  # (B, q_len, k_len)
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool (True = may attend), got {mask.dtype}")
            _check_mask(mask, scores.shape)
            scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, q_len, 1)
        weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
        return AttentionOutput(weights @ value, weights)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"
