"""Caches of keys and values for incremental decoding, all in one place.

* ``KVCache``: one attention layer's keys and values, each (B, H_kv, seen, d_k).
* ``DecoderLayerCache``: a decoder layer's self-attention and cross-attention caches.
* ``ModelCache``: one ``KVCache`` per layer of a decoder-only model (GPT, Llama).
* ``EncoderDecoderCache``: one ``DecoderLayerCache`` per decoder layer (``Transformer``).
* ``StaticCache``: a pre-allocated cache for a decoder-only model, one ``StaticKVCache`` per
  layer (``model.new_cache(batch=B, max_len=L)``), for fast decoding.

Every cache knows ``seq_len`` (positions cached so far) and ``reorder(index)`` (keep batch
rows, e.g. the surviving beams of beam search). Start each generation with a fresh one
(``model.new_cache()``), or ``reset()`` a static one.

**Dynamic vs static.** ``KVCache`` grows by concatenation: each step allocates new (B, H_kv,
seen + 1, d_k) tensors and copies the past into them, so shapes change every step. A
``StaticCache`` allocates (B, H_kv, L, d_k) zeros once and writes each new key/value *in place*
at the next free column; attention then runs over all L columns with a mask that hides the
columns not written yet (and padding). Every decoding step has the same shapes and touches the
same memory, which is what ``torch.compile`` (one graph, no recompiles) and CUDA graphs (fixed
addresses) need. Its bookkeeping lives in tensors, not Python ints, so a compiled step reads
and advances it inside the graph:

* ``filled`` (1,): columns written so far (shared by every layer; left-padded rows write the
  same columns);
* ``key_mask`` (B, L) bool: True where a real (non-pad) token was written;
* ``n_real`` (B,): real tokens per row, i.e. the position of each row's next token.

A model's forward calls ``prepare`` (mask and positions of the new tokens), runs its layers
(each ``StaticKVCache.update`` writes at columns ``filled .. filled + T - 1``) and then
``advance``. ``truncate(n)`` rolls back to the first n columns (speculative decoding drops
rejected draft tokens that way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def _mark_static(tensor: Tensor) -> Tensor:
    """Tell ``torch.compile`` the tensor keeps its address (CUDA graphs may mutate it)."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


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

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (e.g. drop rejected draft tokens)."""
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"can truncate to 0..{self.seq_len} positions, got {length}")
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


@dataclass
class StaticKVCache(KVCache):
    """One layer's pre-allocated keys and values, each (B, H_kv, L, d_k), written in place.

    ``filled`` (1,) is the owning ``StaticCache``'s count of written columns (the same tensor
    in every layer). ``update`` writes T new keys/values at columns ``filled .. filled + T - 1``
    and returns the whole buffers: attention masks the columns not written yet.
    """

    filled: Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Columns written so far (reads the tensor: a device sync on a GPU)."""
        return int(self.filled)

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, H_kv, T, d_k) keys/values; return the buffers, each (B, H_kv, L, d_k)."""
        if (
            k_new.shape != v_new.shape
            or k_new.shape[:2] != self.k.shape[:2]
            or (k_new.shape[-1] != self.k.shape[-1])
        ):
            raise ValueError(
                f"new keys {tuple(k_new.shape)} / values {tuple(v_new.shape)} do not fit the "
                f"static cache (batch, n_kv_heads, max_len, head_dim) = {tuple(self.k.shape)}"
            )
        columns = self.filled + torch.arange(k_new.shape[2], device=k_new.device)  # (T,)
        self.k.index_copy_(2, columns, k_new.to(self.k.dtype))
        self.v.index_copy_(2, columns, v_new.to(self.v.dtype))
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B,) in place (the buffers keep their addresses)."""
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))

    def truncate(self, length: int) -> None:
        raise ValueError("a StaticKVCache is rolled back by its StaticCache: cache.truncate(n)")


class StaticCache:
    """A decoder-only model's pre-allocated KV cache: one ``StaticKVCache`` per layer.

    Built by ``model.new_cache(batch=B, max_len=L)`` (or directly): L is the most positions
    one generation needs (prompt + new tokens), usually far below the model's ``max_len``;
    attention reads all L columns every step, so a tight L is faster. See the module
    docstring for how the model drives it (``prepare`` / ``advance``).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("n_layers", n_layers), ("batch", batch), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"a static cache needs {name} >= 1, got {name}={value}")
        self.max_len = max_len
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.filled = _mark_static(torch.zeros(1, dtype=torch.long, device=device))  # (1,)
        self.n_real = _mark_static(torch.zeros(batch, dtype=torch.long, device=device))  # (B,)
        self.key_mask = _mark_static(
            torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        )  # (B, L)
        # zeros, not empty: a masked column still enters weights @ v, and 0 * NaN is NaN
        self.layers = [
            StaticKVCache(
                _mark_static(torch.zeros(shape, dtype=dtype, device=device)),
                _mark_static(torch.zeros(shape, dtype=dtype, device=device)),
                self.filled,
            )
            for _ in range(n_layers)
        ]

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    @property
    def seq_len(self) -> int:
        """Columns written so far (reads the tensor: a device sync on a GPU)."""
        return int(self.filled)

    def prepare(self, new_real: Tensor) -> tuple[Tensor, Tensor]:
        """Mark T new tokens' columns and return what attention and positions need.

        new_real: (B, T) bool, False for left padding. Returns ``mask`` (B, 1, T, L) bool,
        True = may attend (a written real key, at or before the query's column), and
        ``positions`` (B, T): each token's position counted over its row's real tokens.
        Call ``advance(new_real)`` once the layers have written their keys/values.
        """
        seq = new_real.shape[1]
        if new_real.shape[0] != self.batch:
            raise ValueError(
                f"the static cache holds batch {self.batch}, got {new_real.shape[0]} rows"
            )
        if not torch.compiler.is_compiling() and self.seq_len + seq > self.max_len:
            raise ValueError(
                f"{self.seq_len} cached + {seq} new tokens exceed the static cache's "
                f"max_len={self.max_len}: create it with a larger max_len"
            )
        columns = self.filled + torch.arange(seq, device=new_real.device)  # (T,)
        self.key_mask.index_copy_(1, columns, new_real)
        all_columns = torch.arange(self.max_len, device=new_real.device)  # (L,)
        causal = all_columns[None, :] <= columns[:, None]  # (T, L)
        mask = self.key_mask[:, None, None, :] & causal[None, None]  # (B, 1, T, L)
        positions = (self.n_real[:, None] + new_real.long().cumsum(-1) - 1).clamp(min=0)
        return mask, positions

    def advance(self, new_real: Tensor) -> None:
        """Count T new tokens as written (after every layer's ``update``)."""
        self.filled += new_real.shape[1]
        self.n_real += new_real.sum(dim=-1)

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (e.g. rejected draft tokens)."""
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"can truncate to 0..{self.seq_len} columns, got {length}")
        self.key_mask[:, length:] = False
        self.filled.fill_(length)
        self.n_real.copy_(self.key_mask.sum(dim=-1))

    def reset(self) -> None:
        """Empty the cache for a new generation (the buffers are kept, not reallocated)."""
        self.truncate(0)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B,) in every layer, in place (e.g. the surviving beams)."""
        self.key_mask.copy_(self.key_mask.index_select(0, index))
        self.n_real.copy_(self.n_real.index_select(0, index))
        for layer in self.layers:
            layer.reorder(index)


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

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions in every layer."""
        for layer in self.layers:
            layer.truncate(length)


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
