"""The paper's tables as pandoc/Quarto markdown: a pipe table and a ``: caption {#tbl-id}`` line.

Cells holding corpus text are escaped (every ASCII punctuation mark backslash-escaped), so a
training sequence can never become markup, a citation or a shortcode.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import polars as pl

from pythia_attribution import paths
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.paper import derive, fmt, style
from pythia_attribution.paper.data import Study
from pythia_attribution.paper.variables import DATA_ABSENT

_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")


def escape(text: str, limit: int | None = None) -> str:
    """Corpus text as one safe markdown table cell (whitespace collapsed, optionally shortened)."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return _PUNCT.sub(r"\\\1", text)


def pipe_table(
    header: list[str],
    rows: list[list[str]],
    caption: str,
    ident: str,
    align: str = "",
    widths: list[int] | None = None,
) -> str:
    """A pipe table; ``align`` is l/r/c per column (default: first left, others right).

    ``widths`` are relative column widths: pandoc takes them from the length of the separator
    dashes when a row is too long for one line, which is when they matter.
    """
    align = align or "l" + "r" * (len(header) - 1)
    widths = widths or [1] * len(header)
    sep = [
        (":" if a in "lc" else "-") + "-" * (4 * w) + (":" if a in "rc" else "-")
        for a, w in zip(align, widths, strict=True)
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n: {caption} {{#{ident}}}\n"


def corpus(study: Study) -> str:
    docs = study.frame(paths.DOCUMENTS_TABLE, ("source", "n_tokens"))
    by = docs.group_by("source").agg(pl.len().alias("docs"), pl.col("n_tokens").sum().alias("tokens"))
    total = by["tokens"].sum()
    by = by.with_columns(pl.col("source").str.starts_with("synthetic").alias("synthetic")).sort(
        "synthetic", "tokens", descending=[False, True]
    )
    rows = [
        [
            f"`{r['source']}`",
            "synthetic" if r["synthetic"] else "natural",
            fmt.count(r["docs"]),
            fmt.count(r["tokens"]),
            fmt.pct(r["tokens"] / total),
        ]
        for r in by.iter_rows(named=True)
    ]
    rows.append(["**total**", "", fmt.count(by["docs"].sum()), fmt.count(total), "100%"])
    return pipe_table(
        ["Source", "Kind", "Documents", "Tokens", "Share"],
        rows,
        "The training corpus by source (tokens of the documents before packing; one epoch).",
        "tbl-corpus",
        "llrrr",
    )


def behaviors(study: Study) -> str:
    final = derive.final_checkpoint(study)
    probes = derive.final_probes(study)
    attributed = set(study.frame(paths.ATTRIBUTIONS_TABLE, ("behavior_id",))["behavior_id"].to_list())
    rows = []
    for family in [f for f in style.FAMILIES if f in set(probes["family"])]:
        g = probes.filter(pl.col("family") == family)
        example = g.sort("behavior_id").row(0, named=True)
        rows.append(
            [
                style.family_label(family),
                str(g.height),
                str(int(g["exhibited"].sum())),
                str(len(attributed & set(g["behavior_id"].to_list()))),
                escape(example["prompt"], 48) + " → " + escape(example["target"], 24),
            ]
        )
    return pipe_table(
        ["Family", "Behaviors", f"Exhibited at step {final}", "Attributed", "Example (prompt → target)"],
        rows,
        f"Behavior families probed at every checkpoint; exhibited means the greedy completion at "
        f"step {final} starts with the target. Only exhibited behaviors are attributed.",
        "tbl-behaviors",
        "lrrrl",
        [4, 2, 3, 2, 8],
    )


def causal(study: Study) -> str:
    """Tail-patch effect next to tracing MRR, per method, and the two rankings (tail-patch alone
    where the world has no ground truth to trace)."""
    tp = study.frame(paths.TAIL_PATCH_METRICS_TABLE).filter(pl.col("family") == "all")
    tm = study.frame(paths.TRACING_METRICS_TABLE).filter(pl.col("family") == "all")
    truths = derive.TRUTH_ORDER if tm.height else ()
    prov = study.provenance(paths.TAIL_PATCH_METRICS_TABLE)
    level = derive.interval_level(prov.get("bootstrap", ""), "tail_patch_metrics")
    orders = derive.causal_orders(study)

    def rank(method: str, key: str) -> str:
        return str(orders[key].index(method) + 1) if method in orders[key] else "n/a"

    rows = []
    for m in derive.ordered_methods(tp["method"].unique()):
        r = tp.filter(pl.col("method") == m).row(0, named=True)
        mrr = {
            truth: tm.filter((pl.col("method") == m) & (pl.col("truth") == truth))["mrr"].to_list()
            for truth in derive.TRUTH_ORDER
        }
        rows.append(
            [
                style.method_label(m),
                str(r["n_behaviors"]),
                f"{fmt.sci(r['effect'])} {fmt.interval_sci(r['effect_lo'], r['effect_hi'])}",
                fmt.pct(r["positive"]),
                rank(m, "causal"),
            ]
            + [f"{fmt.dec(mrr[t][0])} ({rank(m, t)})" if mrr[t] else "n/a" for t in truths]
        )
    causal_cfg = study.config(paths.TAIL_PATCH_TABLE, "causal")
    k = causal_cfg["top_k"]
    state = (
        "Adam's second moments estimated from the last training steps' minibatches, a zero first moment"
        if causal_cfg.get("optimizer_state") == "estimated"
        else "the run's AdamW state"
    )
    beside = (
        "Beside it, tracing MRR under each truth definition; Rank and the bracketed numbers are each "
        "criterion's ranking of the methods (ground truth, a reference rather than a method, is not ranked)."
        if truths
        else "Rank: the methods ordered by effect."
    )
    return pipe_table(
        ["Method", "n", "Tail-patch effect", "> 0", "Rank"] + [f"MRR {t} (rank)" for t in truths],
        rows,
        f"Tail-patch: the change in the target's log-probability after one training step ({state}, "
        f"final learning rate) on each of a method's top {k} sequences, beyond the same step "
        f"with a zero gradient, averaged over the top {k} and then over n behaviors ({level} "
        'percentile-bootstrap intervals); "> 0": the share of a behavior\'s top-k sequences whose step '
        f"raises the target, averaged over behaviors. {beside}",
        "tbl-causal",
        "lrrrr" + "r" * len(truths),
        [5, 1, 6, 2, 2] + [3] * len(truths),
    )


def checkpoints(study: Study) -> str:
    """The checkpoints the study reads: revision, the commit it is pinned to (Hub checkpoints) or the
    sha256 of the weights (trained ones), and how many training sequences each has seen."""
    ckpts = study.frame(paths.CHECKPOINTS_TABLE).sort("step")
    pinned = bool((ckpts["commit"].fill_null("") != "").all())
    rows = [
        [
            r["revision"] or f"step{r['step']}",
            f"`{(r['commit'] if pinned else r['model_sha256'])[:12]}`",
            fmt.count(r["sequences_seen"]),
        ]
        for r in ckpts.iter_rows(named=True)
    ]
    identity = (
        "each pinned to the commit its revision resolved to (checked against the manifest, weights by sha256)"
        if pinned
        else "each identified by the sha256 of its weights"
    )
    return pipe_table(
        ["Revision", "Commit" if pinned else "Weights (sha256)", "Sequences seen"],
        rows,
        f"The checkpoints probed, {identity}, and how many training sequences each has been trained on.",
        "tbl-checkpoints",
        "llr",
        [3, 4, 3],
    )


def tracing(study: Study) -> str:
    """Every method under each truth definition: a heading row per definition, then its methods
    (a column for the definition left too little width for the intervals on an A4 page)."""
    tm = study.frame(paths.TRACING_METRICS_TABLE).filter(pl.col("family") == "all")
    prov = study.provenance(paths.TRACING_METRICS_TABLE)
    level = derive.interval_level(prov.get("bootstrap", ""), "tracing_metrics")
    columns = ("mrr", "recall_at_10", "precision_at_10", "top1_hit")
    rows = []
    for truth in derive.TRUTH_ORDER:
        group = []
        for m in derive.ordered_methods(tm["method"].unique()):
            sub = tm.filter((pl.col("method") == m) & (pl.col("truth") == truth))
            if sub.is_empty():
                continue
            r = sub.row(0, named=True)
            group.append(
                [style.method_label(m), str(r["n_behaviors"])]
                + [f"{fmt.dec(r[c])} {fmt.interval(r[c + '_lo'], r[c + '_hi'])}" for c in columns]
            )
        if group:
            rows.append([f"*{truth.capitalize()} truth*"] + [""] * (len(columns) + 1))
            rows.extend(group)
    k = study.config(paths.TRACING_METRICS_TABLE, "attribute")["top_k"]
    return pipe_table(
        ["Method", "n", "MRR", "Recall@10", "Precision@10", "Top-1 is ground truth"],
        rows,
        f"Ground-truth tracing over the n attributed behaviors with a source under each truth "
        f"definition (top {k} of every method), with {level} percentile-bootstrap intervals over "
        f"behaviors. Partial: the sources of a behavior are every packed training sequence touching "
        f"a document that states its item, however small the fragment. Complete: only those holding "
        f"the whole item (the statement, or all of a canary's tokens). Target: the partial ones that "
        f"also hold the behavior's target tokens verbatim.",
        "tbl-tracing",
        "lrrrrr",
        [4, 1, 4, 4, 4, 4],
    )


def surprise(study: Study) -> str:
    case = derive.surprising_case(study)
    if case is None:  # still a table, so that the manuscript's reference to it resolves
        return pipe_table(
            ["Surprising case"],
            [["none: every top-ranked gradient-method result overlaps its query"]],
            "No retrieved sequence met the rule for a surprising case.",
            "tbl-surprise",
            "l",
        )
    probe = derive.final_probes(study).filter(pl.col("behavior_id") == case["behavior_id"]).row(0, named=True)
    text = derive.per_packed(study, "text")[case["packed_id"]]
    sources = ", ".join(sorted(set(derive.per_packed(study, "sources")[case["packed_id"]])))
    rows = [
        ["Behavior", f"{escape(case['behavior_id'])} ({style.family_label(case['family'])})"],
        ["Prompt → target", escape(probe["prompt"]) + " → " + escape(probe["target"])],
        ["Model's completion", escape(probe["completion"])],
        ["Method, rank", f"{style.method_label(case['method'])}, rank {case['rank']}"],
        ["Retrieved sequence", f"packed sequence {case['packed_id']} (sources: {escape(sources)})"],
        ["Retrieved text", escape(text, 400)],
        [
            "TF-IDF cosine / MinHash Jaccard",
            f"{fmt.dec(case['tfidf_cosine'], 2)} / {fmt.dec(case['minhash_jaccard'], 2)}",
        ],
        ["Longest common run (tokens)", str(case["longest_run"])],
    ]
    return pipe_table(
        ["", ""],
        rows,
        "The automatically chosen surprising case: a top-ranked gradient-method result with the least "
        "lexical overlap with its query, outside the behavior's ground truth.",
        "tbl-surprise",
        "ll",
        [2, 7],
    )


def top_examples(study: Study, per_behavior: int = 2, method: str = "trackstar") -> str:
    dup = derive.attributed(study)
    methods = set(dup["method"].unique().to_list())
    if method not in methods:
        method = derive.ordered_methods(methods)[0]
    final = derive.final_checkpoint(study)
    probes = derive.final_probes(study)
    prompts = {
        r["behavior_id"]: r for r in probes.select("behavior_id", "prompt", "target").iter_rows(named=True)
    }
    texts = derive.per_packed(study, "text")
    top = dup.filter((pl.col("method") == method) & (pl.col("rank") <= per_behavior)).sort(
        "family", "behavior_id", "rank"
    )
    rows = []
    for r in top.iter_rows(named=True):
        p = prompts[r["behavior_id"]]
        first = r["rank"] == 1
        rows.append(
            [
                escape(p["prompt"] + " → " + p["target"], 60) if first else "",
                str(r["rank"]),
                escape(texts[r["packed_id"]], 90),
                style.category_label(r["category"]) + (" (truth)" if r["in_ground_truth"] else ""),
            ]
        )
    return pipe_table(
        ["Behavior (prompt → target)", "Rank", "Retrieved training sequence (start)", "Category"],
        rows,
        f"Top {per_behavior} training sequences retrieved by {style.method_label(method)} for every "
        f'attributed behavior at step {final}; "(truth)" marks a ground-truth sequence.',
        "tbl-top-examples",
        "lrll",
        [4, 1, 9, 3],
    )


def run_label(method: str) -> str:
    """A causal table's row label: the method's, or "Complete copies" for the reference row."""
    return style.method_label(method) if method != REFERENCE else "Complete copies"


def finetune(study: Study) -> str:
    """Select-and-fine-tune: per family and method, the change of the targets on each prompt kind.
    The reference row, the copies column and the paraphrases appear where the world has them (the
    Pile has no planted items: no complete copies to select or count, no paraphrases)."""
    fm = study.frame(paths.FINETUNE_METRICS_TABLE)
    if fm.is_empty():
        return pipe_table(
            ["Select and fine-tune"],
            [["no family had a behavior in its evaluation set"]],
            "Select and fine-tune: nothing was fine-tuned for this build.",
            "tbl-finetune",
            "l",
        )
    prov = study.provenance(paths.FINETUNE_METRICS_TABLE)
    cfg = prov["config"]["causal"]
    level = derive.interval_level(prov.get("bootstrap", ""), "select_finetune_metrics")
    kinds = [k for k in ("original", "paraphrase") if k in set(fm["prompt_kind"])]
    copies = fm["n_selected_truth"].null_count() < fm.height
    rows = []
    for family in [f for f in style.FAMILIES if f in set(fm["family"])]:
        sub = fm.filter(pl.col("family") == family)
        methods = derive.ordered_methods([m for m in sub["method"].unique() if m != REFERENCE])
        runs = [*methods, REFERENCE] if REFERENCE in set(sub["method"]) else methods
        for i, m in enumerate(runs):
            cells = []
            for kind in kinds:
                r = sub.filter((pl.col("method") == m) & (pl.col("prompt_kind") == kind))
                if r.is_empty():
                    cells += ["n/a", "n/a"]
                    continue
                r = r.row(0, named=True)
                ci = fmt.interval(r["delta_logp_lo"], r["delta_logp_hi"], 2)
                cells += [
                    f"{fmt.dec(r['delta_logp'], 2)} {ci}",
                    f"{fmt.pct(r['exhibited_before'])} → {fmt.pct(r['exhibited_after'])}",
                ]
            first = sub.filter(pl.col("method") == m).row(0, named=True)
            label = f"{style.family_label(family)} (n = {first['n_behaviors']}, step {first['from_step']})"
            counted = [f"{first['n_selected_truth']}/{first['n_selected']}"] if copies else []
            rows.append([label if i == 0 else "", run_label(m), *counted, *cells])
    # one prompt kind leaves the page wide enough for the method's name on one line
    label_widths, kind_widths = ([3, 3], [6, 4]) if len(kinds) > 1 else ([4, 5], [3, 2])
    header = ["Evaluation set", "Selection", *(["Copies"] if copies else [])]
    for kind in kinds:
        header += [f"Δ log p, {kind}", "Exhibited"]
    chosen = (
        f"items stated at least {cfg['finetune_min_count']} times"
        if cfg.get("finetune_set", "stated") == "stated"
        else "behaviors exhibited at the final checkpoint"
    )
    prompts = (
        "on the probe's prompts and on paraphrases the corpus never states"
        if "paraphrase" in kinds
        else "on the probe's prompts"
    )
    return pipe_table(
        header,
        rows,
        f"Select and fine-tune: each method's top {cfg['finetune_k']} training sequences for a family's "
        f"evaluation set ({chosen}), the early checkpoint "
        f"fine-tuned on them ({cfg['finetune_steps']} AdamW steps of {cfg['finetune_batch']} sequences, "
        f"learning rate {cfg['finetune_lr']}); the change in the targets' log-probability ({level} "
        f"percentile-bootstrap intervals over behaviors) and the share exhibited before → after, {prompts}."
        + (
            " Copies: how many of the selection hold a complete copy of one of the set's items."
            if copies
            else ""
        ),
        "tbl-finetune",
        "ll" + ("l" if copies else "") + "rl" * len(kinds),
        [*label_widths, *([2] if copies else []), *kind_widths * len(kinds)],
    )


def leave_out(study: Study) -> str:
    """Leave-k-out retraining: per run, the change of the sampled behaviors' targets."""
    if not study.has(paths.LEAVE_OUT_METRICS_TABLE):
        return pipe_table(
            ["Leave-k-out retraining"],
            [["not run for this build: `nox -s leave_out` (outside `all`)"]],
            "Leave-k-out retraining was not run for this build.",
            "tbl-leave-out",
            "l",
        )
    lm = study.frame(paths.LEAVE_OUT_METRICS_TABLE)
    runs = {r["run"]: r for r in study.frame(paths.LEAVE_OUT_RUNS_TABLE).iter_rows(named=True)}
    prov = study.provenance(paths.LEAVE_OUT_METRICS_TABLE)
    cfg = prov["config"]["leave_out"]
    level = derive.interval_level(prov.get("bootstrap", ""), "leave_out_metrics")
    lo_rows = study.frame(paths.LEAVE_OUT_TABLE)
    everything = lm.filter(pl.col("family") == "all")
    draws = [run for run, r in runs.items() if r["floor"] and run != "random"]  # the floor's further draws
    shown = [m for m in everything["run"] if m != REFERENCE and m not in draws]
    order = [*derive.ordered_methods(shown), REFERENCE]
    n_floor = sum(r["floor"] for r in runs.values())
    rows = []
    for run in [m for m in order if m in runs]:
        r = everything.filter(pl.col("run") == run).row(0, named=True)
        vs = (
            "" if run == "random" or r["vs_random"] != r["vs_random"]
            else f"{fmt.dec(r['vs_random'], 2)} {fmt.interval(r['vs_random_lo'], r['vs_random_hi'], 2)}"
        )  # fmt: skip
        if run == "random":
            among = f"{fmt.dec(r['random_min'], 2)} to {fmt.dec(r['random_max'], 2)}" if draws else ""
        else:
            among = f"{r['random_costlier_than']} of {r['random_runs']}" if r["random_runs"] else ""
        cells = [
            run_label(run),
            f"{runs[run]['n_removed']} ({runs[run]['n_rows_removed']})",
            f"{fmt.dec(r['delta_logp'], 2)} {fmt.interval(r['delta_logp_lo'], r['delta_logp_hi'], 2)}",
            fmt.dec(lo_rows.filter(pl.col("run") == run)["delta_logp"].median(), 2),
            vs,
            among,
            fmt.pct(r["lost"]),
        ]
        rows.append(cells)
    n = everything["n_behaviors"][0]
    floor = (
        f"Random draws: of the {n_floor} random removals (the random method's top {cfg['top_k']} and "
        f"{len(draws)} further seeded draw{'s' if len(draws) > 1 else ''} of as many random sequences per "
        "behavior), how many cost the behaviors less than this removal (a higher mean change); in the "
        "random row, the least and the largest of the draws' mean changes."
        if draws
        else "Random draws: 1 of 1 where this removal cost the behaviors more than the random removal."
        if n_floor
        else ""
    )
    return pipe_table(
        [
            "Removed",
            "Sequences (rows)",
            "Δ log p",
            "Median",
            "Beyond random",
            "Random draws",
            "Lost",
        ],
        rows,
        f"Leave-k-out retraining: for {n} sampled behaviors, each method's top {cfg['top_k']} per behavior "
        "removed together (zero loss weight, every epoch) and the model retrained from its initialization "
        "on the same batches; the change in the behaviors' target log-probability at the final step against "
        f"the training run ({level} percentile-bootstrap intervals over behaviors), paired against the "
        "random removal, and the share of exhibited behaviors no longer exhibited (teacher-forced argmax). "
        "Sequences: packed sequences removed (training rows, every epoch's copy). Median: of the change. "
        + floor,
        "tbl-leave-out",
        "lrrrrrr",
        [3, 2, 4, 1, 4, 2, 1],
    )


VARIANT_ORDER = ("original", "swapped", "no_prompt", "entity_replaced", "unrelated")


def word_order(study: Study) -> str:
    """Each variant's score of the item's own sequences relative to the original query, per method."""
    wm = study.frame(paths.WORD_ORDER_METRICS_TABLE)
    examples = study.frame(paths.WORD_ORDER_TABLE).sort("item_id")
    prov = study.provenance(paths.WORD_ORDER_METRICS_TABLE)
    level = derive.interval_level(prov.get("bootstrap", ""), "word_order_metrics")
    methods = derive.ordered_methods(wm["method"].unique())
    rows = []
    for kind in sorted(wm["kind"].unique()):
        sub = wm.filter(pl.col("kind") == kind)
        variants = [x for x in VARIANT_ORDER if x in set(sub["variant"])]
        for variant in variants:
            first = examples.filter((pl.col("kind") == kind) & (pl.col("variant") == variant)).row(
                0, named=True
            )
            query = f"{escape(first['prompt']) or '(none)'} → {escape(first['target'])}"
            for i, m in enumerate(methods):
                r = sub.filter((pl.col("variant") == variant) & (pl.col("method") == m)).row(0, named=True)
                rows.append(
                    [
                        f"{kind} ({sub['order'][0]}, {sub['n_items'][0]})"
                        if variant == variants[0] and i == 0
                        else "",
                        f"{variant.replace('_', ' ')}: {query}" if i == 0 else "",
                        style.method_label(m),
                        f"{fmt.dec(r['relative'], 2)} {fmt.interval(r['relative_lo'], r['relative_hi'], 2)}",
                        fmt.dec(r["mrr"]),
                    ]
                )
    header = ["Items (order, n)", "Variant: query of the first item", "Method", "Relative score", "MRR"]
    return pipe_table(
        header,
        rows,
        "Word order: the mean score of an item's own complete ground-truth sequences under each query "
        f"variant over items, relative to the same under the original query ({level} paired "
        "percentile-bootstrap intervals over items), and their MRR among every training sequence. "
        '"single": every statement names the subject first; "mixed": one template in four does not. '
        "No prompt: the completion alone; entity replaced: another item's completion.",
        "tbl-word-order",
        "lllrr",
        [2, 6, 4, 4, 2],
    )


log = logging.getLogger(__name__)

TABLES = {
    "corpus": corpus,
    "checkpoints": checkpoints,
    "behaviors": behaviors,
    "tracing": tracing,
    "causal": causal,
    "finetune": finetune,
    "leave-out": leave_out,
    "word-order": word_order,
    "surprise": surprise,
    "top-examples": top_examples,
}


def write_all(study: Study, folder: Path, names: list[str] | None = None) -> list[Path]:
    """Write every table (or those of ``names``) into ``folder`` as ``<name>.md``."""
    written = []
    for name, make in TABLES.items():
        if names is not None and name not in names:
            continue
        out = folder / f"{name}.md"
        try:
            text = make(study)
        except DATA_ABSENT as exc:
            log.warning("paper: table '%s' has no data in this profile (%s)", name, exc)
            text = pipe_table(
                ["No data"],
                [["this profile's tables hold nothing for this table"]],
                f"No data for this table in this profile ({name}).",
                f"tbl-{name}",
                "l",
            )
        out.write_text(text)
        written.append(out)
    return written
