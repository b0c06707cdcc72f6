"""labkit.interp: pattern scores on hand-built attention maps, and the head finder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.interp import heads


def causal_uniform(t):
    w = np.tril(np.ones((t, t)))
    return w / w.sum(-1, keepdims=True)


def previous_map(t):
    w = np.zeros((t, t))
    w[0, 0] = 1
    w[np.arange(1, t), np.arange(t - 1)] = 1
    return w


def first_map(t):
    w = np.zeros((t, t))
    w[:, 0] = 1
    return w


def induction_map(t, period, start):
    """Uniform causal, except the second copy attends to the token after its first occurrence."""
    w = causal_uniform(t)
    for i in range(start, t):
        w[i] = 0
        w[i, i - period + 1] = 1
    return w


def test_simple_scores():
    t = 6
    assert heads.previous_token_score(previous_map(t)) == pytest.approx(1.0)
    assert heads.first_token_score(first_map(t)) == pytest.approx(1.0)
    assert heads.previous_token_score(first_map(t)) == pytest.approx(1 / (t - 1))  # only i = 1
    assert heads.self_token_score(np.eye(t)) == pytest.approx(1.0)
    u = causal_uniform(t)
    assert heads.first_token_score(u) == pytest.approx(np.mean(1 / np.arange(2, t + 1)))
    stacked = np.stack([previous_map(t), first_map(t)])  # (2, T, T) -> (2,)
    assert heads.previous_token_score(stacked).shape == (2,)


def test_punctuation_score():
    tokens = ["The", " cat", ".", " It", " sat", ","]
    w = np.zeros((6, 6))
    w[:, 0] = 1
    w[3:, 2] = 1  # queries after "." look at it
    w[3:, 0] = 0
    assert heads.punctuation_score(w, tokens) == pytest.approx(1.0)
    assert heads.punctuation_score(first_map(6), tokens) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no punctuation"):
        heads.punctuation_score(w, ["a"] * 6)
    with pytest.raises(ValueError, match="6 tokens"):
        heads.punctuation_score(np.eye(5), tokens)


def test_induction_and_duplicate_scores():
    n, prefix = 5, 1
    t = prefix + 2 * n
    w = induction_map(t, n, prefix + n)
    assert heads.induction_score(w, n, start=prefix + n) == pytest.approx(1.0)
    assert heads.duplicate_token_score(w, n, start=prefix + n) == pytest.approx(0.0)
    dup = np.zeros((t, t))
    dup[np.arange(t), np.maximum(np.arange(t) - n, 0)] = 1
    assert heads.duplicate_token_score(dup, n, start=prefix + n) == pytest.approx(1.0)
    assert heads.induction_score(causal_uniform(t), n, prefix + n) < 0.2
    with pytest.raises(ValueError, match="period"):
        heads.induction_score(w, n, start=2)


def test_repeated_random_tokens():
    ids = heads.repeated_random_tokens(100, 8, batch=2, seed=1, low=10, prefix=[1])
    assert ids.shape == (2, 17) and (ids[:, 0] == 1).all()
    assert torch.equal(ids[:, 1:9], ids[:, 9:])
    assert ids[:, 1:].min() >= 10 and ids[:, 1:].max() < 100
    assert all(len(set(row[1:9].tolist())) == 8 for row in ids)  # no repeats within a block
    assert torch.equal(
        ids, heads.repeated_random_tokens(100, 8, batch=2, seed=1, low=10, prefix=[1])
    )
    with pytest.raises(ValueError, match="distinct"):
        heads.repeated_random_tokens(5, 8)


def test_score_heads_finds_planted_heads():
    n, t = 4, 8
    rng = np.random.default_rng(0)
    noise = rng.random((2, 3, t, t)) * np.tril(np.ones((t, t)))
    noise /= noise.sum(-1, keepdims=True)
    att = noise.copy()  # (L=2, H=3, T, T)
    att[0, 1] = previous_map(t)
    att[1, 0] = first_map(t)
    att[1, 2] = induction_map(t, n, n)
    tokens = ["a", "b", ".", "c", "d", "e", "f", "g"]
    batched = [torch.tensor(a[None]) for a in att]  # a model's list of (B, H, T, T)
    scores = heads.score_heads(batched, tokens=tokens, period=n)
    assert list(scores.columns) == [
        "layer",
        "head",
        "previous_token",
        "first_token",
        "self_token",
        "punctuation",
        "induction",
        "duplicate_token",
    ]
    assert len(scores) == 6
    prev = heads.find_heads(scores, "previous_token", 0.9)
    assert prev[["layer", "head"]].values.tolist() == [[0, 1]]
    assert heads.find_heads(scores, "first_token", 0.9)[["layer", "head"]].values.tolist() == [
        [1, 0]
    ]
    ind = heads.find_heads(scores, "induction", 0.9)
    assert ind[["layer", "head"]].values.tolist() == [[1, 2]]
    no_tokens = heads.score_heads(att)
    assert "punctuation" not in no_tokens and "induction" not in no_tokens
    with pytest.raises(ValueError, match="period="):
        heads.find_heads(no_tokens, "induction")
    with pytest.raises(ValueError, match="pattern must be"):
        heads.find_heads(scores, "sink")
    both = heads.score_heads([torch.tensor(np.stack([a, a])) for a in att], average_batch=True)
    assert np.allclose(both.previous_token, no_tokens.previous_token)


def test_square_required():
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        heads.previous_token_score(np.zeros((3, 4)))
