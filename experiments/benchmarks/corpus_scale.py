"""Memory and time of the real-scale corpus stage: the selected Pile sequences into ``corpus.arrow``.

At real scale the corpus stage reads each candidate's 2,049 token ids from the preshuffled
Megatron shards, decodes them with Pythia's tokenizer and writes ``corpus.arrow`` (token ids and
text per candidate). It streams (``sources.pile.corpus_table``): a fetch chunk at a time, the ids
and the decoded bytes are appended to files and the table's two large columns are memory maps of
them, written as one record batch. Before, it held every candidate's ids, their texts as Python
strings and the Arrow table built from both. This measures both ways on the same synthetic
dataset, each size and way in its own process, and checks that they write the same table.

The dataset: ``max(--sizes)`` sequences of random token ids in Megatron's byte layout (four
shards, ``write_megatron``, as the fixture world's), decoded with a byte-level BPE of ``--vocab``
tokens trained here on seeded synthetic words (``text_scale.synthetic_texts``). Random ids decode
to about as many bytes per token as the tokenizer's pieces hold, so the text per candidate is
printed beside the figures; the Pile is about 3 bytes a token (825 GiB, about 300 billion
tokens). Memory is ``RssAnon`` above the process's memory before the step, its peak (sampled
every 20 ms, as in ``scale.py``); pages of the memory-mapped files are the kernel's to drop and
are not counted. The cost per candidate is the
slope between the smallest and the largest size (fixed costs cancel), carried to 10^6 candidates
as if it stayed linear.

Usage:

    python experiments/benchmarks/corpus_scale.py --sizes 10000 30000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import PeakMemory, memory_kib, per_candidate, run_child  # noqa: E402

WIDTH = 2049
WAYS = {
    "stream": "sources.pile.corpus_table: a fetch chunk at a time, through files (what the stage runs)",
    "whole": "every candidate's ids, texts and table in memory at once (what the stage ran before)",
}


def open_pile(data: Path, cache: Path):
    from pythia_attribution.sources import manifest as pins
    from pythia_attribution.sources.pile import PreshuffledPile

    files = {p.name: pins.FileEntry(p.stat().st_size) for p in data.iterdir() if p.is_file()}
    return PreshuffledPile(str(data), pins.RepoPins("synthetic/pile", "", files), WIDTH, cache)


def whole_table(pile, chosen, tokenizer, batch: int, chunk: int):
    """The corpus stage's table as it was built before streaming (its code at ``9c639f5``)."""
    import numpy as np
    import pyarrow as pa

    from pythia_attribution.schemas import corpus_schema

    tokens = pile.read(chosen, chunk=chunk, progress=False)
    texts = []
    for start in range(0, len(tokens), chunk):
        texts.extend(
            tokenizer.batch_decode(tokens[start : start + chunk].tolist(), skip_special_tokens=False)
        )
    n = len(chosen)
    return pa.table(
        {
            "seq_idx": chosen,
            "step": (chosen // batch).astype(np.int32),
            "batch_pos": (chosen % batch).astype(np.int32),
            "epoch": np.zeros(n, dtype=np.int16),
            "packed_id": np.arange(n, dtype=np.int32),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), WIDTH),
            "text": pa.array(texts, pa.large_string()),
            "doc_ids": pa.array([[] for _ in range(n)], pa.list_(pa.int32())),
            "sources": pa.array([["pile"] for _ in range(n)], pa.list_(pa.string())),
        }
    ).cast(corpus_schema(WIDTH))


def child(args) -> dict:
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from pythia_attribution import tables
    from pythia_attribution.sources.pile import corpus_table

    root = Path(args.root)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    work = root / f"{args.way}-{args.rows}"
    pile = open_pile(root / "data", work / "cache")
    chosen = np.arange(args.rows, dtype=np.int64)
    out = work / "corpus.arrow"
    base, _ = memory_kib()
    start = time.perf_counter()
    with PeakMemory() as peak:
        if args.way == "stream":
            table = corpus_table(pile, chosen, tokenizer, args.batch, args.chunk, work / "scratch")
        else:
            table = whole_table(pile, chosen, tokenizer, args.batch, args.chunk)
        tables.write_table(out, table, {})
        del table
    shutil.rmtree(work / "cache")
    shutil.rmtree(work / "scratch", ignore_errors=True)
    return {
        "rows": args.rows,
        "seconds": time.perf_counter() - start,
        "mib": (peak.peak_anon - base) / 1024,
        "file_mib": out.stat().st_size / 2**20,
    }


def same_table(a: Path, b: Path) -> bool:
    from pythia_attribution import tables

    return tables.read_table(a).equals(tables.read_table(b))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000])
    parser.add_argument("--vocab", type=int, default=8_192, help="BPE tokens of the synthetic tokenizer")
    parser.add_argument(
        "--chunk", type=int, default=1024, help="sequences per fetch (corpus.pile.fetch_batch)"
    )
    parser.add_argument("--batch", type=int, default=1024, help="sequences per training step")
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is not None:
        print(json.dumps(child(args)))
        return

    import numpy as np
    from text_scale import synthetic_texts

    from pythia_attribution.corpus.build import train_tokenizer
    from pythia_attribution.sources.pile import write_megatron

    with tempfile.TemporaryDirectory(prefix="corpus_scale-") as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer(synthetic_texts(400, 1_500, 50_000, seed=1), args.vocab)
        tokenizer.save_pretrained(root / "tokenizer")
        n = max(args.sizes)
        rng = np.random.default_rng(0)
        write_megatron(root / "data", rng.integers(2, len(tokenizer), size=(n, WIDTH), dtype=np.uint16), 4)
        print(
            f"synthetic Pile: {n} sequences of {WIDTH} random token ids (a {len(tokenizer)}-token BPE), "
            f"four shards; fetch chunks of {args.chunk}; each way and size in its own process"
        )
        for way in args.ways:
            print(f"  {way:<7} {WAYS[way]}")
        print(
            f"{'rows':>9} {'file MiB':>9} "
            + " ".join(f"{f'{way} s':>9} {f'{way} MiB':>11}" for way in args.ways)
            + "  same table"
        )
        results = {}
        for rows in args.sizes:
            line = []
            for way in args.ways:
                r = results[rows, way] = run_child("--rows", str(rows), "--way", way, "--root", tmp)
                line.append(f"{r['seconds']:>9.1f} {r['mib']:>11.0f}")
            files = [root / f"{way}-{rows}" / "corpus.arrow" for way in args.ways]
            same = "yes" if all(same_table(files[0], f) for f in files[1:]) else "NO"
            print(f"{rows:>9} {r['file_mib']:>9.0f} " + " ".join(line) + f"  {same}")
            for f in files:
                f.unlink()
    if line := per_candidate(results, args.sizes, args.ways, digits=2):
        print(line)


if __name__ == "__main__":
    main()
