"""Efficient self-attention, all O(T) in sequence length: Linformer (low-rank keys and values
along the sequence axis), Nyströmformer (landmark approximation of the softmax matrix) and
Performer (FAVOR+: the softmax kernel estimated with positive random features).

Shapes use the symbols of ``labkit.nn.attention``: B batch, H heads, T sequence length.
"""

import math

import torch
from torch import Tensor, nn

from labkit.nn.attention import AttentionOutput, _check_input, scaled_dot_product_attention


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


# ---------------------------------------------------------------------------------------------
# Performer (FAVOR+): softmax attention through positive random features, O(T * m)
# ---------------------------------------------------------------------------------------------


def gaussian_projection(
    n_features: int,
    dim: int,
    *,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The random matrix W of FAVOR+, shape ``(n_features, dim)``; each row is N(0, I_dim).

    With ``orthogonal=True`` (the paper's default) the rows come in blocks of ``dim`` mutually
    orthogonal directions (QR of a Gaussian matrix), each row rescaled to the norm of an
    independent N(0, I_dim) draw, so every row is still exactly N(0, I_dim) (the estimator
    stays unbiased) but rows within a block never point the same way (lower variance).
    """
    if n_features < 1 or dim < 1:
        raise ValueError(
            f"n_features and dim must be at least 1, got n_features={n_features}, dim={dim}"
        )
    gaussian = torch.randn(n_features, dim, generator=generator, dtype=torch.float64)
    if not orthogonal:
        return gaussian.to(dtype)
    n_blocks = -(-n_features // dim)  # ceil: one square block per dim rows
    square = torch.randn(n_blocks, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(square)  # (n_blocks, dim, dim) orthonormal columns
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar, not QR's sign
    blocks = q.transpose(-2, -1).reshape(n_blocks * dim, dim)  # rows orthonormal per block
    directions = blocks[:n_features]  # (n_features, dim), unit rows
    return (directions * gaussian.norm(dim=-1, keepdim=True)).to(dtype)


def favor_features(x: Tensor, projection: Tensor) -> Tensor:
    """Positive random features: ``phi(x) = exp(W x - |x|² / 2) / sqrt(m)``, shape ``(..., m)``.

    x is ``(..., dim)`` and projection W ``(m, dim)`` with N(0, I) rows, so that for any x, y

        E[phi(x) · phi(y)] = exp(x · y)

    (the softmax kernel; Choromanski et al. 2021, lemma 1). Every feature is positive, unlike
    the sin/cos features of random Fourier features, so estimated attention weights cannot be
    negative. No stabilisation: large |x| can overflow (``performer_attention`` stabilises).
    """
    if x.shape[-1] != projection.shape[-1]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} and projection of shape {tuple(projection.shape)} "
            "must share their last dimension"
        )
    m = projection.shape[0]
    log_phi = x @ projection.T - x.square().sum(-1, keepdim=True) / 2  # (..., m)
    return torch.exp(log_phi) / math.sqrt(m)


def performer_attention(
    q: Tensor, k: Tensor, v: Tensor, projection: Tensor, causal: bool = False
) -> Tensor:
    """FAVOR+ estimate of ``softmax(q kᵀ / sqrt(d)) v`` in O(T * m * d) time, no T x T matrix.

    q and k are ``(..., T, d)``, v ``(..., T, d_v)``, projection ``(m, d)``; returns
    ``(..., T, d_v)``. With features ``Q' = phi(q / d^¼)`` and ``K' = phi(k / d^¼)`` of shape
    (..., T, m), the weights ``Q' K'ᵀ`` are never formed: ``Q' (K'ᵀ v)`` and ``Q' (K'ᵀ 1)`` are
    computed right to left. ``causal=True`` replaces ``K'ᵀ v`` by its prefix sums over the keys
    up to each query (O(T * m * d_v) memory). Each query's features are scaled by their own
    maximum and all keys' by one shared maximum before ``exp``, which cancels in the ratio;
    a causal query whose visible keys all lie ~80 (float32) below the strongest key in log
    space still underflows to 0/0, a limit of one shared shift.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"expected q (..., T, d), k (..., T, d), v (..., T, d_v) with equal leading dims, "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if projection.dim() != 2 or projection.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"projection must be (n_features, d={q.shape[-1]}), got {tuple(projection.shape)}"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"causal Performer attention needs as many queries as keys, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    scale = q.shape[-1] ** -0.25  # phi(q/d^¼)·phi(k/d^¼) estimates exp(q·k / sqrt(d))
    q, k = q * scale, k * scale
    projection = projection.to(q.dtype)
    log_q = q @ projection.T - q.square().sum(-1, keepdim=True) / 2  # (..., T, m)
    log_k = k @ projection.T - k.square().sum(-1, keepdim=True) / 2  # (..., T, m)
    q_feat = torch.exp(log_q - log_q.amax(-1, keepdim=True))  # per query: cancels in the ratio
    k_feat = torch.exp(log_k - log_k.amax(dim=(-2, -1), keepdim=True))  # one shift for all keys
    if causal:
        kv = torch.cumsum(k_feat.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # (..., T, m, d_v)
        numerator = (q_feat.unsqueeze(-2) @ kv).squeeze(-2)  # (..., T, d_v)
        denominator = (q_feat * torch.cumsum(k_feat, dim=-2)).sum(-1, keepdim=True)  # (.., T, 1)
    else:
        numerator = q_feat @ (k_feat.transpose(-2, -1) @ v)  # (..., T, m) @ (..., m, d_v)
        denominator = q_feat @ k_feat.sum(-2).unsqueeze(-1)  # (..., T, 1)
    return numerator / denominator


class PerformerSelfAttention(nn.Module):
    """Performer self-attention (Choromanski et al. 2021, FAVOR+): O(T * m) instead of O(T²).

    Multi-head attention whose softmax is estimated with ``n_features`` = m positive random
    features per head (``performer_attention``); one projection, the buffer ``projection`` of
    shape (m, head_dim), is shared by the heads. The estimate is unbiased for the unnormalised
    weights and its error shrinks as m grows; ``redraw`` draws a new projection (the paper
    redraws during training). ``causal=True`` lets each query see only the keys up to itself.
    """

    projection: Tensor

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_features: int,
        causal: bool = False,
        orthogonal: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_features < 1:
            raise ValueError(f"n_features must be at least 1, got {n_features}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.n_features = n_features
        self.causal = causal
        self.orthogonal = orthogonal
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.register_buffer(
            "projection", gaussian_projection(n_features, self.head_dim, orthogonal=orthogonal)
        )

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Replace the random projection by a fresh draw (same device and dtype)."""
        fresh = gaussian_projection(
            self.n_features, self.head_dim, orthogonal=self.orthogonal, generator=generator
        )
        self.projection.copy_(fresh)

    def forward(self, x: Tensor) -> AttentionOutput:
        """x: (B, T, d_model) -> output (B, T, d_model); weights are never formed (None)."""
        _check_input("x", x, self.d_model)
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        out = performer_attention(q, k, v, self.projection, causal=self.causal)  # (B,H,T,d_k)
        out = out.transpose(1, 2).reshape(batch, seq, self.d_model)  # (B, T, d_model)
        return AttentionOutput(self.out_proj(out), None)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_features={self.n_features}, "
            f"causal={self.causal}, orthogonal={self.orthogonal}"
        )
