"""Source ``hub``: Pythia checkpoints from the Hugging Face Hub at pinned commits.

Every revision a profile names (``step{N}``) is looked up in the world's manifest, loaded with
the real APIs (``snapshot_download(repo, revision=<commit>)``, the Hub cache under
``world.hub_cache`` or ``HF_HOME``), and checked: the snapshot is the pinned commit and its
``model.safetensors`` has the pinned size and sha256. ``checkpoints.arrow`` records the revision
name and the commit of every checkpoint. Pythia publishes no optimizer state
(EleutherAI/pythia#152), so no Hub checkpoint has one: methods that need it are skipped with that
reason and the profile uses their variants without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from pythia_attribution import paths
from pythia_attribution.errors import ChecksumError, ConfigError, one_line
from pythia_attribution.schemas import CHECKPOINT_SCHEMA, TRAINING_LOG_SCHEMA
from pythia_attribution.sources import manifest as pins
from pythia_attribution.sources.manifest import FileEntry
from pythia_attribution.tables import write_text_atomic

log = logging.getLogger(__name__)

MODEL_FILES = [
    "config.json",
    "generation_config.json",
    pins.WEIGHTS,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def world_manifest(profile) -> pins.HubManifest:
    path = profile.world.manifest
    if not path:
        raise ConfigError(f"profile '{profile.name}': world.manifest is empty but a stage reads the Hub")
    return pins.load(paths.expand(path, profile.name), profile.name)


def hub_cache(profile) -> str | None:
    return str(paths.expand(profile.world.hub_cache, profile.name)) if profile.world.hub_cache else None


def revision_names(profile) -> list[str]:
    steps = {*profile.train.hub_steps}
    if profile.corpus.source == "pythia-preshuffled":
        steps.add(profile.corpus.pile.tokenizer_step)
    return [f"step{s}" for s in sorted(steps)]


def pin_profile(profile) -> Path:
    """Resolve and write the profile's manifest (``python -m pythia_attribution pin``)."""
    world = profile.world
    if not world.manifest:
        raise ConfigError(f"profile '{profile.name}': world.manifest is empty; nothing to pin")
    out = paths.expand(world.manifest, profile.name)
    text = pins.pin_world(
        world,
        pins.Hub(hub_cache(profile), world.offline),
        revision_names(profile),
        "document*",
        world.evals_split,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return out


def snapshot(
    profile, repo: str, commit: str, repo_type: str = "model", allow: list[str] | None = None
) -> Path:
    """The local snapshot folder of ``repo`` at ``commit`` (downloaded unless cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(
            snapshot_download(
                repo,
                repo_type=repo_type,
                revision=commit,
                allow_patterns=allow,
                cache_dir=hub_cache(profile),
                local_files_only=profile.world.offline,
            )
        )
    except LocalEntryNotFoundError as exc:
        said = one_line(exc.__cause__ or exc)
        why = "world.offline is set" if profile.world.offline else f"the Hub was not reached: {said}"
        raise ConfigError(
            f"{repo}@{commit[:12]}: not in the Hub cache ({hub_cache(profile) or 'HF_HOME'}) and {why}"
        ) from None
    if local.name != commit:
        raise ChecksumError(f"{repo}: asked for commit {commit}, the cache gave {local.name}")
    return local


def hub_file(profile, repo: str, commit: str, name: str, entry: FileEntry) -> Path:
    """One pinned file of a dataset repository, downloaded unless cached, checked by size and sha256."""
    from huggingface_hub import hf_hub_download

    local = Path(
        hf_hub_download(
            repo,
            name,
            repo_type="dataset",
            revision=commit,
            cache_dir=hub_cache(profile),
            local_files_only=profile.world.offline,
        )
    )
    pins.check_file(local, entry, f"{repo}@{commit[:12]}/{name}")
    return local


def checkpoint(profile, step: int, manifest: pins.HubManifest | None = None) -> tuple[str, Path]:
    """(commit, snapshot folder) of revision ``step{step}``, verified against the manifest."""
    manifest = manifest or world_manifest(profile)
    revision = manifest.revision(f"step{step}")
    if not revision.commit:
        raise ConfigError(
            f"{manifest.path}: revision step{step} has no commit; run `{paths.session('pin', profile.name)}`"
        )
    local = snapshot(profile, manifest.model_repo, revision.commit, allow=MODEL_FILES)
    if revision.weights_size:
        entry = FileEntry(revision.weights_size, revision.weights_sha256)
        pins.check_file(
            local / pins.WEIGHTS,
            entry,
            f"{manifest.model_repo}@step{step} ({revision.commit[:12]})/{pins.WEIGHTS}",
        )
    return revision.commit, local


def model_facts(snapshot_dir: Path) -> dict:
    """The architecture of a Hub checkpoint as the paper reports it: from its ``config.json`` and
    the tensor shapes in its safetensors header (parameters counted, not derived from a formula)."""
    import json
    import math

    from safetensors import safe_open

    config = json.loads((snapshot_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    with safe_open(str(snapshot_dir / pins.WEIGHTS), framework="np") as weights:
        names = weights.keys()  # noqa: SIM118 - a safe_open handle is not iterable
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    return {
        "architecture": ",".join(config.get("architectures", [])),
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "heads": config["num_attention_heads"],
        "vocab": config["vocab_size"],
        "context": config.get("max_position_embeddings", 0),
        "rotary_pct": rope.get("partial_rotary_factor", config.get("rotary_pct", 0.0)),
        "params": params,
    }


def run(ctx) -> None:
    """Train stage, source ``hub``: record the pinned checkpoints (nothing is trained)."""
    cfg = ctx.config
    if not cfg.hub_steps:
        raise ConfigError(f"profile '{ctx.profile.name}': train.hub_steps is empty (source hub)")
    corpus = ctx.input_table(paths.CORPUS, paths.CORPUS_TABLE)
    batch, seq_len = ctx.profile.corpus.batch_size, ctx.profile.corpus.seq_len
    manifest = world_manifest(ctx.profile)
    rows = []
    for step in sorted(set(cfg.hub_steps)):
        commit, local = checkpoint(ctx.profile, step, manifest)
        rows.append(
            {
                "step": step,
                "path": str(local),
                "sequences_seen": step * batch,
                "tokens_seen": step * batch * seq_len,
                "model_sha256": manifest.revision(f"step{step}").weights_sha256,
                "has_optimizer_state": False,
                "revision": f"step{step}",
                "commit": commit,
            }
        )
        log.info("step%d: %s@%s", step, manifest.model_repo, commit[:12])
    trained = int(corpus["step"].to_numpy().max()) + 1 if len(corpus) else 0
    final = max(cfg.hub_steps)
    if trained > final:
        log.warning("candidates reach step %d, after the final checkpoint step%d", trained - 1, final)
    ctx.write_table(
        paths.CHECKPOINTS_TABLE,
        pa.Table.from_pylist(rows, CHECKPOINT_SCHEMA),
        n_steps=final,
        model_repo=manifest.model_repo,
        model=model_facts(Path(rows[-1]["path"])),
    )
    ctx.write_table(
        paths.TRAINING_LOG_TABLE,
        TRAINING_LOG_SCHEMA.empty_table(),
        n_steps=final,
        note="checkpoints from the Hub: no training here, so no log",
    )
