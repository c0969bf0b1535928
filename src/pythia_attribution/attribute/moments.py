"""Where each training index's normalizer comes from, and Adam's second moments estimated where
no optimizer state was saved.

Three indexes, by how a gradient is normalized before its random projection:

- ``raw``: not at all (gradient cosine, TrackStar without Adam, the residual-change method);
- ``adam``: divided entry by entry by the square root of Adam's second moments from the
  checkpoint's saved ``optimizer.pt`` (TrackStar as published; micro saves it at the final step);
- ``adam_est``: the same division with the second moments *estimated* here (``trackstar_est``).

Real Pythia publishes no optimizer state (pythia#152), so at real scale ``adam`` is not available
and ``adam_est`` is what TrackStar's correction can use. Adam's ``v`` at a step is an exponential
average (beta2; Pythia 0.95, an effective window of about 20 steps) of the squared minibatch
gradient of the training loss. The estimate is the mean, over ``batches`` training minibatches,
of the squared minibatch gradient at the checkpoint: the minibatches are the last full training
steps before the checkpoint whose sequences are all candidates (what the optimizer saw last;
micro has every step, the real profiles select the last ten before the final checkpoint), and
where fewer than ``batches`` are full (an earlier checkpoint at real scale), seeded batches of the
other candidates of the training batch size make up the number. It
differs from the saved state in four stated ways: the gradients are taken at the checkpoint's
parameters, not at the moving parameters of those steps; the steps are weighted equally, not by
beta2's decay; nothing is clipped (micro's final gradient norms are about 0.45, under the clip of
1.0); no bias correction (a uniform factor, which the unit norm removes). How close it comes to
the saved state on micro is measured by ``experiments/benchmarks/second_moments.py``.

The estimate is written as an ``optimizer.pt`` in the form bergson's ``load_from_optimizer``
reads (one parameter group; each entry names its parameter), so the index is built by exactly
the code path of the saved state.
"""

from __future__ import annotations

import io
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INDEXES = ("raw", "adam", "adam_est")
SAVED = "optimizer.pt"  # the train stage's optimizer state, in a checkpoint's folder
ESTIMATE = "second_moments.pt"  # the estimate, in the adam_est index's folder


def saved_state(ckpt_dir: Path) -> Path | None:
    """The checkpoint's saved optimizer state, or None where none was saved."""
    path = ckpt_dir / SAVED
    return path if path.is_file() else None


def available(index: str, ckpt_dir: Path) -> bool:
    """Whether ``index`` can be built at the checkpoint (``adam`` needs a saved optimizer state)."""
    return index != "adam" or saved_state(ckpt_dir) is not None


def state_path(index: str, ckpt_dir: Path, folder: Path) -> Path | None:
    """The optimizer state ``index`` is normalized by: None for ``raw``, the checkpoint's saved one
    for ``adam``, the estimate ``folder``/``adam_est``/``second_moments.pt`` for ``adam_est``
    (``folder``: the checkpoint's index folder, where ``estimate`` writes it)."""
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r} (known: {', '.join(INDEXES)})")
    if index == "raw":
        return None
    if index == "adam":
        return ckpt_dir / SAVED
    return folder / "adam_est" / ESTIMATE


@dataclass(frozen=True)
class Settings:
    """What an estimate depends on besides the checkpoint and the candidates."""

    batch_size: int  # sequences per training step (corpus.batch_size)
    batches: int  # minibatches averaged (attribute.moment_batches)
    seed: int  # for the seeded batches, where too few full steps are among the candidates
    token_batch_size: int  # tokens per forward pass (attribute.token_batch_size)

    @classmethod
    def of(cls, profile) -> Settings:
        return cls(
            profile.corpus.batch_size, profile.attribute.moment_batches, profile.runtime.seed,
            profile.attribute.token_batch_size,
        )  # fmt: skip


def states(
    names, ckpt_dir: Path, folder: Path, cands, step: int, settings: Settings
) -> dict[str, Path | None]:
    """Each index in ``names`` -> its optimizer state (``state_path``), estimating ``adam_est``'s
    at checkpoint ``step`` if it is not there yet."""
    out = {name: state_path(name, ckpt_dir, folder) for name in names}
    if "adam_est" in out and not out["adam_est"].is_file():
        estimate(out["adam_est"], ckpt_dir, cands, step, settings)
    return out


def minibatches(cands, step: int, settings: Settings) -> tuple[list[np.ndarray], str]:
    """The packed ids of each minibatch the estimate is taken over, and how they were chosen: the
    last ``batches`` full training steps before ``step`` among the candidates, topped up with
    seeded batches of the other candidates (of the training batch size) where fewer are full."""
    steps = np.asarray(cands.row_step)
    counts = np.bincount(steps, minlength=step)[:step]  # the steps the checkpoint has trained
    # a step is full when every one of its sequences is a candidate (a corpus row)
    chosen = np.flatnonzero(counts == settings.batch_size)[-settings.batches :]
    groups = [cands.row_packed[steps == s] for s in chosen]
    parts = []
    if len(chosen):
        last = _count(len(chosen), "full training step")
        parts.append(f"the last {last} before step{step} ({chosen[0]}-{chosen[-1]})")
    missing = settings.batches - len(groups)
    if missing > 0:
        used = np.concatenate(groups) if groups else np.empty(0, dtype=np.int64)
        pool = np.setdiff1d(np.arange(len(cands.tokens)), used)
        take = np.random.default_rng(settings.seed).permutation(pool)[: missing * settings.batch_size]
        seeded = [g for g in np.array_split(take, max(1, len(take) // settings.batch_size)) if len(g)]
        groups += seeded
        if seeded:
            parts.append(
                f"{_count(len(seeded), 'seeded batch')} of about {len(take) // len(seeded)} other candidates "
                f"({'no' if not len(chosen) else 'too few'} full training steps before step{step} "
                "among the candidates)"
            )
    return groups, " and ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def estimate(out: Path, ckpt_dir: Path, cands, step: int, settings: Settings) -> Path:
    """Estimate Adam's second moments at the checkpoint in ``ckpt_dir`` (module docstring) and
    write them to ``out`` as an ``optimizer.pt``, atomically through a ``.part`` file named after
    the host and process, which the next estimate here removes once that process is gone."""
    import torch
    import torch.nn.functional as F

    from pythia_attribution.model import compute_device, load_checkpoint

    groups, how = minibatches(cands, step, settings)
    token_batch_size = settings.token_batch_size
    device = compute_device()
    model, _ = load_checkpoint(ckpt_dir, device)  # in eval mode: Pythia has no dropout, nothing else random
    limit = model.config.max_position_embeddings
    names = [n for n, _ in model.named_parameters()]
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    log.info("estimating Adam's second moments at step%d from %s", step, how)
    for group in groups:
        rows = torch.from_numpy(cands.tokens[np.sort(group)].astype(np.int64))[:, : limit + 1]
        per_forward = max(1, token_batch_size // (rows.shape[1] - 1))
        n_predictions = rows.shape[0] * (rows.shape[1] - 1)
        model.zero_grad(set_to_none=True)
        for lo in range(0, len(rows), per_forward):
            batch = rows[lo : lo + per_forward].to(device)
            logits = model(input_ids=batch[:, :-1]).logits
            # the minibatch's mean loss over every prediction, as training takes it
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            (loss / n_predictions).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                sums[name] += p.grad.square()
    payload = optimizer_state({name: (sums[name] / len(groups)).cpu() for name in names}, len(groups), how)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_parts(out)
    # saved through memory: torch names the archive's folder after the file it writes, so a
    # temporary file's name would make the bytes differ from run to run
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    part = _part_name(out, socket.gethostname(), os.getpid())  # shard builders estimate at once
    part.write_bytes(buffer.getvalue())
    os.replace(part, out)
    return out


def optimizer_state(second_moments: dict, steps: int, how: str) -> dict:
    """What an ``optimizer.pt`` holds in the form bergson's ``load_from_optimizer`` reads: one
    parameter group, each entry naming its parameter, with Adam's second moments (``exp_avg_sq``,
    parameter name -> tensor, in the model's parameter order) after ``steps`` steps; ``how`` says
    where they come from."""
    import torch

    state = {
        i: {"param_name": name, "exp_avg_sq": v, "step": torch.tensor(float(steps))}
        for i, (name, v) in enumerate(second_moments.items())
    }
    return {"state": state, "param_groups": [{"params": list(state), "estimated_from": how}]}


def _part_name(out: Path, host: str, pid: int) -> Path:
    return out.with_name(f"{out.name}.{host}.{pid}.part")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clear_stale_parts(out: Path) -> list[Path]:
    """Remove the ``.part`` files of ``out`` that estimates on this host left when they were killed
    (their process is gone); those of running processes and of other hosts (a shared file system)
    are left alone. Returns what was removed."""
    host, removed = socket.gethostname(), []
    for part in out.parent.glob(f"{out.name}.*.part"):
        owner, _, pid = part.name[len(out.name) + 1 : -len(".part")].rpartition(".")
        if owner == host and pid.isdigit() and not _running(int(pid)):
            part.unlink(missing_ok=True)
            removed.append(part)
    if removed:
        log.info("removed %d partial estimate(s) left by killed runs beside %s", len(removed), out)
    return removed
