"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

Symbols: B batch size, S source length, T target length (past + T with a cache), D
``d_model``, F ``d_ff``, H heads, V vocabulary size.

The whole model, top to bottom::

    src_ids (B, S) --embed * sqrt(D) + PE, dropout--> n_encoder_layers x EncoderLayer
        [--> encoder_norm, pre-LN only]                               = memory (B, S, D)
    tgt_ids (B, T) --embed * sqrt(D) + PE, dropout--> n_decoder_layers x DecoderLayer(memory)
        [--> decoder_norm, pre-LN only] --> lm_head                   = logits (B, T, V)

* Embeddings are multiplied by sqrt(D) (section 3.4) so that the token vectors are not
  drowned by the sinusoidal position encoding PE (section 3.5), whose entries lie in [-1, 1].
* ``positional="rope"`` replaces PE by rotary embeddings (Su et al. 2021) inside every
  self-attention, encoder and decoder: no vector is added to the embeddings, queries and keys
  are rotated by their positions (the same positions PE would use), so self-attention scores
  depend on relative offsets only. Cross-attention is not rotated (source and target
  positions are different sequences).
* ``share_embeddings`` (the paper's default, with one 37k BPE vocabulary for both languages)
  uses a single matrix for the source embedding, the target embedding and the output
  projection ``lm_head`` (a matrix without bias), so it needs equal vocabulary sizes.
* Post-LN (``norm_first=False``, the paper) ends each sublayer with a norm, so the stacks
  need no final norm. Pre-LN (``norm_first=True``) leaves the residual stream unnormalised,
  so each stack ends with its own ``LayerNorm``.
* Every matrix starts Xavier-uniform, as in common implementations of the paper.

Masks (1 = real token, 0 = padding) and positions follow labkit's decoder-only models:

* ``src_mask`` (B, S) hides padded source positions from encoder self-attention and from
  decoder cross-attention.
* ``tgt_mask`` (B, past + T) hides padded target positions; it is ANDed with the causal mask.
* Positions count real tokens only (``positions_from_mask``), so a sequence gets the same
  encoding whether it is padded on the left, on the right or not at all.

Decoding one token at a time reuses an ``EncoderDecoderCache`` (``model.new_cache()``): each
decoder layer keeps its past self-attention keys/values and the projected memory. Decoding
loops (greedy, beam search) live in ``labkit.generation``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from labkit.models.base import (
    ModelConfig,
    PresetModel,
    check_input_ids,
    default_positions,
    key_padding_mask,
    positions_from_mask,
    run_layers,
)
from labkit.nn.cache import EncoderDecoderCache
from labkit.nn.layers import DecoderLayer, EncoderLayer, LayerNorm
from labkit.nn.positional import RotaryEmbedding, SinusoidalPositionalEncoding

POSITIONAL = ("sinusoidal", "rope")

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Table 3 of the paper; "base" and "big" share one BPE vocabulary of about 37000 tokens
# (WMT 2014 English-German). The paper fixes no maximum length: 1024 as in fairseq.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        src_vocab_size=64, tgt_vocab_size=64, d_model=64, n_heads=4, n_encoder_layers=2,
        n_decoder_layers=2, d_ff=128, dropout=0.1, max_len=128,
    ),
    "base": dict(
        src_vocab_size=37000, tgt_vocab_size=37000, d_model=512, n_heads=8, n_encoder_layers=6,
        n_decoder_layers=6, d_ff=2048, dropout=0.1, max_len=1024,
    ),
    "big": dict(  # P_drop 0.3 is the English-German big model's
        src_vocab_size=37000, tgt_vocab_size=37000, d_model=1024, n_heads=16,
        n_encoder_layers=6, n_decoder_layers=6, d_ff=4096, dropout=0.3, max_len=1024,
    ),
}  # fmt: skip


@dataclass
class TransformerConfig(ModelConfig):
    """Sizes and choices of the encoder-decoder model; the defaults are the paper's base model.

    ``bos_id`` starts every decoded sequence, ``eos_id`` ends it, ``pad_id`` fills batches;
    the defaults are those of the labkit tokenizers (pad 0, bos 2, eos 3).
    """

    src_vocab_size: int = 37000
    tgt_vocab_size: int = 37000
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    max_len: int = 1024  # longest source, and longest target, in tokens
    norm_first: bool = False  # False: post-LN, as in the paper
    positional: str = "sinusoidal"  # or "rope": rotary embeddings in every self-attention
    activation: str = "relu"
    share_embeddings: bool = True  # one matrix for source, target and output (section 3.4)
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int | None = 0

    def __post_init__(self) -> None:
        self._check_sizes(
            "src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers",
            "n_decoder_layers", "d_ff", "max_len",
        )  # fmt: skip
        self._check_heads(self.n_heads)
        self._check_dropout()
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
        if self.positional == "rope" and (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"positional='rope' rotates pairs of dimensions, so the head width "
                f"d_model / n_heads = {self.d_model // self.n_heads} must be even"
            )
        if self.d_model % 2 != 0:
            raise ValueError(
                f"d_model={self.d_model} must be even: the sinusoidal encoding fills columns "
                "in sine/cosine pairs"
            )
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one vocabulary for both sides, got "
                f"src_vocab_size={self.src_vocab_size}, tgt_vocab_size={self.tgt_vocab_size}"
            )
        self._check_token_ids("tgt_vocab_size", ("bos_id", "eos_id", "pad_id"), what="target")

    @property
    def is_encoder_decoder(self) -> bool:
        """Always True: generation calls ``encode`` once, then ``decode`` step by step."""
        return True

    @classmethod
    def _preset_table(cls) -> dict[str, dict[str, Any]]:
        return PRESETS  # "tiny", "base", "big"


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class Seq2SeqOutput(NamedTuple):
    """What ``Transformer.decode`` (and ``forward``) returns.

    logits: (B, T, tgt_vocab_size) next-token scores for every target position.
    self_attentions: one (B, H, T, past + T) decoder self-attention weight tensor per decoder
        layer when ``need_weights=True``, else None.
    cross_attentions: one (B, H, T, S) cross-attention weight tensor per decoder layer (which
        source tokens each target position reads), or None.
    decoder_hidden_states: with ``output_hidden_states=True``, n_decoder_layers + 1 tensors
        (B, T, D): the stream entering each decoder layer, then the last one's output.
    encoder_attentions, encoder_hidden_states: the encoder's (see ``EncoderOutput``), from
        ``forward`` only (``decode`` never sees the encoder).
    """

    logits: Tensor
    self_attentions: list[Tensor] | None
    cross_attentions: list[Tensor] | None
    decoder_hidden_states: list[Tensor] | None = None
    encoder_attentions: list[Tensor] | None = None
    encoder_hidden_states: list[Tensor] | None = None


class EncoderOutput(NamedTuple):
    """What ``Transformer.encoder_output`` returns.

    memory: (B, S, D) the encoder output (after the final norm in pre-LN), ``encode``'s result.
    attentions: one (B, H, S, S) self-attention weight tensor per encoder layer, or None.
    hidden_states: n_encoder_layers + 1 tensors (B, S, D), the stream entering each layer and
        the last one's output, or None.
    """

    memory: Tensor
    attentions: list[Tensor] | None
    hidden_states: list[Tensor] | None


def _check_mask(name: str, mask: Tensor, batch: int, length: int) -> None:
    if mask.dim() != 2 or mask.shape != (batch, length):
        raise ValueError(
            f"{name} must be (batch, seq) = ({batch}, {length}), got {tuple(mask.shape)}"
        )


class Transformer(nn.Module, PresetModel):
    """Encoder-decoder Transformer; see the module docstring for the wiring.

    Submodules: ``src_embed`` and ``tgt_embed`` (``nn.Embedding``, one object when
    ``share_embeddings``), ``positional`` (``SinusoidalPositionalEncoding``, or None with
    ``positional="rope"``), ``rotary`` (``RotaryEmbedding`` or None), ``dropout``,
    ``encoder_layers`` / ``decoder_layers`` (``nn.ModuleList`` of labkit ``EncoderLayer`` /
    ``DecoderLayer``), ``encoder_norm`` / ``decoder_norm`` (``LayerNorm``, or None for
    post-LN) and ``lm_head`` (``nn.Linear`` D -> V, tied to ``tgt_embed`` when shared).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed_scale = math.sqrt(c.d_model)
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
        if c.share_embeddings:  # equal vocabulary sizes, checked by the config
            self.tgt_embed = self.src_embed
        else:
            self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)
        rope = c.positional == "rope"
        self.positional = (
            None if rope else SinusoidalPositionalEncoding(c.d_model, max_len=c.max_len)
        )
        self.rotary = RotaryEmbedding(c.d_model // c.n_heads) if rope else None
        self.dropout = nn.Dropout(c.dropout)
        layer_args = dict(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            activation=c.activation, norm_first=c.norm_first,
        )  # fmt: skip
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(**layer_args) for _ in range(c.n_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(**layer_args) for _ in range(c.n_decoder_layers)
        )
        self.encoder_norm = LayerNorm(c.d_model) if c.norm_first else None
        self.decoder_norm = LayerNorm(c.d_model) if c.norm_first else None
        self.lm_head = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        if c.share_embeddings:
            self.lm_head.weight = self.tgt_embed.weight
        for p in self.parameters():  # shared matrices are listed (and initialised) once
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    config_class = TransformerConfig

    def new_cache(self) -> EncoderDecoderCache:
        """An empty cache for decoding one target token (or a few) at a time."""
        return EncoderDecoderCache.empty(self.config.n_decoder_layers)

    def _embed(self, embedding: nn.Embedding, ids: Tensor, positions: Tensor) -> Tensor:
        """ids (B, T), positions (T,) or (B, T) -> dropout(embedding * sqrt(D) + PE), (B, T, D);
        no PE with rotary embeddings (they act inside attention)."""
        x = embedding(ids) * self.embed_scale  # (B, T, D)
        if self.positional is not None:
            x = x + self.positional.pe[positions].to(x.dtype)  # PE (T, D) or (B, T, D)
        return self.dropout(x)

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Source ids (B, S) -> memory (B, S, D); ``src_mask`` (B, S) is 1 = real / 0 = pad.

        Memory rows at padded positions are computed but never read by the decoder.
        ``encoder_output`` also returns the encoder's attention weights and hidden states.
        """
        return self.encoder_output(src_ids, src_mask).memory

    def encoder_output(
        self,
        src_ids: Tensor,
        src_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """``EncoderOutput(memory, attentions, hidden_states)`` of source ids (B, S): the
        memory ``encode`` returns, plus each encoder layer's self-attention weights
        (``need_weights``) and hidden states (``output_hidden_states``)."""
        c = self.config
        check_input_ids(
            src_ids, c.src_vocab_size, c.max_len, name="src_ids", vocab_name="src_vocab_size"
        )
        batch, src_len = src_ids.shape
        if src_mask is None:
            positions, attn_mask = default_positions(0, src_len, src_ids.device), None
        else:
            _check_mask("src_mask", src_mask, batch, src_len)
            positions = positions_from_mask(src_mask, src_len)  # (B, S)
            attn_mask = key_padding_mask(src_mask, src_len)  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src_ids, positions)  # (B, S, D)
        stack = run_layers(
            self.encoder_layers, x,
            lambda i, layer, h: layer(
                h, attn_mask, need_weights=need_weights, rotary=self.rotary,
                positions=positions if self.rotary is not None else None,
            ),
            need_weights=need_weights, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        x = stack.hidden
        memory = x if self.encoder_norm is None else self.encoder_norm(x)
        return EncoderOutput(memory, stack.attentions, stack.hidden_states)  # (B, H, S, S) maps

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        need_weights: bool = False,
        output_hidden_states: bool = False,
    ) -> Seq2SeqOutput:
        """Next-token logits for target ids (B, T) given the encoder ``memory`` (B, S, D).

        Args:
            tgt_ids: (B, T) target ids, starting with ``bos_id`` (teacher forcing: the
                target shifted right); T = 1 per step when decoding with a cache.
            memory: (B, S, D) from ``encode``. With a cache it is projected on the first call
                only; later calls still pass it (its shape is checked).
            src_mask: (B, S) 1 = real / 0 = pad, the mask given to ``encode``.
            tgt_mask: (B, past + T) 1 = real / 0 = pad over the cached and new targets.
            cache: from ``new_cache()``; grows by T positions per call, in place.
            need_weights: also return every layer's self- and cross-attention weights.
            output_hidden_states: also return the stream entering each decoder layer and the
                last one's output (``decoder_hidden_states``).

        Returns:
            Seq2SeqOutput(logits (B, T, V), self_attentions, cross_attentions,
            decoder_hidden_states).
        """
        c = self.config
        if cache is not None and (
            not isinstance(cache, EncoderDecoderCache) or len(cache.layers) != c.n_decoder_layers
        ):
            raise ValueError(
                f"cache must be an EncoderDecoderCache with {c.n_decoder_layers} layers (use "
                f"model.new_cache()), got {cache!r:.80}"
            )
        past = 0 if cache is None else cache.seq_len
        check_input_ids(
            tgt_ids,
            c.tgt_vocab_size,
            c.max_len,
            past=past,
            name="tgt_ids",
            vocab_name="tgt_vocab_size",
        )
        batch, tgt_len = tgt_ids.shape
        if memory.dim() != 3 or memory.shape[0] != batch or memory.shape[2] != c.d_model:
            raise ValueError(
                f"memory must be (batch={batch}, src_len, d_model={c.d_model}), got "
                f"{tuple(memory.shape)}"
            )

        memory_mask = None
        if src_mask is not None:
            _check_mask("src_mask", src_mask, batch, memory.shape[1])
            memory_mask = key_padding_mask(src_mask, memory.shape[1])  # (B, 1, 1, S)
        if tgt_mask is None:
            positions, self_mask = default_positions(past, tgt_len, tgt_ids.device), None
        else:
            _check_mask("tgt_mask", tgt_mask, batch, past + tgt_len)
            positions = positions_from_mask(tgt_mask, tgt_len)  # (B, T)
            self_mask = key_padding_mask(tgt_mask, past + tgt_len)  # (B, 1, 1, past + T)

        x = self._embed(self.tgt_embed, tgt_ids, positions)  # (B, T, D)
        stack = run_layers(
            self.decoder_layers, x,
            lambda i, layer, h: layer(
                h, memory, self_mask=self_mask, memory_mask=memory_mask, is_causal=True,
                need_weights=need_weights, cache=None if cache is None else cache.layers[i],
                rotary=self.rotary, positions=positions if self.rotary is not None else None,
            ),
            need_weights=need_weights, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        x = stack.hidden
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        return Seq2SeqOutput(logits, stack.attentions, stack.cross_attentions, stack.hidden_states)

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> Seq2SeqOutput:
        """Teacher-forced pass: ``decode(tgt_ids, encode(src_ids, src_mask), ...)``.

        ``need_weights`` (or ``output_attentions``) returns the encoder's self-attention, the
        decoder's self- and cross-attention weights of every layer; ``output_hidden_states``
        the encoder's and the decoder's per-layer hidden states (see ``Seq2SeqOutput``).
        """
        need_weights = need_weights or output_attentions
        encoded = self.encoder_output(
            src_ids, src_mask, need_weights=need_weights, output_hidden_states=output_hidden_states
        )
        out = self.decode(
            tgt_ids, encoded.memory, src_mask=src_mask, tgt_mask=tgt_mask,
            need_weights=need_weights, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        return out._replace(
            encoder_attentions=encoded.attentions, encoder_hidden_states=encoded.hidden_states
        )

    def _hook_blocks(self) -> list[tuple[str, nn.Module]]:
        encoder = [(f"encoder.blocks.{i}", layer) for i, layer in enumerate(self.encoder_layers)]
        decoder = [(f"decoder.blocks.{i}", layer) for i, layer in enumerate(self.decoder_layers)]
        return encoder + decoder
