"""Every number the manuscript's prose quotes, computed from the tables (``_variables.yml``).

Keys are grouped by section; the manuscript writes ``{{< var tracing.trackstar.mrr >}}``. Values
are strings formatted by ``fmt`` so the prose, tables and captions print a number the same way.
The causal checks' sections are computed in ``causal_variables``, memorization's in
``memorization_variables`` and ``pythia.qmd``'s own in ``pile_world``; this module puts them together.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import polars as pl

from pythia_attribution import paths
from pythia_attribution.paper import causal_variables, derive, fmt, memorization_variables, pile_world, style
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
        v["causal"] = causal_variables.tail_patch_variables(study)

    with _section(v, "noadam"):
        shared = {
            m: derive.topk_shared(study, m, "trackstar", 10) for m in ("trackstar_noadam", "trackstar_est")
        }
        v["noadam"] = {"sentence": causal_variables.noadam_sentence(v, shared)}

    with _section(v, "ekfac"):
        v["ekfac"] = {"sentence": causal_variables.ekfac_sentence(v)}

    with _section(v, "activation_space"):
        v["activation_space"] = {"sentence": causal_variables.activation_space_sentence(v)}

    with _section(v, "leave_out"):
        v["leave_out"] = causal_variables.leave_out_variables(study, v.get("causal", {}))

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
        v["finetune"] = causal_variables.finetune_variables(study)

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
        v["memorization"] = memorization_variables.compute(study, final)

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


def _passes_half(step, what: str) -> str:
    """'pass half recalled at step 400', or 'never pass half recalled' (nothing reached it)."""
    return f"never pass half {what}" if step is None else f"pass half {what} at step {int(step):,}"


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


def methods_sentence(methods: list[str]) -> str:
    """The attributed methods (``random``, the floor, aside) in the manuscript's method order."""
    return fmt.listing(style.method_name(m) for m in style.METHODS if m in methods and m != "random")
