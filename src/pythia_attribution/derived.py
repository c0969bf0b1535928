"""What is made from the tables outside the stage graph (the explorer, the manuscript), rebuilt
only when something it is made from has changed.

A stamp beside the outputs holds the key of their inputs and the record of every file written
(``outputs.describe``: size and sha256). They are current when the key is the same and every
recorded file still matches, the check a stage's outputs get (``outputs.check``); otherwise, or
with ``--force``, they are rebuilt and the stamp rewritten. The key covers, conservatively:

- every stage's recorded outputs in the profile's results folder (each file's sha256 from its
  ``_stage.json``: a stage that ran again changes it, even where only volatile fields moved);
- the code: every ``pythia_attribution`` module the builder imports, transitively, as the
  stages' fingerprints read it (``stage.code_text``: documentation edits do not count), and the
  other files it reads (the manuscript's sources, the preview's stylesheet and filters);
- every installed distribution's name and version (plotting, pandoc, typst, tokenizers);
- the git commit the manuscript prints, and whatever else the caller names (renderer, profile).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from importlib.metadata import distributions
from pathlib import Path

from pythia_attribution import outputs, paths
from pythia_attribution.tables import sha256_file, write_text_atomic

# The explorer's stamp, inside its site: what it was made from, and the files written (here, not in
# explorer.py, so that verify can read it without importing the attribute stage)
EXPLORER_STAMP = ".built.json"

log = logging.getLogger(__name__)


def key(results: Path, modules: Iterable[str], files: Iterable[Path], **extra) -> str:
    """The digest of what an output made from ``results`` (one profile's folder) depends on."""
    # the stages' own reading of the code, so that what counts as a code change is the same here
    from pythia_attribution.stage import _imported_modules, code_text

    digest = hashlib.sha256()

    def add(label: str, value: str) -> None:
        digest.update(f"{label}\0{value}\0".encode())

    folders = sorted(results.iterdir()) if results.is_dir() else []
    for folder in folders:
        record = folder / paths.STAGE_RECORD
        if record.is_file():
            recorded = json.loads(record.read_text())["outputs"]
            add(folder.name, json.dumps({rel: e["sha256"] for rel, e in recorded.items()}, sort_keys=True))
    for path in sorted({p for module in modules for p in _imported_modules(module)}):
        add(str(path.relative_to(paths.PACKAGE_ROOT)), code_text(path))
    for path in sorted(files):
        add(str(path), sha256_file(path) if path.is_file() else "absent")
    add("distributions", ",".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())))
    add("extra", json.dumps(extra, sort_keys=True, default=str))
    return digest.hexdigest()


def is_current(root: Path, stamp: Path, want: str) -> bool:
    """Whether the files recorded in ``stamp`` (relative to ``root``) were made from ``want`` and
    still match their record; a missing, unreadable or stale stamp means no."""
    try:
        held = json.loads(stamp.read_text())
        made_from, written = held["key"], held["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if made_from != want or not written:
        return False
    problems = outputs.check_all(root, written)
    for problem in problems:
        log.warning("%s; rebuilding", problem)
    return not problems


def write_stamp(root: Path, rels: Iterable[str], stamp: Path, made_from: str) -> None:
    """Record the files ``rels`` (relative to ``root``) as made from ``made_from``, atomically."""
    held = {"key": made_from, "outputs": {rel: outputs.describe(root, rel) for rel in sorted(rels)}}
    write_text_atomic(stamp, json.dumps(held, indent=1, sort_keys=True) + "\n")


def files_under(root: Path, *names: str) -> list[str]:
    """Every file under ``root/name`` (a folder, or a file) for each name, relative to ``root``."""
    found = []
    for name in names:
        path = root / name
        if path.is_file():
            found.append(name)
        elif path.is_dir():
            found += [str(p.relative_to(root)) for p in path.rglob("*") if p.is_file()]
    return found
