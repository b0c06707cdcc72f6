"""Inference optimisation, measured: memory, precision, perplexity and generation speed.

A trained model is only half the story; serving it is a budget of bytes and seconds. This module
holds small functions that *measure* the usual levers on a labkit decoder (``GPT``, ``Llama``):

* **Memory.** Weights take ``n_params x bytes per value`` (a tied embedding / LM head matrix is
  stored once). While generating, the KV cache holds every past key and value of every layer::

      kv_cache_bytes = 2 (K and V) x n_layers x batch x n_kv_heads x seq_len x head_dim x bytes

  ``memory_estimate`` computes both; the tests check them against the bytes really held. Grouped
  -query attention (``n_kv_heads < n_heads``) shrinks the cache by ``n_heads / n_kv_heads``.
* **Precision.** ``to_bf16`` halves the weights (bfloat16 keeps float32's range, fewer mantissa
  bits); int8 and int4 weights are made in ``labkit.inference.quant``. ``model_size_bytes``
  measures any of them by serialising the ``state_dict``, so int8 buffers and packed weights
  count too.
* **Quality.** ``perplexity`` = exp(mean next-token cross-entropy) over a long text, evaluated
  with a sliding window (Hugging Face's strided evaluation) so every token is scored once, with
  at least ``block_size - stride`` tokens of context after the first window.
* **Speed.** ``time_generation`` times ``labkit.generation.generate``; ``kv_cache_speedup``,
  ``throughput_vs_batch`` and ``compare_precisions`` return ``pandas`` tables for notebooks and
  ``benchmarks/generation.py``.
* **The speed limit (roofline).** Decoding one token reads every weight once, so tokens/s is at
  most ``bandwidth / bytes read per token``: ``read_bandwidth`` measures the first (a
  STREAM-like read of a tensor far larger than the caches, with the decoding's thread count),
  ``weight_bytes_per_token`` the second for any precision, ``decode_ceiling`` divides them.

Shapes: B batch, T tokens, V vocabulary, N length of an evaluated token sequence.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.device import model_device
from labkit.generation import generate
from labkit.inference.quant import quantize, quantize_int8

# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


class MemoryEstimate(NamedTuple):
    """Bytes needed to run a decoder: weights, KV cache, and their sum."""

    params_bytes: int
    kv_cache_bytes: int
    total: int


def _decoder_class(config: Any) -> type[nn.Module]:
    """The labkit model class a decoder-only config builds."""
    from labkit.models.gpt import GPT, GPTConfig
    from labkit.models.llama import Llama, LlamaConfig

    classes: dict[type, type[nn.Module]] = {GPTConfig: GPT, LlamaConfig: Llama}
    if type(config) not in classes:
        raise ValueError(
            f"memory_estimate takes a GPT or Llama model or config, got {type(config).__name__}"
        )
    return classes[type(config)]


def parameter_count(model_or_config: nn.Module | Any) -> int:
    """Number of parameters, a tied matrix counted once.

    A config is built into its model on PyTorch's ``meta`` device (shapes only, no memory), so
    even a 7B configuration is counted instantly and exactly.
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        with torch.device("meta"):
            model = _decoder_class(model_or_config)(model_or_config)
    return sum(p.numel() for p in model.parameters())  # parameters() skips shared ones


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per value of ``dtype``: 4 for float32, 2 for bfloat16 / float16, 1 for int8."""
    return torch.empty((), dtype=dtype).element_size()


def memory_estimate(
    model_or_config: nn.Module | Any,
    dtype: torch.dtype | None = None,
    batch: int = 1,
    seq_len: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> MemoryEstimate:
    """Weights + KV-cache bytes for generating ``batch`` sequences of ``seq_len`` positions.

    Args:
        model_or_config: a ``GPT`` / ``Llama`` or its config (``n_kv_heads = n_heads`` for GPT).
        dtype: weight dtype; default the model's, or float32 for a config.
        batch: sequences generated together.
        seq_len: cached positions per sequence (prompt + generated); default ``max_len``.
        kv_dtype: dtype of the cached keys/values; default ``dtype``. Int8 *weight*
            quantization keeps float32 activations, hence a float32 cache: pass it here.

    For a model already quantized, measure it with ``model_size_bytes`` instead (its int8
    weights are buffers, not parameters); estimate it from the float model with
    ``dtype=torch.int8, kv_dtype=torch.float32``.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else None
    config = model.config if model is not None else model_or_config
    _decoder_class(config)  # GPT or Llama only: ValueError otherwise
    if dtype is None:
        dtype = next(model.parameters()).dtype if model is not None else torch.float32
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    seq_len = config.max_len if seq_len is None else seq_len
    if batch < 1 or seq_len < 0:
        raise ValueError(f"batch must be >= 1 and seq_len >= 0, got batch={batch}, {seq_len=}")

    params_bytes = parameter_count(model_or_config) * dtype_bytes(dtype)
    n_kv_heads = getattr(config, "n_kv_heads", config.n_heads)
    head_dim = config.d_model // config.n_heads
    kv_values = 2 * config.n_layers * batch * n_kv_heads * seq_len * head_dim
    kv_cache_bytes = kv_values * dtype_bytes(kv_dtype)
    return MemoryEstimate(params_bytes, kv_cache_bytes, params_bytes + kv_cache_bytes)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()`` serialised with ``torch.save`` (as on disk).

    Unlike summing ``p.numel() * p.element_size()`` this also sees the packed int8 weights of
    quantized layers (which are not ``nn.Parameter``s). A tied matrix is saved once; pickling
    adds a few hundred bytes per tensor.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------


def to_bf16(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``model`` in eval mode (the original is left unchanged)."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


# ----------------------------------------------------------------------------------------------
# The speed limit of decoding: memory bandwidth / bytes read per token
# ----------------------------------------------------------------------------------------------


def _best_seconds(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` calls (the one least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _stream_bandwidth(
    kind: str, megabytes: int, repeats: int, threads: int | None, device: str | torch.device
) -> float:
    if megabytes < 1 or repeats < 1:
        raise ValueError(f"megabytes and repeats must be >= 1, got {megabytes}, {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    device = torch.device(device)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        src = torch.ones(megabytes * 2**20 // 4, device=device)  # float32, written: no page faults
        if kind == "read":
            seconds = _best_seconds(src.sum, repeats, device)
            moved = src.numel() * 4
        else:
            dst = torch.zeros_like(src)
            seconds = _best_seconds(lambda: dst.copy_(src), repeats, device)
            moved = 2 * src.numel() * 4
    finally:
        torch.set_num_threads(before)
    return moved / seconds


def read_bandwidth(
    megabytes: int = 512,
    repeats: int = 10,
    *,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Memory read bandwidth in bytes/s, measured now: the best of ``repeats`` sums of a float32
    tensor of ``megabytes`` (far beyond the caches), a read-only STREAM-like stream.

    Decoding *reads* the weights, so this is the bandwidth its roofline uses. ``threads``:
    the CPU threads to read with (use the decoding's: one core cannot saturate the memory
    bus); None keeps ``torch.get_num_threads()``. The best run is the least disturbed one.
    """
    return _stream_bandwidth("read", megabytes, repeats, threads, device)


def copy_bandwidth(
    megabytes: int = 512,
    repeats: int = 10,
    *,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Bytes/s read plus written by the best of ``repeats`` copies of ``megabytes`` (float32).

    STREAM's "copy". Usually below ``read_bandwidth``: a CPU first reads each destination
    line it writes (write-allocate), traffic this figure does not count.
    """
    return _stream_bandwidth("copy", megabytes, repeats, threads, device)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes one decoding step reads: every parameter and buffer of every module except
    embedding tables (a step looks up one row), each storage once, in its stored dtype.

    So a tied LM head counts its matrix once (as the head), int8 / int4 matrices count their
    packed bytes and scales. The KV cache (``memory_estimate``) comes on top; for short
    contexts it is small next to the weights.
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if "Embedding" in type(module).__name__:
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def decode_ceiling(model_or_bytes: nn.Module | int, bandwidth: float) -> float:
    """The roofline of decoding: at most ``bandwidth / bytes read per token`` tokens/s.

    model_or_bytes: a model (``weight_bytes_per_token`` of it) or the bytes per token;
    bandwidth: bytes/s (``read_bandwidth``).
    """
    n = model_or_bytes
    if isinstance(model_or_bytes, nn.Module):
        n = weight_bytes_per_token(model_or_bytes)
    if n <= 0 or bandwidth <= 0:
        raise ValueError(f"bytes per token and bandwidth must be positive, got {n}, {bandwidth}")
    return bandwidth / n


# ----------------------------------------------------------------------------------------------
# Quality: sliding-window perplexity
# ----------------------------------------------------------------------------------------------


def _windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) for each window ``ids[begin:end]`` scoring targets ``first..end-1``.

    Windows start every ``stride`` tokens until one reaches the end. A window scores only the
    tokens after the previous window's end, so each token is scored once; token ``begin`` has
    no context inside its window and is never a target.
    """
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + block_size, n)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return windows


def perplexity(
    model: nn.Module,
    token_ids: Tensor | Sequence[int],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity ``exp(mean NLL)`` of a causal LM on one long token sequence (N,).

    The model sees windows of ``block_size`` tokens (default ``model.config.max_len``) that
    start every ``stride`` tokens (default ``block_size``: no overlap). Each token after the
    first is scored once, by the first window that reaches it, using the context inside that
    window: a smaller ``stride`` gives every scored token at least ``block_size - stride`` tokens
    of context (a lower, fairer perplexity) at ``block_size / stride`` times the compute. With
    ``stride == block_size`` the first token of each window is not scored (no context).
    Windows run ``batch_size`` at a time (the last, shorter one right-padded: a causal model
    never looks ahead, so padding changes nothing) under ``torch.inference_mode``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {ids.numel()}")
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    block_size = max_len if block_size is None else block_size
    if block_size is None or block_size < 2 or (max_len is not None and block_size > max_len):
        raise ValueError(f"block_size must be in [2, max_len={max_len}], got {block_size}")
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    from labkit.train.losses import IGNORE_INDEX

    device = model_device(model)
    windows = _windows(ids.numel(), block_size, stride)
    total_nll, n_scored = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(windows), batch_size):
                group = windows[i : i + batch_size]
                width = max(end - begin for begin, end, _ in group)
                inputs = torch.zeros(len(group), width, dtype=torch.long)  # (b, width)
                targets = torch.full((len(group), width - 1), IGNORE_INDEX, dtype=torch.long)
                for row, (begin, end, first) in enumerate(group):
                    inputs[row, : end - begin] = ids[begin:end]
                    # logits at column t predict token begin + t + 1
                    targets[row, first - begin - 1 : end - begin - 1] = ids[first:end]
                out = model(inputs.to(device))
                logits = getattr(out, "logits", out)[:, :-1]  # (b, width - 1, V)
                scored = (targets != IGNORE_INDEX).to(device)  # only these pay for softmax
                total_nll += F.cross_entropy(
                    logits[scored].float(), targets.to(device)[scored], reduction="sum"
                ).item()
                n_scored += int(scored.sum())
    finally:
        model.train(was_training)
    return float(torch.tensor(total_nll / n_scored).exp())


# ----------------------------------------------------------------------------------------------
# Speed: timing generation
# ----------------------------------------------------------------------------------------------


class Timing(NamedTuple):
    """Median wall-clock seconds of ``repeats`` calls, every time, and the last call's result."""

    seconds: float
    times: list[float]
    result: Any


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed (first-call allocations, lazy init), then time it
    ``repeats`` times with ``time.perf_counter`` (synchronising CUDA) and take the median."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), times, result)


class GenerationTiming(NamedTuple):
    """One timed generation setting.

    seconds: median wall time of one ``generate`` call (prefill + all decoding steps).
    tokens_per_s: generated tokens per second over the whole batch, ``B * n / seconds``.
    tokens: (B, n) the generated ids (of the last timed call).
    """

    seconds: float
    tokens_per_s: float
    tokens: Tensor


def time_generation(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    use_cache: bool = True,
    repeats: int = 3,
    warmup: int = 1,
) -> GenerationTiming:
    """Time greedy ``labkit.generation.generate`` of exactly ``max_new_tokens`` per row.

    ``min_new_tokens = max_new_tokens`` bans end-of-sequence, so every call does the same work.
    input_ids: (B, T) prompts (left-padded with ``attention_mask``) or (T,) for one prompt.
    """
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids

    def run() -> Tensor:
        out = generate(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            use_cache=use_cache,
        )
        return out.new_tokens

    timing = time_call(run, repeats, warmup)
    tokens = timing.result
    return GenerationTiming(timing.seconds, tokens.numel() / timing.seconds, tokens)


def kv_cache_speedup(
    model: nn.Module,
    input_ids: Tensor,
    lengths: Sequence[int] = (8, 16, 32, 64),
    repeats: int = 1,
) -> pd.DataFrame:
    """Greedy generation with and without the KV cache for each generated length.

    Without a cache every step re-runs the whole sequence (quadratic in the length in total);
    with one, each step runs one token against the cached keys/values. The tokens must be the
    same: column ``identical`` says whether they were.

    Columns: new_tokens, cached_s, uncached_s, speedup (uncached / cached), identical.
    """
    rows = []
    for n in lengths:
        cached = time_generation(model, input_ids, max_new_tokens=n, repeats=repeats)
        uncached = time_generation(
            model, input_ids, max_new_tokens=n, use_cache=False, repeats=repeats
        )
        rows.append(
            {
                "new_tokens": n,
                "cached_s": cached.seconds,
                "uncached_s": uncached.seconds,
                "speedup": uncached.seconds / cached.seconds,
                "identical": torch.equal(cached.tokens, uncached.tokens),
            }
        )
    return pd.DataFrame(rows)


def throughput_vs_batch(
    model: nn.Module,
    input_ids: Tensor,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    max_new_tokens: int = 32,
    repeats: int = 1,
) -> pd.DataFrame:
    """Generated tokens per second when one prompt (T,) or (1, T) is generated B times at once.

    A decoding step is a few small matrix-vector products per layer, bound by reading the
    weights from memory; a batch reads them once for B rows, so throughput grows with B until
    compute becomes the limit.

    Columns: batch, seconds, tokens_per_s, speedup (tokens/s relative to batch 1).
    """
    prompt = torch.as_tensor(input_ids).reshape(1, -1)  # (1, T)
    rows = []
    for batch in batch_sizes:
        timing = time_generation(
            model, prompt.repeat(batch, 1), max_new_tokens=max_new_tokens, repeats=repeats
        )
        rows.append(
            {"batch": batch, "seconds": timing.seconds, "tokens_per_s": timing.tokens_per_s}
        )
    table = pd.DataFrame(rows)
    table["speedup"] = table["tokens_per_s"] / table["tokens_per_s"].iloc[0]
    return table


def compare_precisions(
    model: nn.Module,
    input_ids: Tensor,
    eval_ids: Tensor | Sequence[int],
    *,
    max_new_tokens: int = 32,
    block_size: int | None = None,
    stride: int | None = None,
    repeats: int = 1,
    precisions: Sequence[str] = ("fp32", "bf16", "int8"),
) -> pd.DataFrame:
    """float32 vs bfloat16 vs int8 weights: memory, greedy speed and perplexity.

    input_ids: (T,) or (1, T) prompt for the speed test; eval_ids: (N,) held-out tokens for
    ``perplexity(block_size, stride)``; precisions: some of "fp32", "bf16", "int8"
    (``quantize_int8`` weight-only), "int8-dynamic" (``mode="dynamic"``, CPU only) and "int4"
    (``quantize(model, "int4")``, groups of 32, CPU only).

    Columns (one row per precision): weights_bytes (``model_size_bytes``), tokens_per_s,
    perplexity, same_tokens (how many leading greedy tokens equal the first precision's).
    """
    convert: dict[str, Callable[[nn.Module], nn.Module]] = {
        "fp32": lambda m: copy.deepcopy(m).float().eval(),
        "bf16": to_bf16,
        "int8": quantize_int8,
        "int8-dynamic": lambda m: quantize_int8(m, mode="dynamic"),
        "int4": lambda m: quantize(m, "int4"),
    }
    unknown = [name for name in precisions if name not in convert]
    if unknown or not precisions:
        raise ValueError(f"precisions must be some of {sorted(convert)}, got {list(precisions)}")
    rows, reference = [], None
    for name in precisions:
        variant = convert[name](model)
        timing = time_generation(variant, input_ids, max_new_tokens=max_new_tokens, repeats=repeats)
        tokens = timing.tokens[0]
        reference = tokens if reference is None else reference
        differs = (tokens != reference).nonzero()
        rows.append(
            {
                "precision": name,
                "weights_bytes": model_size_bytes(variant),
                "tokens_per_s": timing.tokens_per_s,
                "perplexity": perplexity(variant, eval_ids, block_size, stride),
                "same_tokens": int(differs[0, 0]) if len(differs) else len(tokens),
            }
        )
    return pd.DataFrame(rows).set_index("precision")


__all__ = [
    "GenerationTiming",
    "MemoryEstimate",
    "Timing",
    "compare_precisions",
    "copy_bandwidth",
    "decode_ceiling",
    "dtype_bytes",
    "kv_cache_speedup",
    "memory_estimate",
    "model_size_bytes",
    "parameter_count",
    "perplexity",
    "read_bandwidth",
    "throughput_vs_batch",
    "time_call",
    "time_generation",
    "to_bf16",
    "weight_bytes_per_token",
]
