"""Attention: the explicit scaled dot-product formula, the masks that shape it, and the modules
built on it (multi-head / grouped-query attention with a KV cache, Linformer, Nyströmformer).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "sdpa", "math")
Device = torch.device | str | None


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
# Mask builders (all bool, True = may attend)
# ----------------------------------------------------------------------------------------------


def _check_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def padding_mask(
    lengths: Tensor | Sequence[int], max_len: int | None = None, *, device: Device = None
) -> Tensor:
    """Key padding mask from sequence lengths. True = may attend (a real token).

    Args:
        lengths: (batch,) number of real tokens of each sequence; padding comes after them.
        max_len: padded length, default ``max(lengths)``.

    Returns:
        (batch, 1, 1, max_len) bool, broadcasting over heads and queries.
    """
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor (batch,), got shape {tuple(lengths.shape)} "
            f"and dtype {lengths.dtype}"
        )
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    max_len = longest if max_len is None else max_len
    if longest > max_len:
        raise ValueError(f"lengths must be <= max_len={max_len}, got {lengths.tolist()}")
    positions = torch.arange(max_len, device=lengths.device)  # (max_len,)
    return (positions < lengths[:, None])[:, None, None, :]


def padding_mask_from_ids(input_ids: Tensor, pad_id: int, *, device: Device = None) -> Tensor:
    """Key padding mask from token ids. True = may attend (token is not ``pad_id``).

    Args:
        input_ids: (batch, seq) token ids.

    Returns:
        (batch, 1, 1, seq) bool.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
    return (input_ids != pad_id)[:, None, None, :].to(device)


def causal_mask(q_len: int, k_len: int | None = None, *, device: Device = None) -> Tensor:
    """Causal mask, bottom-right aligned. True = may attend.

    Query i may attend key j iff j <= i + (k_len - q_len): the last query sees every key, as
    when ``q_len`` new tokens attend over ``k_len - q_len`` cached ones plus themselves.
    For q_len == k_len (the default) it is the lower triangle.

    Returns:
        (q_len, k_len) bool.
    """
    k_len = q_len if k_len is None else k_len
    _check_non_negative("q_len", q_len)
    _check_non_negative("k_len", k_len)
    ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    return ones.tril(diagonal=k_len - q_len)


def _offsets(seq_len: int, device: Device) -> Tensor:
    """(seq_len, seq_len) matrix of i - j (query index minus key index)."""
    idx = torch.arange(seq_len, device=device)
    return idx[:, None] - idx[None, :]


def sliding_window_mask(
    seq_len: int, window: int, causal: bool = False, *, device: Device = None
) -> Tensor:
    """Local attention band. True = may attend.

    Non-causal: query i attends key j iff |i - j| <= window (2 * window + 1 keys inside the
    sequence). Causal: iff 0 <= i - j <= window (itself and the ``window`` previous tokens).

    Returns:
        (seq_len, seq_len) bool.
    """
    _check_non_negative("seq_len", seq_len)
    _check_non_negative("window", window)
    offset = _offsets(seq_len, device)
    if causal:
        return (offset >= 0) & (offset <= window)
    return offset.abs() <= window


def longformer_mask(
    seq_len: int, window: int, global_tokens: Sequence[int] | Tensor, *, device: Device = None
) -> Tensor:
    """Longformer pattern (Beltagy et al. 2020): a sliding window plus global tokens.
    True = may attend.

    Every query attends keys with |i - j| <= window; each index in ``global_tokens`` (e.g. the
    [CLS] position) attends to every position and is attended by every position.

    Returns:
        (seq_len, seq_len) bool.
    """
    mask = sliding_window_mask(seq_len, window, device=device)
    global_tokens = torch.as_tensor(global_tokens, dtype=torch.long, device=mask.device)
    if global_tokens.dim() > 1:
        raise ValueError(
            f"global_tokens must be a 1-D list of indices, got shape {tuple(global_tokens.shape)}"
        )
    bad = (global_tokens < 0) | (global_tokens >= seq_len)
    if bad.any():
        raise ValueError(
            f"global_tokens must be in [0, {seq_len}) for seq_len={seq_len}, "
            f"got {global_tokens[bad].tolist()}"
        )
    mask[global_tokens, :] = True  # global tokens see everything
    mask[:, global_tokens] = True  # everything sees the global tokens
    return mask


def block_sparse_mask(
    seq_len: int,
    block_size: int,
    n_neighbour_blocks: int = 1,
    n_global_blocks: int = 0,
    causal: bool = False,
    *,
    device: Device = None,
) -> Tensor:
    """BigBird-style block-sparse pattern without the random blocks. True = may attend.

    The sequence is cut into blocks of ``block_size`` tokens (token i is in block
    i // block_size; the last block is shorter when block_size does not divide seq_len).
    Query i attends key j iff any of:
      * their blocks are at most ``n_neighbour_blocks`` apart (0 = own block only,
        1 = BigBird's 3-block window);
      * j is in one of the first ``n_global_blocks`` blocks (global keys);
      * i is in one of the first ``n_global_blocks`` blocks (global queries see everything).
    With ``causal=True`` the result is additionally ANDed with j <= i.

    Returns:
        (seq_len, seq_len) bool.
    """
    _check_non_negative("seq_len", seq_len)
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    _check_non_negative("n_neighbour_blocks", n_neighbour_blocks)
    _check_non_negative("n_global_blocks", n_global_blocks)
    block = torch.arange(seq_len, device=device) // block_size  # (seq_len,)
    near = (block[:, None] - block[None, :]).abs() <= n_neighbour_blocks
    is_global = block < n_global_blocks
    mask = near | is_global[None, :] | is_global[:, None]
    if causal:
        mask &= _offsets(seq_len, device) >= 0
    return mask


# ----------------------------------------------------------------------------------------------
# KV cache and named output
# ----------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values seen so far, each (B, H_kv, seen, d_k); None while empty.

    The cache stores the H_kv key/value heads *before* they are repeated for grouped-query
    attention: that is where GQA / MQA save memory.
    """

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Number of positions cached so far."""
        return 0 if self.k is None else self.k.shape[-2]

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, H_kv, new, d_k) keys/values; return all cached ones, (B, H_kv, seen, d_k)."""
        if k_new.dim() != 4 or k_new.shape != v_new.shape:
            raise ValueError(
                f"k_new and v_new must both be (batch, n_kv_heads, new, head_dim), got "
                f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            if k_new.shape[:2] != self.k.shape[:2] or k_new.shape[-1] != self.k.shape[-1]:
                raise ValueError(
                    f"new keys {tuple(k_new.shape)} do not match the cached keys "
                    f"{tuple(self.k.shape)} in batch, heads or head_dim"
                )
            self.k = torch.cat([self.k, k_new], dim=-2)
            self.v = torch.cat([self.v, v_new], dim=-2)
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B_new,) in that order, e.g. the surviving beams."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


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
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    if mask is None and (not is_causal or q_len == k_len):
        # enable_gqa: the kernel shares each key/value head with its query group, no copy.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
        )
    groups = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(groups, dim=-3)  # (B, H, k_len, d_k)
    v = v.repeat_interleave(groups, dim=-3)  # (B, H, k_len, d_k)
    mask = _combine_masks(mask, is_causal, q_len, k_len, q.device)
    # Fused kernels may return NaN for queries with no key left: let them attend to every
    # key (finite, harmless) and zero their output afterwards, as the math backend does.
    dead = _fully_masked_rows(mask)  # (..., q_len, 1)
    if mask.dtype == torch.bool:
        mask = mask | dead
    else:
        mask = mask.masked_fill(dead, 0.0).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.masked_fill(dead, 0.0)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with grouped-query heads and a KV cache.

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (GQA, each key/value head is
    shared by n_heads // n_kv_heads consecutive query heads); ``n_kv_heads=1`` is multi-query
    attention (MQA). ``backend``: "math" runs labkit's explicit
    ``scaled_dot_product_attention``, "sdpa" torch's fused kernel, "auto" sdpa unless
    attention weights are requested. Both backends give the same result.
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
        use_sdpa = self.backend == "sdpa" or (self.backend == "auto" and not need_weights)

        batch, q_len, _ = query.shape
        past = 0 if cache is None else cache.seq_len
        q = self._split_heads(self.q_proj(query), self.n_heads)  # (B, H, q_len, d_k)
        if cache is not None and not self_attention and past > 0:
            k, v = cache.k, cache.v  # memory already projected on the first call
        else:
            k = self._split_heads(self.k_proj(key), self.n_kv_heads)  # (B, H_kv, T, d_k)
            v = self._split_heads(self.v_proj(value), self.n_kv_heads)  # (B, H_kv, T, d_k)
            if rotary is not None:
                if positions is None:
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
        out = out.transpose(1, 2).reshape(batch, q_len, self.d_model)  # (B, q_len, d_model)
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
# Efficient self-attention variants
# ----------------------------------------------------------------------------------------------


class LinformerSelfAttention(nn.Module):
    """Linformer self-attention (Wang et al. 2020): O(T * k) instead of O(T²).

    Keys and values are projected along the *sequence* axis from length T to ``k`` by learned
    matrices E and F of shape (k, seq_len), so each query scores k mixed keys and the weights
    are (B, H, T, k). E and F are shared across heads (the paper's "headwise" sharing);
    ``share_kv=True`` also uses E for the values (F = E). An input shorter than ``seq_len``
    uses the first T columns of E and F (as if the missing positions had zero keys and values).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        seq_len: int,
        k: int,
        share_kv: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if seq_len <= 0 or k <= 0:
            raise ValueError(f"seq_len and k must be > 0, got seq_len={seq_len}, k={k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.seq_len = seq_len
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Std 1/sqrt(k) as in the paper's N(0, 1/k) projections.
        self.E = nn.Parameter(torch.randn(k, seq_len) / math.sqrt(k))
        self.F = self.E if share_kv else nn.Parameter(torch.randn(k, seq_len) / math.sqrt(k))

    def forward(self, x: Tensor, need_weights: bool = False) -> AttentionOutput:
        """x: (B, T, d_model) with T <= seq_len -> output (B, T, d_model), weights (B, H, T, k)."""
        _check_input("x", x, self.d_model)
        batch, seq, _ = x.shape
        if seq > self.seq_len:
            raise ValueError(
                f"input length {seq} is longer than the Linformer's seq_len={self.seq_len}"
            )
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.E[:, :seq] @ k  # (k, T) @ (B, H, T, d_k) -> (B, H, k, d_k)
        v = self.F[:, :seq] @ v  # (B, H, k, d_k)
        dropout_p = self.dropout if self.training else 0.0
        out, weights = scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(batch, seq, self.d_model)  # (B, T, d_model)
        return AttentionOutput(self.out_proj(out), weights if need_weights else None)


class NystromSelfAttention(nn.Module):
    """Nyströmformer self-attention (Xiong et al. 2021): softmax attention of rank m, O(T * m).

    With m = ``n_landmarks`` landmarks Q̃, K̃ (means of T / m consecutive queries / keys),
    softmax(Q Kᵀ) V is approximated by

        softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) · V

    (every score scaled by 1/sqrt(d_k)), evaluated right to left so no T x T matrix is formed.
    With m = T it is exact. T must be divisible by ``n_landmarks`` (no padding, so every
    landmark averages the same number of tokens). ``torch.linalg.pinv`` replaces the paper's
    iterative pseudo-inverse, and the paper's extra depthwise-convolution skip on V is left out.
    """

    def __init__(self, d_model: int, n_heads: int, n_landmarks: int, bias: bool = True):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_landmarks <= 0:
            raise ValueError(f"n_landmarks must be > 0, got {n_landmarks}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.n_landmarks = n_landmarks
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Tensor, need_weights: bool = False) -> AttentionOutput:
        """x: (B, T, d_model) -> output (B, T, d_model).

        With ``need_weights`` the implied (B, H, T, T) matrix is also formed (O(T²), for
        inspection); its rows sum to about 1 but entries may be slightly negative.
        """
        _check_input("x", x, self.d_model)
        batch, seq, _ = x.shape
        m = self.n_landmarks
        if seq % m != 0:
            raise ValueError(
                f"sequence length {seq} must be divisible by n_landmarks={m}; pad the input"
            )
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        # Landmarks: the mean of each run of seq // m consecutive positions.
        q_land = q.reshape(batch, self.n_heads, m, seq // m, self.head_dim).mean(-2)  # (B,H,m,d_k)
        k_land = k.reshape(batch, self.n_heads, m, seq // m, self.head_dim).mean(-2)  # (B,H,m,d_k)
        scale = 1.0 / math.sqrt(self.head_dim)
        kernel_1 = torch.softmax(q @ k_land.transpose(-2, -1) * scale, dim=-1)  # (B, H, T, m)
        kernel_2 = torch.softmax(q_land @ k_land.transpose(-2, -1) * scale, dim=-1)  # (B,H,m,m)
        kernel_3 = torch.softmax(q_land @ k.transpose(-2, -1) * scale, dim=-1)  # (B, H, m, T)
        kernel_2_inv = torch.linalg.pinv(kernel_2)  # (B, H, m, m)
        out = kernel_1 @ (kernel_2_inv @ (kernel_3 @ v))  # (B, H, T, d_k)
        out = out.transpose(1, 2).reshape(batch, seq, self.d_model)  # (B, T, d_model)
        weights = kernel_1 @ kernel_2_inv @ kernel_3 if need_weights else None
        return AttentionOutput(self.out_proj(out), weights)
