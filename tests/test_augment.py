"""Tests for labkit.data: seeded, never empty, identity at p=0, synonyms only from the list;
SmolLM2 paraphrases: one per text, through the chat template, reproducible for a seed;
back-translation: both legs, batched and cleaned (with a fake model)."""

import random
import re
from collections import Counter

import pytest
import torch

from labkit.data import (
    augment,
    clean_paraphrase,
    load_synonyms,
    paraphrase,
    paraphrase_config,
    paraphrase_prompt,
    random_deletion,
    random_swap,
    synonym_replacement,
)
from labkit.data.augment import (
    DEFAULT_EXAMPLES,
    DEFAULT_INSTRUCTION,
    DEFAULT_SYNONYMS,
    TRANSLATION_EXAMPLES,
    back_translate,
    translate,
    translation_config,
    translation_prompt,
)
from labkit.generation import GenerationConfig

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


# ----------------------------------------------------------------------------------------------
# Paraphrasing with SmolLM2-135M-Instruct (session fixture ``smollm2``: loaded once)
# ----------------------------------------------------------------------------------------------

PARAPHRASE_TEXTS = [
    "I love my new car, it is really fast and the ride is great!",
    "The weather was cold and rainy all weekend.",
]
SHORT = dict(max_new_tokens=24)  # keeps each generate call to a few seconds on a CPU


def test_paraphrase_prompt_is_the_chat_template_of_instruction_examples_and_text(smollm2):
    tokenizer = smollm2.tokenizer
    text = PARAPHRASE_TEXTS[1]
    prompt = paraphrase_prompt(text, tokenizer)
    ((example, answer),) = DEFAULT_EXAMPLES
    messages = [
        {"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n{example}"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n{text}"},
    ]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == expected
    # the text is the last user turn, and the prompt ends where the assistant's reply begins
    assert prompt.endswith(
        f"<|im_start|>user\n{DEFAULT_INSTRUCTION}\n\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )
    bare = paraphrase_prompt(text, tokenizer, instruction="Say it differently.", examples=())
    assert "Say it differently.\n\n" + text in bare and example not in bare
    assert bare.count("<|im_start|>user") == 1


@pytest.fixture(scope="module")
def sampled(smollm2):
    return paraphrase(PARAPHRASE_TEXTS, smollm2, config=paraphrase_config().replace(**SHORT))


def test_paraphrase_gives_one_new_line_per_text(sampled):
    assert isinstance(sampled, list) and len(sampled) == len(PARAPHRASE_TEXTS)
    for out in sampled:
        assert isinstance(out, str) and out.strip() == out and out
        assert "\n" not in out and "<|im" not in out  # one line, no special tokens
    assert sampled != PARAPHRASE_TEXTS  # the model rewrote at least one of them


def test_paraphrase_is_reproducible_for_a_seed(smollm2, sampled, monkeypatch):
    # No model given: the default one (here the session's, not a second ~20 s load). The default
    # seed 0 again, torch's global random state moved on: the same paraphrases, so the seed,
    # not the global state, drives the sampling.
    monkeypatch.setattr(augment, "_default_smollm2", lambda: (smollm2.model, smollm2.tokenizer))
    torch.manual_seed(12345)
    torch.rand(1000)
    again = paraphrase(PARAPHRASE_TEXTS, config=paraphrase_config().replace(**SHORT))
    assert again == sampled


def test_greedy_paraphrase_batched_equals_one_at_a_time(smollm2, monkeypatch):
    """The chat-templated prompts go to labkit.generation.generate in batches of batch_size,
    and left padding in a batch changes nothing: each text comes out as if it were alone."""
    import labkit.generation

    batches = []
    real_generate = labkit.generation.generate

    def spy(model, prompts, **kwargs):
        batches.append(list(prompts))
        return real_generate(model, prompts, **kwargs)

    monkeypatch.setattr(labkit.generation, "generate", spy)
    greedy = GenerationConfig.preset("greedy", stop_strings=("\n",), **SHORT)
    batched = paraphrase(PARAPHRASE_TEXTS, smollm2, config=greedy)
    alone = paraphrase(  # model and tokenizer passed separately
        PARAPHRASE_TEXTS, smollm2.model, smollm2.tokenizer, config=greedy, batch_size=1
    )
    prompts = [paraphrase_prompt(text, smollm2.tokenizer) for text in PARAPHRASE_TEXTS]
    assert batches == [prompts, prompts[:1], prompts[1:]]
    assert batched == alone
    assert len(batched) == 2 and all(batched)


@pytest.mark.parametrize(
    ("generated", "original", "expected"),
    [
        ("  The film was dull.  \nI hope this helps!", "The movie was bad.", "The film was dull."),
        ("", "Keep me.", "Keep me."),
        (" \n\n  ", "Keep me.", "Keep me."),
        ('"The car is fast."', "My car is quick.", "The car is fast."),
        ("\u201cThe car is fast.\u201d", "My car is quick.", "The car is fast."),
        ("Paraphrase: It was cold.", "The weather was cold.", "It was cold."),
        ("Paraphrased text:   It was cold.", "The weather was cold.", "It was cold."),
        ("It was cold. I hope that helps! Anything else?", "Cold weekend.", "It was cold."),
        (
            "Broken phone. Bad support. Sorry!",
            "Phone broken. Support bad.",
            "Broken phone. Bad support.",
        ),
        ("it's 'fine' I think", "It is fine.", "it's 'fine' I think"),  # inner quotes kept
        ('"', "Keep me.", '"'),
    ],
)
def test_clean_paraphrase(generated, original, expected):
    assert clean_paraphrase(generated, original) == expected


def test_paraphrase_bad_arguments():
    """Checked before any model is loaded."""
    with pytest.raises(ValueError, match="single str"):
        paraphrase("one text")
    with pytest.raises(ValueError, match=r"texts \[1\] are empty"):
        paraphrase(["fine", "   "])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        paraphrase(["fine"], batch_size=0)
    with pytest.raises(ValueError, match="pass both model and tokenizer"):
        paraphrase(["fine"], model=object())
    assert paraphrase([]) == []  # nothing to do: no model is loaded


# ----------------------------------------------------------------------------------------------
# Back-translation: prompts, the two legs, cleaning and errors, with a fake model (fast)
# ----------------------------------------------------------------------------------------------


class ChatTokenizer:
    """Stands in for SmolLM2's tokenizer: the chat template as plain tagged text."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        turns = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return turns + "<assistant>"


LAST_USER = re.compile(r"<user>Translate from (\w+) to (\w+):\n\n([^<]*)</user><assistant>$")


@pytest.fixture
def fake_generate(monkeypatch):
    """Replaces labkit.generation.generate: "translates" by tagging the text with the target
    language (plus a label and a second line, which cleaning must remove); records each call's
    prompts and config; loading the default model fails the test."""
    import labkit.generation

    calls = []

    def generate(model, prompts, *, config, tokenizer):
        assert model == "model" and isinstance(tokenizer, ChatTokenizer)
        calls.append((list(prompts), config))
        replies = []
        for prompt in prompts:
            source, target, text = LAST_USER.search(prompt).groups()
            replies.append(f"Translation: [{target}] {text}\nHope this helps!")
        return type("Output", (), {"text": replies})

    def no_default_model():
        raise AssertionError("the default SmolLM2 must not be loaded")

    monkeypatch.setattr(labkit.generation, "generate", generate)
    monkeypatch.setattr(augment, "_default_smollm2", no_default_model)
    return calls


def test_translation_prompt_shows_the_worked_example_in_the_asked_direction():
    tok = ChatTokenizer()
    english, french = TRANSLATION_EXAMPLES["French"]
    forth = translation_prompt("I love it", tok, source="English", target="French")
    assert forth == (
        f"<user>Translate from English to French:\n\n{english}</user>"
        f"<assistant>{french}</assistant>"
        "<user>Translate from English to French:\n\nI love it</user><assistant>"
    )
    back = translation_prompt("Je l'adore", tok, source="French", target="English")
    assert back.startswith(f"<user>Translate from French to English:\n\n{french}</user>")
    assert f"<assistant>{english}</assistant>" in back
    bare = translation_prompt("Hallo", tok, source="Dutch", target="English", examples=())
    assert bare == "<user>Translate from Dutch to English:\n\nHallo</user><assistant>"


def test_back_translate_runs_both_legs_in_batches_and_cleans_the_replies(fake_generate):
    texts = ["good day", "bad day", "so-so day"]
    back, pivoted = back_translate(
        texts, "model", ChatTokenizer(), pivot="Spanish", seed=7, batch_size=2
    )
    assert pivoted == ["[Spanish] good day", "[Spanish] bad day", "[Spanish] so-so day"]
    assert back == [f"[English] {p}" for p in pivoted]  # the way back reads the pivot texts
    assert [len(prompts) for prompts, _ in fake_generate] == [2, 1, 2, 1]
    # the legs sample with seeds 7 and 8, with the default decoding otherwise
    assert [config.seed for _, config in fake_generate] == [7, 7, 8, 8]
    assert fake_generate[0][1] == translation_config().replace(seed=7)
    assert fake_generate[0][1].repetition_penalty > 1 and fake_generate[0][1].do_sample


def test_translate_with_a_pretrained_and_a_custom_config(fake_generate):
    from labkit.generation import GenerationConfig
    from labkit.models.pretrained import Pretrained

    greedy = GenerationConfig.preset("greedy", max_new_tokens=5)
    pretrained = Pretrained(model="model", tokenizer=ChatTokenizer(), reference=None)
    out = translate(["hi"], pretrained, target="German", config=greedy, seed=None)
    assert out == ["[German] hi"]
    assert fake_generate[0][1] == greedy.replace(seed=None)


def test_back_translate_bad_arguments(fake_generate):
    """Checked before any model is loaded (the fixture fails the test if one is)."""
    tok = ChatTokenizer()
    with pytest.raises(ValueError, match="single str"):
        back_translate("one text", "model", tok)
    with pytest.raises(ValueError, match=r"texts \[0\] are empty.*nothing to translate"):
        back_translate([""], "model", tok)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        back_translate(["fine"], "model", tok, batch_size=0)
    with pytest.raises(ValueError, match="pass both model and tokenizer"):
        back_translate(["fine"], tokenizer=tok)
    with pytest.raises(ValueError, match=r"no worked example for English -> Klingon.*examples="):
        back_translate(["fine"], "model", tok, pivot="Klingon")
    with pytest.raises(ValueError, match="no worked example for Klingon -> German"):
        translate(["fine"], "model", tok, source="Klingon", target="German")
    assert back_translate([]) == ([], [])  # nothing to do: no model is loaded
    assert fake_generate == []
