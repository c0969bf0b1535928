"""Leave-k-out retraining on nano: removing nothing is the training run bit for bit, a removed row
contributes nothing, and the stage retrains once per run and reuses the models it kept."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.compute as pc
import torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from pythia_attribution import paths, tables, train
from pythia_attribution.cli import main
from pythia_attribution.config import load_profile
from pythia_attribution.model import load_checkpoint, pythia_config


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def _setup(nano_run):
    profile = load_profile(str(nano_run["profile"]))
    corpus = _read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE)
    tokens, batch_size = train.corpus_tokens(corpus)
    ckpts = _read(nano_run["results"], paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    final = nano_run["results"] / paths.TRAIN / ckpts[-1]["path"]
    vocab = len(AutoTokenizer.from_pretrained(final))
    return profile, tokens, batch_size, final, vocab


def test_removing_nothing_is_the_training_run(nano_run):
    profile, tokens, batch_size, final, vocab = _setup(nano_run)
    model, _, _ = train.train_model(
        profile.train,
        tokens,
        batch_size,
        vocab,
        seed=profile.runtime.seed,
        removed=np.zeros(len(tokens), bool),
    )
    baseline, _ = load_checkpoint(final)
    trained = dict(model.named_parameters())
    for name, p in baseline.named_parameters():
        assert torch.equal(trained[name].detach(), p.detach()), name


def test_a_removed_row_contributes_nothing(nano_run):
    """Every row removed: AdamW sees zero gradients, so the weights move by weight decay alone."""
    profile, tokens, batch_size, _, vocab = _setup(nano_run)
    cfg = profile.train
    steps = 3
    rows = tokens[: steps * batch_size]
    model, _, _ = train.train_model(
        cfg, rows, batch_size, vocab, seed=profile.runtime.seed, removed=np.ones(len(rows), bool)
    )
    torch.manual_seed(profile.runtime.seed)
    init = GPTNeoXForCausalLM(pythia_config(cfg, vocab))
    shrink = float(np.prod([1 - train.lr_at(cfg, s, steps) * cfg.weight_decay for s in range(steps)]))
    trained = dict(model.named_parameters())
    for name, p in init.named_parameters():
        expected = p.detach() * (shrink if p.ndim >= 2 else 1.0)
        torch.testing.assert_close(trained[name].detach(), expected, rtol=1e-6, atol=1e-8, msg=name)


def test_the_stage_retrains_once_per_run_and_reuses_its_models(nano_run, tmp_path, monkeypatch):
    # on a copy of the session's nano results: `leave_out` is not part of the `all` they compare with
    shutil.copytree(nano_run["results"], tmp_path / "nano")
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(tmp_path))
    profile = nano_run["profile"]
    results = tmp_path / "nano"
    assert main(["leave_out", "--profile", str(profile), "-q"]) == 0
    cfg = load_profile(str(profile)).leave_out
    runs = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_RUNS_TABLE).to_pylist()
    assert [r["run"] for r in runs] == [*cfg.methods, "ground_truth"]
    assert not any(r["adopted"] for r in runs)
    assert all(r["n_rows_removed"] >= r["n_removed"] for r in runs)
    table = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_TABLE)
    behaviors = set(table["behavior_id"].to_pylist())
    assert behaviors and table.num_rows == len(runs) * len(behaviors)
    truth = table.filter(pc.equal(table["run"], "ground_truth")).to_pylist()
    for row in truth:  # the ground-truth run removes the behavior's own copies, up to k
        assert row["n_removed_own"] == row["n_removed_own_truth"] == min(row["n_truth"], cfg.top_k)
        assert row["n_truth_removed"] >= row["n_removed_own"]
    metrics = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_METRICS_TABLE)
    assert set(metrics["run"].to_pylist()) == {r["run"] for r in runs}

    assert main(["leave_out", "--profile", str(profile), "--force", "-q"]) == 0
    again = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_RUNS_TABLE).to_pylist()
    assert all(r["adopted"] for r in again)
    assert _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_TABLE).equals(table)
    assert len(list(paths.retrained_dir("nano").iterdir())) == len(runs)


def test_check_names_a_leave_out_method_the_attribute_stage_does_not_run():
    import dataclasses

    import pytest

    from pythia_attribution.check import check_inputs
    from pythia_attribution.errors import ConfigError

    profile = load_profile("nano")
    bad = dataclasses.replace(profile, leave_out=dataclasses.replace(profile.leave_out, methods=["nope"]))
    with pytest.raises(ConfigError, match="leave_out.methods: 'nope' is not in attribute.methods"):
        check_inputs(bad)
    hub = dataclasses.replace(profile, train=dataclasses.replace(profile.train, source="hub"))
    with pytest.raises(ConfigError, match="retraining needs train.source = 'train'"):
        check_inputs(hub)
