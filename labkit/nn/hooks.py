"""Hook points: named places in a forward pass where an activation can be read or replaced.

A ``HookPoint`` is an identity module. Layers pass an activation through one
(``x = run_hook(self.hook_resid_post, x)``); a PyTorch forward hook registered on it sees the
activation and, by returning a tensor, replaces it for the rest of the pass. That is all that
activation caching, ablation and activation patching need (the idea of TransformerLens).

``run_hook`` calls the module only when a hook is registered on it, so a model without hooks
runs exactly the code it would run without hook points. The named points of whole models and
the helpers that use them (``run_with_cache``, ``hooks``) are in ``labkit.interp``.
"""

from __future__ import annotations

from torch import Tensor, nn


class HookPoint(nn.Module):
    """Identity ``x -> x`` where forward hooks can read or replace ``x``; no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def hooked(point: HookPoint) -> bool:
    """Whether a forward hook (or pre-hook) is registered on ``point``."""
    return bool(point._forward_hooks or point._forward_pre_hooks)


def run_hook(point: HookPoint, x: Tensor) -> Tensor:
    """``point(x)`` when a hook is registered on it (the hook may replace ``x``), else ``x``."""
    return point(x) if hooked(point) else x
