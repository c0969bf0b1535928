"""Token-overlap counts (``overlap``): exact window counts against counting every window, and
near-duplicate counts against querying every window and against datasketch's LSH in memory."""

from collections import Counter

import numpy as np
import pytest
from datasketch import MinHashLSH

from pythia_attribution.config import DuplicatesConfig
from pythia_attribution.overlap import (
    MinHasher,
    distinct_rows,
    near_duplicate_counts,
    near_duplicate_counts_in_memory,
    window_counts,
)


def test_window_counts_find_repeats():
    tokens = np.array([[5, 6, 7, 8, 5], [6, 7, 9, 9, 9]], dtype=np.uint16)
    queries = np.array([[5, 6, 7], [9, 9, 9], [7, 7, 7], [5, 6, 7]])
    # once in a row and once across rows; once; never; a repeated query gets the same count
    assert window_counts(tokens, queries).tolist() == [2, 1, 0, 2]
    assert window_counts(tokens, queries, chunk_tokens=1).tolist() == [2, 1, 0, 2]


def _counted_by_hand(tokens: np.ndarray, queries: np.ndarray) -> list[int]:
    flat = tokens.reshape(-1).astype(np.int64)
    view = np.lib.stride_tricks.sliding_window_view(flat, queries.shape[1])
    counts = Counter(row.tobytes() for row in view)
    return [counts[q.astype(np.int64).tobytes()] for q in queries]


@pytest.mark.parametrize("width", [1, 5, 8, 13])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1 << 22])
def test_window_counts_equal_a_count_of_every_window(width, chunk_tokens):
    rng = np.random.default_rng(width * 1000 + chunk_tokens % 997)
    tokens = rng.integers(0, 3, size=(40, 17)).astype(np.uint16)  # three token ids: many repeats
    tokens[[5, 20]] = tokens[0]  # and whole rows repeated, for the wider windows
    tokens[30, 9:] = tokens[0, :8]  # a window across rows 30 and 31 that starts like row 0
    tokens[31, :9] = tokens[0, 8:]
    queries = np.concatenate([tokens[:, :width], rng.integers(0, 3, size=(10, width))])
    expected = _counted_by_hand(tokens, queries)
    assert window_counts(tokens, queries, chunk_tokens).tolist() == expected
    assert max(expected) > 1


def test_window_counts_are_exact_when_queries_share_a_hash(monkeypatch):
    import pythia_attribution.overlap as overlap

    monkeypatch.setattr(overlap, "_BASE", np.uint64(1))  # the hash is the tokens' sum
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 4, size=(30, 9)).astype(np.uint16)
    queries = np.concatenate([tokens[:, :4], np.array([[1, 2, 3, 0], [3, 2, 1, 0], [0, 3, 2, 1]])])
    assert len(set(overlap._horner(queries).tolist())) < len({q.tobytes() for q in queries})
    assert window_counts(tokens, queries, 20).tolist() == _counted_by_hand(tokens, queries)


def _near_by_querying_every_window(windows: np.ndarray, cfg, seed: int) -> list[int]:
    """The near-duplicate counts as the stage computed them before grouping identical windows."""
    hasher = MinHasher(cfg, seed)
    lsh = MinHashLSH(threshold=cfg.near_jaccard, num_perm=cfg.num_perm)
    sigs = [hasher.signature(i, w.tolist())[0] for i, w in enumerate(windows)]
    for i, sig in enumerate(sigs):
        lsh.insert(i, sig)
    return [
        sum(1 for j in lsh.query(sig) if j != i and sigs[j].jaccard(sig) >= cfg.near_jaccard)
        for i, sig in enumerate(sigs)
    ]


def test_near_duplicate_counts_group_identical_windows_without_changing_a_count():
    rng = np.random.default_rng(3)
    distinct = rng.integers(2, 200, size=(40, 32))
    copies = distinct[rng.integers(0, 40, size=300)]  # about 7 copies of each
    close = copies[:60].copy()
    close[:, -1] = rng.integers(2, 200, size=60)  # one token changed: Jaccard 27/29 of 5-grams
    windows = np.concatenate([copies, close, rng.integers(2, 200, size=(40, 32))])
    cfg = DuplicatesConfig(ngram=5, num_perm=64)
    got = near_duplicate_counts(windows, cfg, seed=0)
    assert got.tolist() == _near_by_querying_every_window(windows, cfg, seed=0)
    assert got.max() > 6  # the copies and the near copies are counted
    assert (got[-40:] == 0).all()  # the random windows have no near duplicates


def _planted_near_duplicates(seed: int) -> np.ndarray:
    """Windows with copies, near copies (the last 1-5 tokens replaced: Jaccard of 5-grams from
    about 0.3 to 0.9) and unrelated windows, shuffled."""
    rng = np.random.default_rng(seed)
    copies = rng.integers(2, 200, size=(60, 32))[rng.integers(0, 60, size=300)]
    close = copies[:120].copy()
    for row, k in zip(close, rng.integers(1, 6, size=120), strict=True):
        row[-k:] = rng.integers(2, 200, size=k)
    windows = np.concatenate([copies, close, rng.integers(2, 200, size=(40, 32))])
    rng.shuffle(windows)
    return windows


@pytest.mark.parametrize("num_perm, threshold", [(64, 0.8), (128, 0.5), (32, 0.9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_near_duplicate_counts_equal_datasketchs_lsh_in_memory(num_perm, threshold, seed, tmp_path):
    windows = _planted_near_duplicates(seed)
    cfg = DuplicatesConfig(ngram=5, num_perm=num_perm, near_jaccard=threshold)
    got = near_duplicate_counts(windows, cfg, seed, scratch=tmp_path, chunk_rows=7)
    expected = near_duplicate_counts_in_memory(windows, cfg, seed)
    assert got.tolist() == expected.tolist()
    assert (got > 0).sum() > 300 and got.max() > 8  # copies and near copies counted, not only zeros
    assert list(tmp_path.iterdir()) == []  # the signatures' scratch file is gone


def test_near_duplicate_counts_are_exact_when_every_hash_collides(monkeypatch):
    import pythia_attribution.overlap as overlap

    windows = _planted_near_duplicates(2)
    cfg = DuplicatesConfig(ngram=5, num_perm=64, near_jaccard=0.8)
    expected = near_duplicate_counts_in_memory(windows, cfg, 0)
    # every row's hash and every band's key the same: distinct rows and band buckets are then
    # told apart by their values alone
    monkeypatch.setattr(overlap, "_horner", lambda rows: np.zeros(len(rows), dtype=np.uint64))
    assert near_duplicate_counts(windows, cfg, 0).tolist() == expected.tolist()


def test_near_duplicate_counts_of_no_window_or_one():
    cfg = DuplicatesConfig()
    assert near_duplicate_counts(np.zeros((0, 64), dtype=np.uint16), cfg, 0).tolist() == []
    assert near_duplicate_counts(np.ones((3, 64), dtype=np.uint16), cfg, 0).tolist() == [2, 2, 2]


def test_near_duplicate_counts_name_the_scratch_folder_when_the_disk_is_full(monkeypatch, tmp_path):
    import errno
    import os

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    windows = _planted_near_duplicates(0)
    with pytest.raises(OSError) as caught:
        near_duplicate_counts(windows, DuplicatesConfig(), 0, scratch=tmp_path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_both_counts_take_the_distinct_windows_found_once():
    windows = _planted_near_duplicates(1)
    tokens = np.concatenate([windows, windows[:, :8]], axis=1)  # rows longer than the windows
    distinct = distinct_rows(windows)
    cfg = DuplicatesConfig()
    assert (window_counts(tokens, windows, distinct=distinct) == window_counts(tokens, windows)).all()
    assert (
        near_duplicate_counts(windows, cfg, 0, distinct=distinct) == near_duplicate_counts(windows, cfg, 0)
    ).all()
