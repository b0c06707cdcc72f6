"""Retrieval for retrieval-augmented generation: keyword (BM25), dense (MiniLM) and their fusion.

A retriever maps Q queries and N documents to a score matrix (Q, N): higher is more relevant.
Everything downstream (top-k, fusion, hit rates) works on such matrices, so the retrievers are
interchangeable and their scores comparable rank by rank.

- ``chunk_markdown``: a notebook's markdown cells cut into chunks of whole paragraphs;
- ``BM25Retriever``: Okapi BM25 (Robertson & Zaragoza 2009) computed by the ``bm25s`` library,
  Lucene's variant: ``idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))`` times the saturated
  term frequency ``tf / (tf + k1 (1 - b + b |d| / avgdl))`` (the textbook's extra factor
  ``k1 + 1`` scales every score alike, so Lucene drops it: no ranking changes);
- ``DenseRetriever``: cosine similarity of unit sentence vectors from a ``BertEncoder``
  (all-MiniLM-L6-v2's mean pooling);
- ``reciprocal_rank_fusion``: RRF (Cormack, Clarke & Buettcher 2009),
  ``sum over retrievers of 1 / (k + rank)``, which needs no score calibration;
- ``hits_at_k``: for each query, whether a document of its expected source is in the top k.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import nbformat
import numpy as np
import torch
from torch import Tensor


def chunk_markdown(path: str | Path, max_words: int = 120, min_words: int = 8) -> list[str]:
    """The markdown cells of notebook ``path`` as chunks of whole paragraphs.

    Paragraphs (split at blank lines) of one cell are joined until adding the next would pass
    ``max_words``; a chunk never spans two cells or stops mid-paragraph (a single paragraph
    longer than ``max_words`` is one chunk). Chunks under ``min_words`` (bare headings) are
    dropped.
    """
    if max_words < 1 or min_words < 0:
        raise ValueError(f"max_words must be >= 1 and min_words >= 0, got {max_words}, {min_words}")
    chunks = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        buffer: list[str] = []
        for paragraph in cell.source.split("\n\n"):
            if buffer and len(" ".join([*buffer, paragraph]).split()) > max_words:
                chunks.append("\n\n".join(buffer))
                buffer = []
            buffer.append(paragraph)
        if buffer:
            chunks.append("\n\n".join(buffer))
    return [c for c in chunks if len(c.split()) >= min_words]


def _check_documents(documents: Sequence[str]) -> None:
    if isinstance(documents, str) or not documents:
        raise ValueError("documents must be a non-empty list of strings, got "
                         f"{type(documents).__name__} of length {len(documents)}")


class BM25Retriever:
    """Keyword retrieval: BM25 scores of every document for each query, via ``bm25s``.

    Text is lower-cased and split into words of two or more letters or digits; English stop
    words are removed (``bm25s.tokenize``); no stemming. ``k1`` bounds how much repeating a term
    helps, ``b`` how much long documents are penalised.

    Args:
        documents: the N texts to search.
        k1, b: BM25's parameters (the defaults are bm25s' own).
    """

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        _check_documents(documents)
        self.documents = list(documents)
        self.model = bm25s.BM25(k1=k1, b=b, method="lucene")
        self.model.index(self.tokenize(self.documents), show_progress=False)

    @staticmethod
    def tokenize(texts: Sequence[str]) -> list[list[str]]:
        """Each text as its list of index terms (the tokenizer used for documents and queries)."""
        return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)

    def scores(self, queries: Sequence[str]) -> Tensor:
        """(Q, N) float32 BM25 scores; 0 where a document shares no term with the query."""
        rows = [self.model.get_scores(terms) for terms in self.tokenize(queries)]
        return torch.from_numpy(np.stack(rows).astype(np.float32))


class DenseRetriever:
    """Dense retrieval: cosine similarity of sentence vectors (the encoder's mean pooling).

    Args:
        encoder: a ``labkit.models.BertEncoder`` (``load("minilm").model``).
        tokenizer: its Hugging Face tokenizer.
        documents: the N texts to search; embedded once here.
        max_length: longer texts are truncated to this many tokens (MiniLM was trained on 256).
    """

    def __init__(
        self,
        encoder: Any,
        tokenizer: Any,
        documents: Sequence[str],
        max_length: int = 256,
        batch_size: int = 32,
    ) -> None:
        _check_documents(documents)
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.documents = list(documents)
        self.vectors = self.embed(self.documents)  # (N, D), unit rows

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), D) unit vectors on the CPU, computed in batches."""
        device = next(self.encoder.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(device)  # fmt: skip
            out.append(
                self.encoder.sentence_embedding(
                    batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
                ).float().cpu()
            )
        return torch.cat(out)

    def scores(self, queries: Sequence[str]) -> Tensor:
        """(Q, N) cosine similarities in [-1, 1]."""
        return self.embed(queries) @ self.vectors.T


def ranks(scores: Tensor) -> Tensor:
    """(Q, N) 1-based rank of each document per query (1 = highest score; ties by index)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (Q, N) document ids
    out = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1).expand_as(order)
    return out.scatter_(-1, order, positions)


def reciprocal_rank_fusion(score_matrices: Sequence[Tensor], k: float = 60.0) -> Tensor:
    """(Q, N) fused scores ``sum_m 1 / (k + rank_m)`` of several (Q, N) score matrices.

    Only ranks enter, so retrievers on different scales (BM25's unbounded scores, cosines in
    [-1, 1]) are combined without calibration; ``k`` (60 in the paper) damps the influence of
    the very first ranks.
    """
    if not score_matrices:
        raise ValueError("reciprocal_rank_fusion needs at least one score matrix")
    shapes = {tuple(s.shape) for s in score_matrices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"score matrices must all be (Q, N), got shapes {sorted(shapes)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return sum(1.0 / (k + ranks(s).double()) for s in score_matrices)


def hits_at_k(
    scores: Tensor, document_sources: Sequence[Any], expected: Sequence[Any], k: int
) -> Tensor:
    """(Q,) bool: whether any of query q's top-k documents has source ``expected[q]``.

    Its mean is the hit rate@k; keeping the per-query values allows paired comparisons of two
    retrievers on the same queries.
    """
    n_queries, n_docs = scores.shape
    if len(document_sources) != n_docs or len(expected) != n_queries:
        raise ValueError(
            f"scores are (Q={n_queries}, N={n_docs}) but got {len(document_sources)} document "
            f"sources and {len(expected)} expected sources"
        )
    if not 1 <= k <= n_docs:
        raise ValueError(f"k must be in [1, N={n_docs}], got {k}")
    top = scores.topk(k, dim=-1).indices.tolist()  # (Q, k)
    pairs = zip(top, expected, strict=True)
    return torch.tensor([any(document_sources[j] == want for j in row) for row, want in pairs])
