"""Train stage: micro-Pythia on exactly the order in ``corpus.arrow``.

Step ``s`` trains on rows ``s * batch_size ... (s + 1) * batch_size - 1``; checkpoint
``step{N}`` is saved after ``N`` optimizer steps (``step0`` is the initialization), so it has
trained on exactly the rows with ``seq_idx < N * batch_size``, as in Pythia. AdamW with
Pythia's recipe scaled down: linear warmup, cosine decay to ``min_lr_ratio``, weight decay on
matrices only, gradient clipping. The final optimizer state is saved (TrackStar's
correction needs Adam's second moments), each entry naming its parameter.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from pythia_attribution import paths
from pythia_attribution.config import TrainConfig
from pythia_attribution.model import pythia_config, set_threads
from pythia_attribution.schemas import CHECKPOINT_SCHEMA, TRAINING_LOG_SCHEMA
from pythia_attribution.tables import sha256_file

log = logging.getLogger(__name__)


def checkpoint_steps(cfg: TrainConfig, n_steps: int) -> list[int]:
    """Pythia-like schedule: step0, powers of two up to ``checkpoint_log_until``, then every
    ``checkpoint_every`` steps, and the final step."""
    steps = {0, n_steps}
    power = 1
    while power <= min(cfg.checkpoint_log_until, n_steps):
        steps.add(power)
        power *= 2
    steps.update(range(cfg.checkpoint_every, n_steps, cfg.checkpoint_every))
    return sorted(steps)


def lr_at(cfg: TrainConfig, step: int, n_steps: int) -> float:
    warmup = max(1, round(cfg.warmup_frac * n_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export_optimizer_state(model, optimizer) -> dict:
    """The final AdamW state, re-indexed in ``model.named_parameters()`` order.

    bergson maps ``optimizer.pt`` entries to parameters by that order when the file has one
    parameter group, and prefers each entry's ``param_name``; both are provided. The training
    run's two groups (weight decay on matrices only) are kept, by parameter name, under
    ``param_groups_by_name``.
    """
    state = optimizer.state_dict()
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(flat)}
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    new_state = {}
    for i, name in enumerate(names):
        entry = dict(state["state"][position[id(params[name])]])
        entry["param_name"] = name
        new_state[i] = entry
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append(
            {**hyper, "param_names": [n for n in names if any(params[n] is p for p in group["params"])]}
        )
    first = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return {
        "state": new_state,
        "param_groups": [{**first, "params": list(range(len(names)))}],
        "param_groups_by_name": groups,
    }


def train_model(
    cfg: TrainConfig,
    tokens: torch.Tensor,
    batch_size: int,
    vocab_size: int,
    *,
    seed: int,
    removed: np.ndarray | None = None,
    on_checkpoint=None,
    desc: str = "train",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[dict]]:
    """Train micro-Pythia from its seeded initialization on ``tokens`` (rows in training order,
    ``batch_size`` rows a step); return the model, the optimizer and the training log's rows.

    ``removed``: a boolean per row whose loss weight is zero (leave-k-out retraining). The batches,
    their order, the learning rate schedule and the loss's denominator (every token of the batch)
    stay the same; a removed row only stops contributing to the loss, so a run with nothing
    removed is the training run itself, bit for bit. ``on_checkpoint(step, model, optimizer)`` is
    called at step 0 and after every scheduled step (``checkpoint_steps``).
    """
    torch.manual_seed(seed)
    n_steps = len(tokens) // batch_size
    model = GPTNeoXForCausalLM(pythia_config(cfg, vocab_size))
    model.train()
    log.info("%s: %.2fM parameters", desc, sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    schedule = set(checkpoint_steps(cfg, n_steps))
    log_rows = []
    if on_checkpoint is not None:
        on_checkpoint(0, model, optimizer)
    window_start, window_tokens = time.perf_counter(), 0
    bar = tqdm(range(n_steps), desc=desc, unit="step", mininterval=5)
    for step in bar:
        lr = lr_at(cfg, step, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = slice(step * batch_size, (step + 1) * batch_size)
        batch = tokens[rows]
        logits = model(input_ids=batch[:, :-1]).logits
        drop = None if removed is None else removed[rows]
        if drop is None or not drop.any():
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        else:
            per_token = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), -1)
            keep = torch.from_numpy(~drop).to(per_token.dtype)[:, None]
            loss = (per_token * keep).sum() / per_token.numel()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += batch[:, :-1].numel()
        done = step + 1
        if done % cfg.log_every == 0 or done == n_steps:
            elapsed = time.perf_counter() - window_start
            log_rows.append(
                {
                    "step": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / elapsed,
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{window_tokens / elapsed:.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if done in schedule and on_checkpoint is not None:
            on_checkpoint(done, model, optimizer)
    return model, optimizer, log_rows


def corpus_tokens(corpus: pa.Table) -> tuple[torch.Tensor, int]:
    """The corpus' token rows (training order) as an int64 tensor, and the batch size."""
    batch_size = int(corpus["batch_pos"].to_numpy().max()) + 1
    tokens = np.asarray(corpus["input_ids"].combine_chunks().flatten().to_numpy(), dtype=np.int64)
    width = corpus.schema.field("input_ids").type.list_size
    return torch.from_numpy(tokens.reshape(-1, width)), batch_size


def run(ctx) -> None:
    cfg: TrainConfig = ctx.config
    set_threads(ctx.profile.runtime.threads)
    corpus = ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE)
    tokenizer = AutoTokenizer.from_pretrained(
        ctx.inputs[paths.CORPUS] / paths.TOKENIZER_DIR,
        local_files_only=True,  # a local folder; also keeps the saved config independent of HF_HUB_OFFLINE
    )
    tokens, batch_size = corpus_tokens(corpus)
    n_steps = len(tokens) // batch_size
    seq_len = tokens.shape[1] - 1
    ckpt_root = ctx.out_dir / paths.CHECKPOINTS_DIR
    ckpt_rows = []

    def save(step: int, model, optimizer) -> None:
        folder = ckpt_root / f"step{step}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if step == n_steps:
            torch.save(export_optimizer_state(model, optimizer), folder / "optimizer.pt")
        ckpt_rows.append(
            {
                "step": step,
                "path": str(folder.relative_to(ctx.out_dir)),
                "sequences_seen": step * batch_size,
                "tokens_seen": step * batch_size * seq_len,
                "model_sha256": sha256_file(folder / "model.safetensors"),
                "has_optimizer_state": step == n_steps,
                "revision": f"step{step}",
                "commit": "",
            }
        )

    log.info(
        "training for %d steps of %d x %d tokens; checkpoints at %s",
        n_steps,
        batch_size,
        seq_len,
        checkpoint_steps(cfg, n_steps),
    )
    _, _, log_rows = train_model(
        cfg, tokens, batch_size, len(tokenizer), seed=ctx.profile.runtime.seed, on_checkpoint=save
    )
    ctx.write_table(
        paths.CHECKPOINTS_TABLE, pa.Table.from_pylist(ckpt_rows, CHECKPOINT_SCHEMA), n_steps=n_steps
    )
    ctx.write_table(
        paths.TRAINING_LOG_TABLE,
        pa.Table.from_pylist(log_rows, TRAINING_LOG_SCHEMA),
        n_steps=n_steps,
        threads=ctx.profile.runtime.threads,
        note="tokens_per_s is a wall-clock measurement and differs between runs; all else is seeded",
    )
