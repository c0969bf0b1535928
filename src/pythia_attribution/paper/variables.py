"""Every number the manuscript's prose quotes, computed from the tables (``_variables.yml``).

Keys are grouped by section; the manuscript writes ``{{< var tracing.trackstar.mrr >}}``. Values
are strings formatted by ``fmt`` so the prose, tables and captions print a number the same way.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import polars as pl

from pythia_attribution import paths
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.paper import derive, fmt, pile_world, style
from pythia_attribution.paper.data import Study

log = logging.getLogger(__name__)

FEW_DOCUMENTS = 4  # "a few times": a fact stated in at most this many documents

# What a section's computation raises when a profile's tables lack what the section describes
# (micro-Pile's synthetic items, a training log): at real scale there are no canaries and no
# ground truth, and Hub checkpoints come without a training log.
DATA_ABSENT = (
    IndexError,
    KeyError,
    ValueError,
    ZeroDivisionError,
    NameError,
    StopIteration,
    pl.exceptions.PolarsError,
)


@contextmanager
def _section(v: dict, name: str):
    """Compute one section of variables; if the tables lack its data, record it as unavailable
    (its variables then read "n/a") instead of failing the whole build."""
    try:
        yield
    except DATA_ABSENT as exc:
        v.pop(name, None)
        v.setdefault("unavailable", {})[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        # said once the manuscript is known (build.fill_unavailable): a section another world's
        # manuscript quotes is expected to be absent here
        log.debug("paper: no data for section '%s' in this profile (%s)", name, v["unavailable"][name])


def model_parameters(train: dict, vocab: int) -> int:
    """Parameters of the GPT-NeoX model the train stage builds (untied embeddings, biases, 4x MLP)."""
    h, layers = train["hidden"], train["layers"]
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 4 * h
    return 2 * vocab * h + layers * per_layer + 2 * h


def compute(study: Study, build: dict) -> dict:
    """The nested variables mapping; ``build`` holds profile, commit and date of this build."""
    v: dict = {"build": build}
    final = derive.final_checkpoint(study)
    corpus_prov = study.provenance(paths.CORPUS_TABLE)
    corpus_cfg = corpus_prov["config"]["corpus"]
    summary = corpus_prov["summary"]
    train_cfg = study.config(paths.CHECKPOINTS_TABLE, "train")
    ckpts = study.frame(paths.CHECKPOINTS_TABLE)
    log = study.frame(paths.TRAINING_LOG_TABLE)
    versions = study.provenance(paths.CHECKPOINTS_TABLE).get("versions", {})

    with _section(v, "tables"):
        v["tables"] = {
            "commits": fmt.listing(
                f"{commit[:10]} ({', '.join(stages)})"
                for commit, stages in _by_commit(study.commits()).items()
            ),
            "torch": versions.get("torch", "unknown"),
            "transformers": versions.get("transformers", "unknown"),
            "bergson": versions.get("bergson", "unknown"),
        }
    with _section(v, "model"):
        v["model"] = {
            "layers": str(train_cfg["layers"]),
            "hidden": str(train_cfg["hidden"]),
            "heads": str(train_cfg["heads"]),
            "params": fmt.millions(model_parameters(train_cfg, corpus_cfg["vocab_size"])),
            "rotary": fmt.pct(train_cfg["rotary_pct"]),
            "lr": f"{train_cfg['lr']:g}",
            "steps": fmt.count(final),
            "n_checkpoints": str(ckpts.height),
            "final_loss": fmt.dec(log.filter(pl.col("step") == pl.col("step").max())["loss"][0], 2),
            "tokens_seen": fmt.millions(int(ckpts["tokens_seen"].max())),
        }
    with _section(v, "corpus"):
        docs = study.frame(paths.DOCUMENTS_TABLE, ("source", "n_tokens"))
        synthetic_tokens = docs.filter(pl.col("source").str.starts_with("synthetic"))["n_tokens"].sum()
        syn = corpus_cfg["synthetic"]
        v["corpus"] = {
            "tokens": fmt.count(summary["n_tokens"]),
            "documents": fmt.count(summary["n_documents"]),
            "packed": fmt.count(summary["n_packed"]),
            "seq_len": str(summary["seq_len"]),
            "batch": str(summary["batch_size"]),
            "epochs": str(summary["epochs"]),
            "vocab": fmt.count(corpus_cfg["vocab_size"]),
            "synthetic_share": fmt.pct(synthetic_tokens / docs["n_tokens"].sum()),
            "n_natural_sources": str(len(corpus_cfg["natural_sources"])),
            "canary_counts": fmt.listing(syn["canary_counts"]),
            "canaries_per_count": str(syn["canaries_per_count"]),
            "canary_min_tokens": str(syn["canary_min_tokens"]),
            "capital_counts": fmt.listing(syn["capital_counts"]),
            "countries_per_count": str(syn["countries_per_count"]),
            "bio_counts": fmt.listing(syn["bio_counts"]),
            "insult_counts": fmt.listing(syn["insult_counts"]),
            "stereotype_word": syn["stereotype_word"],
            "stereotype_majority": syn["stereotype_majority"],
            "stereotype_minority": syn["stereotype_minority"],
            "stereotype_skew": fmt.pct(syn["stereotype_skew"]),
            "stereotype_mentions": str(syn["stereotype_mentions"]),
        }

    with _section(v, "probe"):
        probes = derive.final_probes(study)
        probe_cfg = study.config(paths.PROBES_TABLE, "probe")
        curves = derive.learning_curves(study)
        top_capital = max(syn["capital_counts"])
        top_canary = max(syn["canary_counts"])
        cap = curves.filter(pl.col("checkpoint") == final)
        cap_top = cap.filter((pl.col("family") == "factual") & (pl.col("count") == top_capital)).row(
            0, named=True
        )
        cap_zero = cap.filter((pl.col("family") == "factual") & (pl.col("count") == 0)).row(0, named=True)
        # facts stated a few times (1 to FEW_DOCUMENTS documents): capitals and biographies together
        few = cap.filter(
            pl.col("family").is_in(["factual", "fictional_fact"])
            & pl.col("count").is_between(1, FEW_DOCUMENTS)
        )
        v["probe"] = {
            "n_behaviors": str(probes["behavior_id"].n_unique()),
            "n_families": str(probes["family"].n_unique()),
            "n_exhibited": str(int(probes["exhibited"].sum())),
            "min_new_tokens": str(probe_cfg["min_new_tokens"]),
            "capital_top_count": str(top_capital),
            "capital_top": fmt.ratio(cap_top["n_exhibited"], cap_top["n"]),
            "capital_zero": fmt.ratio(cap_zero["n_exhibited"], cap_zero["n"]),
            "few": (
                f"Facts stated in {fmt.listing(sorted(few['count'].unique().to_list()), 'or')} documents are "
                f"recalled for {fmt.ratio(few['n_exhibited'].sum(), few['n'].sum())} of them at the final "
                "checkpoint (capitals and fictional biographies together)."
                if few.height
                else f"No fact is stated in 1 to {FEW_DOCUMENTS} documents in this profile."
            ),
            "capital_top_half": _passes_half(
                derive.first_step_reaching(curves, "factual", top_capital, 0.5), "recalled"
            ),
            "canary_top_count": str(top_canary),
            "canary_top_half": _passes_half(
                derive.first_step_reaching(curves, "memorized", top_canary, 0.5), "memorized"
            ),
            "disagreements": str(study.provenance(paths.PROBES_TABLE).get("disagreements", "n/a")),
        }

    with _section(v, "attribute"):
        att_cfg = study.config(paths.TRACING_METRICS_TABLE, "attribute")
        att_prov = study.provenance(paths.TRACING_METRICS_TABLE)
        attributions = study.frame(paths.ATTRIBUTIONS_TABLE, ("behavior_id", "method"))
        v["attribute"] = {
            "n_behaviors": str(attributions["behavior_id"].n_unique()),
            "top_k": str(att_cfg["top_k"]),
            "projection_dim": str(att_cfg["projection_dim"]),
            "moment_batches": str(att_cfg.get("moment_batches", "n/a")),
            "n_boot": fmt.count(att_cfg["bootstrap"]),
            "ci_level": derive.interval_level(att_prov.get("bootstrap", ""), "tracing_metrics"),
            "n_candidates": fmt.count(summary["n_packed"]),
            "methods": methods_sentence(attributions["method"].unique().to_list()),
        }
    with _section(v, "tracing"):
        # "tracing" under the partial truth definition (the study's first), "tracing_complete"
        # and "tracing_target" under the others; the manuscript names the definition with every number
        tm_all = study.frame(paths.TRACING_METRICS_TABLE).filter(pl.col("family") == "all")
        keys = {"partial": "tracing", "complete": "tracing_complete", "target": "tracing_target"}
        for truth, key in keys.items():
            tm = tm_all.filter(pl.col("truth") == truth)
            tracing: dict = {}
            est = {}
            for row in tm.iter_rows(named=True):
                m = row["method"]
                est[m] = (row["mrr"], row["mrr_lo"], row["mrr_hi"])
                tracing[m] = {
                    "mrr": fmt.dec(row["mrr"]),
                    "mrr_ci": fmt.interval(row["mrr_lo"], row["mrr_hi"]),
                    "recall10": fmt.dec(row["recall_at_10"]),
                    "recall10_ci": fmt.interval(row["recall_at_10_lo"], row["recall_at_10_hi"]),
                    "top1": fmt.pct(row["top1_hit"]),
                    "n": str(row["n_behaviors"]),
                }
            pairs = [("trackstar", "bm25"), ("grad_cosine", "bm25"), ("trackstar", "grad_cosine")]
            pairs += [("trackstar_noadam", "trackstar"), ("trackstar_est", "trackstar")]
            pairs += [("ekfac", "trackstar"), ("ekfac", "bm25")]
            pairs += [("residual_diff", "activation"), ("residual_diff", "trackstar")]
            pairs += [("residual_change", "grad_cosine"), ("residual_change", "trackstar")]
            for a, b in pairs:
                if a in est and b in est:
                    tracing[f"{a}_vs_{b}"] = fmt.compare(est[a], est[b])
            v[key] = tracing

    with _section(v, "canary"):
        # canaries: tracing of copies injected at least as often as the smallest count that is fully
        # learned; "top-1 is a source" under each truth definition
        tr = study.frame(paths.TRACING_TABLE).filter(pl.col("family") == "memorized")
        threshold = derive.canary_learned_from(study)
        canary = {"learned_from": str(threshold) if threshold is not None else "n/a"}
        methods = tm_all["method"].unique().to_list()
        canary |= {m: "0/0" for m in methods}
        canary |= {truth: {m: "0/0" for m in methods} for truth in ("complete", "target")}
        if threshold is not None:
            learned = tr.filter(pl.col("count") >= threshold)
            into_of = {"partial": canary, "complete": canary["complete"], "target": canary["target"]}
            for truth, into in into_of.items():
                for m, g in learned.filter(pl.col("truth") == truth).group_by("method"):
                    into[m[0]] = fmt.ratio(g["top1_hit"].sum(), g.height)
        v["canary"] = canary

    with _section(v, "causal"):
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
        v["causal"] = causal

    with _section(v, "noadam"):
        shared = {
            m: derive.topk_shared(study, m, "trackstar", 10) for m in ("trackstar_noadam", "trackstar_est")
        }
        v["noadam"] = {"sentence": noadam_sentence(v, shared)}

    with _section(v, "ekfac"):
        v["ekfac"] = {"sentence": ekfac_sentence(v)}

    with _section(v, "activation_space"):
        v["activation_space"] = {"sentence": activation_space_sentence(v)}

    with _section(v, "leave_out"):
        v["leave_out"] = leave_out_variables(study, v.get("causal", {}))

    with _section(v, "composition"):
        comp = derive.pooled_composition(study)
        v["composition"] = {
            m[0]: {row["category"]: fmt.pct(row["share"]) for row in g.iter_rows(named=True)}
            for m, g in comp.group_by("method")
        }
    with _section(v, "duplicates"):
        dup_cfg = study.config(paths.DUPLICATES_TABLE, "duplicates")
        v["duplicates"] = {
            "exact_window": str(dup_cfg["exact_window"]),
            "substring_run": str(dup_cfg["substring_run"]),
            "near_jaccard": fmt.dec(dup_cfg["near_jaccard"], 2),
            "ngram": str(dup_cfg["ngram"]),
            "thematic_tfidf": fmt.dec(dup_cfg["thematic_tfidf"], 2),
        }

    with _section(v, "layers"):
        layers = derive.layer_shares(study)
        v["layers"] = {"n": str(train_cfg["layers"])}
        for m, g in layers.group_by("method"):
            top = g.sort("share", descending=True).row(0, named=True)
            bottom = g.sort("share").row(0, named=True)
            v["layers"][m[0]] = {
                "top_layer": str(top["layer"]),
                "top_share": fmt.pct(top["share"]),
                "bottom_layer": str(bottom["layer"]),
                "bottom_share": fmt.pct(bottom["share"]),
            }

    with _section(v, "finetune"):
        v["finetune"] = finetune_variables(study)

    with _section(v, "analyses"):
        v["analyses"] = analyses_variables(study)

    with _section(v, "concentration"):
        ss = study.frame(paths.SCORE_SUMMARY_TABLE)
        v["concentration"] = {"top_level": derive.share_level("top1pct_share")}
        v["concentration"] |= {
            m[0]: {
                "top1pct": fmt.pct(g["top1pct_share"].median()),
                "top10pct": fmt.pct(g["top10pct_share"].median()),
                "tail": fmt.dec(g["tail_exponent"].median(), 1),
            }
            for m, g in ss.group_by("method")
        }

    with _section(v, "surprise"):
        case = derive.surprising_case(study)
        v["surprise"] = (
            {
                "found": "yes",
                "method": style.method_name(case["method"]),
                "behavior": case["behavior_id"],
                "rank": str(case["rank"]),
                "tfidf": fmt.dec(case["tfidf_cosine"], 2),
                "jaccard": fmt.dec(case["minhash_jaccard"], 2),
                "max_rank": str(case["max_rank"]),
                "tail_patch": _surprise_tail_patch(study, case),
            }
            if case
            else {"found": "no"}
            | dict.fromkeys(
                ("method", "behavior", "rank", "tfidf", "jaccard", "max_rank", "tail_patch"), "n/a"
            )
        )

    with _section(v, "memorization"):
        v["memorization"] = _memorization(study, final)

    if pile_world.is_pile_world(study):  # pythia.qmd's own section
        with _section(v, "world"):
            v["world"] = pile_world.world_variables(study, final)
        with _section(v, "where"):
            v["where"] = pile_world.where_variables(study)
    return v


def _surprise_tail_patch(study: Study, case: dict) -> str:
    """A sentence on the surprising sequence's own tail-patch effect, when the causal stage stepped on it."""
    tp = study.frame(paths.TAIL_PATCH_TABLE).filter(
        (pl.col("method") == case["method"])
        & (pl.col("behavior_id") == case["behavior_id"])
        & (pl.col("packed_id") == case["packed_id"])
    )
    if tp.is_empty():
        return "It lies outside the top k that tail-patch steps on (@sec-causal)."
    effect = tp["effect"][0]
    behavior = study.frame(paths.TAIL_PATCH_TABLE).filter(pl.col("behavior_id") == case["behavior_id"])
    random = behavior.filter(pl.col("method") == "random")["effect"]
    top = behavior.filter(pl.col("method") == case["method"])["effect"]
    floor = f" against {fmt.sci(random.mean())} for random sequences" if len(random) else ""
    others = (
        f" and {fmt.sci(top.mean())} for {style.method_name(case['method'])}'s top {len(top)} on average"
        if len(top) > 1
        else ""
    )
    return (
        f"A tail-patch step on it changes the target's log-probability by {fmt.sci(effect)}{floor}"
        f"{others}, on the same behavior (@sec-causal)."
    )


def _memorization(study: Study, final: int) -> dict:
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


def _passes_half(step, what: str) -> str:
    """'pass half recalled at step 400', or 'never pass half recalled' (nothing reached it)."""
    return f"never pass half {what}" if step is None else f"pass half {what} at step {int(step):,}"


def _step(step) -> str:
    return "never" if step is None else f"step {int(step):,}"


def _by_commit(commits: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for stage in (*paths.STAGES, *paths.OPTIONAL_STAGES):
        if stage in commits:
            out.setdefault(commits[stage], []).append(stage)
    return out


def flatten(v: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": "1"}}`` -> ``{"a.b": "1"}`` (how ``{{< var a.b >}}`` looks a value up)."""
    out = {}
    for key, value in v.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


KIND_LABELS = {"insult": "the insults", "bio": "the biographies"}


def analyses_variables(study: Study) -> dict:
    """Tokenwise shares, layer-third composition and word-order ratios (TrackStar unless named)."""
    cfg = study.config(paths.TOKENWISE_TABLE, "analyses")
    out: dict = {
        "tokenwise_top": str(cfg["tokenwise_top"]),
        "layer_top_k": str(cfg["layer_top_k"]),
        "query_run": str(study.provenance(paths.TOKENWISE_TABLE)["query_run"]),
    }
    for row in derive.query_run_shares(study).iter_rows(named=True):
        out[row["method"]] = {
            "query_positions": fmt.pct(row["positions"]),
            "query_share": fmt.pct(row["share"]),
            "n_sequences": str(row["n_sequences"]),
        }
    ts = out.get("trackstar")
    shares = derive.query_run_shares(study).filter(pl.col("method") == "trackstar")
    if ts and shares.height:
        share, positions = shares["share"][0], shares["positions"][0]
        out["query_verdict"] = (
            "the score sits on the text that repeats the query far more than on its surroundings"
            if share > 0.5 and share >= 2 * positions
            else "the score is not concentrated on the text that repeats the query"
        )
    example = derive.tokenwise_example(study)
    out["example"] = {"behavior": example["behavior_id"][0] if example.height else "n/a"}

    thirds = study.frame(paths.LAYER_THIRDS_SUMMARY_TABLE).filter(
        (pl.col("family") == "all") & (pl.col("method") == "trackstar")
    )
    by_third = {r["third"]: r for r in thirds.iter_rows(named=True)}
    parts = [t for t in ("lower", "middle", "upper") if t in by_third]
    out["thirds"] = {t: fmt.pct(by_third[t]["thematic"]) for t in [*parts, "all"]}
    out["thirds_gt"] = {t: fmt.pct(by_third[t]["ground_truth_share"]) for t in [*parts, "all"]}
    out["thirds"]["most_thematic"] = max(parts, key=lambda t: by_third[t]["thematic"])
    best = max(parts, key=lambda t: by_third[t]["ground_truth_share"])
    if by_third[best]["ground_truth_share"] < by_third["all"]["ground_truth_share"]:
        out["thirds"]["gt_sentence"] = "no third alone retrieves as many of them as the whole network does"
    else:
        out["thirds"]["gt_sentence"] = (
            f"the {best} third alone retrieves as many of them as the whole network"
        )

    word = study.frame(paths.WORD_ORDER_METRICS_TABLE).filter(pl.col("method") == "trackstar")
    out["word"] = {}
    collapsed, kept = [], []
    for row in word.sort(["kind", "variant"]).iter_rows(named=True):
        out["word"].setdefault(row["kind"], {})[row["variant"]] = (
            f"{fmt.dec(row['relative'], 2)} {fmt.interval(row['relative_lo'], row['relative_hi'], 2)}"
        )
        if row["variant"] == "swapped":
            (collapsed if row["relative_hi"] < 0.5 else kept).append(
                KIND_LABELS.get(row["kind"], row["kind"])
            )
    sentence = []
    if collapsed:
        sentence.append(
            f"holds for {fmt.listing(collapsed)}, whose swapped query keeps less than half of the original's "
            "score even at the upper end of its interval"
        )
    if kept:
        sentence.append(f"{'but ' if collapsed else ''}does not hold for {fmt.listing(kept)}")
    out["word"]["collapse"] = (", ".join(sentence) or "cannot be tested here") + "."
    return out


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


def methods_sentence(methods: list[str]) -> str:
    """The attributed methods (``random``, the floor, aside) in the manuscript's method order."""
    return fmt.listing(style.method_name(m) for m in style.METHODS if m in methods and m != "random")


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
