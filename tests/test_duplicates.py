"""Duplicate categories on hand-made pairs, and the duplicates stage on nano."""

import pyarrow.compute as pc

from pythia_attribution import paths, tables
from pythia_attribution.config import DuplicatesConfig
from pythia_attribution.duplicates import (
    CATEGORIES,
    MinHasher,
    categorize,
    longest_run,
    pair_features,
    tfidf_matrix,
)

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
    cos = tfidf_matrix(texts, ["paris is the capital of france, the seine its river"])
    assert cos[0, 0] > CFG.thematic_tfidf
    f = _features([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], tfidf=cos[0, 0])
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
