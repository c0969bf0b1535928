"""Aggregations shared by the figures, the tables and the variables (polars only)."""

from __future__ import annotations

import re

import polars as pl

from pythia_attribution import paths
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.paper import style
from pythia_attribution.paper.data import Study

# The truth definitions of attribute's tracing tables in the order the paper discusses them: the
# study's first (lenient), the strict one, and the one defined by the target tokens.
TRUTH_ORDER = ("partial", "complete", "target")

CATEGORY_ORDER = list(style.CATEGORIES)


def final_checkpoint(study: Study) -> int:
    return int(study.frame(paths.CHECKPOINTS_TABLE)["step"].max())


def ordered_methods(methods) -> list[str]:
    """Methods in the style's order (an unknown method is an error naming style.py)."""
    for m in methods:
        style.method_label(m)
    return [m for m in style.METHODS if m in set(methods)]


def learning_curves(study: Study) -> pl.DataFrame:
    """Share of behaviors exhibited per (family, injected count, checkpoint); count null = natural."""
    return (
        study.frame(paths.PROBE_SUMMARY_TABLE)
        .with_columns(pl.col("n_exhibited").cast(pl.Int64))
        .sort("family", "count", "checkpoint", nulls_last=True)
    )


# families whose behaviors carry a designed injection count (the ladders of corpus.synthetic)
DOSE_LADDERS = {
    "factual": "capital_counts",
    "fictional_fact": "bio_counts",
    "memorized": "canary_counts",
    "toxic": "insult_counts",
}
POOLED = "pooled"
NATURAL = "natural text"


def dose_curves(study: Study) -> pl.DataFrame:
    """Learning curves with a ``dose`` label: the injected count for families with a designed
    ladder, "natural text" for behaviors taken from the natural sources, and one pooled curve for
    the other families (whose ``count`` is a mention count, not a designed dose)."""
    curves = learning_curves(study)
    synthetic = study.config(paths.CORPUS_TABLE, "corpus")["synthetic"]
    laddered = curves.filter(pl.col("family").is_in(list(DOSE_LADDERS)))
    ladders = pl.DataFrame(
        [(f, c) for f, key in DOSE_LADDERS.items() for c in synthetic.get(key, [])],
        schema={"family": pl.Utf8, "count": pl.Int32},
        orient="row",
    )
    designed = laddered.join(ladders, on=["family", "count"], how="semi").with_columns(
        pl.col("count").cast(pl.Utf8).alias("dose")
    )
    natural = laddered.filter(pl.col("count").is_null()).with_columns(pl.lit(NATURAL).alias("dose"))
    pooled = (
        curves.filter(~pl.col("family").is_in(list(DOSE_LADDERS)))
        .group_by("family", "checkpoint")
        .agg(pl.col("n").sum(), pl.col("n_exhibited").sum())
        .with_columns(
            (pl.col("n_exhibited") / pl.col("n")).alias("fraction_exhibited"), pl.lit(POOLED).alias("dose")
        )
    )
    cols = ["family", "checkpoint", "dose", "n", "n_exhibited", "fraction_exhibited"]
    return pl.concat([designed.select(cols), natural.select(cols), pooled.select(cols)]).sort(
        "family", "dose", "checkpoint"
    )


def dose_order(curves: pl.DataFrame) -> list[str]:
    doses = set(curves["dose"].to_list())
    counts = sorted(int(d) for d in doses if d.isdigit())
    return [str(c) for c in counts] + [d for d in (NATURAL, POOLED) if d in doses]


def dose_colours(curves: pl.DataFrame) -> dict[str, str]:
    """A sequential ramp over injected counts; natural and pooled curves in fixed colours."""
    order = dose_order(curves)
    counts = [d for d in order if d.isdigit()]
    ramp = style.ramp(len(counts))
    colours = dict(zip(counts, ramp, strict=True))
    colours.update({NATURAL: style.NATURAL_COLOUR, POOLED: style.POOLED_COLOUR})
    return {d: colours[d] for d in order}


def first_step_reaching(curves: pl.DataFrame, family: str, count: int, level: float) -> int | None:
    """First checkpoint at which a (family, count) group's exhibited share reaches ``level``."""
    rows = curves.filter(
        (pl.col("family") == family) & (pl.col("count") == count) & (pl.col("fraction_exhibited") >= level)
    )
    return None if rows.is_empty() else int(rows["checkpoint"].min())


def attributed(study: Study) -> pl.DataFrame:
    """Per (behavior, method): the top-k rows with their duplicate category (duplicates.arrow)."""
    return study.frame(paths.DUPLICATES_TABLE)


def pooled_composition(study: Study) -> pl.DataFrame:
    """Share of each category in the top-k of each method, pooled over every behavior."""
    comp = study.frame(paths.COMPOSITION_TABLE)
    return (
        comp.group_by("method", "category")
        .agg(pl.col("n").sum())
        .with_columns((pl.col("n") / pl.col("n").sum().over("method")).alias("share"))
        .sort("method", "category")
    )


def layer_shares(study: Study) -> pl.DataFrame:
    """Share of each layer in the summed per-module score of each method's top-1 sequences.

    For every attributed behavior the per-module scores of the rank-1 sequence are summed per
    layer; shares are taken of the absolute values (modules can disagree in sign) and averaged
    over behaviors.
    """
    ls = study.frame(paths.LAYER_SCORES_TABLE).filter(pl.col("rank") == 1)
    # ordered groups: float sums and means, and the row order, are the same on every run
    per_layer = ls.group_by("behavior_id", "family", "method", "layer", maintain_order=True).agg(
        pl.col("score").abs().sum()
    )
    per_layer = per_layer.with_columns(
        (pl.col("score") / pl.col("score").sum().over("behavior_id", "method")).alias("share")
    )
    return (
        per_layer.group_by("method", "layer", maintain_order=True)
        .agg(pl.col("share").mean().alias("share"), pl.col("behavior_id").n_unique().alias("n_behaviors"))
        .sort("method", "layer")
    )


def module_kind(module: str) -> str:
    if "attention" in module:
        return "attention"
    if "mlp" in module:
        return "MLP"
    return "other"


def per_packed(study: Study, column: str) -> dict:
    """Packed sequence id -> ``column`` of corpus.arrow (every stream copy of a packed sequence
    holds the same text and sources, so the first one stands for all)."""
    corpus = study.frame(paths.CORPUS_TABLE, ("packed_id", column))
    first = corpus.unique(subset="packed_id", keep="first", maintain_order=True)
    return dict(zip(first["packed_id"].to_list(), first[column].to_list(), strict=True))


def final_probes(study: Study) -> pl.DataFrame:
    """Every probe at the final checkpoint (what the attribute stage attributed from)."""
    return study.frame(paths.PROBES_TABLE).filter(pl.col("checkpoint") == final_checkpoint(study))


def canary_learned_from(study: Study) -> int | None:
    """Smallest injected count whose canaries are all memorized at the final checkpoint."""
    canary = study.frame(paths.CANARY_MEMORIZATION_TABLE)
    learned = canary.filter((pl.col("checkpoint") == final_checkpoint(study)) & (pl.col("fraction") >= 1.0))[
        "injected_count"
    ]
    return int(learned.min()) if len(learned) else None


GRADIENT_PREFERENCE = ("trackstar", "grad_cosine", "ekfac")

# The gradient method that single-method figures and sentences show: TrackStar with the training
# run's optimizer state where it ran; where it could not (Pythia's state is not public), its
# variants, then the methods without a Hessian approximation.
PRIMARY_GRADIENT = ("trackstar", "trackstar_est", "trackstar_noadam", "grad_cosine", "ekfac")


def primary_method(methods) -> str | None:
    """The first of ``PRIMARY_GRADIENT`` among ``methods``; None when no gradient method is there."""
    present = set(methods)
    return next((m for m in PRIMARY_GRADIENT if m in present), None)


def surprising_case(study: Study) -> dict | None:
    """The rank-1 sequence of a gradient method with the least lexical overlap with its query.

    Rule, fixed in advance: among behaviors attributed by a gradient method (TrackStar first),
    take the top-ranked retrieved sequences (rank 1, widening to rank 3 and 10 if none qualifies)
    that are outside the behavior's ground truth and classed "unrelated"; pick the lowest TF-IDF
    cosine to the query, ties broken by the higher score and then the behavior id.
    """
    dup = attributed(study)
    methods = [m for m in GRADIENT_PREFERENCE if m in set(dup["method"].unique().to_list())]
    for method in methods:
        for max_rank in (1, 3, 10):
            cand = dup.filter(
                (pl.col("method") == method)
                & (pl.col("rank") <= max_rank)
                & (pl.col("category") == "unrelated")
                & ~pl.col("in_ground_truth")
            )
            if cand.is_empty():
                continue
            best = cand.sort(["tfidf_cosine", "score", "behavior_id"], descending=[False, True, False]).row(
                0, named=True
            )
            best["max_rank"] = max_rank
            return best
    return None


def early_late(study: Study) -> pl.DataFrame:
    """Top-k composition of memorized sequences' attributions, by setting, group and method."""
    return study.frame(paths.MEMORIZED_COMPOSITION_TABLE)


def early_minus_late(study: Study, setting: str = "final", method: str = "trackstar") -> dict | None:
    """Per memorized query (``setting``, ``method``), two measures compared between the early and
    the late group: ``duplicates``, the share of its top k that is an exact or near duplicate, and
    ``copies``, how often its own 64-token window occurs in the corpus. For each: the group means
    and medians, the difference of the means (early minus late) and its percentile bootstrap
    interval, each group resampled on its own (the attribute stage's seed and resamples)."""
    import numpy as np

    ma = study.frame(paths.MEMORIZED_ATTRIBUTION_TABLE)
    rows = ma.filter((pl.col("setting") == setting) & (pl.col("method") == method))
    per_query = rows.group_by("group", "packed_query").agg(
        pl.col("category").is_in(["exact", "near_duplicate"]).mean().alias("duplicates"),
        pl.col("query_exact_count").first().cast(pl.Float64).alias("copies"),
    )
    groups = {g: per_query.filter(pl.col("group") == g).sort("packed_query") for g in ("early", "late")}
    if any(frame.is_empty() for frame in groups.values()):
        return None
    out: dict = {"n_early": groups["early"].height, "n_late": groups["late"].height}
    for measure in ("duplicates", "copies"):
        early, late = (groups[g][measure].to_numpy() for g in ("early", "late"))
        lo, hi = bootstrap_diff_ci(early, late, *_bootstrap_settings(study))
        out[measure] = {
            "early": float(early.mean()),
            "late": float(late.mean()),
            "early_median": float(np.median(early)),
            "late_median": float(np.median(late)),
            "diff": float(early.mean() - late.mean()),
            "lo": lo,
            "hi": hi,
        }
    return out


def self_top1(study: Study) -> pl.DataFrame:
    """Share of memorized queries whose own sequence is each method's top-1 (per setting, group)."""
    ma = study.frame(paths.MEMORIZED_ATTRIBUTION_TABLE)
    top = ma.filter(pl.col("rank") == 1)
    return top.group_by("setting", "group", "method").agg(
        (pl.col("category") == "self").mean().alias("share"), pl.len().alias("n")
    )


def bin_lower(label: str) -> int:
    """Lower bound of a duplication bin label such as '1', '3-4' or '65+'."""
    m = re.match(r"(\d+)", label)
    if not m:
        raise ValueError(f"unexpected duplication bin label {label!r} in memorization_by_dup.arrow")
    return int(m.group(1))


def share_level(column: str) -> str:
    """'1%' for the score-summary column 'top1pct_share'."""
    m = re.fullmatch(r"top(\d+)pct_share", column)
    if not m:
        raise ValueError(f"unexpected concentration column {column!r}")
    return f"{m.group(1)}%"


def interval_level(note: str, what: str) -> str:
    """The interval level (e.g. '95%') stated in a table's provenance note."""
    m = re.search(r"(\d+(?:\.\d+)?)% ", note or "")
    if not m:
        raise ValueError(f"the {what} table's provenance does not state its interval level: {note!r}")
    return f"{m.group(1)}%"


def causal_orders(study: Study) -> dict[str, list[str]]:
    """The methods, best first, by tail-patch effect (``causal``) and by tracing MRR under each
    truth definition (``TRUTH_ORDER``), over the methods present in both tables, or in the
    tail-patch table alone where nothing was traced (no ground truth); the ground-truth reference
    is not ranked."""
    tp = study.frame(paths.TAIL_PATCH_METRICS_TABLE).filter(pl.col("family") == "all")
    tm = study.frame(paths.TRACING_METRICS_TABLE).filter(pl.col("family") == "all")
    methods = set(tp["method"].to_list())
    methods = list(methods & set(tm["method"].to_list()) if tm.height else methods - {REFERENCE})
    frames = {"causal": tp.filter(pl.col("method").is_in(methods)).sort("effect", descending=True)}
    for truth in TRUTH_ORDER:
        sub = tm.filter((pl.col("truth") == truth) & pl.col("method").is_in(methods))
        frames[truth] = sub.sort("mrr", descending=True)
    return {key: frame["method"].to_list() for key, frame in frames.items()}


def bootstrap_diff_ci(a, b, seed: int, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b) for two independent groups, each
    resampled on its own (``bootstrap_ci``'s two-group counterpart; here, not beside it in
    attribute/metrics, because only the paper uses it and that module is part of the attribute
    stage's code fingerprint)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17, len(a), len(b)]))
    diffs = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1) - b[
        rng.integers(0, len(b), size=(n_boot, len(b)))
    ].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))


def _bootstrap_settings(study: Study) -> tuple[int, int]:
    """The attribute stage's seed and number of bootstrap resamples, which the paper's own
    intervals reuse."""
    cfg = study.config(paths.TRACING_METRICS_TABLE, "attribute")
    return study.config(paths.TRACING_METRICS_TABLE, "runtime")["seed"], cfg["bootstrap"]


def paired(study: Study, wide: pl.DataFrame, a: str, b: str) -> dict | None:
    """Paired per-behavior difference of columns ``a`` and ``b`` of ``wide`` (one row per behavior,
    sorted: the bootstrap resamples by position): mean, percentile bootstrap interval (the attribute
    stage's seed and resamples), the share of behaviors where ``a`` is ahead (``ahead``: the
    difference is positive) and where it is behind (``further``: negative), and n."""
    import numpy as np

    from pythia_attribution.attribute.metrics import bootstrap_ci

    if a not in wide.columns or b not in wide.columns:
        return None
    d = (wide[a] - wide[b]).drop_nulls().to_numpy()
    if not len(d):
        return None
    lo, hi = bootstrap_ci(d, *_bootstrap_settings(study))
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "ahead": float(np.mean(d > 0)),
            "further": float(np.mean(d < 0)), "n": len(d)}  # fmt: skip


def causal_paired(study: Study, a: str, b: str) -> dict | None:
    """Per-behavior paired difference of two methods' mean tail-patch effects (``paired``)."""
    tp = study.frame(paths.TAIL_PATCH_TABLE)
    per = tp.group_by("method", "behavior_id").agg(pl.col("effect").mean())
    # sorted: polars' group order varies from run to run, and the bootstrap resamples by position
    return paired(
        study, per.pivot(on="method", index="behavior_id", values="effect").sort("behavior_id"), a, b
    )


def leave_out_paired(study: Study, a: str, b: str) -> dict | None:
    """Per-behavior paired difference of two leave-k-out runs' changes, ``a`` minus ``b``
    (``paired``; ``further``: the share of behaviors whose target falls further under ``a``)."""
    table = study.frame(paths.LEAVE_OUT_TABLE)
    return paired(
        study, table.pivot(on="run", index="behavior_id", values="delta_logp").sort("behavior_id"), a, b
    )


def query_run_shares(study: Study) -> pl.DataFrame:
    """Per gradient method: over the tokenwise sequences that repeat part of the query, the share of
    their positions in runs shared with the query and the share of their summed score there."""
    tok = study.frame(paths.TOKENWISE_TABLE)
    key = ["behavior_id", "method", "rank"]
    repeats = tok.group_by(key).agg(pl.col("in_query_run").any().alias("repeats")).filter(pl.col("repeats"))
    return (
        tok.join(repeats.select(key), on=key)
        .group_by("method")
        .agg(
            (pl.col("in_query_run").sum() / pl.len()).alias("positions"),
            (pl.col("score").filter(pl.col("in_query_run")).sum() / pl.col("score").sum()).alias("share"),
            pl.struct(key).n_unique().alias("n_sequences"),
        )
        .sort("method")
    )


def tokenwise_example(study: Study, method: str | None = None) -> pl.DataFrame:
    """The tokens of the example sequence of the tokenwise figure: the method's (default:
    ``primary_method``'s) top-1 sequence, for the behavior whose top-1 repeats the most tokens of the
    query, then puts the largest share of its score on them (families with natural-language items
    first: a canary's random words make a poor picture)."""
    tok = study.frame(paths.TOKENWISE_TABLE)
    method = method or primary_method(tok["method"].unique())
    tok = tok.filter((pl.col("method") == method) & (pl.col("rank") == 1))
    if tok.is_empty():
        return tok
    shares = (
        tok.group_by("behavior_id", "family")
        .agg(
            pl.col("in_query_run").sum().alias("repeated"),
            (pl.col("score").filter(pl.col("in_query_run")).sum() / pl.col("score").sum()).alias("share"),
        )
        .with_columns((pl.col("family") == "memorized").alias("canary"))
        .sort(["canary", "repeated", "share", "behavior_id"], descending=[False, True, True, False])
    )
    best = shares["behavior_id"][0]
    return tok.filter(pl.col("behavior_id") == best).sort("position")


def tokenwise_window(example: pl.DataFrame, width: int) -> pl.DataFrame:
    """The ``width`` consecutive tokens of ``example`` (one sequence, by position) that hold the
    largest sum of absolute token scores, the earliest on a tie; all of it when it is no longer. A
    2,048-token Pythia sequence does not fit on a page; micro's 128-token ones do, whole."""
    if example.height <= width:
        return example
    sums = example["score"].abs().rolling_sum(width)  # null until a window is full
    end = sums.arg_max()  # the first maximum
    return example.slice(end - width + 1, width)


def topk_shared(study: Study, method: str, reference: str, k: int) -> float | None:
    """Mean share, over the behaviors both methods attributed at the final checkpoint, of the
    reference method's top ``k`` sequences that ``method`` also puts in its top ``k``; None when a
    method is missing."""
    step = final_checkpoint(study)
    top = study.frame(paths.ATTRIBUTIONS_TABLE, ("behavior_id", "method", "checkpoint", "rank", "packed_id"))
    top = top.filter((pl.col("checkpoint") == step) & (pl.col("rank") <= k))
    ref = top.filter(pl.col("method") == reference).select("behavior_id", "packed_id")
    other = top.filter(pl.col("method") == method).select("behavior_id", "packed_id")
    if ref.is_empty() or other.is_empty():
        return None
    both = ref.join(other, on=["behavior_id", "packed_id"]).group_by("behavior_id").len()
    behaviors = ref.select("behavior_id").unique()
    behaviors = behaviors.join(other.select("behavior_id").unique(), on="behavior_id")
    shared = behaviors.join(both, on="behavior_id", how="left").fill_null(0)
    return float((shared["len"] / k).mean())
