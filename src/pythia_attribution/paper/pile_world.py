"""The variables of ``pythia.qmd``: a study of a Pythia model over its own training sequences.

The Pile has no planted items, so there is nothing to trace against; what the tables do hold is
the model (from its checkpoint), the candidate selection, the behaviors over the pinned checkpoints,
what each method retrieves, the tail-patch effect of stepping on it, and the memorized-evals split
checked against the candidates. Every value is a formatted string, as in ``variables``.
"""

from __future__ import annotations

import polars as pl

from pythia_attribution import paths
from pythia_attribution.paper import derive, fmt, style
from pythia_attribution.paper.data import Study

# the corpus source whose tables this module and ``pythia.qmd`` report (``build.MANUSCRIPTS``)
SOURCE = "pythia-preshuffled"


def corpus_source(study: Study) -> str:
    """The profile's ``corpus.source`` the tables were built from: what chooses the manuscript
    (``build.manuscript``) and this module's sections."""
    return study.config(paths.CORPUS_TABLE, "corpus").get("source", "micro-pile")


def is_pile_world(study: Study) -> bool:
    """Whether the corpus is a selection of a preshuffled dataset's training sequences."""
    return corpus_source(study) == SOURCE


def share(k: int, n: int) -> str:
    """A small share with three significant digits (22,500 of 146 million is 0.0154%)."""
    return f"{100 * k / n:.3g}%" if n else "n/a"


def selection_sentence(pile: dict, batch: int) -> str:
    """How ``corpus.pile`` chose the candidates, in words."""
    parts = []
    for first, last in pile.get("steps", []):
        n = (last - first) * batch
        parts.append(f"the {fmt.count(n)} sequences of steps {fmt.count(first)} to {fmt.count(last - 1)}")
    if pile.get("seq_idxs"):
        parts.append(f"{fmt.count(len(pile['seq_idxs']))} sequences listed by index")
    if pile.get("memorized"):
        listed = fmt.count(pile["memorized"])
        parts.append(f"a seeded sample of {listed} sequences the memorized-evals split lists")
    if pile.get("sample"):
        until = pile.get("sample_until_step") or 0
        before = f" of those trained before step {fmt.count(until)}" if until else ""
        parts.append(f"a seeded uniform sample of {fmt.count(pile['sample'])}{before}")
    return fmt.listing(parts)


def learning_sentence(study: Study) -> str:
    """How many behaviors each checkpoint exhibits: '0/5 at step 0, 2/5 at step 32 and ...'."""
    per = (
        study.frame(paths.PROBE_SUMMARY_TABLE)
        .group_by("checkpoint")
        .agg(pl.col("n_exhibited").sum(), pl.col("n").sum())
        .sort("checkpoint")
    )
    return fmt.listing(
        f"{fmt.ratio(r['n_exhibited'], r['n'])} at step {fmt.count(r['checkpoint'])}"
        for r in per.iter_rows(named=True)
    )


def versus_random(
    intervals: list[tuple[str, float | None, float | None]], more: str, less: str, nobody: str
) -> str:
    """The clause naming which methods beat random sequences, decided by the interval of each
    method's paired difference from them (``(method, lo, hi)``; None where there is none):
    'paired by behavior against random sequences, <more> for A and <less> for B; for the others
    the interval of the difference includes zero'."""
    above = [style.method_name(m) for m, lo, _ in intervals if lo is not None and lo > 0]
    below = [style.method_name(m) for m, _, hi in intervals if hi is not None and hi < 0]
    return (
        f"paired by behavior against random sequences, {more} for {fmt.listing(above) if above else nobody}"
        + (f" and {less} for {fmt.listing(below)}" if below else "")
        + "; for the others the interval of the difference includes zero"
    )


def causal_sentences(study: Study) -> dict:
    """Tail-patch: the methods by effect, the random floor, and which methods beat it (paired by
    behavior, decided by the interval)."""
    tp = study.frame(paths.TAIL_PATCH_METRICS_TABLE).filter(pl.col("family") == "all")
    ranked = tp.sort("effect", descending=True)
    order = ", ".join(
        f"{style.method_name(r['method'])} {fmt.sci(r['effect'])} "
        + fmt.interval_sci(r["effect_lo"], r["effect_hi"])
        for r in ranked.iter_rows(named=True)
    )
    methods = ranked["method"].to_list()
    if "random" in methods:
        intervals = []
        for m in methods:
            paired = derive.causal_paired(study, m, "random") if m != "random" else None
            if paired:
                intervals.append((m, paired["lo"], paired["hi"]))
        clause = versus_random(intervals, "the step raises the target more", "less", "no method")
        floor = clause[0].upper() + clause[1:] + "."
    else:
        floor = "No random floor was run."
    return {
        "order": order,
        "versus_random": floor,
        "n": str(int(tp["n_behaviors"].max())) if tp.height else "0",
        "top_k": str(study.config(paths.TAIL_PATCH_TABLE, "causal")["top_k"]),
    }


def finetune_variables(study: Study) -> dict:
    """Select-and-fine-tune on the probe's prompts: its settings, and per family the selections'
    effects from the largest and which beat random sequences (paired by behavior, by the interval)."""
    fm = study.frame(paths.FINETUNE_METRICS_TABLE).filter(pl.col("prompt_kind") == "original")
    cfg = study.config(paths.FINETUNE_METRICS_TABLE, "causal")
    out = {k: str(cfg[f"finetune_{k}"]) for k in ("k", "steps", "batch")}
    out["lr"] = fmt.sci(cfg["finetune_lr"], 1)
    out["max_exhibited"] = fmt.pct(cfg["finetune_max_exhibited"])
    if fm.is_empty():
        out["sentences"] = (
            "No family of the profile's list had a behavior in its evaluation set, so nothing was fine-tuned."
        )
        return out
    sentences = []
    for family in [f for f in style.FAMILIES if f in set(fm["family"])]:
        sub = fm.filter(pl.col("family") == family).sort("delta_logp", descending=True)
        first = sub.row(0, named=True)
        order = ", ".join(
            f"{style.method_name(r['method'])} {fmt.dec(r['delta_logp'], 2)} "
            + fmt.interval(r["delta_logp_lo"], r["delta_logp_hi"], 2)
            for r in sub.iter_rows(named=True)
        )
        intervals = [
            (r["method"], r["minus_random_lo"], r["minus_random_hi"])
            for r in sub.iter_rows(named=True)
            if r["method"] != "random"
        ]
        floor = (
            versus_random(intervals, "the change is larger", "smaller", "no selection")
            if "random" in set(sub["method"])
            else "no random selection was fine-tuned"
        )
        sentences.append(
            f"For the {fmt.count(first['n_behaviors'])} behaviors of {style.family_label(family).lower()} "
            f"(fine-tuned from step {fmt.count(first['from_step'])}), the selections change the targets' "
            f"log-probability by, from the largest: {order}; {floor}."
        )
    out["sentences"] = " ".join(sentences)
    return out


def composition_sentence(study: Study) -> str:
    """Per method, the share of its top k that duplicates the query exactly or nearly."""
    comp = derive.pooled_composition(study)
    parts = []
    for m in derive.ordered_methods(comp["method"].unique()):
        g = comp.filter(pl.col("method") == m)
        dup = g.filter(pl.col("category").is_in(["exact", "near_duplicate"]))["share"].sum()
        parts.append(f"{style.method_name(m)} {fmt.pct(dup)}")
    return fmt.listing(parts)


def where_variables(study: Study) -> dict:
    """Where the primary gradient method's score sits (``derive.primary_method``): over the tokens
    of its top sequences, and over thirds of the layers. Without planted items the layer thirds are
    compared by what they retrieve (duplicates of the query, thematic, unrelated), not by ground truth."""
    cfg = study.config(paths.TOKENWISE_TABLE, "analyses")
    tok = study.frame(paths.TOKENWISE_TABLE, ("behavior_id", "method", "rank"))
    method = derive.primary_method(tok["method"].unique())
    tok = tok.filter(pl.col("method") == method)
    n_sequences = tok.select("behavior_id", "rank").n_unique()
    run = study.provenance(paths.TOKENWISE_TABLE)["query_run"]
    out = {
        "method": style.method_name(method),
        "n_behaviors": fmt.count(tok["behavior_id"].n_unique()),
        "tokenwise_top": str(cfg["tokenwise_top"]),
        "layer_top_k": str(cfg["layer_top_k"]),
        "query_run": str(run),
    }
    shares = derive.query_run_shares(study).filter(pl.col("method") == method)
    if shares.height:
        r = shares.row(0, named=True)
        out["query"] = (
            f"{fmt.count(r['n_sequences'])} of the {fmt.count(n_sequences)} repeat a run of at least "
            f"{run} tokens of the query; those runs are {fmt.pct(r['positions'])} of these sequences' "
            f"positions and carry {fmt.pct(r['share'])} of their score"
        )
    else:
        out["query"] = f"none of the {fmt.count(n_sequences)} repeats a run of {run} tokens of the query"
    example = derive.tokenwise_example(study, method)
    out["example"] = example["behavior_id"][0] if example.height else "n/a"

    thirds = study.frame(paths.LAYER_THIRDS_SUMMARY_TABLE).filter(
        (pl.col("family") == "all") & (pl.col("method") == method)
    )
    by_third = {r["third"]: r for r in thirds.iter_rows(named=True)}
    parts = [t for t in ("lower", "middle", "upper") if t in by_third]

    def composition(t: str) -> str:
        r = by_third[t]
        return f"{fmt.pct(r['exact'] + r['near_duplicate'])} and {fmt.pct(r['thematic'])}"

    out["thirds"] = fmt.listing(f"{composition(t)} by the {t} third" for t in parts)
    out["thirds_all"] = composition("all")
    top = max(by_third[t]["thematic"] for t in parts)
    most = [t for t in parts if by_third[t]["thematic"] == top]
    if top == 0:
        out["most_thematic"] = "no third retrieves a thematic sequence"
    elif len(most) == 1:
        out["most_thematic"] = f"the {most[0]} third's top sequences are the most thematic"
    else:
        out["most_thematic"] = f"the {fmt.listing(most)} thirds' top sequences are equally the most thematic"
    return out


def world_variables(study: Study, final: int) -> dict:
    corpus = study.provenance(paths.CORPUS_TABLE)
    summary = corpus["summary"]
    corpus_cfg = corpus["config"]["corpus"]
    ckpt_prov = study.provenance(paths.CHECKPOINTS_TABLE)
    model = ckpt_prov["model"]
    ckpts = study.frame(paths.CHECKPOINTS_TABLE).sort("step")
    attribute_cfg = study.config(paths.ATTRIBUTIONS_TABLE, "attribute")
    causal_cfg = study.config(paths.TAIL_PATCH_TABLE, "causal")
    probes = study.frame(paths.PROBES_TABLE).filter(pl.col("checkpoint") == final)
    repo, commit = summary["dataset"].split("@")
    n_candidates, n_dataset = int(summary["n_packed"]), int(summary["n_dataset_sequences"])
    out = {
        "model_repo": ckpt_prov["model_repo"],
        "params": fmt.millions(model["params"]),
        "layers": str(model["layers"]),
        "hidden": str(model["hidden"]),
        "heads": str(model["heads"]),
        "context": fmt.count(model["context"]),
        "vocab": fmt.count(model["vocab"]),
        "rotary": fmt.pct(model["rotary_pct"]),
        "n_checkpoints": str(ckpts.height),
        "steps": fmt.listing(fmt.count(s) for s in ckpts["step"].to_list()),
        "final_step": fmt.count(final),
        "final_sequences": fmt.count(int(ckpts["sequences_seen"].max())),
        "dataset": repo,
        "dataset_commit": commit[:12],
        "n_dataset": fmt.count(n_dataset),
        "n_candidates": fmt.count(n_candidates),
        "candidate_share": share(n_candidates, n_dataset),
        "seq_len": str(summary["seq_len"]),
        "batch": fmt.count(summary["batch_size"]),
        "selection": selection_sentence(corpus_cfg["pile"], int(summary["batch_size"])),
        "tokens_checked": fmt.count(summary.get("evals_tokens_checked", 0)),
        "n_behaviors": str(probes["behavior_id"].n_unique()),
        "n_families": str(probes["family"].n_unique()),
        "exhibited_final": fmt.count(int(probes["exhibited"].sum())),
        "learning": learning_sentence(study),
        "methods": fmt.listing(
            style.method_name(m)
            for m in derive.ordered_methods(study.frame(paths.ATTRIBUTIONS_TABLE)["method"].unique())
            if m != "random"
        ),
        "top_k": str(attribute_cfg["top_k"]),
        "projection_dim": str(attribute_cfg["projection_dim"]),
        "moment_batches": str(attribute_cfg.get("moment_batches", "n/a")),
        "tail_patch_state": (
            "Adam's second moments estimated as for TrackStar with estimated state, a zero first moment"
            if causal_cfg.get("optimizer_state") == "estimated"
            else "the final checkpoint's saved AdamW state"
        ),
        "causal": causal_sentences(study),
        "finetune": finetune_variables(study),
        "composition": composition_sentence(study),
    }
    out |= evals_variables(study)
    return out


def evals_variables(study: Study) -> dict:
    """The memorized-evals split: its size, the re-scored sample's agreement, the candidates it lists."""
    if not study.has(paths.EVALS_RESCORE_TABLE):
        return {
            "evals_split": "",
            "evals": "The memorization stage tested the candidates itself (no memorized-evals split).",
        }
    prov = study.provenance(paths.EVALS_RESCORE_TABLE)
    rescore = study.frame(paths.EVALS_RESCORE_TABLE)
    listed = int(prov["candidates_listed"])
    candidates = (
        f"of the {fmt.count(listed)} candidates it lists, "
        f"{fmt.count(prov['candidates_listed_and_memorized'])} are memorized by our own test, and "
        f"the first tokens of all {fmt.count(prov['candidates_listed_tokens_match'])} equal the "
        "split's (its sequence indexes are ours)"
        if listed
        else "it lists none of the candidates"
    )
    return {
        "evals_split": prov["split"],
        "evals": (
            f"The split `{prov['split']}` lists {fmt.count(prov['n_listed'])} sequences as memorized. "
            f"Re-scored with the step {fmt.count(int(rescore['checkpoint'].max()))} checkpoint, "
            f"{fmt.pct(prov['agreement'])} of a seeded sample of {fmt.count(rescore.height)} of them are "
            f"memorized by the same test; {candidates}."
        ),
    }


def published_memorization(values: dict) -> None:
    """The sentence comparing the candidates' memorized share with the published share of the
    model's split (``anchors.pythia_memorized.by_split``), once the anchors are loaded."""
    world = values.get("world")
    if world is None:
        return
    split = world.get("evals_split", "")
    rate = values.get("anchors", {}).get("pythia_memorized", {}).get("by_split", {}).get(split)
    world["published"] = (
        f"{rate} of all training sequences memorized for the split `{split}`"
        if rate
        else f"no published share for the split `{split}`"
    )
