"""Inference: measuring a trained decoder, and making it decode fast.

- ``measure``: memory (weights + KV cache), ``to_bf16``, strided ``perplexity``, timing of
  generation and the KV-cache / batch / precision tables of the notebooks and benchmarks, and
  the roofline of decoding (``read_bandwidth``, ``weight_bytes_per_token``, ``decode_ceiling``);
- ``quant``: weight-only int8 (``Int8Linear``) and int4 (``Int4Linear``) matrices multiplied by
  PyTorch's fused kernels, ``quantize`` (a whole decoder, tied embedding included) and
  ``quantize_int8``;
- ``fast``: ``FastLM``, a decoder prepared for fast decoding (precision, static KV cache,
  ``torch.compile``d step, CUDA graphs), and ``run_generate``, the Python side of
  ``labkit generate``.

Everything is re-exported here, e.g. ``from labkit.inference import FastLM, perplexity``.
"""

from labkit.inference.fast import (
    ACTIVATIONS,
    PACKAGED_MODELS,
    PRECISIONS,
    FastLM,
    RunResult,
    activation_dtype,
    chat_prompt,
    convert,
    load_fast,
    run_generate,
)
from labkit.inference.measure import (
    GenerationTiming,
    MemoryEstimate,
    Timing,
    compare_precisions,
    copy_bandwidth,
    decode_ceiling,
    dtype_bytes,
    kv_cache_speedup,
    memory_estimate,
    model_size_bytes,
    parameter_count,
    perplexity,
    read_bandwidth,
    throughput_vs_batch,
    time_call,
    time_generation,
    to_bf16,
    weight_bytes_per_token,
)
from labkit.inference.quant import (
    INT4_GROUP_SIZES,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dequantize_int4,
    int4_groups,
    quantize,
    quantize_int8,
)

__all__ = [
    "ACTIVATIONS",
    "INT4_GROUP_SIZES",
    "PACKAGED_MODELS",
    "PRECISIONS",
    "FastLM",
    "GenerationTiming",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "MemoryEstimate",
    "RunResult",
    "Timing",
    "activation_dtype",
    "chat_prompt",
    "compare_precisions",
    "convert",
    "copy_bandwidth",
    "decode_ceiling",
    "dequantize_int4",
    "dtype_bytes",
    "int4_groups",
    "kv_cache_speedup",
    "load_fast",
    "memory_estimate",
    "model_size_bytes",
    "parameter_count",
    "perplexity",
    "quantize",
    "quantize_int8",
    "read_bandwidth",
    "run_generate",
    "throughput_vs_batch",
    "time_call",
    "time_generation",
    "to_bf16",
    "weight_bytes_per_token",
]
