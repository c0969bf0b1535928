"""The stages' allocator setting against glibc's default, on the three kinds of work that dominate
a micro run, in one run.

    python experiments/benchmarks/allocator.py --profile micro --rounds 2 --sequences 512

Each setting runs in its own process (glibc's ``mallopt`` applies to the whole process, from the
call on), alternating for ``--rounds`` rounds; the median is reported with its ratio to glibc's
default. ``default``: glibc's settings (every block above 32 MiB mapped afresh and unmapped when
freed); ``reuse``: ``model.keep_freed_memory_for_reuse``, which every stage applies through
``model.set_threads``. The work, on the profile's outputs (run the pipeline through ``train``):

- ``train``: the train stage's step from a fresh model (``train_options.py``'s baseline), tokens/s;
- ``index``: a raw bergson gradient index (as the memorization stage builds at its restricted
  checkpoints) over the first ``--sequences`` packed sequences at the final checkpoint, tokens/s;
- ``test``: the memorization test at the final checkpoint over every packed sequence, tokens/s.

It prints whether each output (the weights after the steps, the index's gradients, the test's
flags and accuracies) is bit-identical between the settings and between rounds, and each
process's peak resident memory (``ru_maxrss``), the setting's cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = ["default", "reuse"]


def one(profile_name: str, setting: str, steps: int, sequences: int) -> dict:
    import resource

    sys.path.insert(0, str(Path(__file__).parent))
    import train_options

    from pythia_attribution import paths, tables
    from pythia_attribution.attribute import gradients
    from pythia_attribution.attribute.candidates import load_candidates
    from pythia_attribution.config import load_profile
    from pythia_attribution.model import load_checkpoint, memorization_test

    # train_options' variant "mmap" leaves glibc's settings; any other applies the stages' one
    trained = train_options.one(profile_name, "mmap" if setting == "default" else "baseline", steps)
    out = {"train": trained["tokens_per_s"], "train_out": trained["weights"]}

    profile = load_profile(profile_name)
    root = paths.results_root() / profile.name
    corpus = tables.read_table(paths.table_path(root / paths.CORPUS, paths.CORPUS_TABLE), made_by="corpus")
    ckpts = tables.read_table(paths.table_path(root / paths.TRAIN, paths.CHECKPOINTS_TABLE), made_by="train")
    ckpt = root / paths.TRAIN / ckpts.to_pylist()[-1]["path"]
    tokens = load_candidates(corpus).tokens
    rows = tokens[:sequences]
    gradients._bergson()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = gradients.build_index(
            Path(tmp) / "raw", ckpt, rows, labels=None, optimizer_state=None,
            projection_dim=profile.attribute.projection_dim,
            token_batch_size=profile.attribute.token_batch_size,
        )  # fmt: skip
        out["index"] = rows.shape[0] * (rows.shape[1] - 1) / (time.perf_counter() - start)
        out["index_out"] = hashlib.sha256(Path(index, "gradients.bin").read_bytes()).hexdigest()

    cfg = profile.memorization
    model, _ = load_checkpoint(ckpt)
    windows = tokens[:, : cfg.context + cfg.continuation].astype(np.int64)
    start = time.perf_counter()
    flags, accuracy = memorization_test(model, windows, cfg.context, cfg.batch_size)
    out["test"] = windows.shape[0] * (windows.shape[1] - 1) / (time.perf_counter() - start)
    out["test_out"] = hashlib.sha256(flags.tobytes() + accuracy.tobytes()).hexdigest()
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps")
    parser.add_argument("--sequences", type=int, default=512, help="packed sequences in the index")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.profile, args.child, args.steps, args.sequences)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--profile", args.profile, "--child", setting]
            command += ["--steps", str(args.steps), "--sequences", str(args.sequences)]
            done = subprocess.run(command, env=os.environ, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"profile {args.profile}, {args.rounds} rounds: train {args.steps} steps, index over "
        f"{args.sequences} packed sequences, the memorization test over all of them"
    )
    print(f"{'work':<6} {'default tok/s':>14} {'reuse tok/s':>12} {'ratio':>6}  outputs")
    for work in ("train", "index", "test"):
        default, reuse = (float(np.median([r[work] for r in runs[s]])) for s in SETTINGS)
        outs = {r[f"{work}_out"] for s in SETTINGS for r in runs[s]}
        same = "bit-identical in every run" if len(outs) == 1 else f"{len(outs)} DIFFERENT outputs"
        print(f"{work:<6} {default:>14.0f} {reuse:>12.0f} {reuse / default:>6.2f}  {same}")
    peaks = {s: max(r["peak_mib"] for r in runs[s]) for s in SETTINGS}
    print(
        f"peak resident memory of a process: default {peaks['default']:,.0f} MiB, "
        f"reuse {peaks['reuse']:,.0f} MiB ({peaks['reuse'] / peaks['default']:.2f}x)"
    )


if __name__ == "__main__":
    main()
