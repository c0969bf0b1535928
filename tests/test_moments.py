"""Estimated second moments (``trackstar_est``): which minibatches, the arithmetic, bergson reading
the file, and a planted copy ranked first."""

import dataclasses
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pythia_attribution import paths, tables
from pythia_attribution.attribute import gradients, moments
from pythia_attribution.attribute.candidates import Candidates, load_candidates
from pythia_attribution.config import load_profile
from pythia_attribution.model import load_checkpoint


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


@pytest.fixture(scope="module")
def nano(nano_run):
    results = nano_run["results"]
    final = _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()[-1]
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    settings = moments.Settings.of(load_profile(str(nano_run["profile"])))
    return results / paths.TRAIN / final["path"], final["step"], cands, settings


def _candidates(row_step: np.ndarray, width: int = 5) -> Candidates:
    n = len(row_step)
    return Candidates(
        tokens=np.zeros((n, width), dtype=np.uint16), texts=[""] * n, first_seq_idx=np.arange(n),
        first_step=row_step, row_seq_idx=np.arange(n), row_packed=np.arange(n), row_step=row_step,
    )  # fmt: skip


def test_minibatches_are_the_last_full_steps_before_the_checkpoint():
    settings = moments.Settings(batch_size=4, batches=2, seed=0, token_batch_size=64)
    # steps 0-2 full, step 3 holds 3 of its 4 sequences, steps 4 and 5 full
    steps = np.array([0] * 4 + [1] * 4 + [2] * 4 + [3] * 3 + [4] * 4 + [5] * 4)
    groups, how = moments.minibatches(_candidates(steps), 5, settings)
    assert [sorted(steps[g].tolist()) for g in groups] == [[2] * 4, [4] * 4]  # step 3 is not full
    assert "full training steps" in how
    # asked for more than are full: the five full steps, then seeded batches of the others
    groups, how = moments.minibatches(_candidates(steps), 6, dataclasses.replace(settings, batches=10))
    assert [sorted(steps[g].tolist()) for g in groups] == [[s] * 4 for s in (0, 1, 2, 4, 5)] + [[3] * 3]
    assert "5 full training steps" in how and "1 seeded batch of" in how


def test_too_few_full_steps_are_topped_up_with_seeded_batches():
    settings = moments.Settings(batch_size=4, batches=4, seed=3, token_batch_size=64)
    steps = np.array([0] * 4 + [1] * 2 + [2] * 4 + list(range(3, 23)))  # steps 0 and 2 full
    groups, how = moments.minibatches(_candidates(steps), 23, settings)
    assert [sorted(steps[g].tolist()) for g in groups[:2]] == [[0] * 4, [2] * 4]
    seeded = np.concatenate(groups[2:])
    assert [len(g) for g in groups[2:]] == [4, 4] and len(np.unique(seeded)) == 8
    assert not set(seeded) & set(np.concatenate(groups[:2]))  # no sequence twice
    assert "2 full training steps" in how and "2 seeded batches" in how


def test_without_a_full_step_the_minibatches_are_seeded_samples():
    settings = moments.Settings(batch_size=4, batches=3, seed=7, token_batch_size=64)
    steps = np.repeat(np.arange(20), 2)  # every step holds 2 of its 4 sequences
    groups, how = moments.minibatches(_candidates(steps), 20, settings)
    assert [len(g) for g in groups] == [4, 4, 4] and len(np.unique(np.concatenate(groups))) == 12
    assert "seeded" in how
    again, _ = moments.minibatches(_candidates(steps), 20, settings)
    assert all((a == b).all() for a, b in zip(groups, again, strict=True))


def test_partial_estimates_of_killed_runs_are_removed_and_no_others(tmp_path):
    out = tmp_path / moments.ESTIMATE
    code = "import os; print(os.getpid())"
    gone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    host = socket.gethostname()
    dead = moments._part_name(out, host, int(gone.stdout))  # that process has exited
    alive = moments._part_name(out, host, os.getpid())
    elsewhere = moments._part_name(out, "another-host.example", int(gone.stdout))
    for part in (dead, alive, elsewhere):
        part.write_bytes(b"half")
    assert moments.clear_stale_parts(out) == [dead]
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_the_estimate_is_the_mean_squared_minibatch_gradient(nano, tmp_path):
    """Written entries equal the square of each minibatch's training-loss gradient, averaged, with
    the forward passes split by the token budget (here one sequence per pass) as at real scale."""
    ckpt, step, cands, settings = nano
    settings = dataclasses.replace(settings, batches=2, token_batch_size=cands.tokens.shape[1] - 1)
    out = moments.estimate(tmp_path / moments.ESTIMATE, ckpt, cands, step, settings)
    written = {
        e["param_name"]: e["exp_avg_sq"] for e in torch.load(out, weights_only=False)["state"].values()
    }
    groups, _ = moments.minibatches(cands, step, settings)
    model, _ = load_checkpoint(ckpt)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for group in groups:
        batch = torch.from_numpy(cands.tokens[np.sort(group)].astype(np.int64))
        model.zero_grad()
        logits = model(input_ids=batch[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() / len(groups)
    assert written.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(written[n], expected[n], rtol=1e-3, atol=1e-12)


def test_bergson_reads_the_estimate_as_adam_normalizers(nano, tmp_path):
    from bergson.gradients import AdamNormalizer
    from bergson.utils.load_from_optimizer import load_from_optimizer

    ckpt, step, cands, settings = nano
    out = moments.estimate(tmp_path / moments.ESTIMATE, ckpt, cands, step, settings)
    model, _ = load_checkpoint(ckpt)
    normalizers = load_from_optimizer(model, str(out))
    # the modules of the saved state's normalizers, every Linear of the base model among them
    linears = {n for n, m in model.base_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert normalizers.keys() == load_from_optimizer(model, str(moments.saved_state(ckpt))).keys()
    assert linears <= normalizers.keys()
    written = {
        e["param_name"]: e["exp_avg_sq"] for e in torch.load(out, weights_only=False)["state"].values()
    }
    prefix = next(n for n, m in model.named_modules() if m is model.base_model)
    for name in linears:
        assert isinstance(normalizers[name], AdamNormalizer)
        torch.testing.assert_close(normalizers[name].weight_avg_sq, written[f"{prefix}.{name}.weight"])


def test_a_planted_copy_ranks_first_with_estimated_moments(nano, nano_run, tmp_path):
    ckpt, step, cands, settings = nano
    probes = _read(nano_run["results"], paths.PROBE, paths.PROBES_TABLE).to_pylist()
    queries = [
        p for p in probes if p["family"] == "memorized" and p["count"] == 0 and p["checkpoint"] == step
    ]
    assert queries
    q_rows = [q["prompt_ids"] + q["target_ids"] for q in queries]
    rows = cands.tokens.tolist() + q_rows
    planted = np.arange(len(cands.tokens), len(rows))
    state = moments.states(["adam_est"], ckpt, tmp_path, cands, step, settings)["adam_est"]
    assert state == tmp_path / "adam_est" / moments.ESTIMATE and state.is_file()
    common = {"optimizer_state": state, "projection_dim": 4, "token_batch_size": 1024}
    train = gradients.build_index(tmp_path / "train", ckpt, rows, labels=None, **common)
    labels = [[-100] * len(q["prompt_ids"]) + q["target_ids"] for q in queries]
    query = gradients.build_index(tmp_path / "queries", ckpt, q_rows, labels=labels, **common)
    hessian = gradients.autocorrelation_hessian(train, tmp_path / "hessian")
    scorer = gradients.GradientScorer(train, query, unit_norm=True, hessian_path=hessian, chunk_rows=100)
    total = np.concatenate([block for _, block in scorer.chunks()], axis=1)
    assert (total.argmax(axis=1) == planted).all()


def test_the_attribute_stage_normalizes_trackstar_est_by_its_estimate(nano, nano_run, tmp_path):
    """The nano run's adam_est index holds each sequence's gradient normalized by the estimate the
    stage wrote beside it (paired with the raw index in one pass), not by the saved state."""
    ckpt, step, cands, _ = nano
    folder = nano_run["results"] / paths.ATTRIBUTE / "indexes" / f"step{step}"
    estimate = folder / "adam_est" / moments.ESTIMATE
    assert estimate.is_file()

    def rows(name):
        return np.concatenate(
            [gradients.module_blocks(s)[0] for s in gradients.shards_of(folder / name / "train")]
        )

    est, saved = rows("adam_est"), rows("adam")
    assert est.shape == saved.shape and not np.allclose(est, saved, rtol=1e-2)
    p = len(cands.tokens) // 2
    alone = gradients.build_index(
        tmp_path / "one", ckpt, [cands.tokens[p].tolist()], labels=None, optimizer_state=estimate,
        projection_dim=4, token_batch_size=1024,
    )  # fmt: skip
    row = np.asarray(gradients.module_blocks(alone)[0][0], dtype=np.float64)
    # equal up to float32's summation order, measured against the row's norm (an element near zero
    # can differ by 0.2%: tests/test_attribute.py's test_index_row_is_packed_sequence says more);
    # the saved state's row is 0.1 of the norm away
    assert np.linalg.norm(row - est[p]) <= 1e-5 * np.linalg.norm(est[p])
    assert np.linalg.norm(row - saved[p]) > 1e-2 * np.linalg.norm(est[p])
