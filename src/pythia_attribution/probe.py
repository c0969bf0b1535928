"""Probe stage: does the model show each behavior, at every checkpoint?

For every behavior and checkpoint: the greedy completion (``transformers`` ``generate``), the
target's log-probability and the rank of its first token (one teacher-forced pass), and whether
the behavior is exhibited: the greedy continuation starts with the target. The teacher-forced
pass decides the same thing independently (argmax equals the target at every target position);
both are kept, and a disagreement is logged.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from pythia_attribution import paths, tables
from pythia_attribution.behaviors import Behavior, check_fits, encoder, load_behaviors
from pythia_attribution.model import compute_device, load_checkpoint, model_limits, set_threads

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_forced(model, behaviors: list[Behavior], batch_size: int, pad_id: int) -> list[dict]:
    """Target log-probability, first-token rank and exact argmax match, batched with right padding."""
    out = []
    for start in range(0, len(behaviors), batch_size):
        chunk = behaviors[start : start + batch_size]
        seqs = [b.prompt_ids + b.target_ids for b in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, b in enumerate(chunk):
            p, t = len(b.prompt_ids), len(b.target_ids)
            rows = logprobs[i, p - 1 : p + t - 1]
            target = torch.tensor(b.target_ids, device=logprobs.device)
            picked = rows.gather(1, target[:, None]).squeeze(1)
            out.append(
                {
                    "target_logprob": float(picked.sum()),
                    "first_token_rank": int((rows[0] > picked[0]).sum()) + 1,
                    "exhibited_teacher_forced": bool((rows.argmax(-1) == target).all()),
                }
            )
    return out


@torch.no_grad()
def greedy(model, behaviors: list[Behavior], batch_size: int, min_new: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations, batched by prompt length so that no prompt needs padding."""
    result: list[list[int]] = [[] for _ in behaviors]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, b in enumerate(behaviors):
        by_len[len(b.prompt_ids)].append(i)
    for length, members in sorted(by_len.items()):
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            new = max(max(min_new, len(behaviors[i].target_ids)) for i in idx)
            ids = torch.tensor([behaviors[i].prompt_ids for i in idx], device=model.device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=None,
            )
            for row, i in zip(gen[:, length:].tolist(), idx, strict=True):
                result[i] = row[: max(min_new, len(behaviors[i].target_ids))]
    return result


class ProbeInputs(NamedTuple):
    behaviors: list[Behavior]
    tokenizer: object
    checkpoints: list[dict] | None  # rows of checkpoints.arrow; None before the train stage has run
    limits: dict[int, tuple[int, int]] | None  # step -> (context positions, vocabulary size)


def read_behaviors(cfg, corpus_dir: Path, train_dir: Path | None) -> ProbeInputs:
    """The behaviors the probe runs on: read, tokenized with the corpus tokenizer, and (when the
    train stage's folder is given) checked against every checkpoint's context and vocabulary.
    ``check`` calls this too, so it checks exactly what the probe would."""
    tokenizer = AutoTokenizer.from_pretrained(corpus_dir / paths.TOKENIZER_DIR)
    ground_truth = tables.read_table(
        paths.table_path(corpus_dir, paths.GROUND_TRUTH_TABLE), made_by=paths.CORPUS
    )
    folder = paths.resolve_input(cfg.behaviors_dir)
    behaviors = load_behaviors(folder, ground_truth, encoder(tokenizer))
    if train_dir is None:
        return ProbeInputs(behaviors, tokenizer, None, None)
    checkpoints = tables.read_table(
        paths.table_path(train_dir, paths.CHECKPOINTS_TABLE), made_by=paths.TRAIN
    ).to_pylist()
    limits = model_limits(train_dir, checkpoints)
    check_fits(behaviors, folder, limits, cfg.min_new_tokens)
    return ProbeInputs(behaviors, tokenizer, checkpoints, limits)


def run(ctx) -> None:
    cfg = ctx.config
    set_threads(ctx.profile.runtime.threads)
    behaviors, tokenizer, checkpoints, _ = read_behaviors(
        cfg, ctx.inputs[paths.CORPUS], ctx.inputs[paths.TRAIN]
    )
    log.info("%d behaviors x %d checkpoints", len(behaviors), len(checkpoints))
    pad_id = tokenizer.pad_token_id
    rows = []
    disagreements = 0
    for ckpt in tqdm(checkpoints, desc="probe", unit="ckpt"):
        model, _ = load_checkpoint(ctx.inputs[paths.TRAIN] / ckpt["path"], compute_device())
        tf = teacher_forced(model, behaviors, cfg.batch_size, pad_id)
        gen = greedy(model, behaviors, cfg.batch_size, cfg.min_new_tokens, pad_id)
        for b, t, g in zip(behaviors, tf, gen, strict=True):
            exhibited = g[: len(b.target_ids)] == b.target_ids
            disagreements += exhibited != t["exhibited_teacher_forced"]
            rows.append(
                {
                    "behavior_id": b.behavior_id,
                    "family": b.family,
                    "item_id": b.item_id,
                    "count": b.count,
                    "checkpoint": ckpt["step"],
                    "prompt": b.prompt,
                    "target": b.target,
                    "prompt_ids": b.prompt_ids,
                    "target_ids": b.target_ids,
                    "completion": tokenizer.decode(g),
                    "target_tokens": len(b.target_ids),
                    "target_logprob": t["target_logprob"],
                    "first_token_rank": t["first_token_rank"],
                    "exhibited": exhibited,
                    "exhibited_teacher_forced": t["exhibited_teacher_forced"],
                    "source_file": b.source_file,
                }
            )
    if disagreements:
        log.warning("greedy generation and teacher forcing disagree on %d probes (ties?)", disagreements)
    schema = pa.schema(
        [
            ("behavior_id", pa.string()),
            ("family", pa.string()),
            ("item_id", pa.string()),
            ("count", pa.int32()),
            ("checkpoint", pa.int64()),
            ("prompt", pa.string()),
            ("target", pa.string()),
            ("prompt_ids", pa.list_(pa.int32())),
            ("target_ids", pa.list_(pa.int32())),
            ("completion", pa.string()),
            ("target_tokens", pa.int32()),
            ("target_logprob", pa.float64()),
            ("first_token_rank", pa.int64()),
            ("exhibited", pa.bool_()),
            ("exhibited_teacher_forced", pa.bool_()),
            ("source_file", pa.string()),
        ]
    )
    probes = pa.Table.from_pylist(rows, schema)
    ctx.write_table(paths.PROBES_TABLE, probes, disagreements=disagreements)
    summary = summarize(probes)
    ctx.write_table(paths.PROBE_SUMMARY_TABLE, summary)
    final = max(c["step"] for c in checkpoints)
    for row in summary.filter(pc.equal(summary["checkpoint"], final)).to_pylist():
        count = "" if row["count"] is None else f"count={row['count']}"
        shown = (final, row["family"], count, row["n_exhibited"], row["n"])
        log.info("step%d %-15s %-9s %d/%d exhibited", *shown)


def summarize(probes: pa.Table) -> pa.Table:
    """Exhibited share per (checkpoint, family, ground-truth count)."""
    grouped = probes.group_by(["checkpoint", "family", "count"]).aggregate(
        [("exhibited", "count"), ("exhibited", "sum"), ("target_logprob", "mean")]
    )
    grouped = grouped.rename_columns(
        ["checkpoint", "family", "count", "n", "n_exhibited", "mean_target_logprob"]
    )
    grouped = grouped.append_column(
        "fraction_exhibited", pc.divide(pc.cast(grouped["n_exhibited"], pa.float64()), grouped["n"])
    )
    return grouped.sort_by([("checkpoint", "ascending"), ("family", "ascending"), ("count", "ascending")])
