"""Memory and time of the memorization stage's duplication counts as the candidate set grows.

The stage counts, for each candidate's 64-token window (its first 64 tokens, the window the
memorization test reads), how often it occurs in the packed stream (``exact_window_count``: every
64-token window of every candidate, across candidate boundaries too), and how many other windows
are near duplicates of it (``near_duplicate_count``: MinHash Jaccard of token 5-grams at least
``duplicates.near_jaccard`` among the windows that share one of datasketch's LSH bands with it).
At real scale a candidate is 2,049 tokens, so the exact count looks at about 2,049 windows per
candidate where the near-duplicate count looks at one. Five ways, each size and way in its own
process:

- ``stream``: ``overlap.window_counts`` (what the stage runs): the stream hashed a chunk at
  a time, only the windows whose hash is a query's compared token by token;
- ``counter``: a ``Counter`` of every window's bytes, then a lookup per query (what the stage ran
  before ``window_counts`` streamed); its counts must equal ``stream``'s;
- ``near``: ``overlap.near_duplicate_counts`` on the same windows (what the stage runs: each
  distinct window signed once into a memory-mapped scratch file, each band bucketed by sorting,
  copies counted by multiplicity);
- ``near_lsh``: ``overlap.near_duplicate_counts_in_memory``, datasketch's ``MinHashLSH`` over the
  distinct windows, every signature and bucket in memory (what the stage ran before); its counts
  must equal ``near``'s;
- ``near_each``: every window signed, indexed and queried (what the stage ran before that); its
  counts must equal ``near``'s too. Its cost is quadratic in the copies of a window:
  ``--repeated`` makes a share of the candidates copies of one sequence, as boilerplate is among
  memorized sequences.

The candidates: seeded random token ids below 50,277 (Pythia's vocabulary), 2,049 per sequence,
with every tenth sequence a copy of an earlier one, so that counts above one occur, every tenth
from the fifth on a near copy of an earlier one (its window's last 1-8 tokens replaced: 5-gram
Jaccard from 0.85 down to 0.67, either side of the threshold), and the first ``--repeated``
share of them copies of one more. Memory is ``RssAnon`` above the process's memory once the
tokens are in it, its peak (sampled every 20 ms, as in ``scale.py``); ``near``'s scratch file of
signatures (4 bytes a permutation and distinct window) is on disk, in the page cache, not in that
figure. The cost per candidate is the slope between the smallest and the largest size, carried
to 10^6 candidates as if it stayed linear.

Usage:

    python experiments/benchmarks/duplication_scale.py --sizes 1000 4000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import PeakMemory, memory_kib, per_candidate, run_child  # noqa: E402

WIDTH, WINDOW, VOCAB = 2049, 64, 50_277
WAYS = {
    "stream": "overlap.window_counts: hashed a chunk at a time (what the stage runs)",
    "counter": "a Counter of every window's bytes (what the stage ran before)",
    "near": "overlap.near_duplicate_counts: LSH bands sorted, signatures memory-mapped (what the stage runs)",
    "near_lsh": "datasketch's MinHashLSH over the distinct windows in memory (what the stage ran before)",
    "near_each": "datasketch's MinHashLSH over every window, each queried (before that)",
}
PAIRS = (("stream", "counter"), ("near", "near_lsh"), ("near", "near_each"))  # must count alike


def candidates(rows: int, repeated: float):
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, size=(rows, WIDTH), dtype=np.uint16)
    copies = np.arange(10, rows, 10)
    tokens[copies] = tokens[rng.integers(0, copies)]  # each a copy of an earlier sequence
    close = np.arange(5, rows, 10)
    tokens[close] = tokens[rng.integers(0, close)]  # a near copy of an earlier sequence:
    for row, k in zip(close, rng.integers(1, 9, size=len(close)), strict=True):
        tokens[row, WINDOW - k : WINDOW] = rng.integers(2, VOCAB, size=k)  # its window's tail changed
    tokens[1 : int(rows * repeated)] = tokens[0]
    return tokens


def counted_every_window(tokens, queries):
    """The exact counts as the stage computed them before: every window of the stream in memory."""
    import numpy as np

    flat = np.ascontiguousarray(tokens.reshape(-1))
    counts = Counter(row.tobytes() for row in np.lib.stride_tricks.sliding_window_view(flat, WINDOW))
    return np.array([counts[q.astype(np.uint16).tobytes()] for q in queries], dtype=np.int64)


def near_each(windows, cfg, seed: int):
    """The near-duplicate counts as the stage computed them before: every window queried."""
    import numpy as np
    from datasketch import MinHashLSH

    from pythia_attribution.overlap import MinHasher

    hasher = MinHasher(cfg, seed)
    lsh = MinHashLSH(threshold=cfg.near_jaccard, num_perm=cfg.num_perm)
    sigs = [hasher.signature(i, w.tolist())[0] for i, w in enumerate(windows)]
    for i, sig in enumerate(sigs):
        lsh.insert(i, sig)
    out = np.zeros(len(windows), dtype=np.int32)
    for i, sig in enumerate(sigs):
        out[i] = sum(1 for j in lsh.query(sig) if j != i and sigs[j].jaccard(sig) >= cfg.near_jaccard)
    return out


def child(args) -> dict:

    # each way imports only what it runs, before the baseline (the package's own import pulls in
    # torch: light modules keep a child fast, which the suite's toy run of this script needs)
    if args.way == "stream":
        from pythia_attribution.overlap import window_counts

        chunk = {"chunk_tokens": args.chunk} if args.chunk else {}
        count = lambda tokens, queries: window_counts(tokens, queries, **chunk)  # noqa: E731
    elif args.way == "counter":
        count = counted_every_window
    else:
        from pythia_attribution import overlap
        from pythia_attribution.config import DuplicatesConfig

        near = {
            "near": overlap.near_duplicate_counts,
            "near_lsh": overlap.near_duplicate_counts_in_memory,
            "near_each": near_each,
        }[args.way]
        count = lambda tokens, queries: near(queries, DuplicatesConfig(), 0)  # noqa: E731
    tokens = candidates(args.rows, args.repeated)
    queries = tokens[:, :WINDOW]
    base, _ = memory_kib()
    start = time.perf_counter()
    with PeakMemory() as peak:
        counts = count(tokens, queries)
    seconds = time.perf_counter() - start
    return {
        "rows": args.rows,
        "seconds": seconds,
        "mib": (peak.peak_anon - base) / 1024,
        "counts": counts.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 4_000])
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument(
        "--chunk", type=int, help="tokens per chunk of the stream (default: window_counts' own)"
    )
    parser.add_argument(
        "--repeated", type=float, default=0.0, help="share of the candidates that are copies of one"
    )
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--way", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is not None:
        print(json.dumps(child(args)))
        return

    print(
        f"synthetic candidates: sequences of {WIDTH} random token ids below {VOCAB}, every tenth a "
        f"copy of an earlier one, every tenth from the fifth a near copy (its window's last 1-8 "
        f"tokens replaced), the first {args.repeated:.0%} copies of one; {WINDOW}-token "
        "windows; each way and size in its own process"
    )
    for way in args.ways:
        print(f"  {way:<9} {WAYS[way]}")
    pairs = [pair for pair in PAIRS if set(pair) <= set(args.ways)]
    print(
        f"{'rows':>9} {'windows':>12} "
        + " ".join(f"{f'{way} s':>9} {f'{way} MiB':>12}" for way in args.ways)
        + ("  same counts" if pairs else "")
    )
    results = {}
    for rows in args.sizes:
        line = []
        for way in args.ways:
            r = results[rows, way] = run_child("--rows", str(rows), "--way", way)
            line.append(f"{r['seconds']:>9.1f} {r['mib']:>12.0f}")
        same = ""
        if pairs:
            alike = all(results[rows, a]["counts"] == results[rows, b]["counts"] for a, b in pairs)
            same = "  yes" if alike else "  NO"
        print(f"{rows:>9} {rows * WIDTH - WINDOW + 1:>12,} " + " ".join(line) + same)
        if "stream" in args.ways:
            counts = results[rows, "stream"]["counts"]
            print(f"{'':>9} windows seen more than once: {sum(c > 1 for c in counts)} of {len(counts)}")
        if "near" in args.ways:
            counts = results[rows, "near"]["counts"]
            near = sum(c > 0 for c in counts)
            print(f"{'':>9} windows with a near duplicate or a copy: {near} of {len(counts)}")
    if line := per_candidate(results, args.sizes, args.ways, digits=2):
        print(line)


if __name__ == "__main__":
    main()
