"""Activation memory: recompute blocks in backward (activation checkpointing) and measure it.

Training memory is weights + gradients + optimizer moments + the activations autograd saves
for backward. Only the last grows with batch size and sequence length; these tools trade an
extra forward pass for most of it, and count it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from labkit.nn.layers import DecoderLayer, EncoderLayer


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation stores nothing anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def enable_activation_checkpointing(
    model: nn.Module, block_types: tuple[type[nn.Module], ...] = (EncoderLayer, DecoderLayer)
) -> int:
    """Recompute each block's activations in backward instead of storing them; returns the
    number of blocks.

    Without it, backward needs every intermediate of every block (attention scores, the
    d_ff-wide feed-forward hidden, norms...), kept from the forward pass. With it, only each
    block's inputs are kept and the block is re-run during backward, trading about one extra
    forward pass for memory that no longer grows with the blocks' insides. Non-reentrant
    ``torch.utils.checkpoint`` passes keyword arguments through and replays the RNG state, so
    the dropout masks of the re-run match: the gradients are exactly the same.
    Changes ``model`` in place (each block's ``forward``); calling it twice is harmless.
    """
    if not (
        isinstance(block_types, tuple)
        and block_types
        and all(isinstance(t, type) and issubclass(t, nn.Module) for t in block_types)
    ):
        raise ValueError(f"block_types must be a tuple of nn.Module classes, got {block_types!r}")
    blocks = [module for module in model.modules() if isinstance(module, block_types)]
    for block in blocks:
        if not getattr(block, "_activation_checkpointing", False):
            block.forward = _checkpointed(block.forward)
            block._activation_checkpointing = True
    return len(blocks)


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs.

    Counts each storage once (views share one) and leaves out ``model``'s parameters, which
    are needed either way. Under activation checkpointing (non-reentrant, torch's default) the
    block inputs that the checkpoint keeps pass through the same hook, so they are counted too:
    the figure is the whole saved-activation cost, one (B, T, D) input per checkpointed block.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()  # kept alive until counted, so no storage is freed and reused
    total = sum(saved.values())
    del output
    return total
