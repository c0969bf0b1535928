"""Streaming top-k: scores arrive in blocks, only what the tables need is kept.

A :class:`Ranking` is fed blocks of scores (some queries x a contiguous range of candidate rows)
and keeps, per query, the running top k (ties broken by the lower row, as an exact sort would),
what the tracing metrics need (the rank of the best ground-truth row), and the score-distribution
summary (exact max, min, mean and positive count; quantiles, top-share and tail exponent from a
seeded sample of rows, or from every row when there are no more than ``sample_size``). Memory is
queries x (k + sample_size), independent of the number of candidates.

The first-hit rank is exact, under each truth definition given (named sets of ground-truth rows
per query, e.g. ``complete`` and ``partial``). When the best ground-truth row is in the top k, it
is its position there. Otherwise it is one plus the number of non-truth rows that rank ahead of
it, counted while streaming against the best truth score, which :meth:`Ranking.prime` computes
beforehand from the truth rows alone; a block that spans every row of its queries needs no
threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pythia_attribution.attribute import metrics

TRACING_TOP = 10  # recall@10 and precision@10 need the top 10 even when k is smaller


class _Truth:
    """What the tracing metrics need under one truth definition."""

    def __init__(self, sets: list[np.ndarray | None], n_queries: int):
        if len(sets) != n_queries:
            raise ValueError(f"{len(sets)} truth sets for {n_queries} queries")
        self.sets = sets
        self.best_score = np.full(n_queries, np.nan, dtype=np.float32)
        self.best_row = np.full(n_queries, -1, dtype=np.int64)
        self.ahead = np.zeros(n_queries, dtype=np.int64)  # non-truth rows ranking before the best truth row
        self.exact_first = np.full(n_queries, -1, dtype=np.int64)


class Ranking:
    def __init__(
        self,
        n_queries: int,
        n_rows: int,
        k: int,
        truth: Mapping[str, list[np.ndarray | None]] | None = None,
        *,
        sample_size: int = 100_000,
        seed: int = 0,
    ):
        self.n_queries, self.n_rows = n_queries, n_rows
        self.k = min(k, n_rows)
        self.keep = min(max(k, TRACING_TOP), n_rows)
        self.truths = {name: _Truth(sets, n_queries) for name, sets in (truth or {}).items()}
        self.top_ids = np.zeros((n_queries, self.keep), dtype=np.int64)
        self.top_scores = np.zeros((n_queries, self.keep), dtype=np.float32)
        self.filled = np.zeros(n_queries, dtype=np.int64)
        if n_rows <= sample_size:
            self.sample = np.arange(n_rows)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, 23, n_rows]))
            self.sample = np.sort(rng.choice(n_rows, size=sample_size, replace=False))
        self.sampled = np.zeros((n_queries, len(self.sample)), dtype=np.float32)
        self.minimum = np.full(n_queries, np.inf)
        self.total = np.zeros(n_queries)
        self.positive = np.zeros(n_queries, dtype=np.int64)
        self.seen = np.zeros(n_queries, dtype=np.int64)

    @property
    def complete(self) -> bool:
        return bool((self.seen == self.n_rows).all())

    def prime(self, totals: Callable[[np.ndarray], np.ndarray]) -> None:
        """Score every query's truth rows (``totals(ids)``: queries x len(ids)) before streaming."""
        sets = [t for truth in self.truths.values() for t in truth.sets if t is not None]
        if not sets:
            return
        union = np.unique(np.concatenate(sets))
        scores = totals(union)
        for truth in self.truths.values():
            for q, rows in enumerate(truth.sets):
                if rows is not None:
                    s = scores[q, np.searchsorted(union, rows)]
                    best = np.lexsort((rows, -s))[0]
                    truth.best_score[q], truth.best_row[q] = s[best], rows[best]

    def consume(self, blocks, totals: Callable[[np.ndarray], np.ndarray] | None = None) -> Ranking:
        """Prime with ``totals`` (when given), feed every block of ``blocks`` (``(first row,
        scores)`` or ``(first row, scores, queries)``, as :meth:`add` takes them) and check that
        every query saw every row; returns the ranking."""
        if totals is not None:
            self.prime(totals)
        for start, scores, *queries in blocks:
            self.add(start, scores, *queries)
        if not self.complete:
            raise RuntimeError("a ranking did not see every candidate row")
        return self

    def add(self, start: int, scores: np.ndarray, queries: slice | np.ndarray = slice(None)) -> None:
        """A block of scores: ``scores[i, j]`` for query ``queries[i]`` and row ``start + j``."""
        qs = np.arange(self.n_queries)[queries]
        scores = np.asarray(scores, dtype=np.float32)
        width = scores.shape[1]
        rows = np.arange(start, start + width)
        # running top-k: only entries at or above the block's k-th best can enter (ties included)
        if width > self.keep:
            kth = -np.partition(-scores, self.keep - 1, axis=1)[:, self.keep - 1]
        for i, q in enumerate(qs):
            cols = np.flatnonzero(scores[i] >= kth[i]) if width > self.keep else np.arange(width)
            n = self.filled[q]
            ids = np.concatenate([self.top_ids[q, :n], rows[cols]])
            vals = np.concatenate([self.top_scores[q, :n], scores[i, cols]])
            order = np.lexsort((ids, -vals))[: self.keep]
            self.filled[q] = len(order)
            self.top_ids[q, : len(order)], self.top_scores[q, : len(order)] = ids[order], vals[order]
        # summary statistics: exact running ones, and the sampled rows' scores
        self.minimum[qs] = np.minimum(self.minimum[qs], scores.min(axis=1))
        self.total[qs] += scores.sum(axis=1, dtype=np.float64)
        self.positive[qs] += (scores > 0).sum(axis=1)
        self.seen[qs] += width
        lo, hi = np.searchsorted(self.sample, [start, start + width])
        self.sampled[np.ix_(qs, np.arange(lo, hi))] = scores[:, self.sample[lo:hi] - start]
        # tracing: rows ahead of the best truth row, under each definition
        for name, truth in self.truths.items():
            for i, q in enumerate(qs):
                rows_q = truth.sets[q]
                if rows_q is None:
                    continue
                if width == self.n_rows:  # the whole ranking of this query at once
                    truth.exact_first[q] = metrics.tracing(scores[i], rows_q)["first_hit_rank"]
                    continue
                if np.isnan(truth.best_score[q]):
                    raise ValueError(
                        f"Ranking.prime must come before a partial block of a query with {name} truth"
                    )
                s, t, r = scores[i], truth.best_score[q], truth.best_row[q]
                beats = (s > t) | ((s == t) & (rows < r))
                beats &= ~np.isin(rows, rows_q)
                truth.ahead[q] += int(beats.sum())

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """Top-k row ids and scores per query, best first."""
        return self.top_ids[:, : self.k], self.top_scores[:, : self.k]

    def summary(self, q: int) -> dict:
        """metrics.concentration of query q: from every row, or from the sample with the exact
        max, min, mean, candidate and positive counts."""
        out = metrics.concentration(self.sampled[q])
        if len(self.sample) == self.n_rows:
            return out
        out.update(
            {
                "max": float(self.top_scores[q, 0]),
                "min": float(self.minimum[q]),
                "mean": float(self.total[q] / self.n_rows),
                "n_candidates": self.n_rows,
                "n_positive": int(self.positive[q]),
            }
        )
        return out

    def has_truth(self, q: int, definition: str) -> bool:
        return definition in self.truths and self.truths[definition].sets[q] is not None

    def tracing(self, q: int, definition: str) -> dict:
        """metrics.tracing of query q against its truth rows under ``definition``, without the
        full ranking."""
        truth = self.truths[definition]
        rows = truth.sets[q]
        hits = np.isin(self.top_ids[q], rows)
        if truth.exact_first[q] > 0:
            first = int(truth.exact_first[q])
        elif hits.any():
            first = int(np.argmax(hits)) + 1
        else:
            first = int(truth.ahead[q]) + 1
        top10 = int(hits[:TRACING_TOP].sum())
        return {
            "mrr": 1.0 / first,
            "first_hit_rank": first,
            "recall_at_10": float(top10 / len(rows)),
            "precision_at_10": float(top10 / TRACING_TOP),
            "top1_hit": bool(hits[0]),
            "n_truth": int(len(rows)),
        }


def per_query_blocks(vectors):
    """Blocks of one query's scores over every row each, from per-query vectors (query i = i-th)."""
    for q, scores in enumerate(vectors):
        yield 0, scores[None], [q]
