"""Select-and-fine-tune under several batch orders: how much of its ranking is the order's noise?

    python experiments/finetune_seeds.py --profile micro --orders 5

The causal stage fine-tunes an early checkpoint once per selection, with the batches drawn in one
seeded order (the profile's seed), and bootstraps over behaviors; that interval says nothing about
what another order of the same 50 sequences would have given. This script recomputes the stage's
selections exactly as the stage does (same methods, same profile seed for the selections, the
random baseline and the reference sample) and fine-tunes each one under ``--orders`` batch orders:
the profile's seed and the next ones (seed + 1, seed + 2, ...). It prints, per family and prompt
kind, every selection's mean change of the targets' log-probability under each order, its
standard deviation over orders, and the methods' rank under each order; then the mean Spearman
correlation between the orders' rankings and, per method, under how many orders its mean is
above random's.

The profile seed's figures must be the causal stage's own: the script says whether they are
(``select_finetune.arrow``, behavior by behavior). Run ``nox -s causal`` (or ``all``) first.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np

from pythia_attribution import paths, tables
from pythia_attribution.cli import hold_cpu_isa
from pythia_attribution.config import load_profile


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--orders", type=int, default=5, help="batch orders per selection (at least 2)")
    args = parser.parse_args()
    if args.orders < 2:
        raise SystemExit("--orders: at least 2 (the profile's seed and one more)")
    profile = load_profile(args.profile)
    hold_cpu_isa(profile.runtime.cpu_isa)  # the stage's kernels, before torch loads

    import polars as pl
    from scipy import stats

    from pythia_attribution import causal, evaluation, finetune, stage
    from pythia_attribution.model import set_threads
    from pythia_attribution.paper import derive

    set_threads(profile.runtime.threads)
    root = paths.results_root() / profile.name
    stage_rows = tables.read_table(
        paths.table_path(root / paths.CAUSAL, paths.FINETUNE_TABLE), made_by=paths.CAUSAL
    )
    if stage_rows.num_rows == 0:
        raise SystemExit(f"{root / paths.CAUSAL}: the causal stage fine-tuned nothing for this profile")
    seed = profile.runtime.seed
    orders = [seed + i for i in range(args.orders)]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = stage.StageContext(
            profile, stage.SPECS[paths.CAUSAL], Path(tmp), {s: root / s for s in stage.SPECS}, "", {}
        )
        view = evaluation.at_final(ctx, "complete")
        complete, probes, paraphrases = causal.finetune_inputs(
            ctx, view.cands, view.ground_truth, view.final_dir
        )
        rows = finetune.finetune_rows(
            ctx, view.cands, complete, probes, view.checkpoints, paraphrases, orders
        )
    runs = pl.DataFrame(rows)
    keys = ["family", "method", "behavior_id", "prompt_kind"]
    mine = runs.filter(pl.col("order_seed") == seed).select(*keys, "delta_logp")
    theirs = pl.from_arrow(stage_rows).select(*keys, pl.col("delta_logp").alias("stage"))
    both = mine.join(theirs, on=keys, how="inner")
    diff = (both["delta_logp"] - both["stage"]).abs().max() if both.height else None
    same = both.height == mine.height == theirs.height and diff == 0
    print(f"select-and-fine-tune of profile {profile.name}: {args.orders} batch orders "
          f"(seeds {orders[0]}-{orders[-1]}), selections as the causal stage's (seed {seed})")  # fmt: skip
    print(f"order {seed} identical to the causal stage's table, behavior by behavior: "
          f"{'yes' if same else 'no'}" + ("" if same else f" (max |difference| {diff})"))  # fmt: skip

    means = runs.group_by("family", "prompt_kind", "method", "order_seed").agg(pl.col("delta_logp").mean())
    rho_all: list[float] = []
    above: dict[str, int] = {}
    compared = 0
    for (family, kind), sub in sorted(means.group_by("family", "prompt_kind"), key=lambda g: g[0]):
        by_method = {
            r["method"]: [r[str(s)] for s in orders]
            for r in sub.pivot(on="order_seed", index="method", values="delta_logp").iter_rows(named=True)
        }
        methods = derive.ordered_methods(by_method)  # the paper's order
        grid = np.array([by_method[m] for m in methods])  # methods x orders
        ranks = np.argsort(np.argsort(-grid, axis=0), axis=0) + 1
        n = runs.filter((pl.col("family") == family) & (pl.col("prompt_kind") == kind))[
            "behavior_id"
        ].n_unique()
        print(f"\n{family}, {kind} prompts ({n} behaviors): mean change of the target's log-probability")
        print(f"{'method':<18}" + "".join(f"{s:>8}" for s in orders) + f"{'mean':>8}{'sd':>7}  rank by order")
        for i, m in enumerate(methods):
            cells = "".join(f"{v:8.2f}" for v in grid[i])
            spread = f"{grid[i].mean():8.2f}{grid[i].std(ddof=1):7.2f}"
            print(f"{m:<18}{cells}{spread}  " + " ".join(str(r) for r in ranks[i]))
        between = grid.mean(axis=1).std(ddof=1)
        within = float(np.sqrt(np.mean(grid.var(axis=1, ddof=1))))
        rhos = [
            stats.spearmanr(grid[:, a], grid[:, b])[0]
            for a, b in itertools.combinations(range(len(orders)), 2)
        ]
        rho_all += rhos
        print(f"sd between the methods' means {between:.2f}, sd over orders within a method "
              f"{within:.2f}; Spearman between two orders' rankings: mean {np.mean(rhos):.2f}, "
              f"min {np.min(rhos):.2f}")  # fmt: skip
        if "random" in methods:
            floor = grid[methods.index("random")]
            compared += 1
            for i, m in enumerate(methods):
                above[m] = above.get(m, 0) + int(np.sum(grid[i] > floor))
    print(f"\nover every family and prompt kind: Spearman between two orders' rankings, mean "
          f"{np.mean(rho_all):.2f}, min {np.min(rho_all):.2f}")  # fmt: skip
    if compared:
        print(f"orders (of {compared * args.orders}) under which a method's mean is above random's:")
        for m, k in sorted(above.items(), key=lambda kv: -kv[1]):
            if m != "random":
                print(f"  {m:<18}{k:>4}")


if __name__ == "__main__":
    main()
