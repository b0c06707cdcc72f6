"""Text data augmentation: new training sentences from old ones, for the augmentation lesson.

Three of the four "easy data augmentation" operations of Wei & Zou (2019), word-level:

- ``random_deletion``: drop each word with probability ``p`` (never all of them);
- ``random_swap``: with probability ``p`` per word, swap it with another random word;
- ``synonym_replacement``: with probability ``p`` per word that has synonyms, replace it with
  one drawn from a synonym list (by default ``labkit/data/synonyms.txt``, package data).

Words are the whitespace-separated pieces of the text, and an augmented text joins them with
single spaces. Every function takes a ``rng``, a ``random.Random`` or an int seed, so the same
seed always gives the same augmentation; ``p=0`` returns the text unchanged; no function ever
returns an empty string.

And one sentence-level operation that needs a language model:

- ``paraphrase``: ask the packaged SmolLM2-135M-Instruct, through its chat template, to say each
  text in other words (batched, left-padded, with ``labkit.generation``). A 135M-parameter model
  paraphrases loosely: expect many near-copies, some lost or added detail, and now and then a
  changed meaning or tone (a complaint answered with "I'm sorry..."). Treat its output as noisy
  augmentation and check a sample before training on it.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the model are imported only when paraphrase runs
    from torch import nn

    from labkit.generation import GenerationConfig

DEFAULT_SYNONYMS = Path(__file__).resolve().parent / "synonyms.txt"  # package data

_WORD_CORE = re.compile(r"^(\W*)(.*?)(\W*)$")  # leading punctuation, word, trailing punctuation


def _rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _words(text: str, p: float) -> list[str]:
    """Check the arguments every augmentation shares; return the text's words."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got p={p}")
    words = text.split()
    if not words:
        raise ValueError(f"text has no words to augment: {text!r}")
    return words


def random_deletion(text: str, p: float, *, rng: random.Random | int) -> str:
    """Delete each word independently with probability ``p``.

    If every word would go, one of them, chosen at random, is kept: an augmented example is
    never empty.
    """
    words = _words(text, p)
    if p == 0:
        return text
    rng = _rng(rng)
    kept = [word for word in words if rng.random() >= p]
    return " ".join(kept) if kept else rng.choice(words)


def random_swap(text: str, p: float, *, rng: random.Random | int) -> str:
    """Visit each position in turn; with probability ``p`` swap its word with a random other one.

    The words stay the same, as a multiset; only their order changes. A one-word text comes
    back unchanged.
    """
    words = _words(text, p)
    if p == 0 or len(words) == 1:
        return text
    rng = _rng(rng)
    for i in range(len(words)):
        if rng.random() < p:
            j = rng.choice([k for k in range(len(words)) if k != i])
            words[i], words[j] = words[j], words[i]
    return " ".join(words)


def load_synonyms(path: str | Path = DEFAULT_SYNONYMS) -> dict[str, tuple[str, ...]]:
    """Read a synonym file: one comma-separated set per line, ``#`` starts a comment line.

    Returns each word's synonyms (the other words of every set it is in), sorted, lowercase.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no synonym file at {str(path)!r} (the course's list ships with labkit as "
            "labkit/data/synonyms.txt; pass synonyms=... to use your own)"
        )
    groups: dict[str, set[str]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = [w.strip().lower() for w in line.split(",")]
        bad = [w for w in words if not w or len(w.split()) != 1]
        if bad or len(words) < 2:
            raise ValueError(
                f"{str(path)!r} line {line_no}: expected two or more comma-separated single "
                f"words, got {line!r}"
            )
        for word in words:
            groups.setdefault(word, set()).update(w for w in words if w != word)
    return {word: tuple(sorted(others)) for word, others in groups.items()}


@functools.cache
def _default_synonyms() -> dict[str, tuple[str, ...]]:
    return load_synonyms(DEFAULT_SYNONYMS)  # read once, not once per augmented text


def _match_case(template: str, word: str) -> str:
    """Give ``word`` the capitalisation of ``template``: "Good" -> "Fine", "GOOD" -> "FINE"."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def synonym_replacement(
    text: str,
    p: float,
    *,
    rng: random.Random | int,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Replace each word that has synonyms, with probability ``p``, by a random synonym.

    Words are looked up lowercase with surrounding punctuation set aside ("Good!" is looked
    up as "good" and becomes e.g. "Fine!"); the replacement takes the original's
    capitalisation. ``synonyms`` maps a word to its synonyms; by default the course's list.
    """
    words = _words(text, p)
    if p == 0:
        return text
    rng = _rng(rng)
    table = _default_synonyms() if synonyms is None else synonyms
    out = []
    for word in words:
        lead, core, trail = _WORD_CORE.match(word).groups()
        options = table.get(core.lower(), ())
        if options and rng.random() < p:
            word = lead + _match_case(core, rng.choice(options)) + trail
        out.append(word)
    return " ".join(out)


# ----------------------------------------------------------------------------------------------
# Paraphrasing with SmolLM2-135M-Instruct
# ----------------------------------------------------------------------------------------------

DEFAULT_INSTRUCTION = "Paraphrase this text:"
# One worked example, sent as an earlier user/assistant turn: with it the 135M model answers
# with a paraphrase far more often than with the instruction alone (which it mostly answers by
# copying the text, or by replying to it). More examples made it copy their wording instead.
DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("The movie was boring and far too long.", "The film was dull and went on for much too long."),
)
_LABEL = re.compile(
    r"^(paraphrased?( text| sentence| version)?|rewritten( text)?|translat(ion|ed)( text)?)"
    r"\s*:\s*",
    re.I,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d"}


def paraphrase_config() -> GenerationConfig:
    """The default decoding of ``paraphrase``: nucleus sampling at temperature 0.5 (top-p 0.9),
    at most 48 new tokens, stopping at the first newline (the cleaned paraphrase is one line).

    Temperature 0.5 keeps most outputs on topic while still varying with the seed; at 0.7 the
    135M model drifts more often (it copied its worked example into unrelated answers).
    """
    from labkit.generation import GenerationConfig

    return GenerationConfig(
        max_new_tokens=48, do_sample=True, temperature=0.5, top_p=0.9, stop_strings=("\n",)
    )


def paraphrase_prompt(
    text: str,
    tokenizer: Any,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    examples: Sequence[tuple[str, str]] = DEFAULT_EXAMPLES,
) -> str:
    """The chat-templated prompt that asks for a paraphrase of ``text``.

    Each ``(text, paraphrase)`` of ``examples`` becomes a user turn ``"{instruction}\n\n{text}"``
    and an assistant answer; then ``text`` as the last user turn, and the opening of the
    assistant's answer (``add_generation_prompt``), so the model's next tokens are the reply.
    """
    messages = []
    for example, answer in examples:
        messages.append({"role": "user", "content": f"{instruction}\n\n{example}"})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": f"{instruction}\n\n{text}"})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def clean_paraphrase(generated: str, original: str) -> str:
    """Turn the model's raw reply into one paraphrase of ``original``.

    Keeps the first non-empty line, drops a leading label ("Paraphrase: ...") and quotes that
    wrap the whole line, and keeps at most as many sentences as ``original`` has (the model
    often adds a comment after the paraphrase). Falls back to ``original`` if nothing is left.
    """
    lines = [line.strip() for line in generated.splitlines() if line.strip()]
    if not lines:
        return original
    text = _LABEL.sub("", lines[0]).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    keep = max(1, len(_sentences(original)))
    text = " ".join(_sentences(text)[:keep])
    return text or original


@functools.cache
def _default_smollm2() -> tuple[nn.Module, Any]:
    from labkit.models.pretrained import load

    pretrained = load("smollm2-135m-instruct")  # ~20 s or more: once per process
    return pretrained.model, pretrained.tokenizer


def _model_pair(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from what the caller passed: a ``Pretrained``, both, or neither
    ((None, None): the caller loads SmolLM2-135M-Instruct when it has work to do)."""
    from labkit.models.pretrained import Pretrained

    if isinstance(model, Pretrained):
        model, tokenizer = model.model, tokenizer or model.tokenizer
    if (model is None) != (tokenizer is None):
        raise ValueError(
            "pass both model and tokenizer, a labkit.models.pretrained.Pretrained as model, or "
            "neither (to load SmolLM2-135M-Instruct)"
        )
    return model, tokenizer


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single str; wrap it: [text]")
    texts = list(texts)
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(f"texts {empty} are empty or not strings: nothing to {what}")
    return texts


def _generate_replies(
    prompts: Sequence[str], model: Any, tokenizer: Any, config: GenerationConfig, batch_size: int
) -> list[str]:
    """The model's raw reply to each prompt, ``batch_size`` prompts per ``generate`` call."""
    from labkit.generation import generate

    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        replies += generate(model, batch, config=config, tokenizer=tokenizer).text
    return replies


def paraphrase(
    texts: Sequence[str],
    model: Any = None,
    tokenizer: Any = None,
    *,
    config: GenerationConfig | None = None,
    seed: int | None = 0,
    instruction: str = DEFAULT_INSTRUCTION,
    examples: Sequence[tuple[str, str]] = DEFAULT_EXAMPLES,
    batch_size: int = 8,
) -> list[str]:
    """One paraphrase per text, written by SmolLM2-135M-Instruct (see the module docstring for
    how loose they are).

    model: a ``labkit.models.pretrained.Pretrained`` (its tokenizer is used), or a labkit
        decoder-only model together with ``tokenizer``; None loads SmolLM2-135M-Instruct once per
        process (kept for later calls). Load it yourself to choose its device.
    config: how to decode, default ``paraphrase_config()`` (nucleus sampling at temperature
        0.5); pass e.g. ``GenerationConfig.preset("greedy", max_new_tokens=48)`` for the single
        most likely paraphrase.
    seed: replaces ``config.seed``, so the same texts, seed and batch_size always give the
        same paraphrases; different seeds give different variants of each text (None: torch's
        global random state). Greedy decoding ignores it.
    instruction, examples: what the prompt asks and the worked examples shown before it
        (``paraphrase_prompt``); ``examples=()`` asks with the instruction alone.
    batch_size: prompts per ``generate`` call (left-padded together).

    Each reply is cleaned by ``clean_paraphrase``: one line, at most as many sentences as the
    original, the original itself when the model produced nothing usable.
    """
    texts = _check_texts(texts, "paraphrase")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, tokenizer = _model_pair(model, tokenizer)
    if not texts:
        return []
    if model is None:
        model, tokenizer = _default_smollm2()
    config = (config or paraphrase_config()).replace(seed=seed)
    prompts = [
        paraphrase_prompt(text, tokenizer, instruction=instruction, examples=examples)
        for text in texts
    ]
    replies = _generate_replies(prompts, model, tokenizer, config, batch_size)
    return [clean_paraphrase(reply, text) for reply, text in zip(replies, texts, strict=True)]


# ----------------------------------------------------------------------------------------------
# Back-translation with SmolLM2-135M-Instruct: English -> pivot language -> English
# ----------------------------------------------------------------------------------------------

# One worked translation per language, shown as an earlier user/assistant turn (as for
# paraphrase): English first, then the language's version; ``translate`` uses it either way.
TRANSLATION_EXAMPLES: dict[str, tuple[str, str]] = {
    "French": (
        "Thanks for the help, my order arrived today!",
        "Merci pour l'aide, ma commande est arrivée aujourd'hui !",
    ),
    "Spanish": (
        "Thanks for the help, my order arrived today!",
        "¡Gracias por la ayuda, mi pedido llegó hoy!",
    ),
    "German": (
        "Thanks for the help, my order arrived today!",
        "Danke für die Hilfe, meine Bestellung ist heute angekommen!",
    ),
}


def translation_config() -> GenerationConfig:
    """The default decoding of ``translate`` and ``back_translate``: nucleus sampling at
    temperature 0.5 (top-p 0.9), repetition penalty 1.2, at most 48 new tokens, stopping at the
    first newline.

    Sampling makes each seed a different variant; the repetition penalty stops most of the
    loops ("le plus le plus le plus ...") the 135M model falls into when it cannot translate.
    """
    from labkit.generation import GenerationConfig

    return GenerationConfig(
        max_new_tokens=48,
        do_sample=True,
        temperature=0.5,
        top_p=0.9,
        repetition_penalty=1.2,
        stop_strings=("\n",),
    )


def translation_prompt(
    text: str,
    tokenizer: Any,
    *,
    source: str = "English",
    target: str = "French",
    examples: Sequence[tuple[str, str]] | None = None,
) -> str:
    """The chat-templated prompt that asks for ``text`` translated from ``source`` to ``target``.

    Each ``(source text, target text)`` of ``examples`` becomes a user turn
    ``"Translate from {source} to {target}:\\n\\n{source text}"`` and the assistant's answer;
    then ``text`` as the last user turn and the opening of the assistant's reply. By default
    the worked example of ``TRANSLATION_EXAMPLES`` for the pair (one side must be English);
    ``examples=()`` asks with the instruction alone.
    """
    if examples is None:
        examples = _default_translation_examples(source, target)
    instruction = f"Translate from {source} to {target}:"
    return paraphrase_prompt(text, tokenizer, instruction=instruction, examples=examples)


def _default_translation_examples(source: str, target: str) -> tuple[tuple[str, str], ...]:
    if source == "English" and target in TRANSLATION_EXAMPLES:
        return (TRANSLATION_EXAMPLES[target],)
    if target == "English" and source in TRANSLATION_EXAMPLES:
        english, other = TRANSLATION_EXAMPLES[source]
        return ((other, english),)
    raise ValueError(
        f"no worked example for {source} -> {target}: the built-in ones translate between "
        f"English and {sorted(TRANSLATION_EXAMPLES)}; pass examples=[(source text, target "
        "text)] or examples=() for none"
    )


def translate(
    texts: Sequence[str],
    model: Any = None,
    tokenizer: Any = None,
    *,
    source: str = "English",
    target: str = "French",
    config: GenerationConfig | None = None,
    seed: int | None = 0,
    examples: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 8,
) -> list[str]:
    """One translation per text, by SmolLM2-135M-Instruct through its chat template.

    A 135M-parameter model translates badly: expect invented words, loops, apologies and
    untranslated English (the augmentation notebook shows a sample). Arguments as for
    ``paraphrase`` (model, config default ``translation_config()``, seed, batch_size), with
    ``source``/``target`` the language names and ``examples`` the worked translations
    (``translation_prompt``). Each reply is cleaned by ``clean_paraphrase``.
    """
    texts = _check_texts(texts, "translate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if examples is None:
        examples = _default_translation_examples(source, target)
    model, tokenizer = _model_pair(model, tokenizer)
    if not texts:
        return []
    if model is None:
        model, tokenizer = _default_smollm2()
    config = (config or translation_config()).replace(seed=seed)
    prompts = [
        translation_prompt(text, tokenizer, source=source, target=target, examples=examples)
        for text in texts
    ]
    replies = _generate_replies(prompts, model, tokenizer, config, batch_size)
    return [clean_paraphrase(reply, text) for reply, text in zip(replies, texts, strict=True)]


def back_translate(
    texts: Sequence[str],
    model: Any = None,
    tokenizer: Any = None,
    *,
    pivot: str = "French",
    config: GenerationConfig | None = None,
    seed: int | None = 0,
    batch_size: int = 8,
) -> tuple[list[str], list[str]]:
    """Back-translation (Sennrich et al. 2016; Xie et al. 2020 for augmentation): translate
    each English text into ``pivot`` and the result back into English.

    Returns ``(back, pivoted)``: the English round trips, one per text, and the pivot-language
    texts in between (to read what went wrong). Both legs use ``translate`` with the same
    ``model``, ``config`` (default ``translation_config()``) and ``batch_size``; the way back
    samples with ``seed + 1`` so that the two legs draw different random numbers.
    """
    pivoted = translate(
        texts,
        model,
        tokenizer,
        source="English",
        target=pivot,
        config=config,
        seed=seed,
        batch_size=batch_size,
    )
    back = translate(
        pivoted,
        model,
        tokenizer,
        source=pivot,
        target="English",
        config=config,
        seed=None if seed is None else seed + 1,
        batch_size=batch_size,
    )
    return back, pivoted
