"""Memorization stage (Biderman et al. 2023): which training sequences are memorized, how often
they are duplicated, and what attribution says drives them.

The test on a sequence's first 64 tokens: ``memorized`` when the greedy continuation of the first
32 tokens reproduces tokens 32-63 exactly. One teacher-forced forward pass decides it: if the
argmax at every target position is the true next token, greedy decoding follows the true prefix
all the way. The per-position agreement of that pass is reported as ``tf_accuracy`` (it is not
the generation-based memorization score, which diverges once greedy decoding leaves the text).

Checkpoint ``stepN`` has trained on the rows with ``seq_idx < N * batch_size``; a sequence is
tested only at checkpoints that have trained on it. Every epoch trains on the same packed
sequences, so the test runs once per (packed sequence, checkpoint) and is expanded to stream
positions.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from pythia_attribution import paths
from pythia_attribution.attribute import baselines, gradients, moments
from pythia_attribution.attribute.candidates import load_candidates, truth_sets
from pythia_attribution.attribute.methods import memorization_methods
from pythia_attribution.attribute.ranking import Ranking
from pythia_attribution.attribute.stage import method_scorer
from pythia_attribution.duplicates import CATEGORIES, TfidfCosines, pair_features
from pythia_attribution.errors import ConfigError
from pythia_attribution.model import compute_device, load_checkpoint, memorization_test, set_threads
from pythia_attribution.overlap import MinHasher, distinct_rows, near_duplicate_counts, window_counts

log = logging.getLogger(__name__)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def dup_bin(count: int) -> str:
    """Log2 bins: 1, 2, 3-4, 5-8, 9-16, ..."""
    if count <= 2:
        return str(max(count, 1))
    upper = 2 ** math.ceil(math.log2(count))
    return f"{upper // 2 + 1}-{upper}"


def run(ctx) -> None:
    cfg = ctx.config
    seed = ctx.profile.runtime.seed
    set_threads(ctx.profile.runtime.threads)
    corpus = ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE)
    cands = load_candidates(corpus)
    row_packed, row_seq = cands.row_packed, cands.row_seq_idx
    row_step = corpus["step"].to_numpy().astype(np.int64)
    width = cfg.context + cfg.continuation
    windows = cands.tokens[:, :width]  # a view of the corpus' token rows, not an int64 copy of them
    ckpts = sorted(ctx.input_table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist(), key=lambda c: c["step"])
    ckpt_dirs = {c["step"]: ctx.inputs[paths.TRAIN] / c["path"] for c in ckpts}
    unknown = sorted(set(cfg.restricted_checkpoints) - set(ckpt_dirs))
    if unknown:
        raise ConfigError(
            f"memorization.restricted_checkpoints: {unknown} are not checkpoints of this run "
            f"(checkpoints.arrow has steps {sorted(ckpt_dirs)})"
        )

    ground = ctx.input_table(paths.CORPUS, paths.GROUND_TRUTH_TABLE)
    canary_items = ground.filter(pa.compute.equal(ground["kind"], "canary")).to_pylist()
    canary_windows = np.array([it["prompt_ids"] + it["target_ids"] for it in canary_items], dtype=np.int64)
    canary_windows = canary_windows.reshape(len(canary_items), width)  # (0, width) without canaries

    # 1. The test at every checkpoint, on every packed sequence that checkpoint has trained on (and
    # on each canary's own 64 tokens), one model load per checkpoint. Per step: flags indexed by
    # packed id, meaningful for the packed ids that step has trained on. Checkpoint stepN has
    # trained on exactly the corpus rows with step < N.
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    canary_mem: dict[int, np.ndarray] = {}
    for ckpt in tqdm(ckpts, desc="memorization", unit="ckpt"):
        model, _ = load_checkpoint(ckpt_dirs[ckpt["step"]], compute_device())
        canary_mem[ckpt["step"]], _ = memorization_test(model, canary_windows, cfg.context, cfg.batch_size)
        packed = np.unique(row_packed[row_step < ckpt["step"]])
        if len(packed) == 0:
            continue
        mem, acc = np.zeros(len(windows), dtype=bool), np.zeros(len(windows), dtype=np.float32)
        mem[packed], acc[packed] = memorization_test(model, windows[packed], cfg.context, cfg.batch_size)
        results[ckpt["step"]] = (mem, acc)
    steps = sorted(results)
    trained = {s: np.flatnonzero(row_step < s) for s in steps}
    memorization = pa.table(
        {
            "seq_idx": np.concatenate([row_seq[trained[s]] for s in steps]).astype(np.int64),
            "packed_id": np.concatenate([row_packed[trained[s]] for s in steps]).astype(np.int64),
            "checkpoint": np.concatenate([np.full(len(trained[s]), s) for s in steps]),
            "memorized": np.concatenate([results[s][0][row_packed[trained[s]]] for s in steps]),
            "tf_accuracy": np.concatenate([results[s][1][row_packed[trained[s]]] for s in steps]).astype(
                np.float64
            ),
        }
    )
    ctx.write_table(
        paths.MEMORIZATION_TABLE, memorization, context=cfg.context, continuation=cfg.continuation
    )

    # 2. Per training sequence: when trained, first memorized, forgotten.
    summary = []
    for seq, p, trained_step in zip(row_seq.tolist(), row_packed.tolist(), row_step.tolist(), strict=True):
        seen = [s for s in steps if s > trained_step]
        flags = [bool(results[s][0][p]) for s in seen]
        first = next((s for s, f in zip(seen, flags, strict=True) if f), None)
        summary.append(
            {
                "seq_idx": seq,
                "packed_id": p,
                "trained_step": trained_step,
                "first_memorized": first,
                "memorized_final": bool(flags[-1]) if flags else False,
                "forgotten": bool(first is not None and not flags[-1]),
            }
        )
    summary_table = pa.Table.from_pylist(summary, MEMORIZATION_SUMMARY_SCHEMA)
    ctx.write_table(paths.MEMORIZATION_SUMMARY_TABLE, summary_table)
    if cfg.source == "memorized-evals":
        rescore_evals(ctx, ckpt_dirs[steps[-1]], steps[-1], cands, results[steps[-1]][0][cands.row_packed])

    # 3. Duplication of each packed sequence's window, and memorized fraction against it.
    distinct = distinct_rows(windows)  # both counts start from the distinct windows
    exact = window_counts(cands.tokens, windows, distinct=distinct).astype(np.int32)
    near = near_duplicate_counts(
        windows, ctx.profile.duplicates, seed, scratch=ctx.out_dir, distinct=distinct
    )
    final_step = steps[-1]
    final_mem = results[final_step][0]
    injected = np.zeros(len(windows), dtype=np.int32)
    canary_truth = truth_sets(ground.filter(pa.compute.equal(ground["kind"], "canary")), cands, "partial")
    counts_by_item = dict(zip(ground["item_id"].to_pylist(), ground["count"].to_pylist(), strict=True))
    for item, packed in canary_truth.items():
        injected[packed] = np.maximum(injected[packed], counts_by_item[item])
    dup_rows = []
    for kind, values in (("exact_window", exact), ("near_duplicate", near + 1)):
        bins: dict[str, list[int]] = {}
        for v, m in zip(values.tolist(), final_mem.tolist(), strict=True):
            bins.setdefault(dup_bin(v), []).append(m)
        for b, ms in sorted(bins.items(), key=lambda kv: int(kv[0].split("-")[-1])):
            lo, hi = wilson(sum(ms), len(ms))
            dup_rows.append(
                {
                    "duplication": kind,
                    "bin": b,
                    "n": len(ms),
                    "n_memorized": sum(ms),
                    "fraction": sum(ms) / len(ms),
                    "ci_lo": lo,
                    "ci_hi": hi,
                }
            )
    ctx.write_table(
        paths.MEMORIZATION_BY_DUP_TABLE,
        pa.Table.from_pylist(dup_rows),
        note="per packed sequence at the final checkpoint; near_duplicate counts include the sequence; "
        "95% Wilson intervals",
    )
    ctx.write_table(
        paths.DUPLICATION_TABLE,
        pa.table(
            {
                "packed_id": np.arange(len(windows)),
                "exact_window_count": exact,
                "near_duplicate_count": near,
                "injected_canary_count": injected,
                "memorized_final": final_mem,
            }
        ),
    )
    canaries(ctx, cands, ground, canary_items, canary_windows, canary_mem, final_step)
    attribute_memorized(ctx, cands, windows, summary_table, exact, final_step)


def canaries(ctx, cands, ground, items, windows, canary_mem, final_step) -> None:
    """Canaries by injected count: memorized share at every checkpoint (the same test on each
    canary's own 64 tokens), and whether attribution's top-1 for a memorized canary is one of its
    own copies (query: the canary's 64 tokens, loss on the last 32)."""
    truth = truth_sets(ground, cands, "partial")
    rows = []
    for step, mem in canary_mem.items():
        for count in sorted({it["count"] for it in items}):
            sel = [i for i, it in enumerate(items) if it["count"] == count]
            k = int(mem[sel].sum())
            lo, hi = wilson(k, len(sel))
            rows.append(
                {
                    "checkpoint": step,
                    "injected_count": count,
                    "n": len(sel),
                    "n_memorized": k,
                    "fraction": k / len(sel),
                    "ci_lo": lo,
                    "ci_hi": hi,
                }
            )
    ctx.write_table(
        paths.CANARY_MEMORIZATION_TABLE,
        pa.Table.from_pylist(rows, CANARY_MEMORIZATION_SCHEMA),
        note="95% Wilson intervals",
    )

    final_mem = canary_mem[final_step]
    chosen = [i for i in range(len(items)) if final_mem[i] and items[i]["item_id"] in truth]
    out = []
    if chosen:
        q_rows = windows[chosen].tolist()
        q_texts = [items[i]["prompt"] + items[i]["target"] for i in chosen]
        own = [truth[items[i]["item_id"]] for i in chosen]
        rankings = window_rankings(ctx, cands, final_step, None, q_rows, q_texts, "canaries", own)
        for method, ranking in rankings.items():
            order, _ = ranking.top()
            for qi, i in enumerate(chosen):
                traced = ranking.tracing(qi, "own")
                out.append(
                    {
                        "item_id": items[i]["item_id"],
                        "injected_count": items[i]["count"],
                        "method": method,
                        "checkpoint": final_step,
                        "top1_packed_id": int(order[qi, 0]),
                        "top1_is_own_copy": traced["top1_hit"],
                        "first_own_copy_rank": traced["first_hit_rank"],
                    }
                )
    ctx.write_table(
        paths.CANARY_ATTRIBUTION_TABLE,
        pa.Table.from_pylist(out, CANARY_ATTRIBUTION_SCHEMA),
        truth="own copy = partial: a packed sequence touching a document that carries the canary",
    )
    for method in ctx.config.methods:
        hits = [r["top1_is_own_copy"] for r in out if r["method"] == method]
        if hits:
            log.info("memorized canaries: %s top-1 is an own copy for %d/%d", method, sum(hits), len(hits))


CANARY_MEMORIZATION_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.int64()),
        ("injected_count", pa.int64()),
        ("n", pa.int64()),
        ("n_memorized", pa.int64()),
        ("fraction", pa.float64()),
        ("ci_lo", pa.float64()),
        ("ci_hi", pa.float64()),
    ]
)
MEMORIZED_COMPOSITION_SCHEMA = pa.schema(
    [
        ("setting", pa.string()),
        ("group", pa.string()),
        ("method", pa.string()),
        ("category", pa.string()),
        ("n", pa.int64()),
        ("share", pa.float64()),
        ("n_queries", pa.int64()),
    ]
)
CANARY_ATTRIBUTION_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("injected_count", pa.int32()),
        ("method", pa.string()),
        ("checkpoint", pa.int64()),
        ("top1_packed_id", pa.int64()),
        ("top1_is_own_copy", pa.bool_()),
        ("first_own_copy_rank", pa.int64()),
    ]
)


def window_rankings(ctx, cands, step, allowed, q_rows, q_texts, setting, truth=None) -> dict[str, Ranking]:
    """Rankings of 64-token windows (loss on the last ``continuation`` tokens) against the packed
    sequences in ``allowed`` (all when None; rows of a ranking are positions in ``allowed``), by
    every configured method, at checkpoint ``step``, streamed as the attribute stage streams them
    (top k, and the first rank of each query's ``truth`` rows when given).

    Over all candidates, the attribute stage's training index and Hessian at that checkpoint are
    reused when it has them; otherwise the index is built here.
    """
    cfg = ctx.config
    ckpt_dir = checkpoint_dir(ctx, step)
    labels = [[-100] * cfg.context + w[cfg.context :] for w in q_rows]
    keys = np.arange(len(cands.tokens)) if allowed is None else allowed
    work = ctx.out_dir / "indexes" / f"{setting}-step{step}"
    work.mkdir(parents=True, exist_ok=True)
    attribute_cfg = ctx.profile.attribute
    truth = truth if truth is not None else [None] * len(q_rows)

    def rank(blocks, totals=None) -> Ranking:
        return Ranking(len(q_rows), len(keys), cfg.top_k, {"own": truth}, sample_size=0).consume(
            blocks, totals
        )

    rankings = {}
    for method in memorization_methods(paths.resolve_input(attribute_cfg.methods_file), cfg.methods):
        if method.kind == "bm25":
            bm25 = baselines.BM25Scores(cands.texts.subset(keys), q_texts, attribute_cfg.chunk_rows)
            rankings[method.name] = rank(bm25.blocks(), bm25.totals)
            continue
        name = method.index_name  # a gradient method
        if not moments.available(name, ckpt_dir):
            log.info("%s: %s skipped at step%d (no optimizer state saved there)", setting, method.name, step)
            continue
        shared_folder = ctx.inputs[paths.ATTRIBUTE] / "indexes" / f"step{step}"
        shared = shared_folder / name
        own = allowed is not None or not (shared / "train").exists()
        # the query index is normalized as its training index is: by the attribute stage's state
        # where that index is reused; otherwise by one estimated here, once per checkpoint for
        # every setting (it depends on the checkpoint and the candidates only)
        if own:
            folder, settings = ctx.out_dir / "indexes" / f"step{step}", moments.Settings.of(ctx.profile)
            state = moments.states([name], ckpt_dir, folder, cands, step, settings)[name]
        else:
            state = moments.state_path(name, ckpt_dir, shared_folder)
        common = {
            "optimizer_state": state,
            "projection_dim": attribute_cfg.projection_dim,
            "token_batch_size": attribute_cfg.token_batch_size,
        }
        train = work / f"{name}-train" if own else shared / "train"
        if not train.exists():
            gradients.build_index(train, ckpt_dir, cands.tokens[keys], labels=None, **common)
        query = gradients.build_index(
            work / f"{name}-queries-{method.name}", ckpt_dir, q_rows, labels=labels, **common
        )
        hessian = None
        if method.hessian == "autocorrelation":
            hessian = shared / "hessian"
            if own or not hessian.exists():  # never write into the attribute stage's outputs
                hessian = work / f"{name}-hessian"
                if not hessian.exists():
                    gradients.autocorrelation_hessian(train, hessian, attribute_cfg.chunk_rows)
        scorer = method_scorer(train, query, method, hessian, attribute_cfg.chunk_rows)
        rankings[method.name] = rank(scorer.chunks(), scorer.totals)
    return rankings


def checkpoint_dir(ctx, step: int) -> Path:
    """The folder of checkpoint ``step`` as ``checkpoints.arrow`` records it (trained or from the Hub)."""
    for ckpt in ctx.input_table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist():
        if ckpt["step"] == step:
            return ctx.inputs[paths.TRAIN] / ckpt["path"]
    raise ConfigError(f"no checkpoint step{step} in checkpoints.arrow")


def rescore_evals(ctx, ckpt_dir: Path, step: int, cands, row_memorized: np.ndarray) -> None:
    """Source memorized-evals: check that the split's listed candidates are ours token for token,
    re-score a seeded sample of the split's listed sequences with the final checkpoint (their 64
    tokens are in the split) before trusting it, and compare with our own test on the candidates
    that the split lists."""
    from pythia_attribution.sources.memorized_evals import check_tokens, load_split

    cfg = ctx.config
    split = load_split(ctx.profile)
    row_seq = cands.row_seq_idx
    where = f"{ctx.profile.world.evals_repo} split {ctx.profile.world.evals_split}"
    tokens_checked = check_tokens(split, row_seq, cands.tokens, cands.row_packed, where)
    rng = np.random.default_rng(np.random.SeedSequence([ctx.profile.runtime.seed, 400]))
    take = np.sort(rng.choice(len(split), size=min(cfg.rescore_sample, len(split)), replace=False))
    sample = split.take(pa.array(take))
    width = cfg.context + cfg.continuation
    windows = np.array(sample["tokens"].to_pylist(), dtype=np.int64).reshape(len(sample), -1)[:, :width]
    windows = windows.reshape(len(sample), width)
    model, _ = load_checkpoint(ckpt_dir, compute_device())
    memorized, accuracy = memorization_test(model, windows, cfg.context, cfg.batch_size)
    listed = np.isin(row_seq, split["index"].to_numpy())
    table = pa.table(
        {
            "seq_idx": sample["index"],
            "listed_memorized": np.ones(len(sample), dtype=bool),
            "memorized": memorized,
            "tf_accuracy": accuracy.astype(np.float64),
            "checkpoint": np.full(len(sample), step, dtype=np.int64),
        }
    )
    agreement = float(memorized.mean()) if len(sample) else float("nan")
    ctx.write_table(
        paths.EVALS_RESCORE_TABLE,
        table,
        split=ctx.profile.world.evals_split,
        n_listed=len(split),
        agreement=agreement,
        candidates_listed=int(listed.sum()),
        candidates_listed_and_memorized=int(row_memorized[listed].sum()),
        candidates_listed_tokens_match=tokens_checked,
        note="seeded sample of the memorized-evals split re-scored with the final checkpoint",
    )
    log.info(
        "memorized-evals %s: %d listed; %.1f%% of a sample of %d re-score as memorized at step%d",
        ctx.profile.world.evals_split,
        len(split),
        100 * agreement,
        len(sample),
        step,
    )


MEMORIZATION_SUMMARY_SCHEMA = pa.schema(
    [
        ("seq_idx", pa.int64()),
        ("packed_id", pa.int64()),
        ("trained_step", pa.int64()),
        ("first_memorized", pa.int64()),
        ("memorized_final", pa.bool_()),
        ("forgotten", pa.bool_()),
    ]
)


def attribute_memorized(ctx, cands, windows, summary, exact, final_step) -> None:
    """Attribute memorized sequences (query: 64-token window, loss on its last 32 tokens)."""
    cfg = ctx.config
    mem = summary.to_pandas()
    mem = mem[mem["memorized_final"]].drop_duplicates("packed_id")
    if cfg.max_queries and len(mem) > cfg.max_queries:
        mem = mem.sample(n=cfg.max_queries, random_state=ctx.profile.runtime.seed)
    mem = mem.sort_values("packed_id")
    log.info("%d memorized packed sequences at step%d to attribute", len(mem), final_step)
    rows = []
    hasher = MinHasher(ctx.profile.duplicates, ctx.profile.runtime.seed)
    early_late = {
        int(r.packed_id): ("early" if r.first_memorized <= cfg.early_until else "late")
        for r in mem.itertuples()
    }
    attribute_at(ctx, cands, windows, mem, final_step, None, rows, hasher, exact, early_late, "final")
    if cfg.restricted:
        for step, g in mem.groupby(restricted_step(mem["first_memorized"].to_numpy(), cfg, final_step)):
            allowed = np.where(cands.first_step < int(step))[0]
            if len(allowed) == len(cands.tokens):
                allowed = None  # every sequence was trained before: the unrestricted index serves
            attribute_at(
                ctx, cands, windows, g, int(step), allowed, rows, hasher, exact, early_late, "first_memorized"
            )
    table = pa.Table.from_pylist(rows)
    ctx.write_table(paths.MEMORIZED_ATTRIBUTION_TABLE, table)
    df = table.to_pandas()
    comp = []
    if not df.empty:
        for (setting, group, method), g in df.groupby(["setting", "group", "method"]):
            for category in ("self", *CATEGORIES):
                n = int((g["category"] == category).sum())
                comp.append(
                    {
                        "setting": setting,
                        "group": group,
                        "method": method,
                        "category": category,
                        "n": n,
                        "share": n / len(g),
                        "n_queries": g["packed_query"].nunique(),
                    }
                )
    ctx.write_table(
        paths.MEMORIZED_COMPOSITION_TABLE, pa.Table.from_pylist(comp, MEMORIZED_COMPOSITION_SCHEMA)
    )


def restricted_step(first_memorized: np.ndarray, cfg, final_step: int) -> np.ndarray:
    """The checkpoint at which each memorized sequence is attributed over what was trained before:
    its first memorized checkpoint, or, where ``restricted_checkpoints`` lists some, the first of them
    at or after it (the final checkpoint where none is). Each distinct checkpoint costs a gradient
    index over the candidates, so listing a few bounds the stage's time."""
    if not cfg.restricted_checkpoints:
        return first_memorized.astype(np.int64)
    chosen = np.array(sorted({*cfg.restricted_checkpoints, final_step}), dtype=np.int64)
    return chosen[np.searchsorted(chosen, first_memorized, side="left")]


def attribute_at(ctx, cands, windows, mem, step, allowed, rows, hasher, exact, early_late, setting) -> None:
    if not len(mem):
        return
    q_ids = mem["packed_id"].to_numpy()
    q_rows = windows[q_ids].tolist()
    tokenizer = AutoTokenizer.from_pretrained(ctx.inputs[paths.CORPUS] / paths.TOKENIZER_DIR)
    q_texts = tokenizer.batch_decode(q_rows)  # the 64-token windows, as BM25 and TF-IDF see them
    keys = np.arange(len(cands.tokens)) if allowed is None else allowed
    rankings = window_rankings(ctx, cands, step, allowed, q_rows, q_texts, setting)
    needed = np.concatenate([ranking.top()[0].ravel() for ranking in rankings.values()])
    tfidf = TfidfCosines(cands.texts.subset(keys), q_texts, needed)
    for method, ranking in rankings.items():
        order, top = ranking.top()
        for qi, q in enumerate(q_ids):
            for rank, (col, score) in enumerate(zip(order[qi], top[qi], strict=True), start=1):
                pid = int(keys[col])
                feats = pair_features(
                    ctx.profile.duplicates,
                    hasher,
                    ("w", int(q)),
                    q_rows[qi],
                    pid,
                    cands.tokens[pid].tolist(),
                    tfidf.get(qi, int(col)),
                )
                category = "self" if pid == q else feats["category"]
                rows.append(
                    {
                        "setting": setting,
                        "checkpoint": step,
                        "group": early_late[int(q)],
                        "method": method,
                        "packed_query": int(q),
                        "rank": rank,
                        "packed_id": pid,
                        "score": float(score),
                        "category": category,
                        "query_exact_count": int(exact[q]),
                        **{k: v for k, v in feats.items() if k != "category"},
                    }
                )
