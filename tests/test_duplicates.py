"""Duplicate categories on hand-made pairs, and the duplicates stage on nano."""

import numpy as np
import pyarrow.compute as pc
import pytest

from pythia_attribution import paths, tables
from pythia_attribution.config import DuplicatesConfig
from pythia_attribution.duplicates import CATEGORIES, TfidfCosines, categorize, longest_run, pair_features
from pythia_attribution.overlap import MinHasher

CFG = DuplicatesConfig()


def _features(query, cand, tfidf=0.0):
    return pair_features(CFG, MinHasher(CFG, seed=0), "q", query, "c", cand, tfidf)


def test_longest_run():
    assert longest_run([1, 2, 3, 4], [9, 2, 3, 4, 8]) == 3
    assert longest_run([1, 2], [3, 4]) == 0


def test_query_contained_verbatim_is_exact():
    query = list(range(100, 110))
    cand = [5, 6, 7] + query + [8, 9]
    f = _features(query, cand)
    assert f["verbatim"] and f["category"] == "exact"


def test_shared_64_token_window_is_exact():
    window = list(range(1000, 1064))
    query = [1, 2, 3] + window + [4]
    cand = [7] * 20 + window + [8] * 20
    f = _features(query, cand)
    assert not f["verbatim"] and f["longest_run"] == 64 and f["category"] == "exact"


def test_a_few_substitutions_make_a_near_duplicate():
    query = list(range(2000, 2120))
    cand = list(query)
    for pos in (40, 80):  # two substitutions: longest run 40 tokens, 5-gram Jaccard 106/126 = 0.84
        cand[pos] = 7
    f = _features(query, cand)
    assert f["longest_run"] == 40 and f["minhash_jaccard"] >= CFG.near_jaccard
    assert f["category"] == "near_duplicate"


def test_same_words_different_order_is_thematic_not_duplicate():
    texts = ["the capital of france is paris and the river is the seine"] * 2 + ["a b c"] * 5
    cos = TfidfCosines(texts, ["paris is the capital of france, the seine its river"], [0]).get(0, 0)
    assert cos > CFG.thematic_tfidf
    f = _features([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], tfidf=cos)
    assert f["category"] == "thematic"


def test_unrelated():
    assert _features([1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15], tfidf=0.01)["category"] == "unrelated"


def test_thresholds_are_ordered_as_documented():
    assert categorize(CFG, run=3, query_len=3, jaccard=0.0, tfidf=0.0) == "exact"
    assert categorize(CFG, run=50, query_len=200, jaccard=0.0, tfidf=0.0) == "near_duplicate"
    assert categorize(CFG, run=0, query_len=200, jaccard=0.85, tfidf=0.0) == "near_duplicate"
    assert categorize(CFG, run=0, query_len=200, jaccard=0.0, tfidf=0.5) == "thematic"


def test_stage_on_nano(nano_run):
    folder = nano_run["results"] / paths.DUPLICATES
    dup = tables.read_table(paths.table_path(folder, paths.DUPLICATES_TABLE))
    att = tables.read_table(paths.table_path(nano_run["results"] / paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE))
    assert len(dup) == len(att)
    assert set(dup["category"].to_pylist()) <= set(CATEGORIES)
    prov = tables.provenance(paths.table_path(folder, paths.DUPLICATES_TABLE))
    assert prov["thresholds"]["near_jaccard"] == CFG.near_jaccard
    comp = tables.read_table(paths.table_path(folder, paths.COMPOSITION_TABLE)).to_pandas()
    sums = comp.groupby(["family", "method", "checkpoint"])["share"].sum()
    assert ((sums - 1).abs() < 1e-9).all()
    canary = dup.filter(pc.starts_with(dup["behavior_id"], "canary/"))
    top1 = canary.filter(pc.equal(canary["rank"], 1))
    assert all(t is not None for t in top1["in_ground_truth"].to_pylist())


def test_tfidf_cosines_of_chosen_rows_are_the_full_products_bit_for_bit():
    """Only the pairs a top-k needs are computed; each value is the one the whole queries x
    candidates product gives (same idf, same summation order), not an approximation."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(0)
    # mixed case, punctuation and one-letter words (which the analyzer drops), Zipf-like reuse,
    # so the order in which the fit meets terms is far from alphabetical
    words = [f"{w}{i}" for i, w in enumerate(["Paris", "seine,", "x", "THE", "of.", "a"] * 60)]
    p = 1 / np.arange(1, len(words) + 1)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 80)), p=p / p.sum())) for _ in range(400)]
    texts[7] = "! ?"  # no term at all
    queries = [" ".join(rng.choice(words, size=12)) for _ in range(7)] + ["unseen words only"]
    vectorizer = TfidfVectorizer(lowercase=True)
    keys = vectorizer.fit_transform(texts)
    full = (vectorizer.transform(queries) @ keys.T).toarray()  # what the stages computed before
    rows = rng.choice(len(texts), size=50, replace=True)  # repeats, unsorted: as top-k ids come
    for chunk_rows in (4096, 64):  # one chunk, and several
        cosines = TfidfCosines(texts, queries, [*rows, 7], chunk_rows=chunk_rows)
        assert cosines.values.shape == (len(queries), len({*rows.tolist(), 7}))
        for q in range(len(queries)):
            for r in [*rows, 7]:
                assert cosines.get(q, int(r)) == full[q, r], (chunk_rows, q, r)
    assert (full[:, 7] == 0).all() and (full[-1] == 0).all()
    with pytest.raises(KeyError):
        cosines.get(0, int(np.setdiff1d(np.arange(len(texts)), [*rows, 7])[0]))  # not asked for
