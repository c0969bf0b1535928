"""The memorization stage on nano: the one-pass test, training-order semantics, restricted sets."""

import numpy as np
import pyarrow.compute as pc
import torch

from pythia_attribution import paths, tables
from pythia_attribution.attribute import moments
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.config import load_profile
from pythia_attribution.memorization import dup_bin, memorization_test, restricted_step, wilson
from pythia_attribution.model import load_checkpoint


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def test_teacher_forced_exact_match_equals_generate(nano_run):
    """For every packed sequence at every checkpoint: one teacher-forced pass decides exactly what
    greedy generate() decides."""
    results = nano_run["results"]
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    windows = cands.tokens[:, :64].astype(np.int64)
    ckpts = _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    agreed = 0
    for ckpt in (ckpts[len(ckpts) // 2], ckpts[-1]):
        model, _ = load_checkpoint(results / paths.TRAIN / ckpt["path"])
        memorized, accuracy = memorization_test(model, windows, 32, 64)
        ids = torch.from_numpy(windows[:, :32])
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=1,
            eos_token_id=None,
        )[:, 32:].numpy()
        exact = (gen == windows[:, 32:]).all(axis=1)
        assert (exact == memorized).all()
        assert ((accuracy == 1.0) == memorized).all()
        agreed += len(exact)
    assert agreed == 2 * len(windows)


def test_no_sequence_is_tested_before_it_was_trained(nano_run):
    results = nano_run["results"]
    profile = load_profile(str(nano_run["profile"]))
    mem = _read(results, paths.MEMORIZATION, paths.MEMORIZATION_TABLE)
    seq, step = mem["seq_idx"].to_numpy(), mem["checkpoint"].to_numpy()
    assert (seq < step * profile.corpus.batch_size).all()
    # ... and every trained (sequence, checkpoint) pair is tested.
    ckpts = [c["step"] for c in _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()]
    n_seq = len(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    expected = sum(min(n_seq, s * profile.corpus.batch_size) for s in ckpts)
    assert len(mem) == expected
    summary = _read(results, paths.MEMORIZATION, paths.MEMORIZATION_SUMMARY_TABLE).to_pandas()
    first = summary.dropna(subset=["first_memorized"])
    assert (first["first_memorized"] * profile.corpus.batch_size > first["seq_idx"]).all()


def test_restricted_candidates_were_trained_before_the_checkpoint(nano_run):
    results = nano_run["results"]
    profile = load_profile(str(nano_run["profile"]))
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    att = _read(results, paths.MEMORIZATION, paths.MEMORIZED_ATTRIBUTION_TABLE)
    restricted = att.filter(pc.equal(att["setting"], "first_memorized")).to_pandas()
    assert len(restricted)
    first = cands.first_seq_idx[restricted["packed_id"].to_numpy()]
    assert (first < restricted["checkpoint"].to_numpy() * profile.corpus.batch_size).all()


def test_restricted_checkpoints_choose_the_first_listed_at_or_after_first_memorization():
    from types import SimpleNamespace

    first = np.array([200, 300, 400, 600, 700, 749])
    every = SimpleNamespace(restricted_checkpoints=[])
    assert restricted_step(first, every, 749).tolist() == first.tolist()
    listed = SimpleNamespace(restricted_checkpoints=[600, 300])
    assert restricted_step(first, listed, 749).tolist() == [300, 300, 600, 600, 749, 749]


def test_bins_and_intervals():
    assert [dup_bin(c) for c in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [
        "1",
        "2",
        "3-4",
        "3-4",
        "5-8",
        "5-8",
        "9-16",
        "33-64",
        "65-128",
    ]
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi
    assert wilson(0, 20)[0] == 0.0


def test_canary_memorization_agrees_with_the_probe(nano_run):
    """The memorization test on each canary's 64 tokens decides what the probe's greedy
    generation decided for the same canary at the same checkpoint."""
    results = nano_run["results"]
    table = _read(results, paths.MEMORIZATION, paths.CANARY_MEMORIZATION_TABLE).to_pandas()
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE).to_pandas()
    canary = probes[probes["behavior_id"].str.startswith("canary/")]
    by_probe = canary.groupby(["checkpoint", "count"])["exhibited"].sum()
    for row in table.itertuples():
        assert row.n_memorized == by_probe[(row.checkpoint, row.injected_count)]
    attributed = _read(results, paths.MEMORIZATION, paths.CANARY_ATTRIBUTION_TABLE).to_pandas()
    final = table[table["checkpoint"] == table["checkpoint"].max()]
    methods = load_profile(str(nano_run["profile"])).memorization.methods
    assert len(attributed) == final["n_memorized"].sum() * len(methods)


def test_memorized_sequences_are_attributed_with_estimated_second_moments(nano_run):
    """``trackstar_est`` runs at every checkpoint memorization attributes at: before the final one
    with second moments it estimated there itself, at the final one with the attribute stage's
    estimate (never written into that stage's folder)."""
    results = nano_run["results"]
    att = _read(results, paths.MEMORIZATION, paths.MEMORIZED_ATTRIBUTION_TABLE).to_pandas()
    final = max(c["step"] for c in _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist())
    steps = set(att["checkpoint"])
    assert steps - {final}, "nano attributes memorized sequences at an earlier checkpoint"
    assert set(att.loc[att["method"] == "trackstar_est", "checkpoint"]) == steps
    own = results / paths.MEMORIZATION / "indexes"
    for step in steps - {final}:
        assert (own / f"step{step}" / "adam_est" / moments.ESTIMATE).is_file(), step
    assert not (own / f"step{final}").exists()
    assert (results / paths.ATTRIBUTE / "indexes" / f"step{final}" / "adam_est" / moments.ESTIMATE).is_file()
