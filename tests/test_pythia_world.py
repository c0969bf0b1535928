"""The real-scale sources on the fixture world: Megatron shards read by byte range, Hub checkpoints
at pinned commits, memorized-evals, and the whole pipeline and paper through them, offline."""

from __future__ import annotations

import fnmatch
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from pythia_attribution import paths, tables
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.cli import main
from pythia_attribution.config import load_profile
from pythia_attribution.errors import ChecksumError, ConfigError
from pythia_attribution.sources import hub
from pythia_attribution.sources import manifest as pins
from pythia_attribution.sources.pile import PreshuffledPile, contiguous_runs, write_megatron

WIDTH = 2049


def _dataset(folder, n=10, shard_bytes=4 * 2 * WIDTH + 1233, seed=0):
    """n random sequences in Megatron layout, two shards; shard 0 ends mid-sequence and mid-token."""
    seqs = np.random.default_rng(seed).integers(0, 50_277, size=(n, WIDTH), dtype=np.uint16)
    write_megatron(folder, seqs, 2, shard_bytes=shard_bytes)
    files = {p.name: pins.FileEntry(p.stat().st_size) for p in folder.iterdir()}
    return seqs, pins.RepoPins("fixture/data", "", files)


def test_reader_returns_the_written_tokens_across_the_shard_boundary(tmp_path):
    seqs, repo = _dataset(tmp_path / "data")
    pile = PreshuffledPile(str(tmp_path / "data"), repo, WIDTH, tmp_path / "cache")
    assert pile.n_sequences == 10
    assert (tmp_path / "data" / "document-00000-of-00001.bin").stat().st_size % (2 * WIDTH) != 0
    for i in (0, 4, 5, 9):  # start, the straddling sequence, middle, end
        assert np.array_equal(pile.read_run(i, i + 1)[0], seqs[i]), i
    assert np.array_equal(pile.read([9, 0, 4, 3]), seqs[[9, 0, 4, 3]])
    assert np.array_equal(pile.read_run(0, 10), seqs)


def test_reader_fetches_each_sequence_once_and_resumes_from_its_cache(tmp_path, monkeypatch):
    seqs, repo = _dataset(tmp_path / "data")
    pile = PreshuffledPile(str(tmp_path / "data"), repo, WIDTH, tmp_path / "cache")
    fetched = []
    real = pile.read_run
    monkeypatch.setattr(pile, "read_run", lambda a, b: fetched.append((a, b)) or real(a, b))
    pile.read([1, 2, 3, 7], chunk=4)
    assert fetched == [(1, 4), (7, 8)]  # one ranged read per contiguous run
    fetched.clear()
    assert np.array_equal(pile.read([2, 7, 8], chunk=4), seqs[[2, 7, 8]])
    assert fetched == [(8, 9)]  # only what the cache lacks
    assert contiguous_runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]


def test_threaded_fetch_reads_each_run_once_yields_in_order_and_raises_a_workers_error(tmp_path, monkeypatch):
    seqs, repo = _dataset(tmp_path / "data", n=40)
    pile = PreshuffledPile(str(tmp_path / "data"), repo, WIDTH, tmp_path / "cache", threads=4)
    fetched = []
    real = pile.read_run
    monkeypatch.setattr(pile, "read_run", lambda a, b: fetched.append((a, b)) or real(a, b))
    wanted = np.array([0, 1, 5, 9, 10, 11, 17, 22, 23, 30, 39])
    got = list(pile.chunks(wanted, chunk=4))
    assert [start for start, _ in got] == [0, 2, 3, 6, 7, 9, 10]  # one per chunk of 4 seq_idxs, in order
    assert np.array_equal(np.concatenate([tokens for _, tokens in got]), seqs[wanted])
    assert sorted(fetched) == [(0, 2), (5, 6), (9, 12), (17, 18), (22, 24), (30, 31), (39, 40)]
    fetched.clear()
    assert np.array_equal(pile.read(wanted[::-1], chunk=4), seqs[wanted[::-1]]) and fetched == []

    def failing(a, b):
        if a <= 25 < b:
            raise ChecksumError("fixture/data/document-00001-of-00001.bin: short read")
        return real(a, b)

    monkeypatch.setattr(pile, "read_run", failing)
    with pytest.raises(ChecksumError, match="short read"):
        list(pile.chunks(np.array([24, 25, 33]), chunk=4))
    assert not any("chunk-000000006" in p.name for p in pile.cache.iterdir())  # nothing half-written


def test_corpus_table_streams_the_sequences_into_one_record_batch(tmp_path):
    """The corpus stage's table, built a fetch chunk at a time through files, is what reading every
    sequence and decoding it whole gives, and is written as one batch whose token ids read zero-copy."""
    from pythia_attribution.corpus.build import train_tokenizer
    from pythia_attribution.sources.pile import corpus_table

    text = "Ünïcode wörds, ünd plain ones: the capital of Peru is Lima. " * 200
    tokenizer = train_tokenizer([text], 300)
    base = np.asarray(tokenizer(text)["input_ids"][:WIDTH], dtype=np.uint16)
    assert len(base) == WIDTH
    seqs = np.stack([np.roll(base, i) for i in range(12)])  # token boundaries cut multi-byte characters
    write_megatron(tmp_path / "data", seqs, 2, shard_bytes=5 * 2 * WIDTH + 77)
    files = {p.name: pins.FileEntry(p.stat().st_size) for p in (tmp_path / "data").iterdir()}
    pile = PreshuffledPile(
        str(tmp_path / "data"), pins.RepoPins("fixture/data", "", files), WIDTH, tmp_path / "c"
    )
    chosen = np.array([0, 1, 2, 5, 6, 9, 11])  # chunks of 4: {0, 1, 2}, {5, 6}, {9, 11}
    table = corpus_table(pile, chosen, tokenizer, batch=4, chunk=4, scratch=tmp_path / "scratch")
    tables.write_table(tmp_path / "corpus.arrow", table, {})
    del table
    shutil.rmtree(tmp_path / "scratch")
    with pa.memory_map(str(tmp_path / "corpus.arrow")) as source:
        reader = ipc.open_file(source)
        assert reader.num_record_batches == 1
        got = reader.read_all()
    tokens = got["input_ids"].chunk(0).flatten().to_numpy(zero_copy_only=True).reshape(-1, WIDTH)
    assert np.array_equal(tokens, seqs[chosen])
    assert got["text"].to_pylist() == tokenizer.batch_decode(seqs[chosen].tolist(), skip_special_tokens=False)
    assert "Ünïcode" in got["text"][0].as_py()  # offsets count bytes, not characters
    assert got["step"].to_pylist() == (chosen // 4).tolist()
    assert got["packed_id"].to_pylist() == list(range(len(chosen)))
    assert got["doc_ids"].to_pylist() == [[]] * len(chosen)
    assert got["sources"].to_pylist() == [["pile"]] * len(chosen)


def test_truncated_shard_and_bad_index_stop_naming_the_file(tmp_path):
    _, repo = _dataset(tmp_path / "data")
    shard = tmp_path / "data" / "document-00001-of-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="document-00001-of-00001.bin.*truncated"):
        PreshuffledPile(str(tmp_path / "data"), repo, WIDTH, tmp_path / "cache")
    _, repo = _dataset(tmp_path / "other")
    idx = tmp_path / "other" / "document.idx"
    idx.write_bytes(b"NOTMEGA!!" + idx.read_bytes()[9:])
    with pytest.raises(ChecksumError, match="document.idx: not a Megatron"):
        PreshuffledPile(str(tmp_path / "other"), repo, WIDTH, tmp_path / "cache")


def test_unreadable_hub_manifest_is_one_line_naming_the_file(tmp_path):
    """Missing (pin it), malformed, not UTF-8, a folder: each a ConfigError naming the file and the
    problem, as for every other TOML file the project reads."""
    cases = {
        "missing.toml": (None, "no Hub manifest; run `nox -s pin"),
        "broken.toml": (b"[model\n", "malformed TOML"),
        "latin.toml": (b'[model]\nrepo = "caf\xe9"\n', "not UTF-8 .*byte 0xe9 on line 2"),
        "folder.toml": ("dir", "cannot read"),
    }
    for name, (content, rule) in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(ConfigError, match=f"{name}: {rule}"):
            pins.load(path)


@pytest.fixture(scope="session")
def pythia_run(tmp_path_factory):
    """The fixture world built and run through every stage, once for the session."""
    root = tmp_path_factory.mktemp("pythia")
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(root / "results"))
    mp.setenv("PYTHIA_ATTRIBUTION_CACHE", str(root / "cache"))
    try:
        assert main(["all", "--profile", "pythia-fixture", "-q"]) == 0
    finally:  # the tests that follow in this process keep their own (nano's) folders
        mp.undo()
    return {
        "root": root,
        "results": root / "results" / "pythia-fixture",
        "profile": load_profile("pythia-fixture"),
    }


@pytest.fixture
def pythia(pythia_run, monkeypatch):
    """The fixture world's run, with the environment pointing at it (other session fixtures move it)."""
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(pythia_run["root"] / "results"))
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_CACHE", str(pythia_run["root"] / "cache"))
    return pythia_run


def _shape(schema):
    """A schema without metadata and with fixed-size lists' lengths left out (seq_len differs)."""
    fields = []
    for f in schema.remove_metadata():
        t = f.type
        fields.append(
            (f.name, f"fixed_size_list<{t.value_type}>" if isinstance(t, pa.FixedSizeListType) else str(t))
        )
    return fields


def _read(results, stage, table):
    return tables.read_table(paths.table_path(results / stage, table))


def test_fixture_world_runs_every_stage_with_micros_schemas(nano_run, pythia):
    pythia_run = pythia
    """Same stages, same tables, same schemas (metadata aside) as the micro-shaped nano run."""
    compared = 0
    for stage in paths.STAGES:
        nano_tables = sorted((nano_run["results"] / stage).glob("*.arrow"))
        assert nano_tables
        for path in nano_tables:
            ours = pythia_run["results"] / stage / path.name
            assert ours.is_file(), f"{stage}/{path.name} missing in the fixture world"
            with ipc.open_file(str(path)) as a, ipc.open_file(str(ours)) as b:
                assert _shape(a.schema) == _shape(b.schema), f"{stage}/{path.name}"
            compared += 1
    assert compared >= 20
    # a second run is a no-op: every stage current
    assert main(["all", "--profile", "pythia-fixture", "-q"]) == 0


def test_tail_patch_steps_with_an_estimated_state_where_none_was_saved(pythia):
    """The Hub's checkpoints carry no optimizer state, as Pythia's do not: tail-patch steps with
    estimated second moments (causal.optimizer_state) and measures every method's top k."""
    results = pythia["results"]
    final = max(_read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE)["step"].to_pylist())
    assert not (results / paths.TRAIN / f"checkpoints/step{final}" / "optimizer.pt").exists()
    table = _read(results, paths.CAUSAL, paths.TAIL_PATCH_TABLE)
    attributed = set(_read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)["method"].to_pylist())
    assert table.num_rows and set(table["method"].to_pylist()) == attributed  # no ground truth here
    how = tables.provenance(paths.table_path(results / paths.CAUSAL, paths.TAIL_PATCH_TABLE))["step"]
    assert "second moments estimated from the last" in how and "a zero first moment" in how, how
    assert np.isfinite(table["effect"].to_numpy()).all()


def test_select_and_fine_tune_runs_on_the_exhibited_behaviors_without_a_reference(pythia):
    """causal.finetune_set = 'exhibited': the family's behaviors exhibited at the final checkpoint,
    fine-tuned from an earlier pinned checkpoint; with no planted items there is no ground-truth
    selection and the copies among a selection are unknown (null), not zero."""
    results = pythia["results"]
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE).to_pandas()
    final = probes["checkpoint"].max()
    final_rows = probes[probes["checkpoint"] == final]
    exhibited = final_rows[final_rows["exhibited"] & (final_rows["family"] == "factual")]
    table = _read(results, paths.CAUSAL, paths.FINETUNE_TABLE).to_pandas()
    assert len(exhibited) and set(table["behavior_id"]) == set(exhibited["behavior_id"])
    assert set(table["prompt_kind"]) == {"original"} and "ground_truth" not in set(table["method"])
    assert {"random", "trackstar_est", "bm25"} <= set(table["method"])
    assert table["n_selected_truth"].isna().all() and (table["n_selected"] == 10).all()
    assert table["from_step"].max() < max(pythia["profile"].train.hub_steps)  # an earlier checkpoint
    assert np.isfinite(table["delta_logp"].to_numpy()).all()


def test_corpus_rows_are_the_shards_bytes(pythia):
    pythia_run = pythia
    profile = pythia_run["profile"]
    corpus = _read(pythia_run["results"], paths.CORPUS, paths.CORPUS_TABLE)
    manifest = hub.world_manifest(profile)
    snap = hub.snapshot(profile, manifest.dataset.repo, manifest.dataset.commit, "dataset")
    shards = sorted(snap.glob("document-*.bin"))
    assert len(shards) == 2
    stream = np.frombuffer(b"".join(p.read_bytes() for p in shards), dtype="<u2").reshape(-1, WIDTH)
    seq = corpus["seq_idx"].to_numpy()
    tokens = np.asarray(corpus["input_ids"].combine_chunks().flatten().to_numpy()).reshape(-1, WIDTH)
    assert np.array_equal(tokens, stream[seq])
    boundary = shards[0].stat().st_size // (2 * WIDTH)
    assert boundary in seq  # the straddling sequence is a candidate (selected steps cover it)
    batch = profile.corpus.batch_size
    assert (corpus["step"].to_numpy() == seq // batch).all()
    assert not (pythia_run["results"] / paths.CORPUS / "scratch").exists()  # the stage removed its files
    # one record batch: the candidates' token rows are the memory-mapped file's pages, not a copy
    cands = load_candidates(corpus)
    assert corpus["input_ids"].num_chunks == 1 and np.array_equal(cands.tokens, tokens)
    values = corpus["input_ids"].chunk(0).values
    assert cands.tokens.__array_interface__["data"][0] == values.buffers()[1].address
    # the memorized-evals sample is in the candidates
    split = _read(pythia_run["results"], paths.MEMORIZATION, paths.EVALS_RESCORE_TABLE)
    assert len(split) > 0 and np.isin(split["seq_idx"].to_numpy(), seq).any()
    # and every listed candidate's tokens were checked against the split's, in both stages
    results = pythia_run["results"]
    listed = tables.provenance(paths.table_path(results / paths.MEMORIZATION, paths.EVALS_RESCORE_TABLE))
    checked = tables.provenance(paths.table_path(results / paths.CORPUS, paths.CORPUS_TABLE))["summary"]
    assert checked["evals_tokens_checked"] >= profile.corpus.pile.memorized
    assert listed["candidates_listed_tokens_match"] == listed["candidates_listed"] > 0


def test_a_memorized_split_from_another_ordering_stops():
    """The split's ``index`` must name our training sequences: its stored first tokens are checked
    against each listed candidate's own, and one disagreement stops naming the sequence."""
    from pythia_attribution.sources.memorized_evals import check_tokens

    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 50_000, size=(6, 2049)).astype(np.uint16)
    seq_idxs = np.array([3, 5, 9, 12, 20, 31])
    split = pa.table(
        {"index": [5, 12, 40], "tokens": [tokens[1, :64].tolist(), tokens[3, :64].tolist(), [7] * 64]}
    )
    assert check_tokens(split, seq_idxs, tokens, np.arange(6), "evals") == 2
    # rows may be any permutation of the sequences (packed ids at micro scale)
    perm = np.array([5, 4, 3, 2, 1, 0])
    assert check_tokens(split, seq_idxs, tokens[perm], np.argsort(perm), "evals") == 2
    assert check_tokens(split, np.array([1, 2]), tokens[:2], np.arange(2), "evals") == 0
    shifted = split.set_column(
        1, "tokens", pa.array([tokens[2, :64].tolist(), tokens[3, :64].tolist(), [7] * 64])
    )
    with pytest.raises(
        ChecksumError, match=r"^evals: the split lists training sequence 5 with .* \(1 of 2 listed"
    ):
        check_tokens(shifted, seq_idxs, tokens, np.arange(6), "evals")


def test_checkpoints_are_the_pinned_commits(pythia):
    pythia_run = pythia
    profile = pythia_run["profile"]
    ckpts = _read(pythia_run["results"], paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    cache = paths.expand(profile.world.hub_cache, profile.name)
    refs = cache / f"models--{profile.world.model_repo.replace('/', '--')}" / "refs"
    assert [c["step"] for c in ckpts] == profile.train.hub_steps
    for c in ckpts:
        assert c["commit"] == (refs / c["revision"]).read_text()
        assert c["path"].endswith(c["commit"]) and not c["has_optimizer_state"]
    # TrackStar proper is skipped for want of an optimizer state; its variant without it ran
    skipped = _read(pythia_run["results"], paths.ATTRIBUTE, paths.SKIPPED_TABLE).to_pylist()
    assert any(r["method"] == "trackstar" and "optimizer state" in r["reason"] for r in skipped)
    methods = set(
        _read(pythia_run["results"], paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)["method"].to_pylist()
    )
    assert {"trackstar_noadam", "trackstar_est", "ekfac"} <= methods and "trackstar" not in methods
    memorized = _read(pythia_run["results"], paths.MEMORIZATION, paths.MEMORIZED_ATTRIBUTION_TABLE)
    assert {"trackstar_est", "trackstar_noadam"} <= set(memorized["method"].to_pylist())


def test_unknown_revision_and_wrong_sha256_stop_naming_the_artifact(pythia, capsys):
    pythia_run = pythia
    profile = pythia_run["profile"]
    with pytest.raises(ConfigError, match="revision 'step7' of fixture/pythia-tiny-deduped is not pinned"):
        hub.checkpoint(profile, 7)
    cache = str(paths.expand(profile.world.hub_cache, profile.name))
    with pytest.raises(ConfigError, match="no revision named 'step7'"):
        pins.resolve_refs(pins.Hub(cache, True), profile.world.model_repo, ["step7"])

    manifest = paths.expand(profile.world.manifest, profile.name)
    original = manifest.read_text()
    weights = pins.load(manifest).revisions["step128"].weights_sha256
    train_dir = pythia_run["results"] / paths.TRAIN
    before = (train_dir / "checkpoints.arrow").read_bytes()
    try:
        manifest.write_text(original.replace(weights, "0" * 64))
        assert main(["train", "--profile", "pythia-fixture", "--force", "-q"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1  # one line, no traceback
        assert "fixture/pythia-tiny-deduped@step128" in errors[0] and "model.safetensors" in errors[0]
    finally:
        manifest.write_text(original)
    # nothing half-written: the previous outputs are intact and no partial folder is left
    assert (train_dir / "checkpoints.arrow").read_bytes() == before
    assert not paths.partial_dir("pythia-fixture", paths.TRAIN).exists()


def _world_cache_copy(pythia, tmp_path):
    """A copy of the fixture world's Hub cache and the model's snapshot folder per revision."""
    profile = pythia["profile"]
    cache = tmp_path / "hub"
    shutil.copytree(paths.expand(profile.world.hub_cache, profile.name), cache)
    model = cache / f"models--{profile.world.model_repo.replace('/', '--')}"
    snaps = {ref.name: model / "snapshots" / ref.read_text() for ref in (model / "refs").iterdir()}
    return profile, cache, snaps


def test_pin_stops_when_two_revisions_serve_the_same_weights(pythia, tmp_path):
    """A step branch serving another step's weights (EleutherAI/pythia#205's early branches serving
    the final checkpoint) is caught by its sha256 before a manifest is written, and a manifest that
    pins such revisions is refused wherever it is read."""
    profile, cache, snaps = _world_cache_copy(pythia, tmp_path)
    names = ["step0", "step32", "step64", "step128"]
    shutil.copy(snaps["step128"] / "model.safetensors", snaps["step32"] / "model.safetensors")
    with pytest.raises(ConfigError) as err:
        pins.pin_world(profile.world, pins.Hub(str(cache), True), names, "document*", "")
    message = str(err.value)
    repo = profile.world.model_repo
    assert message.startswith(f"revisions step32, step128 of {repo} serve the same"), message
    assert "pythia#205" in message and "train.hub_steps" in message
    # the untouched cache pins the same revisions without complaint
    original = paths.expand(profile.world.hub_cache, profile.name)
    pins.pin_world(profile.world, pins.Hub(str(original), True), names, "document*", "")

    manifest = paths.expand(profile.world.manifest, profile.name)
    revisions = pins.load(manifest).revisions
    edited = tmp_path / "manifest.toml"
    edited.write_text(
        manifest.read_text().replace(revisions["step32"].weights_sha256, revisions["step128"].weights_sha256)
    )
    with pytest.raises(ConfigError, match=f"^{edited}: revisions step32, step128 of {repo} serve"):
        pins.load(edited)


SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
EVALS_SPLITS = [
    *(f"{kind}.{size}" for kind in ("duped", "deduped") for size in SIZES),
    *(f"{kind}.12b.{step}" for kind in ("duped", "deduped") for step in range(23000, 123001, 20000)),
    "deduped.1b.new",
]


@pytest.mark.parametrize(
    "layout",
    ["data/{split}-00000-of-00002-0a1b2c3d4e5f6789.parquet", "data/{split}-00001-of-00002.parquet",
     "{split}.parquet", "{split}/train-00000-of-00001.parquet"],
)  # fmt: skip
def test_pin_takes_exactly_the_memorized_evals_split_files(layout):
    """Every split of EleutherAI/pythia-memorized-evals (the reference's list) selects its own file
    and no other, in each of the Hub's parquet layouts, although many split names contain others
    (``duped.70m`` in ``deduped.70m``, ``deduped.1b`` in ``deduped.1b.new``, ``duped.12b`` in
    ``duped.12b.23000``): a substring match would pin, and load, several splits as one."""
    files = [layout.format(split=s) for s in EVALS_SPLITS] + ["README.md", "data/duped.70m.json"]
    for split in EVALS_SPLITS:
        assert [f for f in files if pins.in_split(f, split)] == [layout.format(split=split)], split


def test_pin_names_a_revision_without_safetensors_weights(pythia, tmp_path):
    profile, cache, snaps = _world_cache_copy(pythia, tmp_path)
    (snaps["step64"] / "model.safetensors").unlink()
    missing = r"fixture/pythia-tiny-deduped@step64 \([0-9a-f]{12}\): no model\.safetensors"
    with pytest.raises(ConfigError, match=missing):
        pins.pin_world(profile.world, pins.Hub(str(cache), True), ["step0", "step64"], "document*", "")


def test_online_pin_hashes_a_file_the_hub_keeps_outside_lfs(pythia, monkeypatch):
    """Online, the Hub reports a sha256 only for LFS files; one kept in git itself is downloaded
    (here: found in the cache at its commit, so nothing leaves the machine) and hashed, so its pin
    is never size-only. The Hub's reply is the one thing stood in for: its two shapes, real values."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    profile = pythia["profile"]
    cache = paths.expand(profile.world.hub_cache, profile.name)
    repo = profile.world.dataset_repo
    commit = pins.resolve_refs(pins.Hub(str(cache), True), repo, ["main"], "dataset")["main"]
    names = pins._list_files(
        pins.Hub(str(cache), True), repo, commit, lambda n: fnmatch.fnmatch(n, "document*"), "dataset"
    )
    truth = pins._file_pins(pins.Hub(str(cache), True), repo, commit, names, "dataset")
    lfs, plain = names[0], names[-1]
    assert lfs != plain

    def reply(self, repo_id, paths, repo_type=None, revision=None):
        assert (repo_id, repo_type, revision) == (repo, "dataset", commit)
        return [
            RepoFile(
                path=name,
                size=truth[name].size,
                oid="0" * 40,
                lfs={"size": truth[name].size, "oid": truth[name].sha256, "pointerSize": 134}
                if name == lfs
                else None,
            )
            for name in paths
        ]

    monkeypatch.setattr(HfApi, "get_paths_info", reply)
    online = pins._file_pins(pins.Hub(str(cache), False), repo, commit, [plain, lfs], "dataset")
    assert list(online) == [plain, lfs]
    assert online == {plain: truth[plain], lfs: truth[lfs]}
    assert len(online[plain].sha256) == 64


def test_pin_rewrites_the_same_manifest_from_the_cache(pythia):
    pythia_run = pythia
    profile = pythia_run["profile"]
    manifest = paths.expand(profile.world.manifest, profile.name)
    original = manifest.read_text()
    shutil.copy(manifest, manifest.with_suffix(".bak"))
    assert main(["pin", "--profile", "pythia-fixture", "-q"]) == 0
    assert manifest.read_text() == original


def test_paper_builds_from_the_fixture_worlds_tables(pythia, tmp_path):
    """The manuscript renders from real-scale-shaped tables; what they lack is listed, not invented."""
    from pythia_attribution.paper import build

    folder = tmp_path / "paper"
    folder.mkdir()
    for name in build.SOURCES:
        shutil.copy(paths.project_root() / "paper" / name, folder / name)
    values = build.assets("pythia-fixture", folder, results=pythia["results"])
    html, pdf = build.preview(folder, values)
    # the Pile's world is reported by its own manuscript, with every number it quotes computed
    assert values["build"]["manuscript"] == "pythia.qmd" and pdf.name == "pythia.pdf"
    page = html.read_text()
    assert pdf.read_bytes().startswith(b"%PDF") and "{{<" not in page and "n/a" not in page
    used = {
        m.group(2)
        for m in build.SHORTCODE.finditer((folder / "pythia.qmd").read_text())
        if m.group(1) == "var"
    }
    missing = sorted(used & set(values.get("unavailable", {})))
    assert not missing, missing  # (micro's sections, which pythia.qmd does not quote, may be absent)
    assert values["build"]["profile"] == "pythia-fixture"
    world = values["world"]
    assert world["model_repo"] == pythia["profile"].world.model_repo and world["layers"] == "2"
    assert world["n_checkpoints"] == str(len(pythia["profile"].train.hub_steps))
    assert "the first tokens of all" in world["evals"] and "Table 1:" in page
    # where the score sits: without a saved optimizer state TrackStar runs with an estimated one,
    # and the tokens and layer-thirds views show that variant
    where = values["where"]
    assert where["method"] == "TrackStar with estimated Adam state" and "Where the score sits" in page
    assert where["n_behaviors"] == world["exhibited_final"]
    assert "fine-tuned from step" in world["finetune"]["sentences"] and "Table 4:" in page


def test_explorer_says_where_the_world_has_no_ground_truth(pythia, tmp_path):
    """The Pile's world has no planted items: the explorer's tracing and word-order sections say
    so instead of showing empty tables, undefined values read n/a, and the behaviors' listing has
    no ground-truth column; every behavior still has its page."""
    from pythia_attribution.explorer import NO_TRUTH, build

    out = build(pythia["results"], tmp_path / "explorer")
    index = (out / "index.html").read_text()
    assert index.count(NO_TRUTH) == 2  # tracing, word order
    assert "TrackStar top-1" not in index and ">nan<" not in index and "n/a" in index
    assert "ground_truth: the behavior's own complete copies" not in index  # no reference row
    exhibited = _read(pythia["results"], paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)["behavior_id"]
    assert len(list((out / "behavior").glob("*.html"))) == len(set(exhibited.to_pylist())) > 0
