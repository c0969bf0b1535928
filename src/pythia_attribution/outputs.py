"""What a stage wrote, as recorded in its ``_stage.json``, and whether the files still match.

Every output file is recorded with its size and sha256 when the stage completes. Tables (Arrow
files at the top of a stage folder) also get their ``content_digest``: the table without its
volatile fields, which is what the stages downstream are fingerprinted on. Other files' digest is
their sha256.

Checking a file before it is trusted (every run, for every stage it touches):

- files up to ``FULL_HASH_LIMIT`` (every table, every micro checkpoint): size and full sha256;
- larger files (gradient indexes and checkpoints at real scale, gigabytes each): size and the
  sha256 of ``SAMPLES`` blocks of 1 MiB at fixed, evenly spread offsets including the first and
  the last. Hashing a 10^6-row index in full on every ``nox -s all`` would take minutes; the
  stamp catches what actually happens to such files (a truncated or partial copy, a file
  replaced by another run's, a stage killed while writing it) but not a flipped bit in an
  unsampled block. ``verify --full`` hashes every file in full against the recorded sha256.

Hashes are cached per process by (path, size, mtime, inode), so one ``all`` run hashes each
file once.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from pythia_attribution import tables

FULL_HASH_LIMIT = 64 << 20
SAMPLES = 16
BLOCK = 1 << 20


def is_table(rel: str) -> bool:
    return "/" not in rel and rel.endswith(".arrow")


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4096)
def _sha256(key: tuple) -> str:
    return tables.sha256_file(Path(key[0]))


@functools.lru_cache(maxsize=4096)
def _sample(key: tuple) -> str:
    path, size = Path(key[0]), key[1]
    digest = hashlib.sha256(str(size).encode())
    last = max(size - BLOCK, 0)
    offsets = sorted({last * i // (SAMPLES - 1) for i in range(SAMPLES)})
    with open(path, "rb") as fh:
        for offset in offsets:
            fh.seek(offset)
            digest.update(fh.read(BLOCK))
    return digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _content(key: tuple) -> str:
    return tables.content_digest(Path(key[0]))


def describe(root: Path, rel: str) -> dict:
    """The record of one output file, taken when its stage completes."""
    path = root / rel
    key = _stat_key(path)
    entry = {"size": key[1], "sha256": _sha256(key)}
    entry["digest"] = _content(key) if is_table(rel) else entry["sha256"]
    if key[1] > FULL_HASH_LIMIT:
        entry["sample"] = _sample(key)
    return entry


def record(root: Path) -> dict[str, dict]:
    """Records of every file under ``root``, by path relative to it."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): describe(root, str(p.relative_to(root))) for p in files}


def digests(outputs: dict[str, dict]) -> dict[str, str]:
    """What a downstream stage's fingerprint holds of an upstream stage's outputs."""
    return {rel: entry["digest"] for rel, entry in outputs.items()}


def check(root: Path, rel: str, entry: dict, full: bool = False) -> str | None:
    """Why ``root/rel`` no longer matches its record, or None when it does."""
    path = root / rel
    try:
        key = _stat_key(path)
    except FileNotFoundError:
        return f"{path}: missing (recorded {entry['size']} bytes)"
    except OSError as exc:
        return f"{path}: cannot read ({os.strerror(exc.errno) if exc.errno else exc})"
    if key[1] != entry["size"]:
        return f"{path}: {key[1]} bytes, recorded {entry['size']} (truncated or overwritten)"
    if "sample" in entry and not full:
        if _sample(key) != entry["sample"]:
            return f"{path}: content differs from the recorded stamp (size matches; overwritten)"
    elif _sha256(key) != entry["sha256"]:
        return f"{path}: sha256 differs from the record (edited or overwritten)"
    return None


def check_all(root: Path, outputs: dict[str, dict], full: bool = False) -> list[str]:
    return [problem for rel, entry in outputs.items() if (problem := check(root, rel, entry, full))]
