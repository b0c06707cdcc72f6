"""Every labkit model rejects the same bad inputs with the same message (``check_input_ids``).

Each case feeds one bad token-id tensor to each model's main input (the Transformer's source and
target in turn) and checks that the error names the argument, the shape or values, and what to
do (the text after "; ").
"""

from __future__ import annotations

import re

import pytest
import torch

from labkit.models import GPT, BertEncoder, Llama, Transformer

VOCAB, MAX_LEN = 32, 8
SIZES = dict(vocab_size=VOCAB, max_len=MAX_LEN)  # one layer each: only the checks run


def _models() -> dict:
    torch.manual_seed(0)
    gpt = GPT.from_preset("tiny", n_layers=1, **SIZES).eval()
    llama = Llama.from_preset("tiny", n_layers=1, **SIZES).eval()
    bert = BertEncoder.from_preset("tiny", n_layers=1, **SIZES).eval()
    seq2seq = Transformer.from_preset(
        "tiny",
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        max_len=MAX_LEN,
        n_encoder_layers=1,
        n_decoder_layers=1,
    ).eval()
    good = torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        memory = seq2seq.encode(good)  # (1, 3, D): the target cases need no encoder pass
    # model: (argument name, vocabulary field, run(ids))
    return {
        "GPT": ("input_ids", "vocab_size", gpt),
        "Llama": ("input_ids", "vocab_size", llama),
        "BERT": ("input_ids", "vocab_size", bert),
        "Transformer source": ("src_ids", "src_vocab_size", lambda ids: seq2seq(ids, good)),
        "Transformer target": (
            "tgt_ids",
            "tgt_vocab_size",
            lambda ids: seq2seq.decode(ids, memory),
        ),
    }


MODELS = _models()

# (case, bad ids, the message after "{name} ", the advice after "; ")
CASES = [
    ("float", torch.ones(1, 3), r"must be an integer tensor \(batch, seq\), got shape \(1, 3\) "
     r"and dtype torch.float32", r"\.long\(\)"),
    ("bool", torch.ones(1, 3, dtype=torch.bool), "and dtype torch.bool", r"\.long\(\)"),
    ("one sequence", torch.ones(3, dtype=torch.long), r"got shape \(3,\)", r"ids\[None\]"),
    ("no tokens", torch.ones(2, 0, dtype=torch.long), r"of shape \(2, 0\) is empty",
     "at least one token"),
    ("no sequences", torch.ones(0, 3, dtype=torch.long), r"of shape \(0, 3\) is empty",
     "at least one sequence"),
    ("id too large", torch.tensor([[1, VOCAB]]), rf"must lie in \[0, {{vocab}}={VOCAB}\), got "
     rf"values in \[1, {VOCAB}\]", "tokenizer the model was built for"),
    ("negative id", torch.tensor([[-1, 2]]), r"got values in \[-1, 2\]", "tokenizer"),
    ("too long", torch.ones(1, MAX_LEN + 1, dtype=torch.long), rf"of shape \(1, {MAX_LEN + 1}\) "
     rf"needs {MAX_LEN + 1} positions, more than max_len={MAX_LEN}",
     f"keep at most the last {MAX_LEN} tokens"),
]  # fmt: skip


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(("ids", "message", "advice"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_every_model_rejects_bad_ids_with_one_message(model, ids, message, advice):
    name, vocab, run = MODELS[model]
    with torch.no_grad(), pytest.raises(ValueError) as error:
        run(ids)
    text = str(error.value)
    assert text.startswith(f"{name} "), text
    assert re.search(message.format(vocab=vocab), text), text
    assert re.search(advice, text.split("; ", 1)[1]), text


def test_positions_past_max_len_and_a_full_cache_are_rejected_alike():
    """The decoder-only models also take explicit positions and a cache: the same checks."""
    ids = torch.ones(1, 3, dtype=torch.long)
    for model in (MODELS["GPT"][2], MODELS["Llama"][2]):
        with pytest.raises(ValueError, match=rf"positions must lie in \[0, max_len={MAX_LEN}\)"):
            model(ids, positions=torch.arange(MAX_LEN - 2, MAX_LEN + 1))
        with pytest.raises(ValueError, match=r"positions must be integer \(3,\) or \(1, 3\)"):
            model(ids, positions=torch.arange(3.0))
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.ones(1, MAX_LEN - 2, dtype=torch.long), cache=cache)
        message = rf"after {MAX_LEN - 2} cached tokens needs {MAX_LEN + 1} positions.*new cache"
        with pytest.raises(ValueError, match=message):
            model(ids, cache=cache)
