"""Interpretability: look inside a model, and numbers that say what attention heads do.

``activations`` names every model's hook points (``blocks.3.attn.pattern``,
``blocks.3.resid_post``, ...) and offers ``run_with_cache`` (one forward pass, its activations
by name in an ``ActivationCache``) and ``hooks`` (read or replace activations: ablation,
patching). ``stats`` computes head statistics (entropy, mean attention distance, a per-head
table, attention rollout) from any model's attentions. ``heads`` holds the detectors of
recognisable heads (previous-token, first-token, self, punctuation, induction and
duplicate-token scores; ``score_heads`` scores every layer and head, ``find_heads`` lists those
above a threshold). Their pictures are in ``labkit.viz``. E.g.
``from labkit.interp import run_with_cache, find_heads``.
"""

from labkit.interp.activations import (
    LAYER_POINTS,
    ActivationCache,
    hook_points,
    hooks,
    layer_hook_points,
    run_with_cache,
)
from labkit.interp.heads import (
    PATTERNS,
    duplicate_token_score,
    find_heads,
    first_token_score,
    induction_score,
    previous_token_score,
    punctuation_score,
    repeated_random_tokens,
    score_heads,
    self_token_score,
)
from labkit.interp.stats import (
    attention_rollout,
    head_entropy,
    head_summary,
    mean_attention_distance,
    stack_layers,
    to_numpy,
)

__all__ = [
    "LAYER_POINTS",
    "ActivationCache",
    "hook_points",
    "hooks",
    "layer_hook_points",
    "run_with_cache",
    "PATTERNS",
    "attention_rollout",
    "duplicate_token_score",
    "find_heads",
    "first_token_score",
    "head_entropy",
    "head_summary",
    "induction_score",
    "mean_attention_distance",
    "previous_token_score",
    "punctuation_score",
    "repeated_random_tokens",
    "score_heads",
    "self_token_score",
    "stack_layers",
    "to_numpy",
]
