"""Source ``pythia-preshuffled``: the Pile's exact training sequences, by byte range.

``EleutherAI/pile-{deduped,standard}-pythia-preshuffled`` hold Pythia's training stream as a
Megatron indexed dataset: ``document.idx`` (header magic ``MMIDIDX\\x00\\x00``, version 1, dtype
code 8 = uint16, then int32 sizes, int64 byte pointers, int64 doc_idx) and the token bytes split
into shards ``document-000NN-of-000MM.bin``. Sequence ``i`` (``seq_len + 1`` = 2049 tokens) starts
at byte ``i * 2 * 2049`` of the shards joined; the shard sizes are not multiples of a sequence,
so offsets come from the pinned shard sizes and a sequence may straddle two shards.

Reads go through fsspec (``hf://datasets/<repo>@<commit>/...`` at real scale, a local folder for
the fixture world: one code path), one ranged read per contiguous run of wanted sequences, with
no read-ahead (fsspec's default 5 MiB block would turn each 4 KB read into 5 MiB). Fetched
sequences are cached in chunk files under the cache root, written atomically: a second fetch reads
nothing remotely, and a killed fetch resumes at the first missing chunk. Every run is checked
against ``document.idx`` (each size equals the sequence width, each pointer its byte offset).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pythia_attribution.errors import ChecksumError, ConfigError
from pythia_attribution.schemas import corpus_schema
from pythia_attribution.sources.manifest import RepoPins

log = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
DTYPE_UINT16 = 8
INDEX_FILE = "document.idx"


def shard_names(pins: RepoPins) -> list[str]:
    return sorted(n for n in pins.files if n.startswith("document-") and n.endswith(".bin"))


def contiguous_runs(seq_idxs: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique indexes -> [(first, last_exclusive), ...] of consecutive values."""
    if len(seq_idxs) == 0:
        return []
    breaks = np.flatnonzero(np.diff(seq_idxs) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(seq_idxs)]])
    return [(int(seq_idxs[a]), int(seq_idxs[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


class PreshuffledPile:
    """Training sequences of a preshuffled Megatron dataset, read by byte range."""

    def __init__(self, url: str, pins: RepoPins, width: int, cache: Path, threads: int = 1):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url, self.pins, self.width, self.threads = url, pins, width, threads
        self._local = threading.local()  # a filesystem per reading thread (HfFileSystem's own pattern)
        self.seq_bytes = 2 * width
        self.shards = shard_names(pins)
        if not self.shards or INDEX_FILE not in pins.files:
            raise ConfigError(f"{pins.repo}: the manifest pins no {INDEX_FILE} or no document-*.bin shard")
        self.sizes = np.array([pins.files[n].size for n in self.shards], dtype=np.int64)
        for name, size in zip(self.shards, self.sizes.tolist(), strict=True):
            got = self.fs.size(self._path(name))
            if got != size:
                raise ChecksumError(
                    f"{pins.repo}/{name}: {got} bytes at {self.url}, the manifest pins {size} (truncated?)"
                )
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        magic, version, dtype, self.n_sequences, self.n_documents = HEADER.unpack(
            self._read(INDEX_FILE, 0, HEADER.size)
        )
        if magic != MAGIC or version != 1 or dtype != DTYPE_UINT16:
            raise ChecksumError(
                f"{pins.repo}/{INDEX_FILE}: not a Megatron uint16 index "
                f"(magic {magic!r}, version {version}, dtype code {dtype})"
            )
        if self.n_sequences * self.seq_bytes != int(self.starts[-1]):
            raise ChecksumError(
                f"{pins.repo}: {INDEX_FILE} lists {self.n_sequences} sequences of {width} tokens "
                f"({self.n_sequences * self.seq_bytes} bytes); the shards hold {int(self.starts[-1])}"
            )
        key = pins.commit or hashlib.sha256(url.encode()).hexdigest()[:40]
        self.cache = cache / f"{key}-w{width}"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _thread_fs(self):
        if threading.current_thread() is threading.main_thread():
            return self.fs
        if getattr(self._local, "fs", None) is None:
            self._local.fs = fsspec.core.url_to_fs(self.url)[0]
        return self._local.fs

    def _read(self, name: str, start: int, end: int) -> bytes:
        data = self._thread_fs().cat_file(self._path(name), start=start, end=end)
        if len(data) != end - start:
            raise ChecksumError(f"{self.pins.repo}/{name}: short read at bytes {start}-{end}")
        return data

    def _check_index(self, first: int, last: int) -> None:
        n = last - first
        sizes = np.frombuffer(self._read(INDEX_FILE, HEADER.size + 4 * first, HEADER.size + 4 * last), "<i4")
        p0 = HEADER.size + 4 * self.n_sequences + 8 * first
        pointers = np.frombuffer(self._read(INDEX_FILE, p0, p0 + 8 * n), "<i8")
        expected = np.arange(first, last, dtype=np.int64) * self.seq_bytes
        if not (sizes == self.width).all() or not (pointers == expected).all():
            raise ChecksumError(
                f"{self.pins.repo}/{INDEX_FILE}: sequences {first}-{last - 1} are not {self.width}-token "
                "sequences at their expected byte offsets"
            )

    def read_run(self, first: int, last: int) -> np.ndarray:
        """Sequences ``first .. last - 1`` as a ``[n, width]`` uint16 array (one ranged read per shard)."""
        if first < 0 or last > self.n_sequences:
            raise ConfigError(
                f"{self.pins.repo}: sequences {first}-{last - 1} are outside the dataset "
                f"(0-{self.n_sequences - 1})"
            )
        self._check_index(first, last)
        lo, hi = first * self.seq_bytes, last * self.seq_bytes
        parts = []
        shard = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(self.starts[shard + 1]))
            parts.append(
                self._read(self.shards[shard], lo - int(self.starts[shard]), end - int(self.starts[shard]))
            )
            lo, shard = end, shard + 1
        return np.frombuffer(b"".join(parts), dtype="<u2").reshape(last - first, self.width)

    def chunks(self, unique: np.ndarray, chunk: int = 1024, progress: bool = True):
        """Yield ``(start, tokens)`` for sorted, unique ``unique``, one cache chunk at a time, in
        order: ``tokens`` ([m, width] uint16) are the sequences ``unique[start : start + m]``.

        A chunk is the wanted sequences whose ``seq_idx // chunk`` agree; what the cache lacks is read
        remotely, then the chunk file is rewritten atomically, so a killed fetch resumes here. The
        ranged reads of up to ``threads`` chunks ahead run concurrently (a remote read's latency, not
        the bandwidth, bounds one reader when the selection is scattered: one read per contiguous run).
        """
        unique = np.asarray(unique, dtype=np.int64)
        if len(unique) > 1 and not (np.diff(unique) > 0).all():
            raise ValueError("PreshuffledPile.chunks: seq_idxs must be sorted and unique")
        self.cache.mkdir(parents=True, exist_ok=True)
        chunk_ids = unique // chunk
        bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
        starts = np.concatenate([[0], bounds]) if len(unique) else np.zeros(0, dtype=np.int64)
        ends = np.concatenate([bounds, [len(unique)]]) if len(unique) else starts
        spans = list(zip(starts.tolist(), ends.tolist(), strict=True))
        fetched = 0

        def start_chunk(pool, a: int, b: int) -> tuple:
            path = self.cache / f"chunk-{int(chunk_ids[a]):09d}.npz"
            have_idx = np.zeros(0, dtype=np.int64)
            have_tok = np.zeros((0, self.width), dtype=np.uint16)
            if path.is_file():
                with np.load(path) as stored:
                    have_idx, have_tok = stored["seq_idx"], stored["tokens"]
            runs = contiguous_runs(np.setdiff1d(unique[a:b], have_idx))
            reads = [pool.submit(self.read_run, first, last) for first, last in runs]
            return a, b, path, have_idx, have_tok, runs, reads

        def finish_chunk(a, b, path, have_idx, have_tok, runs, reads) -> np.ndarray:
            nonlocal fetched
            if runs:
                new = np.concatenate([r.result() for r in reads])
                new_idx = np.concatenate([np.arange(first, last) for first, last in runs])
                fetched += len(new_idx)
                have_idx = np.concatenate([have_idx, new_idx])
                have_tok = np.concatenate([have_tok, new])
                order = np.argsort(have_idx)
                have_idx, have_tok = have_idx[order], have_tok[order]
                tmp = path.with_name(path.name + ".tmp.npz")
                np.savez(tmp, seq_idx=have_idx, tokens=have_tok)
                os.replace(tmp, path)
            return have_tok[np.searchsorted(have_idx, unique[a:b])]

        bar = tqdm(
            total=len(spans), desc="fetch sequences", unit="chunk", disable=not progress, mininterval=2
        )
        with bar, ThreadPoolExecutor(self.threads, thread_name_prefix="pile-fetch") as pool:
            todo = iter(spans)
            ahead = deque(start_chunk(pool, *span) for span in itertools.islice(todo, self.threads))
            while ahead:  # at most threads + 1 chunks in memory
                done = ahead.popleft()
                if (span := next(todo, None)) is not None:
                    ahead.append(start_chunk(pool, *span))
                yield done[0], finish_chunk(*done)
                bar.update()
        log.info("%d sequences: %d fetched, %d from the cache", len(unique), fetched, len(unique) - fetched)

    def read(self, seq_idxs, chunk: int = 1024, progress: bool = True) -> np.ndarray:
        """Sequences ``seq_idxs`` (any order) through the chunk cache; rows follow the input order.

        Holds them all in memory: the corpus stage streams through ``chunks`` instead.
        """
        wanted = np.asarray(seq_idxs, dtype=np.int64)
        unique = np.unique(wanted)
        out = np.empty((len(unique), self.width), dtype=np.uint16)
        for start, tokens in self.chunks(unique, chunk, progress):
            out[start : start + len(tokens)] = tokens
        return out[np.searchsorted(unique, wanted)]


def write_megatron(
    folder: Path, sequences: np.ndarray, n_shards: int, shard_bytes: int | None = None
) -> None:
    """Write ``sequences`` ([n, width] uint16) as Pythia's preshuffled files: ``document.idx`` and the
    token bytes cut into ``n_shards`` shards of ``shard_bytes`` (the last one takes the rest).

    Used by the fixture world; the layout is Megatron's ``MMapIndexedDataset`` byte for byte.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n, width = sequences.shape
    data = np.ascontiguousarray(sequences, dtype="<u2").tobytes()
    sizes = np.full(n, width, dtype="<i4")
    pointers = np.arange(n, dtype="<i8") * 2 * width
    doc_idx = np.arange(n + 1, dtype="<i8")
    with open(folder / INDEX_FILE, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, 1, DTYPE_UINT16, n, n + 1))
        fh.write(sizes.tobytes())
        fh.write(pointers.tobytes())
        fh.write(doc_idx.tobytes())
    shard_bytes = shard_bytes or -(-len(data) // n_shards)
    for i in range(n_shards):
        part = data[i * shard_bytes : (i + 1) * shard_bytes if i < n_shards - 1 else len(data)]
        (folder / f"document-{i:05d}-of-{n_shards - 1:05d}.bin").write_bytes(part)


def select(cfg, batch: int, n_sequences: int, memorized: np.ndarray, seed: int) -> np.ndarray:
    """The candidate training sequences a profile's ``corpus.pile`` selects, sorted and unique."""
    parts = [np.asarray(cfg.seq_idxs, dtype=np.int64)]
    for rng_ in cfg.steps:
        if len(rng_) != 2 or not 0 <= rng_[0] < rng_[1]:
            raise ConfigError(f"corpus.pile.steps: {rng_} is not a range [first, last) of steps")
        parts.append(np.arange(rng_[0] * batch, rng_[1] * batch, dtype=np.int64))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 200]))
    if cfg.memorized:
        take = min(cfg.memorized, len(memorized))
        parts.append(np.sort(rng.choice(memorized, size=take, replace=False)))
    if cfg.sample:
        until = (cfg.sample_until_step * batch) or n_sequences
        parts.append(rng.choice(min(until, n_sequences), size=min(cfg.sample, until), replace=False))
    chosen = np.unique(np.concatenate(parts))
    if len(chosen) and (chosen[0] < 0 or chosen[-1] >= n_sequences):
        bad = int(chosen[0] if chosen[0] < 0 else chosen[-1])
        raise ConfigError(f"corpus.pile: sequence {bad} is outside the dataset (0-{n_sequences - 1})")
    if len(chosen) > cfg.max_candidates:
        raise ConfigError(
            f"corpus.pile selects {len(chosen)} sequences, more than max_candidates = {cfg.max_candidates}"
        )
    if not len(chosen):
        raise ConfigError("corpus.pile selects no sequence (set steps, seq_idxs, memorized or sample)")
    return chosen


def corpus_table(pile: PreshuffledPile, chosen: np.ndarray, tokenizer, batch: int, chunk: int,
                 scratch: Path) -> pa.Table:  # fmt: skip
    """``corpus.arrow``'s table for the sorted, unique training sequences ``chosen``, in flat memory.

    The token ids and the decoded texts are appended chunk by chunk to files under ``scratch`` and
    the table's two large columns are memory maps of those files, so building and writing it holds
    one fetch chunk in memory, not the candidates (held whole, 10^6 candidates are 4 GB of tokens and
    about 7 GiB of decoded text, twice: as Python strings and as the Arrow column). The table stays
    one record batch, so readers get ``input_ids`` as one zero-copy buffer. ``scratch`` may be
    deleted once the table is written (the maps stay valid until the table is dropped).
    """
    n, width = len(chosen), pile.width
    scratch.mkdir(parents=True, exist_ok=True)
    token_path, text_path, offset_path = (scratch / f for f in ("tokens.bin", "text.bin", "offsets.bin"))
    end = 0
    with (
        open(token_path, "wb") as tok_out,
        open(text_path, "wb") as text_out,
        open(offset_path, "wb") as off_out,
    ):
        off_out.write(np.zeros(1, dtype="<i8").tobytes())
        for start, tokens in pile.chunks(chosen, chunk):
            assert start == tok_out.tell() // pile.seq_bytes, "chunks arrive in order"
            tok_out.write(np.ascontiguousarray(tokens, dtype="<u2").tobytes())
            texts = [t.encode() for t in tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=False)]
            ends = end + np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
            off_out.write(ends.astype("<i8").tobytes())
            text_out.write(b"".join(texts))
            end = int(ends[-1]) if len(ends) else end

    def mapped(path: Path) -> pa.Buffer:
        if path.stat().st_size == 0:  # nothing to map (every text empty)
            return pa.py_buffer(b"")
        return pa.memory_map(str(path), "r").read_buffer()  # zero-copy; the buffer keeps the map

    schema = corpus_schema(width)
    columns = {
        "seq_idx": pa.array(chosen, pa.int64()),
        "step": pa.array((chosen // batch).astype(np.int32)),
        "batch_pos": pa.array((chosen % batch).astype(np.int32)),
        "epoch": pa.array(np.zeros(n, dtype=np.int16)),
        "packed_id": pa.array(np.arange(n, dtype=np.int32)),
        "input_ids": pa.FixedSizeListArray.from_arrays(
            pa.Array.from_buffers(pa.uint16(), n * width, [None, mapped(token_path)]), width
        ),
        "text": pa.Array.from_buffers(pa.large_string(), n, [None, mapped(offset_path), mapped(text_path)]),
        "doc_ids": pa.ListArray.from_arrays(
            pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.int32())
        ),
        "sources": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.repeat("pile", n)),
    }
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def run(ctx) -> None:
    """Corpus stage, source ``pythia-preshuffled``: the selected training sequences, in training order.

    ``packed_id`` numbers the candidates (row order); ``epoch`` is not derived (0). The Pile has no
    synthetic items, so ``documents.arrow`` and ``ground_truth.arrow`` are empty with their schemas.
    """
    from transformers import AutoTokenizer

    from pythia_attribution import paths
    from pythia_attribution.schemas import DOCUMENTS_SCHEMA, GROUND_TRUTH_SCHEMA
    from pythia_attribution.sources.hub import checkpoint, world_manifest

    cfg, profile = ctx.config, ctx.profile
    width, batch = cfg.seq_len + 1, cfg.batch_size
    manifest = world_manifest(profile)
    url = cfg.pile.url.replace("{repo}", manifest.dataset.repo).replace("{commit}", manifest.dataset.commit)
    url = url if "://" in url else str(paths.expand(url, profile.name))
    pile = PreshuffledPile(
        url, manifest.dataset, width, paths.cache_root() / "pile-sequences", cfg.pile.fetch_threads
    )
    split = None
    if cfg.pile.memorized:
        from pythia_attribution.sources.memorized_evals import load_split

        split = load_split(profile)
    memorized = split["index"].to_numpy() if split is not None else np.zeros(0, dtype=np.int64)
    chosen = select(cfg.pile, batch, pile.n_sequences, memorized, profile.runtime.seed)
    log.info("%d candidate sequences of %d (%s)", len(chosen), pile.n_sequences, url)
    _, tok_dir = checkpoint(profile, int(cfg.pile.tokenizer_step), manifest)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)  # saved config: env-independent
    tokenizer.save_pretrained(ctx.out_dir / paths.TOKENIZER_DIR)
    n = len(chosen)
    scratch = ctx.out_dir / "scratch"
    corpus = corpus_table(pile, chosen, tokenizer, batch, cfg.pile.fetch_batch, scratch)
    evals_checked = 0
    if split is not None:  # the split's index must name these very sequences: their tokens agree
        from pythia_attribution.sources.memorized_evals import check_tokens

        tokens = corpus.column("input_ids").chunk(0).flatten().to_numpy().reshape(n, width)  # the map
        where = f"{manifest.evals.repo} split {profile.world.evals_split}"
        evals_checked = check_tokens(split, chosen, tokens, np.arange(n), where)
    meta = {
        "n_packed": n,
        "n_dataset_sequences": int(pile.n_sequences),
        "seq_len": cfg.seq_len,
        "batch_size": batch,
        "dataset": f"{manifest.dataset.repo}@{manifest.dataset.commit}",
        "evals_tokens_checked": evals_checked,
        "note": "packed_id numbers the selected sequences; epoch is not derived (0)",
    }
    ctx.write_table(paths.CORPUS_TABLE, corpus, summary=meta)
    del corpus
    shutil.rmtree(scratch)
    ctx.write_table(paths.DOCUMENTS_TABLE, DOCUMENTS_SCHEMA.empty_table(), summary=meta)
    ctx.write_table(paths.GROUND_TRUTH_TABLE, GROUND_TRUTH_SCHEMA.empty_table(), summary=meta)
