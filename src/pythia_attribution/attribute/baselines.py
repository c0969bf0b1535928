"""Baselines next to the gradient methods: BM25, activation similarity, random scores."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch


class BM25Scores:
    """BM25 of each query text against every candidate text, as bm25s scores it (its default
    Lucene variant, k1 and b), streamed over the candidates in chunks, in memory independent of
    their count.

    bm25s's own index holds a (candidate, term) score for every term of every candidate, about
    35 KiB a 2,048-token candidate (33 GiB at 10^6; ``experiments/benchmarks/text_scale.py``).
    Here one pass over the candidates' words counts what the idf and the length normalization need
    (each word's document frequency, the mean length); scores are then made chunk by chunk for the
    query words alone. The values are bm25s's, bit for bit (a test compares): its tokenizer, its
    idf and term-frequency functions, the float32 (candidate, term) scores it stores, summed in
    float32 in the query's word order (a repeated word counts each time), words the candidates
    never use dropped.
    """

    def __init__(self, candidate_texts, query_texts: list[str], chunk_rows: int = 4096):
        import bm25s
        from bm25s import scoring

        reference = bm25s.BM25()
        self.k1, self.b, self.delta, self.dtype = reference.k1, reference.b, reference.delta, reference.dtype
        self.tfc = scoring._select_tfc_scorer(reference.method)
        idf_of = scoring._select_idf_scorer(reference.idf_method)
        self.texts, self.chunk_rows, self.n_rows = candidate_texts, chunk_rows, len(candidate_texts)
        df: Counter = Counter()
        lengths = []
        for start in range(0, self.n_rows, chunk_rows):
            for words in self._tokenize(candidate_texts[start : start + chunk_rows]):
                lengths.append(len(words))
                df.update(set(words))
        self.mean_length = np.array(lengths).mean()  # as bm25s computes it
        queries = [[w for w in words if w in df] for words in self._tokenize(query_texts)]
        self.column = {w: i for i, w in enumerate(sorted({w for words in queries for w in words}))}
        self.query_columns = [np.array([self.column[w] for w in words], dtype=np.int64) for words in queries]
        self.idf = np.zeros(len(self.column), dtype=self.dtype)
        for word, i in self.column.items():
            self.idf[i] = idf_of(df[word], N=self.n_rows)

    @staticmethod
    def _tokenize(texts) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords=None, return_ids=False, show_progress=False)

    def _word_scores(self, texts) -> np.ndarray:
        """(text, query word) scores, as bm25s stores them: float32, 0 where the text lacks the word."""
        out = np.zeros((len(texts), len(self.column)), dtype=self.dtype)
        for j, words in enumerate(self._tokenize(texts)):
            counts = Counter(w for w in words if w in self.column)
            if not counts:
                continue
            cols = np.array([self.column[w] for w in counts], dtype=np.int64)
            tf = np.array(list(counts.values()), dtype=self.dtype)
            tfc = self.tfc(
                tf_array=tf, l_d=len(words), l_avg=self.mean_length, k1=self.k1, b=self.b, delta=self.delta
            )
            out[j, cols] = self.idf[cols] * tfc
        return out

    def _scores(self, texts) -> np.ndarray:
        words = self._word_scores(texts)
        out = np.zeros((len(self.query_columns), len(texts)), dtype=self.dtype)
        for q, cols in enumerate(self.query_columns):
            for c in cols:  # in the query's word order, in float32, as bm25s adds them
                out[q] += words[:, c]
        return out

    def blocks(self):
        """``(first row, queries x rows scores)`` chunk by chunk, for ``Ranking.consume``."""
        for start in range(0, self.n_rows, self.chunk_rows):
            yield start, self._scores(self.texts[start : start + self.chunk_rows])

    def matrix(self) -> np.ndarray:
        """Every query's scores over every candidate at once (queries x candidates: for small sets)."""
        return np.concatenate([block for _, block in self.blocks()], axis=1)

    def totals(self, ids: np.ndarray) -> np.ndarray:
        """Every query's scores of the candidates ``ids`` (queries x len(ids))."""
        return self._scores([self.texts[int(i)] for i in ids])


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
            ids = torch.tensor([rows[i] for i in idx], device=model.device)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            result[idx] = hidden.mean(dim=1).float().cpu().numpy()
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
