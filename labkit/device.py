"""Where and in which precision to run: device choice, seeding, autocast dtype.

Every notebook starts with ``DEVICE = "auto"`` and ``SEED = 0``; these helpers turn those
parameters into a ``torch.device``, a reproducible random state and the low-precision dtype
that autocast should use on that device. :func:`bf16_hardware` and :func:`autocast_policy`
report what *this* machine does (bf16 matrix units, which operations autocast runs in which
precision), so a notebook states facts about the hardware it actually ran on.
``model_device`` says where a model lives.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def get_device(preference: str | torch.device = "auto") -> torch.device:
    """Return the device to run on: ``"auto"`` picks CUDA, then Apple MPS, then the CPU.

    An explicit choice (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is checked, so a
    notebook asking for a GPU the machine lacks fails at once with a clear message instead of
    deep inside the first ``.to(device)``.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    name = preference.strip().lower()
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise ValueError(
            f"device must be one of {DEVICE_CHOICES} (optionally 'cuda:N'), got {preference!r}"
        )
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {preference!r} requested but torch sees no CUDA GPU; use 'auto' or 'cpu'"
            )
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preference!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    if kind == "mps" and not _mps_available():
        raise ValueError(
            f"device {preference!r} requested but the MPS backend is not available here"
        )
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated exactly.

    With ``deterministic=True`` torch is also asked to use deterministic kernels, which can be
    slower on GPUs and raises an error for operations that have no deterministic version.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses (e.g. data-loader workers)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast should use on ``device``, or None for plain float32.

    bfloat16 keeps float32's exponent range, so it needs no loss scaling: it is the choice on
    CPUs and on GPUs that support it (Ampere and newer). Older CUDA GPUs get float16, which
    needs a ``torch.amp.GradScaler`` in training. MPS autocast uses float16.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` with :func:`autocast_dtype`; a no-op when disabled.

    Use it around the forward pass and the loss only, never around ``backward()``.
    """
    device = torch.device(device)
    dtype = autocast_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# CPU flags (Linux /proc/cpuinfo names) of instructions that compute bf16 dot products in hardware
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class BF16Hardware:
    """What the machine offers bf16 matrix products: ``units`` is True/False, or None if unknown.

    ``name`` is the processor (GPU name on CUDA), ``detail`` one sentence of evidence: the
    CPU flags found, PyTorch's CPU capability, or the GPU's compute capability.
    """

    device: str
    name: str
    units: bool | None
    detail: str


def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None  # not Linux (macOS, Windows): the flags are not readable this way
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def _cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def bf16_hardware(
    device: str | torch.device, cpuinfo: str | Path = "/proc/cpuinfo"
) -> BF16Hardware:
    """Detect, at run time, whether ``device`` has matrix units that compute in bf16.

    CUDA: the GPU's name and compute capability (bf16 tensor cores from 8.0, Ampere, on).
    CPU: the ``amx_bf16`` / ``avx512_bf16`` flags of ``/proc/cpuinfo`` (Linux) together with
    ``torch.backends.cpu.get_cpu_capability()``; elsewhere ``units`` is None (unknown).
    MPS: unknown. Never hard-code such a fact in a notebook: the same notebook runs on
    laptops, AMD and Intel servers and GPUs.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return BF16Hardware(
            "cuda",
            torch.cuda.get_device_name(index),
            major >= 8,
            f"compute capability {major}.{minor} (bf16 tensor cores need 8.0 or newer)",
        )
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        flags = _cpu_flags(cpuinfo)
        if flags is None:
            units, found = None, "CPU flags not readable on this system"
        else:
            present = [f for f in BF16_CPU_FLAGS if f in flags]
            units = bool(present)
            found = f"flags {', '.join(present)}" if present else f"none of {BF16_CPU_FLAGS}"
        return BF16Hardware(
            "cpu", _cpu_name(cpuinfo), units, f"{found}; PyTorch CPU capability {capability}"
        )
    return BF16Hardware(device.type, device.type, None, "not detected for this device type")


def autocast_policy(device: str | torch.device, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Which precision autocast gives each common operation on ``device``, measured now.

    Each operation runs inside ``torch.autocast`` on tiny tensors. Returns ``{operation:
    verdict}`` with verdict ``"low precision"`` (a float32 input comes out in ``dtype``),
    ``"float32"`` (a ``dtype`` input comes out in float32: autocast forces it) or
    ``"follows its input"`` (neither). The lists differ between devices and PyTorch versions,
    which is why this is measured, not written down.
    """
    device = torch.device(device)
    dtype = dtype or autocast_dtype(device)
    if dtype is None:
        raise ValueError(f"autocast has no low-precision dtype on {device}")
    x = torch.randn(4, 8, device=device)
    w = torch.randn(8, 8, device=device)
    target = torch.zeros(4, dtype=torch.long, device=device)
    ops = {
        "matmul (linear layers, attention scores)": lambda t: t @ w.to(t.dtype),
        "softmax": lambda t: torch.softmax(t, -1),
        "layer_norm": lambda t: torch.nn.functional.layer_norm(t, (8,)),
        "gelu": lambda t: torch.nn.functional.gelu(t),
        "cross_entropy (the loss)": lambda t: torch.nn.functional.cross_entropy(t, target),
    }
    policy = {}
    with torch.autocast(device.type, dtype=dtype):
        for name, op in ops.items():
            if op(x).dtype == dtype:
                policy[name] = "low precision"
            elif op(x.to(dtype)).dtype == torch.float32:
                policy[name] = "float32"
            else:
                policy[name] = "follows its input"
    return policy
