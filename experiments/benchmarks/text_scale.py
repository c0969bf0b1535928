"""Memory and time of the text-side methods at scale: BM25 and the TF-IDF cosine.

The gradient methods stream over a memory-mapped index in flat memory (``scale.py``); the text
side is measured here. The stages read the candidates' texts on demand from the memory-mapped
corpus table (``candidates.Texts``); BM25 (``baselines.BM25Scores``: the attribute stage,
select-and-fine-tune's selection, the memorization stage) and the TF-IDF cosine of the duplicate
categories (``duplicates.TfidfCosines``: the duplicates, analyses and memorization stages) read
them in chunks and keep the words' statistics. This measures how much memory each takes per
candidate, against what the stages did before, so that a real run can be sized.

The texts are synthetic, at a real Pythia sequence's length: ``--words`` words per text (1,500 is
about the 2,048 BPE tokens of a Pythia training sequence), drawn from a Zipf law (exponent 1.1)
over ``--vocab`` word types, seeded. Memory depends on how many distinct words a text holds, and
Pile text is not Zipf-random, so read the figures as an order of magnitude per candidate, not as
a real run's. Each step and size runs in its own process (so no step inherits another's freed
heap); memory is ``RssAnon`` above the process's memory before the step (sampled every 20 ms, as in
``scale.py``), its peak. The steps: the texts themselves; BM25 as the stages run it
(``baselines.BM25Scores``) and as they ran it before (bm25s's own index); the TF-IDF cosines as
the stages run them (``duplicates.TfidfCosines``) and as before (scikit-learn's vectorizer fitted
on every text, and the dense product). The cost per candidate is the slope between the smallest
and the largest size, so fixed costs cancel; it is carried to 10^6 candidates as if it stayed
linear.

Usage:

    python experiments/benchmarks/text_scale.py --sizes 5000 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import PeakMemory, memory_kib, per_candidate, run_child  # noqa: E402


def synthetic_texts(n: int, words: int, vocab: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-1.1
    p /= p.sum()
    names = np.array([f"w{i:x}" for i in range(vocab)])  # distinct, tokenizer-stable words
    return [" ".join(names[rng.choice(vocab, size=words, p=p)]) for _ in range(n)]


STEPS = {
    "texts": "the candidates' texts as Python strings (what candidates.Texts does not hold)",
    "bm25": "baselines.BM25Scores, chunk by chunk (what the stages run)",
    "bm25s": "bm25s's own index over every text, one vector per query (what they ran before)",
    "tfidf": "duplicates.TfidfCosines for the top-k pairs (what the stages run)",
    "tfidf_fit": "TfidfVectorizer fitted on every text, dense queries x candidates (before)",
}


def child(args) -> dict:
    import numpy as np

    # Only what this step runs, imported before the memory baseline is taken: the duplicates
    # stage's module brings bergson and torch with it (about 12 s), which the other steps skip.
    if args.step == "bm25":
        from pythia_attribution.attribute import baselines
    elif args.step == "bm25s":
        import bm25s
    elif args.step == "tfidf":
        from pythia_attribution.duplicates import TfidfCosines
    elif args.step == "tfidf_fit":
        from sklearn.feature_extraction.text import TfidfVectorizer

    queries = synthetic_texts(args.queries, 24, args.vocab, seed=2)  # prompt + target length
    rng = np.random.default_rng(3)
    wanted = np.unique(rng.choice(args.rows, size=min(args.rows, args.queries * args.k), replace=False))
    texts = None if args.step == "texts" else synthetic_texts(args.rows, args.words, args.vocab, seed=1)

    def run():
        nonlocal texts
        if args.step == "texts":
            texts = synthetic_texts(args.rows, args.words, args.vocab, seed=1)
        elif args.step == "bm25":
            for _, block in baselines.BM25Scores(texts, queries).blocks():
                assert block.shape[0] == len(queries)
        elif args.step == "bm25s":
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
            for query in queries:
                words = bm25s.tokenize([query], stopwords=None, return_ids=False, show_progress=False)[0]
                known = [w for w in words if w in retriever.vocab_dict]
                assert not known or len(retriever.get_scores(known)) == args.rows
        elif args.step == "tfidf":
            TfidfCosines(texts, queries, wanted).get(0, int(wanted[0]))
        else:
            vectorizer = TfidfVectorizer(lowercase=True)
            keys = vectorizer.fit_transform(texts)
            assert (vectorizer.transform(queries) @ keys.T).toarray().shape == (len(queries), args.rows)

    base, _ = memory_kib()
    start = time.perf_counter()
    with PeakMemory() as peak:
        run()
    return {
        "rows": args.rows,
        "seconds": time.perf_counter() - start,
        "mib": (peak.peak_anon - base) / 1024,
        "text_mib": sum(len(t) for t in texts) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000])
    parser.add_argument("--words", type=int, default=1_500, help="words per text (~2,048 BPE tokens)")
    parser.add_argument("--vocab", type=int, default=50_000, help="word types of the Zipf law")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=100, help="candidates per query whose cosine is wanted")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is not None:
        print(json.dumps(child(args)))
        return
    print(
        f"synthetic texts: {args.words} words each (Zipf 1.1 over {args.vocab} types), {args.queries} "
        f"queries, TF-IDF cosines for {args.k} candidates per query; each step and size in its own process"
    )
    for step in args.steps:
        print(f"  {step:<9} {STEPS[step]}")
    print(
        f"{'rows':>9} {'text MiB':>9} "
        + " ".join(f"{f'{step} s':>12} {f'{step} MiB':>13}" for step in args.steps)
    )
    results = {}
    for rows in args.sizes:
        line = []
        for step in args.steps:
            r = results[rows, step] = run_child("--rows", str(rows), "--step", step)
            line.append(f"{r['seconds']:>12.1f} {r['mib']:>13.0f}")
        print(f"{rows:>9} {r['text_mib']:>9.0f} " + " ".join(line))
    if line := per_candidate(results, args.sizes, args.steps):
        print(line)


if __name__ == "__main__":
    main()
