"""How close estimated second moments come to Adam's saved ones (``trackstar_est`` against ``trackstar``).

    python experiments/benchmarks/second_moments.py --profile micro --batches 4 16 64 --sample 64

On the profile's final checkpoint, which has a saved optimizer state (micro), estimates Adam's
second moments as the ``adam_est`` index does (``attribute/moments.py``: the mean squared
minibatch gradient over the last ``B`` training steps) for each ``--batches`` B, and prints, over
the weights of the modules bergson normalizes (every Linear of the base model):

- the correlation of log v (estimated against saved) over every entry, and the median factor by
  which an entry's estimate is off once the two are scaled to the same median (a uniform scale
  does not matter: TrackStar unit-normalizes);
- what the normalization does to TrackStar's rows: for ``--sample`` seeded candidate sequences, the
  mean cosine between a sequence's gradient divided by sqrt(saved v) and the same gradient
  divided by sqrt(estimated v), next to the cosine with the undivided gradient (no Adam
  correction, ``trackstar_noadam``), before any projection;
- the estimate's time and tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pythia_attribution import paths, tables
from pythia_attribution.attribute import moments
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.config import load_profile
from pythia_attribution.model import load_checkpoint, set_threads


def linear_weights(model) -> list[str]:
    """Parameter names of the weights bergson normalizes: every Linear under the base model."""
    prefix = next(n for n, m in model.named_modules() if m is model.base_model)
    return [
        f"{prefix}.{name}.weight" if prefix else f"{name}.weight"
        for name, m in model.base_model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def second_moments(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state"].values()
    by_name = {entry["param_name"]: entry["exp_avg_sq"] for entry in state}
    return {n: by_name[n] for n in names}


def sequence_gradients(model, rows: np.ndarray, names: list[str]) -> list[torch.Tensor]:
    """Each row's loss gradient over ``names``, flattened and concatenated."""
    params = dict(model.named_parameters())
    out = []
    for row in rows:
        ids = torch.from_numpy(row.astype(np.int64))[None]
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--sample", type=int, default=64, help="candidate sequences for the row cosines")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    set_threads(profile.runtime.threads)
    root = paths.results_root() / profile.name
    corpus = tables.read_table(paths.table_path(root / paths.CORPUS, paths.CORPUS_TABLE), made_by="corpus")
    ckpts = tables.read_table(paths.table_path(root / paths.TRAIN, paths.CHECKPOINTS_TABLE), made_by="train")
    final = ckpts.to_pylist()[-1]
    ckpt_dir = root / paths.TRAIN / final["path"]
    saved = moments.saved_state(ckpt_dir)
    if saved is None:
        raise SystemExit(f"{ckpt_dir} has no saved optimizer state to compare with")
    cands = load_candidates(corpus)
    model, _ = load_checkpoint(ckpt_dir)
    names = linear_weights(model)
    v_saved = second_moments(saved, names)
    flat_saved = torch.cat([v_saved[n].reshape(-1) for n in names]).double()
    rng = np.random.default_rng(profile.runtime.seed)
    rows = cands.tokens[np.sort(rng.choice(len(cands.tokens), size=args.sample, replace=False))]
    grads = sequence_gradients(model, rows, names)
    eps = 1e-8  # bergson's AdamNormalizer.weight_denominator

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a.double(), b.double(), dim=0))

    adam_rows = [g / (flat_saved.sqrt().float() + eps) for g in grads]
    noadam = float(np.mean([cosine(a, g) for a, g in zip(adam_rows, grads, strict=True)]))
    print(
        f"profile {profile.name}, step{final['step']}: {len(names)} Linear weights, {flat_saved.numel():,} "
        f"entries; {args.sample} sequences for the row cosines"
    )
    print(f"no Adam correction (trackstar_noadam): row cosine with the saved-state rows {noadam:.3f}")
    print("batches  sequences  seconds  log-v correlation  median factor off  row cosine")
    for batches in args.batches:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / moments.ESTIMATE
            start = time.perf_counter()
            settings = dataclasses.replace(moments.Settings.of(profile), batches=batches)
            groups, _ = moments.minibatches(cands, final["step"], settings)
            moments.estimate(out, ckpt_dir, cands, final["step"], settings)
            seconds = time.perf_counter() - start
            v_est = second_moments(out, names)
        flat_est = torch.cat([v_est[n].reshape(-1) for n in names]).double()
        log_s, log_e = flat_saved.clamp_min(1e-30).log10(), flat_est.clamp_min(1e-30).log10()
        corr = float(np.corrcoef(log_s.numpy(), log_e.numpy())[0, 1])
        off = (log_e - log_s) - (log_e - log_s).median()
        factor = float(10 ** off.abs().median())
        est_rows = [g / (flat_est.sqrt().float() + eps) for g in grads]
        row_cos = float(np.mean([cosine(a, e) for a, e in zip(adam_rows, est_rows, strict=True)]))
        n_seq = sum(len(g) for g in groups)
        print(f"{batches:7d}  {n_seq:9d}  {seconds:7.1f}  {corr:17.3f}  {factor:17.2f}  {row_cos:10.3f}")


if __name__ == "__main__":
    main()
