"""labkit: the tested components and models of Transformer Lab.

Modules hold one idea each: ``attention`` (scaled dot-product and multi-head attention, masks,
KV cache, efficient variants), ``positional`` (sinusoidal, learned, relative, rotary, ALiBi),
``layers`` (norms, feed-forward, encoder and decoder layers) and ``device`` (device, seed and
precision helpers). Import what you need from them, e.g.
``from labkit.attention import MultiHeadAttention``.
"""

__version__ = "0.1.0"
