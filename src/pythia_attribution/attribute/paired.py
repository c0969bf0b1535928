"""Two bergson indexes from one forward and backward pass: Adam-normalized and raw.

TrackStar's index divides each per-sequence gradient by Adam's second-moment estimate before the
random projection; the raw index (gradient cosine, TrackStar without Adam, the residual-change
method) projects the same gradient undivided. Both need the same forward and backward pass over
the same sequences, and the pass is what costs: built separately, the micro corpus' two indexes
took two passes of 135 and 130 s (README, "Measured"). This collector is bergson's
``GradientCollector`` building the Adam index, plus, in the same backward hook, the raw rows by
bergson's own raw arithmetic (its forward hook's projection of the inputs, then
``_module_gradient`` without a normalizer), written by a second ``Builder`` into a second index.
Imported only when used (bergson's import is slow).

``tests/test_attribute.py`` checks that both indexes are byte for byte the ones two separate
``gradients.build_index`` calls write.
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


@dataclass(kw_only=True)
class PairedCollector(GradientCollector):
    """bergson's collector for the normalized index, writing the raw rows to ``raw_path`` too."""

    raw_path: Path
    raw_grads: dict = field(default_factory=dict)
    _raw: bool = False

    def normalizer_for(self, name: str):
        return None if self._raw else super().normalizer_for(name)

    def setup(self) -> None:
        super().setup()
        sizes = {name: math.prod(s) for name, s in self.shapes().items()}
        self.raw_builder = Builder(
            self.data, sizes, self.save_dtype, self.preprocess_cfg, attribute_tokens=False, path=self.raw_path
        )

    def backward_hook(self, module, g) -> None:
        super().backward_hook(module, g)
        a = module._inputs  # unprojected: the forward hook keeps them so for Adam's normalizer
        p = self.per_module_projection_dim
        self._raw = True
        try:
            if not module._collect_bias:  # what the forward hook does without a normalizer
                i = getattr(module, LayerAdapter.in_attr(module))
                module._inputs = a @ self.projection(module._name, p, i, "right", a.device, a.dtype).T
            grads = self._module_gradient(module, g)
        finally:
            self._raw = False
            module._inputs = a
        self.raw_grads[module._name] = self._materialize_gradient(grads).to(
            device="cpu", dtype=self.save_dtype
        )

    def process_batch(self, indices: list[int], **kwargs) -> None:
        self.raw_builder(indices, self.raw_grads)
        self.raw_grads.clear()
        super().process_batch(indices, **kwargs)

    def teardown(self) -> None:
        super().teardown()  # the normalized index: its rows, and data.hf with the losses
        self.raw_builder.teardown()
        self.data.save_to_disk(str(self.raw_path / "data.hf"))  # the same pass, the same losses


def build_pair(
    adam_path: Path,
    raw_path: Path,
    checkpoint: Path,
    data_dir: Path,
    *,
    optimizer_state: Path,
    projection_dim: int,
    token_batch_size: int,
) -> None:
    """Both indexes over the saved rows in ``data_dir`` (``gradients.save_rows``), in one process,
    with the settings ``gradients.build_index`` gives bergson (one worker, per-module projection)."""
    common = {"model": str(checkpoint), "data": DataConfig(dataset=str(data_dir))}
    common |= {"projection_dim": projection_dim, "token_batch_size": token_batch_size}
    cfg = IndexConfig(run_path=str(adam_path), optimizer_state=str(optimizer_state), **common)
    raw_cfg = IndexConfig(run_path=str(raw_path), **common)
    for c in (cfg, raw_cfg):
        shutil.rmtree(c.partial_run_path, ignore_errors=True)
        c.partial_run_path.mkdir(parents=True)
    data, _ = setup_data_pipeline(cfg)
    model, target_modules = setup_model_and_peft(cfg)
    processor = create_processor(model, cfg, target_modules)  # Adam's normalizers; saves itself
    processor_for(raw_cfg).save(raw_cfg.partial_run_path)  # the raw index's: no normalizers
    collector = PairedCollector(
        model=model.base_model, cfg=cfg, processor=processor, target_modules=target_modules, data=data,
        preprocess_cfg=PreprocessConfig(), attention_cfgs={}, filter_modules=cfg.filter_modules,
        raw_path=raw_cfg.partial_run_path,
    )  # fmt: skip
    if collector.per_module_projection_dim is None:
        raise ValueError("the paired build needs a per-module projection (attribute.projection_dim > 0)")
    batches = allocate_batches(data["length"][:], cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
    computer = CollectorComputer(model=model, data=data, collector=collector, batches=batches, cfg=cfg)
    computer.run_with_collector_hooks(desc="gradients (Adam-normalized and raw)")
    shutil.copy(cfg.partial_run_path / "total_processed.pt", raw_cfg.partial_run_path)
    shutil.move(cfg.partial_run_path, adam_path)
    shutil.move(raw_cfg.partial_run_path, raw_path)
