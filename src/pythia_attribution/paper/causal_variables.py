"""The variables of the causal checks: tail-patch, select-and-fine-tune and leave-k-out, and the
sentences that set a method's tracing beside its tail-patch effect (EK-FAC, the TrackStar variants,
the activation-space family). Every value is a formatted string, as in ``variables``.
"""

from __future__ import annotations

import polars as pl

from pythia_attribution import paths
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.paper import derive, fmt, style
from pythia_attribution.paper.data import Study


def tail_patch_variables(study: Study) -> dict:
    """Tail-patch: each method's mean effect over its top k, TrackStar's paired differences with the
    others, the methods' order by tracing and by effect, and the abstract's sentence."""
    tp = study.frame(paths.TAIL_PATCH_METRICS_TABLE).filter(pl.col("family") == "all")
    orders = derive.causal_orders(study)
    causal: dict = {"top_k": str(study.config(paths.TAIL_PATCH_TABLE, "causal")["top_k"])}
    for row in tp.iter_rows(named=True):
        m = row["method"]
        causal[m] = {
            "effect": fmt.sci(row["effect"]),
            "effect_ci": fmt.interval_sci(row["effect_lo"], row["effect_hi"]),
            "positive": fmt.pct(row["positive"]),
            "n": str(row["n_behaviors"]),
        }
    for key, ordered in orders.items():
        causal[f"order_{key}"] = ", ".join(style.method_name(m) for m in ordered)
    pairs = [("trackstar", "bm25"), ("trackstar", "grad_cosine"), ("trackstar", REFERENCE)]
    pairs += [("trackstar", "trackstar_noadam"), ("trackstar", "trackstar_est"), ("trackstar", "ekfac")]
    for a, b in [*pairs, ("trackstar", "residual_diff"), ("trackstar", "residual_change")]:
        paired = derive.causal_paired(study, a, b)
        causal[f"{a}_minus_{b}"] = (
            {
                "mean": fmt.sci(paired["mean"]),
                "ci": fmt.interval_sci(paired["lo"], paired["hi"]),
                "ahead": fmt.pct(paired["ahead"]),
                "n": str(paired["n"]),
            }
            if paired
            else dict.fromkeys(("mean", "ci", "ahead", "n"), "n/a")
        )
    causal["split"] = split_sentence(study, orders)
    versus_bm25 = derive.causal_paired(study, "trackstar", "bm25")
    causal["abstract"] = tail_patch_abstract(versus_bm25, causal["top_k"])
    return causal


def finetune_variables(study: Study) -> dict:
    """Select-and-fine-tune: per family, the set, the checkpoint and each selection's effect."""
    fm = study.frame(paths.FINETUNE_METRICS_TABLE)
    cfg = study.config(paths.FINETUNE_METRICS_TABLE, "causal")
    out: dict = {k: str(cfg[f"finetune_{k}"]) for k in ("k", "steps", "batch", "min_count")}
    out["lr"] = fmt.sci(cfg["finetune_lr"], 1)
    out["max_exhibited"] = fmt.pct(cfg["finetune_max_exhibited"])
    for family in sorted(fm["family"].unique()):
        sub = fm.filter(pl.col("family") == family)
        fam: dict = {"n": str(sub["n_behaviors"][0]), "from_step": str(sub["from_step"][0])}
        for kind in ("original", "paraphrase"):
            rows = sub.filter(pl.col("prompt_kind") == kind).sort("delta_logp", descending=True)
            for r in rows.iter_rows(named=True):
                fam.setdefault(r["method"], {})[kind] = {
                    "delta": fmt.dec(r["delta_logp"], 2),
                    "ci": fmt.interval(r["delta_logp_lo"], r["delta_logp_hi"], 2),
                    "exhibited": fmt.pct(r["exhibited_after"]),
                    "before": fmt.pct(r["exhibited_before"]),
                }
            methods = [m for m in rows["method"].to_list() if m != REFERENCE]
            fam[f"order_{kind}"] = ", ".join(style.method_name(m) for m in methods)
        out[family] = fam
    out["abstract"] = finetune_abstract(out, sorted(fm["family"].unique()))
    return out


def finetune_abstract(out: dict, families: list[str]) -> str:
    """The abstract's select-and-fine-tune sentence: TrackStar's and BM25's selections for the first
    family that has both, on the probe's own prompts, each with its interval (no ranking claimed)."""
    for family in families:
        fam = out[family]
        if "original" in fam.get("trackstar", {}) and "original" in fam.get("bm25", {}):
            ts, bm = fam["trackstar"]["original"], fam["bm25"]["original"]
            return (
                f"Fine-tuning an early checkpoint on each method's top {out['k']} sequences for a "
                f"family's behaviors ({style.family_label(family).lower()}, {fam['n']} behaviors) raises "
                f"their targets' log-probability by {ts['delta']} {ts['ci']} with TrackStar's selection "
                f"and by {bm['delta']} {bm['ci']} with BM25's."
            )
    return ""


def tail_patch_abstract(paired: dict | None, k: str) -> str:
    """The abstract's tail-patch sentence: TrackStar's top-k against BM25's, paired by behavior, the
    direction decided by the interval, not by the point estimate."""
    if not paired:
        return ""
    change = f"{fmt.sci(paired['mean'])} {fmt.interval_sci(paired['lo'], paired['hi'])}"
    lead = "By TrackStar's own causal test, one more training step on a retrieved sequence,"
    over = f"paired over {paired['n']} behaviors"
    if paired["lo"] > 0:
        return (
            f"{lead} a step on one of TrackStar's top {k} raises the target's log-probability by {change} "
            f"more than a step on one of BM25's, {over}."
        )
    if paired["hi"] < 0:
        return (
            f"{lead} a step on one of BM25's top {k} raises the target's log-probability more than a step "
            f"on one of TrackStar's: TrackStar's minus BM25's is {change}, {over}."
        )
    return (
        f"{lead} steps on TrackStar's and BM25's top {k} move the target's log-probability alike: "
        f"TrackStar's minus BM25's is {change}, {over}."
    )


def split_sentence(study: Study, orders: dict[str, list[str]]) -> str:
    """Whether the method that ranks sources first (by MRR under the complete definition, the
    strictest) is also the one whose sequences move the prediction most, decided by the paired
    tail-patch difference between it and the first by effect, not by comparing point estimates."""
    first = {truth: orders[truth][0] for truth in derive.TRUTH_ORDER if orders.get(truth)}
    if "complete" not in first or not orders.get("causal"):
        return "This profile's tables do not rank the methods both ways."
    tracing_best, causal_best = first["complete"], orders["causal"][0]
    finder, mover = style.method_name(tracing_best), style.method_name(causal_best)
    where = (
        "under every truth definition" if len(set(first.values())) == 1 else "under the complete definition"
    )
    lead = f"The method that ranks sources first {where}, {finder},"
    if tracing_best == causal_best:
        return f"{lead} is also the one whose sequences move the prediction most."
    paired = derive.causal_paired(study, causal_best, tracing_best)
    if paired is None:
        return f"{lead} is not first by effect ({mover} is)."
    change = f"{fmt.sci(paired['mean'])} {fmt.interval_sci(paired['lo'], paired['hi'])}"
    diff = f"{mover}'s effect minus {finder}'s is {change}"
    if paired["lo"] > 0:
        return (
            f"{lead} is not the one whose sequences move the prediction most: a step on the top "
            f"sequences of {mover}, first by effect, raises the target by {change} more, paired by "
            f"behavior."
        )
    if paired["hi"] < 0:  # first by the mean over its behaviors, behind on the behaviors both have
        return (
            f"{lead} is not first by mean effect, yet paired by behavior its sequences move the "
            f"prediction more than those of {mover}, the first: {diff}."
        )
    return (
        f"{lead} is not first by effect, but its sequences move the prediction as much as those of "
        f"{mover}, the first, within the interval: paired by behavior, {diff}."
    )


def method_sentence(v: dict, method: str, subject: str, versus: list[str]) -> str | None:
    """A method's MRR under the complete and the partial truth definitions (``subject``: the words
    before the first value), compared by the overlap of the intervals with each method of
    ``versus``, and its tail-patch effect paired with TrackStar's; None when this profile's tables
    do not have the method."""
    complete, partial = v.get("tracing_complete", {}), v.get("tracing", {})
    if method not in complete or method not in partial:
        return None

    def against(tracing: dict) -> str:
        """'below X's and Y's' or 'indistinguishable from X's and below Y's': one verdict per group."""
        verdicts: dict[str, list[str]] = {}
        for b in versus:
            verdict = tracing.get(f"{method}_vs_{b}", "n/a")
            verdicts.setdefault(verdict, []).append(f"{style.method_name(b)}'s")
        return fmt.listing(f"{verdict} {fmt.listing(names)}" for verdict, names in verdicts.items())

    on_complete, on_partial = against(complete), against(partial)
    verdicts = (
        f"{on_complete} under both definitions"
        if on_complete == on_partial
        else f"{on_complete} under the complete definition and {on_partial} under the partial one"
    )
    text = (
        f"{subject} {complete[method]['mrr']} {complete[method]['mrr_ci']} under the complete "
        f"definition and {partial[method]['mrr']} {partial[method]['mrr_ci']} under the partial one: by "
        f"the overlap of the intervals, {verdicts}."
    )
    causal = v.get("causal", {})
    paired = causal.get(f"trackstar_minus_{method}", {})
    if method in causal and paired.get("mean", "n/a") != "n/a":
        text += (
            f" A tail-patch step on its top sequences changes the target by {causal[method]['effect']} "
            f"{causal[method]['effect_ci']}; paired by behavior, TrackStar's effect minus its is "
            f"{paired['mean']} {paired['ci']}."
        )
    return text


def ekfac_sentence(v: dict) -> str:
    """EK-FAC's tracing and tail-patch, next to TrackStar's and BM25's."""
    subject = "EK-FAC, the influence-functions study's method,"
    text = method_sentence(v, "ekfac", f"{subject} has an MRR of", ["trackstar", "bm25"])
    return text or f"{subject} is not run by this profile."


def noadam_sentence(v: dict, shared: dict[str, float | None]) -> str:
    """What TrackStar loses without the optimizer state (real Pythia publishes none), with no Adam
    correction and with estimated second moments; ``shared``: each variant's mean share of
    TrackStar's top 10."""
    lead = (
        "Real Pythia publishes no optimizer state, so its TrackStar runs without Adam's second moments "
        "(trackstar_noadam: the same Hessian and unit norm on raw gradients) or with estimated ones."
    )
    text = method_sentence(v, "trackstar_noadam", "Without them its MRR is", ["trackstar"])
    est = method_sentence(
        v,
        "trackstar_est",
        "With Adam's second moments estimated instead, from the squared minibatch gradients of the "
        "last training steps at the final checkpoint (trackstar_est), the MRR is",
        ["trackstar"],
    )
    parts = [lead, text or "This profile does not run it.", est]
    est_share, noadam_share = shared.get("trackstar_est"), shared.get("trackstar_noadam")
    if est_share is not None and noadam_share is not None:
        closer = "more" if est_share > noadam_share else "no more"
        parts.append(
            f"The estimate reproduces TrackStar's rankings {closer} closely than no correction does: on "
            f"average {fmt.pct(est_share)} of TrackStar's top 10 are in trackstar_est's top 10, against "
            f"{fmt.pct(noadam_share)} for trackstar_noadam."
        )
    return " ".join(part for part in parts if part)


def activation_space_sentence(v: dict) -> str:
    """The activation-space family's tracing and tail-patch, next to its nearest relatives."""
    diff = method_sentence(
        v, "residual_diff", "The residual difference has an MRR of", ["activation", "trackstar"]
    )
    change = method_sentence(
        v, "residual_change", "The residual change has an MRR of", ["grad_cosine", "trackstar"]
    )
    parts = [text for text in (diff, change) if text]
    return " ".join(parts) if parts else "This profile does not run the activation-space family."


def leave_out_variables(study: Study, causal: dict) -> dict:
    """Leave-k-out retraining: one generated paragraph, from its tables when the stage has run."""
    if not study.has(paths.LEAVE_OUT_METRICS_TABLE):
        return {
            "ran": "no",
            "sentence": (
                "Leave-k-out retraining, the largest intervention, is its own session outside `all` "
                "(`nox -s leave_out`, one retraining per method); it was not run for this build."
            ),
        }
    lm = study.frame(paths.LEAVE_OUT_METRICS_TABLE).filter(pl.col("family") == "all")
    runs = study.frame(paths.LEAVE_OUT_RUNS_TABLE)
    cfg = study.config(paths.LEAVE_OUT_METRICS_TABLE, "leave_out")
    draws = runs.filter(pl.col("floor") & (pl.col("run") != "random"))["run"].to_list()  # further draws
    by_run = {r["run"]: r for r in lm.iter_rows(named=True) if r["run"] not in draws}
    methods = [m for m in cfg["methods"] if m in by_run and m != "random"]

    def effect(run: str) -> str:
        r = by_run[run]
        return f"{fmt.dec(r['delta_logp'], 2)} {fmt.interval(r['delta_logp_lo'], r['delta_logp_hi'], 2)}"

    def versus(run: str) -> str:
        r = by_run[run]
        if r["vs_random"] is None or r["vs_random"] != r["vs_random"]:
            return ""
        ci = fmt.interval(r["vs_random_lo"], r["vs_random_hi"], 2)
        return f" (beyond random removal, paired by behavior: {fmt.dec(r['vs_random'], 2)} {ci})"

    n = next(iter(by_run.values()))["n_behaviors"]
    medians = (
        study.frame(paths.LEAVE_OUT_TABLE).group_by("run").agg(pl.col("delta_logp").median()).sort("run")
    )
    median = dict(zip(medians["run"], medians["delta_logp"], strict=True))
    median_text = fmt.listing(
        f"{fmt.dec(median[m], 2)} ({style.method_name(m) if m != REFERENCE else 'complete copies'})"
        for m in [*methods, *(r for r in ("random", REFERENCE) if r in median)]
    )
    # ranked by the mean drop, largest first; each method paired with the next in that ranking, so
    # that the sentence says whether neighbours in the ranking are told apart by behavior
    order = sorted([m for m in by_run if m != REFERENCE], key=lambda m: by_run[m]["delta_logp"])
    ranked = [m for m in order if m in methods]
    pairs = []
    for a, b in zip(ranked, ranked[1:], strict=False):
        paired = derive.leave_out_paired(study, a, b)
        if paired:
            pairs.append(
                f"removing {style.method_name(a)}'s top sequences changes the target by "
                f"{fmt.dec(paired['mean'], 2)} {fmt.interval(paired['lo'], paired['hi'], 2)} relative to "
                f"removing {style.method_name(b)}'s (further for {fmt.pct(paired['further'])} of "
                f"{paired['n']} behaviors)"
            )
    listing = fmt.listing(f"{style.method_name(m)}'s {effect(m)}{versus(m)}" for m in methods)
    floor = (
        f"the random method's top {cfg['top_k']}, by {effect('random')}, and " if "random" in by_run else ""
    )
    sentence = (
        f"**Leave-k-out retraining** (`nox -s leave_out`, outside `all`; @tbl-leave-out) retrains the model "
        f"from its initialization on the same batches with a set of sequences' loss weight set to zero, "
        f"every epoch, so that the training run itself is the paired baseline. For {n} behaviors sampled "
        f"with the study's seed, each method's top {cfg['top_k']} per behavior are removed together, one "
        f"run per method ({fmt.count(int(runs['seconds'].mean()))} s of training each here). Removing them "
        f"changes the behaviors' target log-probability at the final step by {listing}; removing "
        f"{floor}up to {cfg['top_k']} of each "
        f"behavior's own {cfg['reference_truth']} ground-truth copies, by {effect(REFERENCE)}"
        f"{versus(REFERENCE)}. By the size of the mean drop the methods rank "
        f"{', '.join(style.method_name(m) for m in order)}; the medians, which a few large drops "
        f"(a canary losing its memorized continuation) do not sway, are {median_text}."
    )
    if pairs:
        sentence += " Paired by behavior with the next in that ranking: " + "; ".join(pairs) + "."
    if draws and "random" in by_run:
        sentence += " " + floor_sentence(by_run, [*methods, REFERENCE], len(draws) + 1, cfg["top_k"])
    return {"ran": "yes", "sentence": sentence}


def floor_sentence(by_run: dict, runs: list[str], n_floor: int, k: int) -> str:
    """How much the random floor varies between its draws, and which removals cost more than every
    draw (the rank among random removals)."""
    r = by_run["random"]

    def name(m: str) -> str:
        return style.method_name(m) if m != REFERENCE else "the complete copies"

    beyond = [
        m for m in runs if m in by_run and by_run[m]["random_costlier_than"] == by_run[m]["random_runs"]
    ]
    within = [m for m in runs if m in by_run and m not in beyond]
    text = (
        f"The floor itself is a draw: over {n_floor} seeded draws of {k} random sequences per behavior "
        f"(each its own retraining), the random removal's mean change runs from "
        f"{fmt.dec(r['random_min'], 2)} to {fmt.dec(r['random_max'], 2)}"
    )
    if beyond:
        text += f"; the removals of {fmt.listing(name(m) for m in beyond)} cost more than every draw"
    if within:
        text += "; " + fmt.listing(
            f"that of {name(m)} more than {by_run[m]['random_costlier_than']} of the {n_floor}"
            for m in within
        )
    return text + "."
