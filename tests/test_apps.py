"""labkit.apps: retrieval (BM25 against its formula, fusion, hit@k), prompt chains and the agent
loop, the loops driven by a scripted fake model so their logic is proven without a real one."""

import math

import nbformat
import pytest
import torch

from labkit.apps import (
    Agent,
    BM25Retriever,
    ChainStep,
    DenseRetriever,
    Tool,
    ToolCallError,
    calculate,
    chunk_markdown,
    hits_at_k,
    parse_action,
    ranks,
    reciprocal_rank_fusion,
    run_chain,
)


class ScriptedModel:
    """A fake ``complete``: returns the scripted texts in order and records every prompt."""

    def __init__(self, outputs):
        self.outputs, self.prompts, self.calls = list(outputs), [], []

    def __call__(self, prompts, max_new_tokens, stop):
        self.calls.append((len(prompts), max_new_tokens, stop))
        self.prompts.extend(prompts)
        return [self.outputs.pop(0) for _ in prompts]


# --- retrieval ---------------------------------------------------------------------------------

DOCS = [
    "the cat sat on the mat",
    "dogs chase cats in the park",
    "a cat and another cat play with a cat toy",
    "stock markets fell sharply today",
]


def test_bm25_scores_equal_the_lucene_formula():
    """Lucene's BM25: idf times a saturated term frequency, without the constant (k1 + 1)."""
    k1, b = 1.2, 0.75
    scores = BM25Retriever(DOCS, k1=k1, b=b).scores(["cat toy", "markets"])
    terms = BM25Retriever.tokenize(DOCS)
    avgdl = sum(len(t) for t in terms) / len(terms)

    def bm25(query, doc):
        total = 0.0
        for term in BM25Retriever.tokenize([query])[0]:
            df = sum(term in t for t in terms)
            idf = math.log(1 + (len(terms) - df + 0.5) / (df + 0.5))
            tf = doc.count(term)
            total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        return total

    expected = torch.tensor([[bm25(q, d) for d in terms] for q in ["cat toy", "markets"]])
    torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-6)
    assert scores[0].argmax() == 2 and scores[1].argmax() == 3
    assert scores[1, :3].eq(0).all(), "no shared term, score 0"
    assert "the" not in terms[0], "English stop words are removed"


def test_bm25_rejects_empty_corpus():
    with pytest.raises(ValueError, match="non-empty list"):
        BM25Retriever([])


class _Encoder(torch.nn.Module):
    """A stand-in for BertEncoder.sentence_embedding: a bag of hashed characters."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(8))

    def sentence_embedding(self, input_ids, attention_mask, token_type_ids=None):
        bags = torch.nn.functional.one_hot(input_ids % 8, 8).float() * attention_mask[..., None]
        return torch.nn.functional.normalize(bags.sum(1) @ self.weight, dim=-1)


def _tokenizer(texts, padding, truncation, max_length, return_tensors):
    ids = [[ord(c) for c in t][:max_length] for t in texts]
    width = max(len(i) for i in ids)
    from transformers import BatchEncoding

    return BatchEncoding({
        "input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
    })


def test_dense_retriever_scores_are_cosines_batched_or_not():
    one = DenseRetriever(_Encoder(), _tokenizer, DOCS, batch_size=1)
    many = DenseRetriever(_Encoder(), _tokenizer, DOCS, batch_size=3)
    torch.testing.assert_close(one.vectors, many.vectors)
    torch.testing.assert_close(one.vectors.norm(dim=-1), torch.ones(len(DOCS)))
    scores = one.scores(["cat"])
    torch.testing.assert_close(scores, one.embed(["cat"]) @ one.vectors.T)
    assert scores.shape == (1, len(DOCS)) and scores.abs().max() <= 1 + 1e-6


def test_ranks_and_reciprocal_rank_fusion_by_hand():
    a = torch.tensor([[3.0, 1.0, 2.0]])  # ranks 1, 3, 2
    b = torch.tensor([[0.1, 0.9, 0.5]])  # ranks 3, 1, 2
    assert ranks(a).tolist() == [[1, 3, 2]] and ranks(b).tolist() == [[3, 1, 2]]
    fused = reciprocal_rank_fusion([a, b], k=60)
    expected = [[1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62 + 1 / 62]]
    torch.testing.assert_close(fused, torch.tensor(expected, dtype=torch.float64))
    # 1/x is convex: first in one list and last in the other edges out second in both
    assert fused[0, 0] == fused[0, 1] > fused[0, 2]
    # scale-free: rescaling one retriever's scores changes nothing
    torch.testing.assert_close(reciprocal_rank_fusion([a * 100, b]), fused)
    with pytest.raises(ValueError, match="must all be"):
        reciprocal_rank_fusion([a, torch.zeros(1, 4)])


def test_hits_at_k():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    sources = ["x", "y", "z"]
    assert hits_at_k(scores, sources, ["x", "x"], 1).tolist() == [True, False]
    assert hits_at_k(scores, sources, ["z", "y"], 2).tolist() == [True, True]
    assert hits_at_k(scores, sources, ["x", "x"], 3).tolist() == [True, True]
    with pytest.raises(ValueError, match="k must be in"):
        hits_at_k(scores, sources, ["x", "x"], 4)
    with pytest.raises(ValueError, match="expected sources"):
        hits_at_k(scores, sources, ["x"], 1)


def test_chunk_markdown_keeps_paragraphs_and_drops_headings(tmp_path):
    nb = nbformat.v4.new_notebook()
    para = " ".join(["word"] * 50)
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A heading"),
        nbformat.v4.new_markdown_cell("\n\n".join([para, para, para])),
        nbformat.v4.new_code_cell("x = 1  " * 20),
    ]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    chunks = chunk_markdown(path, max_words=120)
    assert [len(c.split()) for c in chunks] == [100, 50]  # two paragraphs fit, the third not


# --- prompt chains -----------------------------------------------------------------------------


def test_chain_feeds_each_step_the_earlier_outputs():
    model = ScriptedModel(["P1\n", "P2\n", " W1 ", " W2 "])
    steps = [
        ChainStep("plan", "Q: {question}\nPlan:", 5, ("\n",)),
        ChainStep("work", lambda v: f"Q: {v['question']} Plan: {v['plan']} Work:", 7),
    ]
    out = run_chain(model, steps, [{"question": "a"}, {"question": "b"}])
    assert model.calls == [(2, 5, ("\n",)), (2, 7, ())], "one batched call per step"
    assert [o["plan"] for o in out] == ["P1", "P2"], "the stop string is stripped"
    assert model.prompts[2:] == ["Q: a Plan: P1 Work:", "Q: b Plan: P2 Work:"]
    assert out[1]["work"] == "W2" and out[0]["work_prompt"] == "Q: a Plan: P1 Work:"


def test_chain_names_an_unknown_placeholder():
    steps = [ChainStep("work", "Q: {question} Plan: {plan}", 5)]
    with pytest.raises(ValueError, match=r"\{plan\}.*\['question'\]"):
        run_chain(ScriptedModel(["x"]), steps, [{"question": "a"}])


# --- agents ------------------------------------------------------------------------------------

PRICES = {"apple": 2, "pear": 3}
TOOLS = [
    Tool("calculator", "evaluates + - * / expressions", calculate),
    Tool("price", "the price of one fruit in euros", lambda name: PRICES[name.strip()]),
]


def test_calculator_is_safe():
    assert calculate("(3 + 4) * 5") == 35 and calculate("-2 - 1") == -3
    for unsafe in ["__import__('os')", "2 ** 1000", "x + 1", "abs(-3)", "[1] * 9"]:
        with pytest.raises(ValueError):
            calculate(unsafe)
    with pytest.raises(ZeroDivisionError):
        calculate("1 / 0")


def test_parse_action_explains_what_is_wrong():
    assert parse_action("Thought: hm\nAction: price(apple)", TOOLS) == ("price", "apple")
    for text, problem in [
        ("Action: price apple", "malformed action 'price apple'"),
        ("Action: weather(Oslo)", "unknown tool 'weather'"),
        ("I think it is 12", "no action or answer found"),
    ]:
        with pytest.raises(ToolCallError) as err:
            parse_action(text, TOOLS)
        message = str(err.value)
        assert problem in message and "['calculator', 'price']" in message, message
        assert "Action: <tool>(<argument>)" in message


def test_agent_dispatches_tools_and_answers():
    model = ScriptedModel([
        "Action: price(apple)\nObservation:",
        "Action: calculator(6 * 2)\nObservation:",
        "Answer: 12",
    ])
    agent = Agent(model, TOOLS, instructions="Use the tools.", max_steps=5)
    result = agent.ask("How much do 6 apples cost?")
    assert result.answer == "12" and result.stopped == "answer" and len(result.steps) == 3
    assert [(s.tool, s.argument, s.observation) for s in result.steps[:2]] == [
        ("price", "apple", "2"),
        ("calculator", "6 * 2", "12"),
    ]
    # each step's prompt holds everything before it, observations included
    assert model.prompts[2].endswith(
        "Question: How much do 6 apples cost?\nAction: price(apple)\nObservation: 2\n"
        "Action: calculator(6 * 2)\nObservation: 12\n"
    )
    assert all(stop == ("Observation:",) for _, _, stop in model.calls)
    assert "- price: the price of one fruit in euros" in model.prompts[0]


def test_agent_memory_carries_across_turns_and_reset_forgets():
    model = ScriptedModel(["Answer: 12", "Answer: 38", "Answer: ?"])
    agent = Agent(model, TOOLS)
    agent.ask("How much do 6 apples cost?")
    assert "Conversation so far" not in model.prompts[0]
    agent.ask("And the change from 50 euros?")
    assert "Conversation so far:\nQuestion: How much do 6 apples cost?\nAnswer: 12\n" in (
        model.prompts[1]
    )
    assert agent.memory == [("How much do 6 apples cost?", "12"),
                            ("And the change from 50 euros?", "38")]  # fmt: skip
    agent.reset()
    agent.ask("What did I buy?")
    assert "Conversation so far" not in model.prompts[2]


def test_agent_step_budget_stops_the_loop():
    model = ScriptedModel(["Action: calculator(1 + 1)\nObservation:"] * 3)
    agent = Agent(model, TOOLS, max_steps=3)
    result = agent.ask("Loop forever")
    assert result.stopped == "budget" and result.answer is None and len(result.steps) == 3
    assert len(model.prompts) == 3, "no generation beyond the budget"
    assert agent.memory == [("Loop forever", None)]
    agent.ask("next") if model.outputs else None
    assert "Answer: (no answer)" in agent.prompt("next", [])


def test_agent_returns_malformed_calls_and_tool_errors_to_the_model():
    model = ScriptedModel([
        "Action: calculator 3 * 4\nObservation:",
        "Action: calculator(3 / 0)\nObservation:",
        "Action: price(mango)\nObservation:",
        "Answer: 12\nAction: calculator(1 + 1)",  # answer first: the turn ends
    ])
    result = Agent(model, TOOLS, max_steps=6).ask("What is 3 times 4?")
    observations = [s.observation for s in result.steps[:3]]
    assert observations[0].startswith("error: malformed action 'calculator 3 * 4'")
    assert "Action: <tool>(<argument>)" in observations[0]
    assert observations[1].startswith("error: calculator(3 / 0) failed: division by zero")
    assert observations[2] == "error: price(mango) failed: 'mango'"
    assert f"Observation: {observations[0]}\n" in model.prompts[1], "the model sees the error"
    assert result.answer == "12" and result.stopped == "answer" and len(result.steps) == 4


def test_agent_first_step_prefix_starts_only_the_first_step():
    model = ScriptedModel([" price(pear)\nObservation:", "Answer: 3"])
    result = Agent(model, TOOLS, first_step_prefix="Action:").ask("Price of a pear?")
    assert model.prompts[0].endswith("Question: Price of a pear?\nAction:")
    assert model.prompts[1].endswith("Action: price(pear)\nObservation: 3\n")
    assert result.steps[0].tool == "price" and result.answer == "3"


def test_agent_rejects_bad_configuration():
    with pytest.raises(ValueError, match="distinct"):
        Agent(ScriptedModel([]), [TOOLS[0], TOOLS[0]])
    with pytest.raises(ValueError, match="max_steps"):
        Agent(ScriptedModel([]), TOOLS, max_steps=0)
    with pytest.raises(ValueError, match="lower-case identifier"):
        Tool("Web Search", "no", str)
