"""Arrow tables on disk: written atomically, read with their provenance.

Every table carries a ``pythia_attribution`` entry in its schema metadata (JSON): stage,
profile, config hash, fingerprint, the sha256 of its input files, package versions and the git
commit. A table copied elsewhere still says where it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from pythia_attribution.errors import MissingInputError

PROVENANCE_KEY = b"pythia_attribution"


def write_table(path: Path, table: pa.Table, provenance: dict) -> None:
    """Write ``table`` as an Arrow IPC file with ``provenance`` in its schema metadata."""
    metadata = dict(table.schema.metadata or {})
    metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_table(path: Path, made_by: str | None = None) -> pa.Table:
    """Read an Arrow IPC table; a missing file names the session that makes it."""
    if not path.is_file():
        hint = f"; run `nox -s {made_by}` first" if made_by else ""
        raise MissingInputError(f"missing table {path}{hint}")
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).read_all()


def provenance(table_or_path: pa.Table | Path) -> dict:
    """The provenance stored in a table's schema metadata."""
    if isinstance(table_or_path, Path):
        with pa.memory_map(str(table_or_path), "r") as source:
            schema = ipc.open_file(source).schema
    else:
        schema = table_or_path.schema
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
