"""labkit: the tested components and models of Transformer Lab.

The library, by layer:

- ``labkit.nn``: the components a learner studies (attention, masks, efficient attention,
  positional encodings, layers, the KV cache, hook points);
- ``labkit.models``: GPT, Llama, BERT and its heads, the encoder-decoder ``Transformer`` (one
  base: presets, config and input checks, Hugging Face weight copying), LoRA adapters, and
  ``pretrained`` (real weights from pip packages);
- ``labkit.data``: corpora, synthetic tasks, tokenizers, augmentation, opt-in Hub datasets;
- ``labkit.train``: the ``Trainer`` and its config, schedules, losses, checkpoints, activation
  memory and distributed training;
- ``labkit.generation`` (decoding), ``labkit.inference`` (memory, timing, int8/int4
  quantisation, fast decoding with a static cache and ``torch.compile``),
  ``labkit.device`` (device, seed and precision helpers);
- ``labkit.interp``: the activation cache and hooks of every model (``run_with_cache``),
  head statistics and detectors of recognisable heads;
- ``labkit.viz``: heatmaps, training curves, confusion matrices, the ``AttentionExplorer``;
- ``labkit.apps``: applications of a language model: BM25 / dense / hybrid retrieval, prompt
  chains and a tool-using agent loop with memory and a step budget.

``labkit.course`` is the course's own tooling (the ``labkit`` command, notebook runner, book
build, exercises, grading, the char-GPT and BPE-GPT recipes), not library. Each subpackage
re-exports its public names, e.g. ``from labkit.nn import MultiHeadAttention``.
"""


__version__ = "0.1.0"
