"""labkit's Llama against transformers' LlamaForCausalLM, on random tiny models and SmolLM2.

Tiny models (GQA, tied and untied heads) are built in ``transformers`` with random weights,
random norm scales included (all-ones norms would hide a swapped ``norm1``/``norm2``), copied
with ``Llama.from_hf`` and compared to 1e-4. The real SmolLM2-135M-Instruct checkpoint (the
session fixture ``smollm2``) is compared on chat-templated prompts, padded and cached.
"""

import dataclasses
import re
import types

import pytest
import torch
import transformers

from labkit.models.base import CausalLMOutput
from labkit.models.llama import Llama, LlamaConfig, hf_name_map
from labkit.nn.cache import ModelCache, StaticCache
from labkit.nn.positional import RotaryEmbedding

ATOL = 1e-4
SMOLLM2_PARAMETERS = 134_515_008
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "2 + 2 =",
]


def _hf_tiny(
    tie: bool, device: torch.device, rope_scaling: dict | None = None, eps: float = 1e-6
) -> transformers.LlamaForCausalLM:
    """A random 2-layer GQA Llama in transformers (4 query heads, 2 key/value heads)."""
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500.0,
        rope_scaling=rope_scaling,
        rms_norm_eps=eps,
        tie_word_embeddings=tie,
        initializer_range=0.1,
    )
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf.to(device).eval()


def _hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """What transformers' generate passes for left padding: real tokens count 0, 1, ..."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and 1/0 mask, shorter sequences padded on the left."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Tiny random models against transformers


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_matches_transformers(device, tie):
    hf = _hf_tiny(tie, device)
    model = Llama.from_hf(hf)
    assert not model.training
    assert model.config.n_kv_heads == 2 and model.config.rope_theta == 500.0
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    ids = torch.randint(0, 256, (2, 12), device=device)
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert isinstance(ours, CausalLMOutput)
    assert ours.logits.shape == (2, 12, 256) and ours.hidden.shape == (2, 12, 64)
    assert ours.attentions is None
    assert (ours.logits - theirs).abs().max() <= ATOL


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_left_padding_matches_transformers(device, tie):
    hf = _hf_tiny(tie, device)
    model = Llama.from_hf(hf)
    lengths = [9, 5, 7]
    ids, mask = _left_pad([torch.randint(3, 256, (n,)).tolist() for n in lengths], pad_id=0)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=_hf_positions(mask)).logits
        alone = model(ids[1:2, -lengths[1] :]).logits  # the short row without its padding
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= ATOL
    # Padding changes nothing for the real tokens.
    assert (ours[1, -lengths[1] :] - alone[0]).abs().max() <= 1e-5


def _record_rope_positions(model: Llama, monkeypatch) -> list[torch.Tensor]:
    """Every positions tensor the model's rotary embedding is asked for, in call order."""
    seen, cos_sin = [], model.rotary.cos_sin

    def spy(positions):
        seen.append(positions.detach().cpu().clone())
        return cos_sin(positions)

    monkeypatch.setattr(model.rotary, "cos_sin", spy)
    return seen


def test_left_padding_positions_restart_after_the_pads(monkeypatch):
    """RoPE is relative, so logits cannot show positions that count the pads (every real token
    shifted by the same amount scores the same): the positions are asserted directly."""
    model = Llama.from_hf(_hf_tiny(False, torch.device("cpu")))
    seen = _record_rope_positions(model, monkeypatch)
    ids, mask = _left_pad([[5] * 4, [6] * 2, [7] * 3], pad_id=0)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)  # prefill
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        model(torch.tensor([[8], [8], [8]]), attention_mask=step_mask, cache=cache)
        model(ids[:1])  # no mask: 0, 1, 2, ...
    assert len(seen) == 3
    prefill, step, plain = seen
    # pads (position 0, never attended) then 0, 1, ... for the real tokens of each row
    assert prefill.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]
    assert step.tolist() == [[4], [2], [3]]  # the next position is each row's own length
    assert plain.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("tie", [False, True])
def test_num_parameters_matches_transformers(tie):
    hf = _hf_tiny(tie, torch.device("cpu"))
    model = Llama.from_hf(hf)
    assert model.num_parameters() == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(
        exclude_embeddings=True
    )


def test_from_hf_rejects_a_shape_mismatch():
    hf = _hf_tiny(False, torch.device("cpu"))
    hf.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(170, 64))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(170, 64\)"):
        Llama.from_hf(hf)


def test_from_hf_rejects_unknown_weights():
    hf = _hf_tiny(False, torch.device("cpu"))
    hf.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(
        ValueError,
        match=r"unexpected in Hugging Face: \['model\.layers\.0\.self_attn\.q_proj\.bias'\]",
    ):
        Llama.from_hf(hf)


def test_from_hf_takes_a_tied_checkpoint_that_lists_its_head():
    """A loader may give a tied model's head as a parameter of its own: it is the embedding."""
    hf = _hf_tiny(True, torch.device("cpu"))
    hf.lm_head.weight = torch.nn.Parameter(hf.model.embed_tokens.weight.detach().clone())
    assert "lm_head.weight" in dict(hf.named_parameters())
    model = Llama.from_hf(hf)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_to_hf_refusals_name_the_parameter():
    model = Llama.from_preset("tiny")
    model.layers[1].ffn.up_proj.weight = torch.nn.Parameter(torch.zeros(170, 64))
    with pytest.raises(
        ValueError, match=r"labkit's Llama layers\.1\.ffn\.up_proj\.weight is \(170, 64\)"
    ):
        model.to_hf()
    model = Llama.from_preset("tiny")
    model.layers[0].self_attn.q_proj.lora_A = torch.nn.Parameter(torch.zeros(2, 64))
    message = (
        "parameters ['layers.0.self_attn.q_proj.lora_A'] have no Hugging Face name: to_hf "
        "exports a plain Llama (merge LoRA adapters first with labkit.models.lora.merged)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.to_hf()


def test_name_map_covers_every_labkit_parameter():
    for tie in (False, True):
        model = Llama.from_preset("tiny", tie_weights=tie)
        mapped = set(hf_name_map(model.config.n_layers, tie).values())
        assert mapped == {name for name, _ in model.named_parameters()}


def test_config_from_hf_reads_both_rope_theta_layouts():
    hf_config = _hf_tiny(True, torch.device("cpu")).config
    config = LlamaConfig.from_hf(hf_config)
    assert config == LlamaConfig(
        rope_theta=500.0, eps=1e-6, bos_id=hf_config.bos_token_id, eos_id=hf_config.eos_token_id
    )
    # transformers 4: a plain rope_theta attribute and rope_scaling None; Llama 3's eos list.
    old = types.SimpleNamespace(
        vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
        intermediate_size=11008, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 7], pad_token_id=None,
    )  # fmt: skip
    assert LlamaConfig.from_hf(old) == LlamaConfig.preset("llama2-7b")


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_config_from_hf_reads_linear_rope_scaling(layout):
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
    hf_config = transformers.LlamaConfig(num_hidden_layers=1, **{layout: rope})
    config = LlamaConfig.from_hf(hf_config)
    assert (config.rope_scaling, config.rope_factor, config.rope_theta) == ("linear", 4.0, 1e4)
    assert config.to_hf().rope_parameters == rope  # and back
    # transformers 4 spelled the type "type", in a rope_scaling dict next to rope_theta
    old = types.SimpleNamespace(**{**vars(hf_config), "rope_parameters": None})
    old.rope_scaling, old.rope_theta = {"type": "linear", "factor": 4.0}, 1e4
    assert LlamaConfig.from_hf(old) == config


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_config_from_hf_rejects_other_rope_scaling(rope):
    hf_config = transformers.LlamaConfig(num_hidden_layers=1, rope_parameters=rope)
    with pytest.raises(ValueError, match=f"{rope['rope_type']!r} is not supported"):
        LlamaConfig.from_hf(hf_config)


@pytest.mark.parametrize("tie", [False, True])
def test_linear_rope_scaling_matches_transformers(device, tie):
    """Position interpolation x2.5 from a transformers checkpoint, and back with to_hf."""
    hf = _hf_tiny(tie, device, rope_scaling={"rope_type": "linear", "factor": 2.5})
    model = Llama.from_hf(hf)
    assert (model.config.rope_scaling, model.config.rope_factor) == ("linear", 2.5)
    assert model.rotary.scaling == "linear" and model.rotary.factor == 2.5
    ids = torch.randint(0, 256, (2, 40), device=device)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
        back = model.to_hf()(ids).logits
        # the scaling matters: the same weights without it give other logits
        plain = Llama(dataclasses.replace(model.config, rope_scaling="none", rope_factor=1.0))
        plain.load_state_dict(model.state_dict())
        unscaled = plain.to(device).eval()(ids).logits
    assert (ours - theirs).abs().max() <= ATOL
    assert (back - theirs).abs().max() <= ATOL
    assert (unscaled - theirs).abs().max() > 100 * ATOL


def test_ntk_rope_scaling_config():
    model = Llama.from_preset("tiny", rope_scaling="ntk", rope_factor=2.0)
    expected = RotaryEmbedding(model.config.head_dim, 1e4, "ntk", 2.0).inv_freq()
    assert torch.equal(model.rotary.inv_freq(), expected)
    assert not torch.equal(expected, RotaryEmbedding(model.config.head_dim).inv_freq())
    message = (
        "rope_scaling='ntk' has no transformers equivalent (its 'dynamic' type recomputes the "
        "base from the sequence length): export with 'none' or 'linear'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.config.to_hf()


# ----------------------------------------------------------------------------------------------
# Config, cache, weights and input checks


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 must be divisible by n_kv_heads=3"),
        (dict(d_model=66, n_heads=4), "d_model=66 must be divisible by n_heads=4"),
        (
            dict(d_model=60, n_heads=4),
            "^head_dim = d_model / n_heads = 15 must be even: RoPE rotates dimensions in pairs$",
        ),
        (dict(rope_theta=0.0), r"^rope_theta and eps must be > 0, got rope_theta=0\.0, eps=1e-05$"),
        (dict(eps=0.0), r"^rope_theta and eps must be > 0, got rope_theta=10000\.0, eps=0\.0$"),
        (dict(n_layers=0), "n_layers must be at least 1"),
        (dict(rope_scaling="yarn"), "rope_scaling must be one of"),
        (dict(rope_scaling="linear", rope_factor=0.5), "rope_factor must be >= 1"),
        (dict(rope_factor=2.0), "and 1 with rope_scaling 'none'"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**fields)


def test_config_accepts_a_small_positive_rope_theta():
    assert LlamaConfig(rope_theta=0.5).rope_theta == 0.5  # > 0 is the rule, not > 1


def _hf_config(**fields) -> types.SimpleNamespace:
    """A transformers-like config holding only the sizes and ``fields``: every optional
    attribute (rope_theta, rope_parameters, rope_scaling, num_key_value_heads, head_dim,
    tie_word_embeddings, hidden_act, attention_bias, mlp_bias) is absent unless given."""
    sizes = dict(
        vocab_size=256, max_position_embeddings=256, num_hidden_layers=2, num_attention_heads=4,
        hidden_size=64, intermediate_size=172, rms_norm_eps=1e-5, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return types.SimpleNamespace(**{**sizes, **fields})


def test_config_from_hf_defaults_for_absent_fields():
    config = LlamaConfig.from_hf(_hf_config(eos_token_id=[]))
    assert config == LlamaConfig(n_kv_heads=4, rope_theta=10000.0, tie_weights=False)
    assert config.eos_id is None  # an empty list of end ids is no id


def test_config_from_hf_reads_each_rope_layout_alone():
    # transformers 5: only rope_parameters, no rope_theta or rope_scaling attribute
    new = _hf_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    config = LlamaConfig.from_hf(new)
    assert (config.rope_scaling, config.rope_factor, config.rope_theta) == ("linear", 2.0, 500.0)
    # transformers 4: a rope_theta attribute beside rope_scaling None
    assert LlamaConfig.from_hf(_hf_config(rope_theta=500.0, rope_scaling=None)).rope_theta == 500.0
    # a linear type without its factor stretches by 1; a factor beside the default type is unused
    config = LlamaConfig.from_hf(_hf_config(rope_scaling={"type": "linear"}))
    assert (config.rope_scaling, config.rope_factor) == ("linear", 1.0)
    config = LlamaConfig.from_hf(
        _hf_config(rope_parameters={"rope_type": "default", "factor": 2.0})
    )
    assert (config.rope_scaling, config.rope_factor) == ("none", 1.0)


NO_BIASES = "attention_bias / mlp_bias are not supported: Llama has no biases"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(attention_bias=True), NO_BIASES),
        (dict(mlp_bias=True), NO_BIASES),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu' (SwiGLU), got 'gelu'"),
        (dict(head_dim=32), "head_dim=32 * num_attention_heads=4 must equal hidden_size=64"),
        (dict(hidden_size=66), "head_dim=16 * num_attention_heads=4 must equal hidden_size=66"),
        (
            dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
            "RoPE scaling type 'dynamic' is not supported: labkit's Llama loads ['default', "
            "'linear'] only. (Hugging Face's 'dynamic' recomputes the base from the running "
            "sequence length; labkit's rope_scaling='ntk' keeps one fixed base, so the two "
            "differ and no conversion is made.)",
        ),
    ],
)  # fmt: skip
def test_config_from_hf_refusals_in_full(fields, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LlamaConfig.from_hf(_hf_config(**fields))


def test_config_to_hf_round_trips():
    for config in (
        LlamaConfig(max_len=300, eps=1e-3, rope_theta=500.0, bos_id=1, eos_id=2, pad_id=3),
        LlamaConfig(rope_scaling="linear", rope_factor=2.0, tie_weights=False),
    ):
        assert LlamaConfig.from_hf(config.to_hf()) == config


def test_presets():
    small = LlamaConfig.preset("smollm2-135m")
    assert (small.n_layers, small.n_heads, small.n_kv_heads, small.head_dim) == (30, 9, 3, 64)
    assert LlamaConfig.preset("tiny", n_layers=3).n_layers == 3
    assert not LlamaConfig.preset("llama2-7b").is_encoder_decoder
    with pytest.raises(ValueError, match="unknown Llama preset"):
        LlamaConfig.preset("llama-9000")
    with pytest.raises(ValueError, match="n_layer"):
        LlamaConfig.preset("tiny", n_layer=3)
    with torch.device("meta"):  # sizes only, no memory
        assert Llama.from_preset("smollm2-135m").num_parameters() == SMOLLM2_PARAMETERS
        assert Llama.from_preset("smollm2-360m").num_parameters() == 361_821_120
        assert Llama.from_preset("smollm2-1.7b").num_parameters() == 1_711_376_384
        assert Llama.from_preset("llama2-7b").num_parameters() == 6_738_415_616


def test_cache_equals_full_pass(device):
    model = Llama.from_preset("tiny").to(device).eval()
    ids = torch.randint(0, 256, (2, 10), device=device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :6], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 10)]
    assert isinstance(cache, ModelCache) and cache.seq_len == 10
    assert cache.layers[0].k.shape == (2, 2, 10, 16)  # (B, H_kv, T, head_dim): GQA cache
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_cache_with_left_padding_equals_full_pass(device):
    """Batched generation: left-padded prompt, then one token per step with a growing mask."""
    model = Llama.from_preset("tiny").to(device).eval()
    ids, mask = _left_pad([torch.randint(1, 256, (n,)).tolist() for n in (8, 4)], pad_id=0)
    new = torch.randint(1, 256, (2, 3))
    full_ids, full_mask = torch.cat([ids, new], 1).to(device), torch.cat([mask, new > 0], 1)
    full_mask = full_mask.long().to(device)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask).logits
        cache = model.new_cache()
        steps = [model(full_ids[:, :8], attention_mask=full_mask[:, :8], cache=cache).logits]
        for t in range(8, 11):
            step = model(full_ids[:, t : t + 1], attention_mask=full_mask[:, : t + 1], cache=cache)
            steps.append(step.logits)
    real = full_mask.bool()
    assert (torch.cat(steps, dim=1)[real] - full[real]).abs().max() <= 1e-5


def test_attention_weights_are_causal(device):
    model = Llama.from_preset("tiny").to(device).eval()
    ids = torch.randint(0, 256, (2, 7), device=device)
    with torch.no_grad():
        out = model(ids, need_weights=True)
        plain = model(ids).logits
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 256
        later = model(changed).logits
    assert len(out.attentions) == 2
    for weights in out.attentions:
        assert weights.shape == (2, 4, 7, 7)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 7, device=device), atol=1e-5)
        assert weights.triu(diagonal=1).abs().max() == 0
    assert (out.logits - plain).abs().max() <= 1e-5  # the math path equals the fused one
    assert (later[:, :5] - plain[:, :5]).abs().max() <= 1e-6  # no peeking at token 5
    assert (later[:, 5:] - plain[:, 5:]).abs().max() > 1e-3


def test_init_and_tying():
    model = Llama.from_preset("tiny")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(model.norm.weight, torch.ones(64))
    untied = Llama.from_preset("tiny", tie_weights=False)
    assert untied.num_parameters() - model.num_parameters() == 256 * 64


def test_final_norm_eps_matches_transformers():
    """A large rms_norm_eps, so that a norm left at its default eps shows in the logits."""
    hf = _hf_tiny(True, torch.device("cpu"), eps=0.5)
    model = Llama.from_hf(hf)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= ATOL


def test_training_mode_has_no_dropout():
    model = Llama.from_preset("tiny").train()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_hidden_states_only_when_asked():
    model = Llama.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert model(ids).hidden_states is None
        out = model(ids, output_hidden_states=True)
        assert len(out.hidden_states) == model.config.n_layers + 1
        torch.testing.assert_close(out.hidden_states[0], model.embed_tokens(ids))
        torch.testing.assert_close(model.norm(out.hidden_states[-1]), out.hidden)


def test_static_cache_equals_full_pass():
    model = Llama.from_preset("tiny").eval()
    ids, mask = _left_pad([torch.randint(1, 256, (n,)).tolist() for n in (8, 5)], pad_id=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(2, 10)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in (6, 7):
            step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(step.logits)
    assert isinstance(cache, StaticCache) and cache.seq_len == 8
    assert cache.layers[0].k.shape == (2, 2, 10, 16)  # (B, H_kv, max_len, head_dim)
    real = mask.bool()
    assert (torch.cat(steps, dim=1)[real] - full[real]).abs().max() <= 1e-5
    assert model.new_cache(1, 4, dtype=torch.bfloat16).layers[0].k.dtype == torch.bfloat16


def test_input_errors():
    model = Llama.from_preset("tiny", max_len=16).eval()
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(ids + 256)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, past \+ seq\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"positions must be integer \(5,\) or \(2, 5\)"):
        model(ids, positions=torch.arange(4))
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.randint(0, 256, (1, 17)))
    with pytest.raises(ValueError, match="cache has 1 layers"):
        model(ids, cache=ModelCache.empty(1))


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct checkpoint


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text)["input_ids"]


def test_smollm2_config_and_parameters(smollm2):
    model, reference = smollm2.model, smollm2.reference
    assert isinstance(model, Llama)
    preset = LlamaConfig.preset("smollm2-135m")
    assert dataclasses.replace(model.config, eps=preset.eps) == preset
    assert model.config.eps == pytest.approx(1e-5)
    assert model.num_parameters() == reference.num_parameters() == SMOLLM2_PARAMETERS
    assert model.num_parameters(exclude_embeddings=True) == reference.num_parameters(
        exclude_embeddings=True
    )


def test_smollm2_tokenizer_round_trip(smollm2):
    tokenizer, config = smollm2.tokenizer, smollm2.model.config
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_id, config.eos_id)
    ids = _chat_ids(tokenizer, PROMPTS[0])
    assert ids[0] == config.bos_id  # <|im_start|>
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    for text in ("The capital of France is Paris.", "  x = f(y) + 2 # ünïcödé ✓"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_smollm2_logits_match_transformers(smollm2, monkeypatch):
    """Three chat prompts in one left-padded batch, plus the first one alone."""
    model, tokenizer, reference = smollm2
    ids, mask = _left_pad([_chat_ids(tokenizer, p) for p in PROMPTS], model.config.pad_id)
    real = mask.bool()
    seen = _record_rope_positions(model, monkeypatch)
    with torch.inference_mode():
        ours = model(ids, attention_mask=mask).logits
        theirs = reference(ids, attention_mask=mask, position_ids=_hf_positions(mask)).logits
        single = ids[:1, ~(mask[0] == 0)]  # the longest prompt needs no padding
        alone_ours, alone_theirs = model(single).logits, reference(single).logits
    assert (ours[real] - theirs[real]).abs().max() <= ATOL
    assert torch.equal(ours[real].argmax(-1), theirs[real].argmax(-1))
    assert (alone_ours - alone_theirs).abs().max() <= ATOL
    # The positions transformers was given are the ones labkit used (RoPE is relative, so the
    # logits alone would also agree with positions that count the pads).
    assert torch.equal(seen[0], _hf_positions(mask))


def test_smollm2_cached_greedy_decoding_matches_transformers(smollm2):
    """Prefill + 6 cached steps equals the full pass, and the tokens are transformers' greedy."""
    model, tokenizer, reference = smollm2
    prompt = torch.tensor([_chat_ids(tokenizer, PROMPTS[0])])
    cache = model.new_cache()
    with torch.inference_mode():
        logits = [model(prompt, cache=cache).logits]
        tokens = [logits[-1][:, -1].argmax(-1, keepdim=True)]
        for _ in range(5):
            logits.append(model(tokens[-1], cache=cache).logits)
            tokens.append(logits[-1][:, -1].argmax(-1, keepdim=True))
        generated = torch.cat(tokens, dim=1)
        full = model(torch.cat([prompt, generated[:, :-1]], dim=1)).logits
        expected = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
    assert (torch.cat(logits, dim=1) - full).abs().max() <= ATOL
    assert torch.equal(generated, expected[:, prompt.shape[1] :])
    assert "Paris" in tokenizer.decode(generated[0])
