"""Select and fine-tune: does training an early model on what a method selects teach a family's
behaviors? The second seed pipeline, in a world where the answer is known.

For each family in ``causal.finetune_families``, the evaluation set (``causal.finetune_set``) is
the family's behaviors whose items are stated at least ``finetune_min_count`` times (``stated``), or
those exhibited at the final checkpoint (``exhibited``: a world without planted items, such as the
Pile, where the set has no complete copies to serve as the reference). Every training sequence is
scored against the whole set at once, per method: gradient methods by the cosine between the sequence's
attribution vector and the mean of the set's normalized query vectors (the mean of the per-query
cosines, which ranks the same), computed at the final checkpoint as the attribute stage computes
them; ``ekfac`` by the mean of its EK-FAC influences on the set's queries (its influence on the
set's mean target loss: every set's summed transformed query scored in one pass over the training
rows, with the attribute stage's factors); ``bm25`` by the mean of each query's scores divided by
that query's best; ``activation`` by the cosine with the mean of the queries' normalized mean
activations; ``random`` by seeded uniform scores. Each method's top ``finetune_k`` are selected;
``ground_truth`` (the set's complete copies, a seeded sample of ``finetune_k`` when there are more)
is the reference, where the set has any.

An early checkpoint is then fine-tuned on each selection, the same way for every method: AdamW
with the run's betas, weight decay and clipping, a constant ``finetune_lr``, ``finetune_steps``
batches of ``finetune_batch`` sequences drawn in a seeded order from the selection (cycling through
it, so a smaller selection gets the same number of steps). The checkpoint is the latest at which at
most ``finetune_max_exhibited`` of the set is exhibited, before the behaviors are learned. Before
and after, every behavior of the set is measured on its own prompt and on a paraphrase the corpus
never states (``causal.paraphrase_file``): the target's log-probability and whether every target
token is the argmax given the prompt (the teacher-forced form of "the greedy continuation starts
with the target").
"""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pythia_attribution import evaluation, paths
from pythia_attribution.attribute import activations, baselines, ekfac, gradients, metrics, moments
from pythia_attribution.attribute.methods import REFERENCE, load_methods
from pythia_attribution.attribute.stage import method_scorer
from pythia_attribution.model import load_checkpoint
from pythia_attribution.probe import teacher_forced
from pythia_attribution.train import param_groups

log = logging.getLogger(__name__)
PROMPTS = ("original", "paraphrase")


def evaluation_sets(cfg, probes_final: list[dict], complete: dict) -> dict[str, list[dict]]:
    """Family -> its behaviors (probe rows at the final checkpoint) in the evaluation set:
    with at least ``finetune_min_count`` statements and a complete copy in the corpus (``stated``),
    or exhibited (``exhibited``)."""
    if cfg.finetune_set == "exhibited":
        rule = "exhibited at the final checkpoint"

        def member(p: dict) -> bool:
            return bool(p["exhibited"])
    else:
        rule = f"with a complete copy stated {cfg.finetune_min_count}+ times"

        def member(p: dict) -> bool:
            count = p["count"]
            return p["item_id"] in complete and count is not None and count >= cfg.finetune_min_count

    out = {}
    for family in cfg.finetune_families:
        rows = [p for p in probes_final if p["family"] == family and member(p)]
        if rows:
            out[family] = sorted(rows, key=lambda p: p["behavior_id"])
        else:
            log.warning("select-and-fine-tune: family '%s' has no behavior %s; skipped", family, rule)
    return out


def early_checkpoint(cfg, probes: list[dict], behaviors: list[dict]) -> int:
    """The latest checkpoint at which at most ``finetune_max_exhibited`` of ``behaviors`` is exhibited."""
    ids = {b["behavior_id"] for b in behaviors}
    by_step: dict[int, list[bool]] = {}
    for p in probes:
        if p["behavior_id"] in ids:
            by_step.setdefault(p["checkpoint"], []).append(bool(p["exhibited"]))
    eligible = [s for s, ex in by_step.items() if np.mean(ex) <= cfg.finetune_max_exhibited]
    return max(eligible) if eligible else min(by_step)


class Selector:
    """Scores of every candidate against an evaluation set, per method (see the module doc)."""

    def __init__(self, ctx, cands, final_dir, final_step, seed):
        self.ctx, self.cands, self.final_dir, self.seed = ctx, cands, final_dir, seed
        self.final_step = final_step
        acfg = ctx.profile.attribute
        self.acfg = acfg
        self.methods = {m.name: m for m in load_methods(paths.resolve_input(acfg.methods_file), acfg.methods)}
        self.indexes = ctx.inputs[paths.ATTRIBUTE] / "indexes" / f"step{final_step}"
        self._keys = None
        self._set_scores: dict[tuple, np.ndarray] = {}

    def prepare(self, names: list[str], sets: dict[str, list[dict]], work) -> None:
        """Score every evaluation set at once by the methods whose cost is a pass over every
        training row (``ekfac``): the attribute stage's EK-FAC factors at the final checkpoint, the
        sets' query gradients through their damped inverse, summed per set, and one scoring pass."""
        families = list(sets)
        behaviors = [b for f in families for b in sets[f]]
        bounds = np.cumsum([0] + [len(sets[f]) for f in families])
        members = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for name in names:
            method = self.methods[name]
            if method.kind != "ekfac" or not behaviors:
                continue
            factors = self.indexes / method.name / "factors"
            if not factors.exists():
                log.info("select-and-fine-tune: %s skipped (no EK-FAC factors at %s)", name, factors)
                continue
            timings: dict[str, float] = {}
            store = ekfac.scores(
                work / name, self.final_dir, self.cands.tokens, [b["prompt_ids"] for b in behaviors],
                [b["target_ids"] for b in behaviors], token_batch_size=self.acfg.token_batch_size,
                damping=method.damping, seed=self.seed, factors=factors, query_sets=members,
                timings=timings,
            )  # fmt: skip
            log.info("select-and-fine-tune: %s over %d sets: %s", name, len(families),
                     ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))  # fmt: skip
            scores = ekfac.store_totals(store)(np.arange(len(self.cands.tokens)))
            for j, family in enumerate(families):
                set_scores = scores[j].astype(np.float64) / len(sets[family])
                self._set_scores[_set_key(name, sets[family])] = set_scores

    def scores(self, name: str, behaviors: list[dict], work) -> np.ndarray | None:
        method = self.methods[name]
        rows = [b["prompt_ids"] + b["target_ids"] for b in behaviors]
        n = len(self.cands.texts)
        if method.kind == "gradient":
            folder = self.indexes / method.index_name
            if not (folder / "train").exists():
                return None  # attribute skipped it (no optimizer state)
            opt = moments.state_path(method.index_name, self.final_dir, self.indexes)
            query = gradients.query_index(
                work / method.name, self.final_dir, [b["prompt_ids"] for b in behaviors],
                [b["target_ids"] for b in behaviors], optimizer_state=opt,
                projection_dim=self.acfg.projection_dim, token_batch_size=self.acfg.token_batch_size,
            )  # fmt: skip
            hessian = folder / "hessian" if method.hessian == "autocorrelation" else None
            scorer = method_scorer(
                gradients.shards_of(folder / "train"), query, method, hessian, self.acfg.chunk_rows
            )
            return _mean_scores(scorer, n)
        if method.kind == "ekfac":
            return self._set_scores.get(_set_key(name, behaviors))
        if method.kind == "bm25":
            texts = [b["prompt"] + b["target"] for b in behaviors]
            bm25 = baselines.BM25Scores(self.cands.texts, texts, self.acfg.chunk_rows)
            peak = np.zeros(len(texts), dtype=np.float32)  # each query's best score, then its scores / it
            for _, block in bm25.blocks():
                peak = np.maximum(peak, block.max(axis=1))
            mean = np.empty(n, dtype=np.float32)
            positive = peak > 0
            for start, block in bm25.blocks():
                block[positive] /= peak[positive, None]
                mean[start : start + block.shape[1]] = np.mean(block, axis=0)
            return mean
        if method.kind == "activation":
            with torch.no_grad():
                if self._keys is None:  # the final model and every candidate's activation, once
                    self._load_model()
                    self._keys = baselines.mean_activations(
                        self._model, self.cands.tokens[:, :-1].tolist(), self._layer
                    )
                if method.query == "difference":  # the mean of the set's unit differences
                    q = self._directions(behaviors, self._controls(behaviors)).mean(axis=0)
                else:
                    q = baselines.mean_activations(self._model, rows, self._layer).mean(axis=0)
            return self._keys @ (q / max(np.linalg.norm(q), 1e-12))
        if method.kind == "activation_change":
            folder = self.indexes / "raw"
            if not (folder / "train").exists():
                return None  # attribute built no raw index
            ctrls = self._controls(behaviors)
            q = activations.change_queries(
                work / method.name, self.final_dir, behaviors, ctrls, self._directions(behaviors, ctrls),
                self._layer, projection_dim=self.acfg.projection_dim,
                token_batch_size=self.acfg.token_batch_size,
            )  # fmt: skip
            scorer = gradients.GradientScorer(
                gradients.shards_of(folder / "train"), q, unit_norm=method.unit_norm, hessian_path=None,
                chunk_rows=self.acfg.chunk_rows,
            )  # fmt: skip
            return _mean_scores(scorer, n)
        if method.kind == "random":
            return np.random.default_rng(np.random.SeedSequence([self.seed, 47, len(behaviors)])).random(n)
        raise ValueError(f"select-and-fine-tune: no selection rule for method kind '{method.kind}'")

    def _load_model(self) -> None:
        if getattr(self, "_model", None) is None:
            self._model, _ = load_checkpoint(self.final_dir)
            self._layer = baselines.middle_layer(self._model.config.num_hidden_layers)

    def _controls(self, behaviors: list[dict]) -> list[dict]:
        """Each behavior's control completion, drawn as attribute draws it: from every behavior probed
        at the final checkpoint (read once)."""
        if getattr(self, "_pool", None) is None:
            probes = self.ctx.input_table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
            self._pool = [p for p in probes if p["checkpoint"] == self.final_step]
        return activations.controls(behaviors, self._pool, self.seed)

    def _directions(self, behaviors: list[dict], ctrls: list[dict]) -> np.ndarray:
        """The activation-space unit target-minus-control differences of ``behaviors``."""
        self._load_model()
        return activations.directions(self._model, behaviors, ctrls, self._layer)


def _set_key(method: str, behaviors: list[dict]) -> tuple:
    """What ``Selector.prepare``'s scores of an evaluation set are kept under."""
    return method, tuple(b["behavior_id"] for b in behaviors)


def _mean_scores(scorer, n: int) -> np.ndarray:
    """Each training row's mean score over a scorer's queries (with unit-norm queries: its score
    against the mean of the normalized query vectors)."""
    out = np.zeros(n, dtype=np.float64)
    for start, block in scorer.chunks():
        out[start : start + block.shape[1]] = block.mean(axis=0)
    return out


def select(scores: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` rows, ties broken by the lower row."""
    ids, _ = baselines.topk(scores[None].astype(np.float32), k)
    return ids[0]


def finetune(ckpt_dir, tokens: np.ndarray, train_cfg, cfg, seed: int):
    """The checkpoint's model after ``finetune_steps`` AdamW steps on batches drawn from ``tokens``."""
    torch.manual_seed(seed)
    model, _ = load_checkpoint(ckpt_dir)
    model.train()
    optimizer = torch.optim.AdamW(
        param_groups(model, train_cfg.weight_decay), lr=cfg.finetune_lr,
        betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
    )  # fmt: skip
    rng = np.random.default_rng(np.random.SeedSequence([seed, 53]))
    need = cfg.finetune_steps * cfg.finetune_batch
    order = np.concatenate([rng.permutation(len(tokens)) for _ in range(-(-need // len(tokens)))])[:need]
    for step in range(cfg.finetune_steps):
        batch = torch.from_numpy(
            tokens[order[step * cfg.finetune_batch : (step + 1) * cfg.finetune_batch]].astype(np.int64)
        )
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
    model.eval()
    return model


def measure(model, queries: dict[str, list], pad_id: int) -> dict[str, list[dict]]:
    """Teacher-forced target log-probability and exact argmax match of each prompt kind's queries."""
    with torch.no_grad():
        return {kind: teacher_forced(model, qs, 64, pad_id) for kind, qs in queries.items()}


def run(ctx, cands, truth_complete, probes, ckpts, paraphrases) -> tuple[pa.Table, pa.Table]:
    """The select-and-fine-tune tables of the causal stage (see the module doc)."""
    seed = ctx.profile.runtime.seed
    rows = finetune_rows(ctx, cands, truth_complete, probes, ckpts, paraphrases, [seed])
    table = pa.Table.from_pylist(rows, FINETUNE_SCHEMA)  # without the rows' order_seed
    return table, aggregate(table, seed, ctx.profile.attribute.bootstrap)


def finetune_rows(
    ctx, cands, truth_complete, probes, ckpts, paraphrases, order_seeds: list[int]
) -> list[dict]:
    """The select-and-fine-tune table's rows, each selection fine-tuned once per seed of
    ``order_seeds`` (the batch order and torch's seed; each row names its ``order_seed``). The
    selections and the reference sample use the profile's seed whatever the order seeds; the stage
    runs the profile's seed alone, ``experiments/finetune_seeds.py`` several."""
    cfg = ctx.config
    seed = ctx.profile.runtime.seed
    final = max(ckpts, key=lambda c: c["step"])
    final_dir = ctx.inputs[paths.TRAIN] / final["path"]
    by_step = {c["step"]: c for c in ckpts}
    probes_final = [p for p in probes if p["checkpoint"] == final["step"]]
    sets = evaluation_sets(cfg, probes_final, truth_complete)
    selector = Selector(ctx, cands, final_dir, final["step"], seed)
    methods = [m for m in (cfg.methods or list(ctx.profile.attribute.methods)) if m in selector.methods]
    work = ctx.out_dir / "work"
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(final_dir).pad_token_id
    selector.prepare(methods, sets, work / "sets")
    rows = []
    for family, behaviors in sets.items():
        step = early_checkpoint(cfg, probes, behaviors)
        ckpt_dir = ctx.inputs[paths.TRAIN] / by_step[step]["path"]
        queries = {
            "original": [
                SimpleNamespace(prompt_ids=b["prompt_ids"], target_ids=b["target_ids"]) for b in behaviors
            ],
            "paraphrase": [paraphrases.get(b["item_id"]) for b in behaviors],
        }
        has_para = [q is not None for q in queries["paraphrase"]]
        queries["paraphrase"] = [q for q in queries["paraphrase"] if q is not None]
        base_model, _ = load_checkpoint(ckpt_dir)
        before = measure(base_model, queries, pad_id)
        selections: dict[str, np.ndarray] = {}
        for name in methods:
            scores = selector.scores(name, behaviors, work / family)
            if scores is not None:
                selections[name] = select(scores, cfg.finetune_k)
            else:
                log.info("select-and-fine-tune %s: no selection by %s (no index at the final checkpoint, "
                         "or a method without one)", family, name)  # fmt: skip
        known = [truth_complete[b["item_id"]] for b in behaviors if b["item_id"] in truth_complete]
        gt_all = np.unique(np.concatenate(known)) if known else np.zeros(0, np.int64)
        if len(gt_all):  # no reference where the set's items have no complete copies (the Pile)
            selections[REFERENCE] = evaluation.reference(gt_all, cfg.finetune_k, seed, 59)
        log.info("select-and-fine-tune %s: %d behaviors, from step%d", family, len(behaviors), step)
        runs = [(name, chosen, s) for name, chosen in selections.items() for s in order_seeds]
        for name, chosen, order_seed in tqdm(runs, desc=f"fine-tune {family}", unit="run"):
            model = finetune(ckpt_dir, cands.tokens[chosen], ctx.profile.train, cfg, order_seed)
            after = measure(model, queries, pad_id)
            n_truth = int(np.isin(chosen, gt_all).sum()) if len(gt_all) else None  # unknown, not 0
            for kind in PROMPTS:
                members = [b for b, ok in zip(behaviors, has_para, strict=True) if ok or kind == "original"]
                for b, pre, post in zip(members, before[kind], after[kind], strict=True):
                    rows.append(
                        {"family": family, "method": name, "from_step": step, "behavior_id": b["behavior_id"],
                         "prompt_kind": kind, "n_selected": len(chosen), "n_selected_truth": n_truth,
                         "logp_before": pre["target_logprob"], "logp_after": post["target_logprob"],
                         "delta_logp": post["target_logprob"] - pre["target_logprob"],
                         "exhibited_before": pre["exhibited_teacher_forced"],
                         "exhibited_after": post["exhibited_teacher_forced"], "order_seed": order_seed}
                    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)  # the evaluation sets' query gradients
    return rows


def _count(value) -> int | None:
    """An int column's value as pandas hands it over: None or a float NaN where it is null."""
    return None if value is None or value != value else int(value)


def aggregate(table: pa.Table, seed: int, n_boot: int) -> pa.Table:
    """Per (family, method, prompt kind): mean change of the target's log-probability over behaviors,
    the exhibited rate after, and the paired difference from ``random``, with intervals."""
    df = table.to_pandas()
    if df.empty:
        return pa.Table.from_pylist([], FINETUNE_METRICS_SCHEMA)
    rows = []
    for (family, kind), sub in df.groupby(["family", "prompt_kind"], sort=True):
        floor = sub[sub["method"] == "random"].set_index("behavior_id")["delta_logp"]
        for method, g in sub.groupby("method", sort=True):
            g = g.sort_values("behavior_id")
            delta = g["delta_logp"].to_numpy()
            row = {"family": family, "prompt_kind": kind, "method": method, "n_behaviors": len(g),
                   "from_step": int(g["from_step"].iloc[0]), "n_selected": int(g["n_selected"].iloc[0]),
                   "n_selected_truth": _count(g["n_selected_truth"].iloc[0]),
                   "exhibited_before": float(g["exhibited_before"].mean())}  # fmt: skip
            for col, values in (
                ("delta_logp", delta),
                ("exhibited_after", g["exhibited_after"].to_numpy(float)),
            ):
                lo, hi = metrics.bootstrap_ci(values, seed, n_boot)
                row.update({col: float(values.mean()), f"{col}_lo": lo, f"{col}_hi": hi})
            if len(floor):
                paired = delta - floor.reindex(g["behavior_id"]).to_numpy()
                lo, hi = metrics.bootstrap_ci(paired, seed, n_boot)
                row.update(
                    {"minus_random": float(paired.mean()), "minus_random_lo": lo, "minus_random_hi": hi}
                )
            rows.append(row)
    return pa.Table.from_pylist(rows, FINETUNE_METRICS_SCHEMA)


FINETUNE_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("method", pa.string()),
        ("from_step", pa.int64()),
        ("behavior_id", pa.string()),
        ("prompt_kind", pa.string()),
        ("n_selected", pa.int64()),
        ("n_selected_truth", pa.int64()),
        ("logp_before", pa.float64()),
        ("logp_after", pa.float64()),
        ("delta_logp", pa.float64()),
        ("exhibited_before", pa.bool_()),
        ("exhibited_after", pa.bool_()),
    ]
)
FINETUNE_METRICS_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("prompt_kind", pa.string()),
        ("method", pa.string()),
        ("n_behaviors", pa.int64()),
        ("from_step", pa.int64()),
        ("n_selected", pa.int64()),
        ("n_selected_truth", pa.int64()),
        ("exhibited_before", pa.float64()),
    ]
    + [
        (f"{c}{s}", pa.float64())
        for c in ("delta_logp", "exhibited_after", "minus_random")
        for s in ("", "_lo", "_hi")
    ]
)
