"""Memory and time of the text-side methods at scale: BM25 and the TF-IDF cosine.

The gradient methods stream over a memory-mapped index in flat memory (``scale.py``); the text
side does not. The candidates' texts are held as one Python list (``load_candidates``), BM25
(bm25s; the attribute stage, select-and-fine-tune's selection, the memorization stage) indexes all
of them in memory, and the TF-IDF cosine of the duplicate categories (``duplicates.TfidfCosines``;
the duplicates, analyses and memorization stages) fits scikit-learn's vectorizer on all of them.
This measures how much memory each takes per candidate, so that a real run can be sized.

The texts are synthetic, at a real Pythia sequence's length: ``--words`` words per text (1,500 is
about the 2,048 BPE tokens of a Pythia training sequence), drawn from a Zipf law (exponent 1.1)
over ``--vocab`` word types, seeded. Memory depends on how many distinct words a text holds, and
Pile text is not Zipf-random, so read the figures as an order of magnitude per candidate, not as
a real run's. Each size runs in its own process; memory is ``RssAnon`` above the process's
memory before the step (sampled every 20 ms, as in ``scale.py``), each step's peak:

- texts: building the candidates' texts (kept for the next steps, as the stages keep them);
- bm25: ``baselines.bm25_query_scores`` over all candidates for ``--queries`` queries (the index,
  then one score vector per query, as the stages consume them);
- tfidf: ``duplicates.TfidfCosines`` for ``--queries`` queries against ``--k`` candidates each
  (what a top-k needs).

The cost per candidate is the slope between the smallest and the largest size, so fixed costs
cancel; it is carried to 10^5 and 10^6 candidates as if memory stayed linear.

Usage:

    python experiments/benchmarks/text_scale.py --sizes 5000 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import PeakMemory, memory_kib  # noqa: E402


def synthetic_texts(n: int, words: int, vocab: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-1.1
    p /= p.sum()
    names = np.array([f"w{i:x}" for i in range(vocab)])  # distinct, tokenizer-stable words
    return [" ".join(names[rng.choice(vocab, size=words, p=p)]) for _ in range(n)]


def child(args) -> dict:
    import bm25s  # noqa: F401 - imported before measuring, as the stages have them loaded
    import numpy as np
    import sklearn.feature_extraction.text  # noqa: F401

    from pythia_attribution.attribute import baselines
    from pythia_attribution.duplicates import TfidfCosines

    out = {"rows": args.rows}
    steps = {}
    base, _ = memory_kib()
    start = time.perf_counter()
    with PeakMemory() as peak:
        texts = synthetic_texts(args.rows, args.words, args.vocab, seed=1)
    steps["texts"] = (time.perf_counter() - start, peak.peak_anon - base)
    queries = synthetic_texts(args.queries, 24, args.vocab, seed=2)  # prompt + target length
    base, _ = memory_kib()
    start = time.perf_counter()
    with PeakMemory() as peak:
        for scores in baselines.bm25_query_scores(texts, queries):
            assert len(scores) == args.rows
    steps["bm25"] = (time.perf_counter() - start, peak.peak_anon - base)
    rng = np.random.default_rng(3)
    wanted = np.unique(rng.choice(args.rows, size=min(args.rows, args.queries * args.k), replace=False))
    base, _ = memory_kib()
    start = time.perf_counter()
    with PeakMemory() as peak:
        cosines = TfidfCosines(texts, queries, wanted)
        cosines.get(0, int(wanted[0]))
    steps["tfidf"] = (time.perf_counter() - start, peak.peak_anon - base)
    for name, (seconds, kib) in steps.items():
        out[f"{name}_s"], out[f"{name}_mib"] = seconds, kib / 1024
    out["text_mib"] = sum(len(t) for t in texts) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000])
    parser.add_argument("--words", type=int, default=1_500, help="words per text (~2,048 BPE tokens)")
    parser.add_argument("--vocab", type=int, default=50_000, help="word types of the Zipf law")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=100, help="candidates per query whose cosine is wanted")
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.rows is not None:
        print(json.dumps(child(args)))
        return
    print(
        f"synthetic texts: {args.words} words each (Zipf 1.1 over {args.vocab} types), {args.queries} "
        f"queries, TF-IDF cosines for {args.k} candidates per query"
    )
    columns = ("text MiB", "texts MiB", "bm25 s", "bm25 MiB", "tfidf s", "tfidf MiB")
    print(f"{'rows':>9} " + " ".join(f"{c:>9}" for c in columns))
    results = []
    for rows in args.sizes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--rows", str(rows)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{r['rows']:>9} {r['text_mib']:>9.0f} {r['texts_mib']:>9.0f} {r['bm25_s']:>9.1f} "
            f"{r['bm25_mib']:>9.0f} {r['tfidf_s']:>9.1f} {r['tfidf_mib']:>9.0f}"
        )
    if len(results) < 2:
        return
    # per candidate: the slope between the smallest and the largest size (fixed costs cancel)
    a, last = results[0], results[-1]
    per = {
        name: (last[f"{name}_mib"] - a[f"{name}_mib"]) * 2**20 / (last["rows"] - a["rows"])
        for name in ("texts", "bm25", "tfidf")
    }
    print(
        f"per candidate, from {a['rows']} to {last['rows']} rows: "
        + ", ".join(f"{name} {b / 1024:.1f} KiB" for name, b in per.items())
        + "; at 10^5 candidates "
        + ", ".join(f"{name} {b * 1e5 / 2**30:.1f} GiB" for name, b in per.items())
        + "; at 10^6 "
        + ", ".join(f"{name} {b * 1e6 / 2**30:.0f} GiB" for name, b in per.items())
    )


if __name__ == "__main__":
    main()
