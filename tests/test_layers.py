"""labkit.nn against PyTorch: norms, feed-forward, encoder and decoder layers.

Every layer is compared with its PyTorch reference after copying weights, in eval mode (or
with dropout 0), to 1e-5. The structural claims of the module docstring are checked too:
pre-LN and post-LN differ, a pre-LN layer with silent sublayers is the identity, and
decoding one token at a time with a cache equals the full causal pass.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit.nn import (
    DecoderLayer,
    DecoderLayerCache,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    LayerOutput,
    RMSNorm,
    RotaryEmbedding,
    causal_mask,
    padding_mask,
)

ATOL = 1e-5


def _randomise(module: nn.Module, std: float = 1.0) -> nn.Module:
    """Give every parameter random values, so that ones/zeros initialisations hide nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn_like(p))
    return module


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Norms


# Inputs whose variance is of the order of eps: with x ~ 3e-3 * randn, var ~ 1e-5, so a norm that
# drops or misplaces eps (sqrt(var) + eps, eps outside the root) is off by tens of percent, far
# beyond ATOL. A constant row (var = 0) is where eps alone keeps the output finite.


def _small_variance_input(device, eps: float) -> torch.Tensor:
    std = eps**0.5
    x = std * (torch.randn(2, 7, 16, device=device) + 5)  # var ~ eps, off-centre by 5 std
    x[0, 0] = 3 * std  # a constant row: LayerNorm divides by sqrt(0 + eps)
    return x


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(device, bias, eps):
    ours = _randomise(LayerNorm(16, eps=eps, bias=bias)).to(device)
    ref = nn.LayerNorm(16, eps=eps, bias=bias).to(device)
    ref.load_state_dict(ours.state_dict())
    x = _small_variance_input(device, eps)
    y = ours(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, ref(x), atol=ATOL, rtol=1e-4)
    # The scale of the inputs is one where eps matters: without it the result moves visibly.
    assert _max_diff(ref(x), F.layer_norm(x, (16,), ref.weight, ref.bias, eps=eps / 4)) > 0.05


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_is_the_formula(bias):
    """LayerNorm runs torch's fused kernel; its result is the docstring's formula written out:
    (x - mean) / sqrt(biased var + eps) * weight + bias, over the last dimension."""
    norm = _randomise(LayerNorm(16, eps=1e-3, bias=bias)).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-3) * norm.weight
    expected = expected + norm.bias if bias else expected
    assert torch.allclose(norm(x), expected, atol=1e-12, rtol=1e-10)
    unbiased = (x - mean) / torch.sqrt(x.var(-1, keepdim=True) + 1e-3) * norm.weight
    assert _max_diff(norm(x) - (norm.bias if bias else 0), unbiased) > 1e-3


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_matches_torch(device, eps):
    ours = _randomise(RMSNorm(16, eps=eps)).to(device)
    ref = nn.RMSNorm(16, eps=eps).to(device)
    ref.load_state_dict(ours.state_dict())
    x = eps**0.5 * torch.randn(2, 7, 16, device=device)  # mean(x^2) ~ eps
    x[0, 0] = 0.0  # all zeros: only eps avoids 0 / 0
    y = ours(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, ref(x), atol=ATOL, rtol=1e-4)
    assert _max_diff(ref(x), F.rms_norm(x, (16,), ref.weight, eps=eps / 4)) > 0.05


def test_norms_use_their_own_eps():
    """The eps given to the constructor is the one used (not a default of the other norm)."""
    x = 1e-2 * torch.randn(3, 16)
    for eps in (1e-6, 1e-5, 1e-3):
        assert torch.allclose(LayerNorm(16, eps=eps)(x), F.layer_norm(x, (16,), eps=eps), atol=ATOL)
        assert torch.allclose(RMSNorm(16, eps=eps)(x), F.rms_norm(x, (16,), eps=eps), atol=ATOL)


@pytest.mark.parametrize(
    ("make_ours", "make_ref"),
    [
        (lambda: LayerNorm(64), lambda: nn.LayerNorm(64)),
        (lambda: RMSNorm(64), lambda: nn.RMSNorm(64, eps=1e-6)),
    ],
    ids=["layer", "rms"],
)
def test_norms_do_not_overflow_in_float16(make_ours, make_ref):
    """x ~ 300 squares to ~1e5, past float16's maximum of 65504: statistics must use float32."""
    ours, ref = _randomise(make_ours()), make_ref()
    ref.load_state_dict(ours.state_dict())
    x = (300 * torch.randn(4, 64)).half()
    y = ours.half()(x)
    assert y.dtype == torch.float16
    assert _max_diff(y.float(), ref(x.float())) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_of_low_precision_is_the_float32_result_rounded_once(dtype):
    """Input and weights in fp16/bf16: the result is float32's, cast once at the end. Rows near
    100 with a spread of 0.1 are where torch's own low-precision kernel rounds differently."""
    generator = torch.Generator().manual_seed(0)
    norm = LayerNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator))
        norm.bias.copy_(torch.randn(64, generator=generator))
    norm = norm.to(dtype)
    x = (100 + 0.1 * torch.randn(4, 64, generator=generator)).to(dtype)
    expected = F.layer_norm(x.float(), (64,), norm.weight.float(), norm.bias.float(), eps=1e-5)
    assert torch.equal(norm(x), expected.to(dtype))
    assert not torch.equal(F.layer_norm(x, (64,), norm.weight, norm.bias, eps=1e-5), norm(x))


@pytest.mark.parametrize(
    "make_norm",
    [lambda: LayerNorm(5), lambda: LayerNorm(5, bias=False), lambda: RMSNorm(5)],
    ids=["layer", "layer_no_bias", "rms"],
)
def test_norms_pass_gradcheck(make_norm):
    """Gradients with respect to the input and to every parameter, in float64."""
    norm = _randomise(make_norm()).double()
    names = [name for name, _ in norm.named_parameters()]

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(norm, dict(zip(names, params, strict=True)), (x,))

    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in norm.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("norm_cls", [LayerNorm, RMSNorm])
def test_norms_reject_wrong_last_dim(norm_cls):
    name = norm_cls.__name__
    message = f"{name} expects input of shape (..., d_model=8), got (2, 3, 7)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        norm_cls(8)(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=re.escape(f"{name} expects input") + ".*got \\(\\)$"):
        norm_cls(1)(torch.tensor(1.0))  # a 0-d tensor has no feature dimension
    assert norm_cls(8)(torch.randn(8)).shape == (8,)  # one vector is fine


def test_norm_defaults_and_repr():
    """torch's LayerNorm eps and Llama's RMSNorm eps; the repr says what is set."""
    assert LayerNorm(16).eps == 1e-5 and RMSNorm(16).eps == 1e-6
    assert repr(LayerNorm(16)) == "LayerNorm(16, eps=1e-05, bias=True)"
    assert repr(LayerNorm(16, bias=False)) == "LayerNorm(16, eps=1e-05, bias=False)"
    assert repr(RMSNorm(16, eps=1e-5)) == "RMSNorm(16, eps=1e-05)"


# ----------------------------------------------------------------------------------------------
# Feed-forward


def test_swiglu_matches_formula(device):
    ffn = FeedForward(8, 20, activation="swiglu", bias=False).to(device)
    x = torch.randn(2, 5, 8, device=device)
    w_gate, w_up, w_down = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    assert _max_diff(ffn(x), expected) < ATOL


@pytest.mark.parametrize(
    ("activation", "fn"),
    [
        ("relu", F.relu),
        ("gelu", F.gelu),
        ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh")),
    ],
)
def test_two_layer_ffn_shape_and_formula(device, activation, fn):
    ffn = FeedForward(8, 32, activation=activation).to(device)
    x = torch.randn(2, 5, 8, device=device)
    y = ffn(x)
    assert y.shape == (2, 5, 8)
    assert ffn.gate_proj is None
    assert _max_diff(y, ffn.down_proj(fn(ffn.up_proj(x)))) < ATOL


def test_ffn_dropout_sits_between_the_two_linears():
    ffn = FeedForward(8, 16, dropout=1.0)  # drops the whole hidden layer while training
    x = torch.randn(3, 8)
    assert torch.equal(ffn(x), ffn.down_proj.bias.expand(3, 8))
    assert _max_diff(ffn.eval()(x), ffn.down_proj.bias) > 1e-3


def test_ffn_activations_differ():
    """The activation name is not ignored: relu, gelu and gelu_tanh give different outputs."""
    x = torch.randn(3, 8)
    outs = []
    for activation in ("relu", "gelu", "gelu_tanh"):
        torch.manual_seed(1)
        outs.append(FeedForward(8, 16, activation=activation)(x))
    assert _max_diff(outs[0], outs[1]) > 1e-3
    assert _max_diff(outs[1], outs[2]) > 1e-6


def test_ffn_rejects_unknown_activation():
    allowed = "('relu', 'gelu', 'gelu_tanh', 'swiglu')"
    with pytest.raises(ValueError, match=re.escape(f"one of {allowed}, got 'tanh'")):
        FeedForward(8, 16, activation="tanh")


def test_ffn_rejects_wrong_last_dim():
    with pytest.raises(ValueError, match=r"d_model=8.*\(2, 5, 6\)"):
        FeedForward(8, 16)(torch.randn(2, 5, 6))


# ----------------------------------------------------------------------------------------------
# Encoder and decoder layers against torch.nn.Transformer{Encoder,Decoder}Layer

D, H, D_FF = 16, 4, 32


def _torch_mask(labkit_mask: torch.Tensor) -> torch.Tensor:
    """labkit (B, 1, 1, T) True = may attend  ->  torch key padding mask (B, T) True = padding."""
    return ~labkit_mask[:, 0, 0, :]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_layer_matches_torch(device, norm_first, activation):
    ref = nn.TransformerEncoderLayer(
        D, H, D_FF, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    )
    ref = _randomise(ref, std=0.3).to(device).eval()
    ours = EncoderLayer.from_torch(ref)
    x = torch.randn(3, 6, D, device=device)
    mask = padding_mask([6, 4, 1], device=device)  # (3, 1, 1, 6)

    expected = ref(x, src_key_padding_mask=_torch_mask(mask))
    out = ours(x, mask)
    assert isinstance(out, LayerOutput)
    assert _max_diff(out.hidden, expected) < ATOL
    assert _max_diff(ours(x).hidden, expected) > 1e-3  # the padding mask mattered


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_decoder_layer_matches_torch(device, norm_first, activation):
    ref = nn.TransformerDecoderLayer(
        D, H, D_FF, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    )
    ref = _randomise(ref, std=0.3).to(device).eval()
    ours = DecoderLayer.from_torch(ref)
    x = torch.randn(3, 5, D, device=device)
    memory = torch.randn(3, 7, D, device=device)
    self_mask = padding_mask([5, 3, 2], device=device)
    memory_mask = padding_mask([7, 2, 5], device=device)

    expected = ref(
        x,
        memory,
        tgt_mask=~causal_mask(5, device=device),  # torch: True = blocked
        tgt_is_causal=True,
        tgt_key_padding_mask=_torch_mask(self_mask),
        memory_key_padding_mask=_torch_mask(memory_mask),
    )
    out = ours(x, memory, self_mask=self_mask, memory_mask=memory_mask, is_causal=True)
    assert _max_diff(out.hidden, expected) < ATOL
    # each mask mattered
    no_causal = ours(x, memory, self_mask=self_mask, memory_mask=memory_mask, is_causal=False)
    assert _max_diff(no_causal.hidden, expected) > 1e-3
    assert _max_diff(ours(x, memory, self_mask=self_mask).hidden, expected) > 1e-3


@pytest.mark.parametrize("layer_type", ["encoder", "decoder"])
def test_from_torch_reads_the_configuration(device, layer_type):
    """bias=False, a non-default eps, tanh-GELU and the dropout rate all come across."""
    kwargs = dict(
        dropout=0.2,
        activation=nn.GELU(approximate="tanh"),
        layer_norm_eps=1e-3,
        batch_first=True,
        norm_first=True,
        bias=False,
    )
    x = torch.randn(2, 5, D, device=device)
    memory = torch.randn(2, 4, D, device=device)
    if layer_type == "encoder":
        ref = _randomise(nn.TransformerEncoderLayer(D, H, D_FF, **kwargs), std=0.3).to(device)
        ours = EncoderLayer.from_torch(ref)
    else:
        ref = _randomise(nn.TransformerDecoderLayer(D, H, D_FF, **kwargs), std=0.3).to(device)
        ours = DecoderLayer.from_torch(ref)
    assert ours.training  # a fresh torch layer is in training mode, and so is the copy
    ref.eval(), ours.eval()
    if layer_type == "encoder":
        expected, out = ref(x), ours(x).hidden
    else:
        expected, out = ref(x, memory), ours(x, memory, is_causal=False).hidden
    assert ours.ffn.activation == "gelu_tanh"
    assert ours.norm1.eps == 1e-3 and ours.norm1.bias is None and ours.ffn.up_proj.bias is None
    assert {m.p for m in ours.modules() if isinstance(m, nn.Dropout)} == {0.2}
    assert ours.self_attn.dropout == 0.2  # on the attention weights too, as in torch
    assert _max_diff(out, expected) < ATOL


# ----------------------------------------------------------------------------------------------
# Incremental decoding, attention weights, options


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_decoder_incremental_decoding_equals_full_pass(device, norm_first):
    layer = DecoderLayer(D, H, D_FF, dropout=0.0, norm_first=norm_first, n_kv_heads=2)
    layer = _randomise(layer, std=0.3).to(device).eval()
    x = torch.randn(2, 6, D, device=device)
    memory = torch.randn(2, 7, D, device=device)
    memory_mask = padding_mask([7, 4], device=device)
    full = layer(x, memory, memory_mask=memory_mask).hidden  # is_causal=True by default

    cache = DecoderLayerCache()
    steps = [
        layer(x[:, t : t + 1], memory, memory_mask=memory_mask, cache=cache).hidden
        for t in range(x.shape[1])
    ]
    assert _max_diff(torch.cat(steps, dim=1), full) < ATOL
    assert cache.self_attn.seq_len == 6  # one position per step
    assert cache.cross_attn.seq_len == 7  # the memory, projected once, not once per step
    assert cache.self_attn.k.shape == (2, 2, 6, D // H)  # only the 2 key/value heads are cached


def test_layers_return_attention_weights_on_request():
    encoder = EncoderLayer(D, H, D_FF, dropout=0.0).eval()
    decoder = DecoderLayer(D, H, D_FF, dropout=0.0).eval()
    x, memory = torch.randn(2, 5, D), torch.randn(2, 7, D)
    memory_mask = padding_mask([7, 3])

    assert encoder(x).self_weights is None
    assert decoder(x, memory).self_weights is None and decoder(x, memory).cross_weights is None

    enc = encoder(x, need_weights=True)
    assert enc.self_weights.shape == (2, H, 5, 5) and enc.cross_weights is None
    dec = decoder(x, memory, memory_mask=memory_mask, need_weights=True)
    assert dec.self_weights.shape == (2, H, 5, 5)
    assert dec.cross_weights.shape == (2, H, 5, 7)
    assert torch.all(dec.self_weights.triu(diagonal=1) == 0)  # causal: no weight on the future
    assert torch.all(dec.cross_weights[1, :, :, 3:] == 0)  # no weight on memory padding
    assert torch.allclose(dec.cross_weights.sum(-1), torch.ones(2, H, 5))


def test_encoder_layer_passes_rotary_to_self_attention():
    layer = EncoderLayer(D, H, D_FF, dropout=0.0, norm_first=True).eval()
    rotary = RotaryEmbedding(D // H)
    x = torch.randn(2, 5, D)
    positions = torch.tensor([0, 2, 4, 6, 8])

    out = layer(x, rotary=rotary, positions=positions).hidden
    h = x + layer.self_attn(layer.norm1(x), rotary=rotary, positions=positions).output
    assert _max_diff(out, h + layer.ffn(layer.norm2(h))) < ATOL
    assert _max_diff(out, layer(x, rotary=rotary).hidden) > 1e-4  # positions were used
    assert _max_diff(out, layer(x).hidden) > 1e-4  # rotary was used


def test_llama_style_options_build_the_right_parts():
    layer = EncoderLayer(
        D,
        H,
        D_FF,
        dropout=0.0,
        activation="swiglu",
        norm_first=True,
        norm="rms",
        eps=1e-6,
        bias=False,
        n_kv_heads=1,
    )
    assert isinstance(layer.norm1, RMSNorm) and layer.norm1.eps == 1e-6
    assert layer.ffn.gate_proj is not None and layer.ffn.up_proj.bias is None
    assert layer.self_attn.k_proj.out_features == D // H  # one shared key/value head (MQA)
    x = torch.randn(2, 5, D)
    assert layer(x, is_causal=True).hidden.shape == (2, 5, D)


# ----------------------------------------------------------------------------------------------
# Pre-LN versus post-LN


def _forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, DecoderLayer):
        memory = torch.linspace(-1, 1, 4 * D).reshape(1, 4, D).expand(x.shape[0], 4, D)
        return layer(x, memory).hidden
    return layer(x).hidden


@pytest.mark.parametrize("layer_cls", [EncoderLayer, DecoderLayer])
def test_pre_ln_and_post_ln_are_different_functions(layer_cls):
    post_ln = _randomise(layer_cls(D, H, D_FF, dropout=0.0, norm_first=False), std=0.3)
    pre_ln = layer_cls(D, H, D_FF, dropout=0.0, norm_first=True)
    pre_ln.load_state_dict(post_ln.state_dict())  # same weights, only the wiring differs
    x = torch.randn(2, 5, D)
    assert _max_diff(_forward(pre_ln, x), _forward(post_ln, x)) > 1e-2


@pytest.mark.parametrize("layer_cls", [EncoderLayer, DecoderLayer])
def test_pre_ln_layer_with_silent_sublayers_is_the_identity(layer_cls):
    """Zero every sublayer's output projection: pre-LN passes x through untouched, post-LN
    still normalises it."""
    pre_ln = _randomise(layer_cls(D, H, D_FF, dropout=0.0, norm_first=True), std=0.3)
    with torch.no_grad():
        for name, module in pre_ln.named_modules():
            if name.endswith(("out_proj", "down_proj")):
                module.weight.zero_()
                module.bias.zero_()
    post_ln = layer_cls(D, H, D_FF, dropout=0.0, norm_first=False)
    post_ln.load_state_dict(pre_ln.state_dict())
    x = 3 * torch.randn(2, 5, D) + 1
    assert torch.equal(_forward(pre_ln, x), x)
    assert _max_diff(_forward(post_ln, x), x) > 0.1


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("layer_cls", [EncoderLayer, DecoderLayer])
def test_dropout_follows_every_sublayer(layer_cls, norm_first):
    """With p=1 each dropout after a sublayer removes that sublayer, in training mode only:
    pre-LN leaves x, post-LN leaves only its chain of norms."""
    layer = _randomise(layer_cls(D, H, D_FF, dropout=0.0, norm_first=norm_first), std=0.3)
    for module in layer.modules():
        if isinstance(module, nn.Dropout):
            module.p = 1.0
    x = torch.randn(2, 5, D)
    expected = x
    if not norm_first:
        norms = [layer.norm1, layer.norm2] + ([layer.norm3] if layer_cls is DecoderLayer else [])
        for norm in norms:
            expected = norm(expected)
    assert _max_diff(_forward(layer.train(), x), expected) < ATOL
    assert _max_diff(_forward(layer.eval(), x), expected) > 0.1


# ----------------------------------------------------------------------------------------------
# Errors


def test_layers_reject_inputs_of_the_wrong_shape():
    encoder, decoder = EncoderLayer(D, H, D_FF), DecoderLayer(D, H, D_FF)
    expected = re.escape("x must be (batch, seq, d_model=16), got shape (5, 16)")
    with pytest.raises(ValueError, match=expected):
        encoder(torch.randn(5, D))
    with pytest.raises(ValueError, match=r"x must be .* got shape \(2, 5, 8\)"):
        encoder(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"memory must be .* got shape \(2, 7, 8\)"):
        decoder(torch.randn(2, 5, D), torch.randn(2, 7, 8))
    expected = re.escape("batch sizes differ: x (2, 5, 16), memory (3, 7, 16)")
    with pytest.raises(ValueError, match=expected):
        decoder(torch.randn(2, 5, D), torch.randn(3, 7, D))
    with pytest.raises(ValueError, match="cache must be a DecoderLayerCache, got KVCache"):
        decoder(torch.randn(2, 1, D), torch.randn(2, 7, D), cache=DecoderLayerCache().self_attn)


@pytest.mark.parametrize("layer_cls", [EncoderLayer, DecoderLayer])
def test_layers_reject_unknown_norm_and_activation(layer_cls):
    expected = re.escape("norm must be one of ('layer', 'rms'), got 'batch'")
    with pytest.raises(ValueError, match=expected):
        layer_cls(D, H, D_FF, norm="batch")
    with pytest.raises(ValueError, match="got 'silu'"):
        layer_cls(D, H, D_FF, activation="silu")


@pytest.mark.parametrize(
    ("make", "ours"),
    [
        (lambda **kw: nn.TransformerEncoderLayer(D, H, D_FF, **kw), EncoderLayer),
        (lambda **kw: nn.TransformerDecoderLayer(D, H, D_FF, **kw), DecoderLayer),
    ],
    ids=["encoder", "decoder"],
)
def test_from_torch_rejects_what_it_cannot_copy(make, ours):
    with pytest.raises(ValueError, match="batch_first=True.*got batch_first=False"):
        ours.from_torch(make(batch_first=False))
    with pytest.raises(ValueError, match="relu and gelu.*silu"):
        ours.from_torch(make(batch_first=True, activation=F.silu))
    with pytest.raises(ValueError, match="expected an nn.Transformer.*got Linear"):
        ours.from_torch(nn.Linear(D, D))
