"""Gradient attribution through bergson: indexes, the TrackStar Hessian, and scoring.

The training index has one row per packed training sequence (row ``p`` = ``packed_id`` p);
every epoch trains on the same packed sequences, so at a fixed checkpoint all copies of a
sequence share one gradient. Query gradients are built the same way (same projection, same
optimizer normalizer) with the loss on the target tokens only.

At scale the training index is a list of **shards**, each a bergson index over a contiguous range
of rows (``shard-00000-of-00004/``, ...), built by one process, by bergson's own launcher over
several GPUs (``nproc_per_node``), or by separate machines (``python -m pythia_attribution
index-shard``) and merged here at query time. Scoring streams over the shards in chunks of rows
(:class:`GradientScorer`), applying the Hessian and unit normalization exactly as bergson's
``Attributor`` does (its arithmetic, module by module), so memory holds one chunk, not the index.
EK-FAC, which needs unprojected gradients and bergson's Hessian pipeline, is in ``ekfac``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
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
    rows,
    *,
    labels: list[list[int]] | None,
    optimizer_state: Path | None,
    projection_dim: int,
    token_batch_size: int,
    nproc_per_node: int = 0,
    attribute_tokens: bool = False,
    precision: str = "fp32",
) -> Path:
    """Build a bergson gradient index over ``rows`` (token ids: a 2-D array or a list of lists)
    with the checkpoint's model; ``nproc_per_node`` > 0 runs it through bergson's launcher with
    that many workers (0: bergson's default, one per visible GPU or one on a CPU).
    ``attribute_tokens``: one row per input position instead of per sequence (bergson's per-token
    gradients, ``offsets.npy`` gives each sequence's rows); a sequence's rows sum to its row. Its
    batches hold at most the longest row's tokens: with Adam normalization bergson forms per-token
    gradients whole, ``[tokens, out, in]`` per module, before projecting them, which at micro's
    2,048-token batches is 512 MB for each MLP matrix and took the analyses stage to 6-7 GiB; one
    sequence per batch gives the same values in 2.7 GiB, and faster (70 s against 80-84 for the
    stage). At real scale a batch holds one sequence anyway.
    ``precision``: bergson's dtype for the model's parameters (the stages keep its default,
    fp32; the GPU benchmark also times bf16).

    Rows longer than the model's context are cut to it: a Pythia training sequence holds 2,049
    tokens (2,048 inputs, each predicting the next), bergson's token batches cannot exceed the
    model's 2,048 positions, so at real scale the loss of a training row covers its first 2,047
    predictions, not 2,048. Shorter rows (micro) are used whole.
    """
    _bergson()
    rows, labels = within_context(checkpoint, rows, labels)
    if attribute_tokens and len(rows):
        longest = rows.shape[1] if isinstance(rows, np.ndarray) else max(len(r) for r in rows)
        token_batch_size = min(token_batch_size, longest)
    from bergson import DataConfig, IndexConfig, PreprocessConfig
    from bergson.build import build
    from bergson.config import DistributedConfig

    data_dir = save_rows(run_path.with_name(run_path.name + ".data"), rows, labels)
    distributed = DistributedConfig(nproc_per_node=nproc_per_node) if nproc_per_node else DistributedConfig()
    cfg = IndexConfig(
        run_path=str(run_path),
        model=str(checkpoint),
        data=DataConfig(dataset=str(data_dir)),
        projection_dim=projection_dim,
        token_batch_size=token_batch_size,
        optimizer_state=str(optimizer_state) if optimizer_state else "",
        distributed=distributed,
        attribute_tokens=attribute_tokens,
        precision=precision,
    )
    build(cfg, PreprocessConfig())
    shutil.rmtree(data_dir)
    return run_path


def build_index_pair(
    adam_path: Path,
    raw_path: Path | None,
    checkpoint: Path,
    rows,
    *,
    optimizer_state: Path,
    projection_dim: int,
    token_batch_size: int,
    more: dict[Path, Path] | None = None,
) -> tuple[Path, Path | None]:
    """The index normalized by ``optimizer_state``, the raw one (unless ``raw_path`` is None) and
    those in ``more`` (folder -> its optimizer state) over ``rows`` from one forward and backward
    pass (``paired.build_pair``): the ``build_index`` calls with and without each state give the
    same files, at the cost of one. One process; bergson's launcher builds them apart."""
    _bergson()
    from pythia_attribution.attribute import paired

    rows, _ = within_context(checkpoint, rows)
    data_dir = save_rows(adam_path.with_name(adam_path.name + ".data"), rows)
    paired.build_pair(
        adam_path, raw_path, checkpoint, data_dir, optimizer_state=optimizer_state,
        projection_dim=projection_dim, token_batch_size=token_batch_size, more=more,
    )  # fmt: skip
    shutil.rmtree(data_dir)
    return adam_path, raw_path


def within_context(checkpoint: Path, rows, labels: list[list[int]] | None = None):
    """Rows (and labels) cut to the checkpoint's context, as ``build_index`` documents."""
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(checkpoint).max_position_embeddings
    width = rows.shape[1] if isinstance(rows, np.ndarray) else max((len(r) for r in rows), default=0)
    if width > limit:
        log.info("rows cut to the model's %d positions (one prediction of %d dropped)", limit, limit)
        rows = rows[:, :limit] if isinstance(rows, np.ndarray) else [r[:limit] for r in rows]
        labels = None if labels is None else [lab[:limit] for lab in labels]
    return rows, labels


def save_rows(
    data_dir: Path, rows, labels: list[list[int]] | None = None, columns: dict | None = None
) -> Path:
    """Token rows (a 2-D array or a list of lists), optional labels and other columns as a
    ``save_to_disk`` dataset, the form bergson reads (an ``input_ids`` column is used as is)."""
    extra = {**({"labels": labels} if labels is not None else {}), **(columns or {})}
    if isinstance(rows, np.ndarray):
        flat = pa.array(np.ascontiguousarray(rows, dtype=np.int64).reshape(-1))
        table = {
            "input_ids": pa.ListArray.from_arrays(np.arange(0, len(flat) + 1, max(rows.shape[1], 1)), flat)
        }
        dataset = Dataset(pa.table({**table, **extra}))
    else:
        dataset = Dataset.from_dict({"input_ids": rows, **extra})
    dataset.save_to_disk(str(data_dir))
    return data_dir


def objective_index(
    run_path: Path,
    checkpoint: Path,
    rows: list[list[int]],
    labels: list[list[int]],
    columns: dict,
    objective: Callable,
    *,
    projection_dim: int,
    token_batch_size: int,
) -> Path:
    """A bergson index like ``build_index``'s (same model loading, projection, batching and
    storage, one process, no optimizer normalizer) whose row ``i`` is the gradient of a scalar
    of our own, ``objective(model, x, y, batch) -> per-row values`` (it must call backward on
    their sum, as bergson's loss does); ``columns`` reach it through ``batch``.

    bergson collects each row's gradient over every position but its last (the last input of a
    language-model row predicts nothing); an objective that reads the last position's activations
    needs its rows to end one token later. ``tests/test_attribute.py`` checks that bergson's own
    loss as the objective gives ``build_index``'s rows.
    """
    _bergson()
    from bergson import DataConfig, IndexConfig, PreprocessConfig
    from bergson.collector.collector import CollectorComputer
    from bergson.collector.gradient_collectors import GradientCollector
    from bergson.data import allocate_batches
    from bergson.utils.worker_utils import create_processor, setup_data_pipeline, setup_model_and_peft

    data_dir = save_rows(run_path.with_name(run_path.name + ".data"), rows, labels, columns)
    cfg = IndexConfig(
        run_path=str(run_path), model=str(checkpoint), data=DataConfig(dataset=str(data_dir)),
        projection_dim=projection_dim, token_batch_size=token_batch_size,
        drop_columns=False,  # the objective's own columns reach it
    )  # fmt: skip
    shutil.rmtree(cfg.partial_run_path, ignore_errors=True)
    cfg.partial_run_path.mkdir(parents=True)
    data, _ = setup_data_pipeline(cfg)
    model, target_modules = setup_model_and_peft(cfg)
    processor = create_processor(model, cfg, target_modules)
    collector = GradientCollector(
        model=model.base_model, cfg=cfg, processor=processor, target_modules=target_modules, data=data,
        preprocess_cfg=PreprocessConfig(), attention_cfgs={}, filter_modules=cfg.filter_modules,
    )  # fmt: skip
    batches = allocate_batches(data["length"][:], cfg.token_batch_size)
    computer = CollectorComputer(model=model, data=data, collector=collector, batches=batches, cfg=cfg)
    computer.forward_backward = objective
    computer.run_with_collector_hooks(desc="objective gradients")
    shutil.move(cfg.partial_run_path, run_path)
    shutil.rmtree(data_dir)
    return run_path


def query_index(
    run_path: Path, checkpoint: Path, prompts: list[list[int]], targets: list[list[int]], **common
):
    """A query index: each row is prompt + target, with the loss on the target tokens only
    (``common``: ``build_index``'s keyword arguments)."""
    rows = [p + t for p, t in zip(prompts, targets, strict=True)]
    labels = [[-100] * len(p) + t for p, t in zip(prompts, targets, strict=True)]
    return build_index(run_path, checkpoint, rows, labels=labels, **common)


def shard_ranges(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of ``n_shards`` near-equal shards (the first ones one row longer)."""
    bounds = np.linspace(0, n_rows, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}"


def shards_of(folder: Path) -> list[Path]:
    """An index folder's shards in row order (a plain bergson index is its own single shard)."""
    if (folder / "info.json").exists():
        return [folder]
    found = sorted(p for p in folder.glob("shard-*-of-*") if (p / "info.json").exists())
    if not found:
        raise FileNotFoundError(f"no bergson index or shards in {folder}")
    total = int(found[0].name.rsplit("-", 1)[1])
    if len(found) != total:
        raise FileNotFoundError(f"{folder}: {len(found)} of {total} shards present")
    return found


def module_blocks(index_path: Path) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """The index's gradients (rows x dims) and each module's column range."""
    from bergson.data import column_offsets, load_gradients

    grad_sizes = json.loads((index_path / "info.json").read_text())["grad_sizes"]
    return load_gradients(str(index_path)), dict(column_offsets(grad_sizes))


def row_chunks(maps: list[tuple[np.ndarray, dict]], chunk_rows: int):
    """(global first row, stored rows) over shards' ``module_blocks``, ``chunk_rows`` rows at a time."""
    offset = 0
    for grads, _ in maps:
        for start in range(0, len(grads), chunk_rows):
            yield offset + start, grads[start : start + chunk_rows]
        offset += len(grads)


def autocorrelation_hessian(index: Path | list[Path], out: Path, chunk_rows: int = 16384) -> Path:
    """TrackStar's Hessian: per-module autocorrelation of the index's (normalized, projected)
    gradients, reduced and eigendecomposed by bergson, saved where bergson's preconditioner
    loader looks. Computed from the stored rows, so no second pass over the training data; the
    sum of g^T g streams over shards and chunks of ``chunk_rows`` rows (one chunk: one product)."""
    _bergson()
    from bergson.gradients import GradientProcessor
    from bergson.process_autocorrelation import process_autocorrelation_matrices

    shards = index if isinstance(index, list) else shards_of(index)
    maps = [module_blocks(shard) for shard in shards]
    blocks = maps[0][1]
    hessians: dict[str, torch.Tensor] = {}
    for _, chunk in row_chunks(maps, chunk_rows):
        for name, (lo, hi) in blocks.items():
            g = torch.from_numpy(np.array(chunk[:, lo:hi], dtype=np.float32, order="C"))
            hessians[name] = g.mT @ g if name not in hessians else hessians[name] + g.mT @ g
    processor = GradientProcessor.load(shards[0], map_location="cpu")
    sizes = {name: hi - lo for name, (lo, hi) in blocks.items()}
    process_autocorrelation_matrices(processor, hessians, sum(len(g) for g, _ in maps), sizes, rank=0)
    processor.save(out)
    return out


class GradientScorer:
    """Scores of queries against a sharded training index, chunk by chunk.

    The arithmetic is bergson ``Attributor``'s, module by module: the query is preconditioned
    (H^-1/2 two-sided with unit norm, H^-1 one-sided without) and divided by its norm plus eps;
    each chunk of training rows is preconditioned (two-sided only), divided by its norm over all
    modules (NaN and inf set to 0); the total is the sum of the per-module scores in the index's
    module order (bergson sums over a set, whose order follows PYTHONHASHSEED). Memory: one chunk
    of rows and its per-module scores, whatever the number of rows.
    """

    def __init__(
        self,
        index: Path | list[Path],
        query_path: Path | tuple[np.ndarray, dict[str, tuple[int, int]]],
        *,
        unit_norm: bool,
        hessian_path: Path | None,
        chunk_rows: int = 16384,
        device: str = "cpu",
    ):
        _bergson()
        from bergson.config import InversionConfig
        from bergson.gradients import GradientProcessor
        from bergson.hessians.preconditioner import load_preconditioner

        self.shards = index if isinstance(index, list) else shards_of(index)
        self.maps = [module_blocks(shard) for shard in self.shards]
        self.blocks = self.maps[0][1]
        if any(blocks != self.blocks for _, blocks in self.maps):
            raise ValueError(f"shards of {self.shards[0].parent} differ in their modules")
        self.offsets = np.cumsum([0] + [len(g) for g, _ in self.maps])
        self.n_rows = int(self.offsets[-1])
        self.modules = list(self.blocks)
        self.unit_norm, self.chunk_rows, self.device = unit_norm, chunk_rows, device
        processor = GradientProcessor.load(self.shards[0], map_location="cpu")
        processor.check_projection_version()
        self.preconditioner = None
        if hessian_path is not None:
            processor.check_saved_projection(hessian_path, "The Hessian")
            self.preconditioner = load_preconditioner(
                hessian_path,
                inversion_cfg=InversionConfig(),
                power=-0.5 if unit_norm else -1.0,
                device=device,
            )
        # a query index's folder, or its rows and module blocks computed elsewhere
        q_grads, q_blocks = module_blocks(query_path) if isinstance(query_path, Path) else query_path
        q = {n: _tensor(q_grads[:, lo:hi], device) for n, (lo, hi) in q_blocks.items()}
        if self.preconditioner is not None:
            q = {n: g.to(torch.float32) for n, g in self.preconditioner.apply(q).items()}
        if unit_norm:
            norm = torch.cat([q[n] for n in self.modules], dim=1).norm(dim=1, keepdim=True)
            q = {n: g / (norm + torch.finfo(norm.dtype).eps) for n, g in q.items()}
        self.queries = q
        self.n_queries = len(q_grads)

    def _rows(self, rows: np.ndarray, whole: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Training rows (any dtype), per module, prepared as the Attributor prepares its index.
        ``whole``: rows that are parts of one sequence (e.g. its per-token gradients), each divided
        by the norm of the sequence's own prepared row ``whole`` instead of its own norm."""
        g = {n: _tensor(rows[:, lo:hi], self.device) for n, (lo, hi) in self.blocks.items()}
        if self.unit_norm:
            if self.preconditioner is not None:
                g = {n: t.to(torch.float32) for n, t in self.preconditioner.apply(g).items()}
            if whole is None:
                norm = sum((torch.square(g[n]).sum(dim=1, keepdim=True) for n in self.modules), start=0.0)
            else:
                w = {n: _tensor(whole[None, lo:hi], self.device) for n, (lo, hi) in self.blocks.items()}
                if self.preconditioner is not None:
                    w = {n: t.to(torch.float32) for n, t in self.preconditioner.apply(w).items()}
                norm = sum((torch.square(w[n]).sum() for n in self.modules), start=0.0)
            g = {n: torch.nan_to_num(t / norm**0.5, nan=0.0, posinf=0.0, neginf=0.0) for n, t in g.items()}
        return g

    def _per_module(self, rows: np.ndarray, whole: np.ndarray | None = None) -> torch.Tensor:
        """queries x rows x modules, in the index's module order."""
        g = self._rows(rows, whole)
        return torch.stack([self.queries[n] @ g[n].mT for n in self.modules], dim=-1)

    def module_chunks(self):
        """(first row, per-module scores: queries x rows x modules) over the whole index, in row order."""
        for start, rows in row_chunks(self.maps, self.chunk_rows):
            yield start, self._per_module(rows).cpu().numpy()

    def parts(self, rows: np.ndarray, whole: np.ndarray) -> np.ndarray:
        """queries x len(rows) x modules scores of the parts of one sequence (rows in the index's
        layout, e.g. bergson's per-token gradients of it), whose stored row is ``whole``. Every
        step of the preparation is linear in the row except the norm, which is the whole
        sequence's, so when the parts sum to the sequence's row their scores sum to its score."""
        return self._per_module(rows, whole).cpu().numpy()

    def chunks(self, on_rows: Callable[[int, np.ndarray], None] | None = None):
        """(first row, totals: queries x rows) over the whole index, in row order; ``on_rows``
        also receives each chunk's stored rows (all modules concatenated, unit norm) for faiss."""
        for start, rows in row_chunks(self.maps, self.chunk_rows):
            if on_rows is not None:
                on_rows(start, unit(rows))
            yield start, self._per_module(rows).sum(-1).cpu().numpy()

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows with global ids ``ids`` (any order)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        width = self.maps[0][0].shape[1]
        out = np.empty((len(ids), width), dtype=self.maps[0][0].dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.maps[s][0][ids[sel] - self.offsets[s]]
        return out

    def module_scores(self, ids: np.ndarray) -> np.ndarray:
        """queries x len(ids) x modules scores of the given rows, ``chunk_rows`` rows at a time."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((self.n_queries, len(ids), len(self.modules)), dtype=np.float32)
        for a in range(0, len(ids), self.chunk_rows):
            rows = self.gather(ids[a : a + self.chunk_rows])
            out[:, a : a + self.chunk_rows] = self._per_module(rows).cpu()
        return out

    def totals(self, ids: np.ndarray) -> np.ndarray:
        """queries x len(ids) total scores of the given rows."""
        per_module = self.module_scores(ids)
        return torch.from_numpy(per_module).sum(-1).numpy()

    def per_module(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each module's queries x len(ids) scores of the given rows."""
        scores = self.module_scores(ids)
        return {n: scores[..., i] for i, n in enumerate(self.modules)}


def _tensor(block: np.ndarray, device: str) -> torch.Tensor:
    from bergson.utils.utils import numpy_to_tensor

    # a copy: the index is a read-only memory map, which torch will not wrap
    return numpy_to_tensor(np.array(block, order="C")).to(device=device, dtype=torch.float32)


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows (all modules concatenated) scaled to unit norm: cosine as an inner product."""
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def unit_rows(index_path: Path) -> np.ndarray:
    """An index's rows, all modules concatenated, unit norm (a query index: a few rows)."""
    grads, _ = module_blocks(index_path)
    return unit(grads)
