"""Detect attention heads with recognisable patterns, from their weights alone.

Each score reduces a head's weights (..., T, T), rows = queries, to one number in [0, 1]: the
mean weight the queries put where the pattern says they should.

* ``previous_token_score``: weight on the token just before (query i -> key i - 1).
* ``first_token_score``: weight on position 0, the "attention sink" many trained models park
  unused attention on (query i >= 1 -> key 0).
* ``self_token_score``: weight on the query's own position.
* ``punctuation_score``: weight on punctuation tokens ("." "," ...), over the queries that
  follow at least one.
* ``induction_score``: on a random token sequence repeated twice, weight from a token of the
  second copy on the token that FOLLOWED its earlier occurrence (query i -> key i - n + 1):
  the "[A][B] ... [A] -> [B]" copying circuit of Olsson et al. (2022).
* ``duplicate_token_score``: same input, weight on the earlier occurrence itself (i -> i - n).

``score_heads(attentions, ...)`` scores every layer and head into a DataFrame and
``find_heads(scores, pattern, threshold)`` lists the heads above a threshold, best first.
``repeated_random_tokens`` builds the induction probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit.interp.stats import stack_layers, to_numpy

__all__ = [
    "PATTERNS",
    "PUNCTUATION",
    "duplicate_token_score",
    "find_heads",
    "first_token_score",
    "induction_score",
    "previous_token_score",
    "punctuation_score",
    "repeated_random_tokens",
    "score_heads",
    "self_token_score",
]

PUNCTUATION = frozenset(".,;:!?()[]\"'-")
PATTERNS = ("previous_token", "first_token", "self_token", "punctuation", "induction",
            "duplicate_token")  # fmt: skip


def _square(weights: Any) -> np.ndarray:
    w = to_numpy(weights)
    if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must be square self-attention (..., T, T), got {w.shape}")
    if w.shape[-1] < 2:
        raise ValueError(f"need at least 2 tokens to score a pattern, got shape {w.shape}")
    return w


def previous_token_score(weights: Any) -> np.ndarray:
    """Mean weight of query i on key i - 1, over i = 1 .. T-1; (..., T, T) -> (...)."""
    w = _square(weights)
    t = w.shape[-1]
    return w[..., np.arange(1, t), np.arange(t - 1)].mean(-1)


def first_token_score(weights: Any) -> np.ndarray:
    """Mean weight of query i on key 0, over i = 1 .. T-1 (query 0 has no other choice)."""
    w = _square(weights)
    return w[..., 1:, 0].mean(-1)


def self_token_score(weights: Any) -> np.ndarray:
    """Mean weight of each query on its own position, over i = 1 .. T-1."""
    w = _square(weights)
    t = w.shape[-1]
    return w[..., np.arange(1, t), np.arange(1, t)].mean(-1)


def punctuation_score(
    weights: Any, tokens: Sequence[str], punctuation: frozenset[str] | set[str] = PUNCTUATION
) -> np.ndarray:
    """Mean weight on punctuation keys, over the queries after the first punctuation token.

    ``tokens`` (T,) are the token strings; a token counts as punctuation when, stripped of
    spaces, it is non-empty and made only of ``punctuation`` characters.
    """
    w = _square(weights)
    t = w.shape[-1]
    if len(tokens) != t:
        raise ValueError(f"got {len(tokens)} tokens for weights of shape {tuple(w.shape)}")
    is_punct = np.array([bool(s.strip()) and all(c in punctuation for c in s.strip())
                         for s in tokens])  # fmt: skip
    if not is_punct.any():
        raise ValueError("the tokens hold no punctuation: nothing to score")
    first = int(np.argmax(is_punct))
    if first == t - 1:
        raise ValueError("the only punctuation is the last token: no query follows it")
    return w[..., first + 1 :, :][..., is_punct].sum(-1).mean(-1)


def _repeat_rows(t: int, period: int, start: int | None) -> np.ndarray:
    start = period if start is None else start
    if period < 1 or start < period or start >= t:
        raise ValueError(
            f"need 1 <= period <= start < T for a repeated sequence, got period={period}, "
            f"start={start}, T={t}"
        )
    return np.arange(start, t)


def induction_score(weights: Any, period: int, start: int | None = None) -> np.ndarray:
    """Mean weight of query i on key i - period + 1 over the second copy of a repeated sequence.

    period: length n of the repeated block; start: first position of the second copy
    (default ``period``; ``prefix + period`` when a prefix such as <bos> comes first).
    """
    w = _square(weights)
    rows = _repeat_rows(w.shape[-1], period, start)
    return w[..., rows, rows - period + 1].mean(-1)


def duplicate_token_score(weights: Any, period: int, start: int | None = None) -> np.ndarray:
    """Mean weight of query i on key i - period (the same token's earlier occurrence)."""
    w = _square(weights)
    rows = _repeat_rows(w.shape[-1], period, start)
    return w[..., rows, rows - period].mean(-1)


def repeated_random_tokens(
    vocab_size: int,
    length: int,
    *,
    batch: int = 1,
    seed: int = 0,
    low: int = 0,
    prefix: Sequence[int] = (),
) -> Tensor:
    """(batch, len(prefix) + 2 * length) ids: ``prefix``, then random ids in [low, vocab_size)
    drawn without repetition inside a block, then the same block again.

    The second copy's start is ``len(prefix) + length`` (pass it as ``start`` to the scores).
    """
    if not 0 <= low < vocab_size or length < 2 or vocab_size - low < length:
        raise ValueError(
            f"need 0 <= low < vocab_size, length >= 2 and {length} distinct ids in "
            f"[{low}, {vocab_size}), got low={low}, vocab_size={vocab_size}, length={length}"
        )
    g = torch.Generator().manual_seed(seed)
    blocks = torch.stack(
        [torch.randperm(vocab_size - low, generator=g)[:length] + low for _ in range(batch)]
    )  # (batch, length) fmt: skip
    head = torch.tensor(list(prefix), dtype=torch.long).expand(batch, len(prefix))
    return torch.cat([head, blocks, blocks], dim=1)


def score_heads(
    attentions: Any,
    *,
    tokens: Sequence[str] | None = None,
    period: int | None = None,
    start: int | None = None,
    batch_index: int = 0,
    average_batch: bool = False,
):
    """Every pattern score for every (layer, head) as a pandas DataFrame.

    attentions: a model's ``out.attentions`` (list of (B, H, T, T)) or an (L, H, T, T) array.
    Columns: layer, head, previous_token, first_token, self_token, and punctuation when
    ``tokens`` hold punctuation, induction and duplicate_token when ``period`` is given.
    ``average_batch`` averages the scores over every example (unpadded inputs only).
    """
    import pandas as pd

    if average_batch and isinstance(attentions, (list, tuple)) and attentions:
        n = to_numpy(attentions[0]).shape[0]
        tables = [score_heads(attentions, tokens=tokens, period=period, start=start,
                              batch_index=b) for b in range(n)]  # fmt: skip
        return pd.concat(tables).groupby(["layer", "head"], as_index=False).mean()
    stack = stack_layers(attentions, batch_index)  # (L, H, T, T)
    n_layers, n_heads = stack.shape[:2]
    layers, heads = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    columns = {"layer": layers.ravel(), "head": heads.ravel(),
               "previous_token": previous_token_score(stack).ravel(),
               "first_token": first_token_score(stack).ravel(),
               "self_token": self_token_score(stack).ravel()}  # fmt: skip
    if tokens is not None:
        try:
            columns["punctuation"] = punctuation_score(stack, tokens).ravel()
        except ValueError as err:
            if "no punctuation" not in str(err) and "last token" not in str(err):
                raise
    if period is not None:
        columns["induction"] = induction_score(stack, period, start).ravel()
        columns["duplicate_token"] = duplicate_token_score(stack, period, start).ravel()
    return pd.DataFrame(columns)


def find_heads(scores: Any, pattern: str, threshold: float = 0.5):
    """The rows of ``score_heads`` whose ``pattern`` score exceeds ``threshold``, best first."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern not in scores:
        raise ValueError(
            f"scores have no {pattern!r} column (columns: {list(scores.columns)}); pass tokens= "
            "for punctuation, period= for induction/duplicate_token to score_heads"
        )
    found = scores[scores[pattern] > threshold]
    return found.sort_values(pattern, ascending=False).reset_index(drop=True)
