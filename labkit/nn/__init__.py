"""The building blocks a learner studies, one idea per module.

``attention`` (the explicit scaled dot-product formula, ``MultiHeadAttention`` with
grouped-query heads and Bahdanau's ``AdditiveAttention``), ``masks`` (padding, causal and
sparse masks; True = may attend), ``efficient`` (Linformer, Nyströmformer and Performer
self-attention, FAVOR+ features), ``positional`` (sinusoidal, learned, relative, rotary with
context scaling, ALiBi), ``layers`` (norms, feed-forward, encoder and decoder layers), ``cache``
(the key/value caches of incremental decoding) and ``hooks`` (``HookPoint``, where activations
can be read or replaced). Every name is re-exported here, e.g.
``from labkit.nn import MultiHeadAttention, causal_mask``.
"""

from labkit.nn.attention import (
    AdditiveAttention,
    AttentionOutput,
    MultiHeadAttention,
    scaled_dot_product_attention,
)
from labkit.nn.cache import (
    DecoderLayerCache,
    EncoderDecoderCache,
    KVCache,
    ModelCache,
)
from labkit.nn.efficient import (
    LinformerSelfAttention,
    NystromSelfAttention,
    PerformerSelfAttention,
    favor_features,
    gaussian_projection,
    performer_attention,
)
from labkit.nn.hooks import HookPoint, hooked, run_hook
from labkit.nn.layers import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    LayerOutput,
    RMSNorm,
)
from labkit.nn.masks import (
    block_sparse_mask,
    causal_mask,
    longformer_mask,
    pad_sequences,
    padding_mask,
    padding_mask_from_ids,
    sliding_window_mask,
)
from labkit.nn.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
    rotate_half,
    sinusoidal_table,
)

__all__ = [
    "HookPoint",
    "hooked",
    "run_hook",
    "ALiBi",
    "AdditiveAttention",
    "AttentionOutput",
    "DecoderLayer",
    "DecoderLayerCache",
    "EncoderDecoderCache",
    "EncoderLayer",
    "FeedForward",
    "KVCache",
    "ModelCache",
    "LayerNorm",
    "LayerOutput",
    "LearnedPositionalEmbedding",
    "LinformerSelfAttention",
    "MultiHeadAttention",
    "NystromSelfAttention",
    "PerformerSelfAttention",
    "RMSNorm",
    "RelativePositionBias",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "alibi_slopes",
    "apply_rotary",
    "block_sparse_mask",
    "causal_mask",
    "favor_features",
    "gaussian_projection",
    "longformer_mask",
    "pad_sequences",
    "padding_mask",
    "padding_mask_from_ids",
    "performer_attention",
    "relative_position_bucket",
    "rotate_half",
    "scaled_dot_product_attention",
    "sinusoidal_table",
    "sliding_window_mask",
]
