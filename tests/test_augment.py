"""Tests for labkit.augment: seeded, never empty, identity at p=0, synonyms only from the list."""

import random
import re
from collections import Counter

import pytest

from labkit.augment import (
    DEFAULT_SYNONYMS,
    load_synonyms,
    random_deletion,
    random_swap,
    synonym_replacement,
)

TEXTS = [
    "I love my new car, it is really fast and the ride is great!",
    "Ugh, the phone is broken again. Terrible support, I hate waiting.",
    "To be, or not to be, that is the question.",
    "Good",
]
AUGMENTERS = [random_deletion, random_swap, synonym_replacement]


@pytest.mark.parametrize("augment", AUGMENTERS)
def test_same_seed_same_output_and_seeds_matter(augment):
    text = TEXTS[0]
    assert augment(text, 0.5, rng=7) == augment(text, 0.5, rng=7)
    assert augment(text, 0.5, rng=random.Random(7)) == augment(text, 0.5, rng=7)
    outputs = {augment(text, 0.5, rng=seed) for seed in range(20)}
    assert len(outputs) > 3


def test_a_shared_generator_advances_between_calls():
    rng = random.Random(0)
    first, second = random_swap(TEXTS[0], 0.5, rng=rng), random_swap(TEXTS[0], 0.5, rng=rng)
    assert first != second


@pytest.mark.parametrize("augment", AUGMENTERS)
@pytest.mark.parametrize("text", [*TEXTS, "  odd\twhitespace \n kept  "])
def test_p_zero_returns_the_text_unchanged(augment, text):
    assert augment(text, 0.0, rng=0) == text


@pytest.mark.parametrize("text", TEXTS)
def test_deletion_never_empties_and_only_deletes(text):
    words = text.split()
    for seed in range(50):
        for p in (0.3, 0.9, 1.0):
            out = random_deletion(text, p, rng=seed).split()
            assert out
            remaining = iter(words)  # out is words with some removed, order kept
            assert all(word in remaining for word in out)
    assert len(random_deletion(TEXTS[0], 1.0, rng=0).split()) == 1  # p=1 keeps one word


def test_deletion_rate_follows_p():
    text = " ".join(f"w{i}" for i in range(1000))
    kept = len(random_deletion(text, 0.3, rng=0).split())
    assert 650 < kept < 750


@pytest.mark.parametrize("text", TEXTS)
def test_swap_keeps_the_multiset_of_words(text):
    for seed in range(30):
        out = random_swap(text, 0.5, rng=seed)
        assert Counter(out.split()) == Counter(text.split())
    if len(text.split()) > 3:
        assert any(random_swap(text, 0.5, rng=s).split() != text.split() for s in range(5))


def _parts(word):
    """(leading punctuation, core, trailing punctuation) of a whitespace-separated word."""
    return re.fullmatch(r"(\W*)(.*?)(\W*)", word).groups()


def test_synonyms_come_from_the_list():
    synonyms = load_synonyms()
    changed = 0
    for text in TEXTS:
        for seed in range(20):
            out = synonym_replacement(text, 0.7, rng=seed).split()
            assert len(out) == len(text.split())
            for old, new in zip(text.split(), out, strict=True):
                if old != new:
                    changed += 1
                    (lead, core, trail), (new_lead, new_core, new_trail) = _parts(old), _parts(new)
                    assert new_core.lower() in synonyms[core.lower()]
                    assert (lead, trail) == (new_lead, new_trail)  # punctuation kept
    assert changed > 100


def test_synonym_replacement_at_p_one_replaces_every_listed_word_and_keeps_case():
    out = synonym_replacement("Good car, BAD phone xyzzy", 1.0, rng=3).split()
    assert out[0] != "Good" and out[0][0].isupper() and out[0][1:].islower()
    assert out[1].endswith(",") and out[1] != "car,"
    assert out[2] != "BAD" and out[2].isupper()
    assert out[4] == "xyzzy"  # no synonyms: untouched


def test_custom_synonym_table_is_used():
    out = synonym_replacement("the cat sat", 1.0, rng=0, synonyms={"cat": ["feline"]})
    assert out == "the feline sat"


def test_shipped_synonym_list_is_symmetric_single_lowercase_words():
    synonyms = load_synonyms()
    assert len(synonyms) > 300
    assert DEFAULT_SYNONYMS.name == "synonyms.txt" and DEFAULT_SYNONYMS.parent.name == "data"
    for word, others in synonyms.items():
        assert others and word not in others
        for other in others:
            assert other == other.lower() and len(other.split()) == 1
            assert word in synonyms[other]


def test_synonym_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no synonym file at .*nowhere.txt"):
        load_synonyms(tmp_path / "nowhere.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("# fine\ngood, fine\nhappy, very glad\n")
    with pytest.raises(ValueError, match="line 3: expected two or more comma-separated single"):
        load_synonyms(bad)
    lonely = tmp_path / "lonely.txt"
    lonely.write_text("alone\n")
    with pytest.raises(ValueError, match="line 1"):
        load_synonyms(lonely)


@pytest.mark.parametrize("augment", AUGMENTERS)
def test_bad_arguments(augment):
    with pytest.raises(ValueError, match="p must be a probability in \\[0, 1\\], got p=1.5"):
        augment(TEXTS[0], 1.5, rng=0)
    with pytest.raises(ValueError, match="p must be a probability"):
        augment(TEXTS[0], -0.1, rng=0)
    with pytest.raises(ValueError, match="text has no words to augment"):
        augment("   ", 0.5, rng=0)
