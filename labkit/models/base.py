"""What every labkit model shares: named outputs, input checks, the model and config base.

Decoder-only models (``GPT``, ``Llama``) are called as
``model(input_ids, attention_mask=..., cache=...)`` and return a ``CausalLMOutput``; the
encoder-decoder ``Transformer`` has ``encode`` / ``decode``. ``labkit.generation`` needs
nothing else.

Conventions (the same as Hugging Face, so ids and masks carry over unchanged):

* ``input_ids`` (B, T) int64 token ids.
* ``attention_mask`` (B, past + T) of 1/True for real tokens, 0/False for padding, covering
  the cached positions and the new ones (left padding for batched generation).
* ``cache``: ``model.new_cache()`` (a ``ModelCache`` that grows), or
  ``model.new_cache(batch, max_len)`` (a pre-allocated ``StaticCache``, written in place;
  ``causal_lm_inputs`` then builds the mask and positions from it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from labkit.nn.cache import ModelCache, StaticCache


class CausalLMOutput(NamedTuple):
    """What a decoder-only model returns.

    logits: (B, T, vocab) next-token scores for every position.
    hidden: (B, T, D) the final hidden states (after the final norm).
    attentions: one (B, H, T, past + T) weight tensor per layer when ``need_weights=True``
        (or ``output_attentions=True``), else None.
    hidden_states: with ``output_hidden_states=True``, n_layers + 1 tensors (B, T, D): the
        residual stream entering each layer, then the last layer's output (before the final
        norm); else None.
    """

    logits: Tensor
    hidden: Tensor
    attentions: list[Tensor] | None
    hidden_states: list[Tensor] | None = None


def check_input_ids(
    input_ids: Tensor,
    vocab_size: int,
    max_len: int | None = None,
    *,
    past: int = 0,
    name: str = "input_ids",
    vocab_name: str = "vocab_size",
) -> None:
    """The input checks of every labkit model, one message format for all of them.

    Raise ``ValueError`` unless ``input_ids`` is a non-empty integer (B, T) tensor of ids in
    [0, ``vocab_size``) whose ``past + T`` positions (``past`` tokens already cached) fit in
    ``max_len``. Each message names the argument, its shape or values, and what to do;
    ``name`` / ``vocab_name`` are how the caller calls them (e.g. ``src_ids``,
    ``src_vocab_size``).
    """
    shape = tuple(input_ids.shape)
    dtype = input_ids.dtype
    if input_ids.dim() != 2 or dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise ValueError(
            f"{name} must be an integer tensor (batch, seq), got shape {shape} and dtype "
            f"{dtype}; give token ids from a tokenizer (ids[None] adds the batch dimension to "
            "one sequence, .long() converts other dtypes)"
        )
    if input_ids.numel() == 0:
        raise ValueError(
            f"{name} of shape {shape} is empty; give at least one sequence of at least one token"
        )
    if torch.compiler.is_compiling():
        return  # the checks below read values on the host: a compiled step feeds back its own ids
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name} must lie in [0, {vocab_name}={vocab_size}), got values in [{low}, {high}]; "
            "encode the text with the tokenizer the model was built for"
        )
    if max_len is not None and past + shape[1] > max_len:
        cached = f" after {past} cached tokens" if past else ""
        raise ValueError(
            f"{name} of shape {shape}{cached} needs {past + shape[1]} positions, more than "
            f"max_len={max_len}; keep at most the last {max(max_len - past, 0)} tokens"
            + (" or start a new cache" if past else "")
        )


def check_positions(positions: Tensor, batch: int, seq: int, max_len: int) -> None:
    """Raise ``ValueError`` unless explicit ``positions`` are integer (T,) or (B, T) in
    [0, max_len): the same check for every model that takes them."""
    if positions.shape not in ((seq,), (batch, seq)) or positions.is_floating_point():
        raise ValueError(
            f"positions must be integer ({seq},) or ({batch}, {seq}) for input_ids of shape "
            f"({batch}, {seq}), got shape {tuple(positions.shape)} and dtype {positions.dtype}"
        )
    if positions.numel() and (positions.min() < 0 or positions.max() >= max_len):
        raise ValueError(
            f"positions must lie in [0, max_len={max_len}), got values in "
            f"[{int(positions.min())}, {int(positions.max())}]; count positions from 0"
        )


class CausalInputs(NamedTuple):
    """What a decoder-only model's forward starts from (``causal_lm_inputs``).

    With a ``StaticCache``, ``mask`` is (B, 1, T, L), causal and padding in one (attention
    runs with ``is_causal=False``), and ``new_real`` (B, T) bool marks the new real tokens: the
    forward passes it to ``cache.advance`` after its layers. Otherwise ``new_real`` is None.
    """

    past: int  # tokens already in the cache (0 inside a compiled step on a static cache)
    mask: Tensor | None  # (B, 1, 1, past + T) bool, True = real key; None = no padding
    positions: Tensor  # (T,) or (B, T) position of each new token
    new_real: Tensor | None = None


def causal_lm_inputs(
    config: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor | None,
    cache: Any,
) -> CausalInputs:
    """Check a decoder-only model's inputs and derive its key mask and positions.

    config: has ``vocab_size``, ``max_len`` and ``n_layers``. ``attention_mask`` (B, past + T)
    covers the cached and the new tokens; a mask without padding becomes None, so attention
    takes its fast path. Positions default to counting the real tokens of ``attention_mask``
    (left padding), else ``past, past + 1, ...``.
    """
    if cache is not None and len(cache.layers) != config.n_layers:
        raise ValueError(
            f"cache has {len(cache.layers)} layers, the model has n_layers={config.n_layers}: "
            "create it with model.new_cache()"
        )
    if isinstance(cache, StaticCache):
        return _static_cache_inputs(config, input_ids, attention_mask, positions, cache)
    past = 0 if cache is None else cache.seq_len
    check_input_ids(input_ids, config.vocab_size, config.max_len, past=past)
    batch, seq = input_ids.shape
    mask = None
    if attention_mask is not None:
        if attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"attention_mask must be (batch, past + seq) = ({batch}, {past + seq}) for "
                f"input_ids {tuple(input_ids.shape)} and {past} cached tokens, got "
                f"{tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(input_ids.device)
        mask = key_padding_mask(attention_mask, past + seq)
        if bool(mask.all()):
            mask = None
    if positions is None:
        if attention_mask is not None:
            positions = positions_from_mask(attention_mask, seq)  # (B, T)
        else:
            positions = default_positions(past, seq, input_ids.device)  # (T,)
    else:
        check_positions(positions, batch, seq, config.max_len)
    return CausalInputs(past, mask, positions.to(input_ids.device))


def _static_cache_inputs(
    config: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor | None,
    cache: StaticCache,
) -> CausalInputs:
    """``causal_lm_inputs`` for a ``StaticCache``: only the last T columns of
    ``attention_mask`` are read (the cache remembers the past ones; None = no padding), and
    positions count each row's real tokens in the cache. Inside ``torch.compile`` the checks
    that need values on the host are skipped."""
    compiling = torch.compiler.is_compiling()
    past = 0 if compiling else cache.seq_len
    check_input_ids(input_ids, config.vocab_size)  # the cache checks its length (prepare)
    batch, seq = input_ids.shape
    if attention_mask is None:
        new_real = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
    else:
        if not compiling and attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"attention_mask must be (batch, past + seq) = ({batch}, {past + seq}) for "
                f"input_ids {tuple(input_ids.shape)} and {past} cached tokens, got "
                f"{tuple(attention_mask.shape)}"
            )
        new_real = attention_mask[:, -seq:].to(input_ids.device).bool()
    mask, cache_positions = cache.prepare(new_real)  # (B, 1, T, L), (B, T)
    if positions is None:
        positions = cache_positions
    elif not compiling:
        check_positions(positions, batch, seq, config.max_len)
    return CausalInputs(past, mask, positions.to(input_ids.device), new_real)


def new_decoder_cache(
    model: nn.Module,
    n_kv_heads: int,
    batch: int | None,
    max_len: int | None,
    dtype: torch.dtype | None,
) -> ModelCache | StaticCache:
    """A decoder-only model's ``new_cache``: a growing ``ModelCache`` when ``batch`` and
    ``max_len`` are None, else a ``StaticCache`` of ``batch`` rows and ``max_len`` columns in
    ``dtype`` (default: the dtype of the model's final norm, i.e. of its activations)."""
    c = model.config
    if batch is None and max_len is None:
        return ModelCache.empty(c.n_layers)
    if batch is None or max_len is None:
        raise ValueError(
            f"a static cache needs both batch and max_len, got batch={batch}, max_len={max_len}"
        )
    if max_len > c.max_len:
        raise ValueError(
            f"a static cache of max_len={max_len} exceeds the model's max_len={c.max_len}"
        )
    weight = model.norm.weight
    return StaticCache(
        c.n_layers, batch, max_len, n_kv_heads, c.d_model // c.n_heads,
        dtype=weight.dtype if dtype is None else dtype, device=weight.device,
    )  # fmt: skip


def last_positions(hidden: Tensor, logits_to_keep: int) -> Tensor:
    """(B, T, D) -> its last ``logits_to_keep`` positions (B, min(logits_to_keep, T), D);
    0 keeps all T. What a decoder feeds its LM head (``forward(..., logits_to_keep=...)``)."""
    if logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0: every position), got {logits_to_keep}")
    return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]


def key_padding_mask(attention_mask: Tensor, k_len: int) -> Tensor:
    """(B, k_len) 1/0 mask -> bool (B, 1, 1, k_len), True = may attend; checks its length."""
    if attention_mask.dim() != 2 or attention_mask.shape[1] != k_len:
        raise ValueError(
            f"attention_mask must be (batch, past + seq) = (batch, {k_len}), got "
            f"{tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()[:, None, None, :]


def positions_from_mask(attention_mask: Tensor, q_len: int) -> Tensor:
    """Positions (B, q_len) of the last q_len tokens, counting only real tokens.

    With left padding a sequence's first real token gets position 0 whatever its column;
    pads get position 0 too (their output is never used).
    """
    positions = attention_mask.long().cumsum(-1) - 1  # (B, k_len)
    return positions.clamp(min=0)[:, -q_len:]


def default_positions(past: int, q_len: int, device: torch.device) -> Tensor:
    """Positions (q_len,) = past, past + 1, ... for unpadded input."""
    return torch.arange(past, past + q_len, device=device)


class ModelConfig:
    """What every model config dataclass shares: named presets and the checks of its fields.

    A config class names its preset table in ``_preset_table()`` and calls the ``_check_*``
    helpers from ``__post_init__``, so every model rejects a bad config the same way.
    """

    preset_label: ClassVar[str] = ""  # "GPT" -> "unknown GPT preset 'huge'"

    @classmethod
    def _preset_table(cls) -> Mapping[str, Any]:
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any:
        """A named configuration, with any field overridden by keyword, e.g.
        ``GPTConfig.preset("tiny", vocab_size=65)``."""
        table = cls._preset_table()
        if name not in table:
            kind = f"{cls.preset_label} " if cls.preset_label else ""
            raise ValueError(f"unknown {kind}preset {name!r}, expected one of {sorted(table)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} fields {unknown}, expected some of {sorted(known)}"
            )
        base = table[name]
        base = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base)
        return cls(**{**base, **overrides})

    def _check_sizes(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {name}={value}")

    def _check_heads(self, n_heads: int) -> None:
        d_model = self.d_model
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")

    def _check_dropout(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def _check_token_ids(self, vocab_field: str, names: Iterable[str], what: str = "token") -> None:
        vocab = getattr(self, vocab_field)
        for name in names:
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab:
                raise ValueError(
                    f"{name}={value} is outside the vocabulary ({name}={value} must be a {what} "
                    f"id in [0, {vocab_field}={vocab}))"
                )


class HookedModel:
    """What every labkit model shares: parameter counting and what looks inside it, named hook
    points, the activation cache and hooks that read or patch activations (see
    ``labkit.interp.activations``).

    A model lists its layer stacks in ``_hook_blocks()`` as ``(prefix, layer)`` pairs; by
    default ``("blocks.i", self.layers[i])`` (GPT, Llama, BERT), the rest is shared.
    """

    def _hook_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", layer) for i, layer in enumerate(self.layers)]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, each counted once (tied weights too, as ``transformers``
        counts them); ``exclude_embeddings`` leaves out every embedding table (tokens,
        positions, token types), and with them a language-model head tied to the tokens'."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        params = {id(p): p for p in self.parameters() if id(p) not in skip}
        return sum(p.numel() for p in params.values())

    def hook_points(self) -> dict[str, nn.Module]:
        """``{name: HookPoint}`` in forward order, e.g. ``"blocks.3.attn.pattern"``."""
        from labkit.interp.activations import layer_hook_points

        points: dict[str, nn.Module] = {}
        for prefix, layer in self._hook_blocks():
            points |= layer_hook_points(prefix, layer)
        return points

    def run_with_cache(
        self,
        *args: Any,
        names: str | Iterable[str] | Callable[[str], bool] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``(output, cache)``: the usual output of ``self(*args, **kwargs)`` and an
        ``ActivationCache`` of every hook point (or of those ``names`` selects)."""
        from labkit.interp.activations import run_with_cache

        return run_with_cache(self, *args, names=names, **kwargs)

    @contextmanager
    def hooks(
        self, fwd_hooks: Mapping[str, Callable] | Iterable[tuple[str, Callable]]
    ) -> Iterator[Any]:
        """``with model.hooks({name: fn}):`` runs ``fn(activation, name)`` at each named point
        inside the block; a returned tensor replaces the activation."""
        from labkit.interp.activations import hooks

        with hooks(self, fwd_hooks):
            yield self


class PresetModel(HookedModel):
    """A model built from one config dataclass (``config_class``): ``from_config`` and
    ``from_preset`` as well as what ``HookedModel`` gives."""

    config_class: ClassVar[type]

    @classmethod
    def from_config(cls, config: Any) -> Any:
        """A freshly initialised model, the same as ``cls(config)``."""
        return cls(config)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Any:
        """A freshly initialised model of a named size, e.g. ``GPT.from_preset("tiny")``."""
        return cls(cls.config_class.preset(name, **overrides))


class StackOutput(NamedTuple):
    """What ``run_layers`` returns: the last hidden state (B, T, D) and, when asked for, one
    self-attention and one cross-attention weight tensor per layer and the n_layers + 1 hidden
    states (the stream entering each layer, then the last layer's output)."""

    hidden: Tensor
    attentions: list[Tensor] | None
    cross_attentions: list[Tensor] | None
    hidden_states: list[Tensor] | None


def run_layers(
    layers: Iterable[nn.Module],
    x: Tensor,
    call: Callable[[int, nn.Module, Tensor], Any],
    *,
    need_weights: bool,
    output_hidden_states: bool,
) -> StackOutput:
    """Run ``x`` through a stack of layers, ``out = call(i, layer, x)`` returning a
    ``LayerOutput``, and collect what every model can return per layer."""
    attentions = [] if need_weights else None
    cross = [] if need_weights else None
    hidden_states = [] if output_hidden_states else None
    for i, layer in enumerate(layers):
        if hidden_states is not None:
            hidden_states.append(x)
        out = call(i, layer, x)
        x = out.hidden
        if attentions is not None:
            attentions.append(out.self_weights)
            cross.append(out.cross_weights)
    if hidden_states is not None:
        hidden_states.append(x)
    return StackOutput(x, attentions, cross, hidden_states)


Source = str | tuple[str, Callable[[Tensor], Tensor]]


def copy_weights(
    model: nn.Module,
    theirs: Mapping[str, Tensor],
    sources: Mapping[str, Source],
    *,
    keep: Iterable[str] = (),
    checkpoint: str = "the checkpoint",
    hint: str = "",
) -> None:
    """Fill ``model``'s parameters from another model's tensors, by name; the one routine every
    ``from_hf`` uses.

    theirs: the other model's tensors by name (e.g. ``dict(hf_model.named_parameters())``).
    sources: ``{labkit parameter name: their name}``, or ``(their name, conversion)`` where the
        tensor needs reshaping first (GPT-2's transposed Conv1D weights, its packed q/k/v).
    keep: labkit parameters that keep their values (e.g. a pooler the checkpoint lacks).
    checkpoint, hint: how the error names the source, and advice it ends with.

    Every problem is found before anything is copied and reported at once, by name: labkit
    parameters no source fills, source names ``theirs`` lacks (missing), tensors of ``theirs``
    no labkit parameter takes (unexpected) and shapes that differ after conversion. The model
    is moved to the device and dtype of ``theirs``.
    """
    ours = dict(model.named_parameters())  # a tied parameter is listed once
    unfilled = sorted(set(ours) - set(sources) - set(keep))
    unknown = sorted(set(sources) - set(ours))
    pairs = {ours_name: (src, None) if isinstance(src, str) else src
             for ours_name, src in sources.items()}  # fmt: skip
    missing = sorted({name for name, _ in pairs.values() if name not in theirs})
    unexpected = sorted(set(theirs) - {name for name, _ in pairs.values()})
    converted, misshaped = {}, []
    for our_name, (their_name, convert) in pairs.items():
        if their_name in missing or our_name in unknown:
            continue
        value = theirs[their_name] if convert is None else convert(theirs[their_name])
        if value.shape != ours[our_name].shape:
            converted_note = " (converted)" if convert is not None else ""
            misshaped.append(
                f"{our_name}: {checkpoint} {their_name}{converted_note} is "
                f"{tuple(value.shape)}, labkit {our_name} is {tuple(ours[our_name].shape)}"
            )
        converted[our_name] = value
    problems = [
        (f"labkit parameters with no source {unfilled}" if unfilled else ""),
        (f"sources for parameters labkit does not have {unknown}" if unknown else ""),
        (f"missing from {checkpoint}: {missing}" if missing else ""),
        (f"unexpected in {checkpoint}: {unexpected}" if unexpected else ""),
        ("shapes differ: " + "; ".join(misshaped) if misshaped else ""),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(
            f"cannot copy {checkpoint} into labkit's {type(model).__name__}: "
            + "; ".join(problems)
            + (f" ({hint})" if hint else "")
        )
    first = next(iter(theirs.values()), None)
    if first is not None:
        model.to(device=first.device, dtype=first.dtype)
    with torch.no_grad():
        for our_name, value in converted.items():
            ours[our_name].copy_(value)
