"""Checkpoint files of a training run (``step_0000123.pt``) and the RNG state they carry.

A checkpoint must restore every random number generator (Python, NumPy, torch on the CPU and
every GPU) for a resumed run to draw the same dropout masks as the uninterrupted one.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` goes: ``directory/step_0000123.pt``."""
    return Path(directory) / f"step_{step:07d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in ``directory``, oldest step first ([] if there are none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _CHECKPOINT_NAME.fullmatch(p.name))
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory``, or None.

    Resume the latest run in a folder with ``fit(resume_from=latest_checkpoint(folder))``.
    """
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every GPU) RNG states, as types ``torch.load`` reads
    with ``weights_only=True``."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
