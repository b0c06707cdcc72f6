"""Weight-only quantization: int8 and int4 matrices that PyTorch's fused kernels multiply.

Decoding one token reads every weight once, so on a CPU (and for small batches on a GPU) its
speed is the speed of reading the weights: fewer bytes per weight, more tokens per second.
*Weight-only* quantization stores the matrices in 8 or 4 bits and keeps the activations in
float; the kernels below convert the weights inside the matrix product, so the float matrix
never exists in memory.

* ``Int8Linear``: symmetric, one scale per output row, ``W ≈ scale[:, None] * q`` with q in
  [-127, 127]; forward ``torch.ops.aten._weight_int8pack_mm`` on the CPU (elsewhere the
  expression ``(x @ q^T) * scale``, which ``torch.compile`` fuses into one kernel).
* ``Int4Linear``: asymmetric, one (scale, minimum) pair per group of ``group_size`` (32, 64
  or 128) consecutive inputs of a row, ``W ≈ q * scale + minimum`` with q in [0, 15]; packed
  two per byte by ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` and multiplied by
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (CPU only: other devices raise ValueError).
  ``int4_groups`` / ``dequantize_int4`` are the same arithmetic in plain torch (the tests
  compare the kernel with them).
* ``Int8Embedding``: token embedding rows as int8 with one scale per token.
* ``quantize(model, "int8" | "int4")``: a quantized copy of a decoder-only model (``GPT``,
  ``Llama``). **The tied embedding is handled explicitly**: the LM head and the token
  embedding stay one matrix, an ``Int8Linear`` (the embedding looks rows up in it), in int4
  mode too: the packed int4 layout cannot be looked up by row, and the output matrix is the
  most sensitive one (llama.cpp's 4-bit formats also keep it at higher precision). An
  untied head is quantized like the other matrices; an untied embedding stays float (a token
  reads one row of it).
* ``quantize_int8(model, mode=...)``: int8 for any model's ``nn.Linear`` layers (weight-only,
  or ``torch.ao`` dynamic quantization), leaving a tied head float.

Shapes: N output features, K input features, G = K / group_size groups per row, V vocabulary.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.device import model_device

INT4_GROUP_SIZES = (32, 64, 128)
QUANTIZED = ("int8", "int4")

# ----------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------


# The CPU kernels' float32 paths read the weights once per row of x: right for decoding
# (a few rows), M times slower than a matmul for a prompt or a perplexity window. Above this
# many rows, float32 inputs take another route (see Int8Linear / Int4Linear.forward).
FEW_ROWS = 8


def _fused_int8(x: Tensor) -> bool:
    """Whether ``_weight_int8pack_mm`` should take ``x`` (M, K): CPU or Apple MPS; float32 only
    for at most ``FEW_ROWS`` rows; 16-bit only with K a multiple of 8 (torch 2.13's CPU
    kernel crashes otherwise)."""
    if x.device.type not in ("cpu", "mps"):
        return False
    if x.dtype == torch.float32:
        return x.shape[0] <= FEW_ROWS
    return x.shape[-1] % 8 == 0


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights: ``W ≈ scale[:, None] * weight``, one scale per row.

    Symmetric per-output-channel quantization: row i is divided by ``scale[i] = max|W[i]| /
    127`` and rounded to an integer in [-127, 127], so the largest weight of each row is exact
    and the others are off by at most ``scale[i] / 2``. The forward pass is weight-only: the
    activations stay float, ``y = (x @ weight^T) * scale + bias``, computed on the CPU by the
    fused kernel ``torch.ops.aten._weight_int8pack_mm`` (int8 read, converted in registers)
    for decoding; float32 inputs of more than ``FEW_ROWS`` rows (a prompt) convert the matrix
    and run one matmul instead (the kernel's float32 path reads the weights once per row).
    ``scale`` is kept in the model's float dtype (the kernel wants the activations' dtype), so
    ``.to(torch.bfloat16)`` gives bfloat16 activations.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))  # (N,)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a float ``nn.Linear`` (same device and float dtype; the bias stays float)."""
        module = cls.from_weight(linear.weight, bias=linear.bias is not None)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module

    @classmethod
    def from_weight(cls, weight: Tensor, bias: bool = False) -> Int8Linear:
        """Quantize an (N, K) float matrix row by row (the scales keep its dtype)."""
        w = weight.detach().float()  # (N, K)
        module = cls(w.shape[1], w.shape[0], bias)
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (N,)
        module.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        module.scale = scale.to(weight.dtype)
        return module.to(w.device)

    def dequantized(self) -> Tensor:
        """The (N, K) float matrix the int8 weights stand for, in ``scale``'s dtype."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """(..., K) -> (..., N), in x's dtype."""
        flat = x.reshape(-1, self.in_features)  # (M, K)
        scale = self.scale.to(x.dtype)
        if _fused_int8(flat):
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, scale)
        else:  # many rows, or no kernel: convert, then one matmul (torch.compile fuses them)
            y = F.linear(flat, self.weight.to(x.dtype)) * scale
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """A token embedding whose (V, D) table is an ``Int8Linear``'s int8 matrix and row scales.

    ``table`` may be the model's LM head itself (a tied embedding): then one int8 matrix both
    reads tokens (``embedding(ids)``, a row lookup) and writes them (``lm_head(h)``), as the
    float model shared one float matrix. Output dtype: the scales' dtype.
    """

    def __init__(self, table: Int8Linear) -> None:
        super().__init__()
        self.table = table

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """An int8 copy of a float ``nn.Embedding`` (one scale per token)."""
        return cls(Int8Linear.from_weight(embedding.weight))

    @property
    def weight(self) -> Tensor:
        """The (V, D) int8 table."""
        return self.table.weight

    def forward(self, ids: Tensor) -> Tensor:
        """(...) integer ids -> (..., D) rows ``scale[id] * q[id]``."""
        scale = self.table.scale
        return self.table.weight[ids].to(scale.dtype) * scale[ids, None]

    def extra_repr(self) -> str:
        return f"{self.table.out_features}, {self.table.in_features}"


# ----------------------------------------------------------------------------------------------
# int4
# ----------------------------------------------------------------------------------------------


def int4_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit quantization of each group of ``group_size`` inputs of each row.

    weight: (N, K) with K divisible by group_size. Returns ``q`` (N, K) int32 in [0, 15],
    ``scale`` (N, G) and ``minimum`` (N, G), float32, with ``W ≈ q * scale + minimum`` group
    by group (``dequantize_int4``): the 16 levels span each group's [min, max], so every
    weight is off by at most ``scale / 2``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"K={k} inputs do not split into groups of {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, group)
    minimum = w.amin(dim=-1)  # (N, G)
    scale = ((w.amax(dim=-1) - minimum) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((w - minimum[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, minimum


def dequantize_int4(q: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
    """(N, K) float32 ``q * scale + minimum``, scale and minimum (N, G) repeated per group."""
    group_size = q.shape[1] // scale.shape[1]
    return q.float() * scale.repeat_interleave(group_size, 1) + minimum.repeat_interleave(
        group_size, 1
    )


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit weights in groups (see ``int4_groups``), for the CPU kernel.

    Buffers: ``weight`` (N, K / 2) uint8, two 4-bit values per byte in the layout of
    ``_convert_weight_to_int4pack_for_cpu``; ``scale_zeros`` (G, N, 2): per group its scale
    and ``minimum + 8 * scale`` (the kernel computes ``(q - 8) * scale + zero``, the same
    number as ``q * scale + minimum``). Forward: ``_weight_int4pack_mm_for_cpu`` in the input's
    dtype, except float32 inputs of more than ``FEW_ROWS`` rows (a prompt, a perplexity
    window), which it multiplies in bfloat16: its float32 path reads the weights once per row.
    The kernel needs N divisible by 16.
    """

    def __init__(
        self, in_features: int, out_features: int, group_size: int = 32, bias: bool = True
    ) -> None:
        super().__init__()
        _check_int4_shape(in_features, out_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("weight", packed)
        self.register_buffer("scale_zeros", torch.zeros(in_features // group_size, out_features, 2))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        """Quantize a float ``nn.Linear`` on the CPU (the bias stays float)."""
        if linear.weight.device.type != "cpu":
            raise ValueError(_int4_device_error(linear.weight.device))
        n, k = linear.weight.shape
        module = cls(k, n, group_size, bias=linear.bias is not None)
        q, scale, minimum = int4_groups(linear.weight, group_size)
        module.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = minimum + 8 * scale  # (N, G)
        stacked = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        module.scale_zeros = stacked.to(linear.weight.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module

    def forward(self, x: Tensor) -> Tensor:
        """(..., K) -> (..., N), in x's dtype (CPU only)."""
        if x.device.type != "cpu":
            raise ValueError(_int4_device_error(x.device))
        flat = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        if flat.dtype == torch.float32 and flat.shape[0] > FEW_ROWS:
            flat = flat.bfloat16()  # the kernel's bfloat16 path reads the weights once per call
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight, self.group_size, self.scale_zeros.to(flat.dtype)
        ).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )


def _check_int4_shape(in_features: int, out_features: int, group_size: int, name: str = "") -> None:
    where = f" of {name}" if name else ""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"in_features={in_features}{where} is not a multiple of group_size={group_size}: "
            f"choose a group size that divides it (one of {INT4_GROUP_SIZES})"
        )
    if out_features % 16:
        raise ValueError(
            f"out_features={out_features}{where} is not a multiple of 16, which PyTorch's int4 "
            "CPU kernel needs"
        )


def _int4_device_error(device: torch.device) -> str:
    return (
        f"int4 weights use PyTorch's CPU kernel (_weight_int4pack_mm_for_cpu) and the data is "
        f"on {device}: quantize and run the model on the CPU, or use int8 or bf16 there"
    )


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize(model: nn.Module, precision: str, *, group_size: int = 32) -> nn.Module:
    """A quantized copy (eval mode) of a decoder-only model: every ``nn.Linear`` in int8 or int4.

    precision: ``"int8"`` (``Int8Linear``) or ``"int4"`` (``Int4Linear`` in groups of
    ``group_size``, CPU only). The activations keep the model's float dtype (quantize a
    bfloat16 model for bfloat16 activations). A tied LM head and embedding become one int8
    matrix (see the module docstring). The original model is left unchanged.
    """
    if precision not in QUANTIZED:
        raise ValueError(f"precision must be one of {QUANTIZED}, got {precision!r}")
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"quantize takes a decoder-only language model with an nn.Linear lm_head (GPT, "
            f"Llama), got {type(model).__name__}: use quantize_int8 for other models"
        )
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if precision == "int4":
        device = model_device(model)
        if device.type != "cpu":
            raise ValueError(_int4_device_error(device))
        for name, linear in linears.items():  # every problem before any work
            _check_int4_shape(linear.in_features, linear.out_features, group_size, name)
    tied = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and m.weight is head.weight
    ]
    model = copy.deepcopy(model).eval()
    quantized = {}
    for name in linears.keys() - ({"lm_head"} if tied else set()):
        linear = model.get_submodule(name)
        quantized[name] = (
            Int8Linear.from_linear(linear)
            if precision == "int8"
            else Int4Linear.from_linear(linear, group_size)
        )
    if tied:  # one int8 matrix for the tied head and embedding: see the module docstring
        quantized["lm_head"] = Int8Linear.from_linear(model.get_submodule("lm_head"))
        for name in tied:
            _replace(model, name, Int8Embedding(quantized["lm_head"]))
    for name, module in quantized.items():
        _replace(model, name, module)
    return model


def _tied_linears(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` modules whose weight is shared with another module."""
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and owners[id(module.weight)] > 1
    }


def quantize_int8(
    model: nn.Module, *, mode: str = "weight-only", skip_tied: bool = True
) -> nn.Module:
    """An int8 copy of ``model`` (eval mode): every ``nn.Linear`` weight stored in 8 bits.

    Storage drops 4x from float32 for those matrices; embeddings and norms stay float.

    mode:
        "weight-only": each Linear becomes an ``Int8Linear`` (per-row scales, float
            activations, the fused int8 kernel on the CPU). Near-lossless.
        "dynamic": ``torch.ao.quantization.quantize_dynamic`` with per-channel int8 weights;
            each input is also quantized to 8 bits on the fly (one scale per tensor) and the
            matmul runs in int8 (fbgemm / oneDNN kernels: CPU only). Fast, but an LLM's
            activations have outlier features that one 8-bit scale per tensor cannot hold: on
            SmolLM2 the SwiGLU ``down_proj`` input wrecks perplexity (the problem LLM.int8()
            solves). PyTorch deprecates ``torch.ao.quantization`` in favour of torchao (it
            still works in torch 2.13; the warning is silenced here).

    torchao's ``quantize_(model, Int8WeightOnlyConfig())`` is the supported production
    version of "weight-only" (``pip install torchao``).

    skip_tied: leave a Linear whose weight is shared (an LM head tied to the embedding) in
        float: quantizing it would add an int8 copy next to the float embedding it must keep
        (``quantize`` instead shares one int8 matrix between the two).
    """
    if mode not in ("weight-only", "dynamic"):
        raise ValueError(f"mode must be 'weight-only' or 'dynamic', got {mode!r}")
    if mode == "dynamic" and model_device(model).type != "cpu":
        raise ValueError(
            f"mode='dynamic' quantizes for the CPU only; the model is on {model_device(model)}"
        )
    targets = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if skip_tied:
        targets -= _tied_linears(model)
    model = copy.deepcopy(model).float().eval()
    if mode == "dynamic":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(deprecated|will be removed)")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            spec = dict.fromkeys(targets, per_channel_dynamic_qconfig)
            return quantize_dynamic(model, spec, dtype=torch.qint8)
    for name in targets:
        _replace(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    return model


__all__ = [
    "INT4_GROUP_SIZES",
    "QUANTIZED",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "dequantize_int4",
    "int4_groups",
    "quantize",
    "quantize_int8",
]
