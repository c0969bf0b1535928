"""Source ``memorized-evals``: Biderman et al.'s memorized sequences (``EleutherAI/pythia-memorized-evals``).

A split (``deduped.70m``, ...) is parquet with columns ``index`` (global training sequence index),
``tokens`` (its first 64 tokens) and ``__index_level_0__``; it lists memorized sequences only,
decided with the ``-v0`` models of the published run script, so a seeded sample is re-scored with
the current checkpoint before it is trusted (the memorization stage does that).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pythia_attribution.errors import ChecksumError, ConfigError
from pythia_attribution.sources.hub import hub_file, world_manifest

COLUMNS = ("index", "tokens")


def load_split(profile) -> pa.Table:
    """The profile's split as one table (``index`` int64, ``tokens`` list<int64>), sorted by index."""
    manifest = world_manifest(profile)
    evals = manifest.evals
    if not evals.repo or not evals.files:
        raise ConfigError(f"{manifest.path}: no memorized-evals files pinned (world.evals_split)")
    parts = []
    for name in sorted(evals.files):
        local = hub_file(profile, evals.repo, evals.commit, name, evals.files[name])
        table = pq.read_table(local)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ChecksumError(f"{evals.repo}/{name}: no column '{missing[0]}' (has {table.column_names})")
        parts.append(
            pa.table(
                {
                    "index": table["index"].cast(pa.int64()),
                    "tokens": table["tokens"].cast(pa.list_(pa.int64())),
                }
            )
        )
    return pa.concat_tables(parts).sort_by("index")
