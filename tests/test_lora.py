"""labkit's LoRA against ``peft`` on the same tiny Llama, plus merging, saving and exporting.

A random 2-layer GQA ``transformers.LlamaForCausalLM`` (random norm scales) is the base model;
``Llama.from_hf`` copies it into labkit. ``peft`` adapts the transformers copy, labkit's
``apply_lora`` the labkit copy, and random adapter weights are copied from labkit to peft
through ``hf_name_map`` (labkit's ``out_proj`` is transformers' ``o_proj``).
"""

import copy

import peft
import pytest
import torch
import transformers

from labkit.models import (
    GPT,
    Llama,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged,
    save_adapter,
    save_merged_llama,
    trainable_parameters,
    unmerge_lora,
)
from labkit.models.llama import hf_name_map
from labkit.models.lora import linear_names, lora_layers, read_adapter

ATOL = 1e-5
ATTN = (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "out_proj"])
# (r, alpha, peft's target_modules, labkit's target_modules)
CASES = [
    (1, 1.0, ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    (4, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "out_proj"]),
    (8, 4.0, ["gate_proj", "up_proj", "down_proj"], ["gate_proj", "up_proj", "down_proj"]),
    (2, 8.0, r".*\.1\.self_attn\.(q|v)_proj", r".*\.1\.self_attn\.(q|v)_proj"),  # regex
]


def _hf_tiny(tie: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, initializer_range=0.1,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf.eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _to_hf_module(name: str, n_layers: int) -> str:
    """labkit module name -> transformers module name, through the weight-name map."""
    inverse = {v: k for k, v in hf_name_map(n_layers, tie_weights=True).items()}
    return inverse[f"{name}.weight"].removesuffix(".weight")


def _pair(r, alpha, peft_targets, ours_targets, dropout=0.0):
    """(peft model, labkit model) with the same base weights and the same random adapters."""
    hf = _hf_tiny()
    ours = apply_lora(Llama.from_hf(hf), r, alpha, ours_targets, dropout=dropout)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=peft_targets, lora_dropout=dropout
    )
    theirs = peft.get_peft_model(hf, config)
    theirs_params = dict(theirs.named_parameters())
    layers = list(lora_layers(ours))
    assert len(layers) == sum(".lora_A." in n for n in theirs_params)  # same layers selected
    torch.manual_seed(2)
    with torch.no_grad():
        for name, layer in layers:
            layer.lora_B.normal_(0.0, 0.2)  # zero-initialised B would make the adapter a no-op
            prefix = f"base_model.model.{_to_hf_module(name, 2)}"
            theirs_params[f"{prefix}.lora_A.default.weight"].copy_(layer.lora_A)
            theirs_params[f"{prefix}.lora_B.default.weight"].copy_(layer.lora_B)
    return theirs.eval(), ours.eval()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=["r1-qv", "r4-attn", "r8-mlp", "r2-regex"])
def test_matches_peft_before_and_after_merge(case):
    theirs, ours = _pair(*case)
    ids = _ids()
    base = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged_logits = ours(ids).logits
        _close(unmerged_logits, theirs(ids).logits)
        with theirs.disable_adapter():  # the adapters really change the output
            assert (theirs(ids).logits - unmerged_logits).abs().max() > 1e-2

        merge_lora(ours)
        theirs.merge_adapter()
        merged_logits = ours(ids).logits
        _close(merged_logits, theirs(ids).logits)
        _close(merged_logits, unmerged_logits)  # merged == unmerged
        changed = [k for k in base if not torch.equal(base[k], ours.state_dict()[k])]
        assert changed and all(k.endswith("base_layer.weight") for k in changed)

        unmerge_lora(ours)  # the round trip restores the base weights
        for k, v in ours.state_dict().items():
            if "lora_" not in k:
                _close(v, base[k], atol=1e-6)
        _close(ours(ids).logits, unmerged_logits)

        plain = merged(ours)  # a copy without LoRA layers, equal to peft's merge_and_unload
        assert not list(lora_layers(plain)) and list(lora_layers(ours))
        theirs.unmerge_adapter()
        _close(plain(ids).logits, theirs.merge_and_unload()(ids).logits)


def test_dropout_matches_peft_in_training_and_is_off_in_eval():
    theirs, ours = _pair(4, 8.0, ["q_proj", "v_proj"], ["q_proj", "v_proj"], dropout=0.3)
    ids = _ids()
    with torch.no_grad():
        _close(ours(ids).logits, theirs(ids).logits)  # eval: no dropout
        ours.train(), theirs.train()
        torch.manual_seed(5)
        a = ours(ids).logits
        torch.manual_seed(5)
        _close(a, theirs(ids).logits)  # same dropout masks, drawn in the same order
        assert (a - ours(ids).logits).abs().max() > 1e-4  # a new mask changes the output


def test_gradients_reach_only_the_adapters_and_equal_peft():
    theirs, ours = _pair(4, 16.0, *ATTN)
    ids = _ids()
    ours(ids).logits.logsumexp(-1).mean().backward()
    theirs(ids).logits.logsumexp(-1).mean().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for name, layer in lora_layers(ours):
        prefix = f"base_model.model.{_to_hf_module(name, 2)}"
        for part in ("lora_A", "lora_B"):
            _close(getattr(layer, part).grad, theirs_params[f"{prefix}.{part}.default.weight"].grad)


def test_init_is_peft_default_and_starts_at_the_base_model():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(300, 40), r=64, alpha=32)
    assert layer.lora_A.shape == (64, 300) and layer.lora_B.shape == (40, 64)
    assert layer.scale == 0.5 and not layer.lora_B.any()
    # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)): std 1/sqrt(3 in)
    bound = 300**-0.5
    assert layer.lora_A.abs().max() <= bound
    assert abs(layer.lora_A.std().item() / (bound / 3**0.5) - 1) < 0.05
    x = torch.randn(3, 5, 300)
    _close(layer(x), layer.base_layer(x), atol=0)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


def test_trainable_report_equals_peft():
    theirs, ours = _pair(8, 16.0, ["q_proj", "v_proj"], ["q_proj", "v_proj"])
    report = trainable_parameters(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    # 2 layers x (q: 8 x (32 + 32), v: 8 x (32 + 16))
    assert report.trainable == 2 * (8 * 64 + 8 * 48)
    assert report.percent == pytest.approx(100 * report.trainable / report.total)
    assert str(report) == (
        f"trainable params: {report.trainable:,d} || all params: {report.total:,d} || "
        f"trainable%: {report.percent:.4f}"
    )


def test_adapter_save_load_round_trip(tmp_path):
    _, ours = _pair(4, 16.0, ["q_proj", "gate_proj"], ["q_proj", "gate_proj"], dropout=0.1)
    path = save_adapter(ours, tmp_path / "adapter.safetensors")
    tensors, config = read_adapter(path)
    targets = ["q_proj", "gate_proj"]
    assert config == {"r": 4, "alpha": 16.0, "dropout": 0.1, "target_modules": targets}
    assert tensors.keys() == lora_state_dict(ours).keys()
    assert len(tensors) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)

    fresh = load_adapter(Llama.from_hf(_hf_tiny()).eval(), path)  # gets LoRA from the config
    for k, v in lora_state_dict(ours).items():
        assert torch.equal(lora_state_dict(fresh)[k], v)
    ids = _ids()
    with torch.no_grad():
        _close(fresh(ids).logits, ours(ids).logits, atol=0)

    other = apply_lora(Llama.from_hf(_hf_tiny()), 4, 16.0, ["v_proj"])
    with pytest.raises(ValueError, match="does not fit the model: missing .*v_proj"):
        load_adapter(other, path)
    with pytest.raises(ValueError, match="adapters are merged"):
        load_adapter(merge_lora(fresh), path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a labkit LoRA adapter"):
        load_adapter(other, tmp_path / "plain.safetensors")


@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_round_trip(tie):
    hf = _hf_tiny(tie)
    ours = Llama.from_hf(hf)
    back = ours.to_hf()
    assert back.config.tie_word_embeddings == tie
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = _ids()
    with torch.no_grad():
        _close(back(ids).logits, hf(ids).logits, atol=0)


def test_exported_merged_model_loads_in_transformers(tmp_path):
    targets = (["q_proj", "o_proj", "down_proj"], ["q_proj", "out_proj", "down_proj"])
    theirs, ours = _pair(4, 16.0, *targets)
    folder = save_merged_llama(ours, tmp_path / "merged")
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert list(lora_layers(ours))  # the model itself keeps its adapters, unmerged
    assert not any(layer.merged for _, layer in lora_layers(ours))
    ids = _ids()
    with torch.no_grad():
        logits = loaded(ids).logits
        _close(logits, ours(ids).logits)
        _close(logits, theirs.merge_and_unload()(ids).logits)


def test_errors():
    model = Llama.from_hf(_hf_tiny())
    names = r"matches no module .*linear layers are named \['down_proj', 'gate_proj'"
    with pytest.raises(ValueError, match=names):
        apply_lora(model, 4, 8, ["query"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        apply_lora(model, 4, 8, [])
    with pytest.raises(ValueError, match="nn.Linear layers only; 'layers.0.norm1' is a RMSNorm"):
        apply_lora(model, 4, 8, ["norm1"])
    with pytest.raises(ValueError, match="'lm_head' shares its weight .*tied"):
        apply_lora(model, 4, 8, ["lm_head"])
    with pytest.raises(ValueError, match="no LoRA layers: call apply_lora first"):
        merge_lora(model)
    with pytest.raises(ValueError, match="rank r must be at least 1"):
        LoRALinear(torch.nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(torch.nn.Embedding(4, 4), r=1, alpha=1)
    apply_lora(model, 4, 8, ["q_proj"])
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        apply_lora(model, 4, 8, ["q_proj"])
    with pytest.raises(ValueError, match="parameters .*lora_A.* have no Hugging Face name"):
        model.to_hf()
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    gpt = apply_lora(GPT.from_preset("tiny"), 2, 4, linear_names(GPT.from_preset("tiny"))[:1])
    with pytest.raises(TypeError, match="saves a labkit Llama, got GPT"):
        save_merged_llama(gpt, "unused")


def test_works_on_other_models():
    """Name-suffix selection is model-agnostic: LoRA on a GPT and a plain nn.Sequential."""
    gpt = GPT.from_preset("tiny").eval()
    names = linear_names(gpt)
    assert names  # the error message's list is the model's real linear layers
    ids = torch.randint(0, gpt.config.vocab_size, (1, 6))
    before = gpt(ids).logits.detach()
    apply_lora(gpt, 2, 4, [names[0]])
    assert not any(m.training for m in gpt.modules())  # new layers follow the eval mode
    _close(gpt(ids).logits.detach(), before, atol=0)  # B = 0: the base model at the start
    seq = apply_lora(torch.nn.Sequential(torch.nn.Linear(3, 3)), 1, 1, ["0"])
    assert isinstance(seq[0], LoRALinear)
    assert copy.deepcopy(seq)[0].r == 1


def _unwrap(model: torch.nn.Module) -> None:
    """Put the plain linear layers back (the adapters were never merged: weights untouched)."""
    for name, layer in list(lora_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    model.requires_grad_(True)


def test_smollm2_lora_matches_peft(smollm2):
    """On the real SmolLM2-135M-Instruct, to the 1e-4 at which labkit's and transformers' base
    models agree (tests/test_llama.py). Adapted in place (no 1 GB of copies) and restored."""
    model, tokenizer, reference = smollm2
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.inference_mode():
        base = model(ids).logits
    config = peft.LoraConfig(r=8, lora_alpha=16.0, target_modules=["q_proj", "v_proj"])
    theirs = None
    try:
        ours = apply_lora(model, 8, 16.0, ["q_proj", "v_proj"])
        theirs = peft.get_peft_model(reference, config).eval()
        theirs_params = dict(theirs.named_parameters())
        torch.manual_seed(0)
        with torch.no_grad():
            for name, layer in lora_layers(ours):
                layer.lora_B.normal_(0.0, 0.05)
                prefix = f"base_model.model.{_to_hf_module(name, ours.config.n_layers)}"
                theirs_params[f"{prefix}.lora_A.default.weight"].copy_(layer.lora_A)
                theirs_params[f"{prefix}.lora_B.default.weight"].copy_(layer.lora_B)
        report = trainable_parameters(ours)
        assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
        assert report.trainable == 30 * 8 * ((576 + 576) + (576 + 192))  # q: 576->576, v: ->192
        with torch.inference_mode():
            adapted = ours(ids).logits
            assert (adapted - base).abs().max() > 1e-2
            _close(adapted, theirs(ids).logits, atol=1e-4)
    finally:
        _unwrap(model)
        if theirs is not None:
            theirs.unload()  # peft's layers out of `reference` again
        reference.requires_grad_(True)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, base)  # the session fixture is as it was
        assert not list(lora_layers(model))
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in reference.modules())
        _close(reference(ids).logits, base, atol=1e-4)
