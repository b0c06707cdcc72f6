"""Activation capture and patching through a model's named hook points.

Every labkit model (``GPT``, ``Llama``, ``BertEncoder`` and its task heads, ``Transformer``)
names the hook points of its layers (``model.hook_points()``, in the order the forward pass
reaches them). Per layer ``i`` of a stack (``blocks`` in decoder-only and encoder-only models,
``encoder.blocks`` and ``decoder.blocks`` in the encoder-decoder), with B batch, H heads,
T queries, S keys, D ``d_model``, d_k head width:

====================================  ===============  ==========================================
name                                  shape            what
====================================  ===============  ==========================================
``blocks.{i}.resid_pre``              (B, T, D)        residual stream entering the layer
``blocks.{i}.attn.pattern``           (B, H, T, S)     self-attention weights
``blocks.{i}.attn.z``                 (B, H, T, d_k)   each head's output, before ``out_proj``
``blocks.{i}.attn_out``               (B, T, D)        what attention adds to the stream
``blocks.{i}.resid_mid``              (B, T, D)        the stream after attention
``blocks.{i}.cross_attn.pattern``     (B, H, T, S)     decoder only: cross-attention weights
``blocks.{i}.cross_attn.z``           (B, H, T, d_k)   decoder only: cross-attention heads
``blocks.{i}.cross_attn_out``         (B, T, D)        decoder only: what cross-attention adds
``blocks.{i}.resid_cross``            (B, T, D)        decoder only: the stream after it
``blocks.{i}.mlp_out``                (B, T, D)        what the feed-forward adds
``blocks.{i}.resid_post``             (B, T, D)        residual stream leaving the layer
====================================  ===============  ==========================================

* ``run_with_cache(model, *args, names=None, **kwargs) -> (output, cache)`` runs
  ``model(*args, **kwargs)`` once and keeps the activations (all, or those ``names`` selects)
  in an ``ActivationCache``, a read-only mapping from name to tensor.
* ``hooks(model, {name: fn})`` is a context manager: inside it ``fn(activation, name)`` runs
  at each named point; returning a tensor replaces the activation (ablation, patching).

Models offer both as methods: ``model.run_with_cache(input_ids)``, ``with model.hooks(...)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from labkit.nn.hooks import HookPoint

Hook = Callable[[Tensor, str], "Tensor | None"]

#: Hook points of one layer, in the order the forward pass reaches them (see the table above).
LAYER_POINTS = (
    "resid_pre", "attn.pattern", "attn.z", "attn_out", "resid_mid", "cross_attn.pattern",
    "cross_attn.z", "cross_attn_out", "resid_cross", "mlp_out", "resid_post",
)  # fmt: skip


def layer_hook_points(prefix: str, layer: nn.Module) -> dict[str, HookPoint]:
    """``{f"{prefix}.{point}": HookPoint}`` of an ``EncoderLayer`` or ``DecoderLayer``."""
    points = {}
    for point in LAYER_POINTS:
        owner, _, leaf = point.rpartition(".")
        module = layer
        if owner:  # "attn.pattern" -> layer.self_attn.hook_pattern
            module = getattr(layer, "self_attn" if owner == "attn" else owner, None)
        hook = getattr(module, f"hook_{leaf}", None)
        if isinstance(hook, HookPoint):
            points[f"{prefix}.{point}"] = hook
    return points


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """The named hook points of a labkit model (``model.hook_points()``), in forward order."""
    if not callable(getattr(model, "hook_points", None)):
        raise ValueError(f"{type(model).__name__} has no named hook points (not a labkit model)")
    return model.hook_points()


def _select(points: Mapping[str, HookPoint], names: Any) -> list[str]:
    """Point names chosen by ``names``: None = all, a str or list = those, a callable = filter."""
    if names is None:
        return list(points)
    if callable(names):
        return [n for n in points if names(n)]
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        _check_name(points, name)
    return wanted


def _check_name(points: Mapping[str, Any], name: str) -> None:
    if name not in points:
        close = difflib.get_close_matches(name, list(points), n=3)
        hint = f"; did you mean {close}?" if close else f"; there are {len(points)} points"
        raise KeyError(f"no hook point {name!r}{hint} (list them with model.hook_points())")


class ActivationCache(Mapping[str, Tensor]):
    """Activations of one forward pass by hook-point name, e.g. ``cache["blocks.0.attn.pattern"]``.

    A read-only mapping (``names()``, ``in``, ``len``, iteration in forward order);
    ``per_layer("attn.pattern")`` lists one tensor per layer of a stack, the form
    ``labkit.interp`` and ``labkit.viz`` take for a model's ``attentions``.
    """

    def __init__(self, activations: Mapping[str, Tensor]) -> None:
        self._activations = dict(activations)

    def __getitem__(self, name: str) -> Tensor:
        _check_name(self._activations, name)
        return self._activations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def names(self) -> list[str]:
        """Every cached hook-point name, in forward order."""
        return list(self._activations)

    def per_layer(self, point: str, stack: str = "blocks") -> list[Tensor]:
        """``[cache[f"{stack}.0.{point}"], cache[f"{stack}.1.{point}"], ...]``.

        ``stack`` is "blocks", or "encoder.blocks" / "decoder.blocks" for the encoder-decoder.
        """
        layers = []
        while f"{stack}.{len(layers)}.{point}" in self._activations:
            layers.append(self._activations[f"{stack}.{len(layers)}.{point}"])
        if not layers:
            raise KeyError(f"no cached {stack}.<i>.{point}; cached: {self.names()[:8]} ...")
        return layers

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in list(self.items())[:4])
        more = f", ... ({len(self)} in all)" if len(self) > 4 else ""
        return f"ActivationCache({shown}{more})"


def _pairs(fwd_hooks: Mapping[str, Hook] | Iterable[tuple[str, Hook]]) -> list[tuple[str, Hook]]:
    return list(fwd_hooks.items()) if isinstance(fwd_hooks, Mapping) else list(fwd_hooks)


@contextmanager
def hooks(
    model: nn.Module, fwd_hooks: Mapping[str, Hook] | Iterable[tuple[str, Hook]]
) -> Iterator[nn.Module]:
    """Run ``fn(activation, name)`` at each named hook point while the block runs.

    ``fwd_hooks``: ``{name: fn}`` or ``[(name, fn), ...]`` (several functions may share a
    point; they run in order). A function that returns a tensor of the activation's shape
    replaces the activation for the rest of the pass; returning None only reads it. The
    hooks are removed on leaving the block, also after an error.

    >>> def ablate_head_0(z, name):  # z: (B, H, T, d_k)
    ...     z = z.clone(); z[:, 0] = 0; return z
    >>> with hooks(model, {"blocks.1.attn.z": ablate_head_0}):  # doctest: +SKIP
    ...     logits = model(ids).logits
    """
    points = hook_points(model)
    handles = []
    try:
        for name, fn in _pairs(fwd_hooks):
            _check_name(points, name)

            def call(module, args, output, fn=fn, name=name):
                return fn(output, name)

            handles.append(points[name].register_forward_hook(call))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def run_with_cache(
    model: nn.Module,
    *args: Any,
    names: str | Iterable[str] | Callable[[str], bool] | None = None,
    fwd_hooks: Mapping[str, Hook] | Iterable[tuple[str, Hook]] = (),
    **kwargs: Any,
) -> tuple[Any, ActivationCache]:
    """``model(*args, **kwargs)`` once, keeping the activations at its hook points.

    names: which points to keep: None = all, a name or a list of names, or a predicate such as
        ``lambda n: n.endswith("attn.pattern")``.
    fwd_hooks: hooks to run during the same pass (as for ``hooks``); the cache holds the
        activations after them, as the rest of the model saw them.

    Returns ``(output, cache)``: the model's usual output and an ``ActivationCache`` of detached
    tensors. Gradients are as the caller's context makes them (wrap in ``torch.no_grad()``).
    """
    points = hook_points(model)
    chosen = _select(points, names)
    store: dict[str, Tensor] = {}

    def keep(activation: Tensor, name: str) -> None:
        store[name] = activation.detach()

    with hooks(model, [*_pairs(fwd_hooks), *((name, keep) for name in chosen)]):
        output = model(*args, **kwargs)
    ordered = {name: store[name] for name in points if name in store}
    return output, ActivationCache(ordered)
