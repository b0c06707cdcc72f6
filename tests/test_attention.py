"""labkit.nn against PyTorch's references: scaled_dot_product_attention vs
F.scaled_dot_product_attention, MultiHeadAttention vs nn.MultiheadAttention, the KV cache vs a
full causal pass, and the efficient variants (Linformer, Nyström, Performer) vs exact softmax
attention."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit.nn import (
    AdditiveAttention,
    AttentionOutput,
    KVCache,
    LinformerSelfAttention,
    MultiHeadAttention,
    NystromSelfAttention,
    PerformerSelfAttention,
    causal_mask,
    favor_features,
    gaussian_projection,
    padding_mask,
    performer_attention,
    scaled_dot_product_attention,
)
from labkit.nn.attention import _sdpa_backend

TOL = {"atol": 1e-5, "rtol": 1e-5}


def exact_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full softmax attention with ``module``'s q/k/v/out projections, via torch's kernel."""
    batch, seq, _ = x.shape

    def split(t):
        return t.view(batch, seq, module.n_heads, module.head_dim).transpose(1, 2)

    q, k, v = split(module.q_proj(x)), split(module.k_proj(x)), split(module.v_proj(x))
    out = F.scaled_dot_product_attention(q, k, v)
    return module.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))


# ==============================================================================================
# scaled_dot_product_attention
# ==============================================================================================

LEADING_DIMS = [(2,), (2, 3), (2, 2, 3)]  # 3-D, 4-D and 5-D inputs


def random_qkv(lead, q_len, k_len, device, d_k=8, d_v=6, dtype=torch.float32):
    q = torch.randn(*lead, q_len, d_k, device=device, dtype=dtype)
    k = torch.randn(*lead, k_len, d_k, device=device, dtype=dtype)
    v = torch.randn(*lead, k_len, d_v, device=device, dtype=dtype)
    return q, k, v


def random_bool_mask(shape, device) -> torch.Tensor:
    """Random True = attend mask in which every query keeps at least its first key."""
    mask = torch.rand(shape, device=device) > 0.4
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("lead", LEADING_DIMS, ids=["3d", "4d", "5d"])
def test_sdpa_matches_torch_without_mask(lead, device):
    q, k, v = random_qkv(lead, 5, 7, device)
    out, _ = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL)


@pytest.mark.parametrize("lead", LEADING_DIMS, ids=["3d", "4d", "5d"])
def test_sdpa_matches_torch_with_bool_mask(lead, device):
    q, k, v = random_qkv(lead, 5, 7, device)
    mask = random_bool_mask((5, 7), device)  # broadcast over the leading dims
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)


@pytest.mark.parametrize("lead", LEADING_DIMS, ids=["3d", "4d", "5d"])
def test_sdpa_matches_torch_with_float_mask(lead, device):
    q, k, v = random_qkv(lead, 5, 7, device)
    bias = torch.randn(*lead, 5, 7, device=device)
    out, _ = scaled_dot_product_attention(q, k, v, mask=bias)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), **TOL)


@pytest.mark.parametrize("lead", LEADING_DIMS, ids=["3d", "4d", "5d"])
def test_sdpa_causal_matches_torch_for_square_scores(lead, device):
    q, k, v = random_qkv(lead, 6, 6, device)
    out, _ = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL)


def test_sdpa_causal_is_bottom_right_aligned_for_non_square_scores(device):
    q, k, v = random_qkv((2, 3), 3, 7, device)
    out, weights = scaled_dot_product_attention(q, k, v, is_causal=True)
    bottom_right = causal_mask(3, 7, device=device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)
    torch.testing.assert_close(out, want, **TOL)
    assert torch.all(weights[..., ~bottom_right] == 0)
    # torch's own is_causal aligns top-left, which is a different mask here.
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out, top_left, atol=1e-3)


def test_sdpa_combines_mask_and_causal_with_and(device):
    q, k, v = random_qkv((2, 3), 6, 6, device)
    mask = random_bool_mask((2, 1, 6, 6), device)
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=True)
    both = mask & causal_mask(6, device=device)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=both), **TOL)
    assert torch.all(weights.masked_select(~both) == 0)


def test_sdpa_custom_scale_matches_torch(device):
    q, k, v = random_qkv((2, 3), 5, 7, device)
    out, _ = scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), **TOL)


def test_sdpa_weights_are_a_distribution_and_masked_keys_get_exactly_zero(device):
    q, k, v = random_qkv((2, 3), 5, 7, device)
    mask = random_bool_mask((2, 1, 5, 7), device)
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask)
    assert weights.shape == (2, 3, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5, device=device))
    assert torch.all(weights.masked_select(~mask) == 0.0)
    assert torch.all(weights.masked_select(mask) > 0.0)
    torch.testing.assert_close(out, weights @ v, **TOL)


def test_sdpa_fully_masked_rows_give_zero_weights_and_zero_output(device):
    q, k, v = random_qkv((2, 3), 4, 5, device)
    q.requires_grad_(True)
    mask = random_bool_mask((2, 1, 4, 5), device)
    mask[0, :, 1] = False  # query 1 of batch 0 may attend nothing
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask)
    assert not out.isnan().any() and not weights.isnan().any()
    assert torch.all(out[0, :, 1] == 0) and torch.all(weights[0, :, 1] == 0)
    live = torch.ones(2, 3, 4, dtype=torch.bool, device=device)
    live[0, :, 1] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[live], want[live], **TOL)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[0, :, 1] == 0)


def test_sdpa_all_minus_inf_float_row_is_also_zeroed(device):
    q, k, v = random_qkv((1, 2), 3, 4, device)
    bias = torch.zeros(3, 4, device=device)
    bias[2] = float("-inf")
    out, weights = scaled_dot_product_attention(q, k, v, mask=bias)
    assert torch.all(out[..., 2, :] == 0) and torch.all(weights[..., 2, :] == 0)
    torch.testing.assert_close(out[..., :2, :], F.scaled_dot_product_attention(q, k, v)[..., :2, :])


def test_sdpa_causal_rows_before_the_first_key_are_zero(device):
    q, k, v = random_qkv((1,), 5, 3, device)  # q_len > k_len: queries 0, 1 see no key
    out, weights = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.all(out[:, :2] == 0) and torch.all(weights[:, :2] == 0)
    torch.testing.assert_close(weights[:, 2:].sum(-1), torch.ones(1, 3, device=device))


def test_sdpa_dropout_zeroes_and_rescales_weights(device):
    q, k, v = random_qkv((4, 2), 16, 16, device)
    _, clean = scaled_dot_product_attention(q, k, v)
    out, dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    kept = dropped != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.5)
    torch.testing.assert_close(out, dropped @ v, **TOL)


def test_sdpa_gradcheck_float64(device):
    q, k, v = random_qkv((1, 2), 3, 4, device, d_k=3, d_v=2, dtype=torch.float64)
    mask = random_bool_mask((3, 4), device)
    mask[1] = False  # a fully-masked row must stay differentiable too
    bias = torch.randn(3, 4, device=device, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=mask)[0], inputs
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=bias, is_causal=True)[0],
        inputs,
    )


@pytest.mark.parametrize(
    "shapes, message",
    [
        (
            ((2, 5, 8), (2, 7, 4), (2, 7, 6)),
            r"share the last dim d_k, got q \(2, 5, 8\) and k \(2, 7, 4\)",
        ),
        (
            ((2, 5, 8), (2, 7, 8), (2, 6, 6)),
            r"same length k_len, got k \(2, 7, 8\) and v \(2, 6, 6\)",
        ),
        (((2, 5, 8), (3, 7, 8), (3, 7, 6)), r"do not broadcast: q \(2, 5, 8\), k \(3, 7, 8\)"),
        (((8,), (7, 8), (7, 6)), r"at least 2 dims.*\(8,\)"),
    ],
)
def test_sdpa_rejects_mismatched_shapes(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        scaled_dot_product_attention(q, k, v)


def test_sdpa_rejects_mask_that_does_not_broadcast():
    q, k, v = random_qkv((2, 3), 5, 7, "cpu")
    with pytest.raises(ValueError, match=r"mask of shape \(5, 6\).*scores of shape \(2, 3, 5, 7\)"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 3, 5, 7\).*\(2, 3, 5, 7\)"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 3, 5, 7, dtype=torch.bool))


def test_sdpa_rejects_integer_mask():
    q, k, v = random_qkv((2,), 5, 7, "cpu")
    with pytest.raises(ValueError, match="bool .* or float .* got torch.int64"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(5, 7, dtype=torch.long))


# ==============================================================================================
# MultiHeadAttention vs nn.MultiheadAttention
# ==============================================================================================


def torch_and_labkit(device, bias=True, d_model=16, n_heads=4):
    """An nn.MultiheadAttention with random (non-zero) biases and its labkit copy."""
    ref = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True)
    if bias:  # torch initialises biases to zero, which would hide a bias bug
        nn.init.normal_(ref.in_proj_bias)
        nn.init.normal_(ref.out_proj.bias)
    ref = ref.to(device).eval()
    return ref, MultiHeadAttention.from_torch(ref).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_copies_every_weight(bias, device):
    ref, ours = torch_and_labkit(device, bias)
    assert ours.q_proj.weight.device.type == device.type
    q_w, k_w, v_w = ref.in_proj_weight.chunk(3)
    assert torch.equal(ours.q_proj.weight, q_w) and torch.equal(ours.k_proj.weight, k_w)
    assert torch.equal(ours.v_proj.weight, v_w)
    assert torch.equal(ours.out_proj.weight, ref.out_proj.weight)
    if bias:
        # Every bias, the key's included: softmax is blind to q . b_k (the same shift for every
        # key of a row), so no output comparison can catch a wrong or missing key bias.
        q_b, k_b, v_b = ref.in_proj_bias.chunk(3)
        assert torch.equal(ours.q_proj.bias, q_b) and torch.equal(ours.k_proj.bias, k_b)
        assert torch.equal(ours.v_proj.bias, v_b)
        assert torch.equal(ours.out_proj.bias, ref.out_proj.bias)
        # And the copy is a copy: changing torch's module afterwards leaves ours alone.
        k_b = k_b.clone()
        with torch.no_grad():
            ref.in_proj_bias.add_(1.0)
        assert torch.equal(ours.k_proj.bias, k_b)
    else:
        for proj in (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj):
            assert proj.bias is None


@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_matches_torch(bias, device):
    ref, ours = torch_and_labkit(device, bias)
    x = torch.randn(2, 5, 16, device=device)
    want, want_weights = ref(x, x, x)
    got = ours(x, need_weights=True)
    torch.testing.assert_close(got.output, want, **TOL)
    assert got.weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(got.weights.mean(1), want_weights, **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_mha_cross_attention_matches_torch(bias, device):
    ref, ours = torch_and_labkit(device, bias)
    x, memory = torch.randn(2, 5, 16, device=device), torch.randn(2, 9, 16, device=device)
    want, want_weights = ref(x, memory, memory)
    got = ours(x, memory, need_weights=True)
    torch.testing.assert_close(got.output, want, **TOL)
    torch.testing.assert_close(got.weights.mean(1), want_weights, **TOL)


def test_mha_cross_attention_with_separate_value_matches_torch(device):
    ref, ours = torch_and_labkit(device)
    x, key, value = (torch.randn(2, n, 16, device=device) for n in (5, 9, 9))
    torch.testing.assert_close(ours(x, key, value).output, ref(x, key, value)[0], **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_mha_key_padding_mask_matches_torch(bias, device):
    ref, ours = torch_and_labkit(device, bias)
    x = torch.randn(3, 6, 16, device=device)
    keep = padding_mask([6, 2, 4], device=device)  # (3, 1, 1, 6), True = attend
    want, want_weights = ref(x, x, x, key_padding_mask=~keep[:, 0, 0])  # torch: True = blocked
    got = ours(x, mask=keep, need_weights=True)
    torch.testing.assert_close(got.output, want, **TOL)
    torch.testing.assert_close(got.weights.mean(1), want_weights, **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_mha_causal_matches_torch(bias, device):
    ref, ours = torch_and_labkit(device, bias)
    x = torch.randn(2, 6, 16, device=device)
    want, want_weights = ref(x, x, x, attn_mask=~causal_mask(6, device=device))
    got = ours(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(got.output, want, **TOL)
    torch.testing.assert_close(got.weights.mean(1), want_weights, **TOL)
    got_as_mask = ours(x, mask=causal_mask(6, device=device))
    torch.testing.assert_close(got_as_mask.output, want, **TOL)


def test_mha_returns_named_output(device):
    mha = MultiHeadAttention(16, 4).to(device)
    x = torch.randn(2, 3, 16, device=device)
    result = mha(x)
    assert isinstance(result, AttentionOutput) and result.weights is None
    output, weights = mha(x, need_weights=True)
    assert output.shape == (2, 3, 16) and weights.shape == (2, 4, 3, 3)


def test_from_torch_keeps_dtype_and_dropout():
    ref = nn.MultiheadAttention(16, 4, dropout=0.25, batch_first=True).double()
    ours = MultiHeadAttention.from_torch(ref)
    assert ours.dropout == 0.25
    assert {p.dtype for p in ours.parameters()} == {torch.float64}


def test_from_torch_rejects_unsupported_modules():
    with pytest.raises(
        ValueError, match=r"^from_torch needs nn.MultiheadAttention\(batch_first=True\)$"
    ):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4))
    with pytest.raises(ValueError, match="embed_dim=16, kdim=8, vdim=16"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, kdim=8, batch_first=True))
    with pytest.raises(
        ValueError, match="^from_torch does not support add_bias_kv or add_zero_attn$"
    ):
        MultiHeadAttention.from_torch(
            nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
        )


# ==============================================================================================
# Backends, GQA / MQA
# ==============================================================================================


def mask_case(name: str, batch: int, q_len: int, k_len: int, device) -> dict:
    """Keyword arguments for one mask scenario of the backend comparison."""
    if name == "none":
        return {}
    if name == "padding":
        return {"mask": padding_mask([k_len, 2], max_len=k_len, device=device)}
    if name == "float":
        return {"mask": torch.randn(batch, 1, q_len, k_len, device=device)}
    if name == "causal":
        return {"is_causal": True}
    if name == "padding+causal":
        return {"mask": padding_mask([k_len, 3], max_len=k_len, device=device), "is_causal": True}
    raise KeyError(name)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", ["none", "padding", "float", "causal", "padding+causal"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_backends_agree(n_kv_heads, case, cross, device):
    mha = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads).to(device).eval()
    x = torch.randn(2, 5, 16, device=device)
    memory = torch.randn(2, 7, 16, device=device) if cross else None
    kwargs = mask_case(case, 2, 5, 7 if cross else 5, device)
    outputs = {}
    for backend in ("math", "sdpa", "auto"):
        mha.backend = backend
        outputs[backend] = mha(x, memory, **kwargs).output
    torch.testing.assert_close(outputs["sdpa"], outputs["math"], **TOL)
    torch.testing.assert_close(outputs["auto"], outputs["math"], **TOL)


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv_heads, device):
    gqa = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads).to(device)
    mha = MultiHeadAttention(16, 4).to(device)
    assert gqa.k_proj.out_features == n_kv_heads * 4
    repeat = 4 // n_kv_heads
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            small, big = getattr(gqa, name), getattr(mha, name)
            # (n_kv_heads * d_k, d_model) -> each kv head's rows repeated for its query heads
            rows = small.weight.view(n_kv_heads, 4, 16).repeat_interleave(repeat, dim=0)
            big.weight.copy_(rows.reshape(16, 16))
            big.bias.copy_(small.bias.view(n_kv_heads, 4).repeat_interleave(repeat, 0).reshape(16))
    x = torch.randn(2, 5, 16, device=device)
    torch.testing.assert_close(gqa(x, is_causal=True).output, mha(x, is_causal=True).output, **TOL)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_fully_masked_queries_output_only_the_out_bias(backend, device):
    mha = MultiHeadAttention(16, 4, backend=backend).to(device)
    x = torch.randn(2, 4, 16, device=device, requires_grad=True)
    keep = padding_mask([4, 0], max_len=4, device=device)  # sequence 1 is all padding
    out = mha(x, mask=keep).output
    assert not out.isnan().any()
    torch.testing.assert_close(out[1], mha.out_proj.bias.expand(4, 16))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(mha.q_proj.weight.grad.isfinite())


def test_backends_agree_on_fully_masked_queries(device):
    mha = MultiHeadAttention(16, 4).to(device).eval()
    x, memory = torch.randn(2, 6, 16, device=device), torch.randn(2, 3, 16, device=device)
    bias = torch.zeros(2, 1, 6, 3, device=device)
    bias[0, :, 4] = float("-inf")
    outputs = []
    for backend in ("math", "sdpa"):
        mha.backend = backend
        # q_len 6 > k_len 3 with bottom-right causality: queries 0..2 see no key at all
        outputs.append(mha(x, memory, mask=bias, is_causal=True).output)
    assert not outputs[1].isnan().any()
    torch.testing.assert_close(outputs[0], outputs[1], **TOL)
    torch.testing.assert_close(outputs[0][:, :3], mha.out_proj.bias.expand(2, 3, 16))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_backend_survives_kernels_that_return_nan_for_fully_masked_rows(
    monkeypatch, device, kind
):
    # torch >= 2.5's CPU kernels zero such rows themselves; older kernels (and, as reported in
    # pytorch#110213, CUDA's memory-efficient one) used a plain softmax, whose all -inf rows
    # are NaN in the forward and poison the backward. Emulate one. Only sequence 1 is dead, so
    # a guard that looked at the whole mask at once (not row by row) would let the NaN through.
    def unsafe_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
        return torch.softmax(scores, dim=-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", unsafe_sdpa)
    mha = MultiHeadAttention(16, 4, backend="sdpa").to(device)
    x = torch.randn(2, 4, 16, device=device, requires_grad=True)
    keep = padding_mask([4, 0], max_len=4, device=device)  # sequence 1 is all padding
    if kind == "float":
        keep = torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    out = mha(x, mask=keep).output
    torch.testing.assert_close(out[1], mha.out_proj.bias.expand(4, 16))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(mha.q_proj.weight.grad).all()


def test_need_weights_selects_the_math_backend_under_auto(device):
    mha = MultiHeadAttention(16, 4, backend="auto").to(device)
    x = torch.randn(1, 3, 16, device=device)
    assert mha(x).weights is None
    assert mha(x, need_weights=True).weights.shape == (1, 4, 3, 3)
    mha.backend = "sdpa"
    with pytest.raises(
        ValueError, match="^backend='sdpa' cannot return weights; use backend 'math' or 'auto'$"
    ):
        mha(x, need_weights=True)


@pytest.mark.parametrize(
    ("backend", "need_weights", "fused"),
    [("auto", False, True), ("auto", True, False), ("math", False, False), ("sdpa", False, True)],
)
def test_backend_choice_reaches_the_fused_kernel(monkeypatch, backend, need_weights, fused):
    """Which path runs (both give the same numbers, so outputs cannot tell): "auto" takes the
    fused kernel unless weights are asked for, "math" never does, "sdpa" always."""
    import labkit.nn.attention as attention_module

    calls = []
    sdpa_backend = attention_module._sdpa_backend

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa_backend(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_sdpa_backend", spy)
    mha = MultiHeadAttention(16, 4, backend=backend).eval()
    assert mha.backend == backend
    out = mha(torch.randn(1, 3, 16), need_weights=need_weights)
    assert bool(calls) == fused
    assert (out.weights is not None) == need_weights  # weights only when asked for


def test_smallest_head_counts_are_valid_and_zero_is_refused():
    assert MultiHeadAttention(8, 1).head_dim == 8  # one head is plain attention
    assert MultiHeadAttention(8, 2, n_kv_heads=1).k_proj.out_features == 4  # MQA
    with pytest.raises(ValueError, match="^d_model=8 must be divisible by n_heads=0$"):
        MultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match="^n_heads=2 must be divisible by n_kv_heads=0$"):
        MultiHeadAttention(8, 2, n_kv_heads=0)


def test_cross_attention_cache_with_a_one_token_memory():
    """The memory is projected once, on the first call, even when it is a single position."""
    mha = MultiHeadAttention(16, 4).eval()
    memory, x = torch.randn(1, 1, 16), torch.randn(1, 3, 16)
    cache = KVCache()
    with torch.no_grad():
        steps = [mha(x[:, t : t + 1], memory, cache=cache).output for t in range(3)]
        full = mha(x, memory).output
    assert cache.seq_len == 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_mha_dropout_only_in_training(backend, device):
    mha = MultiHeadAttention(16, 4, dropout=0.5, backend=backend).to(device)
    x = torch.randn(2, 8, 16, device=device)
    mha.train()
    assert not torch.allclose(mha(x).output, mha(x).output)
    mha.eval()
    no_dropout = MultiHeadAttention(16, 4, backend=backend).to(device)
    no_dropout.load_state_dict(mha.state_dict())
    torch.testing.assert_close(mha(x).output, no_dropout(x).output, **TOL)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_mha_gradcheck_float64(backend, device):
    mha = MultiHeadAttention(8, 2, n_kv_heads=1, backend=backend).to(device, torch.float64)
    x = torch.randn(1, 3, 8, device=device, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(1, 4, 8, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mha(x, is_causal=True).output, (x,))
    assert torch.autograd.gradcheck(lambda x, m: mha(x, m).output, (x, memory))


# ==============================================================================================
# KV cache
# ==============================================================================================


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("chunks", [[1] * 8, [3, 1, 4]], ids=["token-by-token", "3-1-4"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_decoding_equals_full_causal_pass(n_kv_heads, chunks, backend, device):
    mha = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads, backend=backend).to(device).eval()
    x = torch.randn(2, 8, 16, device=device)
    full = mha(x, is_causal=True).output
    cache, outputs, start = KVCache(), [], 0
    for size in chunks:
        outputs.append(mha(x[:, start : start + size], is_causal=True, cache=cache).output)
        start += size
        assert cache.seq_len == start
        assert cache.k.shape == cache.v.shape == (2, n_kv_heads, start, 4)  # not repeated
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, **TOL)


def test_kv_cache_with_padding_mask_over_all_keys(device):
    mha = MultiHeadAttention(16, 4).to(device).eval()
    x = torch.randn(2, 6, 16, device=device)
    keep = padding_mask([6, 4], device=device)  # (2, 1, 1, 6)
    full = mha(x, mask=keep, is_causal=True).output
    cache = KVCache()
    first = mha(x[:, :4], mask=keep[..., :4], is_causal=True, cache=cache).output
    rest = mha(x[:, 4:], mask=keep, is_causal=True, cache=cache).output
    torch.testing.assert_close(torch.cat([first, rest], 1)[0], full[0], **TOL)
    torch.testing.assert_close(first[1], full[1, :4], **TOL)


def test_cross_attention_cache_projects_memory_once(device):
    mha = MultiHeadAttention(16, 4, n_kv_heads=2).to(device).eval()
    calls = []
    mha.k_proj.register_forward_hook(lambda module, inputs, output: calls.append(1))
    x, memory = torch.randn(2, 3, 16, device=device), torch.randn(2, 7, 16, device=device)
    want = mha(x, memory).output
    calls.clear()
    cache = KVCache()
    steps = [mha(x[:, :1], memory, cache=cache).output]
    # later calls reuse the cached projection, whatever key is passed
    steps += [mha(x[:, i : i + 1], torch.zeros_like(memory), cache=cache).output for i in (1, 2)]
    assert len(calls) == 1
    assert cache.k.shape == (2, 2, 7, 4) and cache.seq_len == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), want, **TOL)


def test_kv_cache_update_concatenates_along_sequence(device):
    cache = KVCache()
    assert cache.seq_len == 0 and cache.k is None
    a, b = torch.randn(1, 2, 3, 4, device=device), torch.randn(1, 2, 2, 4, device=device)
    cache.update(a, -a)
    k_all, v_all = cache.update(b, -b)
    assert cache.seq_len == 5
    assert torch.equal(k_all, torch.cat([a, b], dim=2)) and torch.equal(v_all, -k_all)


def test_kv_cache_update_rejects_mismatched_shapes():
    cache = KVCache()
    with pytest.raises(ValueError, match=r"got \(1, 2, 3, 4\) and \(1, 2, 3, 5\)"):
        cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5))
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"new keys \(1, 4, 1, 4\).*cached keys \(1, 2, 3, 4\)"):
        cache.update(torch.randn(1, 4, 1, 4), torch.randn(1, 4, 1, 4))


# ==============================================================================================
# Rotary hook
# ==============================================================================================


class ToyRotary:
    """Stands in for RotaryEmbedding: a position-dependent scaling that records its calls."""

    def __init__(self):
        self.positions = []

    def __call__(self, q, k, positions):
        self.positions.append(positions.tolist())
        scale = 1 + 0.1 * positions.to(q.dtype)[:, None]  # (T, 1), broadcasts over (B, H)
        return q * scale, k * scale


def test_rotary_hook_is_applied_with_default_positions(device):
    mha = MultiHeadAttention(16, 4, n_kv_heads=2).to(device).eval()
    x = torch.randn(2, 5, 16, device=device)
    rotary = ToyRotary()
    cache = KVCache()
    out = mha(x, rotary=rotary, cache=cache).output
    assert rotary.positions == [[0, 1, 2, 3, 4]]
    assert not torch.allclose(out, mha(x).output, atol=1e-4)
    # the cache holds rotated keys (rotary runs before caching)
    plain_k = mha._split_heads(mha.k_proj(x), 2)
    scale = 1 + 0.1 * torch.arange(5, device=device, dtype=x.dtype)[:, None]
    torch.testing.assert_close(cache.k, plain_k * scale)


def test_rotary_positions_continue_after_the_cache(device):
    mha = MultiHeadAttention(16, 4, n_kv_heads=2).to(device).eval()
    x = torch.randn(2, 8, 16, device=device)
    full = mha(x, is_causal=True, rotary=ToyRotary()).output
    rotary, cache, outputs, start = ToyRotary(), KVCache(), [], 0
    for size in (3, 1, 4):
        chunk = x[:, start : start + size]
        outputs.append(mha(chunk, is_causal=True, rotary=rotary, cache=cache).output)
        start += size
    assert rotary.positions == [[0, 1, 2], [3], [4, 5, 6, 7]]
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, **TOL)


def test_rotary_receives_explicit_positions(device):
    mha = MultiHeadAttention(16, 4).to(device)
    rotary = ToyRotary()
    positions = torch.tensor([7, 8, 9], device=device)
    mha(torch.randn(1, 3, 16, device=device), rotary=rotary, positions=positions)
    assert rotary.positions == [[7, 8, 9]]


# ==============================================================================================
# Properties
# ==============================================================================================


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_self_attention_is_permutation_equivariant(backend, device):
    mha = MultiHeadAttention(16, 4, backend=backend).to(device).eval()
    x = torch.randn(2, 7, 16, device=device)
    perm = torch.randperm(7, device=device)
    assert not torch.equal(perm, torch.arange(7, device=device))
    torch.testing.assert_close(mha(x[:, perm]).output, mha(x).output[:, perm], **TOL)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_causal_outputs_ignore_future_tokens(backend, device):
    mha = MultiHeadAttention(16, 4, backend=backend).to(device).eval()
    x = torch.randn(2, 7, 16, device=device)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 3, 16, device=device)
    before, after = mha(x, is_causal=True).output, mha(changed, is_causal=True).output
    torch.testing.assert_close(after[:, :4], before[:, :4], **TOL)
    assert not torch.allclose(after[:, 4:], before[:, 4:], atol=1e-3)


# ==============================================================================================
# MultiHeadAttention errors
# ==============================================================================================


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 10, "n_heads": 4}, "d_model=10 must be divisible by n_heads=4"),
        ({"d_model": 16, "n_heads": 4, "n_kv_heads": 3}, "n_heads=4 .* by n_kv_heads=3"),
        ({"d_model": 16, "n_heads": 4, "backend": "flash"}, "backend must be .* got 'flash'"),
        ({"d_model": 16, "n_heads": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_mha_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: m(torch.randn(5, 16)),
            r"query must be \(batch, seq, d_model=16\), got shape \(5, 16\)",
        ),
        (lambda m: m(torch.randn(2, 5, 8)), r"query .* got shape \(2, 5, 8\)"),
        (
            lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 4, 12)),
            r"key .* got shape \(2, 4, 12\)",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), torch.randn(3, 4, 16)),
            r"batch sizes differ: query \(2, 5, 16\), key \(3, 4, 16\)",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 4, 16), torch.randn(2, 6, 16)),
            r"key \(2, 4, 16\), value \(2, 6, 16\)",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 12)),
            r"^value must be \(batch, seq, d_model=16\), got shape \(2, 4, 12\)$",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 4, 16), torch.randn(3, 4, 16)),
            r"batch sizes differ: query \(2, 5, 16\), key \(2, 4, 16\), value \(3, 4, 16\)",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), value=torch.randn(2, 5, 16)),
            "^value was given without key; pass key for cross-attention$",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), mask=torch.ones(5, 4, dtype=torch.bool)),
            r"mask of shape \(5, 4\).*scores of shape \(2, 4, 5, 5\)",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 3, 16), rotary=ToyRotary()),
            r"^rotary embeddings apply to self-attention only \(key must be None\)$",
        ),
        (
            lambda m: m(torch.randn(2, 5, 16), positions=torch.arange(5)),
            "^positions are only used by rotary, but rotary is None$",
        ),
    ],
)
def test_mha_forward_rejects_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call(MultiHeadAttention(16, 4))


# ==============================================================================================
# Linformer
# ==============================================================================================


def test_linformer_shapes(device):
    attn = LinformerSelfAttention(16, 4, seq_len=12, k=3).to(device)
    output, weights = attn(torch.randn(2, 12, 16, device=device), need_weights=True)
    assert output.shape == (2, 12, 16)
    assert weights.shape == (2, 4, 12, 3)  # n x k, not n x n
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12, device=device))
    assert attn(torch.randn(2, 12, 16, device=device)).weights is None


def test_linformer_with_identity_projections_is_exact_attention(device):
    attn = LinformerSelfAttention(16, 4, seq_len=6, k=6).to(device)
    with torch.no_grad():
        attn.E.copy_(torch.eye(6))
        attn.F.copy_(torch.eye(6))
    x = torch.randn(2, 6, 16, device=device)
    torch.testing.assert_close(attn(x).output, exact_attention(attn, x), **TOL)


def test_linformer_shorter_input_uses_first_columns(device):
    # Without biases, padded positions have zero keys/values, so a length-5 input must give
    # the same outputs as the same input zero-padded to seq_len.
    attn = LinformerSelfAttention(16, 4, seq_len=8, k=3, bias=False).to(device)
    x = torch.randn(2, 5, 16, device=device)
    padded = torch.cat([x, torch.zeros(2, 3, 16, device=device)], dim=1)
    torch.testing.assert_close(attn(x).output, attn(padded).output[:, :5], **TOL)


def test_linformer_share_kv_uses_one_projection(device):
    shared = LinformerSelfAttention(16, 4, seq_len=8, k=3, share_kv=True).to(device)
    separate = LinformerSelfAttention(16, 4, seq_len=8, k=3).to(device)
    assert shared.F is shared.E
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(separate) - n_params(shared) == 3 * 8


def test_linformer_dropout_only_in_training(device):
    attn = LinformerSelfAttention(16, 4, seq_len=8, k=3, dropout=0.5).to(device)
    x = torch.randn(2, 8, 16, device=device)
    assert not torch.allclose(attn(x).output, attn(x).output)
    attn.eval()
    # In eval mode: exactly the same module without dropout (not merely deterministic).
    no_dropout = LinformerSelfAttention(16, 4, seq_len=8, k=3, dropout=0.0).to(device).eval()
    no_dropout.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x).output, no_dropout(x).output, rtol=0, atol=0)


def test_linformer_rejects_longer_input():
    attn = LinformerSelfAttention(16, 4, seq_len=8, k=3)
    with pytest.raises(ValueError, match="input length 9 .* seq_len=8"):
        attn(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, d_model=16\), .*\(1, 4, 8\)"):
        attn(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="d_model=16 must be divisible by n_heads=3"):
        LinformerSelfAttention(16, 3, seq_len=8, k=3)


# ==============================================================================================
# Nyström
# ==============================================================================================


def test_nystrom_with_all_landmarks_is_exact(device):
    attn = NystromSelfAttention(16, 2, n_landmarks=24).to(device)
    x = torch.randn(2, 24, 16, device=device)
    output, weights = attn(x, need_weights=True)
    assert output.shape == (2, 24, 16) and weights.shape == (2, 2, 24, 24)
    torch.testing.assert_close(output, exact_attention(attn, x), atol=1e-4, rtol=1e-4)


def test_nystrom_matches_the_paper_formula_with_segment_means(device):
    attn = NystromSelfAttention(8, 2, n_landmarks=3).to(device, torch.float64)
    x = torch.randn(2, 12, 8, device=device, dtype=torch.float64)
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    q, k, v = (proj(x).view(2, 12, 2, 4).transpose(1, 2) for proj in projections)  # (B,H,T,d_k)
    segments = [slice(0, 4), slice(4, 8), slice(8, 12)]
    q_land = torch.stack([q[:, :, s].mean(-2) for s in segments], dim=-2)  # (2, 2, 3, 4)
    k_land = torch.stack([k[:, :, s].mean(-2) for s in segments], dim=-2)
    kernel = lambda a, b: torch.softmax(a @ b.transpose(-2, -1) / 2.0, dim=-1)  # noqa: E731
    weights = kernel(q, k_land) @ torch.linalg.pinv(kernel(q_land, k_land)) @ kernel(q_land, k)
    want = attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 12, 8))
    output, got_weights = attn(x, need_weights=True)
    torch.testing.assert_close(got_weights, weights)
    torch.testing.assert_close(output, want)


def test_nystrom_is_exact_on_segment_constant_inputs(device):
    # When tokens are constant within each landmark segment, Q = P Q̃ and K = P K̃, and the
    # Nyström formula equals full softmax attention for any number of landmarks.
    attn = NystromSelfAttention(16, 2, n_landmarks=4).to(device)
    x = torch.randn(2, 4, 16, device=device).repeat_interleave(6, dim=1)  # (2, 24, 16)
    torch.testing.assert_close(attn(x).output, exact_attention(attn, x), atol=1e-4, rtol=1e-4)


def test_nystrom_with_fewer_landmarks_stays_close_on_smooth_inputs(device):
    attn = NystromSelfAttention(16, 2, n_landmarks=16).to(device)
    t = torch.linspace(0, 1, 64, device=device)[:, None]
    freqs = torch.arange(1, 17, device=device) / 4
    x = torch.sin(2 * math.pi * freqs * t + torch.arange(16, device=device))  # (64, 16)
    x = torch.stack([x, x.flip(0)])  # (2, 64, 16)
    exact = exact_attention(attn, x)
    error = (attn(x).output - exact).norm() / exact.norm()
    assert error < 1e-2


def test_nystrom_weights_reproduce_the_output(device):
    attn = NystromSelfAttention(16, 2, n_landmarks=4).to(device)
    x = torch.randn(1, 8, 16, device=device)
    output, weights = attn(x, need_weights=True)
    v = attn.v_proj(x).view(1, 8, 2, 8).transpose(1, 2)
    rebuilt = attn.out_proj((weights @ v).transpose(1, 2).reshape(1, 8, 16))
    torch.testing.assert_close(output, rebuilt, atol=1e-4, rtol=1e-4)
    ones = torch.ones(1, 2, 8, device=device)
    torch.testing.assert_close(weights.sum(-1), ones, atol=1e-3, rtol=0)


def test_nystrom_rejects_indivisible_length():
    attn = NystromSelfAttention(16, 2, n_landmarks=4)
    with pytest.raises(ValueError, match="sequence length 10 must be divisible by n_landmarks=4"):
        attn(torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match="n_landmarks must be > 0, got 0"):
        NystromSelfAttention(16, 2, n_landmarks=0)


# ==============================================================================================
# Performer (FAVOR+)
# ==============================================================================================


def test_gaussian_projection_orthogonal_blocks_with_gaussian_norms():
    w = gaussian_projection(40, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (40, 16)
    for block in (w[:16], w[16:32], w[32:]):  # rows of one block are mutually orthogonal
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-10
    norms = w.norm(dim=-1)
    assert norms.std() > 0.1  # chi(16)-distributed lengths, not unit rows
    iid = gaussian_projection(40, 16, orthogonal=False, generator=torch.Generator().manual_seed(0))
    assert (iid[:16] @ iid[:16].T - torch.diag((iid[:16] ** 2).sum(-1))).abs().max() > 0.5


@pytest.mark.parametrize("orthogonal", [False, True])
def test_favor_features_estimate_the_softmax_kernel_without_bias(orthogonal):
    # phi(x)·phi(y) averages m single-feature estimates, each with relative variance
    # exp(|x + y|²) - 1 (the paper's lemma 2): the mean must land within 4 standard errors.
    gen = torch.Generator().manual_seed(0)
    x, y = (0.4 * torch.randn(5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    m = 100_000
    w = gaussian_projection(m, 8, orthogonal=orthogonal, generator=gen, dtype=torch.float64)
    estimate = (favor_features(x, w) * favor_features(y, w)).sum(-1)  # (5,)
    exact = torch.exp((x * y).sum(-1))
    standard_error = torch.sqrt(torch.expm1((x + y).square().sum(-1)) / m)
    assert ((estimate / exact - 1).abs() < 4 * standard_error).all(), estimate / exact
    assert (favor_features(x, w) > 0).all()  # positive features: no negative weights


def test_orthogonal_features_have_lower_variance_than_iid():
    # 400 independent projections of m = 32 features at once: one call draws 800 blocks of
    # 16 orthogonal rows (two per projection), and rows of different blocks are independent.
    gen = torch.Generator().manual_seed(0)
    x, y = (0.3 * torch.randn(16, generator=gen, dtype=torch.float64) for _ in range(2))

    def spread(orthogonal):
        w = gaussian_projection(400 * 32, 16, orthogonal=orthogonal, generator=gen).double()
        # features of all 12,800 rows scaled by 1/sqrt(12,800): x 400 gives 1/sqrt(32) squared
        products = favor_features(x, w) * favor_features(y, w) * 400  # (12_800,)
        return products.view(400, 32).sum(-1).std()  # one estimate per projection

    assert spread(True) < 0.9 * spread(False)  # measured 0.17 vs 0.20


def test_performer_error_shrinks_with_the_number_of_features():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k = 0.5 * q, 0.5 * k
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v

    def rms_error(m):  # averaged over 3 independent projections
        errors = [
            (performer_attention(q, k, v, gaussian_projection(m, 16, generator=gen)) - exact)
            .square().mean().sqrt()
            for _ in range(3)
        ]  # fmt: skip
        return torch.stack(errors).mean().item()

    errors = [rms_error(m) for m in (16, 256, 2048)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 4, errors  # about 1/sqrt(m): measured 7x for 128x m


@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_the_direct_formula_with_the_same_features(causal, device):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 10, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 10, 5, generator=gen, dtype=torch.float64)
    w = gaussian_projection(24, 8, generator=gen, dtype=torch.float64)
    q, k, v, w = (t.to(device) for t in (q, k, v, w))
    weights = favor_features(q / 8**0.25, w) @ favor_features(k / 8**0.25, w).transpose(-1, -2)
    if causal:  # (T, T) mask: query i keeps keys j <= i
        weights = weights * causal_mask(10, device=device)
    direct = weights / weights.sum(-1, keepdim=True) @ v
    got = performer_attention(q, k, v, w, causal=causal)
    torch.testing.assert_close(got, direct, rtol=1e-10, atol=1e-12)


def test_performer_stabilisation_keeps_large_scores_finite():
    # Rows of norm 30 (as with QK-norm): exp(-|x|²/2) underflows to 0 for every feature, so
    # the unshifted ratio is 0/0; the shifts of performer_attention cancel and keep it finite.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 8, generator=gen) for _ in range(3))
    q, k = (30 * F.normalize(t, dim=-1) for t in (q, k))
    w = gaussian_projection(32, 8, generator=gen)
    fq, fk = (favor_features(t / 8**0.25, w) for t in (q, k))
    naive = fq @ fk.transpose(-1, -2) @ v / (fq @ fk.transpose(-1, -2)).sum(-1, keepdim=True)
    assert not torch.isfinite(naive).any()
    for causal in (False, True):
        assert torch.isfinite(performer_attention(q, k, v, w, causal=causal)).all()


def test_performer_module_is_the_core_around_projections_and_causal(device):
    torch.manual_seed(0)
    attn = PerformerSelfAttention(16, 4, n_features=32, causal=True).to(device, torch.float64)
    x = torch.randn(2, 12, 16, device=device, dtype=torch.float64)
    output, weights = attn(x)
    assert output.shape == (2, 12, 16) and weights is None

    def split(t):
        return t.view(2, 12, 4, 4).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    core = performer_attention(q, k, v, attn.projection, causal=True)
    torch.testing.assert_close(output, attn.out_proj(core.transpose(1, 2).reshape(2, 12, 16)))
    changed = x.clone()
    changed[:, 6:] += 1.0  # a causal query never sees later tokens
    torch.testing.assert_close(attn(changed).output[:, :6], output[:, :6])
    assert not torch.allclose(attn(changed).output[:, 6:], output[:, 6:])
    before = attn.projection.clone()
    attn.redraw(torch.Generator().manual_seed(1))
    assert attn.projection.dtype == torch.float64 and not torch.equal(attn.projection, before)


def test_performer_module_approaches_exact_attention_with_many_features():
    torch.manual_seed(0)
    few, many = (PerformerSelfAttention(16, 2, n_features=m) for m in (8, 4096))
    many.load_state_dict({**few.state_dict(), "projection": many.projection})
    x = 0.5 * torch.randn(2, 32, 16)
    exact = exact_attention(few, x)
    error = lambda attn: (attn(x).output - exact).square().mean().sqrt()  # noqa: E731
    assert error(many) < error(few) / 3


def test_performer_errors():
    with pytest.raises(ValueError, match="n_features must be at least 1, got 0"):
        PerformerSelfAttention(16, 2, n_features=0)
    with pytest.raises(ValueError, match="d_model=16 must be divisible by n_heads=3"):
        PerformerSelfAttention(16, 3, n_features=8)
    with pytest.raises(ValueError, match=r"n_features and dim must be at least 1"):
        gaussian_projection(0, 4)
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=r"projection must be \(n_features, d=8\), got \(3, 6\)"):
        performer_attention(q, q, q, torch.randn(3, 6))
    with pytest.raises(ValueError, match="causal Performer attention needs as many queries"):
        performer_attention(q, torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.randn(3, 8), True)
    with pytest.raises(ValueError, match="must share their last dimension"):
        favor_features(q, torch.randn(3, 6))


# ==============================================================================================
# Additive (Bahdanau) attention
# ==============================================================================================


def test_additive_attention_equals_the_formula_element_by_element(device):
    torch.manual_seed(0)
    attn = AdditiveAttention(query_dim=5, key_dim=7, hidden_dim=4).to(device, torch.float64)
    query = torch.randn(2, 3, 5, device=device, dtype=torch.float64)
    key = torch.randn(2, 6, 7, device=device, dtype=torch.float64)
    value = torch.randn(2, 6, 3, device=device, dtype=torch.float64)
    output, weights = attn(query, key, value)
    W_q, W_k, v = attn.query_proj.weight, attn.key_proj.weight, attn.score.weight[0]
    for b in range(2):
        for i in range(3):
            e = torch.stack([v @ torch.tanh(W_q @ query[b, i] + W_k @ key[b, j]) for j in range(6)])
            a = torch.exp(e) / torch.exp(e).sum()  # softmax over the 6 keys
            torch.testing.assert_close(weights[b, i], a)
            torch.testing.assert_close(output[b, i], (a[:, None] * value[b]).sum(0))


def test_additive_attention_masks_keys_and_defaults_values_to_keys(device):
    torch.manual_seed(0)
    attn = AdditiveAttention(4, 4, 8).to(device)
    query, key = torch.randn(2, 3, 4, device=device), torch.randn(2, 5, 4, device=device)
    lengths_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2], device=device)[:, None]
    output, weights = attn(query, key, mask=lengths_mask)  # (B, 1, k_len) broadcasts
    assert output.shape == (2, 3, 4) and weights.shape == (2, 3, 5)
    assert (weights[1, :, 3:] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, device=device))
    short, _ = attn(query[1:], key[1:, :3])  # padding changes nothing for the real keys
    torch.testing.assert_close(output[1:], short)
    dead = torch.zeros(2, 3, 5, dtype=torch.bool, device=device)
    dead[0] = True  # batch 1: every key masked -> zero weights, zero context
    output, weights = attn(query, key, mask=dead)
    assert (weights[1] == 0).all() and (output[1] == 0).all()


def test_additive_attention_errors():
    attn = AdditiveAttention(4, 6, 8)
    with pytest.raises(ValueError, match=r"query must be \(batch, seq, d_model=4\)"):
        attn(torch.randn(2, 4), torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"one B and k_len.*value \(2, 4, 3\)"):
        attn(torch.randn(2, 1, 4), torch.randn(2, 5, 6), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="mask must be bool"):
        attn(torch.randn(2, 1, 4), torch.randn(2, 5, 6), mask=torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(torch.randn(2, 1, 4), torch.randn(2, 5, 6), mask=torch.ones(2, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 1"):
        AdditiveAttention(4, 0, 8)


# ==============================================================================================
# Limits and paths found by mutation testing (benchmarks/mutation.py attention)
# ==============================================================================================


def test_sdpa_limits_are_exact():
    """2-D inputs (one sequence, no batch) are valid; each refusal names its shapes in full."""
    q, k, v = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    out, weights = scaled_dot_product_attention(q, k, v)
    expected = torch.softmax(q @ k.T / 2, dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(out, expected @ v, atol=1e-6)
    cases = [
        (((3, 4), (4,), (5, 4)), "q, k, v need at least 2 dims (..., len, dim), got shapes"),
        (((2, 3, 4), (3, 5, 4), (2, 5, 4)), "leading (batch, head) dims do not broadcast: q"),
        (((2, 3, 4), (2, 5, 4), (3, 5, 4)), "leading (batch, head) dims do not broadcast: q"),
    ]
    for shapes, start in cases:
        q_, k_, v_ = (torch.randn(s) for s in shapes)
        sizes = ", ".join(str(s) for s in shapes)
        if start.startswith("leading"):
            sizes = f"{shapes[0]}, k {shapes[1]}, v {shapes[2]}"
        with pytest.raises(ValueError, match="^" + re.escape(f"{start} {sizes}") + "$"):
            scaled_dot_product_attention(q_, k_, v_)
    for p in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^dropout_p must be in \[0, 1\], got {p}$"):
            scaled_dot_product_attention(q, k, v, dropout_p=p)
    out, _ = scaled_dot_product_attention(q, k, v, dropout_p=1.0)  # valid: every weight dropped
    assert torch.equal(out, torch.zeros(3, 2))


def test_sdpa_backend_zeroes_a_query_whose_float_mask_blocks_every_key():
    torch.manual_seed(0)
    fused = MultiHeadAttention(16, 4, backend="sdpa").eval()
    math_ = MultiHeadAttention(16, 4, backend="math").eval()
    math_.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16)
    mask = torch.zeros(2, 1, 3, 3)  # additive: 0 = may attend, -inf = blocked
    mask[0, 0, 1] = float("-inf")  # batch 0, query 1: every key blocked
    mask[1, 0, :, 2] = float("-inf")
    with torch.no_grad():
        out = fused(x, mask=mask).output
        assert torch.isfinite(out).all()
        assert torch.allclose(out, math_(x, mask=mask).output, atol=1e-6)
    assert torch.equal(out[0, 1], fused.out_proj.bias.detach())  # a zero context, then the bias


def test_sdpa_backend_applies_dropout_in_training_with_a_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.5, backend="sdpa")
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, ..., 5] = False  # a mask: the backend's masked path
    with torch.no_grad():
        evaluated = mha.eval()(x, mask=mask).output
        trained = mha.train()(x, mask=mask).output
    assert (trained - evaluated).abs().max() > 0.1


def test_a_hook_that_replaces_the_pattern_recomputes_the_output():
    """A hook on hook_pattern moves the default backend off the fused kernel, and the output is
    recomputed from the pattern the hook returned (here uniform: each query averages v)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)

    def uniform(module, inputs, pattern):
        return torch.full_like(pattern, 1 / pattern.shape[-1])

    with torch.no_grad():
        plain = mha(x).output
        handle = mha.hook_pattern.register_forward_hook(uniform)
        try:
            patched = mha(x).output
        finally:
            handle.remove()
        expected = mha.out_proj(mha.v_proj(x).mean(1, keepdim=True).expand(2, 5, 16))
    assert torch.allclose(patched, expected, atol=1e-6)
    assert (plain - expected).abs().max() > 1e-3


def test_additive_attention_limits_names_and_no_biases():
    attn = AdditiveAttention(4, 6, 8)
    assert attn.query_proj.bias is None and attn.key_proj.bias is None
    assert attn.score.bias is None  # as in the paper (a bias on v would not change softmax)
    message = "key must be (batch, seq, d_model=6), got shape (2, 5, 5)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        attn(torch.randn(2, 1, 4), torch.randn(2, 5, 5))
    for sizes in ((0, 4, 8), (4, 0, 8), (4, 4, 0)):
        got = ", ".join(str(size) for size in sizes)
        message = f"query_dim, key_dim and hidden_dim must be at least 1, got {got}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            AdditiveAttention(*sizes)
    output, weights = AdditiveAttention(1, 1, 1)(torch.randn(1, 2, 1), torch.randn(1, 3, 1))
    assert output.shape == (1, 2, 1)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2))


def test_sdpa_float_mask_in_float32_keeps_bfloat16_inputs_bfloat16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4).bfloat16() for _ in range(3))
    additive = torch.zeros(3, 3)  # float32, as masks are usually built
    additive[0, 2] = float("-inf")
    out, weights = scaled_dot_product_attention(q, k, v, mask=additive)
    assert out.dtype == weights.dtype == torch.bfloat16
    assert torch.equal(out, scaled_dot_product_attention(q, k, v, mask=additive == 0)[0])



@pytest.mark.parametrize("masked", [False, True])
def test_cpu_bf16_autocast_runs_attention_in_float32(masked):
    """Under CPU bf16 autocast the fused attention computes in float32 (PyTorch's bf16 CPU
    kernel is slow at small heads): float32 attention rounded to bf16, not the bf16 kernel's
    result; gradients reach the float32 weights."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16).bfloat16() for _ in range(3))
    mask = padding_mask([24, 20]) if masked else None  # (B, 1, 1, 24)
    with torch.autocast("cpu", torch.bfloat16):
        out = _sdpa_backend(q, k, v, mask, True, 0.0)
    full = causal_mask(24, 24) if mask is None else causal_mask(24, 24) & mask
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=full)
    in_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.bfloat16())
    assert not torch.equal(out, in_bf16)  # the check tells the two computations apart
    mha = MultiHeadAttention(64, 4, backend="sdpa")
    x = torch.randn(2, 24, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = mha(x, is_causal=True).output
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mha.q_proj.weight.grad.dtype == torch.float32
    assert mha.q_proj.weight.grad.abs().sum() > 0
