"""The activation-space family (the second seed's pipeline; ``reference/causal.md`` section 0).

Both methods compare a behavior's **treatment** completion (its target) with a **control**
completion of the same prompt that does not show it: the target of another behavior of the same
family (seeded; another family's when the family has no other target). At one layer (the middle
one, as the ``activation`` baseline), ``m(c)`` is the mean residual-stream activation over the
positions holding completion ``c`` after the prompt, and ``d = m(target) - m(control)``, unit norm.

- ``residual_diff``: a training sequence scores the cosine between ``d`` and its own mean
  activation at that layer (the ``activation`` baseline's vector).
- ``residual_change``: the first-order change of ``d . (m(target) - m(control))`` after one
  gradient step on the training sequence, ``-grad L_train . grad(-f)``, through the raw projected
  gradient index (the gradient of ``f`` projected as bergson projects the training rows), as a
  cosine: the change per unit step length, which is the step the training run takes when its
  gradient clipping binds. Positive: a step on the sequence moves the completion's residual
  stream towards the target's and away from the control's.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from pythia_attribution.attribute import gradients


def controls(queries: list[dict], pool: list[dict], seed: int) -> list[dict]:
    """For each query, a control behavior from ``pool`` (a seeded choice among the same family's
    behaviors with a different target, else any behavior's)."""
    by_family: dict[str, list[dict]] = defaultdict(list)
    for p in sorted(pool, key=lambda p: p["behavior_id"]):
        by_family[p["family"]].append(p)
    out = []
    for q in queries:
        choices = [p for p in by_family[q["family"]] if p["target_ids"] != q["target_ids"]]
        choices = choices or [
            p for ps in by_family.values() for p in ps if p["target_ids"] != q["target_ids"]
        ]
        if not choices:
            raise ValueError(f"behavior '{q['behavior_id']}': no other behavior has a different target")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 53, zlib.crc32(q["behavior_id"].encode())]))
        out.append(choices[int(rng.integers(len(choices)))])
    return out


@torch.no_grad()
def completion_means(model, prompts: list[list[int]], completions: list[list[int]], layer: int) -> np.ndarray:
    """Mean residual-stream activation at ``layer`` over each completion's positions after its prompt."""
    out = np.zeros((len(prompts), model.config.hidden_size), dtype=np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([p + c], device=model.device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
        out[i] = hidden[0, len(p) :].mean(dim=0).float().cpu().numpy()
    return out


def directions(model, queries: list[dict], ctrls: list[dict], layer: int) -> np.ndarray:
    """Each query's unit ``d = m(target) - m(control)``."""
    prompts = [q["prompt_ids"] for q in queries]
    diff = completion_means(model, prompts, [q["target_ids"] for q in queries], layer) - completion_means(
        model, prompts, [c["target_ids"] for c in ctrls], layer
    )
    return diff / np.maximum(np.linalg.norm(diff, axis=1, keepdims=True), 1e-12)


def change_queries(
    run_path: Path, checkpoint: Path, queries: list[dict], ctrls: list[dict], dirs: np.ndarray, layer: int,
    *, projection_dim: int, token_batch_size: int,
) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:  # fmt: skip
    """Each query's projected gradient of ``-f = -d . (m(target) - m(control))`` (rows x dims) and
    the module blocks, in the layout of the raw training index.

    Two rows per query go through bergson's collector: the prompt + target with value ``-d . m``
    and the prompt + control with ``+d . m``; projection is linear, so their sum is the query's row.
    Each row ends one token past its completion (bergson does not collect a row's last position).
    """
    rows, labels, direction, sign = [], [], [], []
    for q, c, d in zip(queries, ctrls, dirs, strict=True):
        for completion, s in ((q["target_ids"], 1.0), (c["target_ids"], -1.0)):
            rows.append(q["prompt_ids"] + completion + [completion[-1]])
            labels.append([-100] * len(q["prompt_ids"]) + completion + [-100])
            direction.append(d.astype(np.float32).tolist())
            sign.append(s)

    def objective(model, x, y, batch):
        out = model(x, output_hidden_states=True)
        hidden = out.hidden_states[layer]
        mask = (y != -100).to(hidden.dtype)
        d = torch.tensor(batch["direction"], dtype=hidden.dtype, device=hidden.device)
        s = torch.tensor(batch["sign"], dtype=hidden.dtype, device=hidden.device)
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        values = -s * (mean * d).sum(-1)
        # every module takes part in the backward pass (bergson hooks each one); past the layer with
        # a zero gradient
        (values.sum() + 0.0 * out.logits.float().sum()).backward()
        model.zero_grad()
        return values.detach()

    index = gradients.objective_index(
        run_path, checkpoint, rows, labels, {"direction": direction, "sign": sign}, objective,
        projection_dim=projection_dim, token_batch_size=token_batch_size,
    )  # fmt: skip
    grads, blocks = gradients.module_blocks(index)
    grads = np.asarray(grads, dtype=np.float32)
    return grads[0::2] + grads[1::2], blocks
