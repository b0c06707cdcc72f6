"""Caches of keys and values for incremental decoding.

``KVCache`` holds one attention layer's keys and values, each (B, H_kv, seen, d_k).
"""

from dataclasses import dataclass

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
