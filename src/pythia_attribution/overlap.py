"""Token overlap of the candidates, counted without holding what is counted: how often a window
occurs in the packed stream (``window_counts``), MinHash signatures of token n-grams
(``MinHasher``) and near-duplicate counts through datasketch's LSH (``near_duplicate_counts``).

Pure numpy and datasketch, shared by the duplicates, memorization and analyses stages and light
to import (``experiments/benchmarks/duplication_scale.py`` runs each way in a fresh process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from datasketch import MinHash, MinHashLSH

if TYPE_CHECKING:
    from pythia_attribution.config import DuplicatesConfig


class MinHasher:
    """MinHash signatures of token n-gram sets, cached by key."""

    def __init__(self, cfg: DuplicatesConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.cache: dict = {}
        # Every signature's permutations are the seed's: drawn once and shared (datasketch draws
        # them anew per MinHash otherwise, two thirds of a signature's time and its largest array)
        self._template = MinHash(num_perm=cfg.num_perm, seed=seed)

    def signature(self, key, tokens: list[int]):
        if key not in self.cache:
            n = self.cfg.ngram
            grams = {" ".join(map(str, tokens[i : i + n])).encode() for i in range(len(tokens) - n + 1)}
            mh = MinHash(
                num_perm=self.cfg.num_perm,
                seed=self.seed,
                permutations=self._template.permutations,
                scheme=self._template.scheme,
            )
            if grams:
                mh.update_batch(sorted(grams))
            self.cache[key] = (mh, bool(grams))
        return self.cache[key]

    def jaccard(self, a, b) -> float:
        (ma, ok_a), (mb, ok_b) = a, b
        return float(ma.jaccard(mb)) if ok_a and ok_b else 0.0


def window_counts(tokens: np.ndarray, queries: np.ndarray, chunk_tokens: int = 1 << 20) -> np.ndarray:
    """How often each row of ``queries`` ([q, width] token ids) occurs among every ``width``-token
    window of the packed stream (the rows of ``tokens`` joined: packed sequence p is
    ``stream[p * (seq_len + 1) : (p + 1) * (seq_len + 1)]``), windows across two rows included.

    It streams: about ``chunk_tokens`` tokens of whole rows at a time (plus the ``width - 1``
    tokens before them), every window is hashed (a polynomial hash mod 2^64) and only windows whose
    hash is a query's are compared with it token by token, so the counts are exact and memory holds
    the queries and one chunk, whatever the stream's length. (A ``Counter`` of every window's bytes,
    as this counted before, takes about 200 bytes per window of the stream, 400 KiB per 2,049-token
    sequence: 9 GB for the 22,500 candidates of ``pythia-70m-deduped``'s profile, 390 GiB for
    10^6; ``experiments/benchmarks/duplication_scale.py``.)
    """
    width = queries.shape[1]
    unique, inverse = np.unique(queries, axis=0, return_inverse=True)  # in the queries' own dtype
    hashes = _horner(unique)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    found = np.zeros(len(unique), dtype=np.int64)
    rows = max(1, chunk_tokens // max(tokens.shape[1], 1))
    carry = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), rows):
        flat = np.concatenate([carry, np.asarray(tokens[start : start + rows], dtype=np.int64).reshape(-1)])
        carry = flat[len(flat) - (width - 1) :] if width > 1 else flat[:0]
        if len(flat) < width:
            continue
        window_hashes = _window_hashes(flat, width)
        at = np.minimum(np.searchsorted(sorted_hashes, window_hashes), len(sorted_hashes) - 1)
        hit = np.flatnonzero(sorted_hashes[at] == window_hashes)
        for part in range(0, len(hit), 1 << 16):  # compare at most 65,536 windows at once
            _confirm(flat, hit[part : part + (1 << 16)], at, unique, order, sorted_hashes, found)
    return found[inverse.reshape(-1)]


def _confirm(flat, hit, at, unique, order, sorted_hashes, found) -> None:
    """Count the windows starting at ``hit`` that equal, token for token, the query whose hash they
    have (the next query in hash order, too, where two queries' hashes collide)."""
    width = unique.shape[1]
    candidate = at[hit]
    while len(hit):
        u = order[candidate]
        match = (flat[hit[:, None] + np.arange(width)] == unique[u]).all(axis=1)
        np.add.at(found, u[match], 1)
        following = candidate + 1
        again = ~match & (following < len(sorted_hashes))
        again[again] = sorted_hashes[following[again]] == sorted_hashes[candidate[again]]
        hit, candidate = hit[again], following[again]


_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so a unit mod 2^64


def _horner(rows: np.ndarray) -> np.ndarray:
    """The polynomial hash mod 2^64 of each row: the sum of row[k] * BASE^(width - 1 - k)."""
    out = np.zeros(len(rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(rows.shape[1]):
            out = out * _BASE + rows[:, k].astype(np.uint64)
    return out


def _window_hashes(flat: np.ndarray, width: int) -> np.ndarray:
    """``_horner`` of every ``width``-token window of ``flat`` in O(len x log width): the hashes of
    windows of 1, 2, 4, ... tokens by doubling, joined along the binary digits of ``width``."""
    n = len(flat) - width + 1
    block, size = flat.astype(np.uint64), 1  # block[i]: the hash of flat[i : i + size]
    out, done = np.zeros(n, dtype=np.uint64), 0  # out[i]: the hash of flat[i : i + done]
    rest = width
    with np.errstate(over="ignore"):
        while rest:
            if rest & 1:
                out = out * _power(size) + block[done : done + n]
                done += size
            rest >>= 1
            if rest:
                block = block[: len(block) - size] * _power(size) + block[size:]
                size *= 2
    return out


def _power(exponent: int) -> np.uint64:
    return np.uint64(pow(int(_BASE), exponent, 1 << 64))


def near_duplicate_counts(windows: np.ndarray, cfg, seed: int) -> np.ndarray:
    """For every window, how many other windows have MinHash Jaccard (token ``cfg.ngram``-grams) of
    at least ``cfg.near_jaccard`` with it, among those datasketch's LSH returns for it.

    Identical windows have identical signatures, so LSH returns all copies of a window or none:
    each distinct window is signed, indexed and queried once, and a neighbour counts as many times
    as it occurs (a window's own copies count, minus itself). The same counts as querying every
    window, without the quadratic cost of a window repeated thousands of times, which at real
    scale the memorized sequences are (boilerplate, licences).
    """
    unique, inverse, copies = np.unique(windows, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    hasher = MinHasher(cfg, seed)
    lsh = MinHashLSH(threshold=cfg.near_jaccard, num_perm=cfg.num_perm)
    sigs = [hasher.signature(u, w.tolist())[0] for u, w in enumerate(unique)]
    for u, sig in enumerate(sigs):
        lsh.insert(u, sig)
    near = copies - 1
    for u, sig in enumerate(sigs):
        near[u] += sum(
            int(copies[v]) for v in lsh.query(sig) if v != u and sigs[v].jaccard(sig) >= cfg.near_jaccard
        )
    return near[inverse].astype(np.int32)
