"""Gradient-index throughput next to plain forward + backward, and query time, in one run.

    python experiments/benchmarks/attribution.py --profile micro --sequences 1024

Uses the profile's final checkpoint and its first ``--sequences`` packed training sequences
(run the pipeline through ``probe`` first). Prints training tokens/s of (a) plain forward +
backward over the same batches bergson uses and (b) bergson's gradient collection with the
TrackStar normalizer and projection, and their ratio; the raw index alone, and both from one
paired pass (``gradients.build_index_pair``) against the two built apart; then the time to build the query
gradients for every exhibited behavior and score them against the index. Then EK-FAC's steps
(``ekfac.scores``: K-FAC factors with eigenvalue correction, full query gradients, the
damped inverse, and the scoring pass) on the same sequences and queries, each in units of one
plain forward + backward pass over the sequences.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from pythia_attribution import paths, tables
from pythia_attribution.attribute import ekfac, gradients
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.config import load_profile
from pythia_attribution.model import load_checkpoint, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument(
        "--ekfac", action=argparse.BooleanOptionalAction, default=True, help="time EK-FAC too"
    )
    args = parser.parse_args()
    profile = load_profile(args.profile)
    set_threads(profile.runtime.threads)
    root = paths.results_root() / profile.name

    def table(stage, name):
        return tables.read_table(paths.table_path(root / stage, name), made_by=stage)

    cands = load_candidates(table(paths.CORPUS, paths.CORPUS_TABLE))
    ckpts = table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    ckpt = root / paths.TRAIN / ckpts[-1]["path"]
    rows = cands.tokens[: args.sequences]
    n_tokens = rows.shape[0] * (rows.shape[1] - 1)
    per_batch = max(1, profile.attribute.token_batch_size // rows.shape[1])

    model, _ = load_checkpoint(ckpt)
    start = time.perf_counter()
    for i in range(0, len(rows), per_batch):
        batch = torch.from_numpy(rows[i : i + per_batch].astype(np.int64))
        logits = model(input_ids=batch[:, :-1]).logits
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).backward()
        model.zero_grad(set_to_none=True)
    plain = n_tokens / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "optimizer_state": ckpt,
            "projection_dim": profile.attribute.projection_dim,
            "token_batch_size": profile.attribute.token_batch_size,
        }
        start = time.perf_counter()
        index = gradients.build_index(Path(tmp) / "train", ckpt, rows, labels=None, **common)
        adam_s = time.perf_counter() - start
        collect = n_tokens / adam_s
        start = time.perf_counter()
        gradients.build_index(
            Path(tmp) / "raw", ckpt, rows, labels=None, **{**common, "optimizer_state": None}
        )
        raw_s = time.perf_counter() - start
        start = time.perf_counter()
        gradients.build_index_pair(
            Path(tmp) / "pair-adam", Path(tmp) / "pair-raw", ckpt, rows, optimizer_state=ckpt,
            projection_dim=common["projection_dim"], token_batch_size=common["token_batch_size"],
        )  # fmt: skip
        pair_s = time.perf_counter() - start

        probes = table(paths.PROBE, paths.PROBES_TABLE)
        final = probes.filter(pc.and_(pc.equal(probes["checkpoint"], ckpts[-1]["step"]), probes["exhibited"]))
        queries = final.to_pylist()
        start = time.perf_counter()
        q_rows = [q["prompt_ids"] + q["target_ids"] for q in queries]
        labels = [[-100] * len(q["prompt_ids"]) + q["target_ids"] for q in queries]
        query = gradients.build_index(Path(tmp) / "queries", ckpt, q_rows, labels=labels, **common)
        hessian = gradients.autocorrelation_hessian(index, Path(tmp) / "hessian")
        scorer = gradients.GradientScorer(index, query, unit_norm=True, hessian_path=hessian)
        for _ in scorer.chunks():
            pass
        query_s = time.perf_counter() - start

        steps: dict[str, float] = {}
        if args.ekfac:
            ekfac.scores(
                Path(tmp) / "ekfac", ckpt, rows, [q["prompt_ids"] for q in queries],
                [q["target_ids"] for q in queries], token_batch_size=profile.attribute.token_batch_size,
                damping=0.1, seed=profile.runtime.seed, timings=steps,
            )  # fmt: skip

    shape = f"{len(rows)} sequences x {rows.shape[1] - 1} tokens"
    print(f"profile {profile.name}, {shape}, threads {profile.runtime.threads}")
    print(f"plain forward+backward: {plain:9.0f} tokens/s")
    print(f"bergson collection:     {collect:9.0f} tokens/s (Adam normalizer, random projection)")
    print(f"ratio collection/plain: {collect / plain:.2f}")
    print(
        f"Adam-normalized + raw index: built apart {adam_s:.1f} + {raw_s:.1f} = {adam_s + raw_s:.1f} s, "
        f"in one paired pass {pair_s:.1f} s (ratio {pair_s / (adam_s + raw_s):.2f})"
    )
    print(f"queries: {len(queries)} exhibited behaviors, gradients + Hessian + scoring in {query_s:.1f} s")
    if not steps:
        return
    pass_s = n_tokens / plain
    print(f"EK-FAC, in plain forward+backward passes over the sequences ({pass_s:.1f} s each):")
    for name, seconds in steps.items():
        print(f"  {name:<13} {seconds:7.1f} s  {seconds / pass_s:5.2f} passes")
    total = sum(steps.values())
    print(f"  {'total':<13} {total:7.1f} s  {total / pass_s:5.2f} passes")


if __name__ == "__main__":
    main()
