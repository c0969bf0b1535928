"""Analyses stage: *where* influence sits, after Grosse et al. (2023). Three analyses of the
gradient methods' attributions at the final checkpoint:

- **Tokenwise**: each of a method's top few sequences' score split over its tokens. bergson's
  per-token gradients (``attribute_tokens``) give one row per input position ``t``, the layer
  gradients formed from position ``t``'s activation and output gradient (the output gradient
  carries the losses of ``t``'s own prediction and, through attention, of later ones); they sum to
  the sequence's gradient. Every step of the scoring is linear in the row except the division by
  the row's norm, so each position is scored with the whole sequence's norm and the positions'
  scores sum to the sequence's score (a test checks it against ``attributions.arrow``). Position
  ``t`` is credited to input token ``t``; the sequence's last token has no position of its own.
- **Layer thirds**: the network's layers split into lower, middle and upper thirds
  (``numpy.array_split`` of the layer indices; under three layers, of the modules), and every
  candidate re-ranked by the sum of its per-module scores over one third: the layerwise
  decomposition of the score, as in the study (each module's score keeps the whole row's
  normalization, so the thirds sum to the score).
  Each third's top k is classified like the duplicates stage's, and traced against the
  ground truth under each truth definition.
- **Word order**: query variants of synthetic items (``analyses.word_order_file``: the original,
  prompt and completion swapped, the completion alone, the completion's entity replaced, an
  unrelated query), each scored against the item's own complete ground-truth sequences.
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import asdict

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pythia_attribution import duplicates, overlap, paths
from pythia_attribution.attribute import gradients, metrics, moments
from pythia_attribution.attribute.candidates import TRUTHS, load_candidates, truth_sets
from pythia_attribution.attribute.methods import analysed_methods
from pythia_attribution.attribute.ranking import Ranking
from pythia_attribution.attribute.stage import QUERY_KEY, TRACING_FIELDS, layer_of, method_scorer
from pythia_attribution.behaviors import encoder
from pythia_attribution.model import set_threads
from pythia_attribution.variants import read_variants

log = logging.getLogger(__name__)
THIRDS = ("lower", "middle", "upper")
WHOLE = "all"  # the full score, ranked the same way, for comparison with the thirds


# ---------------------------------------------------------------------------------------------
# the stage


def run(ctx) -> None:
    cfg = ctx.config
    seed = ctx.profile.runtime.seed
    set_threads(ctx.profile.runtime.threads)
    acfg = ctx.profile.attribute
    methods = analysed_methods(paths.resolve_input(acfg.methods_file), acfg.methods, cfg.methods)
    cands = load_candidates(ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE))
    ground_truth = ctx.input_table(paths.CORPUS, paths.GROUND_TRUTH_TABLE)
    truth = {name: truth_sets(ground_truth, cands, name) for name in TRUTHS}
    ckpts = ctx.input_table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    final = max(ckpts, key=lambda c: c["step"])
    step, ckpt_dir = final["step"], ctx.inputs[paths.TRAIN] / final["path"]
    # the attribute stage's queries, in its order: the behaviors exhibited at the checkpoint
    queries = [
        p
        for p in ctx.input_table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
        if p["checkpoint"] == step and p["exhibited"]
    ]
    attributions = ctx.input_table(paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).to_pandas()
    attributions = attributions[attributions["checkpoint"] == step]
    chosen = list(range(len(queries)))
    if cfg.max_behaviors and len(queries) > cfg.max_behaviors:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 41]))
        chosen = sorted(rng.choice(len(queries), size=cfg.max_behaviors, replace=False).tolist())

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)

    encode = encoder(tokenizer)

    @functools.cache
    def decode(token: int) -> str:
        return tokenizer.decode([token])

    variants = (
        read_variants(paths.resolve_input(cfg.word_order_file), ground_truth, encode)
        if cfg.word_order_file
        else []
    )
    work = ctx.out_dir / "work"
    tables: dict[str, list[dict]] = {"tokenwise": [], "layers": [], "layer_tracing": [], "word_order": []}
    indexes = ctx.inputs[paths.ATTRIBUTE] / "indexes" / f"step{step}"
    for method in tqdm(methods, desc="analyses", unit="method"):
        folder = indexes / method.index_name
        if not (folder / "queries").exists():
            log.warning("analyses: %s has no index at step%d (attribute skipped it)", method.name, step)
            continue
        hessian = folder / "hessian" if method.hessian == "autocorrelation" else None
        opt_state = moments.state_path(method.index_name, ckpt_dir, indexes)
        scorer = method_scorer(gradients.shards_of(folder / "train"), folder / "queries", method, hessian,
                               acfg.chunk_rows)  # fmt: skip
        if scorer.n_queries != len(queries):
            raise RuntimeError(
                f"{folder / 'queries'}: {scorer.n_queries} query rows, but {len(queries)} behaviors are "
                f"exhibited at step{step}: the attribute stage's index does not match its probes"
            )
        top = attributions[attributions["method"] == method.name]
        common = {"projection_dim": acfg.projection_dim, "token_batch_size": acfg.token_batch_size}
        tables["tokenwise"] += tokenwise(
            scorer, queries, chosen, top, cands, cfg.tokenwise_top, ckpt_dir, opt_state,
            work / method.name / "tokens", common, method.name, step, decode,
        )  # fmt: skip
        layer_rows, tracing_rows = layer_thirds(
            scorer, queries, chosen, truth, cands, cfg, ctx.profile, method.name, step, seed
        )
        tables["layers"] += layer_rows
        tables["layer_tracing"] += tracing_rows
        tables["word_order"] += word_order(
            variants, truth["complete"], scorer.shards, ckpt_dir, opt_state, hessian, method, acfg, common,
            work / method.name / "word_order", seed,
        )  # fmt: skip
        shutil.rmtree(work / method.name, ignore_errors=True)  # per-token and variant indexes: large
    shutil.rmtree(work, ignore_errors=True)

    ctx.write_table(
        paths.TOKENWISE_TABLE,
        pa.Table.from_pylist(tables["tokenwise"], TOKENWISE_SCHEMA),
        decomposition=(
            "bergson per-token gradients (attribute_tokens): position t's layer gradients, from its "
            "activation and output gradient; scored with the whole sequence's norm, so a sequence's "
            "positions sum to its score; position t is credited to input token t"
        ),
        rows=f"every position of each gradient method's top {cfg.tokenwise_top} sequences per behavior",
        in_query_run=f"the token is in a run of at least {QUERY_RUN} tokens shared, in order, with the query",
        query_run=QUERY_RUN,
    )
    layers = pa.Table.from_pylist(tables["layers"], LAYER_THIRDS_SCHEMA)
    thresholds = asdict(ctx.profile.duplicates)
    ctx.write_table(
        paths.LAYER_THIRDS_TABLE,
        layers,
        thirds="layers split by numpy.array_split into lower, middle, upper; score = sum of the third's "
        "per-module scores (whole-row normalization); 'all' = every module",
        categories=thresholds,
        truth="in_ground_truth: the complete definition",
    )
    ctx.write_table(
        paths.LAYER_THIRDS_SUMMARY_TABLE,
        layer_summary(layers, pa.Table.from_pylist(tables["layer_tracing"], LAYER_TRACING_SCHEMA), seed,
                      acfg.bootstrap),
        bootstrap=f"percentile bootstrap over behaviors, {acfg.bootstrap} resamples, 95% interval",
    )  # fmt: skip
    word = pa.Table.from_pylist(tables["word_order"], WORD_ORDER_SCHEMA)
    ctx.write_table(
        paths.WORD_ORDER_TABLE,
        word,
        truth="the item's complete ground-truth sequences",
        variants=str(cfg.word_order_file),
    )
    ctx.write_table(
        paths.WORD_ORDER_METRICS_TABLE,
        word_order_metrics(word, seed, acfg.bootstrap),
        bootstrap=f"percentile bootstrap over items, {acfg.bootstrap} resamples, 95% interval",
        relative="mean ground-truth score of the variant over items / that of the original query over the "
        "same items; interval: paired bootstrap of the ratio",
    )


def tokenwise(
    scorer, queries, chosen, top, cands, n_top, ckpt_dir, opt_state, out, common, method, step, decode
):
    """Per-position scores of each chosen behavior's top ``n_top`` sequences (``decode``: a token
    id's text)."""
    top = top[(top["rank"] <= n_top) & top["behavior_id"].isin([queries[q]["behavior_id"] for q in chosen])]
    if top.empty:
        return []
    packed = np.unique(top["packed_id"].to_numpy())
    gradients.build_index(  # per token: one sequence per batch (build_index says why)
        out, ckpt_dir, cands.tokens[packed].astype(np.int64), labels=None, optimizer_state=opt_state,
        attribute_tokens=True, **common,
    )  # fmt: skip
    token_grads, _ = gradients.module_blocks(out)
    offsets = np.load(out / "offsets.npy")
    wholes = scorer.gather(packed)
    column = {q["behavior_id"]: i for i, q in enumerate(queries)}
    rows = []
    by_packed = {int(p): i for i, p in enumerate(packed)}
    for pid, group in tqdm(top.groupby("packed_id"), desc=f"tokenwise {method}", unit="seq", mininterval=5):
        i = by_packed[int(pid)]
        parts = token_grads[offsets[i] : offsets[i + 1]]
        scores = scorer.parts(parts, wholes[i]).sum(-1)  # queries x positions
        tokens = cands.tokens[pid]
        for r in group.sort_values(["behavior_id", "rank"]).itertuples():
            qi = column[r.behavior_id]
            shared = query_runs(queries[qi]["prompt_ids"] + queries[qi]["target_ids"], tokens.tolist())
            for t, s in enumerate(scores[qi]):
                rows.append(
                    {"behavior_id": r.behavior_id, "family": r.family, "method": method, "checkpoint": step,
                     "rank": int(r.rank), "packed_id": int(pid), "position": t, "token_id": int(tokens[t]),
                     "token": decode(int(tokens[t])), "in_query_run": bool(shared[t]), "score": float(s)}
                )  # fmt: skip
    return rows


QUERY_RUN = 3  # shortest run of tokens shared with the query that marks a position as repeating it


def query_runs(query: list[int], tokens: list[int]) -> np.ndarray:
    """Which positions of ``tokens`` lie in a run of at least ``QUERY_RUN`` tokens that also occurs,
    in order, in the query (difflib's matching blocks: each query token matched at most once)."""
    import difflib

    out = np.zeros(len(tokens), dtype=bool)
    matcher = difflib.SequenceMatcher(None, query, tokens, autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= QUERY_RUN:
            out[block.b : block.b + block.size] = True
    return out


class UnionScores:
    """Scores of the union of some row sets, computed once by ``score(ids)`` (queries x ids x ...) and
    looked up for any of its subsets: what ``Ranking.prime`` asks for, and the per-set scores after."""

    def __init__(self, score, sets: list[np.ndarray | None]):
        present = [s for s in sets if s is not None]
        self.union = np.unique(np.concatenate(present)) if present else np.zeros(0, dtype=np.int64)
        self.scores = score(self.union)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.scores[:, np.searchsorted(self.union, np.asarray(ids, dtype=np.int64))]


def third_modules(modules: list[str]) -> dict[str, np.ndarray]:
    """Column indexes of each third's modules (plus ``all``): the layers split by ``array_split``
    (4 layers: 2, 1, 1; 6 layers: 2, 2, 2); a model of fewer than three layers has its modules, in
    network order, split instead. Empty thirds are left out."""
    layers = [layer_of(m) for m in modules]
    if -1 in layers:
        raise ValueError(f"a module outside the layers: {modules[layers.index(-1)]}")
    distinct = sorted(set(layers))
    if len(distinct) >= 3:
        groups = [set(g.tolist()) for g in np.array_split(np.array(distinct), 3)]
        members = [np.array([i for i, layer in enumerate(layers) if layer in g]) for g in groups]
    else:
        order = sorted(range(len(modules)), key=lambda i: (layers[i], i))
        members = [np.sort(np.array(part, dtype=int)) for part in np.array_split(np.array(order), 3)]
    out = {name: m for name, m in zip(THIRDS, members, strict=True) if len(m)}
    out[WHOLE] = np.arange(len(modules))
    return out


def layer_thirds(scorer, queries, chosen, truth, cands, cfg, profile, method, step, seed):
    """Each third's top k per chosen behavior (classified) and its tracing metrics."""
    groups = third_modules(scorer.modules)
    sel = np.array(chosen)
    q_truth = {name: [sets.get(queries[q]["item_id"]) for q in chosen] for name, sets in truth.items()}
    rankings = {
        name: Ranking(len(chosen), scorer.n_rows, cfg.layer_top_k, q_truth, sample_size=1, seed=seed)
        for name in groups
    }
    # the truth rows' per-module scores, once for every third's ranking
    truth_rows = UnionScores(
        lambda ids: scorer.module_scores(ids)[sel], [s for v in q_truth.values() for s in v]
    )
    for name, ranking in rankings.items():
        ranking.prime(lambda ids, cols=groups[name]: truth_rows(ids)[..., cols].sum(-1))
    for start, block in scorer.module_chunks():
        block = block[sel]
        for name, ranking in rankings.items():
            ranking.add(start, block[..., groups[name]].sum(-1))
    if not all(r.complete for r in rankings.values()):
        raise RuntimeError("a layer-third ranking did not see every candidate row")

    texts = [queries[q]["prompt"] + queries[q]["target"] for q in chosen]
    needed = np.concatenate([ranking.top()[0].ravel() for ranking in rankings.values()])
    tfidf = duplicates.TfidfCosines(cands.texts, texts, needed)
    hasher = overlap.MinHasher(profile.duplicates, seed)
    rows, tracing = [], []
    for name, ranking in rankings.items():
        ids, scores = ranking.top()
        for i, q in enumerate(chosen):
            p = queries[q]
            q_tokens = p["prompt_ids"] + p["target_ids"]
            gt = truth["complete"].get(p["item_id"])
            base = {"behavior_id": p["behavior_id"], "family": p["family"], "method": method,
                    "checkpoint": step, "third": name}  # fmt: skip
            for rank, (pid, score) in enumerate(zip(ids[i], scores[i], strict=True), start=1):
                feats = duplicates.pair_features(
                    profile.duplicates, hasher, ("q", q), q_tokens, int(pid), cands.tokens[pid].tolist(),
                    tfidf.get(i, int(pid)),
                )  # fmt: skip
                rows.append(
                    {**base, "rank": rank, "packed_id": int(pid), "seq_idx": int(cands.first_seq_idx[pid]),
                     "score": float(score), "category": feats["category"],
                     "in_ground_truth": bool(np.isin(pid, gt)) if gt is not None else None}
                )  # fmt: skip
            for definition in TRUTHS:
                if ranking.has_truth(i, definition):
                    tracing.append({**base, "truth": definition, **ranking.tracing(i, definition)})
    return rows, tracing


def word_order(
    variants, complete, train_shards, ckpt_dir, opt_state, hessian, method, acfg, common, out, seed
):
    """Every variant query's scores of its item's complete ground-truth sequences, and where they
    rank among every candidate."""
    if not variants:
        return []
    query = gradients.query_index(
        out, ckpt_dir, [v.prompt_ids for v in variants], [v.target_ids for v in variants],
        optimizer_state=opt_state, **common,
    )  # fmt: skip
    scorer = method_scorer(train_shards, query, method, hessian, acfg.chunk_rows)
    sets = [complete[v.item_id] for v in variants]
    truth_scores = UnionScores(scorer.totals, sets)  # every variant against every truth row, once
    ranking = Ranking(len(variants), scorer.n_rows, 1, {"complete": sets}, sample_size=1, seed=seed)
    ranking.consume(scorer.chunks(), truth_scores)
    rows = []
    for i, v in enumerate(variants):
        gt = truth_scores(sets[i])[i]
        trace = ranking.tracing(i, "complete")
        rows.append(
            {"item_id": v.item_id, "kind": v.kind, "order": v.order, "variant": v.variant,
             "method": method.name, "prompt": v.prompt, "target": v.target, "gt_score_mean": float(gt.mean()),
             "gt_score_max": float(gt.max()), "top_score": float(ranking.top()[1][i, 0]), "mrr": trace["mrr"],
             "first_hit_rank": trace["first_hit_rank"], "n_truth": trace["n_truth"]}
        )  # fmt: skip
    return rows


def layer_summary(layers: pa.Table, tracing: pa.Table, seed: int, n_boot: int) -> pa.Table:
    """Per (family and all, method, third): category shares and ground-truth share of the top k,
    and the mean MRR under each truth definition, with intervals over behaviors."""
    df, tr = layers.to_pandas(), tracing.to_pandas()
    rows = []
    if df.empty:
        return pa.Table.from_pylist([], LAYER_THIRDS_SUMMARY_SCHEMA)
    for family, sub in [("all", df), *df.groupby("family")]:
        for (method, third), g in sub.groupby(["method", "third"]):
            per_b = g.groupby("behavior_id")
            row = {"family": family, "method": method, "third": third, "n_behaviors": per_b.ngroups}
            for category in duplicates.CATEGORIES:
                share = per_b["category"].apply(lambda c, category=category: (c == category).mean())
                lo, hi = metrics.bootstrap_ci(share.sort_index().to_numpy(), seed, n_boot)
                row.update({category: float(share.mean()), f"{category}_lo": lo, f"{category}_hi": hi})
            gt = g["in_ground_truth"].dropna()
            row["ground_truth_share"] = float(gt.astype(float).mean()) if len(gt) else None
            t = tr[(tr["method"] == method) & (tr["third"] == third)]
            if family != "all":
                t = t[t["family"] == family]
            for definition in TRUTHS:
                m = t[t["truth"] == definition].sort_values("behavior_id")["mrr"]
                row[f"mrr_{definition}"] = float(m.mean()) if len(m) else None
            rows.append(row)
    return pa.Table.from_pylist(rows, LAYER_THIRDS_SUMMARY_SCHEMA)


def word_order_metrics(word: pa.Table, seed: int, n_boot: int) -> pa.Table:
    """Per (kind, order, variant, method): the mean ground-truth score over items, its ratio to the
    original query's (a ratio of means over the same items: per-item ratios explode where the
    original's score is near zero) and the MRR, with intervals over items."""
    df = word.to_pandas()
    rows = []
    if df.empty:
        return pa.Table.from_pylist([], WORD_ORDER_METRICS_SCHEMA)
    original = df[df["variant"] == "original"].set_index(["method", "item_id"])["gt_score_mean"]
    for (kind, order, variant, method), g in df.groupby(["kind", "order", "variant", "method"], sort=True):
        g = g.sort_values("item_id")
        row = {"kind": kind, "order": order, "variant": variant, "method": method, "n_items": len(g)}
        score = g["gt_score_mean"].to_numpy()
        base = original.reindex(list(zip(g["method"], g["item_id"], strict=True))).to_numpy()
        for col, values in (("gt_score", score), ("mrr", g["mrr"].to_numpy())):
            lo, hi = metrics.bootstrap_ci(values, seed, n_boot)
            row.update({col: float(values.mean()), f"{col}_lo": lo, f"{col}_hi": hi})
        if len(base) and not np.isnan(base).any():
            lo, hi = metrics.bootstrap_ratio_ci(score, base, seed, n_boot)
            row.update({"relative": float(score.sum() / base.sum()), "relative_lo": lo, "relative_hi": hi})
        else:
            row.update({"relative": None, "relative_lo": None, "relative_hi": None})
        rows.append(row)
    return pa.Table.from_pylist(rows, WORD_ORDER_METRICS_SCHEMA)


TOKENWISE_SCHEMA = pa.schema(
    [
        *QUERY_KEY,
        ("rank", pa.int32()),
        ("packed_id", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("in_query_run", pa.bool_()),
        ("score", pa.float64()),
    ]
)
LAYER_THIRDS_SCHEMA = pa.schema(
    [
        *QUERY_KEY,
        ("third", pa.string()),
        ("rank", pa.int32()),
        ("packed_id", pa.int32()),
        ("seq_idx", pa.int64()),
        ("score", pa.float64()),
        ("category", pa.string()),
        ("in_ground_truth", pa.bool_()),
    ]
)
LAYER_TRACING_SCHEMA = pa.schema(
    [*QUERY_KEY, ("third", pa.string()), ("truth", pa.string()), *TRACING_FIELDS]
)
LAYER_THIRDS_SUMMARY_SCHEMA = pa.schema(
    [("family", pa.string()), ("method", pa.string()), ("third", pa.string()), ("n_behaviors", pa.int64())]
    + [(f"{c}{s}", pa.float64()) for c in duplicates.CATEGORIES for s in ("", "_lo", "_hi")]
    + [("ground_truth_share", pa.float64())]
    + [(f"mrr_{d}", pa.float64()) for d in TRUTHS]
)
WORD_ORDER_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("kind", pa.string()),
        ("order", pa.string()),
        ("variant", pa.string()),
        ("method", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("gt_score_mean", pa.float64()),
        ("gt_score_max", pa.float64()),
        ("top_score", pa.float64()),
        ("mrr", pa.float64()),
        ("first_hit_rank", pa.int64()),
        ("n_truth", pa.int64()),
    ]
)
WORD_ORDER_METRICS_SCHEMA = pa.schema(
    [("kind", pa.string()), ("order", pa.string()), ("variant", pa.string()), ("method", pa.string()),
     ("n_items", pa.int64())]
    + [(f"{c}{s}", pa.float64()) for c in ("gt_score", "relative", "mrr") for s in ("", "_lo", "_hi")]
)  # fmt: skip
