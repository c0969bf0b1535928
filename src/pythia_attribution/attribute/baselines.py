"""Baselines next to the gradient methods: BM25, activation similarity, random scores."""

from __future__ import annotations

import numpy as np
import torch


def bm25_scores(train_texts: list[str], query_texts: list[str]) -> np.ndarray:
    """BM25 (bm25s, its default Lucene variant) of every query against every training text."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(train_texts, stopwords=None, show_progress=False), show_progress=False)
    out = np.zeros((len(query_texts), len(train_texts)), dtype=np.float32)
    vocab = retriever.vocab_dict
    for i, query in enumerate(query_texts):
        tokens = bm25s.tokenize([query], stopwords=None, return_ids=False, show_progress=False)[0]
        known = [t for t in tokens if t in vocab]
        if known:
            out[i] = retriever.get_scores(known)
    return out


def middle_layer(num_layers: int) -> int:
    """The hidden-state index of the middle layer's output (0 is the embedding output)."""
    return max(1, num_layers // 2)


@torch.no_grad()
def mean_activations(model, rows: list[list[int]], layer: int, batch_size: int = 64) -> np.ndarray:
    """Mean residual-stream activation over each row's tokens at ``layer``, unit-normalized."""
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    result = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
    for _, members in sorted(by_len.items()):
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            ids = torch.tensor([rows[i] for i in idx])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            result[idx] = hidden.mean(dim=1).float().numpy()
    norms = np.linalg.norm(result, axis=1, keepdims=True)
    return result / np.maximum(norms, 1e-12)


def random_scores(n_queries: int, n_train: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    return rng.random((n_queries, n_train), dtype=np.float32)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row, ties broken by the lower index (stable across runs)."""
    k = min(k, scores.shape[1])
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def faiss_topk(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products through an exact faiss index (IndexFlatIP), as at real scale.

    Only for methods without a Hessian: faiss cannot apply bergson's preconditioner correctly.
    """
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(keys)))
    return ids, scores
