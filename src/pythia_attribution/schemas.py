"""Schemas of the tables that more than one source writes: every source of a stage writes exactly
these, so the stages downstream never know which source fed them (a test compares them)."""

from __future__ import annotations

import pyarrow as pa

from pythia_attribution import tables


def corpus_schema(width: int) -> pa.Schema:
    """``corpus.arrow``: one row per training sequence, in training order."""
    return pa.schema(
        [
            ("seq_idx", pa.int64()),
            ("step", pa.int32()),
            ("batch_pos", pa.int32()),
            ("epoch", pa.int16()),
            ("packed_id", pa.int32()),
            ("input_ids", pa.list_(pa.uint16(), width)),
            ("text", pa.large_string()),
            ("doc_ids", pa.list_(pa.int32())),
            ("sources", pa.list_(pa.string())),
        ]
    )


DOCUMENTS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int32()),
        ("source", pa.string()),
        ("title", pa.string()),
        ("item_id", pa.string()),
        ("n_tokens", pa.int32()),
        ("stream_start", pa.int64()),
        ("packed_ids", pa.list_(pa.int32())),
        ("complete_packed_ids", pa.list_(pa.int32())),
        ("text", pa.large_string()),
    ]
)

GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("kind", pa.string()),
        ("count", pa.int32()),
        ("n_documents", pa.int32()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("target_ids", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.int32())),
        ("seq_idxs", pa.list_(pa.int64())),
        ("seq_idxs_partial", pa.list_(pa.int64())),
        ("detail", pa.string()),
    ]
)

CHECKPOINT_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("path", pa.string()),
        ("sequences_seen", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("model_sha256", pa.string()),
        ("has_optimizer_state", pa.bool_()),
        ("revision", pa.string()),
        ("commit", pa.string()),
    ]
)

TRAINING_LOG_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        pa.field("tokens_per_s", pa.float64(), metadata=tables.volatile("wall-clock throughput")),
    ]
)
