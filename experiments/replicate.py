"""Do the offline study's findings replicate under another seed? Profiles' tables side by side.

    python experiments/replicate.py                                  # micro against micro-seed1235
    python experiments/replicate.py --profiles micro micro-seed1235 micro-seed1236
    python experiments/replicate.py --profiles micro micro-seed1235 --folders A B

``micro-seed1235`` and ``micro-seed1236`` are micro with another ``runtime.seed`` (a test holds
every other key equal): other draws of the synthetic world, the training order, the model's
initialization and every seeded sample. Run ``nox -s all -- --profile micro-seed1235`` (and the
others') first. The script reads two or more profiles' tables (``--folders``: their results
folders, default ``results/<profile>``) and prints, for each, the figures the README's "What the
study finds" rests on: the behaviors exhibited at the final checkpoint, tracing MRR by truth
definition, the tail-patch effect of each method's top k and the paired TrackStar - BM25
difference, select-and-fine-tune's change of the targets' log-probability, leave-k-out retraining's
where a profile has run it (``nox -s leave_out``), memorization by duplication, where TrackStar's
tokenwise score sits, and the word-order ratios. For every criterion that ranks the methods it
prints each profile's order and the Spearman correlation of every pair of profiles (over the
methods both ran; the ground-truth reference and the random floor included where the table has
them). It computes nothing new: every figure is a table row or the paper's own derivation
(``paper/derive.py``) of one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
from scipy import stats

from pythia_attribution import paths
from pythia_attribution.errors import MissingInputError
from pythia_attribution.paper import derive
from pythia_attribution.paper.data import Study


def _ci(row: dict, column: str, digits: int = 3) -> str:
    return f"{row[column]:.{digits}f} [{row[column + '_lo']:.{digits}f}, {row[column + '_hi']:.{digits}f}]"


def _side_by_side(title: str, names: list[str], rows: dict[tuple, list[str]], key_header: str) -> None:
    print(f"\n{title}")
    width = max([len(key_header)] + [len(" ".join(map(str, k))) for k in rows])
    cells = [max([len(n)] + [len(v[i]) for v in rows.values()]) for i, n in enumerate(names)]
    print(f"  {key_header:<{width}}  " + "  ".join(f"{n:<{w}}" for n, w in zip(names, cells, strict=True)))
    for key, values in rows.items():
        label = " ".join(str(k) for k in key)
        print(f"  {label:<{width}}  " + "  ".join(f"{v:<{w}}" for v, w in zip(values, cells, strict=True)))


def _pairs(names: list[str]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]


def _orders(label: str, names: list[str], orders: list[list[str] | None]) -> list[float | None]:
    """Print each profile's order (best first; None: not run) and, for every pair of profiles, the
    Spearman correlation over the methods both ran (None where fewer than three or one not run)."""
    print(f"  order by {label}:")
    for name, order in zip(names, orders, strict=True):
        print(f"    {name}: {'not run' if order is None else ' > '.join(order)}")
    rhos = []
    for i, j in _pairs(names):
        a, b = orders[i], orders[j]
        common = [m for m in a if m in b] if a is not None and b is not None else []
        if len(common) < 3:
            rhos.append(None)
            continue
        rho = float(stats.spearmanr([a.index(m) for m in common], [b.index(m) for m in common])[0])
        prefix = f"{names[i]} ~ {names[j]}: " if len(names) > 2 else ""
        print(f"    Spearman {prefix}over {len(common)} methods: {rho:.2f}")
        rhos.append(rho)
    return rhos


def _methods(frames: list[pl.DataFrame]) -> list[str]:
    """The methods of either profile's table, in the paper's order."""
    return derive.ordered_methods({m for f in frames for m in f["method"].to_list()})


def _value(frames: list[pl.DataFrame], key: dict, render) -> list[str]:
    out = []
    for frame in frames:
        sub = frame
        for column, value in key.items():
            sub = sub.filter(pl.col(column) == value)
        out.append(render(sub.row(0, named=True)) if sub.height else "-")
    return out


def _paired(a: str, b: str, names: list[str], results: list[dict | None], digits: int, share: str) -> None:
    """One line: each profile's paired difference ``a`` - ``b`` (``derive.paired``'s dict, or None)
    with its interval and the share of behaviors named by ``share`` ('ahead' or 'further')."""
    out = [
        "-"
        if d is None
        else f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}], "
        f"{share} for {d[share]:.0%}"
        for d in results
    ]
    print(f"  paired {a} - {b}: " + "; ".join(f"{n}: {o}" for n, o in zip(names, out, strict=True)))


def behaviors(studies: list[Study], names: list[str]) -> None:
    """Exhibited/n per family and count; a family whose counts differ among the profiles (the
    stereotype's mentions per template are drawn by the seed) is shown as its total."""
    frames = []
    for study in studies:
        final = derive.final_checkpoint(study)
        frame = study.frame(paths.PROBE_SUMMARY_TABLE).filter(pl.col("checkpoint") == final)
        frames.append(frame.with_columns(pl.col("count").cast(pl.Utf8).fill_null("natural")))
    counts = [{f: set(g["count"]) for (f,), g in frame.group_by("family")} for frame in frames]
    rows = {}
    for family in sorted(set().union(*counts)):
        if all(c.get(family) == counts[0].get(family) for c in counts):
            for count in sorted(
                counts[0][family], key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0)
            ):
                rows[(family, count)] = _value(
                    frames, {"family": family, "count": count}, lambda x: f"{x['n_exhibited']}/{x['n']}"
                )
        else:
            totals = [f.filter(pl.col("family") == family).select(pl.sum("n_exhibited", "n")) for f in frames]
            rows[(family, "all")] = [f"{t['n_exhibited'][0]}/{t['n'][0]}" for t in totals]
    _side_by_side("Behaviors exhibited at the final checkpoint (family, count: exhibited/n)", names, rows, "")


Rhos = dict[str, list[float | None]]


def tracing(studies: list[Study], names: list[str]) -> Rhos:
    frames = [
        s.frame(paths.TRACING_METRICS_TABLE).filter(
            (pl.col("family") == "all") & (pl.col("checkpoint") == derive.final_checkpoint(s))
        )
        for s in studies
    ]
    n = [f["n_behaviors"].max() for f in frames]
    rows = {}
    for truth in derive.TRUTH_ORDER:
        for method in _methods(frames):
            rows[(method, truth)] = _value(
                frames, {"truth": truth, "method": method}, lambda x: _ci(x, "mrr")
            )
    sources = ", ".join(map(str, n))
    _side_by_side(f"Tracing MRR, family all (behaviors with sources: {sources})", names, rows, "")
    rhos = {}
    for truth in derive.TRUTH_ORDER:
        orders = [
            f.filter(pl.col("truth") == truth)
            .sort(["mrr", "method"], descending=[True, False])["method"]
            .to_list()
            for f in frames
        ]
        rhos[f"tracing ({truth})"] = _orders(f"MRR ({truth})", names, orders)
    return rhos


def tail_patch(studies: list[Study], names: list[str]) -> Rhos:
    frames = [s.frame(paths.TAIL_PATCH_METRICS_TABLE).filter(pl.col("family") == "all") for s in studies]
    rows = {(m,): _value(frames, {"method": m}, lambda x: _ci(x, "effect")) for m in _methods(frames)}
    _side_by_side("Tail-patch: effect of one step on each method's top k, family all", names, rows, "")
    rhos = {
        "tail-patch": _orders(
            "tail-patch effect", names, [derive.causal_orders(s)["causal"] for s in studies]
        )
    }
    for a, b in (("trackstar", "bm25"), ("ekfac", "bm25"), ("trackstar", "ground_truth")):
        _paired(a, b, names, [derive.causal_paired(s, a, b) for s in studies], 3, "ahead")
    return rhos


def finetune(studies: list[Study], names: list[str]) -> Rhos:
    frames = [s.frame(paths.FINETUNE_METRICS_TABLE) for s in studies]
    keys = (
        pl.concat([f.select("family", "prompt_kind") for f in frames]).unique().sort("family", "prompt_kind")
    )
    rows = {}
    rhos = {}
    for key in keys.iter_rows(named=True):
        for m in _methods(frames):
            rows[(key["family"], key["prompt_kind"], m)] = _value(
                frames, {**key, "method": m}, lambda x: _ci(x, "delta_logp", 2)
            )
    _side_by_side("Select-and-fine-tune: change of the targets' log-probability", names, rows, "")
    for key in keys.iter_rows(named=True):
        orders = [
            f.filter((pl.col("family") == key["family"]) & (pl.col("prompt_kind") == key["prompt_kind"]))
            .sort(["delta_logp", "method"], descending=[True, False])["method"]
            .to_list()
            for f in frames
        ]
        label = f"fine-tune ({key['family']}, {key['prompt_kind']})"
        rhos[label] = _orders(label, names, orders)
    return rhos


def leave_out(studies: list[Study], names: list[str]) -> Rhos:
    """Leave-k-out retraining (``nox -s leave_out``, outside ``all``), where a profile has run it."""
    ran = [s.has(paths.LEAVE_OUT_METRICS_TABLE) for s in studies]
    title = (
        "Leave-k-out: change of the sampled behaviors' target log-probability after retraining without\n"
        "each run's removals (mean [interval], median, exhibited behaviors lost)"
    )
    if not any(ran):
        print(f"\n{title}\n  not run for any of the profiles (`nox -s leave_out -- --profile P`)")
        return {}
    empty = pl.DataFrame(schema={"run": pl.Utf8, "family": pl.Utf8})
    metrics = [
        s.frame(paths.LEAVE_OUT_METRICS_TABLE).filter(pl.col("family") == "all") if r else empty
        for s, r in zip(studies, ran, strict=True)
    ]
    medians = [
        s.frame(paths.LEAVE_OUT_TABLE).group_by("run").agg(pl.col("delta_logp").median().alias("median"))
        if r
        else pl.DataFrame(schema={"run": pl.Utf8, "median": pl.Float64})
        for s, r in zip(studies, ran, strict=True)
    ]
    frames = [
        m.join(d, on="run", how="left") if m.height else m for m, d in zip(metrics, medians, strict=True)
    ]
    runs = sorted({r for f in frames for r in f["run"].to_list()})

    def render(x: dict) -> str:
        return f"{_ci(x, 'delta_logp', 2)}, median {x['median']:.2f}, lost {x['lost']:.0%}"

    rows = {(run,): _value(frames, {"run": run}, render) for run in runs}
    _side_by_side(title, names, rows, "removed")
    for a, b in (("trackstar", "bm25"), ("ekfac", "bm25")):
        pairs = [derive.leave_out_paired(s, a, b) if r else None for s, r in zip(studies, ran, strict=True)]
        _paired(a, b, names, pairs, 2, "further")
    orders = [  # the costliest removal first
        f.sort(["delta_logp", "run"])["run"].to_list() if r else None
        for f, r in zip(frames, ran, strict=True)
    ]
    return {"leave-k-out": _orders("the cost of the removal", names, orders)}


def memorization(studies: list[Study], names: list[str]) -> None:
    frames = [
        s.frame(paths.MEMORIZATION_BY_DUP_TABLE).filter(pl.col("duplication") == "exact_window")
        for s in studies
    ]
    bins = sorted({b for f in frames for b in f["bin"].to_list()}, key=derive.bin_lower)
    rows = {
        (b,): _value(frames, {"bin": b}, lambda x: f"{x['n_memorized']}/{x['n']} ({x['fraction']:.1%})")
        for b in bins
    }
    _side_by_side("Memorized 64-token windows by exact copies in the corpus", names, rows, "copies")


def analyses(studies: list[Study], names: list[str]) -> None:
    shares = [derive.query_run_shares(s) for s in studies]
    rows = {
        (m,): _value(
            shares, {"method": m}, lambda x: f"{x['share']:.0%} of the score on {x['positions']:.0%}"
        )
        for m in _methods(shares)
    }
    _side_by_side(
        "Tokenwise: in sequences repeating part of the query, the repeated positions' share", names, rows, ""
    )
    words = [s.frame(paths.WORD_ORDER_METRICS_TABLE).filter(pl.col("method") == "trackstar") for s in studies]
    rows = {
        (r["kind"], r["variant"]): _value(words, r, lambda x: _ci(x, "relative", 2))
        for r in pl.concat([w.select("kind", "variant") for w in words])
        .unique()
        .sort("kind", "variant")
        .iter_rows(named=True)
    }
    _side_by_side(
        "Word order (TrackStar): the own sources' score relative to the original query's", names, rows, ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", nargs="+", default=["micro", "micro-seed1235"])
    parser.add_argument(
        "--folders", nargs="+", type=Path, help="the profiles' results folders (default results/<profile>)"
    )
    args = parser.parse_args()
    if len(args.profiles) < 2:
        parser.error("--profiles: name at least two profiles to compare")
    if args.folders is not None and len(args.folders) != len(args.profiles):
        parser.error(f"--folders: {len(args.folders)} given for {len(args.profiles)} profiles")
    folders = args.folders or [paths.results_root() / p for p in args.profiles]
    try:
        studies = [Study(f, p) for f, p in zip(folders, args.profiles, strict=True)]
        for study in studies:
            study.check_all()
    except MissingInputError as exc:
        raise SystemExit(f"error: {exc}") from None
    names = list(args.profiles)
    for study, name in zip(studies, names, strict=True):
        seed = study.config(paths.TRACING_METRICS_TABLE, "runtime")["seed"]
        print(f"{name}: seed {seed}, final checkpoint step {derive.final_checkpoint(study)}, {study.results}")
    behaviors(studies, names)
    rhos = tracing(studies, names)
    rhos |= tail_patch(studies, names)
    rhos |= finetune(studies, names)
    rhos |= leave_out(studies, names)
    memorization(studies, names)
    analyses(studies, names)
    pairs = [f"{names[i]} ~ {names[j]}" for i, j in _pairs(names)]
    print(
        "\nSpearman correlation of the profiles' method orders, by criterion"
        + (":" if len(names) == 2 else "")
    )
    if len(names) > 2:
        print(f"  {'':<40} " + "  ".join(pairs))
    for label, values in rhos.items():
        cells = ["n/a" if r is None else f"{r:.2f}" for r in values]
        line = "  ".join(f"{c:<{len(p)}}" for c, p in zip(cells, pairs, strict=True))
        print(f"  {label:<40} {line}".rstrip())


if __name__ == "__main__":
    main()
