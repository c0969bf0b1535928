"""Leave-k-out stage (outside ``all``): retrain without what a method retrieves, and the change.

For a seeded sample of the behaviors exhibited at the final checkpoint, each method's top k
training sequences per behavior are removed together, in **one** retraining run per method
(the removals of different behaviors grouped, as the causal reference's budget requires); a
ground-truth run removes up to k of each behavior's own ground-truth sequences instead, and the
``random`` method's top k (seeded random sequences) is the floor, with ``random_draws - 1``
further seeded draws of as many random sequences (``random_2``, ...) to show how much the floor
itself varies between draws. Every run retrains the model
from its seeded initialization on the same batches in the same order with the removed sequences'
loss weight set to zero, every epoch (``train.train_model``); the training run itself is the
baseline, so the change in a behavior's target log-probability is the paired effect of removing
those sequences: no other source of variation exists between the two runs.

A retrained model depends only on the training run it repeats and on the removed sequences, so
it is kept under ``results/<profile>/retrained/<key>/`` (the key hashes the baseline model's
sha256, the removed sequences, the train config, the seed and the training code) and reused by
any later run that asks for the same removal, e.g. after the attribute stage adds a method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch
from transformers import GPTNeoXForCausalLM

from pythia_attribution import evaluation, paths, stage, tables, train
from pythia_attribution import model as model_module
from pythia_attribution.attribute import metrics
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.config import to_jsonable
from pythia_attribution.errors import ConfigError
from pythia_attribution.model import load_checkpoint, set_threads
from pythia_attribution.probe import teacher_forced

log = logging.getLogger(__name__)
RANDOM = "random"


def removal_sets(cfg, attributions, behaviors, probes, truth, pool, seed) -> dict[str, dict[str, np.ndarray]]:
    """Per run (each method, the random floor's further draws, and the ground truth), each sampled
    behavior's removed packed ids; ``pool``: the packed ids a random draw chooses from."""
    runs: dict[str, dict[str, np.ndarray]] = {}
    top = attributions[(attributions["rank"] <= cfg.top_k) & attributions["behavior_id"].isin(behaviors)]
    for method in cfg.methods:
        chosen = top[top["method"] == method]
        runs[method] = {
            b: np.sort(chosen.loc[chosen["behavior_id"] == b, "packed_id"].to_numpy(np.int64))
            for b in behaviors
        }
    for draw in range(2, cfg.random_draws + 1):
        runs[random_run(draw)] = random_removals(pool, behaviors, cfg.top_k, seed, draw)
    runs[REFERENCE] = {
        b: evaluation.reference(truth.get(probes[b]["item_id"], np.zeros(0, np.int64)), cfg.top_k, seed, 43)
        for b in behaviors
    }
    return runs


def random_run(draw: int) -> str:
    """The name of the random floor's ``draw``-th run (the first is the ``random`` method's)."""
    return RANDOM if draw == 1 else f"{RANDOM}_{draw}"


def is_random(run: str) -> bool:
    return run == RANDOM or (run.startswith(f"{RANDOM}_") and run[len(RANDOM) + 1 :].isdigit())


def random_removals(pool: np.ndarray, behaviors: list[str], k: int, seed: int, draw: int) -> dict:
    """A further draw of the random floor: per behavior (in sorted order, one generator per draw),
    ``k`` packed ids drawn uniformly without replacement from ``pool``, sorted: distributed as the
    ``random`` method's top k (uniform scores over every candidate), from a generator of its own."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 44, draw]))
    return {
        b: np.sort(rng.choice(pool, min(k, len(pool)), replace=False)).astype(np.int64) for b in behaviors
    }


def code_sha256() -> str:
    """The training code a retrained model depends on (as stages count code: without comments and
    docstrings)."""
    digest = hashlib.sha256()
    for module in (train, model_module):
        digest.update(stage.code_text(Path(module.__file__)).encode())
    return digest.hexdigest()


def run_key(profile, baseline: dict, removed: np.ndarray, threads: int) -> dict:
    """Everything a retrained model depends on (the thread count too: it changes the arithmetic)."""
    return {
        "threads": threads,
        "baseline_step": baseline["step"],
        "baseline_model_sha256": baseline["model_sha256"],
        "removed_packed_ids_sha256": hashlib.sha256(np.asarray(removed, np.int64).tobytes()).hexdigest(),
        "n_removed": len(removed),
        "train": to_jsonable(profile.train),
        "seed": profile.runtime.seed,
        "code_sha256": code_sha256(),
        "torch": version("torch"),
    }


def retrained(profile, key: dict, tokens, batch_size, removed_rows, vocab_size, name) -> tuple:
    """The model retrained with ``removed_rows`` zero-weighted: adopted from the cache when its key
    matches, else trained and cached (through a ``.part`` folder). Returns (model, seconds, adopted)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = paths.retrained_dir(profile.name) / digest
    record = folder / "key.json"
    if record.is_file() and json.loads(record.read_text()) == key:
        log.info("leave-out %s: adopting the retrained model %s", name, folder)
        model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # no tokenizer kept
        return model, json.loads((folder / "run.json").read_text())["seconds"], True
    started = time.perf_counter()
    model, _, log_rows = train.train_model(
        profile.train, tokens, batch_size, vocab_size, seed=profile.runtime.seed, removed=removed_rows,
        desc=f"retrain {name}",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    (part / "run.json").write_text(
        json.dumps({"seconds": round(seconds, 1), "final_loss": log_rows[-1]["loss"]}, indent=2) + "\n"
    )
    (part / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    part.rename(folder)
    model.eval()
    return model, seconds, False


def run(ctx) -> None:
    cfg = ctx.config
    profile = ctx.profile
    seed = profile.runtime.seed
    set_threads(profile.runtime.threads)
    view = evaluation.at_final(ctx, cfg.reference_truth)
    attributions, final = view.attributions, view.final
    rows: list[dict] = []
    runs_rows: list[dict] = []
    if cfg.methods:
        if profile.train.source != "train":
            raise ConfigError(
                f"leave_out.methods: retraining needs the model trained here (train.source = 'train'), "
                f"not train.source = '{profile.train.source}'; set leave_out.methods = [] for this profile"
            )
        unknown = sorted(set(cfg.methods) - set(attributions["method"]))
        if unknown:
            raise ConfigError(f"leave_out.methods: '{unknown[0]}' has no attributions at step{final['step']}")
        behaviors = evaluation.sample(view.behaviors(), cfg.max_behaviors, seed, 41)
        rows, runs_rows = leave_out(ctx, view, behaviors)
    else:
        log.info("leave_out.methods is empty: nothing to retrain")
    how = (
        "retrained from the seeded initialization on the training run's batches with the removed "
        f"sequences' loss weight zero (denominator unchanged), every epoch; baseline: the training "
        f"run (step{final['step']})"
    )
    table = pa.Table.from_pylist(rows, LEAVE_OUT_SCHEMA)
    ctx.write_table(
        paths.LEAVE_OUT_TABLE,
        table,
        retraining=how,
        removed=(
            f"per sampled behavior, each method's top {cfg.top_k}; {REFERENCE}: up to {cfg.top_k} "
            f"{cfg.reference_truth} ground-truth sequences; all of a run's removals at once"
        ),
    )
    ctx.write_table(paths.LEAVE_OUT_RUNS_TABLE, pa.Table.from_pylist(runs_rows, LEAVE_OUT_RUNS_SCHEMA))
    ctx.write_table(
        paths.LEAVE_OUT_METRICS_TABLE,
        aggregate(table, seed, profile.attribute.bootstrap),
        bootstrap=(
            f"percentile bootstrap over behaviors, {profile.attribute.bootstrap} resamples, 95% interval"
        ),
        vs_random=f"paired per behavior: a run's delta_logp minus the '{RANDOM}' run's",
        random_floor=(
            f"the random runs ('{RANDOM}', the random method's top k, and random_draws - 1 further "
            f"seeded draws, '{RANDOM}_2', ...): random_min and random_max, the least and the largest of "
            "their mean delta_logp in the family; random_costlier_than, of the random_runs random runs "
            "(a random run: the others), how many have a mean delta_logp above the run's (its removal "
            "cost more than theirs)"
        ),
    )


def leave_out(ctx, view: evaluation.AtFinal, behaviors: list[str]):
    """One retraining per run and every sampled behavior measured on each: the stage's rows."""
    cfg, profile = ctx.config, ctx.profile
    cands, truth, final, probes = view.cands, view.truth, view.final, view.probes
    # the training run's thread count: torch's CPU arithmetic depends on it, and removing nothing
    # must give the training run bit for bit
    threads = tables.provenance(ctx.input_table(paths.TRAIN, paths.TRAINING_LOG_TABLE)).get(
        "threads", profile.runtime.threads
    )
    if threads != profile.runtime.threads:
        log.info("leave-out: retraining with %d threads, as the training run did", threads)
    set_threads(threads)
    pool = np.arange(len(cands.first_step))  # every packed sequence, as the random method ranks
    runs = removal_sets(cfg, view.attributions, behaviors, probes, truth, pool, profile.runtime.seed)
    tokens, batch_size = train.corpus_tokens(view.corpus)
    baseline, tokenizer = load_checkpoint(view.final_dir)
    queries = [
        SimpleNamespace(prompt_ids=probes[b]["prompt_ids"], target_ids=probes[b]["target_ids"])
        for b in behaviors
    ]
    before = teacher_forced(baseline, queries, 64, tokenizer.pad_token_id)
    del baseline
    log.info("leave-out: %d behaviors, runs %s (k = %d)", len(behaviors), list(runs), cfg.top_k)
    rows, runs_rows = [], []
    for name, per_behavior in runs.items():
        removed = np.unique(np.concatenate([np.zeros(0, np.int64), *per_behavior.values()]))
        removed_rows = np.isin(cands.row_packed, removed)
        key = run_key(profile, final, removed, threads)
        model, seconds, adopted = retrained(
            profile, key, tokens, batch_size, removed_rows, len(tokenizer), name
        )
        after = teacher_forced(model, queries, 64, tokenizer.pad_token_id)
        runs_rows.append(
            {"run": name, "floor": is_random(name), "n_removed": len(removed),
             "n_rows_removed": int(removed_rows.sum()), "seconds": float(seconds), "adopted": adopted,
             "key": key["removed_packed_ids_sha256"]}
        )  # fmt: skip
        for b, pre, post in zip(behaviors, before, after, strict=True):
            own = truth.get(probes[b]["item_id"], np.zeros(0, np.int64))
            rows.append(
                {"run": name, "behavior_id": b, "family": probes[b]["family"],
                 "item_id": probes[b]["item_id"],
                 "n_removed_own": len(per_behavior[b]),
                 "n_removed_own_truth": int(np.isin(per_behavior[b], own).sum()),
                 "n_truth": len(own), "n_truth_removed": int(np.isin(own, removed).sum()),
                 "logp_before": pre["target_logprob"], "logp_after": post["target_logprob"],
                 "delta_logp": post["target_logprob"] - pre["target_logprob"],
                 "exhibited_before": pre["exhibited_teacher_forced"],
                 "exhibited_after": post["exhibited_teacher_forced"]}
            )  # fmt: skip
        log.info(
            "leave-out %s: %d sequences removed (%d training rows); mean change %.3f nats",
            name, len(removed), int(removed_rows.sum()),
            float(np.mean([r["delta_logp"] for r in rows if r["run"] == name])),
        )  # fmt: skip
        del model
    return rows, runs_rows


def aggregate(table: pa.Table, seed: int, n_boot: int) -> pa.Table:
    """Per (run, family): the mean change with its interval, the share of exhibited behaviors lost,
    the paired difference from the random run, and where the run's mean change falls among the
    random runs' (the floor's spread between draws)."""
    df = table.to_pandas()
    if df.empty:
        return pa.Table.from_pylist([], LEAVE_OUT_METRICS_SCHEMA)
    floor = df[df["run"] == RANDOM].set_index("behavior_id")["delta_logp"]
    df = df.assign(
        lost=(df["exhibited_before"] & ~df["exhibited_after"]).astype(float),
        vs_random=df["delta_logp"] - df["behavior_id"].map(floor) if len(floor) else np.nan,
    )
    rows = []
    for family, sub in [("all", df), *sorted(df.groupby("family"), key=lambda kv: kv[0])]:
        means = sub.groupby("run")["delta_logp"].mean()
        floor_means = means[[is_random(r) for r in means.index]]
        for name, g in sorted(sub.groupby("run"), key=lambda kv: kv[0]):
            row = {"run": name, "family": family, "n_behaviors": len(g)}
            for col in ("delta_logp", "lost", "vs_random"):
                values = g[col].dropna().to_numpy()
                lo, hi = metrics.bootstrap_ci(values, seed, n_boot)
                row.update({col: float(values.mean()) if len(values) else float("nan"), f"{col}_lo": lo,
                            f"{col}_hi": hi})  # fmt: skip
            others = floor_means.drop(name, errors="ignore")  # a random run is ranked among the others
            row.update(
                {"random_runs": len(others),
                 "random_costlier_than": int((others > means[name]).sum()),
                 "random_min": float(floor_means.min()) if len(floor_means) else float("nan"),
                 "random_max": float(floor_means.max()) if len(floor_means) else float("nan")}
            )  # fmt: skip
            rows.append(row)
    return pa.Table.from_pylist(rows, LEAVE_OUT_METRICS_SCHEMA)


LEAVE_OUT_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("behavior_id", pa.string()),
        ("family", pa.string()),
        ("item_id", pa.string()),
        ("n_removed_own", pa.int64()),
        ("n_removed_own_truth", pa.int64()),
        ("n_truth", pa.int64()),
        ("n_truth_removed", pa.int64()),
        ("logp_before", pa.float64()),
        ("logp_after", pa.float64()),
        ("delta_logp", pa.float64()),
        ("exhibited_before", pa.bool_()),
        ("exhibited_after", pa.bool_()),
    ]
)
LEAVE_OUT_RUNS_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("floor", pa.bool_()),  # a run of the random floor: 'random' and its further draws
        ("n_removed", pa.int64()),
        ("n_rows_removed", pa.int64()),
        ("seconds", pa.float64()),
        ("adopted", pa.bool_()),
        ("key", pa.string()),
    ]
)
LEAVE_OUT_METRICS_SCHEMA = pa.schema(
    [("run", pa.string()), ("family", pa.string()), ("n_behaviors", pa.int64())]
    + [(f"{c}{s}", pa.float64()) for c in ("delta_logp", "lost", "vs_random") for s in ("", "_lo", "_hi")]
    + [
        ("random_runs", pa.int64()),
        ("random_costlier_than", pa.int64()),
        ("random_min", pa.float64()),
        ("random_max", pa.float64()),
    ]
)
