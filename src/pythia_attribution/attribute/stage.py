"""Attribute stage: score every packed training sequence for every exhibited behavior.

Candidates are the packed training sequences (``packed_id``); each row of the output also names
the sequence's first position in the training stream (``seq_idx``). A behavior that the probe
stage does not show as exhibited at a checkpoint is listed in ``skipped.arrow`` with the reason
and never attributed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pythia_attribution import paths
from pythia_attribution.attribute import activations, baselines, ekfac, gradients, metrics, moments, shards
from pythia_attribution.attribute.candidates import TRUTH_TEXT, TRUTHS, load_candidates, truth_sets
from pythia_attribution.attribute.methods import Method, load_methods
from pythia_attribution.attribute.ranking import Ranking, per_query_blocks
from pythia_attribution.errors import ConfigError
from pythia_attribution.model import compute_device, load_checkpoint, set_threads

log = logging.getLogger(__name__)


class Scored(NamedTuple):
    """One method's result at one checkpoint: the streamed ranking of every query, per-module
    scores of chosen rows (gradient methods), and the faiss top-k where faiss was used."""

    ranking: Ranking
    per_module: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
    faiss: tuple[np.ndarray, np.ndarray] | None = None


def layer_of(module: str) -> int:
    match = re.search(r"layers\.(\d+)\.", module)
    return int(match.group(1)) if match else -1


def run(ctx) -> None:
    cfg = ctx.config
    seed = ctx.profile.runtime.seed
    set_threads(ctx.profile.runtime.threads)
    methods = load_methods(paths.resolve_input(cfg.methods_file), cfg.methods)
    corpus = ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE)
    cands = load_candidates(corpus)
    ground_truth = ctx.input_table(paths.CORPUS, paths.GROUND_TRUTH_TABLE)
    truth = {name: truth_sets(ground_truth, cands, name) for name in TRUTHS}
    probes = ctx.input_table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
    ckpts = {c["step"]: c for c in ctx.input_table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()}
    final = max(ckpts)
    unknown = [c for c in cfg.checkpoints if c not in ckpts]
    if unknown:
        raise ConfigError(f"attribute.checkpoints: no checkpoint step{unknown[0]} (have: {sorted(ckpts)})")
    steps = sorted({final, *cfg.checkpoints})
    log.info("%d candidate sequences; methods %s; checkpoints %s", len(cands.texts), cfg.methods, steps)

    tables: dict[str, list[dict]] = {
        k: [] for k in ("attributions", "layers", "summary", "tracing", "skipped", "controls")
    }
    for step in steps:
        attribute_checkpoint(ctx, step, ckpts[step], methods, cands, truth, probes, tables, seed)

    ctx.write_table(
        paths.ATTRIBUTIONS_TABLE, pa.Table.from_pylist(tables["attributions"], ATTRIBUTION_SCHEMA)
    )
    ctx.write_table(paths.LAYER_SCORES_TABLE, pa.Table.from_pylist(tables["layers"], LAYER_SCHEMA))
    ctx.write_table(
        paths.SCORE_SUMMARY_TABLE,
        pa.Table.from_pylist(tables["summary"]),
        rows=(
            "max, min, mean, n_candidates and n_positive over every candidate; quantiles, top shares and "
            f"the tail exponent over every candidate when there are at most {cfg.summary_sample}, else over "
            f"a seeded uniform sample of {cfg.summary_sample} (attribute.summary_sample)"
        ),
    )
    ctx.write_table(paths.SKIPPED_TABLE, pa.Table.from_pylist(tables["skipped"], SKIPPED_SCHEMA))
    ctx.write_table(
        paths.CONTROLS_TABLE,
        pa.Table.from_pylist(tables["controls"], CONTROLS_SCHEMA),
        controls="activation-space methods: each behavior's control completion (attribute/activations.py)",
    )
    per_behavior = pa.Table.from_pylist(tables["tracing"], TRACING_SCHEMA)
    ctx.write_table(paths.TRACING_TABLE, per_behavior)
    ctx.write_table(
        paths.TRACING_METRICS_TABLE,
        aggregate_tracing(per_behavior, seed, cfg.bootstrap),
        bootstrap=f"percentile bootstrap over behaviors, {cfg.bootstrap} resamples, 95% interval",
        truth="; ".join(f"{name}: {text}" for name, text in TRUTH_TEXT.items()),
    )


def attribute_checkpoint(ctx, step, ckpt, methods, cands, truth, probes, tables, seed) -> None:
    cfg = ctx.config
    ckpt_dir = ctx.inputs[paths.TRAIN] / ckpt["path"]
    here = [p for p in probes if p["checkpoint"] == step]
    queries = [p for p in here if p["exhibited"]]
    for p in here:
        if not p["exhibited"]:
            completion = p["completion"]
            reason = f"not exhibited at step{step}: greedy completion {completion!r} lacks the target"
            tables["skipped"].append(
                {
                    "behavior_id": p["behavior_id"],
                    "family": p["family"],
                    "checkpoint": step,
                    "method": None,
                    "reason": reason,
                }
            )
    if not queries:
        log.warning("step%d: no exhibited behavior; nothing to attribute", step)
        return
    q_rows = [p["prompt_ids"] + p["target_ids"] for p in queries]
    q_truth = {name: [sets.get(p["item_id"]) for p in queries] for name, sets in truth.items()}
    n_rows = len(cands.texts)
    work = ctx.out_dir / "indexes" / f"step{step}"
    all_scores: dict[str, Scored] = {}
    indexes: dict[str, tuple] = {}

    def rank(blocks, totals=None) -> Ranking:
        """Every query's ranking over every candidate, streamed from ``blocks`` (``Ranking.consume``);
        ``totals(ids)`` scores given rows, needed when a query's rows come in several blocks."""
        ranking = Ranking(len(queries), n_rows, cfg.top_k, q_truth, sample_size=cfg.summary_sample, seed=seed)
        return ranking.consume(blocks, totals)

    shared: dict = {}  # what activation-space methods share at this checkpoint, made once

    def activation_model():
        """The checkpoint's model in eval mode and the layer the activation methods read."""
        if "model" not in shared:
            shared["model"], _ = load_checkpoint(ckpt_dir, compute_device())
            shared["layer"] = baselines.middle_layer(shared["model"].config.num_hidden_layers)
        return shared["model"], shared["layer"]

    def activation_keys():
        """Every candidate's unit mean activation (rows x hidden), a memory map filled in one pass."""
        if "keys" not in shared:
            model, layer = activation_model()
            work.mkdir(parents=True, exist_ok=True)
            keys = np.lib.format.open_memmap(
                work / "activations.npy",
                mode="w+",
                dtype=np.float32,
                shape=(n_rows, model.config.hidden_size),
            )
            for start in range(0, n_rows, cfg.chunk_rows):
                ids = np.arange(start, min(start + cfg.chunk_rows, n_rows))
                keys[ids] = baselines.mean_activations(model, cands.tokens[ids, :-1].tolist(), layer)
            shared["keys"] = keys
        return shared["keys"]

    def query_controls():
        """Each query's control completion (``activations.controls``), recorded in a table."""
        if "controls" not in shared:
            shared["controls"] = activations.controls(queries, here, seed)
            for q, c in zip(queries, shared["controls"], strict=True):
                tables["controls"].append(
                    {"behavior_id": q["behavior_id"], "family": q["family"], "checkpoint": step,
                     "control_behavior_id": c["behavior_id"], "control_target": c["target"]}
                )  # fmt: skip
        return shared["controls"]

    for method in tqdm(methods, desc=f"attribute step{step}", unit="method"):
        if method.kind == "gradient":
            if not moments.available(method.index_name, ckpt_dir):
                tables["skipped"].append(
                    {
                        "behavior_id": None,
                        "family": None,
                        "checkpoint": step,
                        "method": method.name,
                        "reason": (
                            f"step{step} has no saved optimizer state (the train stage saves it at the "
                            "final checkpoint; Hub checkpoints have none)"
                        ),
                    }
                )
                continue
            if not indexes:
                indexes = build_indexes(ctx, step, ckpt, methods, cands, queries)
            train_shards, query_idx = indexes[method.index_name]
            hessian = None
            if method.hessian == "autocorrelation":
                hessian = work / method.index_name / "hessian"
                if not hessian.exists():
                    gradients.autocorrelation_hessian(train_shards, hessian, cfg.chunk_rows)
            scorer = method_scorer(train_shards, query_idx, method, hessian, cfg.chunk_rows)
            top = None
            if cfg.faiss and hessian is None and method.unit_norm:
                top = baselines.FaissTopK(gradients.unit_rows(query_idx), cfg.top_k)
            blocks = scorer.chunks(on_rows=top.add if top else None)
            ranking = rank(blocks, scorer.totals)
            all_scores[method.name] = Scored(ranking, scorer.per_module, top.result() if top else None)
        elif method.kind == "ekfac":
            timings: dict[str, float] = {}
            store = ekfac.scores(
                work / method.name, ckpt_dir, cands.tokens, [p["prompt_ids"] for p in queries],
                [p["target_ids"] for p in queries], token_batch_size=cfg.token_batch_size,
                damping=method.damping, seed=seed + step, fit_rows=method.fit_rows, timings=timings,
            )  # fmt: skip
            if timings:
                spent = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                log.info("%s at step%d: %s", method.name, step, spent)
            blocks = ekfac.store_blocks(store, cfg.chunk_rows)
            ranking = rank(blocks, ekfac.store_totals(store))
            all_scores[method.name] = Scored(ranking)
        elif method.kind == "bm25":
            texts = [p["prompt"] + p["target"] for p in queries]
            bm25 = baselines.BM25Scores(cands.texts, texts, cfg.chunk_rows)
            all_scores[method.name] = Scored(rank(bm25.blocks(), bm25.totals))
        elif method.kind == "activation":
            model, layer = activation_model()
            keys = activation_keys()
            if method.query == "difference":
                q = activations.directions(model, queries, query_controls(), layer)
            else:
                q = baselines.mean_activations(model, q_rows, layer)
            top = baselines.FaissTopK(q, cfg.top_k) if cfg.faiss else None

            def blocks(keys=keys, q=q, top=top):
                for start in range(0, n_rows, cfg.chunk_rows):
                    k = np.asarray(keys[start : start + cfg.chunk_rows])
                    if top is not None:
                        top.add(start, k)
                    yield start, q @ k.T

            ranking = rank(blocks(), lambda ids, keys=keys, q=q: q @ np.asarray(keys[np.asarray(ids)]).T)
            all_scores[method.name] = Scored(ranking, faiss=top.result() if top else None)
        elif method.kind == "activation_change":
            if not indexes:
                indexes = build_indexes(ctx, step, ckpt, methods, cands, queries)
            model, layer = activation_model()
            ctrls = query_controls()
            dirs = activations.directions(model, queries, ctrls, layer)
            q = activations.change_queries(
                work / method.name, ckpt_dir, queries, ctrls, dirs, layer,
                projection_dim=cfg.projection_dim, token_batch_size=cfg.token_batch_size,
            )  # fmt: skip
            scorer = gradients.GradientScorer(
                indexes["raw"][0], q, unit_norm=method.unit_norm, hessian_path=None,
                chunk_rows=cfg.chunk_rows, device=compute_device(),
            )  # fmt: skip
            top = (
                baselines.FaissTopK(gradients.unit(q[0]), cfg.top_k)
                if cfg.faiss and method.unit_norm
                else None
            )
            ranking = rank(scorer.chunks(on_rows=top.add if top else None), scorer.totals)
            all_scores[method.name] = Scored(ranking, scorer.per_module, top.result() if top else None)
        elif method.kind == "random":
            per_query = baselines.random_query_scores(len(queries), n_rows, seed + step)
            all_scores[method.name] = Scored(rank(per_query_blocks(per_query)))
    for method in methods:
        if method.name in all_scores:
            record(tables, step, method, queries, all_scores[method.name], cands, cfg.top_k)
    if "keys" in shared:  # a cache for this checkpoint's methods, not an output
        del shared["keys"]
        (work / "activations.npy").unlink()


def method_scorer(train, query, method: Method, hessian, chunk_rows: int) -> gradients.GradientScorer:
    """A gradient method's scorer of a query index against a training index (``hessian``: the
    TrackStar Hessian's folder, or None), on the compute device."""
    return gradients.GradientScorer(
        train, query, unit_norm=method.unit_norm, hessian_path=hessian, chunk_rows=chunk_rows,
        device=compute_device(),
    )  # fmt: skip


def build_indexes(ctx, step, ckpt, methods, cands, queries) -> dict[str, tuple]:
    """Every training index the checkpoint's methods read (``shards.needed_indexes``; as shards,
    adopting any built by ``index-shard``; all of them in one pass, ``shards.build_shards``;
    ``adam_est``'s second moments estimated first, ``moments.estimate``), each with its query
    index."""
    cfg = ctx.config
    ckpt_dir = ctx.inputs[paths.TRAIN] / ckpt["path"]
    names = shards.needed_indexes(methods, ckpt_dir)
    folder = ctx.out_dir / "indexes" / f"step{step}"
    states = moments.states(names, ckpt_dir, folder, cands, step, moments.Settings.of(ctx.profile))
    train = shards.build_or_adopt(
        ctx.profile, cfg, {n: folder / n / "train" for n in names}, step, ckpt, cands, states, ckpt_dir
    )
    out = {}
    for name in names:
        query_idx = gradients.query_index(
            folder / name / "queries",
            ckpt_dir,
            [p["prompt_ids"] for p in queries],
            [p["target_ids"] for p in queries],
            optimizer_state=states[name],
            projection_dim=cfg.projection_dim,
            token_batch_size=cfg.token_batch_size,
        )
        out[name] = train[name], query_idx
    return out


def record(tables, step, method: Method, queries, scored: Scored, cands, top_k) -> None:
    ranking = scored.ranking
    order, top_scores = ranking.top()
    if scored.faiss is not None:  # faiss top-k for a method without a Hessian; the exact pass checks it
        f_ids, f_scores = scored.faiss
        if not np.allclose(np.sort(f_scores, axis=1), np.sort(top_scores, axis=1), atol=1e-4):
            log.warning("%s: faiss and exact top-k scores differ", method.name)
        order, top_scores = f_ids, f_scores
    per_module, column = None, {}
    if scored.per_module is not None:  # per-module scores of the top-k rows only
        rows = np.unique(order)
        per_module, column = scored.per_module(rows), {int(r): j for j, r in enumerate(rows)}
    for qi, p in enumerate(queries):
        base = {
            "behavior_id": p["behavior_id"],
            "family": p["family"],
            "method": method.name,
            "checkpoint": step,
        }
        for rank, (pid, score) in enumerate(zip(order[qi], top_scores[qi], strict=True), start=1):
            tables["attributions"].append(
                {
                    **base,
                    "rank": rank,
                    "packed_id": int(pid),
                    "seq_idx": int(cands.first_seq_idx[pid]),
                    "score": float(score),
                }
            )
            if per_module is not None:
                for module, block in per_module.items():
                    tables["layers"].append(
                        {
                            **base,
                            "rank": rank,
                            "packed_id": int(pid),
                            "module": module,
                            "layer": layer_of(module),
                            "score": float(block[qi, column[int(pid)]]),
                        }
                    )
        tables["summary"].append({**base, **ranking.summary(qi)})
        for definition in TRUTHS:
            if ranking.has_truth(qi, definition):
                tables["tracing"].append(
                    {**base, "truth": definition, "item_id": p["item_id"], "count": p["count"],
                     **ranking.tracing(qi, definition)}
                )  # fmt: skip


def aggregate_tracing(per_behavior: pa.Table, seed: int, n_boot: int) -> pa.Table:
    rows = []
    df = per_behavior.to_pandas()
    if df.empty:
        return pa.Table.from_pylist([], TRACING_METRICS_SCHEMA)
    df = df.assign(top1_hit=df["top1_hit"].astype(float))
    groups = [("all", df)] + list(df.groupby("family"))
    for family, sub in groups:
        for (truth, method, step), g in sub.groupby(["truth", "method", "checkpoint"]):
            row = {
                "truth": truth,
                "method": method,
                "family": family,
                "checkpoint": int(step),
                "n_behaviors": len(g),
            }
            for metric in ("mrr", "recall_at_10", "precision_at_10", "top1_hit"):
                lo, hi = metrics.bootstrap_ci(g[metric].to_numpy(), seed, n_boot)
                row.update({metric: float(g[metric].mean()), f"{metric}_lo": lo, f"{metric}_hi": hi})
            rows.append(row)
    return pa.Table.from_pylist(rows, TRACING_METRICS_SCHEMA)


# Every per-query table starts with these columns; a top-k row adds its rank and sequence.
QUERY_KEY = [
    ("behavior_id", pa.string()),
    ("family", pa.string()),
    ("method", pa.string()),
    ("checkpoint", pa.int64()),
]
TOP_K_ROW = [*QUERY_KEY, ("rank", pa.int32()), ("packed_id", pa.int32())]
ATTRIBUTION_SCHEMA = pa.schema([*TOP_K_ROW, ("seq_idx", pa.int64()), ("score", pa.float64())])
LAYER_SCHEMA = pa.schema(
    [*TOP_K_ROW, ("module", pa.string()), ("layer", pa.int32()), ("score", pa.float64())]
)
SKIPPED_SCHEMA = pa.schema([*QUERY_KEY, ("reason", pa.string())])
CONTROLS_SCHEMA = pa.schema(
    [
        ("behavior_id", pa.string()),
        ("family", pa.string()),
        ("checkpoint", pa.int64()),
        ("control_behavior_id", pa.string()),
        ("control_target", pa.string()),
    ]
)
# What metrics.tracing returns for one query, as columns.
TRACING_FIELDS = [
    ("mrr", pa.float64()),
    ("first_hit_rank", pa.int64()),
    ("recall_at_10", pa.float64()),
    ("precision_at_10", pa.float64()),
    ("top1_hit", pa.bool_()),
    ("n_truth", pa.int64()),
]
TRACING_SCHEMA = pa.schema(
    [*QUERY_KEY, ("truth", pa.string()), ("item_id", pa.string()), ("count", pa.int32()), *TRACING_FIELDS]
)
TRACING_METRICS_SCHEMA = pa.schema(
    [
        ("truth", pa.string()),
        ("method", pa.string()),
        ("family", pa.string()),
        ("checkpoint", pa.int64()),
        ("n_behaviors", pa.int64()),
    ]
    + [
        (f"{m}{suffix}", pa.float64())
        for m in ("mrr", "recall_at_10", "precision_at_10", "top1_hit")
        for suffix in ("", "_lo", "_hi")
    ]
)
