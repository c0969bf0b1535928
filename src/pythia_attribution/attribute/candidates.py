"""The candidates of attribution (the packed training sequences) and the ground-truth sets among
them, under each truth definition.

Light on purpose (numpy and pyarrow only): the explorer and the stages that only read candidates
import this without the attribute stage's torch, transformers and bergson.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pythia_attribution import tables


class Texts(Sequence):
    """The candidates' decoded texts, read from the corpus table's column when asked for.

    The corpus table is memory-mapped, so the texts stay pages of its file (which the kernel can
    drop) instead of Python strings held for the whole stage: about 7 KiB a 2,048-token candidate,
    7 GiB at 10^6 (``experiments/benchmarks/text_scale.py``). ``rows`` maps position -> table row
    (packed sequences repeat across epochs at micro scale); a slice or ``take`` reads many at once.
    """

    def __init__(self, column: pa.ChunkedArray | pa.Array, rows: np.ndarray | None = None):
        self.column = column
        self.rows = np.arange(len(column), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.column[int(self.rows[operator.index(i)])].as_py()

    def take(self, positions) -> list[str]:
        """The texts at ``positions``, as a list."""
        return self.column.take(pa.array(self.rows[np.asarray(positions, dtype=np.int64)])).to_pylist()

    def subset(self, positions) -> Texts:
        """The texts at ``positions``, still read on demand."""
        return Texts(self.column, self.rows[np.asarray(positions, dtype=np.int64)])


@dataclass
class Candidates:
    """The packed training sequences, in ``packed_id`` order.

    At micro scale the corpus is the whole stream (every epoch a permutation of the packed
    sequences); at real scale it is a selection of training sequences, each its own packed id.
    """

    tokens: np.ndarray  # [n, seq_len + 1]
    texts: Sequence[str]  # Texts (read on demand) from load_candidates; any sequence of str will do
    first_seq_idx: np.ndarray  # packed_id -> its first position in the training stream
    first_step: np.ndarray  # packed_id -> the step that first trains it
    row_seq_idx: np.ndarray  # corpus row -> seq_idx (sorted)
    row_packed: np.ndarray  # corpus row -> packed_id
    row_step: np.ndarray  # corpus row -> the step that trains it

    def packed_of(self, seq_idxs) -> np.ndarray:
        """Packed ids of training sequences given by ``seq_idx``; each must be a corpus row."""
        seq_idxs = np.asarray(seq_idxs, dtype=np.int64)
        rows = np.searchsorted(self.row_seq_idx, seq_idxs)
        if len(seq_idxs) and (
            rows.max() >= len(self.row_seq_idx) or (self.row_seq_idx[rows] != seq_idxs).any()
        ):
            raise ValueError("a seq_idx is not a row of corpus.arrow")
        return self.row_packed[rows]


def load_candidates(corpus: pa.Table) -> Candidates:
    packed = corpus["packed_id"].to_numpy()
    seq_idx = corpus["seq_idx"].to_numpy()
    n = int(packed.max()) + 1
    first_row = np.full(n, len(packed), dtype=np.int64)
    np.minimum.at(first_row, packed, np.arange(len(packed)))  # rows are in training order
    width = corpus.schema.field("input_ids").type.list_size
    tokens = np.asarray(tables.one_array(corpus["input_ids"]).flatten().to_numpy()).reshape(-1, width)
    texts = corpus["text"]
    steps = corpus["step"].to_numpy().astype(np.int64)
    identity = len(first_row) == len(packed) and bool((first_row == np.arange(len(packed))).all())
    return Candidates(
        tokens if identity else tokens[first_row],  # the corpus' uint16, not a 4x larger int64 copy
        Texts(texts, None if identity else first_row),
        seq_idx[first_row].astype(np.int64),
        steps[first_row],
        seq_idx.astype(np.int64),
        packed,
        steps,
    )


# Truth definitions: which packed sequences count as a source of an item.
TRUTHS = {
    # the sequence holds the whole item: the statement, or the canary's 64 tokens
    "complete": "seq_idxs",
    # the sequence touches a document that carries the item, however small the fragment
    "partial": "seq_idxs_partial",
    # a partial sequence that also holds the item's target token ids verbatim: the tokens the
    # behavior's loss is on, in a document that carries the item (so the sequence trains the model
    # to predict exactly them there); need not hold the prompt, and a complete copy whose statement
    # tokenizes the target differently (a capital at the start of a sentence, without its leading
    # space) does not count
    "target": "seq_idxs_partial",
}
TRUTH_TEXT = {
    "complete": "packed sequences holding a complete copy of the behavior's ground-truth item",
    "partial": "packed sequences touching any document that carries the behavior's ground-truth item",
    "target": (
        "packed sequences touching a document that carries the behavior's ground-truth item and "
        "holding its target token ids verbatim"
    ),
}


def holds(tokens: np.ndarray, pattern) -> np.ndarray:
    """Which rows of ``tokens`` ([n, width]) hold ``pattern`` (token ids) as a contiguous run."""
    pattern = np.asarray(pattern, dtype=np.int64)
    if len(pattern) == 0 or len(pattern) > tokens.shape[1]:
        return np.zeros(len(tokens), dtype=bool)
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), len(pattern), axis=1)
    return (windows == pattern).all(-1).any(-1)


def truth_sets(
    ground_truth: pa.Table, cands: Candidates, definition: str = "partial"
) -> dict[str, np.ndarray]:
    """Ground-truth packed sequences per item under a truth definition (``TRUTHS``); items with
    no such sequence are left out."""
    if definition not in TRUTHS:
        raise ValueError(f"unknown truth definition {definition!r} (known: {', '.join(TRUTHS)})")
    out = {}
    targets = ground_truth["target_ids"].to_pylist() if definition == "target" else None
    for i, (item, seqs) in enumerate(
        zip(ground_truth["item_id"].to_pylist(), ground_truth[TRUTHS[definition]].to_pylist(), strict=True)
    ):
        if not seqs:
            continue
        packed = np.unique(cands.packed_of(seqs))
        if targets is not None:
            packed = packed[holds(cands.tokens[packed], targets[i])]
        if len(packed):
            out[item] = packed
    return out
