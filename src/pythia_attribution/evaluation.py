"""What the causal evaluations (the ``causal`` and ``leave_out`` stages) read, read one way: the
attribute stage's rankings at the final checkpoint, the behaviors exhibited there, their
ground-truth sequences under a named truth definition, and the seeded samples drawn from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pythia_attribution import paths
from pythia_attribution.attribute.candidates import Candidates, load_candidates, truth_sets


@dataclass
class AtFinal:
    corpus: pa.Table
    cands: Candidates
    ground_truth: pa.Table
    truth: dict[str, np.ndarray]  # item -> its ground-truth packed ids (the stage's truth definition)
    checkpoints: list[dict]  # checkpoints.arrow's rows
    final: dict  # the final checkpoint's row
    final_dir: Path
    attributions: pd.DataFrame  # every method's top k at the final checkpoint
    probes: dict[str, dict]  # behavior -> its probe row, for the behaviors exhibited at the final checkpoint

    def behaviors(self) -> list[str]:
        """The exhibited behaviors that were attributed, sorted."""
        return sorted(set(self.attributions["behavior_id"]) & set(self.probes))


def at_final(ctx, truth_definition: str) -> AtFinal:
    corpus = ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE)
    cands = load_candidates(corpus)
    ground_truth = ctx.input_table(paths.CORPUS, paths.GROUND_TRUTH_TABLE)
    ckpts = ctx.input_table(paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    final = max(ckpts, key=lambda c: c["step"])
    attributions = ctx.input_table(paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).to_pandas()
    probes = {
        p["behavior_id"]: p
        for p in ctx.input_table(paths.PROBE, paths.PROBES_TABLE).to_pylist()
        if p["checkpoint"] == final["step"] and p["exhibited"]
    }
    return AtFinal(
        corpus, cands, ground_truth, truth_sets(ground_truth, cands, truth_definition), ckpts, final,
        ctx.inputs[paths.TRAIN] / final["path"], attributions[attributions["checkpoint"] == final["step"]],
        probes,
    )  # fmt: skip


def sample(values, n: int, seed: int, salt: int) -> list:
    """A seeded sample of ``n`` of ``values``, sorted (all of them when ``n`` is 0 or not smaller);
    ``salt`` keeps each stage's draw its own."""
    values = sorted(values)
    if not n or len(values) <= n:
        return values
    rng = np.random.default_rng(np.random.SeedSequence([seed, salt]))
    return sorted(rng.choice(values, size=n, replace=False).tolist())


def reference(own: np.ndarray, k: int, seed: int, salt: int) -> np.ndarray:
    """Up to ``k`` of a behavior's ground-truth packed ids: all when there are at most ``k``, else
    a seeded sample (seeded by their number too), sorted."""
    if len(own) <= k:
        return np.asarray(own, np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, salt, len(own)]))
    return np.sort(rng.choice(own, k, replace=False)).astype(np.int64)
