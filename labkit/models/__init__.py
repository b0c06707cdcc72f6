"""labkit's models, each built only from labkit components, one file per model.

* ``GPT`` (``gpt.py``): GPT-2's decoder-only layout; loads Hugging Face GPT-2 checkpoints.
* ``Llama`` (``llama.py``): RMSNorm, RoPE, SwiGLU, grouped-query attention; loads SmolLM2.
* ``BertEncoder`` and its heads (``bert.py``): bidirectional encoder; loads all-MiniLM-L6-v2.
* ``Transformer`` (``transformer.py``): the encoder-decoder of "Attention Is All You Need".

Every model has a config dataclass with presets (``XConfig.preset("tiny")`` for tests and
smoke runs, plus the published sizes), ``from_config``, ``from_preset`` and
``num_parameters``. ``base.py`` holds what they share (named outputs, config checks, the one
input check (``check_input_ids``: dtype, empty input, ids out of range, too long), and
``HookedModel``: every model names its hook points, ``model.hook_points()``, and offers
``model.run_with_cache(...)`` and ``model.hooks(...)``; see ``labkit.interp.activations``).
The KV caches of generation (``model.new_cache()``) are in ``labkit.nn.cache``.
Every model returns per-layer attention weights (``need_weights=True`` or
``output_attentions=True``) and hidden states (``output_hidden_states=True``) on request.
``lora.py`` adds LoRA adapters to any model's linear layers (``apply_lora``, merge/unmerge,
adapter save/load, a merged Llama saved for ``transformers``), computed as ``peft`` does.
``pretrained.py`` loads real weights from pip-installed packages into them
(``load("minilm")``, ``load("smollm2-135m-instruct")``, ``load_gpt2(path_or_hub_id)``).
"""

from labkit.models.base import CausalLMOutput, HookedModel
from labkit.models.bert import (
    BertConfig,
    BertEncoder,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertOutput,
    best_span,
    mean_pool,
)
from labkit.models.gpt import GPT, GPTConfig
from labkit.models.llama import Llama, LlamaConfig
from labkit.models.lora import (
    LoRALinear,
    ParameterReport,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged,
    save_adapter,
    save_merged_llama,
    trainable_parameters,
    unmerge_lora,
)
from labkit.models.pretrained import (
    Pretrained,
    PretrainedUnavailableError,
    load,
    load_gpt2,
    load_minilm,
    load_smollm2,
)
from labkit.models.transformer import (
    EncoderOutput,
    Seq2SeqOutput,
    Transformer,
    TransformerConfig,
)

__all__ = [
    "GPT",
    "BertConfig",
    "BertEncoder",
    "BertForMaskedLM",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertOutput",
    "CausalLMOutput",
    "EncoderOutput",
    "GPTConfig",
    "HookedModel",
    "Llama",
    "LlamaConfig",
    "LoRALinear",
    "ParameterReport",
    "Pretrained",
    "PretrainedUnavailableError",
    "Seq2SeqOutput",
    "Transformer",
    "TransformerConfig",
    "apply_lora",
    "best_span",
    "load",
    "load_gpt2",
    "load_minilm",
    "load_adapter",
    "load_smollm2",
    "lora_state_dict",
    "mean_pool",
    "merge_lora",
    "merged",
    "save_adapter",
    "save_merged_llama",
    "trainable_parameters",
    "unmerge_lora",
]
