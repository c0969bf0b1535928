"""Source ``memorized-evals``: Biderman et al.'s memorized sequences (``EleutherAI/pythia-memorized-evals``).

A split (``deduped.70m``, ...) is parquet with columns ``index`` (global training sequence index),
``tokens`` (its first 64 tokens) and ``__index_level_0__``; it lists memorized sequences only,
decided with the ``-v0`` models of the published run script, so a seeded sample is re-scored with
the current checkpoint before it is trusted (the memorization stage does that).
"""

from __future__ import annotations

import numpy as np
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


def check_tokens(
    split: pa.Table, seq_idxs: np.ndarray, tokens: np.ndarray, rows: np.ndarray, where: str
) -> int:
    """Check that the split's ``index`` names the same training sequences as our ``seq_idx``.

    For every sequence of ``seq_idxs`` (sorted) that the split lists, the split's stored tokens (its
    first 64) must equal the sequence's own first tokens, ``tokens[rows[i]]`` (any width) being
    the row of ``seq_idxs[i]``. A mismatch means the split was computed on another dataset or
    another ordering (a ``duped`` split against the deduplicated Pile, say), so its sequences are
    not ours: stop, naming the first one. Returns how many listed sequences were compared.
    """
    listed = split["index"].to_numpy()
    positions = np.flatnonzero(np.isin(seq_idxs, listed))
    if not len(positions):
        return 0
    theirs = split["tokens"].take(pa.array(np.searchsorted(listed, seq_idxs[positions]))).to_pylist()
    width = max(map(len, theirs))
    ours = tokens[rows[positions], :width].astype(np.int64)  # only the compared columns are copied
    differ = [
        i
        for i, (our_row, their_row) in enumerate(zip(ours, theirs, strict=True))
        if not their_row or not np.array_equal(our_row[: len(their_row)], their_row[: len(our_row)])
    ]
    if differ:
        first = differ[0]
        raise ChecksumError(
            f"{where}: the split lists training sequence {int(seq_idxs[positions[first]])} with "
            f"tokens that are not that sequence's own ({len(differ)} of {len(positions)} listed "
            "candidates differ); the split is for another dataset or ordering than corpus.pile's"
        )
    return len(positions)
