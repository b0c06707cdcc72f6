"""Text data augmentation: new training sentences from old ones, for the augmentation lesson.

Three of the four "easy data augmentation" operations of Wei & Zou (2019), word-level:

- ``random_deletion``: drop each word with probability ``p`` (never all of them);
- ``random_swap``: with probability ``p`` per word, swap it with another random word;
- ``synonym_replacement``: with probability ``p`` per word that has synonyms, replace it with
  one drawn from a synonym list (the course's ``data/synonyms.txt`` by default).

Words are the whitespace-separated pieces of the text, and an augmented text joins them with
single spaces. Every function takes a ``rng``, a ``random.Random`` or an int seed, so the same
seed always gives the same augmentation; ``p=0`` returns the text unchanged; no function ever
returns an empty string.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_SYNONYMS = Path(__file__).resolve().parent.parent / "data" / "synonyms.txt"

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
            f"no synonym file at {str(path)!r} (the course's list is data/synonyms.txt in the "
            "repository; pass synonyms=... to use your own)"
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
