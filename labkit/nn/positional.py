"""Position information for attention, which by itself cannot tell token order.

Five ways to put it in, from the original Transformer to today's decoder LLMs:

- sinusoidal (Vaswani et al. 2017): a fixed table of sines and cosines added to the embeddings.
- learned (BERT, GPT-2): one trained vector per position, added to the embeddings.
- relative position bias (T5, Raffel et al. 2020): a learned per-head score for each
  log-spaced bucket of key-minus-query distance, added to the attention scores.
- rotary, RoPE (Su et al. 2021; Llama, SmolLM2): queries and keys rotated by position-dependent
  angles, so that their dot product depends only on the distance between them; optionally
  stretched to longer contexts (position interpolation or NTK-aware scaling).
- ALiBi (Press et al. 2022; BLOOM): a fixed per-head penalty proportional to distance, added to
  the attention scores.

The first two change the token embeddings; the last three touch only attention. The bias
modules (``RelativePositionBias``, ``ALiBi``) return float tensors of shape
``(1, H, q_len, k_len)`` meant as additive masks, e.g.
``labkit.nn.scaled_dot_product_attention(q, k, v, mask=bias)``.

Symbols: B batch size, T sequence length, D model width (d_model), H number of attention heads,
head_dim width of one head (D // H for the query heads).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Absolute encodings: added to the token embeddings x of shape (B, T, D)
# ---------------------------------------------------------------------------------------------


def sinusoidal_table(
    max_len: int,
    d_model: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The sinusoidal table of Vaswani et al., shape ``(max_len, d_model)``.

    ``PE[pos, 2i] = sin(pos / base^(2i/d_model))`` and ``PE[pos, 2i+1] = cos(...)``: each pair of
    columns is one frequency, with wavelengths from 2*pi positions up to almost 2*pi*base.

    The angles are computed in float64 on the CPU, then cast to ``dtype`` and moved to
    ``device``, so large positions stay accurate and devices without float64 (Apple MPS) work.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got max_len={max_len}")
    if d_model < 2 or d_model % 2 != 0:
        raise ValueError(
            f"d_model must be even and positive, got d_model={d_model}: every frequency fills "
            "two columns, one sine and one cosine"
        )
    positions = torch.arange(max_len, dtype=torch.float64)  # (max_len,)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d_model/2,)
    inv_freq = base ** (-two_i / d_model)  # (d_model/2,)
    angles = positions[:, None] * inv_freq[None, :]  # (max_len, d_model/2)
    table = torch.empty(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)  # even columns
    table[:, 1::2] = torch.cos(angles)  # odd columns
    return table.to(device=device, dtype=dtype)


def _check_embedding_input(x: Tensor, d_model: int, offset: int, max_len: int) -> None:
    """Raise ValueError unless x is (B, T, d_model) and positions offset..offset+T-1 exist."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"expected x of shape (batch, seq, d_model={d_model}), got {tuple(x.shape)}"
        )
    seq = x.shape[1]
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got offset={offset}")
    if offset + seq > max_len:
        raise ValueError(
            f"positions up to offset + seq = {offset} + {seq} = {offset + seq} requested "
            f"(seq={seq}, offset={offset}), but the table only holds max_len={max_len}"
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to the embeddings (no trainable parameters).

    The table lives in the non-persistent buffer ``pe`` of shape ``(max_len, d_model)``: it
    follows ``.to(device)`` but is not saved in the state dict, since it is recomputed at
    construction. Dropout and the sqrt(d_model) embedding scale of the paper belong to the
    model that uses this module.
    """

    pe: Tensor

    def __init__(self, d_model: int, max_len: int = 2048, base: float = 10000.0) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.register_buffer("pe", sinusoidal_table(max_len, d_model, base), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x + PE[offset : offset + T]``; x is ``(B, T, D)``, returns ``(B, T, D)``.

        ``offset`` is the position of x's first token, e.g. the number of tokens already in
        a KV cache when decoding one token at a time.
        """
        _check_embedding_input(x, self.d_model, offset, self.max_len)
        seq = x.shape[1]
        return x + self.pe[offset : offset + seq].to(x.dtype)  # (T, D) broadcasts over B

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEmbedding(nn.Module):
    """Adds one trained vector per position to the embeddings (GPT-2's ``wpe``, BERT).

    The vectors are ``self.embedding.weight`` of shape ``(max_len, D)``, an ``nn.Embedding``
    with its default N(0, 1) initialisation (a model may re-initialise it, as GPT-2 does with
    std 0.02). Positions past ``max_len`` were never trained, so they raise instead of wrapping.
    """

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        if max_len < 1 or d_model < 1:
            raise ValueError(
                f"max_len and d_model must be at least 1, got max_len={max_len}, d_model={d_model}"
            )
        self.max_len = max_len
        self.d_model = d_model
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x + weight[offset : offset + T]``; x is ``(B, T, D)``, returns ``(B, T, D)``."""
        _check_embedding_input(x, self.d_model, offset, self.max_len)
        seq = x.shape[1]
        positions = torch.arange(offset, offset + seq, device=x.device)  # (T,)
        return x + self.embedding(positions)  # (T, D) broadcasts over B


# ---------------------------------------------------------------------------------------------
# Attention biases: float (1, H, q_len, k_len) tensors added to the attention scores
# ---------------------------------------------------------------------------------------------


def _key_minus_query(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Relative position ``key_pos - query_pos``, shape ``(q_len, k_len)``.

    The queries are the *last* q_len of the k_len positions (bottom-right alignment): with a
    KV cache holding k_len keys, query i sits at position k_len - q_len + i.
    """
    if q_len < 1 or k_len < 1 or q_len > k_len:
        raise ValueError(
            f"need 1 <= q_len <= k_len (the queries are the last q_len key positions), "
            f"got q_len={q_len}, k_len={k_len}"
        )
    query_pos = torch.arange(k_len - q_len, k_len, device=device)  # (q_len,)
    key_pos = torch.arange(k_len, device=device)  # (k_len,)
    return key_pos[None, :] - query_pos[:, None]  # (q_len, k_len)


def _bucket_layout(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[int, int]:
    """Buckets per direction and how many of them are exact; ValueError if they cannot work."""
    half = num_buckets // 2 if bidirectional else num_buckets  # buckets for one direction
    max_exact = half // 2  # distances 0..max_exact-1 get one bucket each
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(
            f"need at least 2 buckets per direction and max_distance > {max_exact}, got "
            f"num_buckets={num_buckets}, max_distance={max_distance}, bidirectional={bidirectional}"
        )
    return half, max_exact


def relative_position_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """T5's bucket id for each ``key_pos - query_pos``; same shape as the input, int64.

    Small distances get a bucket each; larger ones share log-spaced buckets up to
    ``max_distance``, beyond which all distances share the last bucket. ``bidirectional``
    spends half the buckets on keys after the query; otherwise every future key falls in
    bucket 0 (a decoder masks them anyway). Same arithmetic, in float32, as Mesh TensorFlow's
    and Hugging Face's ``T5Attention._relative_position_bucket``, so the ids match exactly.
    """
    if relative_position.is_floating_point() or relative_position.is_complex():
        raise ValueError(
            f"relative_position must be an integer tensor, got dtype={relative_position.dtype}"
        )
    half, max_exact = _bucket_layout(bidirectional, num_buckets, max_distance)
    if bidirectional:
        buckets = (relative_position > 0).long() * half  # keys after the query: upper half
        distance = relative_position.abs()
    else:
        buckets = torch.zeros_like(relative_position, dtype=torch.long)
        distance = (-relative_position).clamp(min=0)  # future keys -> distance 0

    # Log-spaced buckets for max_exact <= distance < max_distance, clipped to the last bucket.
    # The clamp only keeps log() away from 0 for the short distances torch.where drops anyway.
    scaled = torch.log(distance.clamp(min=max_exact).float() / max_exact)
    log_bucket = (
        max_exact + (scaled / math.log(max_distance / max_exact) * (half - max_exact)).long()
    )
    log_bucket = log_bucket.clamp(max=half - 1)

    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias (Raffel et al. 2020).

    Each head learns one score per distance bucket (``self.embedding``, an
    ``nn.Embedding(num_buckets, n_heads)``); the score of a key depends only on its bucket of
    ``key_pos - query_pos``. T5 computes it in the first layer and reuses it in every layer.
    This is a pure bias: a decoder (``bidirectional=False``) still needs its causal mask.
    """

    def __init__(
        self,
        n_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be at least 1, got n_heads={n_heads}")
        _bucket_layout(bidirectional, num_buckets, max_distance)  # fail now, not at forward
        self.n_heads = n_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        """Bias of shape ``(1, H, q_len, k_len)``, on the embedding's device and dtype.

        The queries are the last q_len of the k_len positions, so ``forward(1, k_len)`` is the
        last row of ``forward(k_len, k_len)``: what one decoding step with a KV cache needs.
        """
        relative = _key_minus_query(q_len, k_len, self.embedding.weight.device)  # (q_len, k_len)
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        bias = self.embedding(buckets)  # (q_len, k_len, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, q_len, k_len)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes, shape ``(n_heads,)``, float32.

    For n_heads a power of two, the geometric sequence ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``.
    Otherwise, as in the paper's reference code: the slopes of the closest lower power of two
    p, then every other slope of 2p (the odd ones) until there are n_heads.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be at least 1, got n_heads={n_heads}")
    p = 2 ** math.floor(math.log2(n_heads))  # closest power of two <= n_heads
    k = torch.arange(1, p + 1, dtype=torch.float64)
    slopes = 2.0 ** (-8.0 * k / p)  # (p,)
    odd_k = 2 * torch.arange(n_heads - p, dtype=torch.float64) + 1  # 1, 3, 5, ...
    extra = 2.0 ** (-8.0 * odd_k / (2 * p))  # (n_heads - p,), interleaves between slopes
    return torch.cat([slopes, extra]).float()


class ALiBi(nn.Module):
    """Attention with Linear Biases (Press et al. 2022): ``-slope_h * distance`` per head.

    No parameters; the slopes sit in the non-persistent buffer ``slopes`` of shape ``(H,)``.

    - ``causal=True`` (decoders, as in the paper): ``bias[h, i, j] = -slope_h * (i - j)`` for
      keys j at or before query i, and ``-inf`` for future keys. Like the paper's reference
      code, the causal mask is folded in, so this tensor alone is a decoder's whole mask.
    - ``causal=False`` (encoders): the symmetric ``-slope_h * |i - j|``, nothing masked.
    """

    slopes: Tensor

    def __init__(self, n_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        """Bias of shape ``(1, H, q_len, k_len)``.

        The queries are the last q_len of the k_len positions (bottom-right alignment), so with
        a KV cache ``forward(1, k_len)`` is the last row of ``forward(k_len, k_len)``.
        """
        distance = -_key_minus_query(q_len, k_len, self.slopes.device)  # (q_len, k_len), i - j
        slopes = self.slopes[:, None, None]  # (H, 1, 1)
        if self.causal:
            bias = -slopes * distance  # (H, q_len, k_len)
            bias = bias.masked_fill(distance < 0, float("-inf"))
        else:
            bias = -slopes * distance.abs()
        return bias.unsqueeze(0)  # (1, H, q_len, k_len)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, causal={self.causal}"


# ---------------------------------------------------------------------------------------------
# Rotary embedding: rotates q and k of shape (B, H, T, head_dim) before their dot product
# ---------------------------------------------------------------------------------------------


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dim: x turned by 90 degrees.

    Dimension i pairs with dimension i + head_dim/2 (Hugging Face Llama's layout), not with
    its neighbour i + 1 as in the RoPE paper; both are rotations, but checkpoints need theirs.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x by the angles whose cosines and sines are given; returns x's shape and dtype.

    x is ``(B, H, T, head_dim)``; cos and sin are ``(T, head_dim)`` (same positions for every
    sequence) or ``(B, T, head_dim)`` (per-sequence positions), as made by
    ``RotaryEmbedding.cos_sin``. Each pair (x[i], x[i + head_dim/2]) turns by its angle.
    """
    if x.dim() != 4 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"expected x of shape (batch, heads, seq, head_dim) with an even head_dim, "
            f"got {tuple(x.shape)}"
        )
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(
            f"cos and sin must both be (seq, head_dim) or (batch, seq, head_dim), got "
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    batch, _, seq, head_dim = x.shape
    expected = (seq, head_dim) if cos.dim() == 2 else (batch, seq, head_dim)
    if cos.shape != expected:
        raise ValueError(
            f"cos/sin of shape {tuple(cos.shape)} do not fit x of shape {tuple(x.shape)}: "
            f"expected {expected}"
        )
    if cos.dim() == 3:  # (B, T, head_dim) -> (B, 1, T, head_dim), broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
    return x * cos + rotate_half(x) * sin


ROPE_SCALINGS = ("none", "linear", "ntk")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, RoPE (Su et al. 2021), in Hugging Face Llama's layout.

    Pair i of a head (dims i and i + head_dim/2) turns by ``position * rope_theta^(-2i/head_dim)``
    radians. Rotating q at position m and k at position n makes ``q_m . k_n`` depend only on
    m - n. ``rope_theta`` is the value of that name in Hugging Face configs (10000 for the
    original, 500000 for Llama 3).

    ``scaling`` stretches a trained model to ``factor`` times its context without training:

    - ``"linear"``, position interpolation (Chen et al. 2023): every angle divided by
      ``factor``, so position ``factor * p`` turns exactly as ``p`` did (Hugging Face's
      ``rope_type="linear"``).
    - ``"ntk"``, NTK-aware scaling (bloc97 2023): ``rope_theta * factor^(head_dim/(head_dim-2))``,
      which leaves the fastest pair as it was and slows the slowest pair by exactly ``factor``
      (Hugging Face's ``"dynamic"`` type uses this base, recomputed from the sequence length).

    cos and sin are computed from the positions at each call (no cache, hence no ``max_len``),
    in float32 with the same arithmetic as ``LlamaRotaryEmbedding``. The module has no
    parameters or buffers, so casting a model to bfloat16 cannot degrade the frequencies.
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
    ) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(
                f"head_dim must be even and positive, got head_dim={head_dim}: RoPE rotates "
                "dimensions in pairs"
            )
        if scaling not in ROPE_SCALINGS:
            raise ValueError(f"scaling must be one of {ROPE_SCALINGS}, got {scaling!r}")
        if factor < 1.0 or (scaling == "none" and factor != 1.0):
            raise ValueError(
                f"factor must be >= 1 (how many times longer the context becomes), and 1 "
                f"without scaling; got factor={factor}, scaling={scaling!r}"
            )
        if scaling == "ntk" and head_dim < 4:
            raise ValueError(f"NTK-aware scaling needs head_dim >= 4, got head_dim={head_dim}")
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.scaling = scaling
        self.factor = factor

    def inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        """Angular speed of each pair in radians per position, shape ``(head_dim/2,)``."""
        theta = self.rope_theta
        if self.scaling == "ntk":  # a larger base: slow pairs slow down, fast ones barely
            theta = theta * self.factor ** (self.head_dim / (self.head_dim - 2))
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (theta ** (exponents / self.head_dim))
        if self.scaling == "linear":  # position interpolation: every angle / factor
            inv_freq = inv_freq / self.factor
        return inv_freq

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of every angle, each ``positions.shape + (head_dim,)``, float32.

        positions is an integer tensor ``(T,)`` or ``(B, T)``.
        """
        if positions.is_floating_point() or positions.is_complex() or positions.dim() not in (1, 2):
            raise ValueError(
                f"positions must be an integer tensor of shape (seq,) or (batch, seq), got "
                f"shape {tuple(positions.shape)} and dtype {positions.dtype}"
            )
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # (..., T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, head_dim): pair i twice
        return angles.cos(), angles.sin()

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate queries and keys; returns ``(q_rot, k_rot)`` with the shapes of q and k.

        q is ``(B, H, T, head_dim)``; k is ``(B, kv_heads, T, head_dim)`` and may have fewer
        heads (grouped-query attention); positions is ``(T,)`` or ``(B, T)``, the absolute
        position of each token (e.g. ``cache_len + arange(T)`` while decoding). Keys are rotated
        once, before they enter a KV cache.
        """
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"expected q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, "
                f"head_dim), got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"q {tuple(q.shape)} and k {tuple(k.shape)} must end in head_dim={self.head_dim}"
            )
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(
                f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and seq sizes"
            )
        batch, seq = q.shape[0], q.shape[2]
        if positions.shape not in ((seq,), (batch, seq)):
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} do not fit q {tuple(q.shape)}: "
                f"expected ({seq},) or ({batch}, {seq})"
            )
        cos, sin = self.cos_sin(positions)  # (T, head_dim) or (B, T, head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        scaled = (
            "" if self.scaling == "none" else f", scaling={self.scaling!r}, factor={self.factor}"
        )
        return f"head_dim={self.head_dim}, rope_theta={self.rope_theta}{scaled}"
