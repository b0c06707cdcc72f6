"""Efficient self-attention: Linformer (low-rank keys and values along the sequence axis) and
Nyströmformer (landmark approximation of the softmax matrix), both O(T) in sequence length.

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
