"""Attention masks: which keys each query may see (all bool, **True = may attend**).

Padding (``pad_sequences`` builds a padded batch and its attention mask; ``padding_mask``,
``padding_mask_from_ids``), causal (``causal_mask``) and the sparse
patterns of efficient attention: a local band (``sliding_window_mask``), Longformer's band plus
global tokens (``longformer_mask``) and BigBird-style blocks (``block_sparse_mask``).

A mask broadcasts to the scores shape ``(B, H, q_len, k_len)``; True = may attend, the same as
the ``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

Device = torch.device | str | None

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


def pad_sequences(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: str = "right",
    width: int | None = None,
    device: Device = None,
) -> tuple[Tensor, Tensor]:
    """Token id lists of different lengths -> ``(ids, attention_mask)``, both (B, width) long.

    Each row is padded with ``pad_id`` on ``side`` ("right", or "left" as batched generation
    needs) to ``width`` (default: the longest row); ``attention_mask`` is 1 on real tokens,
    0 on padding. The one padding helper of labkit: tokenizers, generation and the explorer
    all batch through it.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    longest = max((len(row) for row in rows), default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest row ({longest} tokens)")
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, cols] = torch.tensor(list(row), dtype=torch.long, device=device)
        mask[b, cols] = 1
    return ids, mask
