"""labkit.inference: memory estimates, int8 / bf16 copies, perplexity and generation timings.

The memory estimator is checked byte for byte against what tiny GPT / Llama models really hold
(parameters, and the keys and values of a filled ``ModelCache``). Perplexity is checked against
a cross-entropy computed directly, and its sliding windows against a context-free bigram model,
for which the strided evaluation must score every token exactly once whatever the windows.
Timing helpers are checked for what they report, never for speed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.generation import generate
from labkit.inference import (
    Int8Linear,
    compare_precisions,
    dtype_bytes,
    kv_cache_speedup,
    memory_estimate,
    model_size_bytes,
    parameter_count,
    perplexity,
    quantize_int8,
    throughput_vs_batch,
    time_generation,
    to_bf16,
)
from labkit.models.base import CausalLMOutput
from labkit.models.gpt import GPT, GPTConfig
from labkit.models.llama import Llama, LlamaConfig

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for these tiny models: on a busy 2-core machine, synchronising two
    threads per operation costs far more than the work (a 2-layer model's step can go from
    5 ms to 150 ms). The caller's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(kind: str) -> nn.Module:
    """Tiny GPT (2 heads, full MHA) or tiny Llama (4 query / 2 key-value heads: GQA)."""
    model = GPT.from_preset("tiny") if kind == "gpt" else Llama.from_preset("tiny")
    return model.eval()


def _cache_bytes(cache) -> int:
    """Bytes really held by the cached keys and values (each storage counted once)."""
    storages = {}
    for layer in cache.layers:
        for tensor in (layer.k, layer.v):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_memory_estimate_equals_measured_bytes(kind, dtype):
    model = _tiny(kind).to(dtype)
    batch, prompt, steps = 3, 5, 4
    estimate = memory_estimate(model, batch=batch, seq_len=prompt + steps)

    # weights: every distinct parameter once (tied embedding / LM head shared)
    assert estimate.params_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    # the KV cache after a prefill of 5 tokens and 4 single-token decoding steps
    cache = model.new_cache()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt + steps))
    with torch.inference_mode():
        model(ids[:, :prompt], cache=cache)
        for t in range(prompt, prompt + steps):
            model(ids[:, t : t + 1], cache=cache)
    assert cache.seq_len == prompt + steps
    assert estimate.kv_cache_bytes == _cache_bytes(cache)
    assert estimate.total == estimate.params_bytes + estimate.kv_cache_bytes
    # the config alone (a meta-device model) gives the same numbers
    assert memory_estimate(model.config, dtype, batch, prompt + steps) == estimate


def test_memory_estimate_gqa_ties_and_dtypes():
    mha = LlamaConfig.preset("tiny", n_kv_heads=4)
    gqa = LlamaConfig.preset("tiny", n_kv_heads=2)
    mqa = LlamaConfig.preset("tiny", n_kv_heads=1)
    kv = [memory_estimate(c, seq_len=100).kv_cache_bytes for c in (mha, gqa, mqa)]
    assert kv == [kv[0], kv[0] // 2, kv[0] // 4]  # the cache shrinks with n_heads / n_kv_heads

    tied, untied = GPTConfig.preset("tiny"), GPTConfig.preset("tiny", tie_weights=False)
    extra = parameter_count(untied) - parameter_count(tied)
    assert extra == tied.vocab_size * tied.d_model  # the LM head counted once when tied
    assert parameter_count(untied) == GPT(untied).num_parameters()

    fp32 = memory_estimate(gqa, torch.float32, seq_len=10)
    assert memory_estimate(gqa, torch.bfloat16, seq_len=10).total * 2 == fp32.total
    int8 = memory_estimate(gqa, torch.int8, seq_len=10, kv_dtype=torch.float32)
    assert int8.params_bytes * 4 == fp32.params_bytes
    assert int8.kv_cache_bytes == fp32.kv_cache_bytes
    assert memory_estimate(gqa, batch=2).kv_cache_bytes == 2 * memory_estimate(gqa).kv_cache_bytes
    assert [dtype_bytes(d) for d in (torch.float32, torch.bfloat16, torch.int8)] == [4, 2, 1]


def test_memory_estimate_of_published_sizes():
    # Llama 2 7B: 6,738,415,616 parameters; its fp16 KV cache is 0.5 MiB per token.
    llama2 = memory_estimate(LlamaConfig.preset("llama2-7b"), torch.float16, seq_len=4096)
    assert llama2.params_bytes == 2 * 6_738_415_616
    assert llama2.kv_cache_bytes == 4096 * 2**19
    assert parameter_count(GPTConfig.preset("small")) == 124_439_808  # GPT-2 small


def test_memory_estimate_errors():
    with pytest.raises(ValueError, match="GPT or Llama"):
        memory_estimate(SimpleNamespace(n_layers=2))
    with pytest.raises(ValueError, match="batch"):
        memory_estimate(GPTConfig.preset("tiny"), batch=0)


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight-only", "dynamic"])
def test_int8_shrinks_linear_weights_about_4x(mode):
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).eval()
    quantized = quantize_int8(model, mode=mode)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    ratio = model_size_bytes(model) / model_size_bytes(quantized)
    assert 3.0 < ratio < 4.2, ratio
    x = torch.randn(8, 256)
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    assert (got - expected).norm() / expected.norm() < 0.05


def test_int8_linear_rounds_each_row_to_its_own_scale():
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 0.25, 0.0], [100.0, 3.0, -50.0, 1.0]]))
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8
    assert q.weight.tolist() == [[127, -64, 32, 0], [127, 4, -64, 1]]  # round(w / scale)
    assert q.scale.tolist() == pytest.approx([1 / 127, 100 / 127])
    x = torch.randn(3, 4)
    dequantized = q.weight.float() * q.scale[:, None]
    assert torch.allclose(q(x), x @ dequantized.T + linear.bias, atol=1e-6)
    assert (dequantized - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-6
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, linear.bias)
    assert q(x.bfloat16()).dtype == torch.bfloat16  # computes in the input's dtype


@pytest.mark.parametrize("mode", ["weight-only", "dynamic"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_int8_model_keeps_logits_close(kind, mode):
    model = _tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model, mode=mode)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected, got = model(ids).logits, quantized(ids).logits
    assert (got - expected).norm() / expected.norm() < 0.05
    assert got.argmax(-1).eq(expected.argmax(-1)).float().mean() > 0.9
    # the tied LM head stays a float Linear (it is the embedding), every other Linear is int8
    linears = [name for name, m in quantized.named_modules() if type(m) is nn.Linear]
    assert linears == ["lm_head"]
    assert model_size_bytes(quantized) < 0.5 * model_size_bytes(model)
    # the original model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_int8_errors():
    with pytest.raises(ValueError, match="mode"):
        quantize_int8(_tiny("gpt"), mode="int4")


def test_to_bf16_copies():
    model = _tiny("llama")
    half = to_bf16(model)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # original unchanged
    assert half.lm_head.weight is half.embed_tokens.weight  # still tied
    assert model_size_bytes(half) < 0.52 * model_size_bytes(model)


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------


class BigramLM(nn.Module):
    """Next-token logits depend on the current token only: ``table[token]``, any length."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab) * 2)
        self.config = SimpleNamespace(max_len=1000)

    def forward(self, input_ids: Tensor) -> CausalLMOutput:
        logits = self.table[input_ids]  # (B, T, V)
        return CausalLMOutput(logits, logits, None)

    def token_nll(self, ids: Tensor) -> Tensor:
        """-log p(ids[t] | ids[t-1]) for t = 1 .. N-1, computed in one pass."""
        return F.cross_entropy(self.table[ids[:-1]], ids[1:], reduction="none").detach()


def test_perplexity_in_one_window_is_exp_cross_entropy():
    model = _tiny("gpt")
    ids = torch.randint(0, 256, (50,))
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = F.cross_entropy(logits[:-1], ids[1:]).exp().item()
    assert perplexity(model, ids, block_size=64) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids.tolist()) == pytest.approx(expected, rel=1e-5)  # max_len window


@pytest.mark.parametrize("stride", [1, 5, 15])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_overlapping_windows_score_every_token_once(stride, batch_size):
    model = BigramLM(vocab=11)
    ids = torch.randint(0, 11, (103,))
    expected = model.token_nll(ids).mean().exp().item()
    got = perplexity(model, ids, block_size=16, stride=stride, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-5)


def test_non_overlapping_windows_skip_each_window_start():
    model = BigramLM(vocab=11)
    ids = torch.randint(0, 11, (103,))
    nll = model.token_nll(ids)  # nll[t - 1] scores token t
    scored = torch.tensor([t % 16 != 0 for t in range(1, 103)])  # t = 16, 32, ...: no context
    expected = nll[scored].mean().exp().item()
    assert perplexity(model, ids, block_size=16, batch_size=3) == pytest.approx(expected, rel=1e-5)


def _one_window_at_a_time(model: nn.Module, ids: Tensor, block_size: int, stride: int) -> float:
    """Reference perplexity, token by token: windows ``ids[begin : begin + block_size]`` start
    every ``stride`` tokens; token t >= 1 is scored by the first window that holds it and some
    context before it (begin < t), from that window's own forward pass, unbatched."""
    nll, done, begin = [], 1, 0  # tokens before `done` are scored; token 0 never is
    while done < len(ids):
        window = ids[begin : begin + block_size]
        with torch.no_grad():
            log_probs = model(window[None]).logits[0].double().log_softmax(-1)  # (w, V)
        for t in range(max(done, begin + 1), begin + len(window)):
            nll.append(-log_probs[t - begin - 1, ids[t]].item())
        done, begin = begin + len(window), begin + stride
    assert len(nll) == len(ids) - 1 - (len(ids) - 1) // block_size * (stride == block_size)
    return math.exp(sum(nll) / len(nll))


def test_windowed_perplexity_of_a_context_sensitive_model_is_the_direct_computation(peaked):
    # Sharp attention: every token's probability depends on its context inside the window, so
    # a window scoring the wrong tokens, or with the wrong context, changes the result.
    model = peaked(Llama.from_preset("tiny")).train()
    ids = torch.randint(0, 256, (150,))
    results = {}
    for stride, batch_size in ((64, 4), (16, 3), (5, 2)):
        results[stride] = perplexity(
            model, ids, block_size=64, stride=stride, batch_size=batch_size
        )
        expected = _one_window_at_a_time(model.eval(), ids, 64, stride)
        model.train()
        assert results[stride] == pytest.approx(expected, rel=1e-5), stride
        assert model.training  # put back in the mode it was in
    # The guard: with more context per token the perplexity moves far beyond the tolerance.
    assert len({round(math.log(v), 3) for v in results.values()}) == 3, results


def test_perplexity_errors():
    model = _tiny("gpt")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [1])
    with pytest.raises(ValueError, match="block_size"):
        perplexity(model, list(range(10)), block_size=1000)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, list(range(10)), block_size=8, stride=9)


# ----------------------------------------------------------------------------------------------
# Timing helpers (what they report, not how fast)
# ----------------------------------------------------------------------------------------------


class _TokenClock:
    """A fake ``time`` for labkit.inference.measure whose clock advances only when the
    model runs: by 1 s per token position it processes. Timings then have exact expected
    values (cost models of cached and uncached decoding), so the helpers' arithmetic and
    bookkeeping are checked against numbers computed independently, not against their own
    formula."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class ClockedGPT(GPT):
    clock: _TokenClock

    def forward(self, input_ids, **kwargs) -> CausalLMOutput:
        self.clock.now += input_ids.numel()
        return super().forward(input_ids, **kwargs)


class CachelessGPT(ClockedGPT):
    """A broken model: without a cache it favours token 0, so its uncached tokens differ."""

    def forward(self, input_ids, *, cache=None, **kwargs) -> CausalLMOutput:
        out = super().forward(input_ids, cache=cache, **kwargs)
        if cache is None:
            out.logits[..., 0] += 100.0
        return out


@pytest.fixture
def clocked(monkeypatch) -> ClockedGPT:
    from labkit.inference import measure

    model = ClockedGPT(GPTConfig.preset("tiny")).eval()
    model.clock = _TokenClock()
    monkeypatch.setattr(measure, "time", model.clock)
    return model


def test_kv_cache_speedup_reports_identical_tokens(clocked):
    prompt = torch.randint(0, 256, (1, 6))
    table = kv_cache_speedup(clocked, prompt, lengths=(3, 6))
    assert list(table.columns) == ["new_tokens", "cached_s", "uncached_s", "speedup", "identical"]
    assert table["new_tokens"].tolist() == [3, 6]
    assert table["identical"].all()
    # Cached: the prompt once, then one token per step. Uncached: the whole sequence each step.
    for n, row in zip((3, 6), table.itertuples(), strict=True):
        cached, uncached = 6 + (n - 1), sum(6 + i for i in range(n))
        assert (row.cached_s, row.uncached_s) == (cached, uncached)
        assert row.speedup == pytest.approx(uncached / cached)
    assert table["speedup"].iloc[1] > table["speedup"].iloc[0] > 1  # grows with the length

    broken = CachelessGPT(GPTConfig.preset("tiny")).eval()
    broken.clock = clocked.clock
    table = kv_cache_speedup(broken, torch.randint(1, 256, (1, 6)), lengths=(4,))
    assert not table["identical"].any()


def test_time_generation_and_throughput_vs_batch(clocked):
    prompt = torch.randint(0, 256, (7,))
    timing = time_generation(clocked, prompt, max_new_tokens=5, repeats=2)
    assert timing.tokens.shape == (1, 5)
    assert timing.seconds == 7 + 4  # prefill of 7, then 4 single-token steps
    assert timing.tokens_per_s == pytest.approx(5 / 11)

    table = throughput_vs_batch(clocked, prompt, batch_sizes=(1, 3), max_new_tokens=4)
    assert table["batch"].tolist() == [1, 3]
    assert table["seconds"].tolist() == [10, 30]  # this fake clock charges every row alike
    assert table["tokens_per_s"].tolist() == pytest.approx([0.4, 0.4])
    assert table["speedup"].tolist() == pytest.approx([1.0, 1.0])


def test_compare_precisions_table(peaked):
    model = peaked(Llama.from_preset("tiny"))  # peaked logits: int8 rounding changes tokens
    prompt, eval_ids = torch.randint(0, 256, (6,)), torch.randint(0, 256, (200,))
    table = compare_precisions(model, prompt, eval_ids, max_new_tokens=8, block_size=64, stride=32)
    assert table.index.tolist() == ["fp32", "bf16", "int8"]
    sizes = table["weights_bytes"]
    assert sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert sizes["fp32"] == model_size_bytes(model)
    # Each row is its own variant's perplexity, and its greedy tokens compared with fp32's.
    variants = {"fp32": model, "bf16": to_bf16(model), "int8": quantize_int8(model)}
    tokens = {
        name: generate(variant, prompt, max_new_tokens=8, min_new_tokens=8).new_tokens[0].tolist()
        for name, variant in variants.items()
    }
    for name, variant in variants.items():
        assert table.loc[name, "perplexity"] == pytest.approx(
            perplexity(variant, eval_ids, 64, 32), rel=1e-6
        ), name
        differs = [a != b for a, b in zip(tokens[name], tokens["fp32"], strict=True)]
        same = differs.index(True) if any(differs) else 8
        assert table.loc[name, "same_tokens"] == same, name
    assert table["same_tokens"].min() < 8  # the count is tested where tokens differ, too
    dynamic = compare_precisions(
        model, [5, 6], eval_ids, max_new_tokens=2, block_size=64, precisions=("int8-dynamic",)
    )
    assert dynamic.index.tolist() == ["int8-dynamic"]
    with pytest.raises(ValueError, match="precisions"):
        compare_precisions(model, [1], [1, 2], precisions=("fp8",))


def test_benchmark_script_quick_run(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_generation", BENCHMARK)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--quick", "--model", "tiny", "--threads", "1"])
    out = capsys.readouterr().out
    for heading in ("labkit vs transformers", "KV cache", "Throughput vs batch", "Precision"):
        assert heading in out
    assert "int8" in out


# ----------------------------------------------------------------------------------------------
# SmolLM2 (session fixture): int8 keeps the quality of the real model
# ----------------------------------------------------------------------------------------------


def test_smollm2_int8_perplexity_close_to_fp32(smollm2):
    text = (
        "To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n"
        "Or to take arms against a sea of troubles\n"
        "And by opposing end them. To die: to sleep;\n"
        "No more; and by a sleep to say we end\n"
        "The heart-ache and the thousand natural shocks\n"
        "That flesh is heir to, 'tis a consummation\n"
        "Devoutly to be wish'd."
    )
    ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
    fp32 = perplexity(smollm2.model, ids, block_size=len(ids))
    int8 = perplexity(quantize_int8(smollm2.model), ids, block_size=len(ids))
    assert 1.0 < fp32 < 40.0  # famous verse: far more predictable than 49,152-way chance
    assert math.isclose(int8, fp32, rel_tol=0.10), (int8, fp32)
