"""labkit BERT: equal to transformers (random tiny models and the packaged all-MiniLM-L6-v2),
equal to sentence-transformers' embeddings, padding-invariant, and trainable."""

import pytest
import torch
import transformers

from labkit.models.bert import (
    BertConfig,
    BertEncoder,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    best_span,
    hf_bert_names,
    mean_pool,
)
from labkit.models.pretrained import minilm_dir

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello!",
]


def tiny_hf_config(**overrides) -> transformers.BertConfig:
    sizes = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.BertConfig(**(sizes | overrides))


def perturbed(hf: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``hf`` with every parameter nudged (biases, LayerNorms and the MLM bias start at 0 or 1,
    so a forgotten copy would go unnoticed), in eval mode on ``device``."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf.to(device).eval()


def padded_batch(device: torch.device, vocab: int = 99) -> tuple[torch.Tensor, ...]:
    """ids (3, 10) with lengths 10, 6, 3 (pads = 0), their attention mask and token types."""
    lengths = torch.tensor([10, 6, 3])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (3, 10)) * mask
    types = (torch.arange(10)[None, :] >= lengths[:, None] // 2).long() * mask
    return ids.to(device), mask.to(device), types.to(device)


# ----------------------------------------------------------------------------------------------
# Configuration


def test_minilm_preset_is_the_packaged_config():
    hf_config = transformers.AutoConfig.from_pretrained(minilm_dir())
    assert BertConfig.from_hf(hf_config) == BertConfig.preset("minilm-l6")
    assert not BertConfig.preset("minilm-l6").is_encoder_decoder


@pytest.mark.parametrize(
    ("preset", "hf_sizes"),
    [
        ("base", {}),  # transformers' defaults are bert-base
        ("large", dict(num_hidden_layers=24, num_attention_heads=16, hidden_size=1024,
                       intermediate_size=4096)),
    ],
)  # fmt: skip
def test_published_sizes_have_the_published_parameter_counts(preset, hf_sizes):
    with torch.device("meta"):  # shapes only, no memory or init time
        ours = BertEncoder.from_preset(preset)
        theirs = transformers.BertModel(transformers.BertConfig(**hf_sizes))
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters() == {"base": 109_482_240, "large": 335_141_888}[preset]
    embeddings = sum(p.numel() for p in ours.embeddings.parameters()) - 2 * ours.config.d_model
    assert ours.num_parameters(exclude_embeddings=True) == ours.num_parameters() - embeddings


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown BERT preset 'huge'"):
        BertConfig.preset("huge")
    with pytest.raises(ValueError, match=r"unknown BertConfig fields \['n_layer'\]"):
        BertConfig.preset("tiny", n_layer=3)
    assert BertConfig.preset("tiny", n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        BertConfig.from_hf(tiny_hf_config(hidden_act="relu"))


# ----------------------------------------------------------------------------------------------
# Weight mapping, proven on random tiny transformers models


def test_name_mapping_covers_every_parameter_once():
    model = BertEncoder.from_preset("tiny")
    names = hf_bert_names(model.config.n_layers)
    assert sorted(names.values()) == sorted(name for name, _ in model.named_parameters())
    hf = transformers.BertModel(tiny_hf_config(num_hidden_layers=2))
    assert sorted(names) == sorted(name for name, _ in hf.named_parameters())


def test_encoder_from_hf_matches_transformers(device):
    hf = perturbed(transformers.BertModel(tiny_hf_config()), device)
    model = BertEncoder.from_hf(hf)
    assert not model.training
    ids, mask, types = padded_batch(device)
    with torch.no_grad():
        ours = model(ids, mask, types)
        theirs = hf(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()  # pad positions are garbage in both
    torch.testing.assert_close(ours.hidden[real], theirs.last_hidden_state[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.pooled, theirs.pooler_output, atol=1e-4, rtol=0)


def test_encoder_without_pooler_keeps_random_pooler():
    hf = perturbed(transformers.BertModel(tiny_hf_config(), add_pooling_layer=False), "cpu")
    model = BertEncoder.from_hf(hf)
    ids, mask, types = padded_batch("cpu")
    with torch.no_grad():
        ours, theirs = model(ids, mask, types), hf(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(ours.hidden[real], theirs.last_hidden_state[real], atol=1e-4, rtol=0)
    assert ours.pooled.shape == (3, 32)


def test_from_hf_shape_mismatch_names_parameter_and_shapes():
    hf = transformers.BertModel(tiny_hf_config())
    hf.encoder.layer[1].intermediate.dense = torch.nn.Linear(32, 40)  # config says 37
    with pytest.raises(
        ValueError,
        match=r"encoder\.layer\.1\.intermediate\.dense\.weight is \(40, 32\), "
        r"labkit layers\.1\.ffn\.up_proj\.weight is \(37, 32\)",
    ):
        BertEncoder.from_hf(hf)
    with pytest.raises(ValueError, match="pass a BertModel"):
        BertEncoder.from_hf(transformers.BertForSequenceClassification(tiny_hf_config()))


def test_sequence_classification_from_hf(device):
    hf = transformers.BertForSequenceClassification(tiny_hf_config(num_labels=3))
    hf = perturbed(hf, device)
    model = BertForSequenceClassification.from_hf(hf)
    ids, mask, types = padded_batch(device)
    labels = torch.tensor([0, 2, 1], device=device)
    with torch.no_grad():
        ours = model(ids, mask, types, labels=labels)
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert ours.logits.shape == (3, 3)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-4, rtol=0)


def test_masked_lm_from_hf_is_tied(device):
    hf = perturbed(transformers.BertForMaskedLM(tiny_hf_config()), device)
    model = BertForMaskedLM.from_hf(hf)
    ids, mask, types = padded_batch(device)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]  # predict one token per row
    with torch.no_grad():
        ours = model(ids, mask, types, labels=labels)
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    real = mask.bool()
    assert ours.logits.shape == (3, 10, 99)
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-4, rtol=0)
    # Tied: the decoder is the embedding matrix, counted once (ours has an extra, unused
    # pooler: D * D + D), and editing the embedding changes the predictions.
    assert model.num_parameters() == hf.num_parameters() + 32 * 32 + 32
    with torch.no_grad():
        model.bert.embeddings.word.weight[5] += 1.0
        assert not torch.allclose(model(ids, mask, types).logits[..., 5], ours.logits[..., 5])


def test_question_answering_from_hf(device):
    hf = perturbed(transformers.BertForQuestionAnswering(tiny_hf_config()), device)
    model = BertForQuestionAnswering.from_hf(hf)
    ids, mask, types = padded_batch(device)
    starts, ends = torch.tensor([3, 1, 0], device=device), torch.tensor([5, 4, 2], device=device)
    with torch.no_grad():
        ours = model(ids, mask, types, start_positions=starts, end_positions=ends)
        theirs = hf(
            ids, attention_mask=mask, token_type_ids=types, start_positions=starts,
            end_positions=ends,
        )  # fmt: skip
    real = mask.bool()
    torch.testing.assert_close(
        ours.start_logits[real], theirs.start_logits[real], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(ours.end_logits[real], theirs.end_logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-4, rtol=0)


def test_masked_lm_refuses_an_untied_transformers_model():
    hf = transformers.BertForMaskedLM(tiny_hf_config(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="untied decoder"):
        BertForMaskedLM.from_hf(hf)


# ----------------------------------------------------------------------------------------------
# Behaviour of the tiny model


def test_padding_invariance_and_zero_weight_on_padding(device):
    model = BertEncoder.from_preset("tiny").to(device).eval()
    ids, mask, types = padded_batch(device, vocab=256)
    with torch.no_grad():
        batch = model(ids, mask, types, need_weights=True)
        alone = model(ids[1:2, :6], mask[1:2, :6], types[1:2, :6])
        embedded = model.sentence_embedding(ids, mask, types)
    torch.testing.assert_close(batch.hidden[1, :6], alone.hidden[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.pooled[1], alone.pooled[0], atol=1e-5, rtol=0)
    assert len(batch.attentions) == model.config.n_layers  # an empty list would pass the loop
    for weights in batch.attentions:  # (B, H, T, T)
        assert weights.shape == (3, 2, 10, 10)
        assert (weights[2, :, :, 3:] == 0).all() and (weights[1, :, :, 6:] == 0).all()
    torch.testing.assert_close(embedded.norm(dim=-1), torch.ones(3, device=device))


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\) = \(1, 3\)"):
        mean_pool(hidden, torch.ones(1, 4))


def test_tiny_classifier_learns_a_separable_task(device):
    """Label = whether the first word after [CLS] is token 3 or token 4; the rest is noise."""
    model = BertForSequenceClassification(BertConfig.preset("tiny"), num_labels=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 2, (n,))
        ids = torch.randint(10, 256, (n, 8))
        ids[:, 0], ids[:, 1] = 1, 3 + labels  # 1 plays [CLS]
        return ids.to(device), labels.to(device)

    losses = []
    for _ in range(20):
        ids, labels = batch(32)
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    ids, labels = batch(256)
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert (out.logits.argmax(-1) == labels).float().mean() == 1.0
    assert out.loss < 0.1 < losses[0]


def test_heads_share_a_pretrained_encoder(device):
    encoder = BertEncoder.from_preset("tiny").to(device).eval()
    ids, mask, types = padded_batch(device, vocab=256)
    classifier = BertForSequenceClassification.from_encoder(encoder, num_labels=4)
    mlm = BertForMaskedLM.from_encoder(encoder)
    qa = BertForQuestionAnswering.from_encoder(encoder)
    assert classifier.bert is encoder and mlm.bert is encoder and qa.bert is encoder
    assert mlm.bert.embeddings.word.weight is encoder.embeddings.word.weight
    assert not classifier.training and classifier.classifier.weight.device.type == device.type
    with torch.no_grad():
        assert classifier(ids, mask, types).logits.shape == (3, 4)
        assert mlm(ids, mask, types).logits.shape == (3, 10, 256)
        out = qa(ids, mask, types)
    assert out.start_logits.shape == out.end_logits.shape == (3, 10)
    with pytest.raises(ValueError, match="differs from config"):
        BertForMaskedLM(BertConfig.preset("tiny", n_layers=1), encoder=encoder)


def test_bad_inputs_raise_with_shapes():
    model = BertEncoder.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match=r"token_type_ids \(2, 4\) .* input_ids \(2, 5\)"):
        model(ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_type_ids must be integers in \[0, type_vocab"):
        model(ids, token_type_ids=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match=r"\(1, 65\) needs 65 positions, more than max_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask \(2, 6\) .* input_ids \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=256\)"):
        model(torch.full((2, 5), 256))
    classifier = BertForSequenceClassification.from_encoder(model, num_labels=2)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(2, 1\)"):
        classifier(ids, labels=torch.zeros(2, 1, dtype=torch.long))
    qa = BertForQuestionAnswering.from_encoder(model)
    with pytest.raises(ValueError, match=r"end_positions must lie in \[0, 5\)"):
        qa(ids, start_positions=torch.tensor([0, 1]), end_positions=torch.tensor([2, 5]))


# ----------------------------------------------------------------------------------------------
# best_span


def test_best_span_beats_independent_argmax():
    # argmax(start) = 3 but argmax(end) = 1: the naive "span" runs backwards.
    start = torch.tensor([[0.0, 1.0, 0.0, 5.0, 0.0, 0.0]])
    end = torch.tensor([[0.0, 6.0, 2.0, 0.0, 0.0, 3.0]])
    assert start.argmax() > end.argmax()
    s, e = best_span(start, end)  # candidates: (1, 1) = 7, (3, 5) = 8
    assert (s.item(), e.item()) == (3, 5)
    s, e = best_span(start, end, max_answer_len=2)  # (3, 5) is 3 tokens long: (1, 1) wins
    assert (s.item(), e.item()) == (1, 1)
    s, e = best_span(start, end, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]))
    assert (s.item(), e.item()) == (1, 1)  # the end at a pad position is not allowed
    context = torch.tensor([[0, 0, 1, 1, 1, 1]])  # the answer must lie in the context
    s, e = best_span(start, end, context_mask=context)
    assert (s.item(), e.item()) == (3, 5)
    s, e = best_span(start, end, context_mask=context, max_answer_len=1)
    assert (s.item(), e.item()) == (3, 3)  # best single token in 2..5: 5 + 0


def test_best_span_equals_brute_force():
    start, end = torch.randn(5, 9), torch.randn(5, 9)
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[2, 6:] = 0
    s, e = best_span(start, end, attention_mask=mask, max_answer_len=4)
    for b in range(5):
        spans = [
            (i, j) for i in range(9) for j in range(i, min(i + 4, 9)) if mask[b, i] and mask[b, j]
        ]
        best = max(spans, key=lambda span: start[b, span[0]] + end[b, span[1]])
        assert (s[b].item(), e[b].item()) == best


def test_best_span_errors():
    with pytest.raises(ValueError, match=r"\(2, 5\) and \(2, 4\)"):
        best_span(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="max_answer_len must be >= 1"):
        best_span(torch.zeros(2, 5), torch.zeros(2, 5), max_answer_len=0)
    with pytest.raises(ValueError, match="at least one position"):
        best_span(torch.zeros(1, 3), torch.zeros(1, 3), context_mask=torch.zeros(1, 3))


# ----------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (session fixture ``minilm``)


@pytest.fixture(scope="module")
def sentence_transformer():
    """The packaged checkpoint read by sentence-transformers itself, from disk only."""
    import sentence_transformers  # a hard dependency (pyproject): never skipped

    return sentence_transformers.SentenceTransformer(
        str(minilm_dir()), device="cpu", local_files_only=True
    )


def test_minilm_hidden_states_match_transformers(minilm):
    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(-1).unique().numel() == 3  # three different lengths
    with torch.no_grad():
        ours = minilm.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = minilm.reference(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.hidden[real], theirs.last_hidden_state[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.pooled, theirs.pooler_output, atol=1e-4, rtol=0)


def test_minilm_tokenizer_is_sentence_transformers_tokenizer(minilm, sentence_transformer):
    preprocess = getattr(sentence_transformer, "preprocess", sentence_transformer.tokenize)
    theirs = preprocess(SENTENCES)
    ours = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm, sentence_transformer):
    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = minilm.model.sentence_embedding(**batch)
    theirs = sentence_transformer.encode(
        SENTENCES, normalize_embeddings=True, convert_to_tensor=True
    )
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, theirs.cpu(), atol=1e-4, rtol=0)


def test_minilm_padding_invariance_and_zero_attention_on_pads(minilm):
    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    alone = minilm.tokenizer(SENTENCES[2:], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    assert n < batch["input_ids"].shape[1]
    with torch.no_grad():
        padded = minilm.model(**batch, need_weights=True)
        single = minilm.model(**alone)
        emb_padded = minilm.model.sentence_embedding(**batch)[2]
        emb_single = minilm.model.sentence_embedding(**alone)[0]
    torch.testing.assert_close(padded.hidden[2, :n], single.hidden[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(emb_padded, emb_single, atol=1e-5, rtol=0)
    pads = ~batch["attention_mask"].bool()  # (B, T) keys that are padding
    assert len(padded.attentions) == 6
    for weights in padded.attentions:  # (B, 12, T, T)
        assert (weights.permute(0, 3, 1, 2)[pads] == 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]))


# ----------------------------------------------------------------------------------------------
# Details the comparisons above leave open (each found by a surviving mutant, see tests/README.md)


def test_from_hf_reads_a_config_with_only_the_sizes():
    """Absent ``hidden_act``/``position_embedding_type`` mean GELU and absolute positions, and
    a missing [PAD] id means 0; anything else is refused with an exact message."""
    from types import SimpleNamespace

    sizes = dict(
        vocab_size=99, max_position_embeddings=64, type_vocab_size=2, num_hidden_layers=2,
        num_attention_heads=4, hidden_size=32, intermediate_size=37, hidden_dropout_prob=0.0,
        layer_norm_eps=1e-6, pad_token_id=None,
    )  # fmt: skip
    config = BertConfig.from_hf(SimpleNamespace(**(sizes | dict(type_vocab_size=3))))
    assert config == BertConfig(
        vocab_size=99, max_len=64, type_vocab_size=3, n_layers=2, n_heads=4, d_model=32, d_ff=37,
        dropout=0.0, eps=1e-6, pad_id=0,
    )  # fmt: skip
    assert BertConfig.from_hf(SimpleNamespace(**(sizes | dict(pad_token_id=5)))).pad_id == 5
    assert (
        BertConfig.from_hf(SimpleNamespace(**(sizes | dict(hidden_dropout_prob=0.2)))).dropout
        == 0.2
    )
    with pytest.raises(
        ValueError,
        match=r"^labkit's BERT has exact GELU and absolute positions, got hidden_act='gelu', "
        r"position_embedding_type='relative_key'$",
    ):
        BertConfig.from_hf(SimpleNamespace(**sizes, position_embedding_type="relative_key"))


def test_mean_pool_details():
    hidden = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)  # (B=2, T=3, D=2)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # one real token: exactly that token's vector; two: their mean (per row, not batch-wide)
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[0.0, 1.0], [7.0, 8.0]]).double())
    assert torch.equal(mean_pool(hidden), hidden.mean(dim=1))  # no mask: every token
    assert torch.equal(mean_pool(hidden, torch.zeros(2, 3)), torch.zeros(2, 2).double())
    assert mean_pool(hidden.bfloat16(), mask).dtype == torch.bfloat16  # the hidden's dtype
    with pytest.raises(ValueError, match=r"^hidden must be \(batch, seq, d_model\), got \(2, 3\)$"):
        mean_pool(torch.zeros(2, 3))


def test_sentence_embedding_reads_token_types():
    model = BertEncoder.from_preset("tiny").eval()
    ids, mask, types = padded_batch("cpu", vocab=256)
    with torch.no_grad():
        hidden = model(ids, mask, types).hidden
        expected = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
        torch.testing.assert_close(model.sentence_embedding(ids, mask, types), expected)


def _tiny_heads(encoder: BertEncoder) -> dict[str, torch.nn.Module]:
    return {
        "classifier": BertForSequenceClassification.from_encoder(encoder, num_labels=2),
        "mlm": BertForMaskedLM.from_encoder(encoder),
        "qa": BertForQuestionAnswering.from_encoder(encoder),
    }


def test_heads_return_attentions_and_hidden_states_only_when_asked():
    encoder = BertEncoder.from_preset("tiny").eval()
    ids, mask, types = padded_batch("cpu", vocab=256)
    with torch.no_grad():
        plain_ref = encoder(ids, mask, types)
        weights_ref = encoder(ids, mask, types, need_weights=True).attentions
        states_ref = encoder(ids, mask, types, output_hidden_states=True).hidden_states
        assert plain_ref.attentions is None and plain_ref.hidden_states is None
        assert len(weights_ref) == 2
        alias = encoder(ids, mask, types, output_attentions=True).attentions
        assert all(torch.equal(a, b) for a, b in zip(alias, weights_ref, strict=True))
        assert len(states_ref) == 3 and torch.equal(states_ref[-1], plain_ref.hidden)
        assert torch.equal(states_ref[0], encoder.embeddings(ids, types))
        for name, head in _tiny_heads(encoder).items():
            plain = head(ids, mask, types)
            assert plain.loss is None, name
            assert plain.attentions is None and plain.hidden_states is None, name
            assert torch.equal(plain.hidden, plain_ref.hidden), name
            for asked in (dict(need_weights=True), dict(output_attentions=True)):
                out = head(ids, mask, types, **asked)
                assert len(out.attentions) == 2 and out.hidden_states is None, (name, asked)
                for ours, theirs in zip(out.attentions, weights_ref, strict=True):
                    assert torch.equal(ours, theirs), name
            out = head(ids, mask, types, output_hidden_states=True)
            assert out.attentions is None and len(out.hidden_states) == 3, name
            for ours, theirs in zip(out.hidden_states, states_ref, strict=True):
                assert torch.equal(ours, theirs), name


def test_heads_follow_the_encoders_dtype_and_start_from_berts_init():
    encoder = BertEncoder.from_preset("tiny").double()
    for name, head in _tiny_heads(encoder).items():
        assert all(p.dtype == torch.float64 for p in head.parameters()), name
    torch.manual_seed(0)
    big = BertConfig.preset("tiny", d_model=256, d_ff=256, n_heads=4)
    encoder = BertEncoder(big)
    classifier = BertForSequenceClassification.from_encoder(encoder, num_labels=256).classifier
    for layer in (classifier, BertForMaskedLM.from_encoder(encoder).dense,
                  BertForQuestionAnswering.from_encoder(encoder).qa_outputs):  # fmt: skip
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert abs(layer.weight.std().item() - 0.02) < 0.002


def test_classifier_dropout_is_passed_on():
    encoder = BertEncoder.from_preset("tiny")
    assert BertForSequenceClassification.from_encoder(encoder, 2, dropout=0.3).dropout.p == 0.3
    hf = transformers.BertForSequenceClassification(tiny_hf_config(classifier_dropout=0.3))
    assert BertForSequenceClassification.from_hf(hf).dropout.p == 0.3


def test_head_and_from_hf_messages_are_exact():
    model = BertEncoder.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    mlm, qa = BertForMaskedLM.from_encoder(model), BertForQuestionAnswering.from_encoder(model)
    with pytest.raises(ValueError, match=r"^labels must have shape \(2, 5\), got \(2, 4\)$"):
        mlm(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"^give both start_positions and end_positions, or neither$"
    ):
        qa(ids, start_positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^start_positions must have shape \(2,\), got \(1,\)$"):
        qa(ids, start_positions=torch.tensor([0]), end_positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^start_positions must lie in \[0, 5\), got \[-1, 0\]$"):
        qa(ids, start_positions=torch.tensor([-1, 0]), end_positions=torch.tensor([0, 1]))
    untied = transformers.BertForMaskedLM(tiny_hf_config(tie_word_embeddings=False))
    with pytest.raises(
        ValueError,
        match=r"^labkit's masked-LM decoder is tied to the word embeddings, but this "
        r"transformers model has an untied decoder \(tie_word_embeddings=False\)$",
    ):
        BertForMaskedLM.from_hf(untied)
    hf = transformers.BertModel(tiny_hf_config())
    hf.encoder.layer[1].output.dense = torch.nn.Linear(40, 32, bias=False)
    with pytest.raises(
        ValueError,
        match=r"^cannot copy transformers into labkit's BertEncoder: .*"
        r"layers\.1\.ffn\.down_proj\.weight: transformers encoder\.layer\.1\.output\.dense"
        r"\.weight is \(32, 40\), labkit .* \(pass a BertModel to BertEncoder\.from_hf, "
        r"e\.g\. hf\.bert of a task model\)$",
    ):
        BertEncoder.from_hf(hf)


def test_best_span_default_length_and_both_masks():
    start, end = torch.zeros(2, 40), torch.zeros(2, 40)
    start[:, 0], end[:, 30] = 5.0, 5.0  # a 31-token span: one more than the default allows
    end[:, 29] = 4.0
    s, e = best_span(start, end)
    assert s.tolist() == [0, 0] and e.tolist() == [29, 29]
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[:, 29] = 0  # padding, though the context mask allows it
    s, e = best_span(start, end, attention_mask=mask, context_mask=torch.ones(2, 40))
    assert s.tolist() == [0, 0] and e.tolist() == [0, 0]  # the first of the spans scoring 5
    for name in ("attention_mask", "context_mask"):
        with pytest.raises(
            ValueError, match=rf"^{name} must be \(batch, seq\) = \(2, 40\), got \(2, 3\)$"
        ):
            best_span(start, end, **{name: torch.ones(2, 3)})
    dead = torch.ones(2, 40)
    dead[1] = 0  # the second example has nowhere to put an answer
    with pytest.raises(
        ValueError, match=r"^every example needs at least one position where an answer may lie$"
    ):
        best_span(start, end, context_mask=dead)


def test_config_refuses_each_size_below_one_and_eps_zero():
    for name in ("vocab_size", "max_len", "type_vocab_size", "n_layers", "n_heads", "d_model",
                 "d_ff"):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{name} must be at least 1, got {name}=0$"):
            BertConfig.preset("tiny", **{name: 0})
    with pytest.raises(ValueError, match=r"^eps must be > 0, got 0\.0$"):
        BertConfig.preset("tiny", eps=0.0)


def test_layers_and_pad_embedding_follow_the_config():
    config = BertConfig.preset("tiny", dropout=0.3, eps=1e-3, pad_id=3)
    model = BertEncoder(config)
    for layer in model.layers:
        assert layer.dropout1.p == 0.3 and layer.norm1.eps == layer.norm2.eps == 1e-3
    word = model.embeddings.word
    tables = (word, model.embeddings.position.embedding, model.embeddings.token_type)
    assert all(abs(table.weight.std().item() - 0.02) < 0.004 for table in tables)  # N(0, 0.02)
    assert word.padding_idx == 3 and torch.equal(word.weight[3], torch.zeros(64))
    (model(torch.tensor([[1, 3, 4]])).hidden * torch.randn(1, 3, 64)).sum().backward()
    assert torch.equal(word.weight.grad[3], torch.zeros(64)) and word.weight.grad[4].any()


def test_one_label_is_regression_with_mean_squared_error():
    model = BertEncoder.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (3, 5))
    head = BertForSequenceClassification.from_encoder(model, num_labels=1)
    scores = torch.tensor([0, 3, 5])  # integer scores are read as numbers
    out = head(ids, labels=scores)
    assert out.logits.shape == (3, 1)
    assert head(ids, labels=scores.double()).loss.dtype == torch.float32  # the logits' dtype
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - scores) ** 2).mean())
    with pytest.raises(ValueError, match=r"^num_labels must be >= 1, got 0$"):
        BertForSequenceClassification(BertConfig.preset("tiny"), num_labels=0)
