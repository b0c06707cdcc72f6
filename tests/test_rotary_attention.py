"""RoPE wired into attention: what labkit's Llama will rely on."""

import pytest
import torch

from labkit.nn import KVCache, MultiHeadAttention, RotaryEmbedding


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_rotary_decoding_with_cache_equals_full_pass(device, n_kv_heads):
    mha = MultiHeadAttention(32, 4, n_kv_heads=n_kv_heads).to(device).eval()
    rope = RotaryEmbedding(8, rope_theta=500000.0)
    x = torch.randn(2, 9, 32, device=device)
    with torch.no_grad():
        full = mha(x, is_causal=True, rotary=rope).output
        cache = KVCache()
        chunks = [
            mha(x[:, a:b], is_causal=True, rotary=rope, cache=cache).output
            for a, b in [(0, 3), (3, 4), (4, 9)]
        ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    assert cache.k.shape == (2, n_kv_heads, 9, 8)


def test_rotary_makes_attention_order_aware(device):
    """Without positions self-attention is permutation-equivariant; with RoPE it is not."""
    mha = MultiHeadAttention(16, 2).to(device).eval()
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 6, 16, device=device)
    perm = torch.tensor([3, 0, 5, 1, 4, 2], device=device)
    with torch.no_grad():
        plain = mha(x).output
        plain_perm = mha(x[:, perm]).output
        rot = mha(x, rotary=rope).output
        rot_perm = mha(x[:, perm], rotary=rope).output
    torch.testing.assert_close(plain_perm, plain[:, perm], atol=1e-5, rtol=0)
    assert (rot_perm - rot[:, perm]).abs().max() > 1e-3


def test_explicit_positions_match_default_offsets(device):
    """Default positions continue from the cache length; passing them explicitly agrees."""
    mha = MultiHeadAttention(16, 2).to(device).eval()
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 5, 16, device=device)
    with torch.no_grad():
        default = mha(x, is_causal=True, rotary=rope).output
        explicit = mha(
            x, is_causal=True, rotary=rope, positions=torch.arange(5, device=device)
        ).output
        shifted = mha(
            x, is_causal=True, rotary=rope, positions=torch.arange(3, 8, device=device)
        ).output
    torch.testing.assert_close(explicit, default)
    # RoPE scores depend only on relative distance, so shifting every position changes nothing.
    torch.testing.assert_close(shifted, default, atol=1e-5, rtol=0)
