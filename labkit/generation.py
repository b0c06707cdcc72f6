"""Text generation: greedy, sampling (temperature, top-k, nucleus) and beam search, with a KV cache.

A language model gives next-token logits; a *decoding strategy* turns them into text, one token
per step:

* **greedy**: take the most likely token (``argmax``);
* **sampling**: draw from ``softmax(logits / temperature)``, optionally restricted to the
  ``top_k`` most likely tokens or to the smallest set whose probability reaches ``top_p``
  (nucleus sampling); a ``seed`` makes the draws reproducible;
* **beam search**: keep the ``num_beams`` partial sequences with the highest total
  log-probability and return the best finished one, its score length-normalised as
  ``sum_logprob / len**length_penalty``.

Before choosing, the *logits processors* below reshape the scores: a repetition penalty
(CTRL / Hugging Face semantics) and, until ``min_new_tokens`` are out, a ban on end-of-sequence.
Each one is a small pure function on a ``(B, V)`` tensor, so a notebook can call and plot it alone.

``generate(model, prompts, ...)`` works with every labkit model:

* decoder-only (``GPT``, ``Llama``): a batch of prompts is **left-padded** so every row's next
  token lands in the last column; the prompt is run once (prefill) and each new token is fed alone
  while the KV cache keeps the past (``use_cache=False`` recomputes the whole sequence each step,
  same tokens, much slower: that is what the cache saves). ``static_cache=True`` pre-allocates
  the cache for prompt + ``max_new_tokens`` and writes it in place (same tokens, fixed shapes:
  what ``torch.compile`` and ``labkit.inference.FastLM`` need). With a cache the model is
  asked for the logits it will use only (``logits_to_keep``: the last position's, 1 + k for a
  speculative check), so the prompt's other positions skip the LM head, the largest matrix;
* encoder-decoder (``Transformer``): the source is encoded once and the decoder starts from
  ``decoder_start_id``, with an ``EncoderDecoderCache``.

A row that produced ``eos_id`` (or whose text reached one of ``stop_strings``) is finished: it gets
``pad_id`` from then on, and generation stops early once every row is finished.
``stream(...)`` yields the text of one prompt piece by piece while it is generated.

**Speculative decoding** (``speculative="prompt-lookup"``, greedy, one prompt): each step
drafts up to ``draft_tokens`` tokens by copying what followed the last n-gram's earlier
occurrence (``prompt_lookup_draft``), and one forward pass over the draft gives the greedy
token at every draft position; the tokens that agree are kept, plus the model's own next one.
The output is exactly greedy decoding's, in fewer forward passes when the text repeats its
context (``GenerationOutput.speculative`` counts proposed and accepted drafts). With
``speculative="draft-model"`` and ``draft_model=`` a cheaper decoder over the same vocabulary
(e.g. an int4 copy of the model, ``labkit.inference.FastLM``) drafts instead, greedily, one
token at a time: any text, not only text that repeats itself, and still exactly the tokens of
the model's own greedy decoding (Leviathan et al. 2023, Chen et al. 2023, greedy case).

Shapes: B batch, T prompt length, V vocabulary, K beams, n generated tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from labkit.device import model_device
from labkit.models.base import check_input_ids
from labkit.nn.masks import pad_sequences

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode (frozen: derive variants with ``replace`` or ``generate(..., **overrides)``).

    ``None`` ids are taken from ``model.config`` when generating.

    max_new_tokens / min_new_tokens: bounds on the generated length (eos is banned before the min).
    do_sample: sample instead of greedy; temperature, top_k and top_p only act when sampling.
    repetition_penalty: > 1 discourages tokens already in the sequence (prompt included).
    num_beams / length_penalty: beam search when num_beams > 1 (deterministic, no sampling).
    eos_id: one id or several; None -> ``model.config.eos_id``; () or None there: no eos.
    pad_id: fills finished rows and left padding; None -> ``model.config.pad_id``, else eos, else 0.
    stop_strings: stop a row once its decoded text contains one of them (needs a tokenizer).
    seed: seeds a private ``torch.Generator`` for sampling (None: the global random state).
    use_cache: reuse past keys/values (True) or recompute the whole sequence every step.
    decoder_start_id: first decoder token of an encoder-decoder; None -> ``model.config.bos_id``.
    static_cache: decoder-only models: a pre-allocated ``StaticCache`` of prompt +
        ``max_new_tokens`` columns instead of a growing one (same tokens; fixed shapes for
        ``torch.compile``, see ``labkit.inference.FastLM``).
    speculative: ``"none"`` or ``"prompt-lookup"``: greedy decoding that drafts up to
        ``draft_tokens`` tokens by finding the last ``ngram_size`` (or fewer) tokens earlier
        in the sequence and copying what followed, then checks the draft in one forward pass
        (``prompt_lookup_draft``). The tokens are those of plain greedy decoding; batch 1.
        ``"draft-model"``: the same, drafts from ``generate(..., draft_model=...)``.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_id: int | tuple[int, ...] | None = None
    pad_id: int | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    use_cache: bool = True
    decoder_start_id: int | None = None
    static_cache: bool = False
    speculative: str = "none"
    draft_tokens: int = 8
    ngram_size: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.eos_id, list):  # accept a list, store a (hashable) tuple
            object.__setattr__(self, "eos_id", tuple(self.eos_id))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        else:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature} "
                "(for deterministic output use do_sample=False, i.e. greedy decoding)"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(
                f"beam search with sampling is not supported: got num_beams={self.num_beams} "
                "and do_sample=True; use one or the other"
            )
        if self.num_beams > 1 and self.stop_strings:
            raise ValueError(
                f"stop_strings work with greedy decoding and sampling, not beam search "
                f"(num_beams={self.num_beams}); use eos_id to end beams"
            )
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.static_cache and not self.use_cache:
            raise ValueError("static_cache=True needs use_cache=True (it is a KV cache)")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {SPECULATIVE}, got {self.speculative!r}")
        if self.speculative != "none" and (self.do_sample or self.num_beams > 1):
            raise ValueError(
                f"speculative={self.speculative!r} keeps greedy decoding's tokens, so it needs "
                f"do_sample=False and num_beams=1 (got do_sample={self.do_sample}, "
                f"num_beams={self.num_beams})"
            )
        if self.draft_tokens < 1 or self.ngram_size < 1:
            raise ValueError(
                f"draft_tokens and ngram_size must be >= 1, got draft_tokens={self.draft_tokens}"
                f", ngram_size={self.ngram_size}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GenerationConfig:
        """A named strategy (``"greedy"``, ``"sampling"``, ``"top-k"``, ``"nucleus"``,
        ``"beam"``), with any field overridden, e.g. ``preset("nucleus", top_p=0.95)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name]).replace(**overrides)

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A copy with some fields replaced (validated again); the config itself is frozen."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"unknown GenerationConfig field(s) {unknown}; fields: {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)


SPECULATIVE = ("none", "prompt-lookup", "draft-model")

PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sampling": {"do_sample": True},
    "top-k": {"do_sample": True, "top_k": 50, "temperature": 0.7},
    "nucleus": {"do_sample": True, "top_p": 0.9, "temperature": 0.7},
    "beam": {"num_beams": 4},
}


# ----------------------------------------------------------------------------------------------
# Logits processors: pure functions (B, V) -> (B, V)
# ----------------------------------------------------------------------------------------------


def apply_repetition_penalty(
    logits: Tensor, generated_ids: Tensor, penalty: float, mask: Tensor | None = None
) -> Tensor:
    """Penalise every token already present in ``generated_ids`` (CTRL, Keskar et al. 2019).

    A present token's logit is divided by ``penalty`` if positive and multiplied by it if
    negative, so ``penalty > 1`` always makes it less likely (whatever its sign).

    logits: (B, V). generated_ids: (B, T) ids seen so far. mask: optional (B, T), 0 where
    ``generated_ids`` holds padding that must not count. Returns a new (B, V) tensor.
    """
    if penalty <= 0:
        raise ValueError(f"penalty must be > 0, got {penalty}")
    if logits.dim() != 2 or generated_ids.dim() != 2 or logits.shape[0] != generated_ids.shape[0]:
        raise ValueError(
            f"logits must be (batch, vocab) and generated_ids (batch, seq) with the same batch, "
            f"got {tuple(logits.shape)} and {tuple(generated_ids.shape)}"
        )
    if mask is not None and mask.shape != generated_ids.shape:
        raise ValueError(
            f"mask must match generated_ids {tuple(generated_ids.shape)}, got {tuple(mask.shape)}"
        )
    weight = torch.ones_like(generated_ids, dtype=logits.dtype) if mask is None else mask
    counts = torch.zeros_like(logits).scatter_add_(1, generated_ids, weight.to(logits.dtype))
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(counts > 0, penalised, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``: < 1 sharpens the distribution, > 1 flattens it. (..., V)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest logits of each row (ties with the k-th included), -inf elsewhere."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability is >= p.

    A token is kept when the tokens ranked above it hold less than ``p`` of the probability, so
    the most likely token always survives. Others get -inf. (..., V).
    """
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # probability of the strictly higher-ranked tokens
    drop = (mass_above >= p).scatter(-1, order, mass_above >= p)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def suppress_eos(logits: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """Set the end-of-sequence logits to -inf (used until ``min_new_tokens`` are generated).

    (..., V) -> (..., V).
    """
    if not eos_ids:
        return logits
    index = torch.tensor(list(eos_ids), device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


def process_logits(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor | None,
    config: GenerationConfig,
    step: int,
    eos_ids: Sequence[int],
) -> Tensor:
    """All processors in Hugging Face's order: repetition penalty, eos ban (before
    ``min_new_tokens``), then, when sampling only, temperature, top-k and top-p.

    logits: (B, V) for the next token; tokens: (B, L) the sequence so far; mask: (B, L) or None;
    step: how many tokens were generated already.
    """
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, tokens, config.repetition_penalty, mask)
    if step < config.min_new_tokens:
        logits = suppress_eos(logits, eos_ids)
    if config.do_sample:
        logits = apply_temperature(logits, config.temperature)
        if config.top_k is not None:
            logits = top_k_filter(logits, config.top_k)
        if config.top_p is not None:
            logits = top_p_filter(logits, config.top_p)
    return logits


# ----------------------------------------------------------------------------------------------
# The model side: sequences so far and next-token logits
# ----------------------------------------------------------------------------------------------


class _Sequences:
    """The sequences being generated and the model state behind them.

    tokens: (B, L) the prompt (decoder-only) or the start token (encoder-decoder), plus
    everything generated. With a cache, ``next_logits`` feeds the model only the tokens the
    cache has not seen (the whole prompt at first, then one token per step); without one, the
    whole sequence every time.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Tensor,
        config: GenerationConfig,
        mask: Tensor | None = None,
        memory: Tensor | None = None,
        src_mask: Tensor | None = None,
    ) -> None:
        self.model = model
        self.tokens = tokens  # (B, L)
        self.mask = mask  # (B, L) decoder-only attention mask, None for encoder-decoder
        self.memory = memory  # (B, S, D) encoder output, None for decoder-only
        self.src_mask = src_mask  # (B, S) or None
        self.n_prompt = tokens.shape[1]
        self.cache = None
        if config.static_cache:  # the most positions the model will see (``_check_length``)
            length = self.n_prompt + config.max_new_tokens - 1
            self.cache = model.new_cache(batch=tokens.shape[0], max_len=length)
        elif config.use_cache:
            self.cache = model.new_cache()

    def next_logits(self, draft: Tensor | None = None) -> Tensor:
        """(B, V) float32 logits for the token after ``tokens``.

        With ``draft`` (B, k) tokens fed after ``tokens``: (B, k + 1, V), the logits after
        the last token and after each draft token; the cache then holds the draft too (roll
        it back with ``keep_cached``).
        """
        seen = 0 if self.cache is None else self.cache.seq_len
        ids = self.tokens[:, seen:]  # (B, L - seen)
        mask = self.mask
        if draft is not None:
            ids = torch.cat([ids, draft], dim=1)
            mask = torch.cat([mask, torch.ones_like(draft)], dim=1)
        keep = 1 if draft is None else 1 + draft.shape[1]  # the logits used: the last ones
        if self.memory is None and self.cache is not None:  # a labkit decoder: keep only those
            out = self.model(ids, attention_mask=mask, cache=self.cache, logits_to_keep=keep)
        elif self.memory is None:
            out = self.model(ids, attention_mask=mask, cache=self.cache)
        else:
            out = self.model.decode(ids, self.memory, src_mask=self.src_mask, cache=self.cache)
        if draft is None:
            return out.logits[:, -1].float()
        return out.logits[:, -keep:].float()

    def keep_cached(self, length: int) -> None:
        """Roll the cache back to its first ``length`` positions (drop rejected drafts)."""
        if self.cache is not None:
            self.cache.truncate(length)

    def append(self, new: Tensor) -> None:
        """Add one (B,) column of tokens; the attention mask grows by a column of ones."""
        self.tokens = torch.cat([self.tokens, new[:, None]], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (B,) of everything, e.g. the surviving beams."""
        self.tokens = self.tokens.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
            if self.src_mask is not None:
                self.src_mask = self.src_mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def generated(self, row: int) -> list[int]:
        """The tokens generated so far for one row."""
        return self.tokens[row, self.n_prompt :].tolist()


class _Special(NamedTuple):
    """Special ids for one call, after falling back to the model's config."""

    eos_ids: tuple[int, ...]
    pad_id: int
    start_id: int | None


def _vocab_sizes(model: nn.Module) -> tuple[int, int]:
    """(input, output) vocabulary sizes: ``vocab_size`` twice, or an encoder-decoder's
    ``src_vocab_size`` and ``tgt_vocab_size``."""
    mc = model.config
    if mc.is_encoder_decoder and hasattr(mc, "src_vocab_size"):
        return mc.src_vocab_size, mc.tgt_vocab_size
    return mc.vocab_size, mc.vocab_size


def _special_ids(model: nn.Module, config: GenerationConfig) -> _Special:
    mc = model.config
    vocab = _vocab_sizes(model)[1]
    eos = config.eos_id if config.eos_id is not None else getattr(mc, "eos_id", None)
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    pad = config.pad_id if config.pad_id is not None else getattr(mc, "pad_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    start = config.decoder_start_id
    if start is None:
        start = getattr(mc, "bos_id", None)
    for name, ids in (("eos_id", eos_ids), ("pad_id", (pad,)), ("decoder_start_id", (start,))):
        bad = [i for i in ids if i is not None and not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{name} {bad} outside the vocabulary [0, {vocab})")
    return _Special(eos_ids, pad, start)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the caller's train/eval state again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _eval_modes(*models: nn.Module | None) -> Iterator[None]:
    """``_eval_mode`` for each model given (None: skipped)."""
    with ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(_eval_mode(model))
        yield


def _tokenize(
    texts: Sequence[str], tokenizer: Any, pad_id: int, left: bool
) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask (B, T) of texts taken verbatim (no special tokens added),
    padded on the left (decoder-only prompts) or the right (encoder sources)."""
    rows = [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"prompt(s) {empty} tokenize to no tokens at all")
    return pad_sequences(rows, pad_id, side="left" if left else "right")  # (B, T) each


def _prepare_inputs(
    model: nn.Module,
    inputs: Tensor | str | Sequence[str] | Sequence[int],
    attention_mask: Tensor | None,
    tokenizer: Any,
    pad_id: int,
) -> tuple[Tensor, Tensor]:
    """Prompts as (B, T) ids and mask on the model's device, checked."""
    encoder_decoder = model.config.is_encoder_decoder
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (tokenizer=...)")
        if attention_mask is not None:
            raise ValueError("attention_mask is built from text prompts; pass ids to give one")
        ids, attention_mask = _tokenize(inputs, tokenizer, pad_id, left=not encoder_decoder)
    else:
        ids = torch.as_tensor(inputs)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
        if ids.dim() == 1:
            ids = ids[None]
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
    check_input_ids(ids, _vocab_sizes(model)[0], name="prompt ids")  # non-empty, in range
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    elif attention_mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(ids.shape)}"
        )
    if not attention_mask.bool().any(dim=1).all():
        raise ValueError("every prompt needs at least one real token (attention_mask all 0)")
    if not encoder_decoder and not attention_mask[:, -1].bool().all():
        raise ValueError(
            "decoder-only prompts must be left-padded (every row's last column a real token); "
            "got an attention_mask with 0 in the last column"
        )
    device = model_device(model)
    return ids.to(device), attention_mask.to(device).long()


def _check_length(model: nn.Module, prompt_len: int, config: GenerationConfig) -> None:
    """The model sees at most prompt + max_new_tokens - 1 positions; they must fit max_len."""
    max_len = getattr(model.config, "max_len", None)
    needed = prompt_len + config.max_new_tokens - 1
    if max_len is not None and needed > max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} - 1 = {needed} "
            f"positions exceed the model's max_len={max_len}; shorten the prompt or lower "
            "max_new_tokens"
        )


def _start(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    config: GenerationConfig,
    special: _Special,
    copies: int,
) -> _Sequences:
    """Sequences for ``copies`` (beams) per prompt, rows b * copies ... (b + 1) * copies - 1."""
    if not model.config.is_encoder_decoder:
        _check_length(model, ids.shape[1], config)
        return _Sequences(
            model,
            ids.repeat_interleave(copies, 0),
            config,
            mask=mask.repeat_interleave(copies, 0),
        )
    if special.start_id is None:
        raise ValueError(
            "encoder-decoder generation needs decoder_start_id (or model.config.bos_id)"
        )
    if config.static_cache or config.speculative != "none":
        raise ValueError(
            "static_cache and speculative decoding are for decoder-only models (GPT, Llama); "
            f"{type(model).__name__} is an encoder-decoder"
        )
    _check_length(model, 1, config)
    memory = model.encode(ids, mask)  # (B, S, D), once per prompt
    start = torch.full((ids.shape[0] * copies, 1), special.start_id, device=ids.device)
    return _Sequences(
        model,
        start,
        config,
        memory=memory.repeat_interleave(copies, 0),
        src_mask=mask.repeat_interleave(copies, 0),
    )


# ----------------------------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------------------------


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to and including the earliest-ending stop string (unchanged if none occurs)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text


def _text(tokens: list[int], tokenizer: Any, special: _Special, config: GenerationConfig) -> str:
    """The text of generated tokens: a final eos dropped, special tokens skipped, and cut right
    after the first stop string (so it ends with the stop string)."""
    if tokens and tokens[-1] in special.eos_ids:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return _cut_at_stop(text, config.stop_strings)


# ----------------------------------------------------------------------------------------------
# Greedy decoding and sampling
# ----------------------------------------------------------------------------------------------


class _Step(NamedTuple):
    """One decoding step: (B,) tokens (pad for rows already finished), their log-probabilities
    under the distribution they were chosen from (0 for finished rows), and which rows were
    still running."""

    tokens: Tensor
    logprobs: Tensor
    active: Tensor


def _decode_steps(
    seqs: _Sequences,
    config: GenerationConfig,
    special: _Special,
    tokenizer: Any,
) -> Iterator[_Step]:
    """Greedy or sampled decoding, one yield per generated token, until every row is finished
    or ``max_new_tokens`` are out. Each step runs under ``torch.inference_mode``."""
    device = seqs.tokens.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eos = torch.tensor(special.eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(seqs.tokens.shape[0], dtype=torch.bool, device=device)  # (B,)
    for step in range(config.max_new_tokens):
        with torch.inference_mode():
            logits = seqs.next_logits()  # (B, V)
            logits = process_logits(logits, seqs.tokens, seqs.mask, config, step, special.eos_ids)
            logprobs = logits.log_softmax(dim=-1)
            if config.do_sample:
                new = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
            else:
                new = logits.argmax(dim=-1)  # (B,)
            chosen = logprobs.gather(1, new[:, None]).squeeze(1)
            active = ~finished
            new = new.masked_fill(finished, special.pad_id)
            chosen = chosen.masked_fill(finished, 0.0)
            seqs.append(new)
            finished = finished | torch.isin(new, eos)
            if config.stop_strings:
                for row in (active & ~finished).nonzero().flatten().tolist():
                    text = tokenizer.decode(seqs.generated(row), skip_special_tokens=True)
                    if any(s in text for s in config.stop_strings):
                        finished[row] = True
        yield _Step(new, chosen, active)
        if finished.all():
            return


# ----------------------------------------------------------------------------------------------
# Speculative decoding with prompt lookup
# ----------------------------------------------------------------------------------------------


def prompt_lookup_draft(tokens: Tensor, ngram_size: int = 3, draft_tokens: int = 8) -> Tensor:
    """Guess the next tokens from the sequence itself (prompt lookup, Saxena 2023).

    Find the most recent earlier occurrence of the last ``n`` tokens (n = ``ngram_size``,
    then shorter) and copy up to ``draft_tokens`` tokens that followed it. Summaries, code
    edits and chat answers quote their input, so these guesses are often right, and they
    cost no draft model.

    tokens: (L,) the sequence so far. Returns (k,), 0 <= k <= draft_tokens (empty when no
    n-gram recurs).

    >>> prompt_lookup_draft(torch.tensor([5, 6, 7, 8, 9, 5, 6]), ngram_size=2).tolist()
    [7, 8, 9, 5, 6]
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be one sequence (L,), got shape {tuple(tokens.shape)}")
    length = tokens.shape[0]
    for n in range(min(ngram_size, length - 1), 0, -1):
        windows = tokens[:-1].unfold(0, n, 1)  # (L - n, n): n-grams that have a next token
        hits = (windows == tokens[-n:]).all(dim=1).nonzero().flatten()
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + draft_tokens]
    return tokens[:0]


@dataclass
class SpeculativeStats:
    """What speculative decoding did in one generation.

    proposed / accepted: draft tokens checked / equal to the greedy token (each accepted one
    is a token generated without its own forward pass); forward_passes: model calls after the
    prompt's (plain greedy decoding makes one per generated token); draft_passes: the draft
    model's calls, its prompt included (``speculative="draft-model"``; 0 with prompt lookup).
    """

    proposed: int = 0
    accepted: int = 0
    forward_passes: int = 0
    draft_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


class _DraftModel:
    """Greedy drafts from a second decoder (``speculative="draft-model"``), batch 1.

    It keeps its own cache of the tokens it has read (``fed``). Each call first rolls that
    cache back to the part the sequence still shares (the rejected drafts go), reads the rest
    (the prompt in one pass, later the 1 or 2 new tokens one by one), then proposes ``n``
    tokens one at a time: its argmax, fed back in. So a round costs ``n`` draft passes (one
    more after a fully accepted draft: its last token was never fed).
    """

    def __init__(self, model: nn.Module, max_len: int, stats: SpeculativeStats) -> None:
        self.model = model
        # under inference mode, like the model's own cache (``_start``): ``stream`` builds this
        # outside it, and a FastLM hands back a cache its warm-up made under it
        with torch.inference_mode():
            self.cache = model.new_cache(batch=1, max_len=max_len)
        self.device = model_device(model)
        self.fed: list[int] = []
        self.stats = stats

    def _feed(self, tokens: list[int]) -> Tensor:
        """Read ``tokens`` after ``fed``; the (V,) logits after the last one."""
        ids = torch.tensor([tokens], device=self.device)
        self.fed += tokens
        self.stats.draft_passes += 1
        return self.model(ids, cache=self.cache, logits_to_keep=1).logits[0, -1]

    def __call__(self, tokens: Tensor, n: int) -> Tensor:
        """tokens (L,): the sequence so far -> (n,) draft tokens (empty for n = 0)."""
        if n == 0:
            return tokens[:0]
        seq = tokens.tolist()
        same = 0
        for a, b in zip(self.fed, seq[:-1], strict=False):  # the last token is always read
            if a != b:
                break
            same += 1
        if same < len(self.fed):
            self.cache.truncate(same)
            del self.fed[same:]
        if not self.fed:  # the prompt, in one pass
            logits = self._feed(seq)
        else:  # 1 or 2 tokens: single-token steps (a compiled draft's fast path)
            for token in seq[same:]:
                logits = self._feed([token])
        draft = [int(logits.argmax())]
        while len(draft) < n:
            draft.append(int(self._feed(draft[-1:]).argmax()))
        return torch.tensor(draft, device=tokens.device)


def _check_draft_model(model: nn.Module, draft: nn.Module | None, config: GenerationConfig) -> None:
    """Clear errors for a draft model that cannot draft for ``model``."""
    wanted = config.speculative == "draft-model"
    if wanted and draft is None:
        raise ValueError(
            "speculative='draft-model' needs draft_model=...: a decoder over the same "
            "vocabulary, e.g. labkit.inference.FastLM(model, precision='int4')"
        )
    if draft is None:
        return
    if not wanted:
        raise ValueError(
            f"draft_model is used with speculative='draft-model', got "
            f"speculative={config.speculative!r}"
        )
    dc = getattr(draft, "config", None)
    if getattr(dc, "is_encoder_decoder", True) or not hasattr(draft, "new_cache"):
        raise ValueError(
            f"draft_model must be a decoder-only labkit model (GPT, Llama, FastLM), got "
            f"{type(draft).__name__}"
        )
    if dc.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"draft_model's vocabulary ({dc.vocab_size} tokens) differs from the model's "
            f"({model.config.vocab_size}): a draft must speak the same tokens"
        )


def _speculative_steps(
    seqs: _Sequences,
    config: GenerationConfig,
    special: _Special,
    tokenizer: Any,
    stats: SpeculativeStats,
    propose: Callable[[Tensor, int], Tensor],
) -> Iterator[_Step]:
    """Greedy decoding of one row that checks a draft d_1..d_k per forward pass; ``propose``
    (the sequence so far, at most k) gives the draft (prompt lookup or a draft model).

    The model reads [tokens, d_1..d_k] once; its logits after the last token and after each
    d_i give the greedy tokens g_0..g_k, processed exactly as ``_decode_steps`` would. g_0 is
    emitted; while g_i == d_{i+1} the draft was right and g_{i+1} is emitted too. The first
    mismatch ends the round and the cache is rolled back to the accepted tokens, so the
    tokens equal plain greedy decoding's, in fewer passes.
    """
    eos = set(special.eos_ids)
    one = torch.ones(1, dtype=torch.bool, device=seqs.tokens.device)
    step = 0
    while True:
        emitted, done = [], False
        with torch.inference_mode():
            room = config.max_new_tokens - step - 1  # draft tokens whose check still counts
            n_draft = min(room, config.draft_tokens)
            draft = propose(seqs.tokens[0], n_draft)
            length = seqs.tokens.shape[1]
            if len(draft):
                logits = seqs.next_logits(draft[None])[0]  # (k + 1, V)
            else:
                logits = seqs.next_logits()  # (1, V)
            stats.proposed += len(draft)
            stats.forward_passes += 1
            for i in range(len(draft) + 1):
                row = process_logits(
                    logits[i : i + 1], seqs.tokens, seqs.mask, config, step, special.eos_ids
                )
                logprobs = row.log_softmax(dim=-1)
                new = row.argmax(dim=-1)  # (1,)
                seqs.append(new)
                step += 1
                emitted.append(_Step(new, logprobs.gather(1, new[:, None]).squeeze(1), one))
                token = int(new)
                done = token in eos or step == config.max_new_tokens
                if config.stop_strings and not done:
                    text = tokenizer.decode(seqs.generated(0), skip_special_tokens=True)
                    done = any(s in text for s in config.stop_strings)
                if done or i == len(draft) or token != int(draft[i]):
                    break
                stats.accepted += 1
            seqs.keep_cached(length + len(emitted) - 1)  # the accepted draft tokens stay
        yield from emitted
        if done:
            return


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------


class _Hypotheses:
    """The best ``size`` finished beams of one prompt as (score, new tokens), best first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[float, list[int]]] = []

    def add(self, score: float, tokens: list[int]) -> None:
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])  # stable: an earlier equal score stays first
        del self.items[self.size :]

    def cannot_improve(self, best_running: float, length: int, config: GenerationConfig) -> bool:
        """True when full and no running beam (best sum ``best_running``, ``length`` tokens so
        far) can finish with a better score than the worst kept one.

        Log-probabilities only decrease, so a finished score is at most
        ``best_running / L**length_penalty`` with L the largest possible length
        (``max_new_tokens``) if ``length_penalty > 0``, else the smallest (``length + 1``).
        This is exact (Hugging Face's ``early_stopping="never"``), not a heuristic.
        """
        if len(self.items) < self.size:
            return False
        lp = config.length_penalty
        best_length = config.max_new_tokens if lp > 0 else length + 1
        return best_running / best_length**lp <= self.items[-1][0]


def _beam_search(
    seqs: _Sequences, config: GenerationConfig, special: _Special
) -> list[_Hypotheses]:
    """Beam search over K = num_beams rows per prompt (``seqs`` holds B * K rows).

    Each step scores all K * V one-token continuations of a prompt's beams by total
    log-probability and takes the best ``max(2, 1 + n_eos) * K`` (enough for K to continue even
    if many end). Walking them best first: one that ends (eos, or the last allowed step) becomes
    a finished hypothesis if it ranks in the top K, scored ``sum_logprob / n**length_penalty``
    (n = its generated tokens, eos included); the first K that do not end are the next beams.
    A prompt is done when its K kept hypotheses cannot be beaten (``_Hypotheses.cannot_improve``).

    The processors (repetition penalty, eos ban) act on the logits before ``log_softmax``, so
    beam scores stay log-probabilities of a normalised distribution (Hugging Face applies them
    to the log-probabilities instead; without processors the two agree exactly).
    """
    k, max_new = config.num_beams, config.max_new_tokens
    batch = seqs.tokens.shape[0] // k
    device = seqs.tokens.device
    hypotheses = [_Hypotheses(k) for _ in range(batch)]
    done = [False] * batch
    # Only the first beam of each prompt starts alive, so step 1 does not pick K copies.
    running = torch.full((batch, k), float("-inf"), device=device)  # (B, K) sums of log-probs
    running[:, 0] = 0.0
    for step in range(1, max_new + 1):
        logits = seqs.next_logits()  # (B * K, V)
        vocab = logits.shape[-1]
        logits = process_logits(logits, seqs.tokens, seqs.mask, config, step - 1, special.eos_ids)
        totals = running[:, :, None] + logits.log_softmax(dim=-1).view(batch, k, vocab)
        n_keep = min(max(2, 1 + len(special.eos_ids)) * k, k * vocab)
        top_sums, top_index = totals.view(batch, k * vocab).topk(n_keep, dim=1)  # (B, n_keep)
        rows, new_tokens, sums = [], [], []
        for b in range(batch):
            beams: list[tuple[int, int, float]] = []  # (row, token, sum of log-probs)
            candidates = zip(top_sums[b].tolist(), top_index[b].tolist(), strict=True)
            for rank, (total, index) in enumerate([] if done[b] else candidates):
                row, token = b * k + index // vocab, index % vocab
                if token in special.eos_ids or step == max_new:
                    if rank < k and total > float("-inf"):
                        hypotheses[b].add(
                            total / step**config.length_penalty, seqs.generated(row) + [token]
                        )
                elif len(beams) < k:
                    beams.append((row, token, total))
            if not done[b] and beams:
                done[b] = hypotheses[b].cannot_improve(beams[0][2], step, config)
            # Finished prompts (and the last step) keep dummy beams so the batch stays B * K.
            beams += [(b * k, special.pad_id, float("-inf"))] * (k - len(beams))
            for row, token, total in beams:
                rows.append(row)
                new_tokens.append(token)
                sums.append(total)
        if step == max_new or all(done):
            break
        seqs.reorder(torch.tensor(rows, device=device))
        seqs.append(torch.tensor(new_tokens, device=device))
        running = torch.tensor(sums, device=device).view(batch, k)
    return hypotheses


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    """What ``generate`` returns (plain tensors on the model's device).

    sequences: (B, T + n) prompt (left-padded) + new tokens for a decoder-only model;
        (B, 1 + n) start token + new tokens for an encoder-decoder.
    new_tokens: (B, n) the generated tokens; a finished row ends with its eos, then ``pad_id``.
    scores: (B,) for greedy/sampling the summed log-probability of each row's tokens under the
        (processed) distribution they were drawn from; for beam search the beam score
        ``sum_logprob / n**length_penalty``.
    text: the decoded new tokens per row (eos and special tokens dropped, cut after a stop
        string), when a tokenizer was given.
    beam_tokens / beam_scores: beam search only: all K hypotheses per prompt, best first,
        (B, K, n_beams) padded with ``pad_id``, and their (B, K) scores.
    speculative: with speculative decoding, the drafts proposed and accepted.
    """

    sequences: Tensor
    new_tokens: Tensor
    scores: Tensor
    text: list[str] | None = None
    beam_tokens: Tensor | None = None
    beam_scores: Tensor | None = None
    speculative: SpeculativeStats | None = None


def _steps(
    seqs: _Sequences,
    config: GenerationConfig,
    special: _Special,
    tokenizer: Any,
    stats: SpeculativeStats | None,
    draft_model: nn.Module | None = None,
) -> Iterator[_Step]:
    """Greedy/sampled steps, speculative when ``stats`` is given (one row only): drafts by
    prompt lookup, or by ``draft_model``."""
    if stats is None:
        return _decode_steps(seqs, config, special, tokenizer)
    if seqs.tokens.shape[0] != 1:
        raise ValueError(
            f"speculative={config.speculative!r} decodes one prompt at a time, got a batch of "
            f"{seqs.tokens.shape[0]}: generate the prompts one by one, or use speculative='none'"
        )
    if draft_model is None:

        def propose(tokens: Tensor, n: int) -> Tensor:
            return prompt_lookup_draft(tokens, config.ngram_size, n)

    else:  # the draft reads at most the prompt and max_new_tokens - 1 tokens, then drafts
        propose = _DraftModel(draft_model, seqs.n_prompt + config.max_new_tokens, stats)
    return _speculative_steps(seqs, config, special, tokenizer, stats, propose)


def generate(
    model: nn.Module,
    input_ids: Tensor | str | Sequence[str] | Sequence[int],
    attention_mask: Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer: Any = None,
    draft_model: nn.Module | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """Generate continuations of a batch of prompts.

    input_ids: (B, T) ids (left-padded, with ``attention_mask`` (B, T) 1 = real token), a 1-D
        list/tensor for one prompt, or text (a str or list of str, tokenized verbatim with
        ``tokenizer`` and left-padded; encoder sources are right-padded). For an
        encoder-decoder model these are the source tokens.
    config: a ``GenerationConfig`` (default greedy, 32 new tokens); ``overrides`` replace fields,
        e.g. ``generate(model, ids, do_sample=True, seed=0)``.
    tokenizer: needed for text prompts and ``stop_strings``; when given, ``text`` is filled.
    draft_model: with ``speculative="draft-model"``, the decoder that drafts (same vocabulary;
        typically a quantized copy of ``model``); the tokens stay ``model``'s greedy ones.

    The model (and the draft model) runs in eval mode under ``torch.inference_mode`` (its
    train/eval state is restored afterwards); inputs are moved to the model's device.
    """
    config = (config or GenerationConfig()).replace(**overrides)
    if config.stop_strings and tokenizer is None:
        raise ValueError(f"stop_strings {config.stop_strings} need a tokenizer (tokenizer=...)")
    _check_draft_model(model, draft_model, config)
    special = _special_ids(model, config)
    ids, mask = _prepare_inputs(model, input_ids, attention_mask, tokenizer, special.pad_id)
    stats = SpeculativeStats() if config.speculative != "none" else None
    with _eval_modes(model, draft_model), torch.inference_mode():
        seqs = _start(model, ids, mask, config, special, copies=config.num_beams)
        if config.num_beams == 1:
            steps = list(_steps(seqs, config, special, tokenizer, stats, draft_model))
            new = torch.stack([s.tokens for s in steps], dim=1)  # (B, n)
            lengths = torch.stack([s.active for s in steps], dim=1).sum(dim=1).tolist()
            scores = torch.stack([s.logprobs for s in steps], dim=1).sum(dim=1)  # (B,)
            generated = [new[b, : lengths[b]].tolist() for b in range(new.shape[0])]
            beam_tokens = beam_scores = None
        else:
            hypotheses = _beam_search(seqs, config, special)
            generated = [h.items[0][1] for h in hypotheses]
            new = pad_sequences(generated, special.pad_id, device=ids.device)[0]
            scores = torch.tensor([h.items[0][0] for h in hypotheses], device=ids.device)
            all_rows = [tokens for h in hypotheses for _, tokens in h.items]
            beam_tokens = pad_sequences(all_rows, special.pad_id, device=ids.device)[0]
            beam_tokens = beam_tokens.view(len(hypotheses), config.num_beams, -1)
            beam_scores = torch.tensor(
                [[score for score, _ in h.items] for h in hypotheses], device=ids.device
            )
        prefix = seqs.tokens[:: config.num_beams, :1] if model.config.is_encoder_decoder else ids
    text = None
    if tokenizer is not None:
        text = [_text(tokens, tokenizer, special, config) for tokens in generated]
    # Clone outside inference mode: callers may feed these to a model being trained.
    return GenerationOutput(
        sequences=torch.cat([prefix, new], dim=1).clone(),
        new_tokens=new.clone(),
        scores=scores.clone(),
        text=text,
        beam_tokens=None if beam_tokens is None else beam_tokens.clone(),
        beam_scores=None if beam_scores is None else beam_scores.clone(),
        speculative=stats,
    )


class TextStream:
    """What ``stream`` returns: an iterator over text pieces that also keeps count.

    new_tokens: the tokens generated so far (eos included); speculative: the
    ``SpeculativeStats`` of speculative decoding, else None.
    """

    def __init__(self, pieces: Iterator[str], new_tokens: list[int], stats: Any) -> None:
        self._pieces = pieces
        self.new_tokens = new_tokens
        self.speculative: SpeculativeStats | None = stats

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)


def stream(
    model: nn.Module,
    prompt: Tensor | str | Sequence[int],
    tokenizer: Any,
    config: GenerationConfig | None = None,
    draft_model: nn.Module | None = None,
    **overrides: Any,
) -> TextStream:
    """Yield the generated text of one prompt piece by piece, as it is produced.

    Each step decodes the whole generated suffix and yields what is new (Hugging Face's
    ``TextStreamer`` idea), holding back a trailing "\\ufffd" (a character whose bytes are split
    across tokens) until it is complete. ``"".join(stream(...))`` equals
    ``generate(...).text[0]`` for the same config (greedy/sampling with a seed; no beams).
    The returned ``TextStream`` also counts the tokens (``new_tokens``). ``draft_model``: as
    in ``generate``.
    """
    config = (config or GenerationConfig()).replace(**overrides)
    if config.num_beams != 1:
        raise ValueError(
            f"stream supports greedy decoding and sampling, got num_beams={config.num_beams}"
        )
    _check_draft_model(model, draft_model, config)
    special = _special_ids(model, config)
    ids, mask = _prepare_inputs(model, prompt, None, tokenizer, special.pad_id)
    if ids.shape[0] != 1:
        raise ValueError(f"stream takes one prompt, got a batch of {ids.shape[0]}")
    tokens: list[int] = []
    stats = SpeculativeStats() if config.speculative != "none" else None
    pieces = _stream_pieces(
        model, ids, mask, config, special, tokenizer, tokens, stats, draft_model
    )
    return TextStream(pieces, tokens, stats)


def _stream_pieces(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    config: GenerationConfig,
    special: _Special,
    tokenizer: Any,
    tokens: list[int],
    stats: SpeculativeStats | None,
    draft_model: nn.Module | None,
) -> Iterator[str]:
    with _eval_modes(model, draft_model):
        with torch.inference_mode():
            seqs = _start(model, ids, mask, config, special, copies=1)
        text = shown = ""
        for step in _steps(seqs, config, special, tokenizer, stats, draft_model):
            tokens.append(int(step.tokens[0]))
            text = _text(tokens, tokenizer, special, config)
            ready = text.rstrip("\ufffd")
            if len(ready) > len(shown) and ready.startswith(shown):
                yield ready[len(shown) :]
                shown = ready
        if text != shown and text.startswith(shown):
            yield text[len(shown) :]


__all__ = [
    "PRESETS",
    "SPECULATIVE",
    "GenerationConfig",
    "GenerationOutput",
    "SpeculativeStats",
    "TextStream",
    "apply_repetition_penalty",
    "apply_temperature",
    "generate",
    "process_logits",
    "prompt_lookup_draft",
    "stream",
    "suppress_eos",
    "top_k_filter",
    "top_p_filter",
]
