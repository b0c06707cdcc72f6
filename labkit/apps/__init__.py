"""Applications of a pretrained language model: retrieval, prompt chains and tool-using agents.

- ``retrieval``: ``chunk_markdown`` (notebooks into paragraph chunks), ``BM25Retriever``
  (keyword, via ``bm25s``), ``DenseRetriever`` (MiniLM sentence vectors), ``ranks``,
  ``reciprocal_rank_fusion`` (the hybrid) and ``hits_at_k`` (per-query hit@k);
- ``chains``: ``ChainStep`` and ``run_chain``, prompts run in order, each reading the outputs of
  the earlier ones (decompose -> answer -> verify);
- ``agents``: ``calculate`` (a safe ``ast`` calculator), ``Tool``, ``parse_action`` /
  ``ToolCallError``, and ``Agent``, the tool-using loop with a step budget and a memory across
  turns, returning ``AgentResult``s.

The language model enters as a function ``complete(prompts, max_new_tokens, stop) -> texts``,
so every loop here is tested with a scripted fake model (``tests/test_apps.py``). Everything
is re-exported here, e.g. ``from labkit.apps import Agent, BM25Retriever``.
"""

from labkit.apps.agents import (
    Agent,
    AgentResult,
    AgentStep,
    Tool,
    ToolCallError,
    calculate,
    parse_action,
    show_number,
)
from labkit.apps.chains import ChainStep, run_chain
from labkit.apps.retrieval import (
    BM25Retriever,
    DenseRetriever,
    chunk_markdown,
    hits_at_k,
    ranks,
    reciprocal_rank_fusion,
)

__all__ = [
    "Agent",
    "AgentResult",
    "AgentStep",
    "BM25Retriever",
    "ChainStep",
    "DenseRetriever",
    "Tool",
    "ToolCallError",
    "calculate",
    "chunk_markdown",
    "hits_at_k",
    "parse_action",
    "ranks",
    "reciprocal_rank_fusion",
    "run_chain",
    "show_number",
]
