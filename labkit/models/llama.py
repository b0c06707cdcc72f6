"""Llama (Touvron et al. 2023): a decoder-only Transformer, as in SmolLM2 and Llama 2/3.

Shapes: B = batch, T = new tokens, past = positions already in the KV cache, D = ``d_model``,
V = ``vocab_size``, H / H_kv = query / key-value heads.

The whole model, top to bottom::

    input_ids (B, T)
    -> embed_tokens                                  (B, T, D)
    -> n_layers x EncoderLayer, pre-norm, causal:
           x = x + self_attn(norm1(x))               RMSNorm; RoPE on q and k; GQA (H_kv < H)
           x = x + ffn(norm2(x))                     SwiGLU: down(silu(gate(x)) * up(x))
    -> norm                                          final RMSNorm, (B, T, D)
    -> lm_head                                       (B, T, V), often tied to embed_tokens

Compared with GPT-2: RMSNorm instead of LayerNorm, no biases anywhere, no position table (the
rotary embedding turns q and k by an angle proportional to the token's position, so scores
depend on relative distance), a gated SwiGLU feed-forward, and fewer key/value heads than query
heads (grouped-query attention, which shrinks the KV cache). Every block is a labkit component;
this file only wires them. ``Llama.from_hf`` copies a ``transformers.LlamaForCausalLM`` (see
``hf_name_map`` for the weight names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
from labkit.nn.layers import EncoderLayer, RMSNorm
from labkit.nn.positional import ROPE_SCALINGS, RotaryEmbedding, apply_rotary


@dataclass
class LlamaConfig(ModelConfig):
    """Hyper-parameters of a Llama model; the defaults are the ``"tiny"`` preset.

    ``max_len`` is Hugging Face's ``max_position_embeddings`` (RoPE has no table, but the
    model was trained up to this length); ``eps`` is ``rms_norm_eps``; ``tie_weights`` shares
    the embedding matrix with the LM head (``tie_word_embeddings``).

    ``rope_scaling`` and ``rope_factor`` stretch RoPE to ``rope_factor`` times the trained
    context without training (``RotaryEmbedding``'s ``scaling`` and ``factor``): ``"none"``,
    ``"linear"`` (position interpolation, Hugging Face's ``rope_type="linear"``) or ``"ntk"``
    (NTK-aware, a fixed larger base). ``max_len`` stays the longest input the forward accepts:
    raise it to the stretched length too.
    """

    vocab_size: int = 256
    max_len: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_model: int = 64
    d_ff: int = 172
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    eps: float = 1e-5
    tie_weights: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    preset_label: ClassVar[str] = "Llama"

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "max_len", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff")
        self._check_sizes(*sizes)
        self._check_heads(self.n_heads)
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even: RoPE rotates "
                "dimensions in pairs"
            )
        if self.rope_theta <= 0 or self.eps <= 0:
            raise ValueError(
                f"rope_theta and eps must be > 0, got rope_theta={self.rope_theta}, eps={self.eps}"
            )
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(
                f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}"
            )
        if self.rope_factor < 1.0 or (self.rope_scaling == "none" and self.rope_factor != 1.0):
            raise ValueError(
                f"rope_factor must be >= 1 (how many times longer the context becomes) and 1 "
                f"with rope_scaling 'none'; got rope_factor="
                f"{self.rope_factor}, rope_scaling={self.rope_scaling!r}"
            )
        self._check_token_ids("vocab_size", ("bos_id", "eos_id", "pad_id"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    @classmethod
    def _preset_table(cls) -> dict[str, dict[str, Any]]:
        return PRESETS

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """The config of a ``transformers.LlamaConfig``; ValueError for what labkit lacks.

        Reads ``rope_theta`` and the RoPE type from ``rope_parameters`` (transformers 5) or
        ``rope_theta`` / ``rope_scaling`` (transformers 4). RoPE types "default" and "linear"
        (with its ``factor``) are supported; the others ("dynamic", "yarn", "llama3", ...) are
        rejected, as are biases, activations other than SiLU and a ``head_dim`` other than
        ``hidden_size / heads``.
        """
        rope = getattr(hf_config, "rope_parameters", None) or {}
        scaling = getattr(hf_config, "rope_scaling", None) or {}  # transformers 4
        rope = {**scaling, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _HF_ROPE_TYPES:
            raise ValueError(
                f"RoPE scaling type {rope_type!r} is not supported: labkit's Llama loads "
                f"{sorted(_HF_ROPE_TYPES)} only. (Hugging Face's 'dynamic' recomputes the base "
                "from the running sequence length; labkit's rope_scaling='ntk' keeps one "
                "fixed base, so the two differ and no conversion is made.)"
            )
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ValueError("attention_bias / mlp_bias are not supported: Llama has no biases")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {hf_config.hidden_act!r}")
        n_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        if head_dim * n_heads != hf_config.hidden_size:
            raise ValueError(
                f"head_dim={head_dim} * num_attention_heads={n_heads} must equal "
                f"hidden_size={hf_config.hidden_size}"
            )
        n_kv_heads = getattr(hf_config, "num_key_value_heads", None) or n_heads
        return cls(
            vocab_size=hf_config.vocab_size,
            max_len=hf_config.max_position_embeddings,
            n_layers=hf_config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_model=hf_config.hidden_size,
            d_ff=hf_config.intermediate_size,
            rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
            rope_scaling=_HF_ROPE_TYPES[rope_type],
            rope_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            eps=float(hf_config.rms_norm_eps),
            tie_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            bos_id=_first_id(hf_config.bos_token_id),
            eos_id=_first_id(hf_config.eos_token_id),
            pad_id=_first_id(hf_config.pad_token_id),
        )

    def to_hf(self) -> Any:
        """The ``transformers.LlamaConfig`` of this config (the inverse of ``from_hf``).

        ValueError for ``rope_scaling="ntk"``: transformers has no fixed-base NTK type.
        """
        import transformers

        if self.rope_scaling == "ntk":
            raise ValueError(
                "rope_scaling='ntk' has no transformers equivalent (its 'dynamic' type "
                "recomputes the base from the sequence length): export with 'none' or 'linear'"
            )
        scaling = {"rope_type": "linear", "factor": self.rope_factor}
        return transformers.LlamaConfig(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_len,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            hidden_size=self.d_model,
            intermediate_size=self.d_ff,
            rope_theta=self.rope_theta,
            rope_scaling=scaling if self.rope_scaling == "linear" else None,
            rms_norm_eps=self.eps,
            tie_word_embeddings=self.tie_weights,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )


# transformers' RoPE type -> labkit's rope_scaling
_HF_ROPE_TYPES = {"default": "none", "linear": "linear"}


def _first_id(token_id: int | list[int] | None) -> int | None:
    """Llama 3 lists several end-of-sequence ids; labkit keeps one (the first)."""
    if isinstance(token_id, list | tuple):
        return int(token_id[0]) if token_id else None
    return None if token_id is None else int(token_id)


_SMOLLM2 = dict(vocab_size=49152, max_len=8192, eps=1e-5, tie_weights=True, bos_id=1, eos_id=2)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # the dataclass defaults: a 2-layer model for tests and smoke runs
    # The *-Instruct checkpoints of HuggingFaceTB (their config.json); pad = eos = <|im_end|>.
    "smollm2-135m": dict(
        _SMOLLM2, n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_ff=1536,
        rope_theta=100000.0, pad_id=2,
    ),
    "smollm2-360m": dict(
        _SMOLLM2, n_layers=32, n_heads=15, n_kv_heads=5, d_model=960, d_ff=2560,
        rope_theta=100000.0, pad_id=2,
    ),
    "smollm2-1.7b": dict(
        _SMOLLM2, n_layers=24, n_heads=32, n_kv_heads=32, d_model=2048, d_ff=8192,
        rope_theta=130000.0, pad_id=2,
    ),
    # meta-llama/Llama-2-7b-hf: full multi-head attention, untied head, no pad token.
    "llama2-7b": dict(
        vocab_size=32000, max_len=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_model=4096,
        d_ff=11008, rope_theta=10000.0, eps=1e-5, tie_weights=False, bos_id=1, eos_id=2,
    ),
}  # fmt: skip


def hf_name_map(n_layers: int, tie_weights: bool) -> dict[str, str]:
    """Hugging Face ``LlamaForCausalLM`` parameter name -> labkit ``Llama`` parameter name."""
    names = {"model.embed_tokens.weight": "embed_tokens.weight"}
    for i in range(n_layers):
        theirs, ours = f"model.layers.{i}", f"layers.{i}"
        names |= {
            f"{theirs}.input_layernorm.weight": f"{ours}.norm1.weight",
            f"{theirs}.self_attn.q_proj.weight": f"{ours}.self_attn.q_proj.weight",
            f"{theirs}.self_attn.k_proj.weight": f"{ours}.self_attn.k_proj.weight",
            f"{theirs}.self_attn.v_proj.weight": f"{ours}.self_attn.v_proj.weight",
            f"{theirs}.self_attn.o_proj.weight": f"{ours}.self_attn.out_proj.weight",
            f"{theirs}.post_attention_layernorm.weight": f"{ours}.norm2.weight",
            f"{theirs}.mlp.gate_proj.weight": f"{ours}.ffn.gate_proj.weight",
            f"{theirs}.mlp.up_proj.weight": f"{ours}.ffn.up_proj.weight",
            f"{theirs}.mlp.down_proj.weight": f"{ours}.ffn.down_proj.weight",
        }
    names["model.norm.weight"] = "norm.weight"
    if not tie_weights:  # tied: lm_head.weight *is* embed_tokens.weight
        names["lm_head.weight"] = "lm_head.weight"
    return names


class _Rotation:
    """RoPE with cos/sin computed once per forward pass and shared by every layer.

    Called by attention as ``rotary(q, k, positions)``, like ``RotaryEmbedding``; the
    positions were already used to build cos and sin, each (T, head_dim) or (B, T, head_dim).
    Passing ``RotaryEmbedding`` itself would give the same numbers but recompute the angles
    in each of the ``n_layers`` layers, which costs ~15% of a decoding step on a GPU.
    """

    def __init__(self, rope: RotaryEmbedding, positions: Tensor) -> None:
        self.cos, self.sin = rope.cos_sin(positions)

    def __call__(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)


class Llama(nn.Module, PresetModel):
    """Llama decoder-only language model built from labkit layers (see the module docstring).

    Submodules: ``embed_tokens``, ``layers`` (each an ``EncoderLayer`` with ``self_attn``,
    ``ffn``, ``norm1``, ``norm2``), ``norm``, ``lm_head``, and ``rotary`` (no parameters).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(
            EncoderLayer(
                c.d_model, c.n_heads, c.d_ff, dropout=0.0, activation="swiglu", norm_first=True,
                norm="rms", eps=c.eps, bias=False, n_kv_heads=c.n_kv_heads,
            )
            for _ in range(c.n_layers)
        )  # fmt: skip
        self.norm = RMSNorm(c.d_model, eps=c.eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_factor)
        self.apply(self._init_weights)
        if c.tie_weights:
            self.lm_head.weight = self.embed_tokens.weight

    config_class = LlamaConfig

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) for every matrix (Hugging Face's ``initializer_range``); norms start at 1."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(
        self, batch: int | None = None, max_len: int | None = None, *, dtype: Any = None
    ) -> ModelCache | StaticCache:
        """An empty KV cache, one ``KVCache`` per layer.

        With ``batch`` and ``max_len``: a pre-allocated ``StaticCache`` for ``max_len``
        positions (prompt + new tokens), in ``dtype`` (default the model's activations').
        """
        return new_decoder_cache(self, self.config.n_kv_heads, batch, max_len, dtype)

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
            attention_mask: (B, past + T), 1 = real token, 0 = padding (left padding for
                batched generation), covering the cached positions and the new ones.
            positions: (T,) or (B, T) RoPE positions; default counts the real tokens of
                ``attention_mask`` (``positions_from_mask``), else ``past, past + 1, ...``.
            cache: ``model.new_cache()``; the new keys/values are appended in place. A
                ``StaticCache`` (``model.new_cache(batch, max_len)``) is written in place
                instead, and the positions count each row's real tokens in it.
            need_weights: also return each layer's (B, H, T, past + T) attention weights.
            output_attentions: the same as ``need_weights`` (Hugging Face's name).
            output_hidden_states: also return the residual stream entering each layer and
                the last layer's output, n_layers + 1 tensors (B, T, D).
            logits_to_keep: the logits of the last this many positions only (0: all), as in
                Hugging Face; generation's prompt needs only the last one, and the LM head is
                the largest matrix (``labkit.generation``).

        Returns:
            CausalLMOutput(logits (B, T, V) or (B, logits_to_keep, V), hidden (B, T, D),
            attentions list or None, hidden_states list or None).
        """
        c = self.config
        # checks every input; mask (B, 1, 1, past + T) or None, positions (T,) or (B, T)
        past, mask, positions, new_real = causal_lm_inputs(
            c, input_ids, attention_mask, positions, cache
        )
        static = new_real is not None  # a StaticCache: mask is (B, 1, T, L), causal included
        rotary = _Rotation(self.rotary, positions)  # cos/sin once for all layers

        x = self.embed_tokens(input_ids)  # (B, T, D)
        need_weights = need_weights or output_attentions
        stack = run_layers(
            self.layers, x,
            lambda i, layer, h: layer(
                h, mask, is_causal=not static, need_weights=need_weights, rotary=rotary,
                positions=positions, cache=None if cache is None else cache.layers[i],
            ),
            need_weights=need_weights, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        if static:
            cache.advance(new_real)
        x = self.norm(stack.hidden)  # (B, T, D)
        logits = self.lm_head(last_positions(x, logits_to_keep))  # (B, T or logits_to_keep, V)
        return CausalLMOutput(logits, x, stack.attentions, stack.hidden_states)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> Llama:
        """A labkit copy of a ``transformers.LlamaForCausalLM`` (eval mode, same dtype/device).

        Names are mapped by ``hf_name_map``; a missing or unexpected Hugging Face parameter, or
        a shape that differs from labkit's, raises ValueError naming it (``copy_weights``).
        """
        config = LlamaConfig.from_hf(hf_model.config)
        model = cls(config)
        names = hf_name_map(config.n_layers, config.tie_weights)
        sources = {ours: theirs for theirs, ours in names.items()}
        theirs = dict(hf_model.named_parameters())
        if config.tie_weights:  # a tied head is the embedding; a loader may list it untied
            theirs.pop("lm_head.weight", None)
        copy_weights(model, theirs, sources, checkpoint="Hugging Face")
        return model.eval()

    def to_hf(self) -> nn.Module:
        """A ``transformers.LlamaForCausalLM`` copy of this model (eval mode, same dtype/device).

        The inverse of ``from_hf``, through the same ``hf_name_map``; ``save_pretrained`` on the
        result writes a folder that ``LlamaForCausalLM.from_pretrained`` loads. The model must
        be a plain ``Llama`` (merge and remove any LoRA first: ``labkit.models.lora.merged``).
        """
        import transformers

        hf = transformers.LlamaForCausalLM(self.config.to_hf())
        names = hf_name_map(self.config.n_layers, self.config.tie_weights)
        unexpected = sorted(set(self.state_dict()) - set(names.values()) - {"lm_head.weight"})
        if unexpected:
            raise ValueError(
                f"parameters {unexpected} have no Hugging Face name: to_hf exports a plain "
                "Llama (merge LoRA adapters first with labkit.models.lora.merged)"
            )
        copy_weights(hf, dict(self.named_parameters()), names, checkpoint="labkit's Llama")
        if self.config.tie_weights:
            hf.tie_weights()
        return hf.eval()
