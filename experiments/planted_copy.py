"""Where each method ranks a planted verbatim copy of a query, printed per query.

    python experiments/planted_copy.py --profile nano

The queries are the profile's never-injected canaries (family ``memorized``, count 0), so a copy
planted among the training sequences is the only sequence holding the query. Every candidate plus
one copy of each query is scored at the final checkpoint by TrackStar's arithmetic without Adam
state (raw gradients, autocorrelation Hessian), gradient cosine, BM25, activation similarity and
the two activation-space methods (``residual_diff``, ``residual_change``; controls drawn as the
attribute stage draws them). Prints the planted copy's rank (1 = first) of every query. The test
suite checks rank 1 for the gradient methods and BM25 (``tests/test_attribute.py``); this prints
what the activation-space methods do. Run the pipeline through ``probe`` first. Like the CLI, the
script applies the profile's ``runtime.cpu_isa`` cap before torch loads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from pythia_attribution import paths, tables
from pythia_attribution.cli import hold_cpu_isa
from pythia_attribution.config import load_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="nano")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    hold_cpu_isa(profile.runtime.cpu_isa)  # the attribute stage's kernels, before torch loads

    from pythia_attribution.attribute import activations, baselines, gradients
    from pythia_attribution.attribute.candidates import load_candidates
    from pythia_attribution.model import load_checkpoint, set_threads

    set_threads(profile.runtime.threads)
    results = paths.results_root() / profile.name
    ckpts = tables.read_table(paths.table_path(results / paths.TRAIN, paths.CHECKPOINTS_TABLE)).to_pylist()
    final = max(ckpts, key=lambda c: c["step"])
    ckpt = results / paths.TRAIN / final["path"]
    cands = load_candidates(tables.read_table(paths.table_path(results / paths.CORPUS, paths.CORPUS_TABLE)))
    probes = tables.read_table(paths.table_path(results / paths.PROBE, paths.PROBES_TABLE)).to_pylist()
    here = [p for p in probes if p["checkpoint"] == final["step"]]
    queries = [p for p in here if p["family"] == "memorized" and p["count"] == 0]
    rows = cands.tokens.tolist() + [q["prompt_ids"] + q["target_ids"] for q in queries]
    planted = np.arange(len(cands.tokens), len(rows))
    cfg = profile.attribute
    scores: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = {"projection_dim": cfg.projection_dim, "token_batch_size": cfg.token_batch_size}
        train = gradients.build_index(work / "train", ckpt, rows, labels=None, optimizer_state=None, **common)
        query = gradients.query_index(
            work / "q", ckpt, [q["prompt_ids"] for q in queries], [q["target_ids"] for q in queries],
            optimizer_state=None, **common,
        )  # fmt: skip
        hessian = gradients.autocorrelation_hessian(train, work / "hessian")
        for name, h in (("trackstar_noadam", hessian), ("grad_cosine", None)):
            scorer = gradients.GradientScorer(train, query, unit_norm=True, hessian_path=h)
            scores[name] = np.concatenate([b for _, b in scorer.chunks()], axis=1)
        texts = list(cands.texts) + [q["prompt"] + q["target"] for q in queries]
        scores["bm25"] = baselines.BM25Scores(texts, [q["prompt"] + q["target"] for q in queries]).matrix()
        model, _ = load_checkpoint(ckpt)
        layer = baselines.middle_layer(model.config.num_hidden_layers)
        keys = baselines.mean_activations(model, [r[:-1] for r in rows], layer)
        scores["activation"] = (
            baselines.mean_activations(model, [q["prompt_ids"] + q["target_ids"] for q in queries], layer)
            @ keys.T
        )
        ctrls = activations.controls(queries, here, profile.runtime.seed)
        dirs = activations.directions(model, queries, ctrls, layer)
        scores["residual_diff"] = dirs @ keys.T
        change = activations.change_queries(work / "change", ckpt, queries, ctrls, dirs, layer, **common)
        scorer = gradients.GradientScorer(train, change, unit_norm=True, hessian_path=None)
        scores["residual_change"] = np.concatenate([b for _, b in scorer.chunks()], axis=1)
    print(f"{len(queries)} queries, {len(rows)} candidates (the last {len(queries)} are the planted copies)")
    for name, s in scores.items():
        ranks = (s > s[np.arange(len(queries)), planted][:, None]).sum(axis=1) + 1
        print(f"{name:18s} planted copy's rank per query: {' '.join(map(str, ranks))}")


if __name__ == "__main__":
    main()
