"""Causal stage: does what attribution retrieves *change* the behavior? Tail-patch.

Tail-patch (Chang et al. 2024, TrackStar's causal metric): from the final checkpoint, one more
optimizer step on one training sequence, then the change in the target's log-probability given
the prompt. A method's score for a behavior is the mean change over its top k; the ``random``
method's top k (seeded random sequences) is the floor and the behavior's own ground-truth
sequences (complete copies) are the reference.

The step is the training run's: AdamW with the saved moments and step count, the learning rate
and weight decay the run ended with, the sequence's training loss (mean next-token cross-entropy
over the whole sequence), the run's gradient clipping. With the saved first moment, part of every
step is the momentum the run carried (``beta1 * m``), the same whatever the sequence; the stage
also takes that step with a zero gradient and reports each sequence's ``effect`` as the change
beyond it. Rankings between methods are the same either way; the effect isolates the sequence.

Where the checkpoint was saved without its optimizer state (real Pythia: pythia#152),
``causal.optimizer_state = "estimated"`` steps with an estimated one (``estimated_state``): Adam's
second moments estimated as ``trackstar_est``'s are (``attribute.moments``), a zero first moment
(so the zero-gradient step is weight decay alone), and the training recipe's end-of-schedule
learning rate, betas, eps and weight decay from the profile's ``train`` section. How far that
moves the effects from the saved state's is measured on micro by
``experiments/benchmarks/tail_patch_state.py``.

The patched model depends on the training sequence only, so each distinct sequence is patched
once and the behaviors that retrieved it are measured on that one patched model, in one batch.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pyarrow as pa
import torch
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from pythia_attribution import evaluation, finetune, paths
from pythia_attribution.attribute import metrics, moments
from pythia_attribution.attribute.candidates import truth_sets
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.behaviors import encoder
from pythia_attribution.errors import ConfigError
from pythia_attribution.model import compute_device, load_checkpoint, set_threads
from pythia_attribution.train import param_groups
from pythia_attribution.variants import read_variants

log = logging.getLogger(__name__)


class TailPatch:
    """One AdamW step of the saved training state on a sequence, and target log-probabilities, on
    the device the model is on."""

    def __init__(self, model, optimizer_state: dict, grad_clip: float):
        self.model = model
        self.device = next(model.parameters()).device
        self.names = [n for n, _ in model.named_parameters()]
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        group = optimizer_state["param_groups"][0]
        self.lr, (self.beta1, self.beta2), self.eps = group["lr"], group["betas"], group["eps"]
        decay = {}
        for g in optimizer_state.get("param_groups_by_name", []):
            decay.update(dict.fromkeys(g["param_names"], g["weight_decay"]))
        self.decay = {n: decay.get(n, group.get("weight_decay", 0.0)) for n in self.names}
        state = {entry["param_name"]: entry for entry in optimizer_state["state"].values()}
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ConfigError(f"optimizer state has no moments for {missing[0]} ({len(missing)} parameters)")
        self.m = {n: state[n]["exp_avg"].float().to(self.device) for n in self.names}
        self.v = {n: state[n]["exp_avg_sq"].float().to(self.device) for n in self.names}
        self.t = float(state[self.names[0]]["step"]) + 1
        self.grad_clip = grad_clip
        self.prefix = model.base_model_prefix + "."
        head = model.get_output_embeddings().weight
        self.head = next(n for n, p in model.named_parameters() if p is head)
        if model.get_output_embeddings().bias is not None:
            raise ConfigError("tail-patch expects an output head without a bias (GPT-NeoX has none)")

    def gradient(self, tokens: np.ndarray) -> dict[str, torch.Tensor]:
        """The training loss gradient of one sequence, clipped as the run clipped it."""
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None].to(self.device)
        self.model.zero_grad(set_to_none=True)
        logits = self.model(input_ids=ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[0, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return grads

    def step(self, grads: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Parameters after one AdamW step (torch's arithmetic); ``None``: a zero gradient."""
        bc1, bc2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        out = {}
        for n in self.names:
            g = grads[n] if grads is not None else torch.zeros_like(self.params[n])
            m = self.beta1 * self.m[n] + (1 - self.beta1) * g
            v = self.beta2 * self.v[n] + (1 - self.beta2) * g * g
            denom = (v.sqrt() / bc2**0.5) + self.eps
            p = self.params[n] * (1 - self.lr * self.decay[n])
            out[n] = p - (self.lr / bc1) * m / denom
        return out

    @torch.no_grad()
    def target_logprobs(self, params, prompts: list[list[int]], targets: list[list[int]]) -> np.ndarray:
        """Sum of the target tokens' log-probabilities given each prompt, under ``params``.

        One batched pass of the transformer body; the output head and softmax only at the target
        positions (the vocabulary-wide logits of every position would cost most of the time)."""
        rows = [p + t for p, t in zip(prompts, targets, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.ones((len(rows), width), dtype=torch.long)  # right-padded: causal attention never sees it
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        body = {k.removeprefix(self.prefix): v for k, v in params.items() if k.startswith(self.prefix)}
        hidden = functional_call(self.model.base_model, body, (ids.to(self.device),)).last_hidden_state
        which = [
            (i, pos)
            for i, (p, t) in enumerate(zip(prompts, targets, strict=True))
            for pos in range(len(p) - 1, len(p) + len(t) - 1)
        ]
        picked = hidden[[i for i, _ in which], [pos for _, pos in which]]
        logp = (picked @ params[self.head].T).float().log_softmax(-1)
        wanted = torch.tensor([tok for t in targets for tok in t], device=self.device)
        per_token = logp[torch.arange(len(wanted), device=self.device), wanted].cpu().numpy()
        bounds = np.cumsum([0] + [len(t) for t in targets])
        return np.array(
            [per_token[a:b].sum(dtype=np.float64) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )


def run(ctx) -> None:
    cfg = ctx.config
    set_threads(ctx.profile.runtime.threads)
    seed = ctx.profile.runtime.seed
    view = evaluation.at_final(ctx, cfg.reference_truth)
    cands, truth, probes, attributions = view.cands, view.truth, view.probes, view.attributions
    final, ckpt_dir = view.final, view.final_dir
    methods = cfg.methods or sorted(attributions["method"].unique())
    unknown = sorted(set(methods) - set(attributions["method"]))
    if unknown:
        raise ConfigError(f"causal.methods: '{unknown[0]}' has no attributions at step{final['step']}")
    behaviors = evaluation.sample(view.behaviors(), cfg.max_behaviors, seed, 31)

    # the sequences to patch: each method's top k, and up to k ground-truth sequences per behavior
    wanted: list[dict] = []
    top = attributions[attributions["method"].isin(methods) & (attributions["rank"] <= cfg.top_k)]
    for row in top[top["behavior_id"].isin(behaviors)].itertuples():
        wanted.append(
            {"behavior_id": row.behavior_id, "method": row.method, "rank": int(row.rank),
             "packed_id": int(row.packed_id)}
        )  # fmt: skip
    for b in behaviors:
        item = probes[b]["item_id"]
        if item in truth:
            chosen = evaluation.reference(truth[item], cfg.top_k, seed, 37)
            for rank, pid in enumerate(chosen, start=1):
                wanted.append({"behavior_id": b, "method": REFERENCE, "rank": rank, "packed_id": int(pid)})

    rows: list[dict] = []
    state, how = None, "no exhibited behavior"
    if behaviors:
        model, _ = load_checkpoint(ckpt_dir, compute_device())
        state, how = tail_patch_state(ctx, model, ckpt_dir, cands, final["step"])
    if state is None:
        log.warning("causal: tail-patch skipped: %s", how)
        step = f"not run: {how}"
    else:
        patch = TailPatch(model, state, ctx.profile.train.grad_clip)
        rows = tail_patch_rows(patch, cands, probes, behaviors, wanted)
        step = (
            f"one AdamW step from step{final['step']} with {how}, the sequence's mean next-token loss, "
            f"gradient clipping {ctx.profile.train.grad_clip}"
        )
    table = pa.Table.from_pylist(rows, TAIL_PATCH_SCHEMA)
    ctx.write_table(
        paths.TAIL_PATCH_TABLE,
        table,
        step=step,
        effect="delta_logp minus delta_momentum (the same step with a zero gradient)",
        reference=f"{REFERENCE}: up to {cfg.top_k} {cfg.reference_truth} ground-truth sequences per behavior",
    )
    ctx.write_table(
        paths.TAIL_PATCH_METRICS_TABLE,
        aggregate(table, ctx.profile.runtime.seed, ctx.profile.attribute.bootstrap),
        bootstrap=(
            f"percentile bootstrap over behaviors, {ctx.profile.attribute.bootstrap} resamples, 95% interval"
        ),
    )
    select_and_finetune(ctx, cands, view.ground_truth, view.checkpoints, ckpt_dir)


def tail_patch_rows(
    patch: TailPatch, cands, probes: dict, behaviors: list[str], wanted: list[dict]
) -> list[dict]:
    """The tail-patch table's rows: each ``wanted`` (behavior, method, rank, packed id) measured on
    the model after one step on its sequence, beyond the zero-gradient step."""
    prompts = [probes[b]["prompt_ids"] for b in behaviors]
    targets = [probes[b]["target_ids"] for b in behaviors]
    column = {b: i for i, b in enumerate(behaviors)}
    before = patch.target_logprobs(patch.params, prompts, targets)
    momentum = patch.target_logprobs(patch.step(None), prompts, targets) - before
    needed: dict[int, set[str]] = {}
    for w in wanted:
        needed.setdefault(w["packed_id"], set()).add(w["behavior_id"])
    delta: dict[tuple[int, str], float] = {}
    log.info("tail-patch: %d distinct sequences for %d behaviors", len(needed), len(behaviors))
    for pid in tqdm(sorted(needed), desc="tail-patch", unit="seq", mininterval=5):
        which = sorted(needed[pid])  # only the behaviors that retrieved this sequence
        cols = [column[b] for b in which]
        params = patch.step(patch.gradient(cands.tokens[pid]))
        after = patch.target_logprobs(params, [prompts[c] for c in cols], [targets[c] for c in cols])
        for b, c, a in zip(which, cols, after, strict=True):
            delta[(pid, b)] = float(a - before[c])
    rows = []
    for w in wanted:
        p = probes[w["behavior_id"]]
        d = delta[(w["packed_id"], w["behavior_id"])]
        m0 = float(momentum[column[w["behavior_id"]]])
        rows.append(
            {**w, "family": p["family"], "seq_idx": int(cands.first_seq_idx[w["packed_id"]]),
             "logp_before": float(before[column[w["behavior_id"]]]), "delta_logp": d,
             "delta_momentum": m0, "effect": d - m0}
        )  # fmt: skip
    return rows


def tail_patch_state(ctx, model, ckpt_dir, cands, step: int) -> tuple[dict | None, str]:
    """The AdamW state tail-patch steps with (``causal.optimizer_state``) and what it is; ``None``
    and the reason where the saved state is asked for and the checkpoint has none."""
    if ctx.config.optimizer_state == "saved":
        saved = moments.saved_state(ckpt_dir)
        if saved is None:
            return None, (
                f"no optimizer state at step{step} (causal.optimizer_state = 'saved'; 'estimated' "
                "estimates one)"
            )
        return torch.load(saved, weights_only=False), "the saved moments, lr and weight decay"
    indexes = ctx.inputs[paths.ATTRIBUTE] / "indexes" / f"step{step}"
    state = load_estimated_state(
        model, ckpt_dir, indexes, ctx.out_dir / "work" / "tail_patch", cands, step, ctx.profile
    )
    group = state["param_groups"][0]
    return state, (
        f"second moments estimated from {group['estimated_from']}, a zero first moment, "
        f"lr {group['lr']:g} (train.lr x train.min_lr_ratio), weight decay {group['weight_decay']:g}"
    )


def load_estimated_state(model, ckpt_dir, indexes, scratch, cands, step: int, profile) -> dict:
    """``estimated_state`` from the attribute stage's estimate at the checkpoint (``indexes``: its
    index folder; there when it ran trackstar_est), else from one made here in ``scratch``, which
    is removed once loaded (the weights' size: not an output)."""
    estimate = moments.state_path("adam_est", ckpt_dir, indexes)
    if not estimate.is_file():
        estimate = moments.estimate(
            scratch / moments.ESTIMATE, ckpt_dir, cands, step, moments.Settings.of(profile)
        )
    state = estimated_state(torch.load(estimate, weights_only=False), model, step, profile.train)
    shutil.rmtree(scratch, ignore_errors=True)
    return state


def estimated_state(second_moments: dict, model, step: int, train) -> dict:
    """An AdamW state in the form the train stage saves (``TailPatch`` reads it), for a checkpoint
    saved without one: the estimated second moments (``second_moments``: ``moments.estimate``'s
    ``optimizer.pt``), a zero first moment, ``step`` steps taken, and the recipe in ``train`` (a
    ``TrainConfig``) at the end of its schedule: lr x min_lr_ratio, betas, eps, weight decay on the
    parameters the train stage decays (``train.param_groups``)."""
    v = {entry["param_name"]: entry["exp_avg_sq"] for entry in second_moments["state"].values()}
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in v]
    if missing:
        raise ConfigError(f"estimated second moments have none for {missing[0]} ({len(missing)} parameters)")
    state = {
        i: {
            "param_name": n,
            "exp_avg": torch.zeros_like(v[n]),
            "exp_avg_sq": v[n],
            "step": torch.tensor(float(step)),
        }
        for i, n in enumerate(names)
    }
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {"param_names": [name_of[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in param_groups(model, train.weight_decay)
    ]
    how = second_moments["param_groups"][0].get("estimated_from", "estimated")
    first = {
        "lr": train.lr * train.min_lr_ratio, "betas": (train.beta1, train.beta2), "eps": train.eps,
        "weight_decay": train.weight_decay, "params": list(state), "estimated_from": how,
    }  # fmt: skip
    return {"state": state, "param_groups": [first], "param_groups_by_name": groups}


def finetune_inputs(ctx, cands, ground_truth, final_dir) -> tuple[dict, list[dict], dict]:
    """What select-and-fine-tune reads besides the candidates and checkpoints: each item's complete
    copies, every probe row, and the paraphrases by item."""
    encode = encoder(AutoTokenizer.from_pretrained(final_dir))
    cfg = ctx.config
    paraphrases = {
        q.item_id: q
        for q in (read_variants(paths.resolve_input(cfg.paraphrase_file), ground_truth, encode)
                  if cfg.paraphrase_file else [])
        if q.variant == "paraphrase"
    }  # fmt: skip
    probes = ctx.input_table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
    return truth_sets(ground_truth, cands, "complete"), probes, paraphrases


def select_and_finetune(ctx, cands, ground_truth, ckpts, final_dir) -> None:
    """The select-and-fine-tune tables (``finetune``), empty when no family is configured."""
    cfg = ctx.config
    if cfg.finetune_families:
        complete, probes, paraphrases = finetune_inputs(ctx, cands, ground_truth, final_dir)
        table, summary = finetune.run(ctx, cands, complete, probes, ckpts, paraphrases)
    else:
        table = pa.Table.from_pylist([], finetune.FINETUNE_SCHEMA)
        summary = pa.Table.from_pylist([], finetune.FINETUNE_METRICS_SCHEMA)
    how = (
        f"fine-tuned from the latest checkpoint with at most {cfg.finetune_max_exhibited:.0%} of the set "
        f"exhibited: {cfg.finetune_steps} AdamW steps of {cfg.finetune_batch} sequences drawn from each "
        f"selection of {cfg.finetune_k}, lr {cfg.finetune_lr}; exhibited: every target token is the argmax"
    )
    ctx.write_table(paths.FINETUNE_TABLE, table, finetune=how, truth="ground_truth: complete copies")
    ctx.write_table(
        paths.FINETUNE_METRICS_TABLE,
        summary,
        finetune=how,
        bootstrap=(
            f"percentile bootstrap over behaviors, {ctx.profile.attribute.bootstrap} resamples, 95% interval"
        ),
    )


def aggregate(table: pa.Table, seed: int, n_boot: int) -> pa.Table:
    """Per (method, family): the mean over behaviors of each behavior's mean effect over its top k."""
    df = table.to_pandas()
    rows = []
    if df.empty:
        return pa.Table.from_pylist([], TAIL_PATCH_METRICS_SCHEMA)
    per_behavior = df.groupby(["method", "family", "behavior_id"], as_index=False).agg(
        effect=("effect", "mean"),
        delta_logp=("delta_logp", "mean"),
        positive=("effect", lambda e: (e > 0).mean()),
    )
    for family, sub in [("all", per_behavior), *per_behavior.groupby("family")]:
        for method, g in sub.groupby("method"):
            row = {"method": method, "family": family, "n_behaviors": len(g)}
            for col in ("effect", "delta_logp", "positive"):
                lo, hi = metrics.bootstrap_ci(g[col].to_numpy(), seed, n_boot)
                row.update({col: float(g[col].mean()), f"{col}_lo": lo, f"{col}_hi": hi})
            rows.append(row)
    return pa.Table.from_pylist(rows, TAIL_PATCH_METRICS_SCHEMA)


TAIL_PATCH_SCHEMA = pa.schema(
    [
        ("behavior_id", pa.string()),
        ("family", pa.string()),
        ("method", pa.string()),
        ("rank", pa.int32()),
        ("packed_id", pa.int32()),
        ("seq_idx", pa.int64()),
        ("logp_before", pa.float64()),
        ("delta_logp", pa.float64()),
        ("delta_momentum", pa.float64()),
        ("effect", pa.float64()),
    ]
)
TAIL_PATCH_METRICS_SCHEMA = pa.schema(
    [("method", pa.string()), ("family", pa.string()), ("n_behaviors", pa.int64())]
    + [(f"{c}{s}", pa.float64()) for c in ("effect", "delta_logp", "positive") for s in ("", "_lo", "_hi")]
)
