"""Duplicates stage: what kind of text does attribution retrieve?

For every (behavior, method, top-k sequence): the longest token run shared with the query
(prompt + target), whether the query occurs verbatim, the MinHash Jaccard of token 5-grams
(datasketch), the TF-IDF cosine of the texts (scikit-learn), and for synthetic behaviors
whether the sequence is one of the item's ground-truth sequences. Each row gets a category:

- ``exact``: the query occurs verbatim, or a ``exact_window``-token window is shared;
- ``near_duplicate``: MinHash Jaccard >= ``near_jaccard`` or a shared run >= ``substring_run``;
- ``thematic``: TF-IDF cosine >= ``thematic_tfidf``;
- ``unrelated``: none of these.

The pair features live in ``pair_features`` so that other stages (memorization) reuse them.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import asdict

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pythia_attribution import paths
from pythia_attribution.attribute.candidates import load_candidates, truth_sets
from pythia_attribution.attribute.stage import ATTRIBUTION_SCHEMA
from pythia_attribution.config import DuplicatesConfig
from pythia_attribution.overlap import MinHasher

log = logging.getLogger(__name__)

CATEGORIES = ("exact", "near_duplicate", "thematic", "unrelated")


def longest_run(query: list[int], cand: list[int]) -> int:
    match = difflib.SequenceMatcher(None, query, cand, autojunk=False).find_longest_match(
        0, len(query), 0, len(cand)
    )
    return match.size


def categorize(cfg: DuplicatesConfig, run: int, query_len: int, jaccard: float, tfidf: float) -> str:
    if run >= query_len or run >= cfg.exact_window:
        return "exact"
    if jaccard >= cfg.near_jaccard or run >= cfg.substring_run:
        return "near_duplicate"
    if tfidf >= cfg.thematic_tfidf:
        return "thematic"
    return "unrelated"


class TfidfCosines:
    """TF-IDF cosine of each query text against the candidate texts at ``rows`` (idf from every
    candidate text), for the pairs a top-k needs, in memory independent of the candidate count.

    scikit-learn's ``TfidfVectorizer`` fitted on every candidate holds their whole document-term
    matrix, and the dense queries x candidates product 8 GB for 1,000 queries at 10^6 candidates.
    Here the candidates are read once, chunk by chunk, for what the idf needs (the vocabulary in
    the order the vectorizer's fit meets it, and each term's document frequency); only the ``rows``
    are then vectorized. The values are the fitted vectorizer's, bit for bit (a test compares):
    the same analyzer, the same idf arithmetic, each row's terms stored in the order the fit stores
    them (so its l2 norm sums in the same order), and scipy's product sums each entry over the
    query's terms in the same order whichever candidates are in the matrix.
    """

    def __init__(self, candidate_texts, query_texts: list[str], rows, chunk_rows: int = 4096):
        from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer, TfidfVectorizer

        rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.column = {int(r): j for j, r in enumerate(rows)}
        analyze = TfidfVectorizer(lowercase=True).build_analyzer()
        first_seen: dict[str, int] = {}  # term -> index, in the order CountVectorizer.fit meets them
        df = np.zeros(0, dtype=np.int64)
        n = len(candidate_texts)
        for start in range(0, n, chunk_rows):
            seen: list[int] = []
            for text in candidate_texts[start : start + chunk_rows]:
                seen.extend({first_seen.setdefault(term, len(first_seen)) for term in analyze(text)})
            df = np.pad(df, (0, len(first_seen) - len(df)))
            df += np.bincount(np.asarray(seen, dtype=np.int64), minlength=len(first_seen))
        if not first_seen:  # no candidate holds a term: every cosine is 0
            self.values = np.zeros((len(query_texts), len(rows)))
            return
        # the fit's last step: terms sorted, each row's indices remapped in place (not re-sorted)
        alphabetical = {term: i for i, term in enumerate(sorted(first_seen))}
        remap = np.empty(len(first_seen), dtype=np.int64)
        for term, old in first_seen.items():
            remap[old] = alphabetical[term]
        sorted_df = np.empty_like(df)
        sorted_df[remap] = df
        # TfidfTransformer.fit's idf (smooth_idf): log((n + 1) / (df + 1)) + 1, in float64
        idf = np.full(len(first_seen), n + 1, dtype=np.float64)
        idf /= sorted_df.astype(np.float64) + 1.0
        np.log(idf, out=idf)
        idf += 1.0
        tfidf = TfidfTransformer()
        tfidf.idf_ = idf
        # step for step as TfidfVectorizer.fit_transform: float64 counts, indices remapped in place
        # (scipy still takes them as sorted, so nothing re-sorts them), transformed without a copy
        counts = CountVectorizer(lowercase=True, vocabulary=first_seen, dtype=np.float64).transform(
            [candidate_texts[int(r)] for r in rows]
        )
        counts.indices = remap.take(counts.indices).astype(counts.indices.dtype)
        keys = tfidf.transform(counts, copy=False)
        queries = TfidfVectorizer(lowercase=True, vocabulary=alphabetical)
        queries.idf_ = idf
        self.values = (queries.transform(query_texts) @ keys.T).toarray()

    def get(self, query: int, row: int) -> float:
        """The cosine of query ``query`` (its position in ``query_texts``) and candidate ``row``."""
        return float(self.values[query, self.column[row]])


def pair_features(cfg, hasher, query_key, query_tokens, cand_key, cand_tokens, tfidf) -> dict:
    run = longest_run(query_tokens, cand_tokens)
    jac = hasher.jaccard(hasher.signature(query_key, query_tokens), hasher.signature(cand_key, cand_tokens))
    return {
        "longest_run": run,
        "verbatim": run >= len(query_tokens),
        "minhash_jaccard": jac,
        "tfidf_cosine": float(tfidf),
        "category": categorize(cfg, run, len(query_tokens), jac, tfidf),
    }


def run(ctx) -> None:
    cfg: DuplicatesConfig = ctx.config
    cands = load_candidates(ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE))
    truth = truth_sets(ctx.input_table(paths.CORPUS, paths.GROUND_TRUTH_TABLE), cands, "partial")
    attributions = ctx.input_table(paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).to_pylist()
    probes = {
        (p["behavior_id"], p["checkpoint"]): p
        for p in ctx.input_table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
        if p["exhibited"]
    }
    keys = sorted({(a["behavior_id"], a["checkpoint"]) for a in attributions})
    query_index = {k: i for i, k in enumerate(keys)}
    query_texts = [probes[k]["prompt"] + probes[k]["target"] for k in keys]
    tfidf = TfidfCosines(cands.texts, query_texts, [a["packed_id"] for a in attributions])
    hasher = MinHasher(cfg, ctx.profile.runtime.seed)
    rows = []
    for a in tqdm(attributions, desc="duplicates", unit="pair", mininterval=5):
        key = (a["behavior_id"], a["checkpoint"])
        probe = probes[key]
        q_tokens = probe["prompt_ids"] + probe["target_ids"]
        pid = a["packed_id"]
        cosine = tfidf.get(query_index[key], pid)
        feats = pair_features(cfg, hasher, ("q", *key), q_tokens, pid, cands.tokens[pid].tolist(), cosine)
        item = probe["item_id"]
        rows.append(
            {
                **a,
                "item_id": item,
                "count": probe["count"],
                **feats,
                "in_ground_truth": bool(np.isin(pid, truth[item])) if item in truth else None,
            }
        )
    table = pa.Table.from_pylist(rows, SCHEMA)
    thresholds = asdict(cfg)
    comp = composition(table)
    ctx.write_table(
        paths.DUPLICATES_TABLE,
        table,
        thresholds=thresholds,
        truth="ground-truth membership under the partial definition (a sequence touching a source document)",
    )
    ctx.write_table(paths.COMPOSITION_TABLE, comp, thresholds=thresholds)
    frame = comp.to_pandas()
    width = {key: max((len(v) for v in frame[key]), default=0) for key in ("family", "method")}
    for (family, method), g in frame.groupby(["family", "method"]):
        shares = ", ".join(f"{r.category} {r.share:.2f}" for r in g.itertuples())
        log.info("%-*s %-*s %s", width["family"], family, width["method"], method, shares)


def composition(table: pa.Table) -> pa.Table:
    """Share of each category in the top-k, per (family, method, checkpoint)."""
    df = table.to_pandas()
    out = []
    for (family, method, step), g in df.groupby(["family", "method", "checkpoint"]):
        gt = g["in_ground_truth"].dropna()
        for category in CATEGORIES:
            n = int((g["category"] == category).sum())
            out.append(
                {
                    "family": family,
                    "method": method,
                    "checkpoint": int(step),
                    "category": category,
                    "n": n,
                    "share": n / len(g),
                    "n_rows": len(g),
                    "n_behaviors": g["behavior_id"].nunique(),
                    "ground_truth_share": float(gt.mean()) if len(gt) else None,
                }
            )
    return pa.Table.from_pylist(out, COMPOSITION_SCHEMA)


COMPOSITION_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("method", pa.string()),
        ("checkpoint", pa.int64()),
        ("category", pa.string()),
        ("n", pa.int64()),
        ("share", pa.float64()),
        ("n_rows", pa.int64()),
        ("n_behaviors", pa.int64()),
        ("ground_truth_share", pa.float64()),  # null where the family has no ground truth
    ]
)

SCHEMA = pa.schema(
    [
        *ATTRIBUTION_SCHEMA,
        ("item_id", pa.string()),
        ("count", pa.int32()),
        ("longest_run", pa.int32()),
        ("verbatim", pa.bool_()),
        ("minhash_jaccard", pa.float64()),
        ("tfidf_cosine", pa.float64()),
        ("category", pa.string()),
        ("in_ground_truth", pa.bool_()),
    ]
)
