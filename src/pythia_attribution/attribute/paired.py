"""Several bergson indexes from one forward and backward pass: Adam-normalized (by the saved and
by estimated second moments) and raw.

TrackStar's index divides each per-sequence gradient by Adam's second-moment estimate before the
random projection; the raw index (gradient cosine, TrackStar without Adam, the residual-change
method) projects the same gradient undivided. All need the same forward and backward pass over
the same sequences, and the pass is what costs: built separately, the micro corpus' two indexes
took two passes of 135 and 130 s (docs/timings-history.md). This collector is bergson's
``GradientCollector`` building the first normalized index, plus, in the same backward hook, the
rows of each other index by bergson's own arithmetic (``_module_gradient`` with that index's
normalizers, or without one after the forward hook's projection of the inputs for the raw
index), each written by its own ``Builder``. Imported only when used (bergson's import is slow).

``tests/test_attribute.py`` checks that the indexes are byte for byte the ones separate
``gradients.build_index`` calls write, on the CPU. On an H200 its indexes differ from
``build_index``'s in float32's last bits, as much as two ``build_index`` calls differ from each
other there (README, "GPU benchmark").
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bergson import DataConfig, IndexConfig, PreprocessConfig
from bergson.builder import Builder
from bergson.collector.collector import CollectorComputer
from bergson.collector.gradient_collectors import GradientCollector
from bergson.data import allocate_batches
from bergson.gradients import LayerAdapter
from bergson.utils.worker_utils import (
    create_processor,
    processor_for,
    setup_data_pipeline,
    setup_model_and_peft,
)

_OWN = object()  # PairedCollector's own normalizers (the first normalized index's)


@dataclass(kw_only=True)
class PairedCollector(GradientCollector):
    """bergson's collector for the first normalized index, writing the other indexes' rows too:
    ``extra`` maps each other index's folder to its normalizers (``None``: the raw index)."""

    extra: dict[Path, dict | None]
    extra_grads: dict = field(default_factory=dict)
    _normalizers: object = _OWN  # whose normalizers normalizer_for answers with: _OWN, a dict or None

    def normalizer_for(self, name: str):
        if self._normalizers is _OWN:
            return super().normalizer_for(name)
        return None if self._normalizers is None else self._normalizers.get(name)

    def setup(self) -> None:
        super().setup()
        sizes = {name: math.prod(s) for name, s in self.shapes().items()}
        self.builders = {
            path: Builder(
                self.data, sizes, self.save_dtype, self.preprocess_cfg, attribute_tokens=False, path=path
            )
            for path in self.extra
        }
        self.extra_grads = {path: {} for path in self.extra}

    def _gradient_with(self, module, g, normalizers: dict | None):
        """The module's rows under other normalizers, from the inputs the forward hook kept
        unprojected (Adam's normalizer divides the full gradient before the projection)."""
        a = module._inputs
        self._normalizers = normalizers
        try:
            if normalizers is None and not module._collect_bias:  # the forward hook's raw projection
                p = self.per_module_projection_dim
                i = getattr(module, LayerAdapter.in_attr(module))
                module._inputs = a @ self.projection(module._name, p, i, "right", a.device, a.dtype).T
            grads = self._module_gradient(module, g)
        finally:
            self._normalizers = _OWN
            module._inputs = a
        return self._materialize_gradient(grads).to(device="cpu", dtype=self.save_dtype)

    def backward_hook(self, module, g) -> None:
        super().backward_hook(module, g)
        for path, normalizers in self.extra.items():
            self.extra_grads[path][module._name] = self._gradient_with(module, g, normalizers)

    def process_batch(self, indices: list[int], **kwargs) -> None:
        for path, builder in self.builders.items():
            builder(indices, self.extra_grads[path])
            self.extra_grads[path].clear()
        super().process_batch(indices, **kwargs)

    def teardown(self) -> None:
        super().teardown()  # the first normalized index: its rows, and data.hf with the losses
        for path, builder in self.builders.items():
            builder.teardown()
            self.data.save_to_disk(str(path / "data.hf"))  # the same pass, the same losses


def build_pair(
    adam_path: Path,
    raw_path: Path | None,
    checkpoint: Path,
    data_dir: Path,
    *,
    optimizer_state: Path,
    projection_dim: int,
    token_batch_size: int,
    more: dict[Path, Path] | None = None,
) -> None:
    """The index normalized by ``optimizer_state``, the raw one (unless ``raw_path`` is None) and
    one more per ``more`` entry (folder -> the optimizer state it is normalized by) over the saved
    rows in ``data_dir`` (``gradients.save_rows``), in one process and one forward and backward
    pass, with the settings ``gradients.build_index`` gives bergson (one worker, per-module
    projection)."""
    common = {"model": str(checkpoint), "data": DataConfig(dataset=str(data_dir))}
    common |= {"projection_dim": projection_dim, "token_batch_size": token_batch_size}
    cfg = IndexConfig(run_path=str(adam_path), optimizer_state=str(optimizer_state), **common)
    others = {
        path: IndexConfig(run_path=str(path), optimizer_state=str(state), **common)
        for path, state in (more or {}).items()
    }
    if raw_path is not None:
        others[raw_path] = IndexConfig(run_path=str(raw_path), **common)
    for c in (cfg, *others.values()):
        shutil.rmtree(c.partial_run_path, ignore_errors=True)
        c.partial_run_path.mkdir(parents=True)
    data, _ = setup_data_pipeline(cfg)
    model, target_modules = setup_model_and_peft(cfg)
    processor = create_processor(model, cfg, target_modules)  # Adam's normalizers; saves itself
    extra = {}
    for c in others.values():
        if c.optimizer_state:  # the other state's normalizers; its processor saves itself
            extra[c.partial_run_path] = create_processor(model, c, target_modules).normalizers
        else:
            processor_for(c).save(c.partial_run_path)  # the raw index's: no normalizers
            extra[c.partial_run_path] = None
    collector = PairedCollector(
        model=model.base_model, cfg=cfg, processor=processor, target_modules=target_modules, data=data,
        preprocess_cfg=PreprocessConfig(), attention_cfgs={}, filter_modules=cfg.filter_modules, extra=extra,
    )  # fmt: skip
    if collector.per_module_projection_dim is None:
        raise ValueError("the paired build needs a per-module projection (attribute.projection_dim > 0)")
    batches = allocate_batches(data["length"][:], cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
    computer = CollectorComputer(model=model, data=data, collector=collector, batches=batches, cfg=cfg)
    computer.run_with_collector_hooks(desc=f"gradients ({len(extra) + 1} indexes in one pass)")
    for c in others.values():
        shutil.copy(cfg.partial_run_path / "total_processed.pt", c.partial_run_path)
    shutil.move(cfg.partial_run_path, adam_path)
    for path, c in others.items():
        shutil.move(c.partial_run_path, path)
