"""Token overlap of the candidates, counted without holding what is counted: how often a window
occurs in the packed stream (``window_counts``), MinHash signatures of token n-grams
(``MinHasher``) and near-duplicate counts in datasketch's LSH bands (``near_duplicate_counts``).

Pure numpy and datasketch, shared by the duplicates, memorization and analyses stages and light
to import (``experiments/benchmarks/duplication_scale.py`` runs each way in a fresh process).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
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

    def minhash(self, tokens: list[int]) -> tuple[MinHash, bool]:
        """The MinHash of ``tokens``' n-grams (not cached), and whether there were any."""
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
        return mh, bool(grams)

    def signature(self, key, tokens: list[int]):
        if key not in self.cache:
            self.cache[key] = self.minhash(tokens)
        return self.cache[key]

    def jaccard(self, a, b) -> float:
        (ma, ok_a), (mb, ok_b) = a, b
        return float(ma.jaccard(mb)) if ok_a and ok_b else 0.0


def window_counts(
    tokens: np.ndarray, queries: np.ndarray, chunk_tokens: int = 1 << 20, distinct: tuple | None = None
) -> np.ndarray:
    """How often each row of ``queries`` ([q, width] token ids) occurs among every ``width``-token
    window of the packed stream (the rows of ``tokens`` joined: packed sequence p is
    ``stream[p * (seq_len + 1) : (p + 1) * (seq_len + 1)]``), windows across two rows included.

    It streams: about ``chunk_tokens`` tokens of whole rows at a time (plus the ``width - 1``
    tokens before them), every window is hashed (a polynomial hash mod 2^64) and only windows whose
    hash is a query's are compared with it token by token, so the counts are exact and memory holds
    the queries and one chunk, whatever the stream's length. (A ``Counter`` of every window's bytes,
    as this counted before, takes about 200 bytes per window of the stream, 400 KiB per 2,049-token
    sequence: 9 GB for the 22,500 candidates of ``pythia-70m-deduped``'s profile, 390 GiB for
    10^6; ``experiments/benchmarks/duplication_scale.py``.) ``distinct``: ``distinct_rows(queries)``,
    when the caller has it already.
    """
    width = queries.shape[1]
    first, inverse, _ = distinct_rows(queries) if distinct is None else distinct
    unique = np.asarray(queries[first])  # in the queries' own dtype
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
    return found[inverse]


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


def near_duplicate_counts(
    windows: np.ndarray,
    cfg,
    seed: int,
    scratch: str | Path | None = None,
    chunk_rows: int = 1 << 13,
    distinct: tuple | None = None,
) -> np.ndarray:
    """For every window, how many other windows have MinHash Jaccard (token ``cfg.ngram``-grams) of
    at least ``cfg.near_jaccard`` with it, among those datasketch's LSH returns for it: the windows
    that share all of one band's hash values with it, in datasketch's bands for the threshold.

    The counts are ``near_duplicate_counts_in_memory``'s (datasketch's ``MinHashLSH``, which holds
    every signature and every band's buckets in memory: 3-5 KiB a window, 3-5 GiB for 10^6
    candidates), with memory that does not hold the signatures: each distinct window is signed
    once into a memory-mapped scratch file (in the folder ``scratch``, the system's temporary one
    by default; 4 bytes a permutation, unlinked as soon as it is open, so a killed run leaves
    nothing behind), then each band is bucketed by sorting a 64-bit hash of its values (one band at
    a time), and each pair in a bucket is counted in the first band whose values it shares (checked
    value by value, so a collision of the hash counts nothing) when its signatures' Jaccard reaches
    the threshold. Identical windows have identical signatures, so a neighbour counts as many times
    as it occurs (a window's own copies count, minus itself), without the quadratic cost of a
    window repeated thousands of times, which at real scale the memorized sequences are
    (boilerplate, licences). What grows with the windows is a few index arrays, tens of bytes a
    window (``experiments/benchmarks/duplication_scale.py``). ``distinct``: ``distinct_rows(windows)``,
    when the caller has it already.
    """
    reps, inverse, copies = distinct_rows(windows) if distinct is None else distinct
    n, perms = len(reps), cfg.num_perm
    near = copies - 1
    if n < 2:
        return near[inverse].astype(np.int32)
    hasher = MinHasher(cfg, seed)
    lsh = MinHashLSH(threshold=cfg.near_jaccard, num_perm=perms)  # for its bands' shape only
    bands, width = lsh.b, lsh.r
    with tempfile.TemporaryFile(dir=scratch) as file:
        dtype = hasher._template.hashvalues.dtype  # datasketch's: 32-bit hash values
        _reserve(file, n * perms * dtype.itemsize, scratch)
        sigs = np.memmap(file, dtype=dtype, mode="w+", shape=(n, perms))
        for start in range(0, n, chunk_rows):
            block = np.asarray(windows[reps[start : start + chunk_rows]])
            sigs[start : start + len(block)] = [hasher.minhash(w.tolist())[0].hashvalues for w in block]
        for band in range(bands):
            keys = np.empty(n, dtype=np.uint64)
            for start in range(0, n, chunk_rows):
                keys[start : start + chunk_rows] = _horner(
                    sigs[start : start + chunk_rows, band * width : (band + 1) * width]
                )
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            del keys
            sizes = np.diff(np.r_[first, n])
            shared = sizes > 1
            for at, size in zip(first[shared].tolist(), sizes[shared].tolist(), strict=True):
                members = np.sort(order[at : at + size])
                _count_bucket(np.asarray(sigs[members]), members, band, width, cfg.near_jaccard, copies, near)
    return near[inverse].astype(np.int32)


def _reserve(file, size: int, folder) -> None:
    """Allocate ``size`` bytes of ``file`` on disk now: a memory map over a sparse file that the
    disk cannot fill kills the process with SIGBUS at the first page it cannot write, where this
    fails with an ``OSError`` naming the folder."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as exc:
        where = str(folder) if folder is not None else tempfile.gettempdir()
        what = f"{exc.strerror} (MinHash signatures, {size / 2**20:.1f} MiB)"
        raise OSError(exc.errno, what, where) from exc


def _count_bucket(sig, members, band, width, threshold, copies, near) -> None:
    """Count each pair of one band's bucket whose band values agree (not only their hash), that
    agree in no earlier band (counted there), and whose Jaccard is at least ``threshold``, the
    share of equal hash values as datasketch's ``MinHash.jaccard`` computes it."""
    perms = np.float64(sig.shape[1])
    for i in range(len(members) - 1):
        equal = sig[i + 1 :] == sig[i]
        agree = equal[:, : (band + 1) * width].reshape(len(equal), band + 1, width).all(axis=2)
        counted = agree[:, band] & ~agree[:, :band].any(axis=1)
        counted &= np.count_nonzero(equal, axis=1) / perms >= threshold
        others = members[i + 1 :][counted]
        near[members[i]] += copies[others].sum()
        near[others] += copies[members[i]]


def near_duplicate_counts_in_memory(windows: np.ndarray, cfg, seed: int) -> np.ndarray:
    """``near_duplicate_counts`` through datasketch's ``MinHashLSH`` itself, every distinct window's
    signature and band keys in memory (3-5 KiB a window): the definition the streamed counts are
    tested against, and what the memorization stage ran before they streamed."""
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


def distinct_rows(rows: np.ndarray, chunk_rows: int = 1 << 13) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of ``rows``: the index of each one's first occurrence, each row's distinct
    id, and each distinct row's number of copies. Found from the rows' 64-bit polynomial hashes and
    confirmed token by token, a chunk of rows at a time (where ``np.unique(axis=0)`` sorts a copy
    of every row); should two distinct rows' hashes collide (odds of about 10^-7 for 10^6 rows),
    through ``np.unique(axis=0)``."""
    if len(rows) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = range(0, len(rows), chunk_rows)
    hashes = np.concatenate([_horner(np.asarray(rows[s : s + chunk_rows], dtype=np.int64)) for s in starts])
    _, first, inverse, copies = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
    del hashes
    for s in starts:
        block, originals = rows[s : s + chunk_rows], rows[first[inverse[s : s + chunk_rows]]]
        if not (np.asarray(block) == np.asarray(originals)).all():
            _, first, inverse, copies = np.unique(
                np.asarray(rows), axis=0, return_index=True, return_inverse=True, return_counts=True
            )
            break
    return first, inverse.reshape(-1), copies
