"""Tests for labkit.data: round trips, batching (padding, truncation, masks), save/load.

The corpora are the course's own (Shakespeare, tweets); the BPE tokenizer is trained once per
module on the tiny Shakespeare training split, which takes well under a second.
"""

import json

import pytest
import torch

from labkit.data import (
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    load_sentiment,
    load_shakespeare,
    load_tokenizer,
)

ODD_TEXTS = [
    "Emoji 😀🚗👩‍💻 and flags 🇬🇧",
    "naïve café, Straße, Ωμέγα, 東京",
    "control \x00\x07 tab\t cr\r lf\n nbsp\u00a0 zero-width\u200b end",
    "CrowdFlower mojibake: don‰Ûªt ‰Û_ ’¢_äŒÎù",
    "special-looking text <eos> <pad><bos> stays text",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def tiny():
    return load_shakespeare("tiny")


@pytest.fixture(scope="module")
def char_tok(tiny):
    return CharTokenizer.from_corpus(tiny["train"]["text"])


@pytest.fixture(scope="module")
def bpe_tok(tiny):
    return BPETokenizer.from_corpus(tiny["train"]["text"], vocab_size=512)


@pytest.fixture(params=["char", "bpe"])
def tok(request, char_tok, bpe_tok):
    return {"char": char_tok, "bpe": bpe_tok}[request.param]


# ---------------------------------------------------------------------------------------------
# Vocabulary and round trips
# ---------------------------------------------------------------------------------------------


def test_special_ids_are_the_same_in_both_tokenizers(char_tok, bpe_tok):
    for t in (char_tok, bpe_tok):
        assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2, 3)
        assert t.decode([0, 1, 2, 3]) == "".join(SPECIAL_TOKENS)


def test_char_vocabulary_is_the_corpus_characters(tiny, char_tok):
    chars = set("".join(tiny["train"]["text"]))
    assert char_tok.vocab_size == len(SPECIAL_TOKENS) + len(chars)
    assert set(char_tok.chars) == chars
    ids = char_tok.encode("".join(sorted(chars)))
    assert sorted(ids) == list(range(len(SPECIAL_TOKENS), char_tok.vocab_size))


def test_char_round_trip_on_shakespeare(tiny, char_tok):
    text = "".join(tiny["train"]["text"])
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text


def test_char_held_out_text_round_trips_up_to_unseen_characters(tiny, char_tok):
    known = set(char_tok.chars)
    for split in ("validation", "test"):
        text = "".join(tiny[split]["text"])
        expected = "".join(c if c in known else "<unk>" for c in text)
        assert char_tok.decode(char_tok.encode(text)) == expected


def test_char_unknown_characters_become_unk(char_tok):
    ids = char_tok.encode("a😀b")
    assert ids[1] == char_tok.unk_id
    assert ids[0] != char_tok.unk_id and ids[2] != char_tok.unk_id
    assert char_tok.decode(ids) == "a<unk>b"
    assert char_tok.decode(ids, skip_special_tokens=True) == "ab"


def test_bpe_reaches_the_requested_vocabulary(bpe_tok):
    assert bpe_tok.vocab_size == 512
    assert len(set(bpe_tok.hf_tokenizer.get_vocab().values())) == 512


def test_bpe_compresses_shakespeare(tiny, bpe_tok):
    text = "".join(tiny["validation"]["text"])
    assert len(bpe_tok.encode(text)) < 0.6 * len(text)  # char-level would be 1.0


def test_bpe_round_trip_on_shakespeare(tiny, bpe_tok):
    for text in tiny["validation"]["text"]:
        assert bpe_tok.decode(bpe_tok.encode(text)) == text


def test_bpe_round_trip_on_every_non_ascii_tweet_without_unk(bpe_tok):
    tweets = load_sentiment()
    odd = [t for split in tweets.values() for t in split["text"] if not t.isascii()]
    assert len(odd) > 4000  # mojibake, emoji, accents: the hard cases, all of them
    for text in odd:
        ids = bpe_tok.encode(text)
        assert bpe_tok.unk_id not in ids
        assert bpe_tok.decode(ids) == text


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_bpe_round_trip_on_odd_text(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert not set(ids) & {0, 1, 2, 3}  # no special id, not even for a literal "<eos>"
    assert bpe_tok.decode(ids) == text
    assert bpe_tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
def test_literal_special_token_text_is_not_a_special_token(cls):
    tok = cls.from_corpus("a literal <eos> or <pad> is just text")
    ids = tok.encode("just <eos><pad>")
    assert not set(ids) & {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id}
    assert tok.decode(ids, skip_special_tokens=True) == "just <eos><pad>"


def test_add_special_tokens_wraps_with_bos_and_eos(tok):
    plain = tok.encode("To be, or not to be")
    wrapped = tok.encode("To be, or not to be", add_special_tokens=True)
    assert wrapped == [tok.bos_id, *plain, tok.eos_id]
    assert tok.decode(wrapped, skip_special_tokens=True) == "To be, or not to be"
    assert tok.decode(wrapped) == "<bos>To be, or not to be<eos>"


def test_decode_accepts_a_tensor(tok):
    ids = tok.encode("Exeunt.")
    assert tok.decode(torch.tensor(ids)) == "Exeunt."


# ---------------------------------------------------------------------------------------------
# Batches: padding, truncation, masks
# ---------------------------------------------------------------------------------------------

BATCH = ["Ay.", "Who's there?", "Nay, answer me: stand, and unfold yourself."]


def test_batch_pads_right_to_the_longest(tok):
    batch = tok.encode_batch(BATCH)
    lengths = [len(tok.encode(t)) for t in BATCH]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, mask, text, n in zip(
        batch["input_ids"], batch["attention_mask"], BATCH, lengths, strict=True
    ):
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
        assert row[n:].eq(tok.pad_id).all()
        assert tok.decode(row[:n]) == text
    assert tok.decode_batch(batch["input_ids"]) == BATCH


def test_left_padding_puts_pads_first(tok):
    batch = tok.encode_batch(BATCH, padding_side="left", add_special_tokens=True)
    width = batch["input_ids"].shape[1]
    for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], BATCH, strict=True):
        n = len(tok.encode(text)) + 2
        assert mask[: width - n].eq(0).all() and mask[width - n :].eq(1).all()
        assert row[: width - n].eq(tok.pad_id).all()
        assert row[width - n] == tok.bos_id and row[-1] == tok.eos_id
    assert batch["input_ids"][:, -1].eq(tok.eos_id).all()  # every row ends in the last column


def test_truncation_keeps_at_most_max_length_and_keeps_eos(tok):
    batch = tok.encode_batch(BATCH, max_length=6, add_special_tokens=True)
    assert batch["input_ids"].shape[1] == 6
    for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], BATCH, strict=True):
        n = int(mask.sum())
        assert n == min(6, len(tok.encode(text)) + 2)
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert row[1 : n - 1].tolist() == tok.encode(text)[: n - 2]


def test_padding_to_max_length(tok):
    batch = tok.encode_batch(["Ay."], max_length=20, padding="max_length")
    assert batch["input_ids"].shape == (1, 20)
    assert int(batch["attention_mask"].sum()) == len(tok.encode("Ay."))


def test_a_single_string_is_a_batch_of_one(tok):
    assert tok.encode_batch("Ay.")["input_ids"].tolist() == [tok.encode("Ay.")]


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_gives_identical_ids(kind, char_tok, bpe_tok, tmp_path, tiny):
    original = {"char": char_tok, "bpe": bpe_tok}[kind]
    path = tmp_path / "sub" / "tokenizer.json"
    original.save(path)
    for loaded in (type(original).load(path), load_tokenizer(path)):
        assert type(loaded) is type(original)
        assert loaded.vocab_size == original.vocab_size
        for text in [*tiny["test"]["text"][:3], *ODD_TEXTS]:
            assert loaded.encode(text, add_special_tokens=True) == original.encode(
                text, add_special_tokens=True
            )
        assert loaded.encode("<eos>") == original.encode("<eos>")


def test_loading_the_wrong_kind_or_a_bad_file_is_a_clear_error(char_tok, bpe_tok, tmp_path):
    char_path, bpe_path = tmp_path / "char.json", tmp_path / "bpe.json"
    char_tok.save(char_path)
    bpe_tok.save(bpe_path)
    with pytest.raises(ValueError, match="not a saved BPE tokenizer"):
        BPETokenizer.load(char_path)
    with pytest.raises(ValueError, match="not a saved CharTokenizer"):
        CharTokenizer.load(bpe_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer file at .*missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither a CharTokenizer nor a BPE"):
        load_tokenizer(tmp_path / "other.json")


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", ["", [], ["", ""]])
@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
def test_empty_corpus_is_rejected(cls, corpus):
    with pytest.raises(ValueError, match="corpus is empty"):
        cls.from_corpus(corpus)


def test_bad_batch_arguments_are_rejected(tok):
    with pytest.raises(ValueError, match="max_length must be at least 1, got max_length=0"):
        tok.encode_batch(BATCH, max_length=0)
    with pytest.raises(ValueError, match=r"at least 2 \(room for <bos> and <eos>\)"):
        tok.encode_batch(BATCH, max_length=1, add_special_tokens=True)
    with pytest.raises(ValueError, match="padding_side must be one of .* got 'middle'"):
        tok.encode_batch(BATCH, padding_side="middle")
    with pytest.raises(ValueError, match="padding must be one of"):
        tok.encode_batch(BATCH, padding="shortest")
    with pytest.raises(ValueError, match='padding="max_length" needs max_length'):
        tok.encode_batch(BATCH, padding="max_length")
    with pytest.raises(ValueError, match="empty list of texts"):
        tok.encode_batch([])


def test_bad_ids_and_types_are_rejected(tok):
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {tok.vocab_size}\)"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match=r"shape \(2, 3\); use decode_batch"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="encode expects a str, got list"):
        tok.encode(["a", "b"])


def test_bpe_vocab_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        BPETokenizer.from_corpus("some text", vocab_size=100)
