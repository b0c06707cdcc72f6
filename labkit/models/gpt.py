"""GPT: a decoder-only Transformer language model in the GPT-2 layout (Radford et al. 2019).

The whole model, top to bottom (B batch, T new tokens, D ``d_model``, V ``vocab_size``)::

    input_ids (B, T)
      -> wte(input_ids) + wpe(positions)    token + learned position embeddings   (B, T, D)
      -> dropout
      -> n_layers x EncoderLayer            pre-LN block, causal self-attention:
                                                x = x + attn(norm1(x))   (masked: no peeking)
                                                x = x + ffn(norm2(x))    (D -> 4D -> D, GELU)
      -> norm (final LayerNorm)                                                       (B, T, D)
      -> lm_head                            Linear D -> V, sharing wte's matrix     (B, T, V)

GPT-2 is "an encoder layer with a causal mask": every block is labkit's ``EncoderLayer``
with ``norm_first=True``, called with ``is_causal=True``. Because the causal mask is aligned
bottom-right, feeding a prompt at once or token by token with a per-layer ``KVCache`` gives the
same outputs, which is what fast generation needs.

Left padding (batched generation): ``attention_mask`` (B, past + T) marks real tokens with 1;
pads are never attended to, and each sequence's positions count real tokens only, so a padded
prompt gets the same positions as the unpadded one.

``GPT.from_hf`` copies the weights of a Hugging Face ``GPT2LMHeadModel``; the name mapping is
written out once, in ``GPT2_TOP_LEVEL`` and ``GPT2_PER_LAYER`` below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from labkit.models.base import (
    CausalLMOutput,
    ModelConfig,
    PresetModel,
    causal_lm_inputs,
    copy_weights,
    last_positions,
    new_decoder_cache,
    run_layers,
)
from labkit.nn.cache import ModelCache, StaticCache
from labkit.nn.layers import EncoderLayer, LayerNorm
from labkit.nn.positional import LearnedPositionalEmbedding

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

GPT2_EOS = 50256  # "<|endoftext|>", GPT-2's only special token: it is both bos and eos


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig(ModelConfig):
    """Sizes of a GPT. The defaults are GPT-2 small (124M parameters).

    max_len: block size, the number of learned positions (cached + new tokens must fit).
    d_ff: feed-forward width, default 4 * d_model.
    dropout: on the embeddings, the attention weights, inside the MLP and on both residual
        branches (GPT-2 uses 0.1 for pretraining; 0.0 is the norm for fine-tuning and tests).
    bias: biases in every Linear and LayerNorm (GPT-2: True; nanoGPT trains without).
    eps: LayerNorm epsilon.
    tie_weights: the LM head reuses the token embedding matrix (GPT-2 does).
    activation: the MLP's GELU: ``"gelu_tanh"``, GPT-2's tanh approximation, or ``"gelu"``,
        the exact erf form (nanoGPT's ``nn.GELU()``).
    bos_id, eos_id, pad_id: special token ids, or None (GPT-2 has no pad token).
    """

    vocab_size: int = 50257
    max_len: int = 1024
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int | None = None
    dropout: float = 0.0
    bias: bool = True
    eps: float = 1e-5
    tie_weights: bool = True
    activation: str = "gelu_tanh"
    bos_id: int | None = GPT2_EOS
    eos_id: int | None = GPT2_EOS
    pad_id: int | None = None

    preset_label: ClassVar[str] = "GPT"

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        self._check_sizes("vocab_size", "max_len", "n_layers", "n_heads", "d_model", "d_ff")
        self._check_heads(self.n_heads)
        self._check_dropout()
        if self.activation not in GPT_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {GPT_ACTIVATIONS}, got {self.activation!r}"
            )
        self._check_token_ids("vocab_size", ("bos_id", "eos_id", "pad_id"))

    @property
    def is_encoder_decoder(self) -> bool:
        """Always False: GPT is decoder-only (``labkit.generation`` branches on this)."""
        return False

    @classmethod
    def _preset_table(cls) -> dict[str, dict[str, Any]]:
        return GPT_PRESETS  # GPTConfig.preset("tiny", vocab_size=65)

    @classmethod
    def from_hf(cls, hf_config: GPT2Config) -> GPTConfig:
        """The config of a Hugging Face ``GPT2Config``; ValueError for variants GPT cannot run."""
        if hf_config.model_type != "gpt2":
            raise ValueError(f"expected a GPT-2 config, got model_type={hf_config.model_type!r}")
        activation = _HF_ACTIVATIONS.get(hf_config.activation_function)
        if activation is None:
            raise ValueError(
                f"GPT runs the activations {sorted(_HF_ACTIVATIONS)} (GELU, exact or tanh), got "
                f"activation_function={hf_config.activation_function!r}"
            )
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            raise ValueError(
                "GPT scales attention scores by 1/sqrt(head_dim) only, got "
                f"scale_attn_weights={hf_config.scale_attn_weights}, "
                f"scale_attn_by_inverse_layer_idx={hf_config.scale_attn_by_inverse_layer_idx}"
            )
        return cls(
            vocab_size=hf_config.vocab_size,
            max_len=hf_config.n_positions,
            n_layers=hf_config.n_layer,
            n_heads=hf_config.n_head,
            d_model=hf_config.n_embd,
            d_ff=hf_config.n_inner,  # None -> 4 * d_model, as in GPT-2
            dropout=hf_config.resid_pdrop,  # embd_pdrop, attn_pdrop: equal in GPT-2's releases
            eps=hf_config.layer_norm_epsilon,
            tie_weights=hf_config.tie_word_embeddings,
            activation=activation,
            bos_id=hf_config.bos_token_id,
            eos_id=hf_config.eos_token_id,
            pad_id=hf_config.pad_token_id,
        )


GPT_ACTIVATIONS = ("gelu_tanh", "gelu")
# Hugging Face's GPT-2 activation names -> GPTConfig.activation
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

_NO_SPECIAL_TOKENS = dict(bos_id=None, eos_id=None, pad_id=None)

GPT_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and smoke runs: a byte-sized vocabulary, a few hundred thousand parameters.
    "tiny": dict(
        vocab_size=256, max_len=128, n_layers=2, n_heads=2, d_model=64, **_NO_SPECIAL_TOKENS
    ),
    # nanoGPT's config/train_shakespeare_char.py with its "on a MacBook / CPU" settings
    # (block_size 64, 4 layers, 4 heads, 128 wide, dropout 0.0, no biases: train.py's default;
    # exact GELU: nanoGPT's MLP uses nn.GELU()).
    "nanogpt-char-cpu": dict(
        vocab_size=65,
        max_len=64,
        n_layers=4,
        n_heads=4,
        d_model=128,
        bias=False,
        activation="gelu",
        **_NO_SPECIAL_TOKENS,
    ),
    # The four published GPT-2 sizes (vocab 50257, 1024 positions).
    "small": dict(n_layers=12, n_heads=12, d_model=768),  # 124M
    "medium": dict(n_layers=24, n_heads=16, d_model=1024),  # 355M
    "large": dict(n_layers=36, n_heads=20, d_model=1280),  # 774M
    "xl": dict(n_layers=48, n_heads=25, d_model=1600),  # 1558M
}


# ----------------------------------------------------------------------------------------------
# Model


class GPT(nn.Module, PresetModel):
    """GPT-2-style language model built from labkit components (see the module docstring).

    Submodules: ``wte`` (token embedding), ``wpe`` (``LearnedPositionalEmbedding``), ``drop``,
    ``layers`` (``EncoderLayer`` x n_layers), ``norm`` (final ``LayerNorm``), ``lm_head``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = LearnedPositionalEmbedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(
                c.d_model,
                c.n_heads,
                c.d_ff,
                dropout=c.dropout,
                activation=c.activation,
                norm_first=True,
                eps=c.eps,
                bias=c.bias,
            )
            for _ in range(c.n_layers)
        )
        self.norm = LayerNorm(c.d_model, eps=c.eps, bias=c.bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.wte.weight  # one (V, D) matrix reads and writes tokens
        self._init_weights()

    config_class = GPTConfig

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) for every matrix, zero biases, and the two
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layers), so the
        residual's variance does not grow with depth (2 such writes per layer)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.self_attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.ffn.down_proj.weight, mean=0.0, std=residual_std)

    def new_cache(
        self, batch: int | None = None, max_len: int | None = None, *, dtype: Any = None
    ) -> ModelCache | StaticCache:
        """An empty KV cache, one ``KVCache`` per layer; use one per generated batch.

        With ``batch`` and ``max_len``: a pre-allocated ``StaticCache`` for ``max_len``
        positions (prompt + new tokens), in ``dtype`` (default the model's activations').
        """
        return new_decoder_cache(self, self.config.n_heads, batch, max_len, dtype)

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: ModelCache | None = None,
        need_weights: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Next-token logits for every position (or the last ``logits_to_keep``).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, past + T), 1 = real token, 0 = padding (left padding), over
                the cached and the new positions.
            positions: (T,) or (B, T) position of each new token; default: counted over the
                real tokens of ``attention_mask`` if given, else past, past + 1, ...
            cache: ``model.new_cache()``; the new keys/values are appended in place and the
                new tokens attend over all cached ones (past = ``cache.seq_len``). A
                ``StaticCache`` (``model.new_cache(batch, max_len)``) is written in place
                instead, and the positions count each row's real tokens in it.
            need_weights: also return each layer's attention weights (B, H, T, past + T).
            output_attentions: the same as ``need_weights`` (Hugging Face's name).
            output_hidden_states: also return the residual stream entering each layer and
                the last layer's output, n_layers + 1 tensors (B, T, D).
            logits_to_keep: the logits of the last this many positions only (0: all), as in
                Hugging Face; generation's prompt needs only the last one, and the LM head is
                the largest matrix (``labkit.generation``).

        Returns:
            CausalLMOutput(logits (B, T, V) or (B, logits_to_keep, V), hidden (B, T, D)
            after the final norm, attentions: list of n_layers weight tensors, or None,
            hidden_states or None).
        """
        c = self.config
        # checks every input; mask (B, 1, 1, past + T) or None, positions (T,) or (B, T)
        past, mask, positions, new_real = causal_lm_inputs(
            c, input_ids, attention_mask, positions, cache
        )
        static = new_real is not None  # a StaticCache: mask is (B, 1, T, L), causal included

        # (T, D) or (B, T, D) positions broadcast over the (B, T, D) token embeddings. The
        # table is indexed directly: LearnedPositionalEmbedding.forward takes one offset for
        # the whole batch, but left-padded rows each start counting at their own column.
        x = self.wte(input_ids) + self.wpe.embedding(positions)
        x = self.drop(x)  # (B, T, D)
        need_weights = need_weights or output_attentions
        caches = [None] * c.n_layers if cache is None else cache.layers
        stack = run_layers(
            self.layers, x,
            lambda i, layer, h: layer(
                h, mask, is_causal=not static, need_weights=need_weights, cache=caches[i]
            ),
            need_weights=need_weights, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        if static:
            cache.advance(new_real)
        hidden = self.norm(stack.hidden)  # (B, T, D)
        # attentions: (B, H, T, past + T) per layer
        logits = self.lm_head(last_positions(hidden, logits_to_keep))  # (B, T or logits_to_keep, V)
        return CausalLMOutput(logits, hidden, stack.attentions, stack.hidden_states)

    @classmethod
    def from_hf(cls, hf_model: GPT2LMHeadModel) -> GPT:
        """A labkit GPT holding the weights of a Hugging Face ``GPT2LMHeadModel``.

        Each labkit parameter is filled from the GPT-2 parameter that ``gpt2_source`` names,
        after its conversion (``copy_weights``: missing, unexpected and mis-shaped tensors raise
        ValueError naming them). The result is in eval mode, on the source model's device and
        in its dtype.
        """
        model = cls(GPTConfig.from_hf(hf_model.config))
        sources = {name: gpt2_source(name) for name, _ in model.named_parameters()}
        copy_weights(model, dict(hf_model.named_parameters()), sources, checkpoint="GPT-2")
        return model.eval()


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2 -> labkit names
#
# GPT-2 stores its linear layers as ``Conv1D`` with weight (in, out), the transpose of
# nn.Linear's (out, in), and packs the query, key and value projections into one ``c_attn``
# whose output is [q | k | v], each D wide. Biases are (out,) in both.


def _conv1d(w: Tensor) -> Tensor:
    """Conv1D weight (in, out) -> nn.Linear weight (out, in); a bias (out,) is unchanged."""
    return w.t() if w.dim() == 2 else w


def _c_attn_part(index: int) -> Callable[[Tensor], Tensor]:
    """Part ``index`` (0 = q, 1 = k, 2 = v) of c_attn: (D, 3D) -> (D, D), or (3D,) -> (D,)."""
    return lambda w: _conv1d(w).chunk(3, dim=0)[index]


def _same(w: Tensor) -> Tensor:
    return w


# labkit module -> (GPT-2 module, conversion); ".weight" / ".bias" follow the module name.
GPT2_TOP_LEVEL: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "wte": ("transformer.wte", _same),
    "wpe.embedding": ("transformer.wpe", _same),
    "norm": ("transformer.ln_f", _same),
    "lm_head": ("lm_head", _same),  # only when not tied to wte
}
# labkit "layers.{i}.<module>" -> (GPT-2 "transformer.h.{i}.<module>", conversion).
GPT2_PER_LAYER: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "norm1": ("ln_1", _same),
    "self_attn.q_proj": ("attn.c_attn", _c_attn_part(0)),
    "self_attn.k_proj": ("attn.c_attn", _c_attn_part(1)),
    "self_attn.v_proj": ("attn.c_attn", _c_attn_part(2)),
    "self_attn.out_proj": ("attn.c_proj", _conv1d),
    "norm2": ("ln_2", _same),
    "ffn.up_proj": ("mlp.c_fc", _conv1d),
    "ffn.down_proj": ("mlp.c_proj", _conv1d),
}


def gpt2_source(name: str) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The GPT-2 parameter that fills labkit parameter ``name``, and how to convert it.

    >>> gpt2_source("layers.3.ffn.up_proj.weight")[0]
    'transformer.h.3.mlp.c_fc.weight'
    """
    module, _, kind = name.rpartition(".")  # e.g. "layers.3.ffn.up_proj", "weight"
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        their_module, convert = GPT2_PER_LAYER[rest]
        return f"transformer.h.{index}.{their_module}.{kind}", convert
    their_module, convert = GPT2_TOP_LEVEL[module]
    return f"{their_module}.{kind}", convert
