"""Gradient attribution through bergson: indexes, the TrackStar Hessian, and scoring.

The training index has one row per packed training sequence (row ``p`` = ``packed_id`` p);
every epoch trains on the same packed sequences, so at a fixed checkpoint all copies of a
sequence share one gradient. Query gradients are built the same way (same projection, same
optimizer normalizer) with the loss on the target tokens only. Scoring goes through bergson's
``Attributor``, which applies the Hessian and unit normalization exactly as its TrackStar does.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

log = logging.getLogger(__name__)


def _bergson():
    """Import bergson lazily (about 6 s) and undo the root-logger change it makes at import."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import bergson  # noqa: F401
    import datasets

    datasets.disable_progress_bars()
    root.setLevel(level)
    root.handlers = handlers
    for name in ("bergson", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return bergson


def build_index(
    run_path: Path,
    checkpoint: Path,
    rows: list[list[int]],
    *,
    labels: list[list[int]] | None,
    optimizer_state: Path | None,
    projection_dim: int,
    token_batch_size: int,
) -> Path:
    """Build a bergson gradient index over ``rows`` (token ids) with the checkpoint's model.

    Rows longer than the model's context are cut to it: a Pythia training sequence holds 2,049
    tokens (2,048 inputs, each predicting the next), bergson's token batches cannot exceed the
    model's 2,048 positions, so at real scale the loss of a training row covers its first 2,047
    predictions, not 2,048. Shorter rows (micro) are used whole.
    """
    _bergson()
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(checkpoint).max_position_embeddings
    if any(len(r) > limit for r in rows):
        log.info("rows cut to the model's %d positions (one prediction of %d dropped)", limit, limit)
        rows = [r[:limit] for r in rows]
        labels = None if labels is None else [lab[:limit] for lab in labels]
    from bergson import DataConfig, IndexConfig, PreprocessConfig
    from bergson.build import build

    data_dir = run_path.with_name(run_path.name + ".data")
    columns = {"input_ids": rows}
    if labels is not None:
        columns["labels"] = labels
    Dataset.from_dict(columns).save_to_disk(str(data_dir))
    cfg = IndexConfig(
        run_path=str(run_path),
        model=str(checkpoint),
        data=DataConfig(dataset=str(data_dir)),
        projection_dim=projection_dim,
        token_batch_size=token_batch_size,
        optimizer_state=str(optimizer_state) if optimizer_state else "",
    )
    build(cfg, PreprocessConfig())
    shutil.rmtree(data_dir)
    return run_path


def module_blocks(index_path: Path) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """The index's gradients (rows x dims) and each module's column range."""
    from bergson.data import column_offsets, load_gradients

    grad_sizes = json.loads((index_path / "info.json").read_text())["grad_sizes"]
    return load_gradients(str(index_path)), dict(column_offsets(grad_sizes))


def autocorrelation_hessian(index_path: Path, out: Path) -> Path:
    """TrackStar's Hessian: per-module autocorrelation of the index's (normalized, projected)
    gradients, reduced and eigendecomposed by bergson, saved where bergson's preconditioner
    loader looks. Computed from the stored rows, so no second pass over the training data."""
    _bergson()
    from bergson.gradients import GradientProcessor
    from bergson.process_autocorrelation import process_autocorrelation_matrices

    grads, blocks = module_blocks(index_path)
    processor = GradientProcessor.load(index_path, map_location="cpu")
    hessians = {}
    for name, (lo, hi) in blocks.items():
        g = torch.from_numpy(np.array(grads[:, lo:hi], dtype=np.float32, order="C"))
        hessians[name] = g.mT @ g
    sizes = {name: hi - lo for name, (lo, hi) in blocks.items()}
    process_autocorrelation_matrices(processor, hessians, len(grads), sizes, rank=0)
    processor.save(out)
    return out


def score_all(
    index_path: Path, query_path: Path, *, unit_norm: bool, hessian_path: Path | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scores of every query against every index row, in index order, in total and per module."""
    _bergson()
    from bergson import Attributor

    attributor = Attributor(
        str(index_path),
        device="cpu",
        unit_norm=unit_norm,
        hessian_path=str(hessian_path) if hessian_path else None,
    )
    q_grads, blocks = module_blocks(query_path)
    blocks_np = {
        name: np.array(q_grads[:, lo:hi], dtype=np.float32, order="C") for name, (lo, hi) in blocks.items()
    }

    def full(modules: set[str] | None) -> np.ndarray:
        # Fresh copies: Attributor.search normalizes the query tensors in place (and the index
        # files are read-only memory maps, where an in-place write segfaults).
        queries = {name: torch.from_numpy(block.copy()) for name, block in blocks_np.items()}
        values, indices = attributor.search(queries, k=None, modules=modules)
        out = np.empty(values.shape, dtype=np.float32)
        np.put_along_axis(out, indices.numpy(), values.numpy(), axis=1)
        return out

    # The total is the sum of the per-module scores in the index's module order. bergson's own
    # all-module search sums over a ``set`` of module names, so its float32 total depends on
    # PYTHONHASHSEED (last-bit differences between two runs of the same inputs); summing here in
    # a fixed order makes the scores identical from run to run, and saves one full pass.
    per_module = {name: full({name}) for name in attributor.ordered_modules}
    total = torch.stack([torch.from_numpy(per_module[name]) for name in attributor.ordered_modules], -1)
    return total.sum(-1).numpy(), per_module


def unit_rows(index_path: Path) -> np.ndarray:
    """The index's rows, all modules concatenated and scaled to unit norm (cosine as inner product)."""
    grads, _ = module_blocks(index_path)
    rows = np.asarray(grads, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
