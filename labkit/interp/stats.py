"""Head statistics: numbers that summarise what each attention head does.

Attention arrays come from a model's ``attentions`` output (a list of L tensors
(B, H, q, k)), from an activation cache (``cache.per_layer("attn.pattern")``) or as one array;
``stack_layers`` turns any of them into one (L, H, q, k) array for one example, ``to_numpy`` a
tensor or array into float64 numpy.

- ``head_entropy`` and ``mean_attention_distance`` reduce weights (..., q, k) to one number
  per head; ``head_summary`` tabulates both for every layer and head (a DataFrame).
- ``attention_rollout`` multiplies the head-averaged, residual-corrected maps of all layers
  (Abnar & Zuidema, 2020).

The detectors of recognisable heads (previous-token, induction, ...) are in
``labkit.interp.heads``; pictures of these numbers in ``labkit.viz``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def to_numpy(weights: Any, name: str = "weights") -> np.ndarray:
    """Tensor / array / nested list -> float64 numpy array (detached, on the CPU)."""
    if isinstance(weights, Tensor):
        weights = weights.detach().float().cpu().numpy()
    try:
        arr = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array or tensor, got {type(weights)}") from err
    return arr


def stack_layers(attentions: Any, batch_index: int = 0, name: str = "attentions") -> np.ndarray:
    """A model's per-layer weights -> (L, H, q, k) numpy for one example.

    Accepts a list of L tensors (B, H, q, k) or (H, q, k), or one array (L, H, q, k) or
    (L, B, H, q, k).
    """
    if isinstance(attentions, (list, tuple)):
        if not attentions:
            raise ValueError(f"{name} is empty: run the model with need_weights=True")
        layers = []
        for i, a in enumerate(attentions):
            if a is None:
                raise ValueError(
                    f"{name}[{i}] is None: run the model with need_weights=True to get weights"
                )
            arr = to_numpy(a, f"{name}[{i}]")
            if arr.ndim == 4:
                if not 0 <= batch_index < arr.shape[0]:
                    raise ValueError(
                        f"batch_index {batch_index} out of range for {name}[{i}] of shape "
                        f"{tuple(arr.shape)}"
                    )
                arr = arr[batch_index]
            if arr.ndim != 3:
                raise ValueError(
                    f"{name}[{i}] must be (B, H, q, k) or (H, q, k), got shape {tuple(arr.shape)}"
                )
            layers.append(arr)
        shapes = {a.shape for a in layers}
        if len(shapes) != 1:
            raise ValueError(f"every layer of {name} must have one shape, got {sorted(shapes)}")
        return np.stack(layers)
    arr = to_numpy(attentions, name)
    if arr.ndim == 5:
        arr = arr[:, batch_index]
    if arr.ndim != 4:
        raise ValueError(
            f"{name} must be a list of (B, H, q, k) tensors or an (L, H, q, k) array, got shape "
            f"{tuple(arr.shape)}"
        )
    return arr


def real_positions(attention_mask: Any, batch_index: int, length: int) -> np.ndarray | None:
    if attention_mask is None:
        return None
    mask = to_numpy(attention_mask, "attention_mask")
    if mask.ndim == 2:
        mask = mask[batch_index]
    if mask.ndim != 1 or mask.shape[0] != length:
        raise ValueError(
            f"attention_mask must be (B, T) or (T,) with T = {length}, got shape "
            f"{tuple(to_numpy(attention_mask).shape)}"
        )
    return np.flatnonzero(mask > 0)


def _query_rows(w: np.ndarray, query_mask: Any) -> np.ndarray | None:
    if query_mask is None:
        return None
    m = to_numpy(query_mask, "query_mask").astype(bool)
    if m.shape != (w.shape[-2],):
        raise ValueError(
            f"query_mask must be ({w.shape[-2]},) for weights of shape {tuple(w.shape)}, got "
            f"{tuple(m.shape)}"
        )
    return m


def head_entropy(weights: Any, *, query_mask: Any = None) -> np.ndarray:
    """Mean entropy (nats) of each query's attention distribution.

    weights: (..., q, k), e.g. (H, q, k) -> (H,), or (L, H, q, k) -> (L, H). Uniform
    attention over k keys gives log(k); attending to one key gives 0. ``query_mask`` (q,)
    keeps only the True query rows (e.g. real tokens of a padded batch).
    """
    w = to_numpy(weights)
    if w.ndim < 2:
        raise ValueError(f"weights must be (..., q, k), got shape {tuple(w.shape)}")
    p = np.clip(w, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)  # (..., q)
    rows = _query_rows(w, query_mask)
    if rows is not None:
        ent = ent[..., rows]
    return ent.mean(-1)


def mean_attention_distance(weights: Any, *, query_mask: Any = None) -> np.ndarray:
    """Mean |query position - key position| under each query's weights, in tokens.

    weights: (..., q, k) -> (...). With k > q (a KV cache: the q queries are the last q of k
    positions) query i sits at position k - q + i. A previous-token head gives 1, a head that
    attends to itself 0.
    """
    w = to_numpy(weights)
    if w.ndim < 2:
        raise ValueError(f"weights must be (..., q, k), got shape {tuple(w.shape)}")
    q, k = w.shape[-2:]
    qpos = np.arange(q)[:, None] + max(k - q, 0)
    dist = np.abs(qpos - np.arange(k)[None, :])  # (q, k)
    per_query = (w * dist).sum(-1)  # (..., q)
    rows = _query_rows(w, query_mask)
    if rows is not None:
        per_query = per_query[..., rows]
    return per_query.mean(-1)


def head_summary(attentions: Any, *, attention_mask: Any = None, batch_index: int = 0):
    """A DataFrame with one row per (layer, head): ``entropy`` (nats) and ``distance`` (tokens).

    attentions: a model's per-layer weights (list of (B, H, T, T)) or an (L, H, T, T) array;
    ``attention_mask`` (B, T) restricts both axes to the real tokens of ``batch_index``.
    """
    import pandas as pd

    stack = stack_layers(attentions, batch_index)  # (L, H, q, k)
    real = real_positions(attention_mask, batch_index, stack.shape[-1])
    if real is not None:
        if stack.shape[-2] != stack.shape[-1]:
            raise ValueError(f"attention_mask needs square maps, got {tuple(stack.shape)}")
        stack = stack[..., real, :][..., real]
    ent, dist = head_entropy(stack), mean_attention_distance(stack)  # (L, H)
    layers, heads = np.meshgrid(np.arange(stack.shape[0]), np.arange(stack.shape[1]), indexing="ij")
    return pd.DataFrame(
        {
            "layer": layers.ravel(),
            "head": heads.ravel(),
            "entropy": ent.ravel(),
            "distance": dist.ravel(),
        }
    )


def attention_rollout(
    attentions: Any,
    add_residual: bool = True,
    *,
    batch_index: int = 0,
    attention_mask: Any = None,
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output draws on each input.

    Each layer's heads are averaged; with ``add_residual`` the identity is mixed in
    (0.5 A + 0.5 I, for the residual stream) and rows renormalised; the layers are multiplied
    from the first to the last: ``R = A_L ... A_2 A_1``. Returns (T, T) whose rows sum to 1:
    row i = how output position i mixes the input tokens. ``attention_mask`` (B, T) keeps
    only the real tokens of ``batch_index``.
    """
    stack = stack_layers(attentions, batch_index)  # (L, H, T, T)
    if stack.shape[-1] != stack.shape[-2]:
        raise ValueError(f"rollout needs square self-attention maps, got {tuple(stack.shape)}")
    real = real_positions(attention_mask, batch_index, stack.shape[-1])
    if real is not None:
        stack = stack[..., real, :][..., real]
    t = stack.shape[-1]
    rollout = np.eye(t)
    for layer in stack:
        a = layer.mean(0)  # (T, T) heads averaged
        if add_residual:
            a = 0.5 * a + 0.5 * np.eye(t)
        a = a / np.clip(a.sum(-1, keepdims=True), 1e-12, None)
        rollout = a @ rollout
    return rollout
