"""The fixture world: a tiny Pythia world in the real formats, built here, never downloaded.

For a profile with ``world.fixture = true`` this writes, under ``results/<profile>/world/``:

- a Hub cache (``hub/``) in huggingface_hub's layout (``models--Org--Name/refs/<name>`` holding a
  commit, ``snapshots/<commit>/`` with the files): the model repository, a tiny GPT-NeoX with
  Pythia's config keys and a byte-level BPE tokenizer, at Pythia-style revisions ``step0``,
  ``step1``, ``step2``, ..., each the model after exactly that many steps on the shards' order; the
  preshuffled dataset repository (``document.idx`` and two shards in Megatron's byte layout, a
  sequence straddling them mid-token); the memorized-evals repository (one parquet split with the
  real columns, listing the sequences the final revision memorizes by Biderman et al.'s test);
- ``manifest.toml``, written by the same pinning code as ``nox -s pin`` (offline: from the cache).

Its text is seeded lorem ipsum with a few country -> capital statements (the real-Pythia behavior
file's facts) and a few passages repeated often enough to be memorized, so that the stages
downstream have behaviors to attribute and sequences to attribute memorization to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pythia_attribution import paths
from pythia_attribution.errors import ConfigError
from pythia_attribution.sources.hub import pin_profile

log = logging.getLogger(__name__)

FACTS = [("Japan", "Tokyo"), ("France", "Paris"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Peru", "Lima")]
MODEL = {"layers": 2, "hidden": 64, "heads": 2, "lr": 2e-2, "warmup_frac": 0.05}
VOCAB = 1024
POOL, DRAWS = 120, 3000
LAYOUT_VERSION = "1"


def _cache_dir(hub: Path, repo: str, repo_type: str) -> Path:
    return hub / f"{repo_type}s--{repo.replace('/', '--')}"


def _commit(repo: str, revision: str) -> str:
    """A deterministic 40-hex commit id for a fixture revision (real ones are git shas)."""
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def _snapshot(hub: Path, repo: str, repo_type: str, revision: str, refs: list[str]) -> Path:
    root = _cache_dir(hub, repo, repo_type)
    commit = _commit(repo, revision)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _documents(seed: int) -> list[str]:
    """Documents drawn with Zipf-like repetition from a pool of seeded lorem-ipsum documents,
    half of which state one of ``FACTS``: the most repeated ones are what gets memorized, as
    duplicated documents are in the Pile."""
    from faker import Faker

    fake = Faker()
    fake.seed_instance(seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 300]))
    pool = []
    for i in range(POOL):
        sentences = [fake.sentence(nb_words=10) for _ in range(int(rng.integers(6, 14)))]
        if i % 2 == 0:
            country, capital = FACTS[(i // 2) % len(FACTS)]
            sentences.insert(int(rng.integers(0, len(sentences))), f"The capital of {country} is {capital}.")
        pool.append(" ".join(sentences))
    weights = 1.0 / np.arange(1, POOL + 1)
    draws = rng.choice(POOL, size=DRAWS, p=weights / weights.sum())
    return [pool[i] for i in draws]


def _revisions(final: int) -> list[int]:
    steps = {0, final, *range(16, final, 16)}
    power = 1
    while power < final:
        steps.add(power)
        power *= 2
    return sorted(steps)


def build(profile, root: Path) -> None:
    """Write the fixture world for ``profile`` into ``root`` (see the module docstring)."""
    from transformers import GPTNeoXForCausalLM

    from pythia_attribution.config import TrainConfig
    from pythia_attribution.corpus.build import EOD_ID, train_tokenizer
    from pythia_attribution.model import memorization_test, pythia_config
    from pythia_attribution.train import lr_at, param_groups

    world, corpus = profile.world, profile.corpus
    seed, width, batch = profile.runtime.seed, corpus.seq_len + 1, corpus.batch_size
    if not profile.train.hub_steps:
        raise ConfigError(f"profile '{profile.name}': world.fixture needs train.hub_steps")
    final = max(profile.train.hub_steps)
    hub = root / "hub"

    texts = _documents(seed)
    tokenizer = train_tokenizer(texts, VOCAB)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [EOD_ID]
    n_seq = (final + 2) * batch  # the dataset runs past the final checkpoint, as Pythia's does
    if len(stream) < n_seq * width:
        stream = stream * (n_seq * width // len(stream) + 1)  # repeat: a second "epoch"
    sequences = np.asarray(stream[: n_seq * width], dtype=np.uint16).reshape(n_seq, width)

    from pythia_attribution.sources.pile import write_megatron

    data = _snapshot(hub, world.dataset_repo, "dataset", "main", ["main"])
    # Shard 0 ends 1,233 bytes into a sequence (and mid-token): a read across it must join them.
    write_megatron(data, sequences, 2, shard_bytes=(n_seq // 2) * 2 * width + 1233)

    torch.manual_seed(seed)
    cfg = TrainConfig(**MODEL)
    model = GPTNeoXForCausalLM(pythia_config(cfg, len(tokenizer)))
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )
    tokens = torch.from_numpy(sequences.astype(np.int64))
    saved = _revisions(final)

    def save(step: int) -> None:
        refs = [f"step{step}"] + (["main"] if step == final else [])
        snap = _snapshot(hub, world.model_repo, "model", f"step{step}", refs)
        model.save_pretrained(snap)
        tokenizer.save_pretrained(snap)

    save(0)
    model.train()
    for step in range(final):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, final)
        batch_ids = tokens[step * batch : (step + 1) * batch]
        logits = model(input_ids=batch_ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch_ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 in saved:
            save(step + 1)
    log.info("fixture model: loss %.3f after %d steps", loss.item(), final)

    model.eval()
    windows = sequences[: final * batch, :64].astype(np.int64)
    memorized, _ = memorization_test(model, windows, 32, 256)
    index = np.flatnonzero(memorized).astype(np.int64)
    evals = _snapshot(hub, world.evals_repo, "dataset", "main", ["main"])
    (evals / "data").mkdir()
    table = pa.table(
        {
            "index": index,
            "tokens": pa.array(windows[index].tolist(), pa.list_(pa.int64())),
            "__index_level_0__": np.arange(len(index), dtype=np.int64),
        }
    )
    pq.write_table(table, evals / "data" / f"{world.evals_split}-00000-of-00001.parquet")
    log.info("fixture world: %d sequences, %d memorized at step%d", n_seq, len(index), final)


def ensure_world(profile) -> Path:
    """Build the profile's fixture world unless a complete one is there; return its folder."""
    root = paths.world_dir(profile.name)
    stamp = root / ".complete"
    if stamp.is_file() and stamp.read_text() == LAYOUT_VERSION:
        return root
    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    log.info("building the fixture world in %s", root)
    build(profile, part)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(part, root)
    pin_profile(profile)  # the same pinning code as `nox -s pin`, reading the world's cache offline
    stamp.write_text(LAYOUT_VERSION)
    return root
