"""Caches of keys and values for incremental decoding, all in one place.

* ``KVCache``: one attention layer's keys and values, each (B, H_kv, seen, d_k).
* ``DecoderLayerCache``: a decoder layer's self-attention and cross-attention caches.
* ``ModelCache``: one ``KVCache`` per layer of a decoder-only model (GPT, Llama).
* ``EncoderDecoderCache``: one ``DecoderLayerCache`` per decoder layer (``Transformer``).

Every cache knows ``seq_len`` (positions cached so far) and ``reorder(index)`` (keep batch
rows, e.g. the surviving beams of beam search). Start each generation with a fresh one
(``model.new_cache()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values seen so far, each (B, H_kv, seen, d_k); None while empty.

    The cache stores the H_kv key/value heads *before* they are repeated for grouped-query
    attention: that is where GQA / MQA save memory.
    """

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Number of positions cached so far."""
        return 0 if self.k is None else self.k.shape[-2]

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, H_kv, new, d_k) keys/values; return all cached ones, (B, H_kv, seen, d_k)."""
        if k_new.dim() != 4 or k_new.shape != v_new.shape:
            raise ValueError(
                f"k_new and v_new must both be (batch, n_kv_heads, new, head_dim), got "
                f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            if k_new.shape[:2] != self.k.shape[:2] or k_new.shape[-1] != self.k.shape[-1]:
                raise ValueError(
                    f"new keys {tuple(k_new.shape)} do not match the cached keys "
                    f"{tuple(self.k.shape)} in batch, heads or head_dim"
                )
            self.k = torch.cat([self.k, k_new], dim=-2)
            self.v = torch.cat([self.v, v_new], dim=-2)
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B_new,) in that order, e.g. the surviving beams."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


@dataclass
class DecoderLayerCache:
    """One decoder layer's state for incremental decoding.

    ``self_attn`` grows by one position per generated token; ``cross_attn`` holds the
    projected keys/values of the encoder memory, computed on the first step and reused after.
    Start each new sequence with a fresh ``DecoderLayerCache()``.
    """

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B_new,) of both caches, e.g. the surviving beams."""
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)


@dataclass
class ModelCache:
    """One ``KVCache`` per layer of a decoder-only model; start each generation afresh."""

    layers: list[KVCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> ModelCache:
        return cls([KVCache() for _ in range(n_layers)])

    @property
    def seq_len(self) -> int:
        """Positions cached so far (0 for a fresh cache)."""
        return self.layers[0].seq_len if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B_new,) in every layer, e.g. the surviving beams."""
        for layer in self.layers:
            layer.reorder(index)


@dataclass
class EncoderDecoderCache:
    """One ``DecoderLayerCache`` per decoder layer of an encoder-decoder model."""

    layers: list[DecoderLayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> EncoderDecoderCache:
        return cls([DecoderLayerCache() for _ in range(n_layers)])

    @property
    def seq_len(self) -> int:
        """Target positions cached so far (0 for a fresh cache)."""
        return self.layers[0].self_attn.seq_len if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B_new,) in every layer (self- and cross-attention)."""
        for layer in self.layers:
            layer.reorder(index)
