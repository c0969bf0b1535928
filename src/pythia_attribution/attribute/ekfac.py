"""EK-FAC influence (Grosse et al. 2023) through bergson's Hessian pipeline, and its score stores.

Unlike the projected indexes of ``gradients``, EK-FAC works on full, unprojected gradients (bergson
refuses random projection with the eigenvalue correction), so it has its own steps, each kept in a
folder and skipped when complete, and its scores are bergson's ``scores.bin`` store, read back here
in row order (``store_blocks``) or for given rows (``store_totals``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pythia_attribution.attribute import gradients


def scores(
    run_path: Path,
    checkpoint: Path,
    train_rows: np.ndarray,
    prompts: list[list[int]],
    targets: list[list[int]],
    *,
    token_batch_size: int,
    damping: float,
    seed: int,
    fit_rows: int = 0,
    timings: dict[str, float] | None = None,
    factors: Path | None = None,
    query_sets: list[np.ndarray] | None = None,
) -> Path:
    """EK-FAC influence (Grosse et al. 2023) of every training row on every query, through the
    steps of bergson's Hessian pipeline (``bergson.hessians.pipeline``), each kept in its own folder
    under ``run_path`` and skipped when already complete (``factors``: an already fitted
    ``factors/`` folder to use instead of step 1; ``query_sets``: see step 3b):

    1. ``factors/``: K-FAC covariances of each module's inputs and output gradients over the
       training rows (labels sampled from the model: the true Fisher, seeded by ``seed``), their
       eigendecomposition, and the eigenvalue correction (a second pass over the rows); over a
       seeded sample of ``fit_rows`` training rows when it is smaller than their number (0: all);
    2. ``queries/``: each query's full, unprojected gradient (loss on the target tokens);
    3. ``queries-ihvp/``: the damped inverse (``damping`` x the mean eigenvalue) applied to them;
    3b. with ``query_sets`` (lists of query positions), ``queries-sets/``: one query per set, the
       sum of its transformed queries; influence is linear in the query gradient, so a training
       row's score against it is its summed influence on the set's target losses, and every set
       costs one scoring pass together instead of one each;
    4. ``scores/``: a pass over the training rows scoring each row's full gradient against every
       transformed query (bergson's ``score_dataset``; ``scores.bin``, one row per training row).

    bergson refuses random projection with the eigenvalue correction, so nothing here is projected
    and the stored training index is not reused. Measured on micro (``experiments/benchmarks/
    attribution.py``), in plain forward + backward passes: the factors about 5 over the rows they
    are fitted on, the scores about 1.2 over every training row. ``timings`` receives each step's
    seconds.
    """
    gradients._bergson()
    from bergson import DataConfig, IndexConfig, PreprocessConfig
    from bergson.config import DistributedConfig, HessianConfig, InversionConfig, ScoreConfig
    from bergson.distributed import launch_distributed_run
    from bergson.hessians.apply_hessian import EkfacConfig, apply_worker
    from bergson.hessians.hessian_approximations import approximate_hessians
    from bergson.score.score import score_dataset

    run_path.mkdir(parents=True, exist_ok=True)
    timings = {} if timings is None else timings
    train_rows, _ = gradients.within_context(checkpoint, train_rows)  # as the index: see build_index
    subsets = {"train": None}  # the factors are fitted on the training rows themselves unless sampled
    if 0 < fit_rows < len(train_rows):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 83]))
        subsets["fit"] = np.sort(rng.choice(len(train_rows), size=fit_rows, replace=False))
    data_dirs = {name: run_path / f"{name}.data" for name in subsets}
    data_dirs.setdefault("fit", data_dirs["train"])
    for name, chosen in subsets.items():
        folder = data_dirs[name]
        if not folder.exists() and not (run_path / "scores").exists():
            rows = train_rows
            if chosen is not None:
                rows = (
                    train_rows[chosen]
                    if isinstance(train_rows, np.ndarray)
                    else [train_rows[i] for i in chosen]
                )
            shutil.rmtree(folder.with_name(folder.name + ".part"), ignore_errors=True)
            gradients.save_rows(folder.with_name(folder.name + ".part"), rows).rename(folder)

    def index_cfg(path: Path, data: str = "train") -> IndexConfig:
        return IndexConfig(
            run_path=str(path), model=str(checkpoint), data=DataConfig(dataset=str(data_dirs[data])),
            projection_dim=0, token_batch_size=token_batch_size,
        )  # fmt: skip

    def step(name: str, make) -> Path:
        path = run_path / name
        if not path.exists():
            start = time.perf_counter()
            make(path)
            timings[name] = time.perf_counter() - start
        return path

    def fit(path: Path) -> None:
        torch.manual_seed(seed)  # the sampled labels
        approximate_hessians(index_cfg(path, "fit"), HessianConfig(method="kfac", ev_correction=True))

    factors = factors if factors is not None else step("factors", fit)
    queries = step(
        "queries",
        lambda path: gradients.query_index(
            path, checkpoint, prompts, targets, optimizer_state=None, projection_dim=0,
            token_batch_size=token_batch_size,
        ),
    )  # fmt: skip

    def apply(path: Path) -> None:
        part = path.with_name(path.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        cfg = EkfacConfig(
            hessian_method_path=str(factors), gradient_path=str(queries), run_path=str(part),
            ev_correction=True,
        )  # fmt: skip
        launch_distributed_run(
            "apply_hessian", apply_worker, [cfg, InversionConfig(damping_factor=damping)], DistributedConfig()
        )
        part.rename(path)

    transformed = step("queries-ihvp", apply)
    if query_sets is not None:
        transformed = step("queries-sets", lambda path: sum_query_sets(transformed, path, query_sets))

    def score(path: Path) -> None:
        score_dataset(
            index_cfg(path),
            ScoreConfig(query_path=str(transformed), score="individual", higher_is_better=True),
            PreprocessConfig(),
        )

    scores = step("scores", score)
    for folder in data_dirs.values():
        shutil.rmtree(folder, ignore_errors=True)
    return scores


def sum_query_sets(query_path: Path, out: Path, sets: list[np.ndarray]) -> None:
    """A bergson query index at ``out`` with one row per set: the sum of ``query_path``'s rows listed
    in it (float64 accumulation, stored in the index's dtype); the processor's files are copied."""
    from bergson.data import create_index

    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(query_path, part, ignore=shutil.ignore_patterns("gradients.bin", "info.json"))
    info = json.loads((query_path / "info.json").read_text())
    rows, _ = gradients.module_blocks(query_path)
    summed = create_index(part, len(sets), info["grad_sizes"], rows.dtype)
    for i, members in enumerate(sets):
        if not len(members):
            raise ValueError(f"query set {i} is empty")
        summed[i] = np.asarray(rows[np.asarray(members)], dtype=np.float64).sum(axis=0)
    summed.flush()
    del summed
    part.rename(out)


def store_blocks(path: Path, chunk_rows: int):
    """(first row, queries x rows) over a bergson score store (``scores.bin``), in row order."""
    from bergson.data import load_scores

    scores = load_scores(path)
    for start in range(0, len(scores), chunk_rows):
        yield start, np.asarray(scores[start : start + chunk_rows], dtype=np.float32).T


def store_totals(path: Path):
    """``totals(ids)``: the stored queries x len(ids) scores of the given rows."""
    from bergson.data import load_scores

    scores = load_scores(path)
    return lambda ids: np.asarray(scores[np.asarray(ids)], dtype=np.float32).T
