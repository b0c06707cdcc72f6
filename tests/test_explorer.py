"""labkit.viz: AttentionExplorer over every labkit model, its widget and static view."""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from labkit.models import (  # noqa: E402
    GPT,
    BertEncoder,
    BertForSequenceClassification,
    Llama,
    Transformer,
)
from labkit.viz import explorer  # noqa: E402

CDN = re.compile(r"cdn|unpkg|jsdelivr|cdnjs|require\.js|https?://(?!www\.w3\.org/2000/svg)", re.I)


pytestmark = pytest.mark.usefixtures("close_figures")


def tiny_models(vocab):
    torch.manual_seed(0)
    return {
        "gpt": GPT.from_preset("tiny", vocab_size=vocab),
        "llama": Llama.from_preset("tiny", vocab_size=vocab),
        "bert": BertEncoder.from_preset("tiny", vocab_size=vocab),
        "transformer": Transformer.from_preset("tiny", src_vocab_size=vocab, tgt_vocab_size=vocab),
    }


@pytest.fixture(scope="module")
def models(tok):
    return tiny_models(tok.vocab_size)


@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "transformer"])
def test_explorer_builds_for_every_model_with_padding(models, tok, name):
    model = models[name]
    texts = ["hello world", "the cat"]  # different lengths: a padded batch
    target = ["2020-01-01", "1999"] if name == "transformer" else None
    ex = explorer.AttentionExplorer(model, tok, texts, target=target, view_id=f"t-{name}")
    assert len(ex.examples) == 2
    key = "cross" if name == "transformer" else "self"
    tq, tk = ex.tokens(example=1, attention=key)
    w = ex.stack(example=1, attention=key)  # (L, H, q, k), padding removed
    assert w.shape[2:] == (len(tq), len(tk))
    assert np.allclose(w.sum(-1), 1.0, atol=1e-5)  # rows of real tokens still sum to 1
    if name == "bert":
        assert tq[0] == "<bos>" and len(tq) == len("the cat") + 2
    elif name == "transformer":
        assert tq == ["<bos>", *"1999"] and tk == list("the cat")
    else:
        assert tq == list("the cat")
    # the unpadded example alone gives the same maps
    alone = explorer.AttentionExplorer(
        model, tok, "the cat", target=target[1] if target else None, view_id="alone"
    )
    assert np.allclose(alone.stack(attention=key), w, atol=1e-5)
    if name in ("gpt", "llama"):
        assert np.allclose(np.triu(w, 1), 0)  # causal
    html = ex.to_html()
    assert f'data-labkit-explorer="t-{name}"' in html
    assert "<script src=" not in html and not CDN.search(html)
    for part in ("layer", "head", "token", "plot", "data", "example", "attention", "legend"):
        assert f'id="labkit-explorer-t-{name}-{part}"' in html
    assert ex.to_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explorer_transformer_types_and_encoder_weights_match(models, tok):
    model = models["transformer"]
    ex = explorer.AttentionExplorer(model, tok, ["hello world"], target=["1999"], view_id="seq")
    assert ex.kind == "encoder-decoder" and ex.attention_types == ["encoder", "decoder", "cross"]
    enc = ex.stack(attention="encoder")
    assert enc.shape[2:] == (11, 11) and np.allclose(enc.sum(-1), 1, atol=1e-5)
    dec = ex.stack(attention="decoder")
    assert np.allclose(np.triu(dec, 1), 0)
    # the hooks do not change what encode computes
    ids = torch.tensor([tok.encode("hello world")])
    assert model.training  # the explorer evaluates in eval mode and restores the mode
    with torch.no_grad():
        model.eval()
        memory = model.encode(ids)
        out = model.decode(
            torch.tensor([[model.config.bos_id, *tok.encode("1999")]]), memory, need_weights=True
        )
        model.train()
    assert np.allclose(
        ex.stack(attention="cross")[0], out.cross_attentions[0][0].numpy(), atol=1e-6
    )
    generated = explorer.AttentionExplorer(model, tok, "hello", view_id="gen", max_new_tokens=5)
    assert len(generated.tokens(attention="cross")[0]) <= 6


def test_explorer_bert_head_ids_and_layers(models, tok):
    clf = BertForSequenceClassification(models["bert"].config, num_labels=2)
    ex = explorer.AttentionExplorer(clf, tok, "hello", layers=[-1], view_id="clf")
    assert ex.kind == "encoder" and ex.layer_ids["self"] == [1]
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    gpt = explorer.AttentionExplorer(
        models["gpt"], None, ids, attention_mask=ids != 0, view_id="ids"
    )
    assert gpt.tokens(example=1)[0] == ["5", "6"]
    assert gpt.weights(layer=0, head=1, example=0).shape == (4, 4)
    assert gpt.weights(layer=1).shape == (2, 4, 4)


def test_explorer_payload_rounded_and_truncated(models, tok):
    with pytest.warns(UserWarning, match="truncated"):
        ex = explorer.AttentionExplorer(
            models["gpt"], tok, "hello world, the cat", max_tokens=6, view_id="trunc"
        )
    assert ex.tokens()[0] == list("hello ")
    payload = ex.payload()
    w = payload["examples"][0]["maps"]["self"]["w"]  # [L][H][q*k] thousandths
    assert len(w) == 2 and len(w[0][0]) == 36 and all(isinstance(v, int) for v in w[0][0])
    exact = ex.weights(0, 0).ravel()
    assert np.abs(np.array(w[0][0]) / 1000 - exact).max() <= 5e-4 + 1e-9
    assert any("truncated" in n for n in payload["notes"])
    html = ex.to_html()
    data = re.search(
        r'<script type="application/json" id="labkit-explorer-trunc-data">(.*?)'
        r"</script>",
        html,
        re.S,
    ).group(1)
    assert json.loads(data)["id"] == "trunc"


def test_two_explorers_on_one_page_have_distinct_ids(models, tok):
    a = explorer.AttentionExplorer(models["gpt"], tok, "cat", view_id="one").to_html()
    b = explorer.AttentionExplorer(models["gpt"], tok, "cat", view_id="two").to_html()
    ids_a, ids_b = set(re.findall(r'id="([^"]+)"', a)), set(re.findall(r'id="([^"]+)"', b))
    assert ids_a and not ids_a & ids_b
    assert a == explorer.AttentionExplorer(models["gpt"], tok, "cat", view_id="one").to_html()


def test_explorer_bad_input(models, tok):
    with pytest.raises(ValueError, match="not a labkit attention model"):
        explorer.AttentionExplorer(torch.nn.Linear(2, 2), tok, "hi")
    with pytest.raises(ValueError, match="view_id"):
        explorer.AttentionExplorer(models["gpt"], tok, "hi", view_id="has space")
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        explorer.AttentionExplorer(models["gpt"], None, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        explorer.AttentionExplorer(models["transformer"], tok, ["a", "b"], target=["1"])
    with pytest.raises(ValueError, match="layers"):
        explorer.AttentionExplorer(models["gpt"], tok, "hi", layers=[5])
    with pytest.raises(ValueError, match="kind"):
        explorer.AttentionExplorer(models["gpt"], tok, "hi", kind="encoder")
    ex = explorer.AttentionExplorer(models["gpt"], tok, "hi", view_id="ok")
    with pytest.raises(ValueError, match="stored"):
        ex.weights(layer=7)


def test_explorer_mimebundle_and_widget(models, tok):
    ex = explorer.AttentionExplorer(
        models["transformer"], tok, ["hello", "cat"], target=["12", "3"], view_id="w"
    )
    bundle = ex._repr_mimebundle_()
    assert set(bundle) == {"text/html", "image/png", "text/plain"}
    assert "application/vnd.jupyter.widget-view+json" not in bundle
    ui = ex.widget()
    c = ex.controls
    assert c["attention"].value == "cross" and list(c["layer"].options) == [0, 1]
    c["layer"].value = 1
    c["head"].value = 2
    assert ex.last_view["layer"] == 1 and ex.last_view["head"] == 2
    c["attention"].value = "encoder"
    c["token"].value = 1
    assert ex.last_view["attention"] == "encoder" and ex.last_view["token"] == 1
    before = {t: (ex.tokens(example=1, attention=t), ex.stack(example=1, attention=t).copy())
              for t in ex.attention_types}  # fmt: skip
    c["text"].value = "the mat"
    c["run"].click()  # a new view of the new text (target generated)
    view = ex.widget_view
    assert view is not ex and view.tokens(attention="encoder")[0] == list("the mat")
    assert c["example"].options == (("the mat", 0),)
    c["head"].value = 1  # the new view redraws
    assert ex.last_view["head"] == 1 and ex.last_view["example"] == 0
    # the explorer's own examples are untouched: example 1 is still there, with the same maps
    assert len(ex.examples) == 2 and ex.text == ["hello", "cat"]
    for t, (tokens, weights) in before.items():
        assert ex.tokens(example=1, attention=t) == tokens
        assert np.array_equal(ex.stack(example=1, attention=t), weights)
    assert len(ui.children) == 5
