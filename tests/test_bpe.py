"""labkit.data.bpe.ByteLevelBPE: trained merge for merge like a brute-force reference, identical to
SmolLM2's Hugging Face tokenizer, round trips, streaming, special tokens, files and errors."""

import json
import random
from collections import Counter
from itertools import pairwise

import pytest
import regex

from labkit.data import shakespeare_texts
from labkit.data.bpe import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    ByteLevelBPE,
    _chunks,
    bytes_to_unicode,
    count_pretokens,
)

# ----------------------------------------------------------------------------------------------
# A brute-force trainer: recount every pair of every pre-token before each merge
# ----------------------------------------------------------------------------------------------


def reference_train(text: str, vocab_size: int, special_tokens=(), pattern=GPT2_PATTERN):
    """The textbook algorithm, no bookkeeping: the definition training must match."""
    pieces = [text]
    for special in sorted(special_tokens, key=len, reverse=True):
        pieces = [part for piece in pieces for part in piece.split(special)]
    counts = Counter(t for piece in pieces for t in regex.findall(pattern, piece))
    words = {tuple(bytes([b]) for b in w.encode("utf-8")): c for w, c in counts.items()}
    merges = []
    while len(merges) < vocab_size - 256 - len(special_tokens):
        pairs = Counter()
        for word, c in words.items():
            for pair in pairwise(word):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties: greatest (bytes, bytes)
        merges.append(best)
        new_words = {}
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


SMALL_CORPORA = {
    "ten words": "low low low low low lower lower newest newest newest newest newest newest "
    "widest widest widest",
    "repeats": "aaaa aaa aa a bbbb abab abababab aaaaaa ",
    "mixed": "The cat sat. The cat's hat! 123 4567 naïve café 東京 東京 🙂🙂 \n\n  x\ty",
}


@pytest.fixture(scope="module")
def tiny_shakespeare() -> str:
    return "\n\n".join(shakespeare_texts("tiny").values())


@pytest.mark.parametrize("name", list(SMALL_CORPORA))
def test_training_equals_brute_force(name):
    text = SMALL_CORPORA[name]
    bpe = ByteLevelBPE.train(text, vocab_size=256 + 40)
    assert bpe.merges == reference_train(text, 256 + 40)
    assert [bpe.vocab[256 + k] for k in range(len(bpe.merges))] == [a + b for a, b in bpe.merges]


def test_training_equals_brute_force_on_shakespeare(tiny_shakespeare):
    text = tiny_shakespeare[:20_000] + "<|endoftext|>" + tiny_shakespeare[-20_000:]
    specials = ["<|endoftext|>"]
    bpe = ByteLevelBPE.train(text, 256 + 1 + 120, special_tokens=specials)
    assert len(bpe.merges) == 120
    assert bpe.merges == reference_train(text, 256 + 1 + 120, specials)


def test_training_with_gpt4_pattern_equals_brute_force(tiny_shakespeare):
    text = tiny_shakespeare[:5_000] + " 1234567 89"
    bpe = ByteLevelBPE.train(text, 256 + 60, pattern=GPT4_PATTERN)
    assert bpe.merges == reference_train(text, 256 + 60, pattern=GPT4_PATTERN)


def test_training_is_deterministic_and_workers_agree(tiny_shakespeare):
    text = tiny_shakespeare[:100_000]
    one = ByteLevelBPE.train(text, 256 + 100)
    again = ByteLevelBPE.train(text, 256 + 100)
    two = ByteLevelBPE.train(text, 256 + 100, workers=2)
    assert one.merges == again.merges == two.merges
    assert one.vocab == again.vocab == two.vocab
    assert len(_chunks(text, 12)) == 12 and "".join(_chunks(text, 12)) == text
    assert count_pretokens([text]) == count_pretokens([text], workers=3)


def test_training_stops_when_no_pair_is_left():
    bpe = ByteLevelBPE.train("ab ab", vocab_size=1000)
    assert bpe.merges == [(b"a", b"b"), (b" ", b"ab")]
    assert bpe.vocab_size == 258


def test_vocabulary_layout_and_specials_never_merge():
    specials = ["<|endoftext|>", "<|pad|>"]
    text = "<|endoftext|>hello<|endoftext|>hello<|pad|>hello" * 5
    bpe = ByteLevelBPE.train(text, vocab_size=256 + 2 + 10, special_tokens=specials)
    assert all(bpe.vocab[b] == bytes([b]) for b in range(256))
    assert len(bpe.merges) == 4  # then "hello" is one token and no pair is left
    assert bpe.special_tokens == {"<|endoftext|>": 260, "<|pad|>": 261}
    # specials split the text: no merge learns from "|>h" or "o<"
    assert all(b"<" not in a + b and b">" not in a + b for a, b in bpe.merges)
    assert bpe.vocab[259] == b"hello"


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_shakespeare) -> ByteLevelBPE:
    specials = ["<|endoftext|>", "<|endoftext|><|endoftext|>", "<|im_start|>"]
    return ByteLevelBPE.train(tiny_shakespeare[:200_000], 256 + 3 + 300, special_tokens=specials)


def test_encode_replays_training(trained):
    # a word seen often in training becomes one token
    assert trained.encode(" the") == [trained.id_of[b" the"]]
    assert trained.decode(trained.encode(" KING RICHARD")) == " KING RICHARD"


def test_special_tokens_longest_first_and_never_split(trained):
    eot, double = (
        trained.special_tokens["<|endoftext|>"],
        trained.special_tokens["<|endoftext|><|endoftext|>"],
    )
    ids = trained.encode("a<|endoftext|><|endoftext|><|endoftext|>b<|im_start|>")
    assert ids == [
        *trained.encode("a"),
        double,
        eot,
        *trained.encode("b"),
        trained.special_tokens["<|im_start|>"],
    ]
    assert trained.decode(ids) == "a<|endoftext|><|endoftext|><|endoftext|>b<|im_start|>"
    # an incomplete special token is ordinary text
    partial = trained.encode("<|endoftext|")
    assert eot not in partial and trained.decode(partial) == "<|endoftext|"


def test_interface_shared_with_labkit_tokenizers(trained):
    """What labkit.generation and labkit.data.to_lm_blocks call on a tokenizer."""
    eot = trained.special_tokens["<|endoftext|>"]
    assert trained.eos_id == eot
    ids = trained.encode("to be<|endoftext|>", add_special_tokens=False)
    assert ids[-1] == eot and trained.decode(ids, skip_special_tokens=True) == "to be"
    assert trained.decode(ids) == "to be<|endoftext|>"
    with pytest.raises(ValueError, match="adds no <bos>/<eos>"):
        trained.encode("x", add_special_tokens=True)
    assert ByteLevelBPE.train("ab ab", 300).eos_id is None


def test_to_lm_blocks_and_generate_take_a_byte_level_bpe(trained):
    import torch
    from datasets import Dataset

    from labkit.data import to_lm_blocks
    from labkit.generation import GenerationConfig, generate
    from labkit.models.gpt import GPT, GPTConfig

    texts = Dataset.from_dict({"text": ["To be, or not to be.", "That is the question."]})
    blocks = to_lm_blocks(texts, trained, block_size=4, add_eos=True)
    rows = blocks[:]  # {"input_ids": (n, 4), "labels": (n, 4)}
    flat = [*rows["input_ids"].flatten().tolist(), rows["labels"][-1, -1].item()]
    assert (
        flat
        == [*trained.encode("To be, or not to be.<|endoftext|>That is the question.")][: len(flat)]
    )
    eos = trained.eos_id
    config = GPTConfig(
        vocab_size=trained.vocab_size,
        max_len=16,
        n_layers=1,
        n_heads=2,
        d_model=16,
        bos_id=eos,
        eos_id=eos,
    )
    torch.manual_seed(0)
    out = generate(
        GPT(config).eval(), ["To be"], tokenizer=trained, config=GenerationConfig(max_new_tokens=3)
    )
    assert out.sequences[0, : len(trained.encode("To be"))].tolist() == trained.encode("To be")
    new = [i for i in out.new_tokens[0].tolist() if i != eos]
    assert out.text[0] == trained.decode(new)


def test_encode_iterable_equals_encode_on_a_file(trained, tiny_shakespeare, tmp_path):
    text = (
        tiny_shakespeare[:60_000]
        + "\n<|endoftext|>\nend\n\n\n   \n<|endoftext|><|endoftext|>x\n"
        + "no newline " * 300
        + "\n\tTab\n"
    )
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        streamed = list(trained.encode_iterable(f))
    assert streamed == trained.encode(text)
    # pieces cut anywhere, even inside a special token or a run of spaces
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text)), 500))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert list(trained.encode_iterable(iter(pieces))) == trained.encode(text)


def test_encode_iterable_is_lazy(trained):
    def lines():
        yield "first line\nSecond line, long enough to be cut before it"
        raise RuntimeError("read too far")

    stream = trained.encode_iterable(lines())
    head = [next(stream) for _ in trained.encode("first line\n")]  # before the error
    assert trained.decode(head) == "first line\n"


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids(trained):
    ids = trained.encode("é")  # two bytes, never merged in Shakespeare
    assert len(ids) == 2
    assert trained.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="unknown token id 99999"):
        trained.decode([1, 99999])


def random_unicode(rng: random.Random, length: int) -> str:
    """Code points from every plane (0-16), surrogates excluded."""
    chars = []
    for _ in range(length):
        plane = rng.randrange(17)
        while True:
            cp = plane * 0x10000 + rng.randrange(0x10000)
            if not 0xD800 <= cp <= 0xDFFF:
                break
        chars.append(chr(cp))
        if rng.random() < 0.3:
            chars.append(rng.choice(" \n\tab1.'"))
    return "".join(chars)


def test_round_trip_random_unicode_every_plane(trained):
    rng = random.Random(1234)
    for _ in range(200):
        text = random_unicode(rng, rng.randrange(0, 60))
        assert trained.decode(trained.encode(text)) == text


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is in the dev extras; the seeded test above still runs
    given = None

if given is not None:
    _ANY_TEXT = st.text(
        alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=["Cs"])
    )
    _SMALL_BPE = ByteLevelBPE.train(
        SMALL_CORPORA["mixed"] * 3 + SMALL_CORPORA["ten words"], 256 + 1 + 50, ["<|endoftext|>"]
    )

    @settings(max_examples=300, deadline=None)
    @given(_ANY_TEXT)
    def test_round_trip_hypothesis(text):
        assert _SMALL_BPE.decode(_SMALL_BPE.encode(text)) == text


# ----------------------------------------------------------------------------------------------
# Files and errors
# ----------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(trained, tmp_path):
    trained.save(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text("utf-8"))
    assert vocab["Ġthe"] == trained.id_of[b" the"]  # GPT-2's alphabet: space is "Ġ"
    assert (tmp_path / "merges.txt").read_text("utf-8").splitlines()[0] == "#version: 0.2"
    loaded = ByteLevelBPE.load(tmp_path)
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert loaded.special_tokens == trained.special_tokens
    text = "To be, or not to be<|endoftext|> 🙂"
    assert loaded.encode(text) == trained.encode(text)
    plain = ByteLevelBPE.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert plain.special_tokens == {} and plain.encode(" the") == trained.encode(" the")


def test_byte_alphabet_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_malformed_files_name_the_line(trained, tmp_path):
    trained.save(tmp_path)
    merges = (tmp_path / "merges.txt").read_text("utf-8").splitlines()
    broken = tmp_path / "broken_merges.txt"
    broken.write_text("\n".join([*merges[:5], "onlyone", *merges[5:]]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken_merges.txt line 6: expected two tokens"):
        ByteLevelBPE.from_files(tmp_path / "vocab.json", broken)
    broken.write_text("\n".join([*merges[:3], "Ġzzqq Ġxxyy"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 4: 'Ġzzqq' of the merge"):
        ByteLevelBPE.from_files(tmp_path / "vocab.json", broken)
    bad_json = tmp_path / "bad_vocab.json"
    bad_json.write_text('{\n"a": 0,\n"b": 1\n"c": 2\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab.json line 4, column 1: not valid JSON"):
        ByteLevelBPE.from_files(bad_json, tmp_path / "merges.txt")
    bad_json.write_text('{\n"a": 0,\n"b c": 1\n}', encoding="utf-8")  # a literal space
    with pytest.raises(ValueError, match=r"bad_vocab.json line 3: token 'b c' has the character"):
        ByteLevelBPE.from_files(bad_json, tmp_path / "merges.txt")
    bad_json.write_text('{\n"a": 0,\n"b": 0\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab.json line 3: id 0 is given twice"):
        ByteLevelBPE.from_files(bad_json, tmp_path / "merges.txt")
    bad_json.write_text('{\n"a": 0,\n"b": -1\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: the id of 'b' must be a non-negative int"):
        ByteLevelBPE.from_files(bad_json, tmp_path / "merges.txt")


def test_clear_errors():
    with pytest.raises(ValueError, match=r"vocab_size must be at least 258 \(256 byte tokens \+ 2"):
        ByteLevelBPE.train("abc", 257, special_tokens=["<a>", "<b>"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ByteLevelBPE({i: bytes([i]) for i in range(256)}, [(b"a", b"bc")])
    no_e = ByteLevelBPE({i: bytes([i]) for i in range(256) if i != ord("e")}, [])
    with pytest.raises(ValueError, match="byte 0x65 of 'hello' has no token"):
        no_e.encode("hello")


# ----------------------------------------------------------------------------------------------
# SmolLM2's tokenizer, rebuilt
# ----------------------------------------------------------------------------------------------

VARIED = {
    "prose": "The quick brown fox jumps over the lazy dog. It's what they'd've wanted, isn't it?",
    "code": 'def f(x):\n\tif x  >   1:\n\t\treturn   x ** 2  # squared\n\n\n    print("hi")\n',
    "numbers": "3.14159265358979 1,000,000 2026-12-05 0x1F 123456789012345678901234567890",
    "german": "Größenwahn, Übermäßig und Straße: Äpfel schmecken süß.",
    "french": "Déjà vu : naïve façade, où est l'hôtel ? « Ça va ! »",
    "chinese": "我们今天学习分词器。机器学习很有趣，对吧？",
    "emoji": "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, ❤️‍🔥 fire, 🧑🏿‍💻 coder",
    "whitespace": "   leading\n\n\n  trailing   \t\t\n \r\n end",
    "specials": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
}


@pytest.fixture(scope="module")
def smollm2_bpe(smollm2_tokenizer) -> ByteLevelBPE:
    return ByteLevelBPE.from_hf(smollm2_tokenizer)


@pytest.mark.parametrize("name", list(VARIED))
def test_from_hf_smollm2_ids_equal_hugging_face(name, smollm2_bpe, smollm2_tokenizer):
    text = VARIED[name]
    ids = smollm2_bpe.encode(text)
    assert ids == smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_bpe.decode(ids) == text


def test_from_hf_smollm2_on_a_megabyte_of_shakespeare(smollm2_bpe, smollm2_tokenizer):
    text = "\n\n".join(shakespeare_texts("complete").values())[1_000_000:2_000_000]
    ids = smollm2_bpe.encode(text)
    assert ids == smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_bpe.decode(ids) == text
    assert 3.0 < len(text.encode()) / len(ids) < 5.0  # English: ~4 bytes per token


def test_from_hf_smollm2_random_text_and_structure(smollm2_bpe, smollm2_tokenizer):
    assert len(smollm2_bpe.merges) == 48900 and smollm2_bpe.vocab_size == 49152
    assert smollm2_bpe.special_tokens["<|im_start|>"] == 1
    assert smollm2_bpe.merges[0] == (b" ", b"t")
    rng = random.Random(7)
    # SmolLM2 has no token for some bytes (e.g. 0xF1, 0xF2: planes 4-11): it can't encode
    # those characters (Hugging Face drops them silently, labkit raises).
    missing = {b for b in range(256) if bytes([b]) not in smollm2_bpe.id_of}
    assert {0xC0, 0xC1, 0xF5, 0xFF} <= missing
    for _ in range(100):
        text = random_unicode(rng, rng.randrange(1, 40))
        if missing & set(text.encode("utf-8")):
            with pytest.raises(ValueError, match="has no token in this vocabulary"):
                smollm2_bpe.encode(text)
            continue
        ids = smollm2_bpe.encode(text)
        assert ids == smollm2_tokenizer.encode(text, add_special_tokens=False)
        assert smollm2_bpe.decode(ids) == text


def test_from_files_reads_smollm2s_vocab_and_merges_in_gpt2_format(smollm2_tokenizer, tmp_path):
    """The GPT-2 files written straight from Hugging Face's data (not by save) read back to a
    tokenizer with Hugging Face's ids."""
    spec = json.loads(smollm2_tokenizer.backend_tokenizer.to_str())
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    specials = [t["content"] for t in spec["added_tokens"]]
    bpe = ByteLevelBPE.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", specials)
    for text in VARIED.values():
        assert bpe.encode(text) == smollm2_tokenizer.encode(text, add_special_tokens=False)


def test_from_hf_of_a_tokenizer_trained_by_labkit_data_bpetokenizer(tiny_shakespeare):
    """The Hugging Face-trained BPETokenizer of labkit.data.tokenizers, read into ByteLevelBPE
    (a raw tokenizers.Tokenizer this time), gives the same ids."""
    from labkit.data.tokenizers import BPETokenizer

    hf_trained = BPETokenizer.from_corpus([tiny_shakespeare[:50_000]], vocab_size=400)
    bpe = ByteLevelBPE.from_hf(hf_trained.hf_tokenizer)
    assert bpe.vocab_size == hf_trained.vocab_size
    assert bpe.special_tokens == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for text in [tiny_shakespeare[-3_000:], *VARIED.values()]:
        if "<" in text:  # BPETokenizer encodes a literal "<eos>" as text, ByteLevelBPE as the token
            continue
        assert bpe.encode(text) == hf_trained.encode(text), text[:40]
        assert bpe.decode(bpe.encode(text)) == text
