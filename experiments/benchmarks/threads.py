"""Training throughput of micro-Pythia at several torch thread counts, measured in one run.

    python experiments/benchmarks/threads.py --profile micro --threads 1 2 --steps 20

Uses the profile's model and the first batches of its ``corpus.arrow`` (run the corpus stage
first). Prints tokens/s per thread count and the ratio to the first count.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from pythia_attribution import paths, tables
from pythia_attribution.config import load_profile
from pythia_attribution.model import pythia_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="alternate thread counts this many times")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    corpus = tables.read_table(
        paths.table_path(paths.stage_dir(profile.name, paths.CORPUS), paths.CORPUS_TABLE), made_by="corpus"
    )
    width = corpus.schema.field("input_ids").type.list_size
    batch = profile.corpus.batch_size
    rows = corpus.slice(0, batch * args.steps)["input_ids"].combine_chunks().flatten().to_numpy()
    tokens = torch.from_numpy(np.asarray(rows, dtype=np.int64).reshape(-1, width))
    vocab = int(tokens.max()) + 1
    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = GPTNeoXForCausalLM(pythia_config(profile.train, max(vocab, profile.corpus.vocab_size)))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            start = time.perf_counter()
            for step in range(args.steps):
                b = tokens[step * batch : (step + 1) * batch]
                logits = model(input_ids=b[:, :-1]).logits
                F.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad()
            rates[threads].append(args.steps * batch * (width - 1) / (time.perf_counter() - start))
    base = np.median(rates[args.threads[0]])
    print(f"profile {profile.name}: {args.steps} steps of {batch} x {width - 1} tokens, {args.rounds} rounds")
    for threads in args.threads:
        med = float(np.median(rates[threads]))
        ratio = med / base
        print(f"threads={threads}: {med:8.0f} tokens/s (median), ratio to the first: {ratio:.2f}")


if __name__ == "__main__":
    main()
