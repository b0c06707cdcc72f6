"""Mask builders of labkit.nn: every pattern checked entry by entry (True = may attend)."""

import pytest
import torch
import torch.nn.functional as F

from labkit.nn import (
    block_sparse_mask,
    causal_mask,
    longformer_mask,
    padding_mask,
    padding_mask_from_ids,
    sliding_window_mask,
)


def expected(n_rows: int, n_cols: int, rule) -> torch.Tensor:
    """Reference mask built with a plain Python loop over (i, j)."""
    return torch.tensor([[bool(rule(i, j)) for j in range(n_cols)] for i in range(n_rows)])


# --- causal ---------------------------------------------------------------------------------


def test_causal_mask_square_is_lower_triangle(device):
    mask = causal_mask(5, device=device)
    assert mask.dtype == torch.bool and mask.device.type == device.type
    assert torch.equal(mask.cpu(), torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("q_len, k_len", [(1, 6), (3, 7), (4, 4), (6, 3)])
def test_causal_mask_is_bottom_right_aligned(q_len, k_len, device):
    mask = causal_mask(q_len, k_len, device=device)
    assert mask.shape == (q_len, k_len)
    assert torch.equal(mask.cpu(), expected(q_len, k_len, lambda i, j: j <= i + (k_len - q_len)))
    if q_len <= k_len:  # the newest query sees every key
        assert mask[-1].all()


def test_causal_mask_matches_torch_is_causal_when_square(device):
    q, k, v = (torch.randn(1, 2, 6, 4, device=device) for _ in range(3))
    with_mask = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(6, device=device))
    with_flag = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(with_mask, with_flag)


def test_causal_mask_rejects_negative_length():
    with pytest.raises(ValueError, match="q_len must be >= 0, got -1"):
        causal_mask(-1)


# --- padding --------------------------------------------------------------------------------


def test_padding_mask_from_lengths(device):
    mask = padding_mask(torch.tensor([2, 4, 0], device=device), max_len=5)
    assert mask.shape == (3, 1, 1, 5) and mask.dtype == torch.bool
    assert mask.device.type == device.type
    want = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask[:, 0, 0].cpu(), want)


def test_padding_mask_default_max_len_and_list_input(device):
    mask = padding_mask([1, 3], device=device)
    assert mask.shape == (2, 1, 1, 3) and mask.device.type == device.type
    assert torch.equal(mask[:, 0, 0].cpu(), torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool))


@pytest.mark.parametrize(
    "lengths, max_len, message",
    [
        ([2, -1], None, r"lengths must be >= 0, got \[2, -1\]"),
        ([2, 6], 5, r"lengths must be <= max_len=5, got \[2, 6\]"),
        ([[1, 2]], None, r"1-D integer tensor \(batch,\), got shape \(1, 2\)"),
        ([1.5, 2.0], None, "dtype torch.float32"),
    ],
)
def test_padding_mask_rejects_bad_lengths(lengths, max_len, message):
    with pytest.raises(ValueError, match=message):
        padding_mask(lengths, max_len)


def test_padding_mask_from_ids(device):
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 8, 0]], device=device)
    mask = padding_mask_from_ids(ids, pad_id=0)
    assert mask.shape == (2, 1, 1, 4) and mask.device.type == device.type
    want = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask[:, 0, 0].cpu(), want)


def test_padding_mask_from_ids_rejects_1d_input():
    with pytest.raises(ValueError, match=r"\(batch, seq\), got shape \(4,\)"):
        padding_mask_from_ids(torch.tensor([1, 2, 0, 0]), pad_id=0)


# --- sliding window -------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, window", [(8, 0), (8, 2), (7, 3), (5, 9)])
def test_sliding_window_band(seq_len, window, device):
    mask = sliding_window_mask(seq_len, window, device=device)
    assert mask.shape == (seq_len, seq_len) and mask.device.type == device.type
    assert torch.equal(mask.cpu(), expected(seq_len, seq_len, lambda i, j: abs(i - j) <= window))
    w = min(window, seq_len - 1)  # a band wider than the sequence is clipped
    assert mask.sum().item() == seq_len * (2 * w + 1) - w * (w + 1)
    assert torch.equal(mask, mask.T)


@pytest.mark.parametrize("seq_len, window", [(8, 0), (8, 2), (5, 9)])
def test_causal_sliding_window_band(seq_len, window, device):
    mask = sliding_window_mask(seq_len, window, causal=True, device=device)
    assert torch.equal(mask.cpu(), expected(seq_len, seq_len, lambda i, j: 0 <= i - j <= window))
    w = min(window, seq_len - 1)
    assert mask.sum().item() == seq_len * (w + 1) - w * (w + 1) // 2


def test_sliding_window_rejects_negative_window():
    with pytest.raises(ValueError, match="window must be >= 0, got -1"):
        sliding_window_mask(5, -1)


# --- longformer -----------------------------------------------------------------------------


def test_longformer_global_rows_and_columns(device):
    seq_len, window, global_tokens = 10, 1, [0, 6]
    mask = longformer_mask(seq_len, window, global_tokens, device=device)
    assert mask.shape == (seq_len, seq_len) and mask.device.type == device.type
    assert mask[global_tokens, :].all() and mask[:, global_tokens].all()

    def rule(i, j):
        return abs(i - j) <= window or i in global_tokens or j in global_tokens

    assert torch.equal(mask.cpu(), expected(seq_len, seq_len, rule))


def test_longformer_without_global_tokens_is_the_sliding_window(device):
    mask = longformer_mask(6, 2, [], device=device)
    assert torch.equal(mask, sliding_window_mask(6, 2, device=device))


@pytest.mark.parametrize("bad", [[0, 10], [-1]])
def test_longformer_rejects_out_of_range_global_token(bad):
    with pytest.raises(ValueError, match=rf"global_tokens must be in \[0, 10\).*got \[{bad[-1]}\]"):
        longformer_mask(10, 1, bad)


# --- block sparse ---------------------------------------------------------------------------


def test_block_sparse_small_example_by_hand():
    # 6 tokens, blocks {0,1} {2,3} {4,5}; own block only, block 0 global.
    mask = block_sparse_mask(6, block_size=2, n_neighbour_blocks=0, n_global_blocks=1)
    want = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, want)


@pytest.mark.parametrize(
    "seq_len, block_size, neighbours, n_global, causal",
    [(12, 3, 1, 0, False), (12, 3, 0, 0, False), (10, 3, 1, 1, False), (16, 2, 2, 1, True)],
)
def test_block_sparse_pattern(seq_len, block_size, neighbours, n_global, causal, device):
    mask = block_sparse_mask(seq_len, block_size, neighbours, n_global, causal, device=device)
    assert mask.device.type == device.type

    def rule(i, j):
        bi, bj = i // block_size, j // block_size
        allowed = abs(bi - bj) <= neighbours or bi < n_global or bj < n_global
        return allowed and (j <= i or not causal)

    assert torch.equal(mask.cpu(), expected(seq_len, seq_len, rule))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size must be > 0, got 0"),
        ({"block_size": 2, "n_neighbour_blocks": -1}, "n_neighbour_blocks must be >= 0, got -1"),
        ({"block_size": 2, "n_global_blocks": -2}, "n_global_blocks must be >= 0, got -2"),
    ],
)
def test_block_sparse_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        block_sparse_mask(8, **kwargs)


def test_pad_sequences_pads_either_side_and_marks_real_tokens():
    from labkit.nn import pad_sequences

    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], 9, width=4)
    assert ids.tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="width=2 is shorter than the longest row"):
        pad_sequences([[1, 2, 3]], 0, width=2)
    with pytest.raises(ValueError, match="side must be"):
        pad_sequences([[1]], 0, side="middle")
