"""labkit.models.transformer: the encoder-decoder Transformer of Vaswani et al. (2017).

What is checked: the parameter counts of the paper's base and big models (Table 3) against
an independent formula; torch's ``nn.Transformer`` stack wrapped in the paper's embeddings
gives the same logits; decoding with a cache equals teacher forcing; padding and positions
are invisible; the decoder is causal; the tiny model learns to reverse strings; bad
configurations and inputs raise ValueError naming the values.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.data import CharTokenizer, make_sequence_task
from labkit.models.transformer import Seq2SeqOutput, Transformer, TransformerConfig
from labkit.nn import DecoderLayer, EncoderLayer, sinusoidal_table
from labkit.nn.cache import EncoderDecoderCache
from labkit.train import IGNORE_INDEX, accuracy

ATOL = 1e-5


def _tiny(device: torch.device | str = "cpu", **overrides) -> Transformer:
    """The tiny preset in eval mode (no dropout) on ``device``."""
    return Transformer.from_preset("tiny", **overrides).to(device).eval()


def _lengths_mask(lengths: list[int], width: int, side: str, device) -> Tensor:
    """(B, width) 1/0 mask with lengths[b] ones, on the right or the left of the pads."""
    cols = torch.arange(width, device=device)
    lengths_t = torch.tensor(lengths, device=device)[:, None]
    real = cols < lengths_t if side == "right" else cols >= width - lengths_t
    return real.long()


def _random_ids(batch: int, length: int, vocab: int, device) -> Tensor:
    return torch.randint(4, vocab, (batch, length), device=device)  # no special ids


# ---------------------------------------------------------------------------------------------
# Parameter counts


def _paper_count(c: TransformerConfig) -> int:
    """Parameters of the architecture of section 3, written out from the paper's equations."""
    d, f = c.d_model, c.d_ff
    attention = 4 * (d * d + d)  # W_Q, W_K, W_V, W_O (all heads together), with biases
    ffn = (d * f + f) + (f * d + d)  # FFN(x) = max(0, x W1 + b1) W2 + b2
    norm = 2 * d  # gain and bias
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm  # self- and cross-attention
    if c.share_embeddings:  # one matrix: source, target embeddings and pre-softmax projection
        embeddings = c.tgt_vocab_size * d
    else:
        embeddings = c.src_vocab_size * d + 2 * c.tgt_vocab_size * d
    final_norms = 2 * norm if c.norm_first else 0
    return (
        embeddings
        + c.n_encoder_layers * encoder_layer
        + c.n_decoder_layers * decoder_layer
        + final_norms
    )


@pytest.mark.parametrize(
    ("preset", "expected", "paper"),
    [("base", 63_082_496, 65e6), ("big", 214_245_376, 213e6)],
)
def test_paper_model_sizes(preset, expected, paper):
    """Table 3 lists 65M (base) and 213M (big); the paper's text gives no exact count."""
    with torch.device("meta"):  # shapes only: no memory, no time
        model = Transformer.from_preset(preset)
    count = model.num_parameters()
    assert count == expected == _paper_count(model.config)
    assert abs(count - paper) / paper < 0.04
    assert model.num_parameters(exclude_embeddings=True) == count - 37000 * model.config.d_model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_first=True),
        dict(share_embeddings=False, src_vocab_size=50, tgt_vocab_size=70),
        dict(share_embeddings=False, norm_first=True, n_encoder_layers=3, n_decoder_layers=1),
    ],
    ids=["pre-LN", "unshared", "unshared-pre-LN-3+1"],
)
def test_parameter_count_matches_formula(overrides):
    model = Transformer.from_preset("tiny", **overrides)
    assert model.num_parameters() == _paper_count(model.config)
    assert (model.encoder_norm is not None) == model.config.norm_first
    c = model.config
    embeddings = c.src_vocab_size * c.d_model
    if not c.share_embeddings:
        embeddings += c.tgt_vocab_size * c.d_model  # the untied output projection stays in
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - embeddings


def test_shared_embeddings_are_one_matrix():
    model = Transformer.from_preset("tiny")
    assert model.src_embed.weight is model.tgt_embed.weight is model.lm_head.weight
    assert model.lm_head.bias is None
    unshared = Transformer.from_preset("tiny", share_embeddings=False)
    assert unshared.src_embed.weight is not unshared.tgt_embed.weight
    assert unshared.lm_head.weight is not unshared.tgt_embed.weight


def test_matrices_start_xavier_uniform():
    """Every matrix, embeddings included, is U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    model = Transformer.from_preset("tiny", share_embeddings=False, tgt_vocab_size=100)
    matrices = [(name, p) for name, p in model.named_parameters() if p.dim() == 2]
    assert len(matrices) == 3 + 2 * 6 + 2 * 10  # embeddings + lm_head, encoder, decoder
    for name, p in matrices:
        bound = math.sqrt(6 / sum(p.shape))
        assert 0.9 * bound < p.abs().max().item() <= bound, name


# ---------------------------------------------------------------------------------------------
# Equivalence with torch.nn.Transformer


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_matches_torch_transformer(device, norm_first):
    """torch's encoder-decoder stack between the paper's embeddings and the tied projection.

    ``nn.Transformer`` always ends both stacks with a LayerNorm. Pre-LN needs exactly those
    norms, so their weights are copied; the paper's post-LN model has none, so they are
    removed from torch's model.
    """
    d_model, n_heads, max_len = 32, 4, 64
    ref = nn.Transformer(
        d_model, n_heads, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=48,
        dropout=0.0, batch_first=True, norm_first=norm_first,
    ).to(device)  # fmt: skip
    ref.train()  # dropout is 0; training mode keeps torch off its nested-tensor fast path
    with torch.no_grad():  # nonzero norm weights and biases, so that mixing them up shows
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = _tiny(
        device, d_model=d_model, n_heads=n_heads, n_encoder_layers=2, n_decoder_layers=3,
        d_ff=48, max_len=max_len, norm_first=norm_first,
    )  # fmt: skip
    for i, layer in enumerate(ref.encoder.layers):
        model.encoder_layers[i] = EncoderLayer.from_torch(layer).eval()
    for i, layer in enumerate(ref.decoder.layers):
        model.decoder_layers[i] = DecoderLayer.from_torch(layer).eval()
    if norm_first:
        model.encoder_norm.load_state_dict(ref.encoder.norm.state_dict())
        model.decoder_norm.load_state_dict(ref.decoder.norm.state_dict())
    else:
        ref.encoder.norm = ref.decoder.norm = None

    src, tgt = _random_ids(3, 9, 64, device), _random_ids(3, 6, 64, device)
    src_mask = _lengths_mask([9, 5, 2], 9, "right", device)
    tgt_mask = _lengths_mask([6, 6, 3], 6, "right", device)
    with torch.no_grad():
        ours = model(src, tgt, src_mask, tgt_mask).logits  # (B, T, V)

        # The paper's input: token embedding * sqrt(d_model) + sinusoidal table (3.4, 3.5).
        table = sinusoidal_table(max_len, d_model, device=device)
        embed = model.src_embed.weight  # shared by source, target and output projection
        src_x = embed[src] * math.sqrt(d_model) + table[: src.shape[1]]
        tgt_x = embed[tgt] * math.sqrt(d_model) + table[: tgt.shape[1]]
        causal = torch.ones(6, 6, dtype=torch.bool, device=device).triu(1)  # True = blocked
        hidden = ref(
            src_x, tgt_x, tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=~src_mask.bool(), memory_key_padding_mask=~src_mask.bool(),
            tgt_key_padding_mask=~tgt_mask.bool(),
        )  # fmt: skip
        theirs = hidden @ embed.T  # (B, T, V)

    real = tgt_mask.bool()  # outputs at target pads are never used
    assert (ours[real] - theirs[real]).abs().max().item() < ATOL


# ---------------------------------------------------------------------------------------------
# Cache, padding, causality


@pytest.mark.parametrize("positional", ["sinusoidal", "rope"])
@pytest.mark.parametrize("with_tgt_mask", [False, True], ids=["no-tgt-mask", "tgt-mask"])
def test_cached_decoding_equals_teacher_forcing(device, with_tgt_mask, positional):
    """A prefix of 3 tokens, then one token per call, with a cache: same logits and weights
    (with rotary embeddings too: the cached keys were rotated at their own positions)."""
    model = _tiny(device, positional=positional)
    src = _random_ids(3, 9, 64, device)
    src_mask = _lengths_mask([9, 5, 2], 9, "right", device)
    tgt = _random_ids(3, 7, 64, device)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full = model.decode(tgt, memory, src_mask=src_mask, need_weights=True)

        cache = model.new_cache()
        assert isinstance(cache, EncoderDecoderCache) and len(cache.layers) == 2
        steps, cross = [], []
        for start, stop in [(0, 3), *((t, t + 1) for t in range(3, 7))]:
            tgt_mask = torch.ones(3, stop, device=device) if with_tgt_mask else None
            out = model.decode(
                tgt[:, start:stop], memory, src_mask=src_mask, tgt_mask=tgt_mask, cache=cache,
                need_weights=True,
            )  # fmt: skip
            assert cache.seq_len == stop
            assert out.self_attentions[0].shape == (3, 4, stop - start, stop)
            steps.append(out.logits)
            cross.append(out.cross_attentions[-1])

    assert isinstance(full, Seq2SeqOutput)
    assert (torch.cat(steps, dim=1) - full.logits).abs().max().item() < ATOL
    assert (torch.cat(cross, dim=2) - full.cross_attentions[-1]).abs().max().item() < ATOL
    # Cross-attention never reads padded source positions.
    pads = ~src_mask.bool()[:, None, None, :].expand_as(full.cross_attentions[0])
    assert full.cross_attentions[0][pads].abs().max().item() == 0.0


@pytest.mark.parametrize("positional", ["sinusoidal", "rope"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_invisible(device, side, positional):
    """A pair alone equals the same pair padded in a batch, whichever side the pads are on."""
    model = _tiny(device, positional=positional)
    src_a, tgt_a = _random_ids(1, 5, 64, device), _random_ids(1, 4, 64, device)
    src_b, tgt_b = _random_ids(1, 8, 64, device), _random_ids(1, 6, 64, device)
    pad = 0

    def padded(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        gap = b.shape[1] - a.shape[1]
        a = F.pad(a, (0, gap) if side == "right" else (gap, 0), value=pad)
        mask = _lengths_mask([a.shape[1] - gap, b.shape[1]], b.shape[1], side, device)
        return torch.cat([a, b]), mask

    src, src_mask = padded(src_a, src_b)
    tgt, tgt_mask = padded(tgt_a, tgt_b)
    with torch.no_grad():
        alone = model(src_a, tgt_a).logits[0]  # (4, V)
        batched = model(src, tgt, src_mask, tgt_mask).logits
        src_changed = src.masked_fill(src_mask == 0, 17)  # other ids under the pads
        changed = model(src_changed, tgt, src_mask, tgt_mask).logits
        memory_alone = model.encode(src_a)[0]
        memory = model.encode(src, src_mask)
    real_tgt, real_src = tgt_mask[0].bool(), src_mask[0].bool()
    assert (batched[0, real_tgt] - alone).abs().max().item() < ATOL
    assert (memory[0, real_src] - memory_alone).abs().max().item() < ATOL
    assert (changed[0, real_tgt] - alone).abs().max().item() < ATOL


def test_rope_positions_skip_a_pad_inside_a_sequence():
    """Positions count real tokens only. Left or right pads shift every real position by the
    same amount, which RoPE cannot see (it is relative); a pad between two real tokens would
    stretch their distance, so only such a pad shows that the pads are not counted."""
    model = _tiny(positional="rope")
    src, tgt = _random_ids(1, 4, 64, "cpu"), _random_ids(1, 3, 64, "cpu")
    pad = torch.zeros(1, 1, dtype=torch.long)
    src_holed, tgt_holed = (
        torch.cat([src[:, :2], pad, src[:, 2:]], 1),
        torch.cat([tgt[:, :1], pad, tgt[:, 1:]], 1),
    )
    with torch.no_grad():
        alone = model(src, tgt).logits
        holed = model(
            src_holed, tgt_holed, torch.tensor([[1, 1, 0, 1, 1]]), torch.tensor([[1, 0, 1, 1]])
        )
    assert (holed.logits[:, [0, 2, 3]] - alone).abs().max().item() < ATOL


def test_attentions_and_hidden_states_only_when_asked():
    model = _tiny()
    c = model.config
    src, tgt = _random_ids(2, 5, 64, "cpu"), _random_ids(2, 3, 64, "cpu")
    src_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        plain = model(src, tgt, src_mask)
        memory = model.encode(src, src_mask)
        decoded = model.decode(tgt, memory, src_mask=src_mask)
        outs = [model(src, tgt, src_mask, need_weights=True)]
        outs.append(model(src, tgt, src_mask, output_attentions=True, output_hidden_states=True))
    assert plain[1:] == (None,) * 5 and decoded[1:] == (None,) * 5
    assert model.encoder_output(src, src_mask)[1:] == (None, None)
    for out in outs:
        torch.testing.assert_close(out.logits, plain.logits)
        assert [len(out.encoder_attentions), len(out.self_attentions)] == [2, 2]
        assert len(out.cross_attentions) == c.n_decoder_layers
        for weights, shape in (
            (out.encoder_attentions, (2, 4, 5, 5)),
            (out.self_attentions, (2, 4, 3, 3)),
            (out.cross_attentions, (2, 4, 3, 5)),
        ):
            assert all(w.shape == shape for w in weights)
            torch.testing.assert_close(weights[0].sum(-1), torch.ones(shape[:-1]))
        assert out.cross_attentions[0][1, :, :, 3:].abs().max() == 0  # padded source keys
    assert outs[0].encoder_hidden_states is None and outs[0].decoder_hidden_states is None
    states = outs[1].encoder_hidden_states
    assert len(states) == c.n_encoder_layers + 1 and len(outs[1].decoder_hidden_states) == 3
    last = states[-1] if model.encoder_norm is None else model.encoder_norm(states[-1])
    torch.testing.assert_close(last, memory)


def test_hook_points_cover_the_encoder_then_the_decoder():
    names = list(_tiny(n_decoder_layers=3).hook_points())
    blocks = list(dict.fromkeys(".".join(name.split(".")[:3]) for name in names))
    expected = [f"encoder.blocks.{i}" for i in range(2)] + [f"decoder.blocks.{i}" for i in range(3)]
    assert blocks == expected


def test_decoder_is_causal_and_reads_the_source(device):
    model = _tiny(device)
    src, tgt = _random_ids(2, 6, 64, device), _random_ids(2, 8, 64, device)
    tgt_changed = tgt.clone()
    tgt_changed[:, 4] = (tgt[:, 4] + 1 - 4) % 60 + 4  # another ordinary token
    src_changed = src.clone()
    src_changed[:, -1] = (src[:, -1] + 1 - 4) % 60 + 4
    with torch.no_grad():
        logits = model(src, tgt).logits
        later_changed = model(src, tgt_changed).logits
        source_changed = model(src_changed, tgt).logits
    assert (later_changed[:, :4] - logits[:, :4]).abs().max().item() < ATOL
    assert (later_changed[:, 4:] - logits[:, 4:]).abs().amax(dim=-1).gt(1e-4).all()
    # Every target position sees the whole source, the last token included.
    assert (source_changed - logits).abs().amax(dim=-1).gt(1e-4).all()


def test_rope_rotates_inside_self_attention_only(device):
    """positional="rope": nothing is added to the embeddings; the encoder's self-attention
    rotates queries and keys (so the order of the source matters), cross-attention does not."""
    model = _tiny(device, positional="rope")
    assert model.positional is None and model.rotary is not None
    assert model.rotary.head_dim == model.config.d_model // model.config.n_heads
    src = _random_ids(2, 6, 64, device)
    with torch.no_grad():
        memory = model.encode(src)
        flipped = model.encode(src.flip(1)).flip(1)  # the same tokens in reverse order
        model.rotary = None  # no positions at all: a bag of tokens
        bag, bag_flipped = model.encode(src), model.encode(src.flip(1)).flip(1)
    assert (bag - bag_flipped).abs().max().item() < ATOL  # permutation-equivariant
    assert (memory - flipped).abs().amax(-1).gt(1e-4).all()  # positions matter with RoPE
    embedded = model._embed(model.src_embed, src, torch.arange(6, device=device))
    assert torch.equal(embedded, model.src_embed(src) * model.embed_scale)  # no PE added


# ---------------------------------------------------------------------------------------------
# Learning


def test_tiny_model_learns_to_reverse():
    """Teacher-forced next-token accuracy on held-out strings: chance is about 1/8."""
    alphabet = "abcdefgh"
    task = make_sequence_task("reverse", 3000, min_len=3, max_len=8, alphabet=alphabet)
    tokenizer = CharTokenizer.from_corpus(alphabet)

    def tensors(split) -> tuple[Tensor, ...]:
        src = tokenizer.encode_batch(split["source"])
        tgt = tokenizer.encode_batch(split["target"], add_special_tokens=True)  # <bos> .. <eos>
        ids, mask = tgt["input_ids"], tgt["attention_mask"]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # shifted left
        return src["input_ids"], src["attention_mask"], ids[:, :-1], mask[:, :-1], labels

    train, val = tensors(task["train"]), tensors(task["validation"])
    vocab = tokenizer.vocab_size
    model = Transformer.from_preset("tiny", src_vocab_size=vocab, tgt_vocab_size=vocab, dropout=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    for _ in range(200):
        rows = torch.randint(len(train[0]), (64,))
        src, src_mask, tgt, tgt_mask, labels = (t[rows] for t in train)
        logits = model(src, tgt, src_mask, tgt_mask).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        src, src_mask, tgt, tgt_mask, labels = val
        assert accuracy(model(src, tgt, src_mask, tgt_mask).logits, labels) > 0.8


# ---------------------------------------------------------------------------------------------
# Configuration and errors


def test_presets_and_overrides():
    c = TransformerConfig.preset("tiny", n_decoder_layers=3)
    assert (c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff) == (
        64, 4, 2, 3, 128,
    )  # fmt: skip
    assert c.is_encoder_decoder and not c.norm_first and c.share_embeddings
    assert TransformerConfig.preset("base") == TransformerConfig()  # the defaults are the paper's
    big = TransformerConfig.preset("big")
    assert (big.d_model, big.n_heads, big.d_ff, big.dropout) == (1024, 16, 4096, 0.3)
    assert Transformer.from_config(c).config is c
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TransformerConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layer"):
        TransformerConfig.preset("tiny", n_layer=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(src_vocab_size=10, tgt_vocab_size=12), "src_vocab_size=10, tgt_vocab_size=12"),
        (dict(n_heads=5), "d_model=64 must be divisible by n_heads=5"),
        (
            dict(d_model=63, n_heads=1),
            "^d_model=63 must be even: the sinusoidal encoding fills columns in sine/cosine pairs$",
        ),
        (dict(positional="alibi"), r"positional must be one of \('sinusoidal', 'rope'\)"),
        (
            dict(d_model=12, n_heads=4, positional="rope"),
            "^positional='rope' rotates pairs of dimensions, so the head width "
            "d_model / n_heads = 3 must be even$",
        ),
        (dict(n_encoder_layers=0), "n_encoder_layers=0"),
        (dict(bos_id=64), r"bos_id=64 must be a target id in \[0, tgt_vocab_size=64\)"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig.preset("tiny", **overrides)


SIZES = (
    "src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers",
    "n_decoder_layers", "d_ff", "max_len",
)  # fmt: skip


@pytest.mark.parametrize("field", SIZES)
def test_sizes_below_one_raise(field):
    with pytest.raises(ValueError, match=f"^{field} must be at least 1, got {field}=0$"):
        TransformerConfig.preset("tiny", **{field: 0})


def test_layers_follow_the_config():
    model = Transformer.from_preset("tiny", norm_first=True, activation="gelu", dropout=0.25)
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        assert layer.norm_first and layer.ffn.activation == "gelu" and layer.dropout1.p == 0.25
    assert model.positional.pe.shape == (model.config.max_len, 64)  # a row per position


def test_bad_inputs_raise(device):
    model = _tiny(device)
    src, tgt = _random_ids(2, 5, 64, device), _random_ids(2, 3, 64, device)
    memory = model.encode(src)
    with pytest.raises(ValueError, match=r"src_ids of shape \(1, 129\) needs 129 positions"):
        model.encode(_random_ids(1, 129, 64, device))
    cache = model.new_cache()
    model.decode(_random_ids(2, 127, 64, device), memory, cache=cache)
    with pytest.raises(ValueError, match=r"\(2, 2\) after 127 cached tokens needs 129 positions"):
        model.decode(tgt[:, :2], memory, cache=cache)
    with pytest.raises(ValueError, match=r"tgt_ids must lie in \[0, tgt_vocab_size=64\)"):
        model(src, tgt + 64)
    with pytest.raises(ValueError, match=r"src_ids must lie in \[0, src_vocab_size=64\)"):
        model(src + 64, tgt)
    with pytest.raises(
        ValueError, match=r"src_mask must be \(batch, seq\) = \(2, 5\), got \(2, 4\)"
    ):
        model(src, tgt, src_mask=torch.ones(2, 4, device=device))
    with pytest.raises(
        ValueError, match=r"^src_mask must be \(batch, seq\) = \(2, 5\), got \(2, 4\)$"
    ):  # decode checks its own src_mask against the memory
        model.decode(tgt, memory, src_mask=torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match=r"tgt_mask must be \(batch, seq\) = \(2, 3\)"):
        model(src, tgt, tgt_mask=torch.ones(3, 3, device=device))
    with pytest.raises(ValueError, match=r"memory must be \(batch=2, src_len, d_model=64\)"):
        model.decode(tgt, memory[:1])
    with pytest.raises(ValueError, match="EncoderDecoderCache with 2 layers"):
        model.decode(tgt, memory, cache=EncoderDecoderCache.empty(3))
