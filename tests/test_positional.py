"""Tests for labkit.nn: each encoding against a plain formula or the transformers code.

References: a per-element math loop (sinusoidal), Hugging Face T5 (relative buckets and bias),
Llama (rotary) and BLOOM (ALiBi slopes), all built from tiny configs, nothing downloaded.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, T5Config
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.t5.modeling_t5 import T5Attention

from labkit.nn import (
    ALiBi,
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
    rotate_half,
    sinusoidal_table,
)

# ---------------------------------------------------------------------------------------------
# Sinusoidal table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_sinusoidal_table_equals_per_element_formula(device, base):
    max_len, d_model = 7, 10
    expected = torch.zeros(max_len, d_model, dtype=torch.float64)
    for pos in range(max_len):
        for i in range(d_model // 2):
            angle = pos / base ** (2 * i / d_model)
            expected[pos, 2 * i] = math.sin(angle)
            expected[pos, 2 * i + 1] = math.cos(angle)

    table = sinusoidal_table(max_len, d_model, base, device=device)

    assert table.shape == (max_len, d_model)
    assert table.dtype == torch.float32
    assert table.device.type == device.type
    torch.testing.assert_close(table.cpu().double(), expected, atol=1e-6, rtol=0)


def test_sinusoidal_table_is_float64_accurate_at_large_positions():
    # Computed in float64 throughout: a float32 frequency or table is off by ~1e-4 at 4095.
    table = sinusoidal_table(4096, 64, dtype=torch.float64)
    for pos in (1, 1000, 4095):
        for i in range(32):
            angle = pos / 10000.0 ** (2 * i / 64)
            assert abs(table[pos, 2 * i].item() - math.sin(angle)) < 1e-12, (pos, i)
            assert abs(table[pos, 2 * i + 1].item() - math.cos(angle)) < 1e-12, (pos, i)


def test_sinusoidal_table_smallest_sizes():
    # One position and one frequency are enough.
    torch.testing.assert_close(sinusoidal_table(1, 2), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(
        sinusoidal_table(2, 2), torch.tensor([[0.0, 1.0], [math.sin(1.0), math.cos(1.0)]])
    )


def test_sinusoidal_table_values_bounded_and_start_at_sin0_cos0():
    table = sinusoidal_table(4096, 64)
    assert table.abs().max() <= 1.0
    first = torch.tensor([0.0, 1.0]).repeat(32)  # position 0: sin 0, cos 0 for every frequency
    torch.testing.assert_close(table[0], first)
    # Every column moves: a constant column would carry no position information.
    assert (table.std(dim=0) > 1e-3).all()


def test_sinusoidal_dot_product_depends_only_on_offset():
    # PE[p] . PE[p+k] = sum_i cos(k * w_i): the same for every p.
    table = sinusoidal_table(64, 32, dtype=torch.float64)
    gram = table @ table.T  # (64, 64)
    for k in range(0, 20):
        along_diagonal = torch.diagonal(gram, offset=k)  # gram[p, p+k] for every p
        torch.testing.assert_close(along_diagonal, along_diagonal[0].expand_as(along_diagonal))
    # ...and it does change with k, so the check above is not trivially true.
    assert not torch.allclose(gram[0, 1], gram[0, 5])


@pytest.mark.parametrize("d_model", [7, 1, 0])
def test_sinusoidal_table_rejects_odd_or_empty_d_model(d_model):
    message = (
        f"^d_model must be even and positive, got d_model={d_model}: every frequency fills two "
        "columns, one sine and one cosine$"
    )
    with pytest.raises(ValueError, match=message):
        sinusoidal_table(16, d_model)


def test_sinusoidal_table_rejects_empty_max_len():
    with pytest.raises(ValueError, match="max_len=0"):
        sinusoidal_table(0, 8)


# ---------------------------------------------------------------------------------------------
# Absolute position modules: sinusoidal and learned
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_module_adds_table_slice_at_offset(device):
    module = SinusoidalPositionalEncoding(d_model=16, max_len=32).to(device)
    x = torch.randn(2, 5, 16, device=device)
    table = sinusoidal_table(32, 16, device=device)

    torch.testing.assert_close(module(x), x + table[:5])
    out = module(x, offset=9)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out, x + table[9:14])
    # Decoding token by token with offsets gives the same as encoding the whole sequence.
    steps = [module(x[:, t : t + 1], offset=t) for t in range(5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), module(x))


def test_sinusoidal_module_table_is_a_non_persistent_buffer():
    module = SinusoidalPositionalEncoding(d_model=8, max_len=10, base=50.0)
    assert dict(module.named_buffers())["pe"].shape == (10, 8)
    assert list(module.parameters()) == []
    assert module.state_dict() == {}
    torch.testing.assert_close(module.pe, sinusoidal_table(10, 8, 50.0))


def test_sinusoidal_module_keeps_input_dtype():
    module = SinusoidalPositionalEncoding(d_model=8, max_len=10)
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    assert module(x).dtype == torch.bfloat16


def test_learned_embedding_adds_rows_at_offset(device):
    module = LearnedPositionalEmbedding(max_len=12, d_model=6).to(device)
    x = torch.randn(3, 4, 6, device=device)

    out = module(x, offset=5)

    assert out.shape == (3, 4, 6)
    torch.testing.assert_close(out, x + module.embedding.weight[5:9])
    torch.testing.assert_close(module(x), x + module.embedding.weight[:4])


def test_learned_embedding_trains_only_the_rows_it_used():
    module = LearnedPositionalEmbedding(max_len=12, d_model=6)
    module(torch.zeros(2, 3, 6), offset=4).sum().backward()
    grad_norm_per_row = module.embedding.weight.grad.norm(dim=1)
    used = torch.zeros(12, dtype=torch.bool)
    used[4:7] = True
    assert (grad_norm_per_row[used] > 0).all()
    assert (grad_norm_per_row[~used] == 0).all()


@pytest.mark.parametrize(
    "make",
    [lambda: SinusoidalPositionalEncoding(8, 10), lambda: LearnedPositionalEmbedding(10, 8)],
    ids=["sinusoidal", "learned"],
)
class TestAbsoluteEncodingErrors:
    def test_sequence_longer_than_table(self, make):
        with pytest.raises(ValueError, match=r"seq=11, offset=0\).*max_len=10"):
            make()(torch.zeros(1, 11, 8))

    def test_offset_pushes_past_table(self, make):
        module = make()
        module(torch.zeros(1, 4, 8), offset=6)  # positions 6..9: the last ones that exist
        with pytest.raises(ValueError, match=r"seq=4, offset=7\).*max_len=10"):
            module(torch.zeros(1, 4, 8), offset=7)

    def test_negative_offset(self, make):
        with pytest.raises(ValueError, match="offset=-1"):
            make()(torch.zeros(1, 4, 8), offset=-1)

    @pytest.mark.parametrize("shape", [(1, 4, 7), (4, 8)])
    def test_wrong_shape(self, make, shape):
        with pytest.raises(ValueError, match=rf"d_model=8\), got {re.escape(str(shape))}"):
            make()(torch.zeros(shape))


def test_sinusoidal_module_defaults_and_full_length_message():
    module = SinusoidalPositionalEncoding(8)
    assert module.pe.shape == (2048, 8) and repr(module).endswith("(d_model=8, max_len=2048)")
    with pytest.raises(ValueError) as error:
        SinusoidalPositionalEncoding(8, max_len=10)(torch.zeros(1, 4, 8), offset=7)
    assert str(error.value) == (
        "positions up to offset + seq = 7 + 4 = 11 requested (seq=4, offset=7), but the table "
        "only holds max_len=10"
    )


def test_learned_embedding_smallest_table():
    module = LearnedPositionalEmbedding(max_len=1, d_model=1)
    x = torch.randn(2, 1, 1)
    torch.testing.assert_close(module(x), x + module.embedding.weight[0])


@pytest.mark.parametrize("max_len, d_model", [(0, 8), (8, 0)])
def test_learned_embedding_rejects_empty_table(max_len, d_model):
    with pytest.raises(ValueError, match=f"max_len={max_len}, d_model={d_model}$"):
        LearnedPositionalEmbedding(max_len, d_model)


# ---------------------------------------------------------------------------------------------
# T5 relative position bias
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 40), (8, 16), (4, 8)])
def test_relative_buckets_equal_t5(device, bidirectional, num_buckets, max_distance):
    relative = torch.arange(-300, 301, device=device)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert ours.dtype == torch.long
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.min() == 0 and ours.max() == num_buckets - 1  # every bucket range is reached


def test_relative_buckets_defaults_are_t5s():
    relative = torch.arange(-300, 301)
    torch.testing.assert_close(
        relative_position_bucket(relative),
        T5Attention._relative_position_bucket(relative),  # bidirectional, 32 buckets, 128
        rtol=0,
        atol=0,
    )
    module = RelativePositionBias(1)
    assert module.embedding.weight.shape == (32, 1)
    assert module.extra_repr() == (
        "n_heads=1, num_buckets=32, max_distance=128, bidirectional=True"
    )


def test_relative_buckets_hand_checked():
    relative = torch.tensor([0, -1, -2, -3, -7, -9, -15, -16, -1000, 1, 2, 9, 1000])
    # Bidirectional, 8 buckets: 4 per direction, distances 0 and 1 exact, then
    # 2 + floor(log(d / 2) / log(16 / 2) * 2) clipped at 3; keys after the query add 4.
    expected = torch.tensor([0, 1, 2, 2, 3, 3, 3, 3, 3, 5, 6, 7, 7])
    torch.testing.assert_close(relative_position_bucket(relative, True, 8, 16), expected)
    # Unidirectional: all 8 buckets look back, distances 0..3 exact, then
    # 4 + floor(log(d / 4) / log(16 / 4) * 4) clipped at 7; future keys share bucket 0.
    expected_causal = torch.tensor([0, 1, 2, 3, 5, 6, 7, 7, 7, 0, 0, 0, 0])
    torch.testing.assert_close(relative_position_bucket(relative, False, 8, 16), expected_causal)


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("q_len, k_len", [(6, 6), (1, 9), (3, 40)])
def test_relative_bias_equals_t5_compute_bias(device, is_decoder, q_len, k_len):
    config = T5Config(
        d_model=16,
        d_kv=4,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        is_decoder=is_decoder,
    )
    t5 = T5Attention(config, has_relative_attention_bias=True, layer_idx=0).to(device)
    ours = RelativePositionBias(3, num_buckets=8, max_distance=20, bidirectional=not is_decoder)
    ours = ours.to(device)
    with torch.no_grad():
        ours.embedding.weight.copy_(t5.relative_attention_bias.weight)

    bias = ours(q_len, k_len)

    # T5 counts cached tokens with past_seen_tokens; ours puts the queries last.
    expected = t5.compute_bias(q_len, k_len, device=device, past_seen_tokens=k_len - q_len)
    assert bias.shape == (1, 3, q_len, k_len)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_relative_bias_cached_step_is_last_row_of_full_bias():
    module = RelativePositionBias(2, num_buckets=8, max_distance=16)
    torch.testing.assert_close(module(1, 7), module(7, 7)[:, :, -1:])


def test_relative_bucket_errors():
    with pytest.raises(ValueError, match="integer tensor.*float32"):
        relative_position_bucket(torch.zeros(3), True, 32, 128)
    with pytest.raises(ValueError, match="num_buckets=2, max_distance=128"):
        relative_position_bucket(torch.zeros(3, dtype=torch.long), True, 2, 128)
    with pytest.raises(ValueError, match="max_distance=4"):
        RelativePositionBias(4, num_buckets=16, max_distance=4)
    with pytest.raises(ValueError, match="n_heads=0"):
        RelativePositionBias(0)
    # 2 buckets: one per direction, no exact one; enough for a decoder. Refused when built.
    RelativePositionBias(4, num_buckets=2, max_distance=8, bidirectional=False)
    with pytest.raises(ValueError, match="num_buckets=2, max_distance=8, bidirectional=True$"):
        RelativePositionBias(4, num_buckets=2, max_distance=8)


# ---------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads", [4, 8, 12, 6, 1, 3, 20])
def test_alibi_slopes_equal_bloom(n_heads):
    # BLOOM's alibi for an unpadded row is slope_h * key_position; position 1 holds the slopes.
    bloom = build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)  # (H, 1, 2)
    slopes = alibi_slopes(n_heads)
    assert slopes.shape == (n_heads,) and slopes.dtype == torch.float32
    torch.testing.assert_close(slopes, bloom[:, 0, 1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_heads", [1, 2, 4, 8, 16])
def test_alibi_slopes_closed_form_for_powers_of_two(n_heads):
    expected = torch.tensor([2.0 ** (-8.0 * k / n_heads) for k in range(1, n_heads + 1)])
    torch.testing.assert_close(alibi_slopes(n_heads), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("n_heads", [3, 12, 160, 300, 512])
def test_alibi_slopes_are_the_float64_formula_rounded_once(n_heads):
    # float32 exponents give slopes one ulp off from about 160 heads on.
    p = 2 ** math.floor(math.log2(n_heads))
    exponents = [-8.0 * k / p for k in range(1, p + 1)]
    exponents += [-8.0 * (2 * j + 1) / (2 * p) for j in range(n_heads - p)]
    expected = torch.tensor([2.0**e for e in exponents], dtype=torch.float64).float()
    assert torch.equal(alibi_slopes(n_heads), expected)


def test_alibi_slopes_non_power_of_two_interleave():
    # Paper rule for 6 heads: the 4 slopes of 4 heads, then slopes 1 and 3 of 8 heads.
    expected = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected), rtol=1e-7, atol=0)


def test_alibi_causal_bias_hand_checked(device):
    bias = ALiBi(2).to(device)(3, 3)
    inf = float("inf")
    distance_penalty = torch.tensor([[0.0, -inf, -inf], [-1.0, 0.0, -inf], [-2.0, -1.0, 0.0]])
    expected = torch.stack([distance_penalty * 2**-4, distance_penalty * 2**-8])[None]
    assert bias.shape == (1, 2, 3, 3)
    torch.testing.assert_close(bias, expected.to(device))


def test_alibi_symmetric_bias_hand_checked(device):
    bias = ALiBi(1, causal=False).to(device)(3, 3)
    expected = -(2**-8) * torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    torch.testing.assert_close(bias, expected[None, None].to(device))


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_cached_step_is_last_rows_of_full_bias(causal):
    alibi = ALiBi(4, causal=causal)
    torch.testing.assert_close(alibi(1, 9), alibi(9, 9)[:, :, -1:])
    torch.testing.assert_close(alibi(3, 9), alibi(9, 9)[:, :, -3:])


def test_alibi_attention_equals_bloom_with_causal_mask(device):
    # BLOOM adds slope * key_position instead of -slope * (i - j): the two differ by a
    # per-row constant, which softmax ignores, so the attention weights must match.
    n_heads, seq = 6, 7
    scores = torch.randn(1, n_heads, seq, seq, device=device)
    ours = torch.softmax(scores + ALiBi(n_heads).to(device)(seq, seq), dim=-1)

    bloom = build_alibi_tensor(torch.ones(1, seq, device=device), n_heads, torch.float32)
    future = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
    bloom_scores = (scores + bloom[None]).masked_fill(future, float("-inf"))
    torch.testing.assert_close(ours, torch.softmax(bloom_scores, dim=-1))


def test_alibi_slopes_are_a_non_persistent_buffer():
    alibi = ALiBi(8)
    torch.testing.assert_close(alibi.slopes, alibi_slopes(8))
    assert alibi.state_dict() == {}


def test_biases_for_a_single_position_and_head():
    # One query over one key: distance 0, so ALiBi adds 0 and T5 adds bucket 0's score.
    assert torch.equal(ALiBi(1)(1, 1), torch.zeros(1, 1, 1, 1))
    t5 = RelativePositionBias(1, num_buckets=4, max_distance=8)
    torch.testing.assert_close(t5(1, 1), t5.embedding.weight[0].reshape(1, 1, 1, 1))
    assert repr(ALiBi(3, causal=False)) == "ALiBi(n_heads=3, causal=False)"


def test_alibi_errors():
    with pytest.raises(ValueError, match="n_heads=0"):
        ALiBi(0)
    with pytest.raises(ValueError, match="q_len=5, k_len=3"):
        ALiBi(4)(5, 3)
    with pytest.raises(ValueError, match="q_len=0, k_len=3"):
        RelativePositionBias(4)(0, 3)


@pytest.mark.parametrize(
    "make_bias",
    [lambda: ALiBi(4)(5, 5), lambda: RelativePositionBias(4)(5, 5)],
    ids=["alibi", "t5"],
)
def test_biases_work_as_float_masks_of_sdpa(make_bias):
    # The contract with attention: added to q.k^T / sqrt(head_dim) before the softmax.
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    bias = make_bias()
    assert bias.dtype == torch.float32
    explicit = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8) + bias, dim=-1) @ v
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), explicit)


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------


def _hf_llama_rotary(q, k, position_ids, head_dim, rope_theta):
    """Reference: transformers' Llama rotary on the same inputs (position_ids is (B, T))."""
    config = LlamaConfig(
        hidden_size=head_dim * q.shape[1],
        num_attention_heads=q.shape[1],
        num_key_value_heads=k.shape[1],
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    rotary = LlamaRotaryEmbedding(config=config).to(q.device)
    cos, sin = rotary(q, position_ids)
    return apply_rotary_pos_emb(q, k, cos, sin)


def test_rotary_equals_llama_with_offset_positions(device):
    head_dim, theta = 16, 500000.0
    q = torch.randn(2, 4, 6, head_dim, device=device)
    k = torch.randn(2, 2, 6, head_dim, device=device)  # grouped-query: fewer key heads
    positions = torch.arange(7, 13, device=device)

    q_rot, k_rot = RotaryEmbedding(head_dim, rope_theta=theta)(q, k, positions)

    q_ref, k_ref = _hf_llama_rotary(q, k, positions.expand(2, -1), head_dim, theta)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    torch.testing.assert_close(q_rot, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot, k_ref, atol=1e-5, rtol=0)


def test_rotary_equals_llama_with_per_sequence_positions(device):
    head_dim, theta = 8, 500000.0
    q = torch.randn(3, 2, 5, head_dim, device=device)
    k = torch.randn(3, 1, 5, head_dim, device=device)
    # e.g. left padding: each sequence starts at its own position
    positions = torch.stack([torch.arange(0, 5), torch.arange(3, 8), torch.arange(40, 45)])
    positions = positions.to(device)

    q_rot, k_rot = RotaryEmbedding(head_dim, rope_theta=theta)(q, k, positions)

    q_ref, k_ref = _hf_llama_rotary(q, k, positions, head_dim, theta)
    torch.testing.assert_close(q_rot, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot, k_ref, atol=1e-5, rtol=0)


def test_rotary_theta_changes_the_result():
    # Guards the Llama comparison: if rope_theta were ignored, it would still pass at 10000.
    q = torch.randn(1, 1, 4, 8)
    positions = torch.arange(4, 8)
    default, _ = RotaryEmbedding(8)(q, q, positions)
    llama3, _ = RotaryEmbedding(8, rope_theta=500000.0)(q, q, positions)
    assert not torch.allclose(default, llama3, atol=1e-3)


def test_rotary_preserves_norms(device):
    q = torch.randn(2, 3, 10, 16, device=device)
    positions = torch.arange(100, 110, device=device)
    q_rot, k_rot = RotaryEmbedding(16)(q, q[:, :1], positions)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.norm(dim=-1), q[:, :1].norm(dim=-1))
    assert not torch.allclose(q_rot, q, atol=1e-2)  # it did rotate


def test_rotary_scores_depend_only_on_relative_position(device):
    rope = RotaryEmbedding(16)
    q = F.normalize(torch.randn(1, 2, 8, 16, device=device), dim=-1)
    k = F.normalize(torch.randn(1, 2, 8, 16, device=device), dim=-1)
    positions = torch.arange(8, device=device)

    def scores(shift: int) -> torch.Tensor:
        q_rot, k_rot = rope(q, k, positions + shift)
        return q_rot @ k_rot.transpose(-2, -1)  # (1, 2, 8, 8): q_m . k_n

    torch.testing.assert_close(scores(0), scores(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores(0), scores(31), atol=1e-5, rtol=0)
    # Without rotation the scores would be q . k; with it they vary with m - n.
    assert not torch.allclose(scores(0), q @ k.transpose(-2, -1), atol=1e-2)


def test_rotate_half_pairs_first_and_second_half():
    x = torch.arange(1.0, 7.0)  # pairs (1, 4), (2, 5), (3, 6)
    torch.testing.assert_close(rotate_half(x), torch.tensor([-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]))


def test_rotary_gradcheck():
    rope = RotaryEmbedding(4)
    positions = torch.tensor([[0, 3, 9], [2, 2, 5]])
    cos, sin = (t.double().requires_grad_() for t in rope.cos_sin(positions))
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(apply_rotary, (x, cos, sin))
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: rope(q, k, positions), (q, k))


def test_rotary_smallest_head_dim_is_a_plane_rotation():
    rope = RotaryEmbedding(2)  # one pair, angular speed 1 radian per position
    assert repr(rope) == "RotaryEmbedding(head_dim=2, rope_theta=10000.0)"
    x = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    q_rot, _ = rope(x, x, torch.tensor([3]))
    torch.testing.assert_close(q_rot.flatten(), torch.tensor([math.cos(3.0), math.sin(3.0)]))


def test_rotary_keeps_input_dtype():
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    q_rot, k_rot = RotaryEmbedding(8)(q, q, torch.arange(3))
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16


def test_rotary_errors():
    with pytest.raises(ValueError) as error:
        RotaryEmbedding(7)
    assert str(error.value) == (
        "head_dim must be even and positive, got head_dim=7: RoPE rotates dimensions in pairs"
    )
    rope = RotaryEmbedding(8)
    q = torch.zeros(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"k \(2, 4, 5, 6\).*head_dim=8"):
        rope(q, torch.zeros(2, 4, 5, 6), torch.arange(5))
    with pytest.raises(ValueError, match=r"got q \(4, 5, 8\)"):
        rope(q[0], q, torch.arange(5))
    with pytest.raises(ValueError, match=r"share batch and seq"):
        rope(q, torch.zeros(2, 4, 6, 8), torch.arange(5))
    with pytest.raises(ValueError, match=r"positions of shape \(6,\).*expected \(5,\) or \(2, 5\)"):
        rope(q, q, torch.arange(6))
    with pytest.raises(ValueError, match="integer tensor.*torch.float32"):
        rope(q, q, torch.arange(5.0))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 5\) and dtype torch.int64$"):
        rope.cos_sin(torch.zeros(1, 2, 5, dtype=torch.long))
    cos, sin = rope.cos_sin(torch.arange(5))
    with pytest.raises(ValueError, match=r"even head_dim, got \(2, 4, 5, 7\)"):
        apply_rotary(torch.zeros(2, 4, 5, 7), cos, sin)
    with pytest.raises(ValueError, match=r"cos/sin of shape \(5, 8\).*expected \(6, 8\)"):
        apply_rotary(torch.zeros(2, 4, 6, 8), cos, sin)
    # sin (1, 8) would broadcast against cos (5, 8): refused, not silently reused.
    with pytest.raises(ValueError) as error:
        apply_rotary(torch.zeros(2, 4, 5, 8), cos, sin[:1])
    assert str(error.value) == (
        "cos and sin must both be (seq, head_dim) or (batch, seq, head_dim), got cos (5, 8) "
        "and sin (1, 8)"
    )


# ---------------------------------------------------------------------------------------------
# RoPE scaling for longer contexts
# ---------------------------------------------------------------------------------------------


def _hf_inv_freq(rope_type: str, head_dim: int, theta: float, factor: float, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=64,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, "factor": factor},
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    return inv_freq


def test_linear_scaling_equals_hf_linear_rope():
    ours = RotaryEmbedding(16, rope_theta=100000.0, scaling="linear", factor=4.0).inv_freq()
    theirs = _hf_inv_freq("linear", 16, 100000.0, 4.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_ntk_scaling_equals_hf_dynamic_base_at_the_same_stretch():
    # HF's dynamic base is theta * (factor * T / max_pos - (factor - 1))^(d / (d - 2)):
    # with factor 2 at T = 1.5 * max_pos = 96 the bracket is exactly 2, our static factor.
    ours = RotaryEmbedding(16, rope_theta=10000.0, scaling="ntk", factor=2.0).inv_freq()
    theirs = _hf_inv_freq("dynamic", 16, 10000.0, 2.0, seq_len=96)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_linear_scaling_turns_position_factor_p_like_p():
    q = torch.randn(1, 2, 5, 8)
    positions = torch.arange(5)
    plain = RotaryEmbedding(8)(q, q, positions)
    stretched = RotaryEmbedding(8, scaling="linear", factor=3.0)(q, q, 3 * positions)
    torch.testing.assert_close(stretched, plain, atol=1e-5, rtol=0)


def test_ntk_scaling_keeps_the_fastest_pair_and_slows_the_slowest_by_factor():
    plain = RotaryEmbedding(32, rope_theta=10000.0).inv_freq()
    ntk = RotaryEmbedding(32, rope_theta=10000.0, scaling="ntk", factor=8.0).inv_freq()
    assert ntk[0] == plain[0]  # pair 0 turns one radian per position either way
    torch.testing.assert_close(ntk[-1], plain[-1] / 8.0, rtol=1e-5, atol=0)
    assert (ntk[1:] < plain[1:]).all()


def test_rope_scaling_errors():
    with pytest.raises(ValueError, match="scaling must be one of .*'yarn'"):
        RotaryEmbedding(8, scaling="yarn", factor=2.0)
    with pytest.raises(ValueError, match="factor must be >= 1.*factor=0.5"):
        RotaryEmbedding(8, scaling="linear", factor=0.5)
    with pytest.raises(ValueError, match="1 without scaling.*factor=2.0, scaling='none'"):
        RotaryEmbedding(8, factor=2.0)
    assert "scaling='ntk', factor=2.0" in repr(RotaryEmbedding(8, scaling="ntk", factor=2.0))
    # NTK-aware scaling needs a second pair to slow down; two pairs are enough.
    with pytest.raises(
        ValueError, match=r"^NTK-aware scaling needs head_dim >= 4, got head_dim=2$"
    ):
        RotaryEmbedding(2, scaling="ntk", factor=2.0)
    assert RotaryEmbedding(4, scaling="ntk", factor=2.0).inv_freq().shape == (2,)
