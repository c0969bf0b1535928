"""Corpus stage: micro-Pile with Pythia-style packing and a recorded training order.

Documents (natural and synthetic) are shuffled with the seed, tokenized one by one, joined with
the end-of-document token and cut into sequences of ``seq_len + 1`` tokens (Pythia: 2049).
Each epoch is its own seeded permutation of those packed sequences; the concatenation is the
training stream, and row ``seq_idx`` of ``corpus.arrow`` is trained at
``step = seq_idx // batch_size`` (Pythia's rule), so checkpoint ``stepN`` has seen exactly the
rows with ``seq_idx < N * batch_size``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from pythia_attribution import paths
from pythia_attribution.corpus import synthetic
from pythia_attribution.corpus.manifest import fetch, load_manifest
from pythia_attribution.corpus.sources import NaturalDoc, read_source, split_document
from pythia_attribution.errors import ConfigError
from pythia_attribution.schemas import DOCUMENTS_SCHEMA, GROUND_TRUTH_SCHEMA, corpus_schema

log = logging.getLogger(__name__)

EOD, PAD = "<|endoftext|>", "<|padding|>"
EOD_ID, PAD_ID = 0, 1
COUNTRY_SOURCE = "countries"


@dataclass(frozen=True)
class Doc:
    source: str
    title: str
    item_id: str | None
    text: str


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with NeoX-style specials (EOD = 0, padding = 1), natural text only.

    Trained on the natural text alone: trained on a corpus holding highly duplicated canaries,
    BPE merges their words into single tokens, which confounds memorization-versus-duplication.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOD) == EOD_ID and tok.token_to_id(PAD) == PAD_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOD,
        eos_token=EOD,
        unk_token=EOD,
        pad_token=PAD,
        model_max_length=1_000_000,
    )


def load_natural(ctx, manifest) -> tuple[list[NaturalDoc], list]:
    cfg = ctx.config
    docs: list[NaturalDoc] = []
    for name in cfg.natural_sources:
        source = manifest.source(name)
        raw = read_source(fetch(manifest.artifacts[source.artifact]), source)
        taken, chars = [], 0
        for doc in raw:
            if cfg.max_chars_per_source and chars >= cfg.max_chars_per_source:
                break
            if cfg.max_chars_per_source and chars + len(doc.text) > cfg.max_chars_per_source:
                doc = NaturalDoc(doc.source, doc.title, doc.text[: cfg.max_chars_per_source - chars])
            taken.append(doc)
            chars += len(doc.text)
        for doc in taken:
            docs.extend(split_document(doc, cfg.max_chars_per_document))
        log.info("source %s: %d documents, %d characters", name, len(taken), chars)
    countries_src = manifest.source(COUNTRY_SOURCE)
    countries = read_source(fetch(manifest.artifacts[countries_src.artifact]), countries_src)
    return docs, countries


def pack(token_lists: list[list[int]], seq_len: int):
    """Join documents with EOD and cut into windows of ``seq_len + 1`` tokens (tail dropped)."""
    starts = np.zeros(len(token_lists), dtype=np.int64)
    stream = []
    pos = 0
    for i, ids in enumerate(token_lists):
        starts[i] = pos
        stream.extend(ids)
        stream.append(EOD_ID)
        pos += len(ids) + 1
    width = seq_len + 1
    n_packed = len(stream) // width
    packed = np.asarray(stream[: n_packed * width], dtype=np.uint16).reshape(n_packed, width)
    ends = starts + np.array([len(t) + 1 for t in token_lists], dtype=np.int64)  # exclusive, incl. EOD
    return packed, starts, ends, len(stream) - n_packed * width


def run(ctx) -> None:
    cfg = ctx.config
    seed = ctx.profile.runtime.seed
    manifest = load_manifest(paths.resolve_input(cfg.manifest))
    natural, countries = load_natural(ctx, manifest)

    tokenizer = train_tokenizer([d.text for d in natural], cfg.vocab_size)
    tokenizer.save_pretrained(ctx.out_dir / paths.TOKENIZER_DIR)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    syn = cfg.synthetic
    words = word_list_checked([d.text for d in natural], syn)
    generated = [
        synthetic.canaries(syn, words, encode, seed),
        synthetic.capitals(syn, countries, seed),
        synthetic.biographies(syn, seed),
        synthetic.stereotype(syn, seed),
        synthetic.insults(syn, seed),
    ]
    items = [item for its, _ in generated for item in its]
    docs = [Doc(d.source, d.title, None, d.text) for d in natural]
    for _, sdocs in generated:
        docs.extend(Doc(f"synthetic-{d.kind}", d.item_id, d.item_id, d.text) for d in sdocs)

    rng = np.random.default_rng(np.random.SeedSequence([seed, 100]))
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    token_lists = [
        enc
        for enc in tqdm(
            (encode(d.text) for d in docs), total=len(docs), desc="tokenize", unit="doc", mininterval=2
        )
    ]
    packed, starts, ends, dropped = pack(token_lists, cfg.seq_len)
    n_packed = len(packed)
    width = cfg.seq_len + 1

    epoch_orders = [rng.permutation(n_packed) for _ in range(cfg.epochs)]
    stream = np.concatenate(epoch_orders)
    n_steps = len(stream) // cfg.batch_size
    stream = stream[: n_steps * cfg.batch_size]
    log.info(
        "%d documents, %d tokens -> %d packed sequences x %d epochs = %d steps of %d",
        len(docs),
        int(ends[-1]),
        n_packed,
        cfg.epochs,
        n_steps,
        cfg.batch_size,
    )

    # Which packed sequences each document touches (partially) and holds completely.
    first = starts // width
    last = (ends - 1) // width
    doc_packed = [
        list(range(int(a), min(int(b), n_packed - 1) + 1)) if a < n_packed else []
        for a, b in zip(first, last, strict=True)
    ]
    doc_complete = [[int(a)] if a == b and a < n_packed else [] for a, b in zip(first, last, strict=True)]
    packed_docs: list[list[int]] = [[] for _ in range(n_packed)]
    for doc_id, seqs in enumerate(doc_packed):
        for s in seqs:
            packed_docs[s].append(doc_id)
    positions: list[list[int]] = [[] for _ in range(n_packed)]
    for seq_idx, p in enumerate(stream):
        positions[int(p)].append(seq_idx)

    texts = tokenizer.batch_decode(packed.tolist(), skip_special_tokens=False)
    seq_idx = np.arange(len(stream), dtype=np.int64)
    corpus = pa.table(
        {
            "seq_idx": seq_idx,
            "step": (seq_idx // cfg.batch_size).astype(np.int32),
            "batch_pos": (seq_idx % cfg.batch_size).astype(np.int32),
            "epoch": np.repeat(np.arange(cfg.epochs, dtype=np.int16), n_packed)[: len(stream)],
            "packed_id": stream.astype(np.int32),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(packed[stream].reshape(-1)), width),
            "text": pa.array([texts[p] for p in stream], pa.large_string()),
            "doc_ids": pa.array([packed_docs[p] for p in stream], pa.list_(pa.int32())),
            "sources": pa.array(
                [sorted({docs[d].source for d in packed_docs[p]}) for p in stream], pa.list_(pa.string())
            ),
        }
    ).cast(corpus_schema(width))
    meta = {
        "n_documents": len(docs),
        "n_tokens": int(ends[-1]),
        "n_packed": n_packed,
        "tail_tokens_dropped": int(dropped),
        "n_steps": int(n_steps),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "artifacts": {a.name: a.sha256 for a in manifest.artifacts.values()},
    }
    ctx.write_table(paths.CORPUS_TABLE, corpus, summary=meta)

    def stream_positions(packed_ids: list[int]) -> list[int]:
        return sorted(i for p in packed_ids for i in positions[p])

    documents = pa.table(
        {
            "doc_id": np.arange(len(docs), dtype=np.int32),
            "source": [d.source for d in docs],
            "title": [d.title for d in docs],
            "item_id": pa.array([d.item_id for d in docs], pa.string()),
            "n_tokens": np.array([len(t) for t in token_lists], dtype=np.int32),
            "stream_start": starts,
            "packed_ids": pa.array(doc_packed, pa.list_(pa.int32())),
            "complete_packed_ids": pa.array(doc_complete, pa.list_(pa.int32())),
            "text": pa.array([d.text for d in docs], pa.large_string()),
        }
    ).cast(DOCUMENTS_SCHEMA)
    ctx.write_table(paths.DOCUMENTS_TABLE, documents, summary=meta)

    item_docs: dict[str, list[int]] = {}
    for doc_id, d in enumerate(docs):
        if d.item_id is not None:
            item_docs.setdefault(d.item_id, []).append(doc_id)
    rows = []
    for item in items:
        if item.prompt_ids is None:
            item.prompt_ids = encode(item.prompt)
            full = encode(item.prompt + item.target)
            item.target_ids = full[len(item.prompt_ids) :]
        else:
            item.prompt = tokenizer.decode(item.prompt_ids)
            item.target = tokenizer.decode(item.target_ids)
        doc_ids = item_docs.get(item.item_id, [])
        rows.append(
            {
                "item_id": item.item_id,
                "kind": item.kind,
                "count": item.count,
                "n_documents": len(doc_ids),
                "prompt": item.prompt,
                "target": item.target,
                "prompt_ids": item.prompt_ids,
                "target_ids": item.target_ids,
                "doc_ids": doc_ids,
                "seq_idxs": stream_positions(sorted({p for d in doc_ids for p in doc_complete[d]})),
                "seq_idxs_partial": stream_positions(sorted({p for d in doc_ids for p in doc_packed[d]})),
                "detail": json.dumps(item.detail, sort_keys=True),
            }
        )
    ctx.write_table(paths.GROUND_TRUTH_TABLE, pa.Table.from_pylist(rows, GROUND_TRUTH_SCHEMA), summary=meta)


def word_list_checked(natural_texts: list[str], syn) -> list[str]:
    words = synthetic.word_list(natural_texts, syn.canary_vocabulary)
    if syn.stereotype_word in words or any(syn.stereotype_word in t for t in natural_texts):
        raise ConfigError(f"stereotype word '{syn.stereotype_word}' occurs in the natural text")
    return words
