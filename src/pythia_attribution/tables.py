"""Arrow tables on disk: written atomically, read with their provenance.

Every table carries a ``pythia_attribution`` entry in its schema metadata (JSON): stage,
profile, config hash, fingerprint, the digests of its input files, package versions and the git
commit. A table copied elsewhere still says where it came from.

Volatile fields: everything in a table is a function of the profile, the code and the seed,
except the columns whose field metadata marks them ``volatile`` (wall-clock measurements) and the
provenance keys in ``VOLATILE_PROVENANCE`` (the checkout's commit). ``content_digest`` hashes a
table without them: two runs of the same inputs give the same digest, and that digest, not the
file's bytes, is what the stages downstream are fingerprinted on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from pythia_attribution import paths
from pythia_attribution.errors import CorruptOutputError, MissingInputError

PROVENANCE_KEY = b"pythia_attribution"
VOLATILE_KEY = b"volatile"
VOLATILE_PROVENANCE = ("git_commit", "git_dirty")


def volatile(why: str) -> dict[bytes, bytes]:
    """Field metadata marking a column as volatile (it differs between runs of the same inputs)."""
    return {VOLATILE_KEY: why.encode()}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, so readers never see half."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table(path: Path, table: pa.Table, provenance: dict) -> None:
    """Write ``table`` as an Arrow IPC file with ``provenance`` in its schema metadata."""
    metadata = dict(table.schema.metadata or {})
    metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def _open(path: Path, source) -> ipc.RecordBatchFileReader:
    try:
        return ipc.open_file(source)
    except pa.ArrowInvalid as exc:
        raise CorruptOutputError(
            f"{path} is not a readable Arrow table ({exc}); it was truncated or overwritten after it "
            "was written: `python -m pythia_attribution verify` names what else is affected"
        ) from None


def read_table(path: Path, made_by: str | None = None) -> pa.Table:
    """Read an Arrow IPC table; a missing file names the session that makes it."""
    if not path.is_file():
        # a table lives in results/<profile>/<stage>/, so its folder's parent names the profile
        hint = f"; run `{paths.session(made_by, path.parent.parent.name)}` first" if made_by else ""
        raise MissingInputError(f"missing table {path}{hint}")
    with pa.memory_map(str(path), "r") as source:
        return _open(path, source).read_all()


def one_array(column: pa.ChunkedArray) -> pa.Array:
    """A column as one array: its only chunk as it is (a memory-mapped table's pages, no copy), else
    its chunks concatenated (a copy). pyarrow's ``combine_chunks`` copies even a single chunk."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def provenance(table_or_path: pa.Table | Path) -> dict:
    """The provenance stored in a table's schema metadata."""
    if isinstance(table_or_path, Path):
        with pa.memory_map(str(table_or_path), "r") as source:
            schema = _open(table_or_path, source).schema
    else:
        schema = table_or_path.schema
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def volatile_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if f.metadata and VOLATILE_KEY in f.metadata]


def stable_provenance(prov: dict) -> dict:
    return {k: v for k, v in prov.items() if k not in VOLATILE_PROVENANCE}


def content_digest(path: Path) -> str:
    """sha256 of a table's schema, provenance and columns, leaving out the volatile fields."""
    table = read_table(path)
    metadata = dict(table.schema.metadata or {})
    prov = stable_provenance(json.loads(metadata.pop(PROVENANCE_KEY, b"{}")))
    table = table.drop_columns(volatile_columns(table.schema)).replace_schema_metadata(metadata)
    digest = hashlib.sha256(json.dumps(prov, sort_keys=True).encode())
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(sink.getvalue())
    return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
