"""The training index in shards: built here, or elsewhere and adopted.

Two ways to spread an index build, for two situations:

- **One machine, several GPUs, or several machines sharing a file system**: bergson's own launcher
  (``attribute.nproc_per_node``, and its ``nnode``/``node_rank`` through the environment). Its
  workers write their rows into one shared ``gradients.bin``.
- **Machines without a shared file system** (or separate jobs on a cluster): shards by row range.
  ``attribute.index_shards = N`` splits the candidates into N contiguous ranges; each machine runs
  ``python -m pythia_attribution index-shard --profile P --shard I`` (after ``nox -s train``),
  which writes ``results/P/shards/step{S}/{index}/shard-I-of-N/`` for every checkpoint and
  index the attribute stage needs. Copied into the main machine's ``results/P/shards/``, they are
  adopted (moved into the attribute stage's outputs) when their key matches: the checkpoint's
  sha256, the rows' tokens, the projection, the token batch, the optimizer state and bergson's
  version. Anything missing or mismatched is built by the stage itself.

Each shard is a complete bergson index (``gradients.bin`` + ``info.json`` + ...) plus
``shard.json`` (its row range and key); scoring reads them in row order (``gradients.shards_of``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np

from pythia_attribution import paths, tables
from pythia_attribution.attribute import gradients, moments
from pythia_attribution.errors import UserError

log = logging.getLogger(__name__)
SHARD_RECORD = "shard.json"


def prebuilt_dir(profile_name: str, step: int, index_name: str) -> Path:
    return paths.results_root() / profile_name / "shards" / f"step{step}" / index_name


def shard_key(cfg, ckpt: dict, index_name: str, rows: np.ndarray, lo: int, hi: int, opt_sha256) -> dict:
    """Everything a shard's rows depend on (``opt_sha256``: the optimizer state's, or None)."""
    return {
        "checkpoint": ckpt["step"],
        "model_sha256": ckpt["model_sha256"],
        "rows": [lo, hi],
        "tokens_sha256": hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest(),
        "index": index_name,
        "projection_dim": cfg.projection_dim,
        "token_batch_size": cfg.token_batch_size,
        "optimizer_state_sha256": opt_sha256,
        "bergson": version("bergson"),
    }


def _opt_sha256(state: Path | None) -> str | None:
    return tables.sha256_file(state) if state else None


def _recorded(folder: Path, key: dict) -> bool:
    """Whether ``folder`` holds a finished shard built with ``key``."""
    record = folder / SHARD_RECORD
    return record.exists() and json.loads(record.read_text()) == key


def _part(dest: Path) -> Path:
    """``dest``.part, cleared of what a killed build left."""
    part = dest.with_name(dest.name + ".part")
    for stale in (part, part.with_name(part.name + ".data"), part.with_name(part.name + ".part")):
        shutil.rmtree(stale, ignore_errors=True)
    part.parent.mkdir(parents=True, exist_ok=True)
    return part


def _finish(part: Path, dest: Path, key: dict) -> Path:
    (part / SHARD_RECORD).write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(part, dest)
    return dest


def build_shards(
    cfg, todo: dict[str, tuple[Path, dict]], rows: np.ndarray, ckpt_dir: Path, states: dict
) -> None:
    """Build the shards in ``todo`` (index name -> destination and key) over ``rows``, each through
    ``dest``.part so that a killed build leaves nothing; ``states``: each index's optimizer state
    (``moments.states``). The indexes due share one forward and backward pass
    (``gradients.build_index_pair``) when one process builds them and one of them is normalized;
    bergson's launcher (``attribute.nproc_per_node``) builds them apart."""
    common = {"projection_dim": cfg.projection_dim, "token_batch_size": cfg.token_batch_size}
    todo = dict(todo)
    normalized = [n for n in ("adam", "adam_est") if n in todo]
    if normalized and len(todo) > 1 and not cfg.nproc_per_node:
        first, *rest = normalized
        parts = {n: _part(dest) for n, (dest, _) in todo.items()}
        gradients.build_index_pair(
            parts[first], parts.get("raw"), ckpt_dir, rows, optimizer_state=states[first],
            more={parts[n]: states[n] for n in rest}, **common,
        )  # fmt: skip
        for name, part in parts.items():
            _finish(part, *todo.pop(name))
    for name, (dest, key) in todo.items():
        part = _part(dest)
        gradients.build_index(
            part, ckpt_dir, rows, labels=None, optimizer_state=states[name],
            nproc_per_node=cfg.nproc_per_node, **common,
        )  # fmt: skip
        _finish(part, dest, key)


def build_or_adopt(
    profile, cfg, folders: dict[str, Path], step, ckpt, cands, states: dict, ckpt_dir
) -> dict[str, list[Path]]:
    """The training indexes named in ``folders`` (``raw``, ``adam``, ``adam_est``, normalized by
    the optimizer states ``states``), each as shards in its folder, in row order."""
    ranges = gradients.shard_ranges(len(cands.tokens), cfg.index_shards)
    opt_sha256 = {name: _opt_sha256(states[name]) for name in folders}
    out: dict[str, list[Path]] = {name: [] for name in folders}
    for i, (lo, hi) in enumerate(ranges):
        name = gradients.shard_name(i, len(ranges))
        rows = cands.tokens[lo:hi]
        todo = {}
        for index, folder in folders.items():
            key = shard_key(cfg, ckpt, index, rows, lo, hi, opt_sha256[index])
            dest = folder / name
            out[index].append(dest)
            prebuilt = prebuilt_dir(profile.name, step, index) / name
            if (prebuilt / SHARD_RECORD).exists():
                if _recorded(prebuilt, key):
                    log.info("adopting %s (built elsewhere)", prebuilt)
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.move(prebuilt, dest)
                    continue
                log.warning(
                    "%s does not match this run (checkpoint, rows or settings differ); rebuilding", prebuilt
                )
            todo[index] = (dest, key)
        if todo:
            log.info(
                "bergson index over rows %d-%d of %d (%s, %s)",
                lo,
                hi,
                len(cands.tokens),
                "+".join(todo),
                name,
            )
            build_shards(cfg, todo, rows, ckpt_dir, states)
    return out


def needed_indexes(methods, ckpt_dir: Path) -> list[str]:
    """The training indexes a checkpoint's methods read: ``adam`` for the gradient methods that
    normalize by the saved optimizer state (where it was saved), ``adam_est`` for those that
    normalize by estimated second moments, ``raw`` for the other gradient methods and the
    residual-change method."""
    names = {
        m.index_name for m in methods if m.kind == "gradient" and moments.available(m.index_name, ckpt_dir)
    }
    if any(m.kind == "activation_change" for m in methods):
        names.add("raw")
    return sorted(names)


def build_for_profile(profile, shard: int) -> list[Path]:
    """``index-shard``: build shard ``shard`` of every training index the attribute stage will need."""
    from pythia_attribution import stage
    from pythia_attribution.attribute.candidates import load_candidates
    from pythia_attribution.attribute.methods import load_methods
    from pythia_attribution.model import set_threads

    cfg = profile.attribute
    if not 0 <= shard < cfg.index_shards:
        raise UserError(
            f"--shard {shard}: attribute.index_shards is {cfg.index_shards} (shards 0-{cfg.index_shards - 1})"
        )
    for up in (paths.CORPUS, paths.TRAIN):
        if stage.status(profile, up).state != "current":
            raise UserError(
                f"index-shard reads the '{up}' stage's outputs, which are not current: "
                f"run `{paths.session(up, profile.name)}` first"
            )
    set_threads(profile.runtime.threads)
    corpus_dir, train_dir = (paths.stage_dir(profile.name, s) for s in (paths.CORPUS, paths.TRAIN))
    cands = load_candidates(tables.read_table(paths.table_path(corpus_dir, paths.CORPUS_TABLE)))
    ckpts = {
        c["step"]: c
        for c in tables.read_table(paths.table_path(train_dir, paths.CHECKPOINTS_TABLE)).to_pylist()
    }
    methods = load_methods(paths.resolve_input(cfg.methods_file), cfg.methods)
    ranges = gradients.shard_ranges(len(cands.tokens), cfg.index_shards)
    lo, hi = ranges[shard]
    built = []
    for step in sorted({max(ckpts), *cfg.checkpoints}):
        ckpt_dir = train_dir / ckpts[step]["path"]
        names = needed_indexes(methods, ckpt_dir)
        folder = prebuilt_dir(profile.name, step, "raw").parent
        states = moments.states(names, ckpt_dir, folder, cands, step, moments.Settings.of(profile))
        rows = cands.tokens[lo:hi]
        todo = {}
        for name in names:
            key = shard_key(cfg, ckpts[step], name, rows, lo, hi, _opt_sha256(states[name]))
            dest = prebuilt_dir(profile.name, step, name) / gradients.shard_name(shard, len(ranges))
            if _recorded(dest, key):
                log.info("%s is already built", dest)  # a rerun after a kill resumes here
            else:
                todo[name] = (dest, key)
            built.append(dest)
        if todo:
            log.info(
                "shard %d of %d: rows %d-%d, step%d, %s index",
                shard,
                len(ranges),
                lo,
                hi,
                step,
                "+".join(todo),
            )
            build_shards(cfg, todo, rows, ckpt_dir, states)
    return built
