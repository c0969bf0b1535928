"""Tail-patch with an estimated optimizer state against the saved one (what real Pythia allows).

    python experiments/benchmarks/tail_patch_state.py --profile micro --behaviors 0

Real Pythia publishes no optimizer state, so the causal stage's tail-patch can only step there
with an estimated one (``causal.optimizer_state = "estimated"``: Adam's second moments estimated
as ``trackstar_est``'s are, a zero first moment, the recipe's final learning rate and weight
decay). On a profile whose final checkpoint has a saved state (micro), this script takes the
causal stage's own tail-patch table (the saved state's), patches the same (behavior, method,
rank, sequence) rows again with the estimated state, and prints how far the two agree:

- per row: Pearson and Spearman correlation of ``effect``, the share of rows whose effect has the
  same sign, and the median ratio estimated / saved;
- per method: the mean over behaviors of each behavior's mean effect over the method's top k,
  under each state, and the methods' ranking under each (what the paper reports);
- the time of the estimated patching.

``--behaviors N`` patches a seeded sample of N of the table's behaviors (0: all of them). The
script applies the profile's ``runtime.cpu_isa`` cap before torch loads, as the CLI does for the
causal stage, so that the estimated rows come from the same kernels as the table's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy import stats

from pythia_attribution import paths, tables
from pythia_attribution.cli import hold_cpu_isa
from pythia_attribution.config import load_profile


def method_means(rows: list[dict], profile) -> dict[str, float]:
    """Per method: the mean over behaviors of each behavior's mean effect, as the causal stage's
    metrics table computes it (``causal.aggregate``, family ``all``)."""
    from pythia_attribution import causal

    table = pa.Table.from_pylist(rows, causal.TAIL_PATCH_SCHEMA)
    metrics = causal.aggregate(table, profile.runtime.seed, profile.attribute.bootstrap).to_pylist()
    return {r["method"]: r["effect"] for r in metrics if r["family"] == "all"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--behaviors", type=int, default=0, help="seeded sample of behaviors (0: all)")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    hold_cpu_isa(profile.runtime.cpu_isa)  # the causal stage's kernels, before torch loads

    from pythia_attribution import causal, evaluation
    from pythia_attribution.attribute import moments
    from pythia_attribution.attribute.candidates import load_candidates
    from pythia_attribution.model import load_checkpoint, set_threads

    set_threads(profile.runtime.threads)
    root = paths.results_root() / profile.name

    def table(stage: str, name: str):
        return tables.read_table(paths.table_path(root / stage, name), made_by=stage)

    saved_rows = table(paths.CAUSAL, paths.TAIL_PATCH_TABLE).to_pylist()
    if not saved_rows:
        raise SystemExit(f"{root / paths.CAUSAL}: the tail-patch table is empty (no saved optimizer state?)")
    ckpts = table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    final = max(ckpts, key=lambda c: c["step"])
    ckpt_dir = root / paths.TRAIN / final["path"]
    saved = moments.saved_state(ckpt_dir)
    if saved is None:
        raise SystemExit(f"{ckpt_dir} has no saved optimizer state to compare with")
    behaviors = evaluation.sample(
        {r["behavior_id"] for r in saved_rows}, args.behaviors, profile.runtime.seed, 41
    )
    saved_rows = [r for r in saved_rows if r["behavior_id"] in set(behaviors)]
    probes = {
        p["behavior_id"]: p
        for p in table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
        if p["checkpoint"] == final["step"] and p["behavior_id"] in set(behaviors)
    }
    cands = load_candidates(table(paths.CORPUS, paths.CORPUS_TABLE))
    model, _ = load_checkpoint(ckpt_dir)
    keys = ("behavior_id", "method", "rank", "packed_id")
    wanted = [{k: r[k] for k in keys} for r in saved_rows]

    with tempfile.TemporaryDirectory() as tmp:
        indexes = root / paths.ATTRIBUTE / "indexes" / f"step{final['step']}"
        state = causal.load_estimated_state(
            model, ckpt_dir, indexes, Path(tmp), cands, final["step"], profile
        )
    start = time.perf_counter()
    patch = causal.TailPatch(model, state, profile.train.grad_clip)
    est_rows = causal.tail_patch_rows(patch, cands, probes, sorted(probes), wanted)
    seconds = time.perf_counter() - start

    by_key = {tuple(r[k] for k in keys): r["effect"] for r in est_rows}
    s = np.array([r["effect"] for r in saved_rows])
    e = np.array([by_key[tuple(r[k] for k in keys)] for r in saved_rows])
    print(
        f"profile {profile.name}, step{final['step']}: {len(saved_rows)} rows, {len(probes)} behaviors, "
        f"{len({r['packed_id'] for r in wanted})} distinct sequences; estimated state: "
        f"{state['param_groups'][0]['estimated_from']}, lr {state['param_groups'][0]['lr']:g}"
    )
    print(f"estimated patching: {seconds:.1f} s")
    pearson = float(stats.pearsonr(s, e).statistic)
    spearman = float(stats.spearmanr(s, e).statistic)
    same_sign = float(np.mean(np.sign(s) == np.sign(e)))
    ratio = float(np.median(e[s != 0] / s[s != 0]))
    print(
        f"per row: pearson {pearson:.3f}, spearman {spearman:.3f}, same sign {same_sign:.1%}, "
        f"median ratio estimated/saved {ratio:.3f}"
    )
    ms, me = method_means(saved_rows, profile), method_means(est_rows, profile)
    order_s = sorted(ms, key=lambda m: -ms[m])
    order_e = sorted(me, key=lambda m: -me[m])
    print("method                saved    estimated   rank saved  rank estimated")
    for m in order_s:
        print(f"{m:18s} {ms[m]:9.4f} {me[m]:11.4f} {order_s.index(m) + 1:11d} {order_e.index(m) + 1:15d}")
    print(f"ranking saved:     {' > '.join(order_s)}")
    print(f"ranking estimated: {' > '.join(order_e)}")


if __name__ == "__main__":
    main()
