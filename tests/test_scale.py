"""Attribution at scale, on nano: the training index in shards built by separate processes, and
through bergson's own launcher, gives the rows (and the tables) of one index built at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc

from pythia_attribution import paths, tables
from pythia_attribution.attribute import gradients
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.cli import main


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def _rows(folder):
    return np.concatenate([gradients.module_blocks(s)[0] for s in gradients.shards_of(folder)])


def test_two_shards_built_by_two_processes_equal_one_index(nano_run, tmp_path, monkeypatch):
    reference = nano_run["results"]
    root = tmp_path / "results"
    for stage_name in (paths.CORPUS, paths.TRAIN, paths.PROBE):
        shutil.copytree(reference / stage_name, root / "nano" / stage_name)
    env = {
        **os.environ,
        "PYTHIA_ATTRIBUTION_RESULTS": str(root),
        "PYTHIA_ATTRIBUTION_CACHE": str(nano_run["root"] / "world" / "cache"),
    }
    for key in ("PYTHIA_ATTRIBUTION_RESULTS", "PYTHIA_ATTRIBUTION_CACHE"):
        monkeypatch.setenv(key, env[key])
    profile = tmp_path / "profiles" / "nano.toml"
    profile.parent.mkdir()
    text = nano_run["profile"].read_text()
    assert "\nfaiss = true\n" in text
    profile.write_text(text.replace("\nfaiss = true\n", "\nfaiss = true\nindex_shards = 2\n"))

    # a shard that does not exist, or none named: one line, exit 2
    assert main(["index-shard", "--shard", "2", "--profile", str(profile), "-q"]) == 2
    assert main(["index-shard", "--profile", str(profile), "-q"]) == 2

    # two separate processes, at the same time, each building one shard of every index
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pythia_attribution",
                "index-shard",
                "--shard",
                str(i),
                "--profile",
                str(profile),
                "-q",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    step = _read(reference, paths.TRAIN, paths.CHECKPOINTS_TABLE)["step"].to_pylist()[-1]
    built = root / "nano" / "shards" / f"step{step}"
    assert sorted(p.relative_to(built).as_posix() for p in built.glob("*/shard-*")) == [
        f"{name}/shard-{i:05d}-of-00002" for name in ("adam", "adam_est", "raw") for i in (0, 1)
    ]

    # the attribute stage adopts them (moves them into its outputs) and builds nothing else
    assert main(["attribute", "--profile", str(profile), "-q"]) == 0
    assert not list(built.rglob("gradients.bin"))
    n_rows = len(load_candidates(_read(reference, paths.CORPUS, paths.CORPUS_TABLE)).tokens)
    for name in ("raw", "adam", "adam_est"):
        folder = root / "nano" / paths.ATTRIBUTE / "indexes" / f"step{step}" / name / "train"
        shards = gradients.shards_of(folder)
        assert [len(gradients.module_blocks(s)[0]) for s in shards] == [
            hi - lo for lo, hi in gradients.shard_ranges(n_rows, 2)
        ]
        single = _rows(reference / paths.ATTRIBUTE / "indexes" / f"step{step}" / name / "train")
        sharded = _rows(folder)
        assert sharded.shape == single.shape
        # bergson batches rows by tokens, so a row's batch neighbours differ between the two
        # builds; the gradients agree to float32 rounding of the batched products
        np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6)

    # and the tables: the same top-k in the same order, scores within float noise
    keys = ["behavior_id", "method", "checkpoint", "rank"]
    a = _read(reference, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).sort_by([(k, "ascending") for k in keys])
    b = _read(root / "nano", paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).sort_by(
        [(k, "ascending") for k in keys]
    )
    assert a.select(keys).equals(b.select(keys))
    same = pc.equal(a["packed_id"], b["packed_id"])
    assert pc.all(same).as_py(), a.filter(pc.invert(same)).to_pylist()[:3]
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-4, atol=1e-6)


def test_bergsons_launcher_with_two_cpu_workers_gives_the_same_rows(nano_run, tmp_path):
    """bergson's own launcher (spawned workers over gloo on a CPU) writes the rows of one process."""
    reference = nano_run["results"]
    ckpts = _read(reference, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    ckpt = reference / paths.TRAIN / ckpts[-1]["path"]
    rows = load_candidates(_read(reference, paths.CORPUS, paths.CORPUS_TABLE)).tokens[:96]
    common = {"labels": None, "optimizer_state": None, "projection_dim": 4, "token_batch_size": 1024}
    one = gradients.build_index(tmp_path / "one", ckpt, rows, nproc_per_node=1, **common)
    two = gradients.build_index(tmp_path / "two", ckpt, rows, nproc_per_node=2, **common)
    np.testing.assert_allclose(_rows(two), _rows(one), rtol=1e-4, atol=1e-6)
