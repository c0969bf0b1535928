import json

import numpy as np
import pyarrow.compute as pc
import pytest

from pythia_attribution import paths, tables
from pythia_attribution.attribute.candidates import holds, load_candidates, truth_sets
from pythia_attribution.cli import main
from pythia_attribution.config import load_profile
from pythia_attribution.corpus.build import EOD_ID, pack
from pythia_attribution.corpus.manifest import load_manifest


def _read(results, stage, table):
    return tables.read_table(paths.table_path(results / stage, table))


def test_two_builds_are_byte_identical(world, tmp_path, monkeypatch):
    outputs = []
    for run in ("a", "b"):
        monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(tmp_path / run))
        assert main(["corpus", "--profile", str(world), "-q"]) == 0
        folder = tmp_path / run / "nano" / paths.CORPUS
        outputs.append(
            {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        )
    assert outputs[0].keys() == outputs[1].keys()
    for name in outputs[0]:
        if name.name == paths.STAGE_RECORD:  # holds the wall time and memory; everything else must match
            records = [json.loads(o[name]) for o in outputs]
            for r in records:
                assert r.pop("seconds") > 0 and r.pop("peak_rss_mib") > 0
            assert records[0] == records[1]
        else:
            assert outputs[0][name] == outputs[1][name], name
    assert any(name.suffix == ".arrow" for name in outputs[0])


def test_pythia_order_and_packing(nano_run):
    corpus = _read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE)
    batch = int(pc.max(corpus["batch_pos"]).as_py()) + 1
    seq_idx = corpus["seq_idx"].to_numpy()
    assert (seq_idx == np.arange(len(seq_idx))).all()
    assert (corpus["step"].to_numpy() == seq_idx // batch).all()
    assert (corpus["batch_pos"].to_numpy() == seq_idx % batch).all()
    # Every epoch is a permutation of the same packed sequences.
    packed, epoch = corpus["packed_id"].to_numpy(), corpus["epoch"].to_numpy()
    first = np.sort(packed[epoch == 0])
    assert (first == np.arange(len(first))).all()
    # Row text is the decoded token ids.
    ids = corpus["input_ids"].to_pylist()
    assert all(len(r) == len(ids[0]) for r in ids)


def test_pack_cuts_fixed_windows_with_eod():
    packed, starts, ends, dropped = pack([[5, 6, 7], [8, 9], [10]], seq_len=3)
    assert packed.tolist() == [[5, 6, 7, EOD_ID], [8, 9, EOD_ID, 10]]
    assert starts.tolist() == [0, 4, 7] and ends.tolist() == [4, 7, 9]
    assert dropped == 1


def test_ground_truth_sequences_hold_their_items(nano_run):
    """Every sequence listed for an item holds, at the recorded offset, part of one of its documents."""
    results = nano_run["results"]
    corpus = _read(results, paths.CORPUS, paths.CORPUS_TABLE)
    docs = _read(results, paths.CORPUS, paths.DOCUMENTS_TABLE).to_pylist()
    ground = _read(results, paths.CORPUS, paths.GROUND_TRUTH_TABLE).to_pylist()
    ids = corpus["input_ids"].to_pylist()
    packed_of = corpus["packed_id"].to_pylist()
    width = len(ids[0])
    checked = 0
    for item in ground:
        assert item["n_documents"] == item["count"] == len(item["doc_ids"])
        assert set(item["seq_idxs"]) <= set(item["seq_idxs_partial"])
        if item["kind"] != "canary":
            continue
        canary = item["prompt_ids"] + item["target_ids"]
        for seq in item["seq_idxs_partial"]:
            p = packed_of[seq]
            row = ids[seq]
            found = False
            for d in (docs[i] for i in item["doc_ids"]):
                lo, hi = (
                    max(d["stream_start"], p * width),
                    min(d["stream_start"] + d["n_tokens"], (p + 1) * width),
                )
                if lo < hi:
                    piece = row[lo - p * width : hi - p * width]
                    offset = lo - d["stream_start"]
                    # the first 64 tokens of the document are the canary's prompt + target
                    expect = canary[offset : offset + len(piece)]
                    assert piece[: len(expect)] == expect
                    found = True
            assert found
            checked += 1
    assert checked > 0


def test_holds_finds_a_contiguous_run_only():
    rows = np.array([[1, 2, 3, 4], [2, 1, 3, 4], [4, 3, 2, 1]])
    assert holds(rows, [2, 3]).tolist() == [True, False, False]
    assert holds(rows, [3, 4]).tolist() == [True, True, False]
    assert holds(rows, []).tolist() == holds(rows, [1, 2, 3, 4, 5]).tolist() == [False] * 3


def test_target_truth_is_the_partial_sequences_holding_the_target(nano_run):
    """Each definition from the table, checked against the sequences' own tokens: ``target`` is every
    partial sequence that holds the item's target ids, and nothing else."""
    results = nano_run["results"]
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    ground = _read(results, paths.CORPUS, paths.GROUND_TRUTH_TABLE)
    partial, complete, target = (truth_sets(ground, cands, d) for d in ("partial", "complete", "target"))
    with pytest.raises(ValueError, match="unknown truth definition 'strict'"):
        truth_sets(ground, cands, "strict")
    fragments = 0
    for item in ground.to_pylist():
        rows = partial.get(item["item_id"], np.zeros(0, dtype=np.int64))
        want = [int(p) for p in rows if _has_run(cands.tokens[p].tolist(), item["target_ids"])]
        assert target.get(item["item_id"], np.zeros(0)).tolist() == want
        if item["kind"] == "canary":  # a canary's copy holds its target: complete is within target
            assert set(complete.get(item["item_id"], [])) <= set(want)
            fragments += len(set(want) - set(complete.get(item["item_id"], [])))
    assert target and fragments > 0  # some sequences hold a canary's target without its prompt


def _has_run(row: list[int], run: list[int]) -> bool:
    return any(row[i : i + len(run)] == run for i in range(len(row) - len(run) + 1))


def test_canary_counts_and_controls(nano_run):
    ground = _read(nano_run["results"], paths.CORPUS, paths.GROUND_TRUTH_TABLE).to_pylist()
    canaries = [g for g in ground if g["kind"] == "canary"]
    profile = load_profile(str(nano_run["profile"]))
    assert {g["count"] for g in canaries} == set(profile.corpus.synthetic.canary_counts)
    assert all(len(g["prompt_ids"]) == 32 and len(g["target_ids"]) == 32 for g in canaries)
    documents = _read(nano_run["results"], paths.CORPUS, paths.DOCUMENTS_TABLE)
    for g in canaries:
        n = pc.sum(pc.equal(documents["item_id"], g["item_id"])).as_py() or 0
        assert n == g["count"]


def test_tokenizer_has_neox_specials_and_excludes_synthetic_text(nano_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(nano_run["results"] / paths.CORPUS / paths.TOKENIZER_DIR)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.convert_tokens_to_ids("<|padding|>") == 1
    # The invented occupation word never occurs in the natural text the BPE was trained on.
    assert len(tok("glimmerwright", add_special_tokens=False)["input_ids"]) > 1


def test_shipped_manifest_pins_every_artifact():
    manifest = load_manifest(paths.project_root() / "data_manifests" / "micro-pile.toml")
    for art in manifest.artifacts.values():
        assert len(art.sha256) == 64 and art.version and art.filename.startswith(art.package)
    for src in manifest.sources.values():
        assert src.artifact in manifest.artifacts


@pytest.mark.parametrize("key", ["artifact", "source"])
def test_manifest_unknown_key(tmp_path, key):
    from pythia_attribution.errors import ConfigError

    path = tmp_path / "m.toml"
    path.write_text(f'[[{key}]]\nname = "x"\nbogus = 1\n')
    with pytest.raises(ConfigError, match=r"m\.toml: unknown key '.*bogus'"):
        load_manifest(path)
