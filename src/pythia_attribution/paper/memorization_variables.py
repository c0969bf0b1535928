"""The variables of the memorization sections: memorization against duplication, the canaries,
and what attribution retrieves for sequences memorized early and late. Every value is a formatted
string, as in ``variables``.
"""

from __future__ import annotations

import polars as pl

from pythia_attribution import paths
from pythia_attribution.paper import derive, fmt, style
from pythia_attribution.paper.data import Study


def compute(study: Study, final: int) -> dict:
    """The ``memorization`` section at checkpoint ``final``."""
    mem_cfg = study.config(paths.MEMORIZATION_BY_DUP_TABLE, "memorization")
    dup = study.frame(paths.MEMORIZATION_BY_DUP_TABLE)
    note = study.provenance(paths.MEMORIZATION_BY_DUP_TABLE).get("note", "")
    summary = study.frame(paths.MEMORIZATION_SUMMARY_TABLE)
    per_packed = summary.group_by("packed_id").agg(
        pl.col("memorized_final").any(), pl.col("first_memorized").min()
    )
    exact = dup.filter(pl.col("duplication") == "exact_window").with_columns(
        pl.col("bin").map_elements(derive.bin_lower, return_dtype=pl.Int64).alias("lower")
    )
    missing = {"fraction": None, "ci_lo": None, "ci_hi": None}
    once = next(exact.filter(pl.col("lower") == 1).iter_rows(named=True), missing)
    twice = next(exact.filter(pl.col("lower") == 2).iter_rows(named=True), missing)
    high_from = 5
    high = exact.filter(pl.col("lower") >= high_from)
    canary = study.frame(paths.CANARY_MEMORIZATION_TABLE).filter(pl.col("checkpoint") == final)
    learned_from = derive.canary_learned_from(study)
    below = canary.filter(pl.col("injected_count") < (learned_from or 0))
    ca = study.frame(paths.CANARY_ATTRIBUTION_TABLE)
    out = {
        "context": str(mem_cfg["context"]),
        "continuation": str(mem_cfg["continuation"]),
        "ci_level": derive.interval_level(note, "memorization_by_dup"),
        "share_final": fmt.pct(per_packed["memorized_final"].mean()),
        "n_final": fmt.count(int(per_packed["memorized_final"].sum())),
        "first_step": _step(per_packed["first_memorized"].min()),
        "once": fmt.pct(once["fraction"]),
        "once_ci": fmt.interval(once["ci_lo"], once["ci_hi"], as_pct=True),
        "twice": fmt.pct(twice["fraction"]),
        "twice_ci": fmt.interval(twice["ci_lo"], twice["ci_hi"], as_pct=True),
        "high_from": str(high_from),
        "high": fmt.ratio(high["n_memorized"].sum(), high["n"].sum()),
        "canary_learned_from": str(learned_from) if learned_from is not None else "n/a",
        "canary_below": fmt.ratio(below["n_memorized"].sum(), below["n"].sum()),
        "early_until": str(mem_cfg["early_until"]),
        "top_k": str(mem_cfg["top_k"]),
        "restricted_at": restricted_at(mem_cfg.get("restricted_checkpoints") or []),
    }
    for m, g in ca.group_by("method"):
        out[f"canary_top1_{m[0]}"] = fmt.ratio(g["top1_is_own_copy"].sum(), g.height)
    el = derive.early_late(study)
    for setting in style.SETTINGS:  # every key the prose may use exists, "n/a" where nothing was measured
        for method in mem_cfg["methods"]:
            for group in style.MEMORIZATION_GROUPS:
                out.setdefault(setting, {}).setdefault(method, {})[group] = dict.fromkeys(
                    [*derive.CATEGORY_ORDER, "n", "self_top1"], "n/a"
                )
    for (setting, group, method), g in el.group_by("setting", "group", "method"):
        shares = {row["category"]: row["share"] for row in g.iter_rows(named=True)}
        key = out.setdefault(setting, {}).setdefault(method, {}).setdefault(group, {})
        key.update({c: fmt.pct(shares.get(c, 0.0)) for c in derive.CATEGORY_ORDER})
        key["n"] = str(g["n_queries"][0])
    out["early_late"] = early_late_sentence(derive.early_minus_late(study))
    for row in derive.self_top1(study).iter_rows(named=True):
        out[row["setting"]][row["method"]][row["group"]]["self_top1"] = fmt.pct(row["share"])
    at_final = set(el.filter(pl.col("setting") == "final")["method"].to_list())
    at_first = set(el.filter(pl.col("setting") == "first_memorized")["method"].to_list())
    missing = derive.ordered_methods(at_final - at_first)
    out["missing_at_first"] = (
        f"{fmt.listing(style.method_name(m) for m in missing)} "
        f"{'is' if len(missing) == 1 else 'are'} absent there: TrackStar needs the optimizer's second "
        "moments, which the training run saves only with the final checkpoint."
        if missing and at_first
        else ""
    )
    first_seen = summary.group_by("packed_id").agg(pl.col("trained_step").min())["trained_step"].max()
    earliest = per_packed["first_memorized"].min()
    out["restricted_note"] = (
        "Every training sequence had been seen before the first sequence was memorized, so at this "
        "scale the restricted candidate set equals the full set and only the checkpoint differs."
        if earliest is not None and first_seen is not None and first_seen < earliest
        else ""
    )
    return out


def restricted_at(chosen: list[int]) -> str:
    """Where the restricted attribution of a memorized sequence was done (``restricted_checkpoints``)."""
    if not chosen:
        return "at the checkpoint where each sequence was first memorized"
    steps = fmt.listing(f"step {s}" for s in sorted(chosen))
    return (
        f"at the first of {steps} at or after the checkpoint where each sequence was first memorized "
        "(the final checkpoint where none is; one gradient index per listed checkpoint instead of one per "
        "first-memorized checkpoint)"
    )


def _step(step) -> str:
    return "never" if step is None else f"step {int(step):,}"


def early_late_sentence(d: dict | None) -> str:
    """Early- against late-memorized queries at the final checkpoint: whether TrackStar retrieves
    more duplicates for the early ones, and whether their windows have more copies, each decided
    by the interval of the difference."""
    if d is None:
        return "This profile's tables have no early- and late-memorized queries to compare."
    dup, copies = d["duplicates"], d["copies"]
    if dup["lo"] > 0:
        dup_verdict = "TrackStar retrieves more duplicates for early-memorized sequences"
    elif dup["hi"] < 0:
        dup_verdict = "TrackStar retrieves fewer duplicates for early-memorized sequences"
    else:
        dup_verdict = "the two groups are not distinguishable by it"
    text = (
        f"Per query, the share of exact and near duplicates in the top k is {fmt.pct(dup['early'])} "
        f"early against {fmt.pct(dup['late'])} late, a difference of {fmt.pct(dup['diff'])} "
        f"{fmt.interval(dup['lo'], dup['hi'], as_pct=True)} (95% bootstrap interval, each group "
        f"resampled): {dup_verdict}. Their own windows occur {fmt.dec(copies['early'], 1)} times in "
        f"the corpus on average, against {fmt.dec(copies['late'], 1)} for late-memorized ones "
        f"(difference {fmt.dec(copies['diff'], 1)} {fmt.interval(copies['lo'], copies['hi'], 1)}; "
        f"medians {fmt.dec(copies['early_median'], 0)} and {fmt.dec(copies['late_median'], 0)})"
    )
    if copies["lo"] > 0 and copies["early_median"] <= copies["late_median"]:
        return text + (
            ": the early ones have more copies to learn from on average, carried by a few heavily "
            "duplicated windows, not by the typical one."
        )
    if copies["lo"] > 0:
        return text + ": the early ones have more copies to learn from."
    return text + "."
