"""labkit: the tested components and models of Transformer Lab.

Modules hold one idea each: ``attention`` (scaled dot-product and multi-head attention, masks,
KV cache, efficient variants), ``positional`` (sinusoidal, learned, relative, rotary, ALiBi),
``layers`` (norms, feed-forward, encoder and decoder layers), ``device`` (device, seed and
precision helpers), ``data`` (the packaged corpora and synthetic tasks), ``tokenizers``
(character and BPE), ``augment`` (text augmentation), ``schedules`` (learning-rate schedules),
``train`` (the ``Trainer``), ``distributed`` (data-parallel training under ``torchrun``),
``models`` (GPT, Llama, BERT, the encoder-decoder ``Transformer``), ``pretrained`` (real weights
from pip packages), ``generation`` and ``inference`` (decoding, quantisation, timing), ``viz``
(attention heatmaps, head summaries, the book-safe ``AttentionExplorer``), ``heads`` (detectors
of recognisable attention heads), ``notebooks``, ``exercises`` and ``book`` (running the course,
writing starter notebooks, building the book).
Import what you need from them, e.g. ``from labkit.attention import MultiHeadAttention``.
"""

__version__ = "0.1.0"
