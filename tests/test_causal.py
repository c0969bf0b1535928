"""The causal stage on nano: tail-patch's AdamW step is torch's, a planted copy of a query moves its
target more than random sequences, and the tables cover every method and the reference."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from pythia_attribution import paths, tables
from pythia_attribution.attribute import moments
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.causal import REFERENCE, TailPatch, estimated_state, tail_patch_state
from pythia_attribution.config import load_profile
from pythia_attribution.model import load_checkpoint


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def _final(results):
    ckpts = _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    return results / paths.TRAIN / ckpts[-1]["path"], ckpts[-1]["step"]


def _estimated(results, model):
    """The AdamW state tail-patch uses where none was saved: nano's trackstar_est estimate."""
    ckpt, step = _final(results)
    estimate = moments.state_path("adam_est", ckpt, results / paths.ATTRIBUTE / "indexes" / f"step{step}")
    assert estimate.is_file()
    return estimated_state(torch.load(estimate, weights_only=False), model, step, load_profile("nano").train)


def _patch(results, state: str = "saved") -> TailPatch:
    ckpt, _ = _final(results)
    model, _ = load_checkpoint(ckpt)
    if state == "estimated":
        return TailPatch(model, _estimated(results, model), grad_clip=1.0)
    return TailPatch(model, torch.load(ckpt / "optimizer.pt", weights_only=False), grad_clip=1.0)


def test_the_step_is_torchs_adamw(nano_run):
    """One step of the saved optimizer state through torch.optim.AdamW gives the same parameters."""
    patch = _patch(nano_run["results"])
    tokens = load_candidates(_read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE)).tokens[3]
    grads = patch.gradient(tokens)
    ours = patch.step(grads)

    ckpt, _ = _final(nano_run["results"])
    model, _ = load_checkpoint(ckpt)
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in g["param_names"]], "weight_decay": g["weight_decay"]}
        for g in saved["param_groups_by_name"]
    ]
    hyper = saved["param_groups"][0]
    optimizer = torch.optim.AdamW(groups, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"])
    for entry in saved["state"].values():
        p = params[entry["param_name"]]
        optimizer.state[p] = {k: entry[k].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
        p.grad = grads[entry["param_name"]].clone()
    optimizer.step()
    for name, p in params.items():
        torch.testing.assert_close(ours[name], p.detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_attribute_stages_estimate_the_stage_makes_the_same_one(nano_run, tmp_path):
    """Where the attribute stage ran no trackstar_est, tail-patch estimates the second moments
    itself, as that stage would have, and leaves no scratch file among its outputs."""
    results = nano_run["results"]
    profile = load_profile("nano")
    ckpt, step = _final(results)
    model, _ = load_checkpoint(ckpt)
    ctx = SimpleNamespace(
        config=dataclasses.replace(profile.causal, optimizer_state="estimated"),
        profile=profile,
        inputs={paths.ATTRIBUTE: tmp_path / "attribute-without-estimate"},
        out_dir=tmp_path / "causal.part",
    )
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    state, how = tail_patch_state(ctx, model, ckpt, cands, step)
    assert "second moments estimated from the last" in how
    assert not [p for p in ctx.out_dir.rglob("*") if p.is_file()]
    reference = _estimated(results, model)
    for i, entry in state["state"].items():
        torch.testing.assert_close(entry["exp_avg_sq"], reference["state"][i]["exp_avg_sq"])
    saved = dataclasses.replace(profile.causal, optimizer_state="saved")
    assert (
        tail_patch_state(SimpleNamespace(**{**vars(ctx), "config": saved}), model, tmp_path, cands, step)[0]
        is None
    )


def test_the_estimated_state_steps_as_torchs_adamw_from_zero_momentum(nano_run):
    """Where no optimizer state was saved, the step is torch's AdamW from the estimated second
    moments, a zero first moment and the recipe's final lr, with weight decay on the matrices only:
    a zero gradient then moves the parameters by weight decay alone."""
    results = nano_run["results"]
    patch = _patch(results, "estimated")
    train = load_profile("nano").train
    tokens = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE)).tokens[3]
    grads = patch.gradient(tokens)
    ours = patch.step(grads)

    ckpt, step = _final(results)
    model, _ = load_checkpoint(ckpt)
    state = _estimated(results, model)
    params = dict(model.named_parameters())
    decayed = {n for n, p in params.items() if p.ndim >= 2}
    groups = [
        {"params": [params[n] for n in sorted(decayed)], "weight_decay": train.weight_decay},
        {"params": [params[n] for n in sorted(set(params) - decayed)], "weight_decay": 0.0},
    ]
    lr = train.lr * train.min_lr_ratio
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(train.beta1, train.beta2), eps=train.eps)
    for entry in state["state"].values():
        p = params[entry["param_name"]]
        assert not entry["exp_avg"].any() and float(entry["step"]) == step
        optimizer.state[p] = {k: entry[k].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
        p.grad = grads[entry["param_name"]].clone()
    optimizer.step()
    for name, p in params.items():
        torch.testing.assert_close(ours[name], p.detach(), rtol=1e-5, atol=1e-7, msg=name)
    still = patch.step(None)
    for name, p in patch.params.items():
        torch.testing.assert_close(still[name], p * (1 - lr * train.weight_decay) if name in decayed else p)


@pytest.mark.parametrize("state", ["saved", "estimated"])
def test_a_planted_copy_moves_its_target_more_than_random_sequences(nano_run, state):
    results = nano_run["results"]
    patch = _patch(results, state)
    _, step = _final(results)
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE)
    final = probes.filter(pc.equal(probes["checkpoint"], step)).to_pylist()
    # never-injected canaries: nothing in the corpus states them, so only the copy can teach them
    queries = [p for p in final if p["family"] == "memorized" and p["count"] == 0][:4]
    assert queries
    prompts, targets = [q["prompt_ids"] for q in queries], [q["target_ids"] for q in queries]
    before = patch.target_logprobs(patch.params, prompts, targets)
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    rng = np.random.default_rng(0)
    randoms = []
    for pid in rng.choice(len(cands.tokens), size=6, replace=False):
        after = patch.target_logprobs(patch.step(patch.gradient(cands.tokens[pid])), prompts, targets)
        randoms.append(after - before)
    randoms = np.array(randoms)  # sequences x queries
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        copy = np.array(p + t)
        after = patch.target_logprobs(patch.step(patch.gradient(copy)), prompts, targets)
        assert after[i] - before[i] > randoms[:, i].max(), (queries[i]["behavior_id"], after[i] - before[i])


def test_tail_patch_tables_cover_every_method_and_the_reference(nano_run):
    results = nano_run["results"]
    tp = _read(results, paths.CAUSAL, paths.TAIL_PATCH_TABLE).to_pandas()
    methods = set(_read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)["method"].to_pylist())
    assert set(tp["method"]) == methods | {REFERENCE}
    np.testing.assert_allclose(tp["effect"], tp["delta_logp"] - tp["delta_momentum"])
    # one momentum-only step per behavior, whatever the sequence
    assert (tp.groupby("behavior_id")["delta_momentum"].nunique() == 1).all()
    metrics = _read(results, paths.CAUSAL, paths.TAIL_PATCH_METRICS_TABLE).to_pandas()
    overall = metrics[metrics["family"] == "all"].set_index("method")
    assert set(overall.index) == methods | {REFERENCE}
    assert (overall["effect_lo"] <= overall["effect"]).all() and (
        overall["effect"] <= overall["effect_hi"]
    ).all()


def test_fine_tuning_on_the_ground_truth_beats_random_selection(nano_run):
    """Select-and-fine-tune: the early checkpoint fine-tuned on the evaluation set's own complete
    copies raises their targets more than the same fine-tuning on random sequences, and every
    method, behavior and prompt kind is in the table."""
    results = nano_run["results"]
    table = _read(results, paths.CAUSAL, paths.FINETUNE_TABLE).to_pandas()
    summary = _read(results, paths.CAUSAL, paths.FINETUNE_METRICS_TABLE).to_pandas()
    assert set(table["family"]) == {"factual", "fictional_fact"}
    methods = {"trackstar", "trackstar_est", "grad_cosine", "ekfac", "bm25", "activation", "residual_diff"}
    methods |= {"residual_change", "random", "ground_truth"}
    assert set(table["method"]) == methods
    assert set(table["prompt_kind"]) == {"original", "paraphrase"}
    per = table.groupby(["family", "prompt_kind"])
    assert (per["method"].nunique() == len(methods)).all()
    assert (table.groupby(["family", "method", "prompt_kind"])["behavior_id"].nunique() == 2).all()
    original = summary[summary["prompt_kind"] == "original"].set_index(["family", "method"])
    for family in ("factual", "fictional_fact"):
        gt, random = original.loc[(family, "ground_truth")], original.loc[(family, "random")]
        assert gt["delta_logp"] > random["delta_logp"] + 1.0, (family, gt["delta_logp"], random["delta_logp"])
        assert gt["n_selected_truth"] == gt["n_selected"] > 0


def test_ekfac_scores_of_summed_queries_are_the_sums_of_their_scores(nano_run, tmp_path):
    """Select-and-fine-tune scores an evaluation set by EK-FAC with one summed transformed query per
    set: each training row's score against it is the sum of its scores against the set's queries
    (the attribute stage's factors, scored both ways on a few rows)."""
    from bergson.data import load_scores

    from pythia_attribution.attribute import ekfac

    results = nano_run["results"]
    ckpt, step = _final(results)
    factors = results / paths.ATTRIBUTE / "indexes" / f"step{step}" / "ekfac" / "factors"
    assert factors.exists()
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE)
    final = probes.filter(pc.equal(probes["checkpoint"], step)).to_pylist()[:5]
    common = {
        "prompts": [q["prompt_ids"] for q in final], "targets": [q["target_ids"] for q in final],
        "token_batch_size": 1024, "damping": 0.1, "seed": 0, "factors": factors,
    }  # fmt: skip
    rows = cands.tokens[:12]
    each = np.asarray(load_scores(ekfac.scores(tmp_path / "each", ckpt, rows, **common)))
    sets = [np.array([0, 1, 2]), np.array([3, 4])]
    summed = ekfac.scores(tmp_path / "sets", ckpt, rows, query_sets=sets, **common)
    summed = np.asarray(load_scores(summed))
    assert summed.shape == (len(rows), 2)
    want = np.stack([each[:, s].sum(axis=1) for s in sets], axis=1)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(summed, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_evaluation_sets_by_statement_count_or_by_what_the_final_model_exhibits():
    """'stated' takes the items with a complete copy stated often enough (planted items only);
    'exhibited' takes the behaviors exhibited at the final checkpoint, which is what a world
    without planted items (the Pile) can offer."""
    from pythia_attribution.config import CausalConfig
    from pythia_attribution.finetune import evaluation_sets

    def probe(bid, family, item, count, exhibited):
        return {"behavior_id": bid, "family": family, "item_id": item, "count": count, "exhibited": exhibited}

    probes = [
        probe("capital-a", "factual", "capital/a", 32, True),
        probe("capital-b", "factual", "capital/b", 4, True),
        probe("capital-c", "factual", "capital/c", 32, False),
        probe("capital-japan", "factual", None, None, True),  # a Pile behavior: no item, no count
        probe("mit", "memorized", None, None, False),
    ]
    complete = {"capital/a": np.array([1]), "capital/b": np.array([2]), "capital/c": np.array([3])}
    stated = CausalConfig(finetune_families=["factual", "memorized"], finetune_min_count=16)
    got = {f: [p["behavior_id"] for p in ps] for f, ps in evaluation_sets(stated, probes, complete).items()}
    assert got == {"factual": ["capital-a", "capital-c"]}
    exhibited = dataclasses.replace(stated, finetune_set="exhibited")
    got = {f: [p["behavior_id"] for p in ps] for f, ps in evaluation_sets(exhibited, probes, {}).items()}
    assert got == {"factual": ["capital-a", "capital-b", "capital-japan"]}
