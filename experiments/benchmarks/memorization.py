"""Throughput of the memorization test next to a plain forward pass over the same tokens.

    python experiments/benchmarks/memorization.py --profile micro --rounds 3

Runs, on the profile's final checkpoint and every packed sequence's first 64 tokens, (a) plain
forward passes and (b) the memorization test (forward pass + argmax comparison), alternating
``--rounds`` times in one run, and prints the median tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pythia_attribution import paths, tables
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.config import load_profile
from pythia_attribution.memorization import memorization_test
from pythia_attribution.model import load_checkpoint, set_threads


@torch.no_grad()
def plain_forward(model, windows: np.ndarray, batch_size: int) -> None:
    for start in range(0, len(windows), batch_size):
        model(input_ids=torch.from_numpy(windows[start : start + batch_size, :-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    profile = load_profile(args.profile)
    set_threads(profile.runtime.threads)
    root = paths.results_root() / profile.name
    cfg = profile.memorization
    corpus = tables.read_table(paths.table_path(root / paths.CORPUS, paths.CORPUS_TABLE), made_by="corpus")
    ckpts = tables.read_table(paths.table_path(root / paths.TRAIN, paths.CHECKPOINTS_TABLE), made_by="train")
    model, _ = load_checkpoint(root / paths.TRAIN / ckpts.to_pylist()[-1]["path"])
    windows = load_candidates(corpus).tokens[:, : cfg.context + cfg.continuation].astype(np.int64)
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    rates: dict[str, list[float]] = {"forward": [], "memorization test": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        plain_forward(model, windows, cfg.batch_size)
        rates["forward"].append(n_tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        memorization_test(model, windows, cfg.context, cfg.batch_size)
        rates["memorization test"].append(n_tokens / (time.perf_counter() - start))
    fwd, mem = (float(np.median(rates[k])) for k in ("forward", "memorization test"))
    print(
        f"profile {profile.name}: {len(windows)} windows of {windows.shape[1]} tokens, {args.rounds} rounds"
    )
    print(f"plain forward:      {fwd:9.0f} tokens/s (median)")
    print(f"memorization test:  {mem:9.0f} tokens/s (median)")
    print(f"ratio test/forward: {mem / fwd:.2f}")


if __name__ == "__main__":
    main()
