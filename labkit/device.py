"""Where and in which precision to run: device choice, seeding, autocast dtype.

Every notebook starts with ``DEVICE = "auto"`` and ``SEED = 0``; these three helpers turn
those parameters into a ``torch.device``, a reproducible random state and the low-precision
dtype that autocast should use on that device.
"""

from __future__ import annotations

import contextlib
import os
import random

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
