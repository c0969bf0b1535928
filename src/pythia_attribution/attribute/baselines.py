"""Baselines next to the gradient methods: BM25, activation similarity, random scores."""

from __future__ import annotations

import numpy as np
import torch


def bm25_query_scores(train_texts: list[str], query_texts: list[str]):
    """BM25 (bm25s, its default Lucene variant) of each query against every training text, one
    query at a time (a vector over the candidates), after indexing the texts once."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(train_texts, stopwords=None, show_progress=False), show_progress=False)
    vocab = retriever.vocab_dict
    for query in query_texts:
        tokens = bm25s.tokenize([query], stopwords=None, return_ids=False, show_progress=False)[0]
        known = [t for t in tokens if t in vocab]
        yield (
            retriever.get_scores(known).astype(np.float32)
            if known
            else np.zeros(len(train_texts), np.float32)
        )


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


def random_query_scores(n_queries: int, n_train: int, seed: int):
    """Uniform random scores, one query's vector at a time (one generator: query i gets the i-th
    draw of ``n_train``, so the scores do not depend on how the caller consumes them)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    for _ in range(n_queries):
        yield rng.random(n_train, dtype=np.float32)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row, ties broken by the lower index (stable across runs)."""
    k = min(k, scores.shape[1])
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


class FaissTopK:
    """Exact top-k inner products through faiss's brute-force kernel (``faiss.knn``; ``knn_gpu`` on
    a GPU build with a GPU present), fed chunk by chunk of keys, so memory holds one chunk.

    Only for methods without a Hessian: faiss cannot apply bergson's preconditioner correctly.
    Ties are broken by the lower row, as the exact ranking breaks them.
    """

    def __init__(self, queries: np.ndarray, k: int):
        import faiss

        self.faiss = faiss
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)
        self.scores = np.zeros((len(queries), 0), dtype=np.float32)
        self.gpu = (
            faiss.StandardGpuResources() if hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() else None
        )

    def add(self, start: int, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        k = min(self.k, len(keys))
        metric = self.faiss.METRIC_INNER_PRODUCT
        if self.gpu is not None:
            scores, ids = self.faiss.knn_gpu(self.gpu, self.queries, keys, k, metric=metric)
        else:
            scores, ids = self.faiss.knn(self.queries, keys, k, metric=metric)
        ids = np.concatenate([self.ids, ids.astype(np.int64) + start], axis=1)
        scores = np.concatenate([self.scores, scores], axis=1)
        order = np.lexsort((ids, -scores), axis=1)[:, : self.k]
        self.ids, self.scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids, self.scores
