"""labkit's GPT: equal to Hugging Face's GPT2LMHeadModel, cache-consistent, causal, trainable."""

import re
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit.models.gpt import GPT, GPTConfig, gpt2_source
from labkit.nn import LayerNorm

VOCAB = 100
MAX_LEN = 32


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists with id 0: (input_ids (B, T), attention_mask (B, T))."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """(labkit GPT, transformers GPT2LMHeadModel) loaded through labkit.models.pretrained.load.

    The random GPT-2 gets every parameter (LayerNorms and biases included, which GPT-2
    initialises to 1 and 0) drawn at random, so a swapped or dropped tensor cannot go unseen.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from labkit.models.pretrained import load

    hf_config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=VOCAB,
        n_positions=MAX_LEN,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = GPT2LMHeadModel(hf_config)
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the folder is local: never try the network
        pretrained = load(str(folder), reference=True)
    return pretrained.model, pretrained.reference


# ----------------------------------------------------------------------------------------------
# Equivalence with transformers


def test_from_hf_matches_transformers(gpt2_pair):
    model, hf = gpt2_pair
    assert not model.training and model.config.max_len == MAX_LEN
    assert (model.config.bos_id, model.config.eos_id, model.config.pad_id) == (1, 2, None)
    ids = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids, output_hidden_states=True)
    assert ours.logits.shape == (3, 20, VOCAB)
    assert ours.logits.abs().max() > 1.0  # a real signal, not near-zero logits
    assert (ours.logits - theirs.logits).abs().max() <= 1e-4
    assert (ours.hidden - theirs.hidden_states[-1]).abs().max() <= 1e-4


def test_hidden_states_only_when_asked_and_equal_to_transformers(gpt2_pair):
    """The residual stream entering each layer is Hugging Face's; the last entry is the final
    layer's output before the final norm (HF's last entry is after it)."""
    model, hf = gpt2_pair
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert model(ids).hidden_states is None
        ours = model(ids, output_hidden_states=True)
        theirs = hf(ids, output_hidden_states=True).hidden_states
    assert len(ours.hidden_states) == len(theirs) == model.config.n_layers + 1
    for mine, hf_state in zip(ours.hidden_states[:-1], theirs[:-1], strict=True):
        assert (mine - hf_state).abs().max() <= 1e-4
    assert torch.equal(model.norm(ours.hidden_states[-1]), ours.hidden)


@pytest.mark.parametrize("hf_name, ours", [("gelu_new", "gelu_tanh"), ("gelu", "gelu")])
def test_from_hf_keeps_the_gelu_variant(hf_name, ours):
    """Exact and tanh GELU differ by up to ~1e-3 per unit: the mapped model must use the same."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=MAX_LEN,
        activation_function=hf_name,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.5)  # large pre-activations, where the two GELUs part
        model = GPT.from_hf(hf)
        ids = torch.randint(0, VOCAB, (2, 12))
        diff = (model(ids).logits - hf(ids).logits).abs().max()
    assert model.config.activation == ours
    assert diff <= 1e-4


def test_from_hf_matches_transformers_with_left_padding(gpt2_pair):
    model, hf = gpt2_pair
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]])
    hf_positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=hf_positions, output_hidden_states=True)
    real = mask.bool()  # pad positions have no meaningful output in either model
    assert (ours.logits[real] - theirs.logits[real]).abs().max() <= 1e-4
    assert (ours.hidden[real] - theirs.hidden_states[-1][real]).abs().max() <= 1e-4


def test_from_hf_parameter_count_matches_transformers(gpt2_pair):
    model, hf = gpt2_pair
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(
        exclude_embeddings=True
    )


def test_gpt2_source_maps_packed_attention_and_conv1d():
    assert gpt2_source("layers.1.self_attn.k_proj.bias")[0] == "transformer.h.1.attn.c_attn.bias"
    assert gpt2_source("wpe.embedding.weight")[0] == "transformer.wpe.weight"
    c_attn = torch.arange(4 * 12).reshape(4, 12)  # Conv1D (in=4, out=3*4): [q | k | v]
    k_weight = gpt2_source("layers.0.self_attn.k_proj.weight")[1](c_attn)
    assert torch.equal(k_weight, c_attn[:, 4:8].t())  # the k columns, as Linear (out, in)
    c_fc = torch.arange(4 * 16).reshape(4, 16)
    assert torch.equal(gpt2_source("layers.0.ffn.up_proj.weight")[1](c_fc), c_fc.t())


def test_from_hf_rejects_wrong_shapes_and_unsupported_configs():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=8, eos_token_id=0
    )
    config.bos_token_id = 0
    hf = GPT2LMHeadModel(config)
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight = torch.nn.Parameter(torch.zeros(16, 48))
    hf.transformer.h[0].ln_1.register_parameter("bias", None)  # no longer a parameter
    message = (
        "cannot copy GPT-2 into labkit's GPT: missing from GPT-2: ['transformer.h.0.ln_1.bias']; "
        "shapes differ: layers.0.ffn.up_proj.weight: GPT-2 transformer.h.0.mlp.c_fc.weight "
        "(converted) is (48, 16), labkit layers.0.ffn.up_proj.weight is (64, 16)"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        GPT.from_hf(hf)
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPTConfig.from_hf(GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        GPTConfig.from_hf(GPT2Config(scale_attn_by_inverse_layer_idx=True))


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub

    from labkit.models.pretrained import PretrainedUnavailableError, load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads both variables once, at import: point its constants there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # Fast means: no connection is even attempted (a stopwatch would fail on a loaded machine).
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("offline test: no network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(PretrainedUnavailableError, match="(?i)offline|hub"):
        load("gpt2")
    assert attempts == []


# ----------------------------------------------------------------------------------------------
# KV cache, padding, causality


def test_cache_token_by_token_equals_one_pass(device):
    model = GPT.from_preset("tiny").to(device).eval()
    ids = torch.randint(0, 256, (2, 12), device=device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        prefill = model(ids[:, :5], cache=cache).logits  # a prompt, then one token at a time
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    assert cache.seq_len == 12
    assert (torch.cat([prefill, *steps], dim=1) - full).abs().max() <= 1e-5


def test_cache_with_left_padded_batch_equals_one_pass(device):
    model = GPT.from_preset("tiny").to(device).eval()
    ids, mask = left_padded([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18]])
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        prefill = model(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits
        steps = [
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits
            for t in range(4, ids.shape[1])
        ]
    incremental = torch.cat([prefill, *steps], dim=1)
    real = mask.bool()
    assert (incremental[real] - full[real]).abs().max() <= 1e-5


def test_left_padding_does_not_change_real_tokens(device):
    model = GPT.from_preset("tiny").to(device).eval()
    prompt = [20, 21, 22, 23]
    ids, mask = left_padded([[30, 31, 32, 33, 34, 35, 36], prompt])
    with torch.no_grad():
        padded = model(ids.to(device), attention_mask=mask.to(device)).logits[1, -4:]
        alone = model(torch.tensor([prompt], device=device)).logits[0]
    assert (padded - alone).abs().max() <= 1e-5


def test_future_tokens_do_not_change_earlier_logits():
    model = GPT.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 256
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[:, :6] - after[:, :6]).abs().max() <= 1e-6
    assert (before[:, 6:] - after[:, 6:]).abs().max() > 1e-3


def test_need_weights_gives_causal_rows_that_sum_to_one(device):
    model = GPT.from_preset("tiny").to(device).eval()
    ids = torch.randint(0, 256, (2, 9), device=device)
    with torch.no_grad():
        out = model(ids, need_weights=True)
        assert model(ids).attentions is None
    assert len(out.attentions) == model.config.n_layers
    future = torch.ones(9, 9, dtype=torch.bool, device=device).triu(1)
    for weights in out.attentions:
        assert weights.shape == (2, model.config.n_heads, 9, 9)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 9, device=device), atol=1e-6)
        assert weights[..., future].abs().max() == 0


def test_attention_mask_blocks_pad_keys():
    model = GPT.from_preset("tiny").eval()
    ids, mask = left_padded([[3, 4, 5, 6], [7, 8]])
    with torch.no_grad():
        weights = model(ids, attention_mask=mask, need_weights=True).attentions
    assert len(weights) == model.config.n_layers  # an empty list would pass the loop below
    for w in weights:
        assert w.shape == (2, model.config.n_heads, 4, 4)
        assert w[1, :, 2:, :2].abs().max() == 0  # the real tokens of row 1 never see its pads
        assert w[1, :, 2:, 2:].sum(-1).allclose(torch.ones(model.config.n_heads, 2))


# ----------------------------------------------------------------------------------------------
# Configuration, sizes, initialisation


def test_small_preset_has_gpt2_small_parameter_count():
    with torch.device("meta"):  # shapes only, no memory
        small = GPT.from_preset("small")
        untied = GPT.from_preset("small", tie_weights=False)
    assert small.num_parameters() == 124_439_808  # GPT2LMHeadModel("gpt2").num_parameters()
    assert untied.num_parameters() == 124_439_808 + 50257 * 768
    assert small.config.d_ff == 3072 and small.config.eos_id == 50256


def test_presets():
    tiny = GPTConfig.preset("tiny", vocab_size=65)
    expected = dict(vocab_size=65, n_layers=2, n_heads=2, d_model=64, max_len=128, eos_id=None)
    assert {name: getattr(tiny, name) for name in expected} == expected
    assert tiny.is_encoder_decoder is False
    char = GPT.from_preset("nanogpt-char-cpu")
    expected = dict(
        vocab_size=65,
        max_len=64,
        n_layers=4,
        n_heads=4,
        d_model=128,
        dropout=0.0,
        activation="gelu",
    )  # nanoGPT's nn.GELU(), the exact form
    assert {name: getattr(char.config, name) for name in expected} == expected
    assert not any(name.endswith("bias") for name, _ in char.named_parameters())
    xl = GPTConfig.preset("xl")
    assert (xl.n_layers, xl.n_heads, xl.d_model) == (48, 25, 1600)
    with pytest.raises(ValueError, match="unknown GPT preset 'huge'"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig.preset("tiny", n_layer=3)  # typo of n_layers
    with pytest.raises(ValueError, match="activation must be one of .* got 'relu'"):
        GPTConfig.preset("tiny", activation="relu")
    with pytest.raises(ValueError, match="d_model=64 must be divisible by n_heads=3"):
        GPTConfig.preset("tiny", n_heads=3)
    with pytest.raises(ValueError, match="bos_id=50256 is outside"):
        GPTConfig.preset("small", vocab_size=256)


def test_config_from_hf_copies_every_field_and_names_what_it_refuses():
    from transformers import GPT2Config
    from transformers import LlamaConfig as HFLlamaConfig

    hf_config = GPT2Config(
        vocab_size=50, n_positions=32, n_layer=3, n_head=2, n_embd=16, n_inner=24,
        resid_pdrop=0.25, layer_norm_epsilon=1e-3, tie_word_embeddings=False,
        activation_function="gelu", bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    c = GPTConfig.from_hf(hf_config)
    sizes = (c.vocab_size, c.max_len, c.n_layers, c.n_heads, c.d_model, c.d_ff)
    assert sizes == (50, 32, 3, 2, 16, 24)
    assert (c.dropout, c.eps, c.tie_weights, c.activation) == (0.25, 1e-3, False, "gelu")
    assert (c.bos_id, c.eos_id, c.pad_id) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"^expected a GPT-2 config, got model_type='llama'$"):
        GPTConfig.from_hf(HFLlamaConfig())
    message = (
        r"^GPT scales attention scores by 1/sqrt\(head_dim\) only, got scale_attn_weights=False, "
        r"scale_attn_by_inverse_layer_idx=False$"
    )
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_hf(GPT2Config(scale_attn_weights=False))


@pytest.mark.parametrize(
    "field", ["vocab_size", "max_len", "n_layers", "n_heads", "d_model", "d_ff"]
)
def test_config_sizes_must_be_positive(field):
    with pytest.raises(ValueError, match=rf"^{field} must be at least 1, got {field}=0$"):
        GPTConfig.preset("tiny", **{field: 0})


def test_every_norm_and_dropout_follows_the_config():
    model = GPT(GPTConfig.preset("tiny", eps=1e-3, dropout=0.25))
    norms = [m.eps for m in model.modules() if isinstance(m, LayerNorm)]
    assert norms == [1e-3] * 5  # two per layer and the final one
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.25] * 7  # embeddings, and three per layer
    assert all(layer.self_attn.dropout == 0.25 for layer in model.layers)
    assert model.lm_head.bias is None


def test_gpt2_initialisation():
    model = GPT.from_preset("tiny", d_model=128)  # 2 layers: residual std 0.02 / sqrt(4)
    layer = model.layers[0]
    assert abs(layer.self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(layer.self_attn.out_proj.weight.std().item() - 0.01) < 0.001
    assert abs(layer.self_attn.out_proj.weight.mean().item()) < 0.001
    assert abs(layer.ffn.down_proj.weight.std().item() - 0.01) < 0.001
    assert abs(model.wpe.embedding.weight.std().item() - 0.02) < 0.002
    assert layer.ffn.up_proj.bias.abs().max() == 0
    assert model.lm_head.weight is model.wte.weight


# ----------------------------------------------------------------------------------------------
# Input validation


def test_bad_inputs_raise_value_errors():
    model = GPT.from_preset("tiny", max_len=16).eval()
    ids = torch.randint(0, 256, (2, 10))
    with pytest.raises(ValueError, match=r"\(2, 20\).*20 positions.*max_len=16"):
        model(torch.randint(0, 256, (2, 20)))
    cache = model.new_cache()
    model(ids, cache=cache)
    with pytest.raises(ValueError, match=r"\(2, 7\) after 10 cached tokens needs 17 positions"):
        model(ids[:, :7], cache=cache)
    with pytest.raises(ValueError, match=r"integer tensor \(batch, seq\).*\(10,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"vocab_size=256"):
        model(ids + 256)
    with pytest.raises(ValueError, match=r"\(2, 10\).*got \(2, 9\)"):
        model(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"positions must be integer \(10,\) or \(2, 10\)"):
        model(ids, positions=torch.arange(9))
    with pytest.raises(ValueError, match="max_len=16"):
        model(ids, positions=torch.arange(10) + 10)
    with pytest.raises(ValueError, match="cache has 3 layers"):
        from labkit.nn.cache import ModelCache

        model(ids, cache=ModelCache.empty(3))


# ----------------------------------------------------------------------------------------------
# Training


def test_a_few_steps_reduce_the_loss(device):
    model = GPT.from_preset("tiny").to(device).train()
    batch = torch.randint(0, 256, (4, 33), device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.2)
    assert losses[-1] < 0.6 * losses[0]
