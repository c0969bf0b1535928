"""Leave-k-out retraining on nano: removing nothing is the training run bit for bit, a removed row
contributes nothing, and the stage retrains once per run and reuses the models it kept."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pytest
import torch
from conftest import EXPERIMENTS, run_experiment
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from pythia_attribution import paths, tables, train
from pythia_attribution.cli import main
from pythia_attribution.config import load_profile
from pythia_attribution.model import load_checkpoint, pythia_config
from pythia_attribution.paper import causal_variables, mdtables, style
from pythia_attribution.paper.data import Study


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def _setup(nano_run):
    profile = load_profile(str(nano_run["profile"]))
    torch.set_num_threads(profile.runtime.threads)  # the count the stage trained with
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
    draws = [f"random_{d}" for d in range(2, cfg.random_draws + 1)]
    assert draws, "nano's profile should draw the random floor more than once"
    assert [r["run"] for r in runs] == [*cfg.methods, *draws, "ground_truth"]
    assert [r["run"] for r in runs if r["floor"]] == ["random", *draws]
    assert not any(r["adopted"] for r in runs)
    assert all(r["n_rows_removed"] >= r["n_removed"] for r in runs)
    table = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_TABLE)
    behaviors = set(table["behavior_id"].to_pylist())
    assert behaviors and table.num_rows == len(runs) * len(behaviors)
    truth = table.filter(pc.equal(table["run"], "ground_truth")).to_pylist()
    for row in truth:  # the ground-truth run removes the behavior's own copies, up to k
        assert row["n_removed_own"] == row["n_removed_own_truth"] == min(row["n_truth"], cfg.top_k)
        assert row["n_truth_removed"] >= row["n_removed_own"]
    for draw in draws:  # a further draw removes k sequences per behavior, a set of its own
        rows = table.filter(pc.equal(table["run"], draw)).to_pylist()
        assert all(r["n_removed_own"] == cfg.top_k for r in rows)
    assert len({r["key"] for r in runs if r["floor"]}) == len(draws) + 1
    metrics = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_METRICS_TABLE)
    assert set(metrics["run"].to_pylist()) == {r["run"] for r in runs}
    for m in metrics.filter(pc.equal(metrics["family"], "all")).to_pylist():
        floor = m["run"] == "random" or m["run"] in draws
        assert m["random_runs"] == cfg.random_draws - floor
        assert 0 <= m["random_costlier_than"] <= m["random_runs"]
        assert m["random_min"] <= m["random_max"]
        if floor:
            assert m["random_min"] <= m["delta_logp"] <= m["random_max"]

    # the paper's table and paragraph: the further draws fold into the random row's range
    study = Study(results, "nano")
    text = mdtables.leave_out(study)
    assert "| Random draws |" in text and "random_2" not in text
    assert f"of the {cfg.random_draws} random removals" in text
    sentence = causal_variables.leave_out_variables(study, {})["sentence"]
    assert f"over {cfg.random_draws} seeded draws" in sentence and "random_2" not in sentence
    # the paired differences follow the ranking by mean drop, each method against the next one
    mean = {m["run"]: m["delta_logp"] for m in metrics.filter(pc.equal(metrics["family"], "all")).to_pylist()}
    first, second = sorted((m for m in cfg.methods if m != "random"), key=mean.__getitem__)
    assert (
        f"removing {style.method_name(first)}'s top sequences changes the target by" in sentence
        and f"relative to removing {style.method_name(second)}'s" in sentence
    ), sentence

    # experiments/readme_tables.py reads the README's leave-k-out table the way the README prints it
    frames = [
        pl.from_arrow(t)
        for t in (metrics, _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_RUNS_TABLE), table)
    ]
    readme = _leave_out_markdown(*frames, cfg.top_k, draws)
    readme_tables = _readme_tables()
    check = readme_tables.leave_out(readme, *frames)
    assert not check.misses and check.rows == len(cfg.methods) + 2 and check.figures > 0, check.misses
    row = readme.splitlines()[2]
    median = row.split(" | ")[3]
    changed = row.replace(f" | {median} | ", f" | {float(median) + 0.01:.2f} | ", 1)
    check = readme_tables.leave_out(readme.replace(row, changed), *frames)
    assert [m.split(" (")[0] for m in check.misses] == [f"{row.split(' | ')[0].lstrip('| ')}, column 4"]

    # experiments/replicate.py's leave-k-out section, the folder against itself: one order, the means
    done = run_experiment(
        "replicate.py", "--profiles", "nano", "nano", "--folders", str(results), str(results)
    )
    assert "  leave-k-out " in done.stdout and done.stdout.split("  leave-k-out ")[1].split()[0] == "1.00"
    section = done.stdout.split("\nLeave-k-out:")[1].split("\n\n")[0]
    line = next(x for x in section.splitlines() if x.split()[:1] == [first])
    assert line.count(f"{mean[first]:.2f} [") == 2, line

    assert main(["leave_out", "--profile", str(profile), "--force", "-q"]) == 0
    again = _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_RUNS_TABLE).to_pylist()
    assert all(r["adopted"] for r in again)
    assert _read(results, paths.LEAVE_OUT, paths.LEAVE_OUT_TABLE).equals(table)
    assert len(list(paths.retrained_dir("nano").iterdir())) == len(runs)


def _readme_tables():
    """``experiments/readme_tables.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", EXPERIMENTS / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leave_out_markdown(metrics, runs, changes, k: int, draws: list[str]) -> str:
    """The leave-k-out tables as the README's Markdown table prints them."""

    def ci(r: dict, column: str) -> str:
        return f"{r[column]:.2f} [{r[f'{column}_lo']:.2f}, {r[f'{column}_hi']:.2f}]"

    every = {r["run"]: r for r in metrics.filter(pl.col("family") == "all").iter_rows(named=True)}
    sizes = {r["run"]: r for r in runs.iter_rows(named=True)}
    median = dict(changes.group_by("run").agg(pl.col("delta_logp").median()).iter_rows())
    header = (
        "| removed | sequences (training rows) | mean | median | lost | beyond random | draws | training |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for run in [r for r in every if r not in draws]:
        r = every[run]
        cells = [
            f"up to {k} complete copies" if run == "ground_truth" else f"{run}'s top {k}",
            f"{sizes[run]['n_removed']} ({sizes[run]['n_rows_removed']:,})",
            ci(r, "delta_logp"),
            f"{median[run]:.2f}",
            f"{round(r['lost'] * r['n_behaviors'])}/{r['n_behaviors']}",
            "" if run == "random" else ci(r, "vs_random"),
            f"{r['random_costlier_than']} of {r['random_runs']}",
            "1 s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rows = [every[d] for d in draws]
    means = ", ".join(f"{r['delta_logp']:.2f}" for r in rows)
    paired = ", ".join(f"{r['vs_random']:.2f}" for r in rows)
    ranks = ", ".join(str(r["random_costlier_than"]) for r in rows) + f" of {rows[0]['random_runs']}"
    lines.append(f"| random draws 2-{len(draws) + 1} | - | {means} | - | - | {paired} | {ranks} | - |")
    return "\n".join(lines) + "\n"


def test_the_floor_ranks_each_run_among_the_random_draws():
    """random_costlier_than counts the random runs whose mean change is above a run's; a random run
    is ranked among the others; the floor's range is over every random run of the family."""
    import pyarrow as pa

    from pythia_attribution.leave_out import LEAVE_OUT_SCHEMA, aggregate

    means = {"random": -0.4, "random_2": -0.2, "random_3": -0.6, "bm25": -0.5, "ground_truth": -9.0}
    rows = [
        {"run": run, "behavior_id": f"b{i}", "family": "f", "item_id": f"i{i}", "n_removed_own": 1,
         "n_removed_own_truth": 0, "n_truth": 1, "n_truth_removed": 0, "logp_before": 0.0,
         "logp_after": mean + offset, "delta_logp": mean + offset, "exhibited_before": True,
         "exhibited_after": True}
        for run, mean in means.items()
        for i, offset in enumerate((-0.1, 0.1))
    ]  # fmt: skip
    metrics = aggregate(pa.Table.from_pylist(rows, LEAVE_OUT_SCHEMA), seed=0, n_boot=50)
    got = {m["run"]: m for m in metrics.to_pylist() if m["family"] == "all"}
    assert {r: (m["random_costlier_than"], m["random_runs"]) for r, m in got.items()} == {
        "bm25": (2, 3), "ground_truth": (3, 3), "random": (1, 2), "random_2": (0, 2), "random_3": (2, 2)
    }  # fmt: skip
    assert all(
        m["random_min"] == pytest.approx(-0.6) and m["random_max"] == pytest.approx(-0.2)
        for m in got.values()
    )


def test_random_draws_are_seeded_and_differ():
    from pythia_attribution.leave_out import random_removals

    pool, behaviors = np.arange(1000), ["a", "b"]
    first = random_removals(pool, behaviors, 10, seed=0, draw=2)
    assert all(np.array_equal(first[b], random_removals(pool, behaviors, 10, 0, 2)[b]) for b in behaviors)
    assert not np.array_equal(first["a"], random_removals(pool, behaviors, 10, 0, 3)["a"])
    assert all(len(np.unique(v)) == 10 and np.all(np.diff(v) > 0) for v in first.values())


def test_check_names_a_leave_out_method_the_attribute_stage_does_not_run():
    import dataclasses

    from pythia_attribution.check import check_inputs
    from pythia_attribution.errors import ConfigError

    profile = load_profile("nano")
    bad = dataclasses.replace(profile, leave_out=dataclasses.replace(profile.leave_out, methods=["nope"]))
    with pytest.raises(ConfigError, match="leave_out.methods: 'nope' is not in attribute.methods"):
        check_inputs(bad)
    hub = dataclasses.replace(profile, train=dataclasses.replace(profile.train, source="hub"))
    with pytest.raises(ConfigError, match="retraining needs train.source = 'train'"):
        check_inputs(hub)
