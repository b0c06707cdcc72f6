"""Models expose their internals: named hook points, the activation cache, patching hooks, and
per-layer attentions / hidden states by argument, the same way on every labkit model."""

import copy

import pytest
import torch

from labkit.interp import ActivationCache, hooks, run_with_cache
from labkit.models import (
    GPT,
    BertEncoder,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    Llama,
    Transformer,
)

VOCAB = 50


def _models():
    torch.manual_seed(0)
    return {
        "gpt": GPT.from_preset("tiny", vocab_size=VOCAB),
        "llama": Llama.from_preset("tiny", vocab_size=VOCAB),
        "bert": BertEncoder.from_preset("tiny", vocab_size=VOCAB),
        "bert-cls": BertForSequenceClassification.from_encoder(
            BertEncoder.from_preset("tiny", vocab_size=VOCAB), num_labels=3
        ),
        "transformer": Transformer.from_preset("tiny", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB),
    }


MODELS = _models()


def _inputs(name: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 7), generator=g)
    if name == "transformer":
        return (ids, torch.randint(4, VOCAB, (2, 5), generator=g)), {}
    return (ids,), {}


def _main(out):
    return out[0]  # logits (or start_logits): the first field of every output tuple


def _attentions(name, out) -> dict[str, list[torch.Tensor]]:
    """The model's own attention outputs, by the hook-point stack they belong to."""
    if name == "transformer":
        return {
            "encoder.blocks|attn.pattern": out.encoder_attentions,
            "decoder.blocks|attn.pattern": out.self_attentions,
            "decoder.blocks|cross_attn.pattern": out.cross_attentions,
        }
    return {"blocks|attn.pattern": out.attentions}


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_patterns_equal_the_attentions_output(name):
    model = MODELS[name].eval()
    args, kwargs = _inputs(name)
    with torch.no_grad():
        plain = model(*args, **kwargs)
        weighted = model(*args, need_weights=True, **kwargs)
        out, cache = model.run_with_cache(*args, **kwargs)
    assert isinstance(cache, ActivationCache) and cache.names() == list(model.hook_points())
    torch.testing.assert_close(_main(out), _main(plain))  # caching changes nothing
    for key, expected in _attentions(name, weighted).items():
        stack, point = key.split("|")
        got = cache.per_layer(point, stack)
        assert len(got) == len(expected) > 0
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape and g.dim() == 4  # (B, H, T, S)
            torch.testing.assert_close(g, e)
    assert not any(p._forward_hooks for p in model.hook_points().values())  # all removed


@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "transformer"])
def test_hidden_states_are_the_residual_stream_at_the_hook_points(name):
    model = MODELS[name].eval()
    args, kwargs = _inputs(name)
    with torch.no_grad():
        out, cache = model.run_with_cache(*args, output_hidden_states=True, **kwargs)
    if name == "transformer":
        pairs = [("encoder.blocks", out.encoder_hidden_states),
                 ("decoder.blocks", out.decoder_hidden_states)]  # fmt: skip
    else:
        pairs = [("blocks", out.hidden_states)]
    for stack, states in pairs:
        pre, post = cache.per_layer("resid_pre", stack), cache.per_layer("resid_post", stack)
        assert len(states) == len(pre) + 1
        for i in range(len(pre)):
            torch.testing.assert_close(states[i], pre[i])
            torch.testing.assert_close(states[i + 1], post[i])
    d_model = model.config.d_model
    assert cache["blocks.0.resid_post" if name != "transformer" else
                 "decoder.blocks.0.resid_post"].shape[-1] == d_model  # fmt: skip


@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "transformer"])
def test_zero_ablating_a_head_by_hook_equals_masking_it_in_the_weights(name):
    model = MODELS[name].eval()
    args, kwargs = _inputs(name)
    layer_name = "decoder.blocks.1" if name == "transformer" else "blocks.1"
    layers = model.decoder_layers if name == "transformer" else model.layers
    attn = layers[1].self_attn
    head, d_k = 1, attn.head_dim

    def ablate(z, hook_name):  # z: (B, H, T, d_k)
        assert hook_name == f"{layer_name}.attn.z" and z.shape[1] == attn.n_heads
        z = z.clone()
        z[:, head] = 0.0
        return z

    masked = copy.deepcopy(model)
    masked_attn = (masked.decoder_layers if name == "transformer" else masked.layers)[1].self_attn
    with torch.no_grad():
        masked_attn.out_proj.weight[:, head * d_k : (head + 1) * d_k] = 0.0
        with model.hooks({f"{layer_name}.attn.z": ablate}):
            hooked = _main(model(*args, **kwargs))
        expected = _main(masked(*args, **kwargs))
        baseline = _main(model(*args, **kwargs))
    torch.testing.assert_close(hooked, expected)
    assert not torch.allclose(hooked, baseline)  # the head mattered, so the check means something


def test_patching_the_pattern_recomputes_the_output():
    """A zeroed attention pattern for one head gives the same result as zeroing its output."""
    model = MODELS["gpt"].eval()
    (ids,), _ = _inputs("gpt")

    def zero_pattern(pattern, name):  # (B, H, T, S)
        pattern = pattern.clone()
        pattern[:, 0] = 0.0
        return pattern

    def zero_z(z, name):
        z = z.clone()
        z[:, 0] = 0.0
        return z

    with torch.no_grad():
        out_p, cache = run_with_cache(
            model, ids, names="blocks.0.attn.pattern",
            fwd_hooks={"blocks.0.attn.pattern": zero_pattern},
        )  # fmt: skip
        with hooks(model, [("blocks.0.attn.z", zero_z)]):
            out_z = model(ids)
    torch.testing.assert_close(out_p.logits, out_z.logits)
    assert cache.names() == ["blocks.0.attn.pattern"]
    assert bool((cache["blocks.0.attn.pattern"][:, 0] == 0).all())  # the cache saw the patch


def test_hook_names_are_checked_and_hooks_removed_after_an_error():
    model = MODELS["llama"]
    with pytest.raises(KeyError, match="blocks.0.attn.pattern"):
        model.run_with_cache(torch.ones(1, 3, dtype=torch.long), names="blocks.0.attn.patern")

    def boom(x, name):
        raise RuntimeError("inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"):
        with model.hooks({"blocks.0.mlp_out": boom}):
            model(torch.ones(1, 3, dtype=torch.long))
    assert not any(p._forward_hooks for p in model.hook_points().values())
    names = list(model.hook_points())
    assert names[:5] == ["blocks.0.resid_pre", "blocks.0.attn.pattern", "blocks.0.attn.z",
                         "blocks.0.attn_out", "blocks.0.resid_mid"]  # forward order; fmt: skip


def test_task_heads_share_their_encoders_hook_points():
    head = MODELS["bert-cls"]
    assert list(head.hook_points()) == list(head.bert.hook_points())
    qa = BertForQuestionAnswering.from_encoder(head.bert)
    ids = torch.randint(4, VOCAB, (1, 6))
    out = qa(ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(out.hidden_states) - 1 == qa.config.n_layers
