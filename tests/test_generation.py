"""labkit.generation: logits processors, greedy / sampling / beam search, cache, streaming.

Most checks use hand-made models whose next-token distribution is a fixed table indexed by the
last token (``TableLM``) or that copy their source (``CopySeq2Seq``), so every expected token
and score can be worked out by hand. The labkit models (``GPT``, ``Llama``, ``Transformer``,
tiny presets) prove that the KV cache and left padding change nothing, and SmolLM2 proves the
whole loop equals ``transformers``' ``generate`` token for token.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    apply_temperature,
    generate,
    stream,
    suppress_eos,
    top_k_filter,
    top_p_filter,
)
from labkit.models.base import CausalLMOutput, check_input_ids, last_positions
from labkit.models.gpt import GPT
from labkit.models.llama import Llama
from labkit.models.transformer import Seq2SeqOutput, Transformer
from labkit.nn.cache import EncoderDecoderCache, ModelCache

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # the labkit tokenizers' special ids, used by the toy models

# ----------------------------------------------------------------------------------------------
# Hand-checkable models and tokenizers
# ----------------------------------------------------------------------------------------------


class TableLM(nn.Module):
    """Decoder-only model: the next-token log-probabilities are ``table[last token]`` (V, V).

    It follows the model contract (attention_mask over past + new tokens, a ModelCache that
    grows by the tokens fed) and records how many tokens each call was fed.
    """

    def __init__(self, table: Tensor, max_len: int = 64, eos_id: int | None = EOS) -> None:
        super().__init__()
        self.register_buffer("table", table)
        vocab = table.shape[0]
        self.config = SimpleNamespace(
            vocab_size=vocab, max_len=max_len, bos_id=BOS, eos_id=eos_id, pad_id=PAD,
            is_encoder_decoder=False,
        )  # fmt: skip
        self.calls: list[int] = []

    def new_cache(self) -> ModelCache:
        return ModelCache.empty(1)

    def forward(self, input_ids, *, attention_mask=None, positions=None, cache=None,
                need_weights=False, logits_to_keep=0) -> CausalLMOutput:  # fmt: skip
        check_input_ids(input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        past = 0 if cache is None else cache.seq_len
        if attention_mask is not None and attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} != {(batch, past + seq)}"
            )
        if cache is not None:
            kv = input_ids[:, None, :, None].float()  # (B, 1, T, 1): only its length matters
            cache.layers[0].update(kv, kv)
        self.calls.append(seq)
        logits = self.table[last_positions(input_ids[..., None], logits_to_keep)[..., 0]]
        return CausalLMOutput(logits, logits, None)  # (B, T or logits_to_keep, V)


def table_lm(vocab: int, rows: dict[int, dict[int, float]], **kwargs) -> TableLM:
    """A TableLM whose row ``token`` gives probability ``p`` to each ``next: p`` (0 elsewhere);
    rows not listed are uniform."""
    probs = torch.full((vocab, vocab), 1.0 / vocab)
    for token, nexts in rows.items():
        probs[token] = 0.0
        for nxt, p in nexts.items():
            probs[token, nxt] = p
    return TableLM(probs.log(), **kwargs)


class CopySeq2Seq(nn.Module):
    """Encoder-decoder that copies its source, then says eos: target position i (the start token
    is position 0) predicts source token i with probability ``P_COPY``."""

    LOGIT = 5.0

    def __init__(self, vocab: int = 10) -> None:
        super().__init__()
        self.register_buffer("eye", torch.eye(vocab))
        self.config = SimpleNamespace(
            src_vocab_size=vocab, tgt_vocab_size=vocab, max_len=32, bos_id=BOS, eos_id=EOS,
            pad_id=PAD, is_encoder_decoder=True,
        )  # fmt: skip

    def new_cache(self) -> EncoderDecoderCache:
        return EncoderDecoderCache.empty(1)

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        ids = src_ids if src_mask is None else src_ids.masked_fill(src_mask == 0, EOS)
        return self.eye[ids]  # (B, S, V) one-hot, pads read as eos

    def decode(self, tgt_ids, memory, *, src_mask=None, tgt_mask=None, cache=None,
               need_weights=False) -> Seq2SeqOutput:  # fmt: skip
        batch, seq = tgt_ids.shape
        past = 0 if cache is None else cache.seq_len
        if cache is not None:
            kv = tgt_ids[:, None, :, None].float()
            cache.layers[0].self_attn.update(kv, kv)
        tail = self.eye[EOS].expand(batch, self.config.max_len, -1)  # eos after the source
        source = torch.cat([memory, tail], dim=1)  # (B, S + max_len, V)
        logits = self.LOGIT * source[:, past : past + seq]  # (B, T, V)
        return Seq2SeqOutput(logits, None, None)


P_COPY = math.exp(CopySeq2Seq.LOGIT) / (math.exp(CopySeq2Seq.LOGIT) + 9)


class PieceTokenizer:
    """Tokens are fixed strings (several characters each); ids 0-3 are the special tokens."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = ["<pad>", "<unk>", "<bos>", "<eos>", *pieces]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        while text:  # greedy longest match
            piece = max((p for p in self.pieces[4:] if text.startswith(p)), key=len)
            ids.append(self.pieces.index(piece))
            text = text[len(piece) :]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i < 4))


class ByteTokenizer:
    """One token per UTF-8 byte (id = 4 + byte), so one character may span several tokens."""

    vocab_size = 260

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [4 + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


def chain_lm(tokens: list[int], vocab: int) -> TableLM:
    """A TableLM that, from ``tokens[i]``, almost surely says ``tokens[i + 1]``."""
    return table_lm(vocab, {a: {b: 1.0} for a, b in zip(tokens, tokens[1:], strict=False)})


# ----------------------------------------------------------------------------------------------
# GenerationConfig
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature.*0.0"),
        ({"do_sample": True, "temperature": -1.0}, "temperature.*-1.0"),
        ({"top_p": 0.0}, "top_p.*0.0"),
        ({"top_p": 1.5}, "top_p.*1.5"),
        ({"top_k": 0}, "top_k.*0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty.*0.0"),
        ({"max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens.*3"),
        ({"max_new_tokens": 0}, "max_new_tokens.*0"),
        ({"num_beams": 0}, "num_beams.*0"),
        ({"num_beams": 2, "do_sample": True}, "num_beams=2"),
        ({"num_beams": 2, "stop_strings": ("x",)}, "num_beams=2"),
        ({"stop_strings": ("",)}, "stop_strings"),
    ],
)
def test_bad_config_values_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**fields)


def test_presets_and_overrides():
    assert GenerationConfig.preset("greedy") == GenerationConfig()
    top_k = GenerationConfig.preset("top-k")
    assert (top_k.do_sample, top_k.top_k, top_k.temperature) == (True, 50, 0.7)
    nucleus = GenerationConfig.preset("nucleus", top_p=0.95)
    assert (nucleus.do_sample, nucleus.top_p, nucleus.temperature) == (True, 0.95, 0.7)
    assert GenerationConfig.preset("beam").num_beams == 4
    config = GenerationConfig(eos_id=[3, 4], stop_strings="\n")
    assert (config.eos_id, config.stop_strings) == ((3, 4), ("\n",))
    assert config.replace(top_k=5).top_k == 5 and config.top_k is None  # frozen: copies
    with pytest.raises(ValueError, match="top_k.*0"):
        config.replace(top_k=0)
    with pytest.raises(ValueError, match="unknown preset 'creative'"):
        GenerationConfig.preset("creative")
    with pytest.raises(ValueError, match="num_beams.*0"):  # overrides are validated too
        GenerationConfig.preset("beam", num_beams=0)
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationConfig.preset("greedy", max_tokens=3)


# ----------------------------------------------------------------------------------------------
# Logits processors
# ----------------------------------------------------------------------------------------------


def test_repetition_penalty_hand_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    seen = torch.tensor([[0, 1, 1]])  # tokens 0 (positive logit) and 1 (negative), 1 twice
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0, -2.0]]))
    # masked-out (padding) positions do not count: only token 0 is penalised here
    out = apply_repetition_penalty(logits, torch.tensor([[4, 0]]), 2.0, torch.tensor([[0, 1]]))
    assert torch.equal(out, torch.tensor([[1.0, -1.0, 0.5, 3.0, -2.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]]))  # input untouched
    with pytest.raises(ValueError, match="penalty must be > 0, got 0"):
        apply_repetition_penalty(logits, seen, 0)
    with pytest.raises(ValueError, match=r"\(1, 5\) and \(2, 3\)"):
        apply_repetition_penalty(logits, seen.expand(2, 3), 2.0)


def test_repetition_penalty_below_one_favours_seen_tokens_and_shapes_are_checked():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[0, 1]])
    assert torch.equal(
        apply_repetition_penalty(logits, seen, 0.5), torch.tensor([[4.0, -0.5, 0.5]])
    )
    message = (
        r"^logits must be \(batch, vocab\) and generated_ids \(batch, seq\) with the same "
        r"batch, got \(1, 3, 1\) and \(1, 2\)$"
    )
    with pytest.raises(ValueError, match=message):
        apply_repetition_penalty(logits[..., None], seen, 2.0)
    with pytest.raises(ValueError, match=r"^mask must match generated_ids \(1, 2\), got \(1, 3\)$"):
        apply_repetition_penalty(logits, seen, 2.0, torch.ones(1, 3))


def test_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 50)
    seen = torch.randint(0, 50, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


PROBS = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])  # ranked: 1 (.5), 3 (.2), 4 (.15), 0, 2


def kept(logits: Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = PROBS.log()
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 10)) == {0, 1, 2, 3, 4}
    assert kept(top_k_filter(torch.tensor([1.0, 2.0, 2.0, 0.0]), 2)) == {1, 2}  # ties kept
    # smallest set with probability >= p: .5 | .5+.2 | .5+.2+.15 | ...
    assert kept(top_p_filter(logits, 0.3)) == {1}
    assert kept(top_p_filter(logits, 0.6)) == {1, 3}
    assert kept(top_p_filter(logits, 0.75)) == {1, 3, 4}
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3, 4}
    assert kept(top_p_filter(torch.tensor([0.0, 30.0, 0.0]), 1e-6)) == {1}  # never empty
    # Four equal tokens (exactly 0.25 each): two already hold p = 0.5, the third is dropped.
    assert len(kept(top_p_filter(torch.zeros(4), 0.5))) == 2
    other = torch.tensor([0.2, 0.1, 0.6, 0.05, 0.05]).log()
    batch = top_p_filter(torch.stack([logits, other]), 0.72)  # row by row
    assert kept(batch[0]) == {1, 3, 4} and kept(batch[1]) == {2, 0}
    torch.testing.assert_close(top_k_filter(logits, 2)[[1, 3]], logits[[1, 3]])  # kept as is
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        top_k_filter(logits, 0)
    for p in (1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match=rf"p must be in \(0, 1\], got {p}"):
            top_p_filter(logits, p)


def test_temperature_and_eos_suppression():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([[2.0, 4.0, 8.0]]))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        apply_temperature(logits, 0)
    out = suppress_eos(logits, [2, 0])
    assert out[0, 1] == 2.0 and out[0, 0] == out[0, 2] == float("-inf")
    assert torch.equal(suppress_eos(logits[0], [1]), torch.tensor([1.0, float("-inf"), 4.0]))
    assert suppress_eos(logits, []) is logits


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

SAMPLE_VOCAB = 9  # pad, unk, bos, eos, and tokens 4..8 drawn with PROBS from <bos>


def first_token_samples(n: int = 400, **overrides) -> set[int]:
    model = table_lm(SAMPLE_VOCAB, {BOS: {4 + i: float(p) for i, p in enumerate(PROBS)}})
    prompts = torch.full((n, 1), BOS)
    out = generate(model, prompts, max_new_tokens=1, do_sample=True, seed=0, **overrides)
    return set((out.new_tokens[:, 0] - 4).tolist())


def test_sampling_stays_inside_top_k_and_top_p():
    assert first_token_samples() == {0, 1, 2, 3, 4}  # every token shows up unfiltered
    assert first_token_samples(top_k=2) == {1, 3}
    assert first_token_samples(top_p=0.75) == {1, 3, 4}
    assert first_token_samples(top_p=0.6, top_k=1) == {1}
    assert first_token_samples(temperature=0.05) == {1}  # nearly greedy


def test_seed_makes_sampling_reproducible(device):
    model = GPT.from_preset("tiny").to(device)
    prompts = torch.randint(0, 256, (4, 5))
    runs = []
    for global_seed, seed in ((1, 7), (2, 7), (3, 8)):
        torch.manual_seed(global_seed)  # the global state must not matter
        runs.append(generate(model, prompts, max_new_tokens=12, do_sample=True, seed=seed))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    assert runs[0].sequences.device.type == device.type


# ----------------------------------------------------------------------------------------------
# Beam search, eos, min_new_tokens
# ----------------------------------------------------------------------------------------------

A, B, C, D = 4, 5, 6, 7
# Greedy takes A (0.6) and then can only reach 0.6 * 0.3; B (0.4) leads to 0.4 * 0.9.
BEAM_TABLE = {BOS: {A: 0.6, B: 0.4}, A: {C: 0.3, D: 0.25, A: 0.25, B: 0.2}, B: {C: 0.9, D: 0.1},
              C: {EOS: 1.0}, D: {EOS: 1.0}}  # fmt: skip


def test_beam_search_finds_the_better_path_that_greedy_misses():
    model = table_lm(8, BEAM_TABLE)
    prompt = torch.tensor([[BOS]])
    greedy = generate(model, prompt, max_new_tokens=10)
    assert greedy.new_tokens.tolist() == [[A, C, EOS]]
    assert greedy.scores.item() == pytest.approx(math.log(0.6 * 0.3), abs=1e-6)

    beam = generate(model, prompt, max_new_tokens=10, num_beams=2)
    assert beam.new_tokens.tolist() == [[B, C, EOS]]
    assert beam.sequences.tolist() == [[BOS, B, C, EOS]]
    # score = sum of log-probs / generated length ** length_penalty (eos counts)
    assert beam.scores.item() == pytest.approx(math.log(0.4 * 0.9) / 3, abs=1e-6)
    assert beam.beam_tokens.tolist() == [[[B, C, EOS], [A, C, EOS]]]
    expected = [math.log(0.36) / 3, math.log(0.18) / 3]
    assert beam.beam_scores[0].tolist() == pytest.approx(expected, abs=1e-6)

    raw = generate(model, prompt, max_new_tokens=10, num_beams=2, length_penalty=0.0)
    assert raw.scores.item() == pytest.approx(math.log(0.36), abs=1e-6)


def test_beam_search_without_eos_ends_at_max_new_tokens():
    model = table_lm(8, BEAM_TABLE)
    out = generate(model, torch.tensor([[BOS]]), max_new_tokens=2, num_beams=2, length_penalty=0)
    assert out.new_tokens.tolist() == [[B, C]]
    assert out.beam_scores[0].tolist() == pytest.approx([math.log(0.36), math.log(0.18)])


def test_min_new_tokens_bans_eos_until_reached(device):
    # eos is the most likely token everywhere
    model = table_lm(7, {t: {EOS: 0.7, 4: 0.1, 5: 0.1, 6: 0.1} for t in range(7)}).to(device)
    prompts = torch.full((16, 1), BOS)
    assert generate(model, prompts[:1], max_new_tokens=6).new_tokens.tolist() == [[EOS]]
    out = generate(model, prompts[:1], max_new_tokens=6, min_new_tokens=3)
    assert out.new_tokens.tolist() == [[4, 4, 4, EOS]]
    sampled = generate(model, prompts, max_new_tokens=6, min_new_tokens=3, do_sample=True, seed=0)
    assert not (sampled.new_tokens[:, :3] == EOS).any()
    beams = generate(model, prompts[:2], max_new_tokens=6, min_new_tokens=3, num_beams=3)
    assert not (beams.beam_tokens[..., :3] == EOS).any()
    assert (beams.new_tokens[:, 3] == EOS).all()


def test_finished_rows_get_padding_and_generation_stops_early():
    # from <bos>: 4 5 6 eos; from 6: eos
    model = chain_lm([BOS, 4, 5, 6, EOS], vocab=8)
    out = generate(model, torch.tensor([[BOS], [6]]), max_new_tokens=20)
    assert out.new_tokens.tolist() == [[4, 5, 6, EOS], [EOS, PAD, PAD, PAD]]
    assert out.sequences.tolist() == [[BOS, 4, 5, 6, EOS], [6, EOS, PAD, PAD, PAD]]
    model.calls.clear()
    assert generate(model, torch.tensor([[BOS]]), eos_id=[5, 6]).new_tokens.tolist() == [[4, 5]]
    assert model.calls == [1, 1]  # prefill, then one token: stopped after two steps


def test_repetition_penalty_changes_greedy_choice():
    # from every token: 4 (p = 0.5), 5 (0.3), 6 (0.2)
    model = table_lm(7, {t: {4: 0.5, 5: 0.3, 6: 0.2} for t in range(7)}, eos_id=None)
    plain = generate(model, torch.tensor([[BOS]]), max_new_tokens=3)
    assert plain.new_tokens.tolist() == [[4, 4, 4]]
    # The logits are log-probs (negative), so a seen token's logit is multiplied by the penalty.
    # 1.5: log .5 * 1.5 = -1.04 still beats log .3 = -1.20, so 4 again.
    mild = generate(model, torch.tensor([[BOS]]), max_new_tokens=3, repetition_penalty=1.5)
    assert mild.new_tokens.tolist() == [[4, 4, 4]]
    # 2.0: 4 drops to -1.39 < -1.20, so 5; then 5 drops to -2.41 and 4 (-1.39) beats 6 (-1.61).
    penalised = generate(model, torch.tensor([[BOS]]), max_new_tokens=3, repetition_penalty=2.0)
    assert penalised.new_tokens.tolist() == [[4, 5, 4]]


# ----------------------------------------------------------------------------------------------
# Stop strings, text prompts, streaming
# ----------------------------------------------------------------------------------------------

PIECES = PieceTokenizer(["ab", "c.d", "ef", "g"])  # ids 4, 5, 6, 7
CYCLE = [BOS, 4, 5, 6, 7, 4, 5, 6, 7, 4]  # abc.defgabc.defgab ...


def test_stop_strings_stop_and_cut_the_text_after_the_stop_string():
    model = chain_lm(CYCLE[:6], vocab=8)  # bos ab c.d ef g ab, then ab -> c.d again
    prompt = torch.tensor([[BOS]])
    # "." is inside the token "c.d": generation stops on that token, the text is cut after "."
    out = generate(model, prompt, tokenizer=PIECES, stop_strings=(".",), max_new_tokens=10)
    assert out.new_tokens.tolist() == [[4, 5]] and out.text == ["abc."]
    # a stop string spanning tokens
    out = generate(model, prompt, tokenizer=PIECES, stop_strings=["xyz", "efg", "gab"])
    assert out.new_tokens.tolist() == [[4, 5, 6, 7]] and out.text == ["abc.defg"]
    # two stop strings completed by one token: the text is cut after the earlier-ending one
    out = generate(model, prompt, tokenizer=PIECES, stop_strings=["bc.d", "c."])
    assert out.text == ["abc."]
    # rows stop independently; a finished row is padded
    out = generate(model, torch.tensor([[BOS], [6]]), tokenizer=PIECES, stop_strings=("c.",))
    assert out.new_tokens.tolist() == [[4, 5, PAD], [7, 4, 5]]
    assert out.text == ["abc.", "gabc."]
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, prompt, stop_strings=("x",))


def test_text_prompts_are_left_padded_and_match_single_prompts():
    model = chain_lm(CYCLE, vocab=8)
    batch = generate(model, ["ab", "c.def"], tokenizer=PIECES, max_new_tokens=3)
    assert batch.sequences.tolist() == [[PAD, 4, 5, 6, 7], [5, 6, 7, 4, 5]]
    assert batch.text == ["c.defg", "gabc.d"]
    for i, text in enumerate(["ab", "c.def"]):
        assert generate(model, text, tokenizer=PIECES, max_new_tokens=3).text == [batch.text[i]]


def test_stream_pieces_join_to_the_generated_text():
    model = chain_lm(CYCLE, vocab=8)
    config = GenerationConfig(max_new_tokens=6, stop_strings=("fga",))
    pieces = list(stream(model, "ab", PIECES, config))
    assert pieces == ["c.d", "ef", "g", "a"]  # "ab" completes "fga": only its "a" is shown
    assert "".join(pieces) == generate(model, "ab", tokenizer=PIECES, config=config).text[0]


def test_stream_holds_back_split_multibyte_characters():
    tokenizer = ByteTokenizer()
    text = "hé✓"  # é is 2 bytes, ✓ is 3: a character is complete only after its last byte
    model = chain_lm([BOS, *tokenizer.encode(text), EOS], vocab=260)
    pieces = list(stream(model, torch.tensor([BOS]), tokenizer, max_new_tokens=10))
    assert pieces == ["h", "é", "✓"]
    out = generate(model, torch.tensor([BOS]), tokenizer=tokenizer, max_new_tokens=10)
    assert out.text == [text] and out.new_tokens[0, -1] == EOS


def test_stream_with_sampling_matches_generate_with_the_same_seed():
    tokenizer = ByteTokenizer()
    model = Llama.from_preset("tiny", vocab_size=260)
    config = GenerationConfig.preset("nucleus", seed=3, max_new_tokens=15, eos_id=EOS)
    expected = generate(model, "hi", tokenizer=tokenizer, config=config).text[0]
    assert "".join(stream(model, "hi", tokenizer, config)) == expected
    with pytest.raises(ValueError, match="num_beams=2"):
        stream(model, "hi", tokenizer, num_beams=2)


# ----------------------------------------------------------------------------------------------
# Inputs, modes, devices
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    model = chain_lm(CYCLE, vocab=8)
    ids = torch.tensor([[4, 5, 6], [5, 6, PAD]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match=r"\(2, 2\) must match input_ids \(2, 3\)"):
        generate(model, ids, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, ["ab"])
    with pytest.raises(ValueError, match="max_len=64"):
        generate(model, ids, max_new_tokens=63)
    with pytest.raises(ValueError, match=r"vocab_size=8"):
        generate(model, torch.tensor([[9]]))
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, ids, eos_id=8)


def test_model_runs_in_eval_mode_and_outputs_are_ordinary_tensors():
    model = GPT.from_preset("tiny", dropout=0.5).train()
    prompt = torch.randint(0, 256, (2, 4))
    first = generate(model, prompt, max_new_tokens=8)
    assert torch.equal(first.sequences, generate(model, prompt, max_new_tokens=8).sequences)
    assert model.training  # restored
    assert not first.sequences.is_inference()  # usable in autograd, e.g. to train on
    model(first.sequences).logits.sum().backward()


def test_cache_feeds_the_prompt_once_then_one_token_per_step():
    model = chain_lm(CYCLE, vocab=8)
    prompt = torch.tensor([[BOS, 4, 5]])
    cached = generate(model, prompt, max_new_tokens=4)
    assert model.calls == [3, 1, 1, 1]
    model.calls.clear()
    full = generate(model, prompt, max_new_tokens=4, use_cache=False)
    assert model.calls == [3, 4, 5, 6]
    assert torch.equal(cached.sequences, full.sequences)


# ----------------------------------------------------------------------------------------------
# Encoder-decoder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("use_cache", [True, False])
def test_encoder_decoder_decodes_from_the_start_token(num_beams, use_cache):
    model = CopySeq2Seq()
    src = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    out = generate(model, src, torch.tensor([[1, 1, 1], [1, 1, 0]]), num_beams=num_beams,
                   use_cache=use_cache)  # fmt: skip
    assert out.sequences.tolist() == [[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS, PAD]]
    assert out.new_tokens.tolist() == [[5, 6, 7, EOS], [8, 9, EOS, PAD]]
    logp = math.log(P_COPY)
    expected = [4 * logp, 3 * logp] if num_beams == 1 else [logp, logp]  # beams: / length
    assert out.scores.tolist() == pytest.approx(expected, abs=1e-5)
    start = generate(model, src[:1], decoder_start_id=9, max_new_tokens=2)
    assert start.sequences.tolist() == [[9, 5, 6]]


# ----------------------------------------------------------------------------------------------
# labkit models: the cache and left padding change nothing
# ----------------------------------------------------------------------------------------------

MODELS = {"gpt": GPT, "llama": Llama, "transformer": Transformer}
STRATEGIES = {
    "greedy": {},
    "greedy+penalty": {"repetition_penalty": 3.0},
    "sampling": {"do_sample": True, "top_k": 20, "seed": 0},
    "beam": {"num_beams": 3, "length_penalty": 0.8},
}


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_logits_to_keep_gives_the_last_positions_logits(name):
    torch.manual_seed(0)
    model = MODELS[name].from_preset("tiny").eval()
    ids = torch.randint(4, 64, (2, 5))
    with torch.no_grad():
        full = model(ids).logits  # (2, 5, V)
        for keep, expected in ((1, full[:, -1:]), (3, full[:, -3:]), (9, full), (0, full)):
            assert torch.allclose(model(ids, logits_to_keep=keep).logits, expected, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model(ids, logits_to_keep=-1)


@pytest.mark.parametrize("static", [False, True])
def test_generation_asks_for_the_logits_it_uses_only(static):
    """The prompt's other positions skip the LM head: it sees one row per step, 1 + k rows in
    a speculative check, never the whole prompt."""
    torch.manual_seed(0)
    model = Llama.from_preset("tiny").eval()
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7]])
    out = generate(model, prompt, max_new_tokens=4, static_cache=static)
    assert rows == [1, 1, 1, 1]
    full = generate(model, prompt, max_new_tokens=4, use_cache=False)  # every step, all rows
    assert torch.equal(out.new_tokens, full.new_tokens)
    rows.clear()
    generate(model, prompt, max_new_tokens=4, speculative="prompt-lookup", draft_tokens=3)
    assert max(rows) == 1 + 3 < prompt.shape[1]  # a check of 3 drafts, the prompt's included


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_cache_gives_the_same_tokens_as_full_recompute(name, strategy, device, peaked):
    model = peaked(MODELS[name].from_preset("tiny")).to(device)
    ids = torch.randint(4, 64, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    if name == "transformer":
        mask = mask.flip(1)  # encoder sources are right-padded
    kwargs = dict(max_new_tokens=10, eos_id=(), **STRATEGIES[strategy])  # () = no eos
    cached = generate(model, ids, mask, **kwargs)
    full = generate(model, ids, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-4, rtol=0)
    assert cached.new_tokens.shape == (2, 10)
    if strategy == "greedy+penalty":  # the penalty forbids the tiny models' favourite loop
        assert len(set(cached.new_tokens[0].tolist())) > 1


@pytest.mark.parametrize("strategy", ["greedy+penalty", "beam"])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_left_padded_batch_gives_each_prompt_its_own_tokens(name, strategy, device, peaked):
    model = peaked(MODELS[name].from_preset("tiny")).to(device)
    prompts = [torch.randint(4, 256, (n,)) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (width - len(p), 0), value=PAD) for p in prompts])
    mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    kwargs = dict(max_new_tokens=8, eos_id=(), **STRATEGIES[strategy])
    batch = generate(model, ids, mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt, **kwargs)
        assert torch.equal(batch.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(batch.scores[row], alone.scores[0], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# SmolLM2: labkit's generation equals transformers' generate
# ----------------------------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Say hi."]
N_NEW = 20


def chat(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def hf_ids(tokenizer, text: str) -> Tensor:
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


@pytest.fixture(scope="module")
def smol_reference(smollm2):
    """transformers' greedy tokens for each chat prompt alone, padded after eos."""
    tokenizer, reference = smollm2.tokenizer, smollm2.reference
    texts = [chat(tokenizer, q) for q in QUESTIONS]
    rows = []
    for text in texts:
        ids = hf_ids(tokenizer, text)
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        rows.append(out[0, ids.shape[1] :])
    return texts, rows


def test_smollm2_greedy_equals_transformers(smollm2, smol_reference):
    texts, expected = smol_reference
    model, tokenizer = smollm2.model, smollm2.tokenizer
    single = generate(model, hf_ids(tokenizer, texts[0]), max_new_tokens=N_NEW)
    assert torch.equal(single.new_tokens[0], expected[0])
    # The three prompts as one left-padded batch of text: each row equals transformers on that
    # prompt alone: left padding changes nothing.
    batch = generate(model, texts, tokenizer=tokenizer, max_new_tokens=N_NEW)
    for row, tokens in enumerate(expected):
        assert torch.equal(batch.new_tokens[row, : len(tokens)], tokens), row
        assert (batch.new_tokens[row, len(tokens) :] == tokenizer.pad_token_id).all()
        assert batch.text[row] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert batch.text[0] == "The capital of France is Paris."


def test_smollm2_beam_search_equals_transformers(smollm2, smol_reference):
    texts, _ = smol_reference
    model, tokenizer, reference = smollm2.model, smollm2.tokenizer, smollm2.reference
    ids = hf_ids(tokenizer, texts[0])
    # early_stopping="never" is the exact stopping rule labkit uses
    expected = reference.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3, max_new_tokens=10,
        early_stopping="never", return_dict_in_generate=True, output_scores=True,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    out = generate(model, ids, num_beams=3, max_new_tokens=10)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.scores, expected.sequences_scores, atol=1e-4, rtol=0)


def test_smollm2_stream_and_stop_string(smollm2, smol_reference):
    texts, _ = smol_reference
    model, tokenizer = smollm2.model, smollm2.tokenizer
    out = generate(model, texts[0], tokenizer=tokenizer, stop_strings=("Fra",))
    assert out.text == ["The capital of Fra"]  # cut inside the token " France"
    pieces = list(stream(model, texts[0], tokenizer, max_new_tokens=N_NEW))
    assert len(pieces) > 3 and "".join(pieces) == "The capital of France is Paris."
