"""The training loss and metrics: summed token cross-entropy that skips ``IGNORE_INDEX``.

Shapes: logits (B, T, V) with targets (B, T) for language models, (B, C) with (B,) for
classifiers; V = vocabulary size, C = number of classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (padding, prompts)


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` from a batch that is a pair or a dict with input_ids and labels.

    These are the batches of a ``TensorDataset(x, y)`` and of ``labkit.data.to_lm_blocks``.
    Anything else needs a ``loss_fn``.
    """
    if isinstance(batch, Mapping):
        if "input_ids" in batch and "labels" in batch:
            return batch["input_ids"], batch["labels"]
        raise ValueError(
            f"a dict batch needs 'input_ids' and 'labels', got keys {sorted(batch)}; "
            "pass Trainer(..., loss_fn=...) for other batches"
        )
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a batch must be (inputs, targets) or a dict with 'input_ids' and 'labels', got "
        f"{type(batch).__name__}; pass Trainer(..., loss_fn=...) for other batches"
    )


def output_logits(output: Any) -> Tensor:
    """The logits a model returned: the tensor itself, or its ``logits`` field (labkit and
    Hugging Face models return named outputs)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
    else:
        logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"the model must return logits or an output with a .logits tensor, "
            f"got {type(output).__name__}"
        )
    return logits


def cross_entropy_sum(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the targets that count, and how many count.

    logits: (B, T, V) with targets (B, T), or (B, C) with targets (B,); targets equal to
    ``IGNORE_INDEX`` (-100) are skipped. Returns (sum, count), both 0-dim tensors. A sum, not a
    mean, so that the caller can divide by the count of the whole global batch: then
    micro-batches and processes add up exactly to one large batch. sum / count equals
    ``F.cross_entropy(..., ignore_index=-100, label_smoothing=...)``.
    """
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not fit targets {tuple(targets.shape)}: expected "
            "logits (B, T, V) with targets (B, T), or (B, C) with (B,)"
        )
    # Low-precision logits (autocast) are upcast: the log-softmax over V needs the range.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of targets (not ``IGNORE_INDEX``) whose highest logit is the right class.

    logits (..., V), targets (...); 0.0 when no target counts.
    """
    keep = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & keep
    return correct.sum().item() / max(keep.sum().item(), 1)
