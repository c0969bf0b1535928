"""Pinned identities of a real-scale world: Hub revisions by commit, files by size and sha256.

``data_manifests/pythia-*.toml`` (or the fixture world's ``manifest.toml``) maps every revision
name a profile uses (``step0`` ... ``step143000``) to the immutable commit it resolved to, and
every dataset file to its commit, size and sha256 (the Hub's LFS sha256: the Pile shards have
no published hashes, pythia#183). ``pin_world`` resolves them (``nox -s pin``); every load
checks what it gets against them and stops with one line naming the artifact on a mismatch.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pythia_attribution.config import read_toml
from pythia_attribution.errors import ChecksumError, ConfigError

HEX40 = frozenset("0123456789abcdef")
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str = ""


@dataclass(frozen=True)
class Revision:
    commit: str
    weights_sha256: str = ""
    weights_size: int = 0


@dataclass(frozen=True)
class RepoPins:
    repo: str
    commit: str = ""
    files: dict[str, FileEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class HubManifest:
    path: Path
    model_repo: str
    revisions: dict[str, Revision]
    dataset: RepoPins
    evals: RepoPins

    def revision(self, name: str) -> Revision:
        if name not in self.revisions:
            pinned = ", ".join(self.revisions) or "none"
            raise ConfigError(
                f"{self.path}: revision '{name}' of {self.model_repo} is not pinned (pinned: {pinned}); "
                "run `nox -s pin -- --profile <profile>` where the Hub is reachable"
            )
        return self.revisions[name]

    def dataset_file(self, pins: RepoPins, name: str) -> FileEntry:
        if name not in pins.files:
            raise ConfigError(
                f"{self.path}: file '{name}' of {pins.repo} is not pinned; "
                "run `nox -s pin -- --profile <profile>` where the Hub is reachable"
            )
        return pins.files[name]


def check_distinct_weights(revisions: dict[str, Revision], repo: str, where: str = "") -> None:
    """Stop when two pinned revisions of ``repo`` serve the same weights.

    Distinct training steps with byte-identical weights are not a measurement of two steps: the
    Hub has step branches serving another step's checkpoint (pythia-2.8b's early grid serves
    final-era weights, EleutherAI/pythia#195 and #205; pythia-12b's step50000 the final first
    shard, #206), and ``step0``, ``step1`` and ``step2`` of every Pythia model are reported
    identical (#83, #198). Either way one of them carries all the information, and probing the others would
    put one model's behavior on several points of a learning curve."""
    by_sha: dict[str, list[str]] = {}
    for name, rev in revisions.items():
        if rev.weights_sha256:
            by_sha.setdefault(rev.weights_sha256, []).append(name)
    for sha, names in by_sha.items():
        if len(names) > 1:
            raise ConfigError(
                f"{where}revisions {', '.join(names)} of {repo} serve the same {WEIGHTS} "
                f"(sha256 {sha[:12]}...), so they are not distinct checkpoints (a branch serving "
                "another step's weights, EleutherAI/pythia#205, or steps training did not change, "
                "#83); name only one of them in the profile (train.hub_steps, corpus.pile.tokenizer_step)"
            )


def _commit(value: str, where: str) -> str:
    if value and (len(value) != 40 or not set(value) <= HEX40):
        raise ConfigError(f"{where}: '{value}' is not a 40-hex commit sha")
    return value


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}: must be a table, got {value!r:.60}")
    return value


def _sha256(value, where: str) -> str:
    value = str(value)
    if value and (len(value) != 64 or not set(value) <= HEX40):
        raise ConfigError(f"{where}: '{value:.70}' is not a 64-hex sha256")
    return value


def _repo_pins(data: dict, where: str) -> RepoPins:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table, got {data!r:.60}")
    files = {}
    for name, entry in _table(data, "files", where).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise ConfigError(f"{where}.files.'{name}': needs an integer 'size'")
        if entry["size"] < 0:
            raise ConfigError(f"{where}.files.'{name}': 'size' must be >= 0, got {entry['size']}")
        files[name] = FileEntry(
            entry["size"], _sha256(entry.get("sha256", ""), f"{where}.files.'{name}'.sha256")
        )
    return RepoPins(str(data.get("repo", "")), _commit(str(data.get("commit", "")), f"{where}.commit"), files)


def load(path: Path, profile: str = "<profile>") -> HubManifest:
    """Read a Hub manifest; a malformed one names the file and the key, a missing one the command
    that writes it for ``profile``."""
    if not path.exists():
        raise ConfigError(
            f"{path}: no Hub manifest; run `nox -s pin -- --profile {profile}` where the Hub is reachable"
        )
    data = read_toml(path)  # malformed, not UTF-8 or unreadable: one line naming the file
    model = _table(data, "model", f"{path}: ")
    revisions = {}
    for name, entry in _table(model, "revisions", f"{path}: model").items():
        where = f"{path}: model.revisions.{name}"
        if not isinstance(entry, dict) or "commit" not in entry:
            raise ConfigError(f"{where}: needs a 'commit'")
        size = entry.get("weights_size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ConfigError(f"{where}.weights_size: must be an integer >= 0, got {size!r:.60}")
        revisions[name] = Revision(
            _commit(str(entry["commit"]), where),
            _sha256(entry.get("weights_sha256", ""), f"{where}.weights_sha256"),
            size,
        )
    check_distinct_weights(revisions, str(model.get("repo", "")), f"{path}: ")
    return HubManifest(
        path,
        str(model.get("repo", "")),
        revisions,
        _repo_pins(data.get("dataset", {}), f"{path}: dataset"),
        _repo_pins(data.get("evals", {}), f"{path}: evals"),
    )


def check_file(path: Path, entry: FileEntry, artifact: str) -> None:
    """Size, then sha256 (when pinned) of a local file; a mismatch names the artifact."""
    from pythia_attribution.tables import sha256_file

    size = path.stat().st_size
    if size != entry.size:
        raise ChecksumError(f"{artifact}: {size} bytes at {path}, the manifest pins {entry.size}")
    if entry.sha256 and (got := sha256_file(path)) != entry.sha256:
        raise ChecksumError(
            f"{artifact}: sha256 {got[:16]}... at {path}, the manifest pins {entry.sha256[:16]}..."
        )


# ---------------------------------------------------------------------------------------------
# Pinning: resolve names to immutable identities (network, or the Hub cache when offline)


def _cached_refs(repo: str, repo_type: str, cache_dir: str | None) -> dict[str, str]:
    from huggingface_hub import scan_cache_dir

    for info in scan_cache_dir(cache_dir).repos:
        if info.repo_id == repo and info.repo_type == repo_type:
            return {ref: rev.commit_hash for rev in info.revisions for ref in rev.refs}
    return {}


def resolve_refs(hub: Hub, repo: str, names: list[str], repo_type: str = "model") -> dict[str, str]:
    """Revision name -> commit sha: ``list_repo_refs`` online, the cache's ``refs/`` offline."""
    if hub.offline:
        refs = _cached_refs(repo, repo_type, hub.cache_dir)
    else:
        from huggingface_hub import HfApi

        listing = HfApi().list_repo_refs(repo, repo_type=repo_type)
        refs = {r.name: r.target_commit for r in [*listing.branches, *listing.tags]}
    missing = [n for n in names if n not in refs]
    if missing:
        raise ConfigError(f"{repo}: no revision named '{missing[0]}' (have {len(refs)} refs)")
    return {n: refs[n] for n in names}


def _file_pins(hub: Hub, repo: str, commit: str, names: list[str], repo_type: str) -> dict[str, FileEntry]:
    """Size and sha256 of files at a commit. Online, ``get_paths_info`` gives both for files kept
    in LFS; a file kept in git itself has only a git blob id there, so it is downloaded (such
    files are small) and hashed, as every file is from the cache offline: no pin is size-only."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from pythia_attribution.tables import sha256_file

    out, to_hash = {}, names
    if not hub.offline:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(repo, names, repo_type=repo_type, revision=commit)
        out = {i.path: FileEntry(i.size, i.lfs.sha256) for i in infos if getattr(i, "lfs", None)}
        to_hash = [i.path for i in infos if not getattr(i, "lfs", None)]
    for name in to_hash:
        try:
            local = Path(
                hf_hub_download(
                    repo,
                    name,
                    repo_type=repo_type,
                    revision=commit,
                    cache_dir=hub.cache_dir,
                    local_files_only=hub.offline,
                )
            )
        except EntryNotFoundError:
            continue  # absent at this commit: left out, as get_paths_info leaves it out online
        out[name] = FileEntry(local.stat().st_size, sha256_file(local))
    return {name: out[name] for name in names if name in out}


def _list_files(hub: Hub, repo: str, commit: str, match: Callable[[str], bool], repo_type: str) -> list[str]:
    from huggingface_hub import HfApi, snapshot_download

    if hub.offline:
        root = Path(
            snapshot_download(
                repo, repo_type=repo_type, revision=commit, cache_dir=hub.cache_dir, local_files_only=True
            )
        )
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    else:
        names = HfApi().list_repo_files(repo, repo_type=repo_type, revision=commit)
    return sorted(n for n in names if match(n))


def in_split(name: str, split: str) -> bool:
    """Whether parquet file ``name`` of a dataset repository belongs to split ``split``.

    The Hub's layouts for a split's files: ``<split>.parquet``, ``<split>-00000-of-00003[-hash].parquet``
    (``push_to_hub``) at any depth, or any parquet file in a folder named ``<split>``. A substring
    test is not enough for the memorized-evals splits: ``duped.70m`` is inside ``deduped.70m``,
    ``deduped.1b`` begins ``deduped.1b.new``, and ``duped.12b`` begins ``duped.12b.23000``.
    """
    parts = name.split("/")
    if not parts[-1].endswith(".parquet"):
        return False
    shard = re.compile(re.escape(split) + r"(-\d+-of-\d+(-[0-9a-f]+)?)?\.parquet")
    return split in parts[:-1] or shard.fullmatch(parts[-1]) is not None


@dataclass(frozen=True)
class Hub:
    """How pinning reaches the Hub: its cache folder (None: huggingface_hub's default) and
    whether to stay offline (resolve from the cache's ``refs/`` and hash cached files)."""

    cache_dir: str | None
    offline: bool


def pin_world(world, hub: Hub, revision_names: list[str], dataset_pattern: str, evals_split: str) -> str:
    """The manifest text for ``world`` (a WorldConfig): every revision and file it needs, pinned:
    the dataset files matching ``dataset_pattern`` (fnmatch) and the parquet files of the memorized-evals
    split ``evals_split`` (``in_split``; '' pins none)."""
    lines = [
        "# Pinned Hub identities, written by `python -m pythia_attribution pin` (nox -s pin).",
        "# Runs verify what they load against this file and stop on any mismatch.",
        "",
        "[model]",
        f'repo = "{world.model_repo}"',
    ]
    commits = resolve_refs(hub, world.model_repo, revision_names)
    revisions = {}
    for name in revision_names:
        weights = _file_pins(hub, world.model_repo, commits[name], [WEIGHTS], "model")
        if WEIGHTS not in weights:
            raise ConfigError(
                f"{world.model_repo}@{name} ({commits[name][:12]}): no {WEIGHTS} at this revision "
                "(checkpoints in pytorch_model*.bin shards are not supported)"
            )
        entry = weights[WEIGHTS]
        revisions[name] = Revision(commits[name], entry.sha256, entry.size)
        lines += [
            "",
            f"[model.revisions.{name}]",
            f'commit = "{commits[name]}"',
            f'weights_sha256 = "{entry.sha256}"',
            f"weights_size = {entry.size}",
        ]
    check_distinct_weights(revisions, world.model_repo)  # before anything is written
    wanted = [
        ("dataset", world.dataset_repo, dataset_pattern, f"file matches '{dataset_pattern}'",
         lambda n: fnmatch.fnmatch(n, dataset_pattern)),
        ("evals", world.evals_repo, evals_split, f"parquet file of split '{evals_split}'",
         lambda n: in_split(n, evals_split)),
    ]  # fmt: skip
    for section, repo, selector, what, match in wanted:
        if not repo or not selector:
            continue
        commit = resolve_refs(hub, repo, ["main"], "dataset")["main"]
        names = _list_files(hub, repo, commit, match, "dataset")
        if not names:
            raise ConfigError(f"{repo}@{commit[:12]}: no {what}")
        lines += ["", f"[{section}]", f'repo = "{repo}"', f'commit = "{commit}"']
        for name, entry in _file_pins(hub, repo, commit, names, "dataset").items():
            lines += ["", f'[{section}.files."{name}"]', f"size = {entry.size}", f'sha256 = "{entry.sha256}"']
    return "\n".join(lines) + "\n"
