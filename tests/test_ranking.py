"""The streaming ranking against an exact sort of every score (no model needed)."""

import numpy as np
import pytest

from pythia_attribution.attribute import baselines, metrics
from pythia_attribution.attribute.ranking import Ranking


def _scores(n_queries=6, n_rows=1000, seed=0):
    rng = np.random.default_rng(seed)
    # rounded so that ties are common, with a heavy positive tail like attribution scores
    return np.round(rng.standard_t(3, size=(n_queries, n_rows)), 1).astype(np.float32)


def _truth(scores):
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)
    return [
        order[0, [0, 500]],  # the best row is a truth row
        order[1, [3, 7, 900]],  # first hit at rank 4
        order[2, [150, 151]],  # first hit outside the top k
        None,  # no ground truth
        order[4, [999]],  # the very last row
        np.array([0, 1, 2, 3]),  # whatever ranks these get, ties included
    ]


@pytest.mark.parametrize("chunk", [1000, 333, 64, 1])
def test_streamed_topk_tracing_and_summary_equal_an_exact_sort(chunk):
    scores = _scores()
    truth = _truth(scores)
    ranking = Ranking(len(scores), scores.shape[1], 20, {"t": truth}, sample_size=5000)
    ranking.prime(lambda ids: scores[:, ids])
    for start in range(0, scores.shape[1], chunk):
        ranking.add(start, scores[:, start : start + chunk])
    assert ranking.complete
    ids, top = ranking.top()
    exact_ids, exact_top = baselines.topk(scores, 20)
    assert (ids == exact_ids).all()
    assert (top == exact_top).all()
    for q, t in enumerate(truth):
        assert ranking.summary(q) == metrics.concentration(scores[q])
        if t is not None:
            assert ranking.tracing(q, "t") == metrics.tracing(scores[q], t), q


def test_blocks_per_query_need_no_threshold():
    scores = _scores()
    truth = _truth(scores)
    # two definitions at once: the sets, and the sets' first rows alone
    firsts = [None if t is None else t[:1] for t in truth]
    ranking = Ranking(len(scores), scores.shape[1], 20, {"all": truth, "first": firsts})
    for q in range(len(scores)):
        ranking.add(0, scores[q][None], [q])
    for q, t in enumerate(truth):
        assert ranking.has_truth(q, "all") == (t is not None)
        if t is not None:
            assert ranking.tracing(q, "all") == metrics.tracing(scores[q], t)
            assert ranking.tracing(q, "first") == metrics.tracing(scores[q], t[:1])


def test_partial_blocks_without_a_threshold_are_refused():
    scores = _scores()
    ranking = Ranking(len(scores), scores.shape[1], 20, {"t": _truth(scores)})
    with pytest.raises(ValueError, match="prime"):
        ranking.add(0, scores[:, :10])


def test_a_sampled_summary_keeps_exact_extremes_and_counts():
    scores = _scores(n_queries=2, n_rows=20_000)
    ranking = Ranking(2, 20_000, 10, None, sample_size=2_000, seed=5)
    for start in range(0, 20_000, 4096):
        ranking.add(start, scores[:, start : start + 4096])
    for q in range(2):
        got, exact = ranking.summary(q), metrics.concentration(scores[q])
        for key in ("max", "min", "n_candidates", "n_positive"):
            assert got[key] == exact[key], key
        assert got["mean"] == pytest.approx(exact["mean"], rel=1e-9)
        # distribution shape from 2,000 of 20,000 rows: close, not equal
        assert got["q0500"] == pytest.approx(exact["q0500"], abs=0.1)
        assert got["top10pct_share"] == pytest.approx(exact["top10pct_share"], abs=0.05)
    # the same seed samples the same rows
    again = Ranking(2, 20_000, 10, None, sample_size=2_000, seed=5)
    assert (again.sample == ranking.sample).all()


def test_random_baseline_streams_the_same_draws():
    whole = np.random.default_rng(np.random.SeedSequence([9, 7])).random((3, 1001), dtype=np.float32)
    assert (np.stack(list(baselines.random_query_scores(3, 1001, 9))) == whole).all()


def test_faiss_chunks_merge_to_the_exact_topk():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(700, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    top = baselines.FaissTopK(queries, 15)
    for start in range(0, 700, 128):
        top.add(start, keys[start : start + 128])
    ids, scores = top.result()
    exact_ids, exact_scores = baselines.topk(queries @ keys.T, 15)
    assert (ids == exact_ids).all()
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
