"""Attribution on the nano pipeline: index layout, planted copies, skipped behaviors, metrics."""

import numpy as np
import pyarrow.compute as pc
import pytest

from pythia_attribution import paths, tables
from pythia_attribution.attribute import activations, baselines, ekfac, gradients, metrics, moments
from pythia_attribution.attribute.candidates import load_candidates


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


@pytest.fixture(scope="module")
def final_checkpoint(nano_run):
    ckpts = _read(nano_run["results"], paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    return nano_run["results"] / paths.TRAIN / ckpts[-1]["path"], ckpts[-1]["step"]


def test_index_row_is_packed_sequence(nano_run, final_checkpoint, tmp_path):
    """Row p of the training index is the gradient of packed sequence p."""
    ckpt, step = final_checkpoint
    index = nano_run["results"] / paths.ATTRIBUTE / "indexes" / f"step{step}" / "raw" / "train"
    grads = np.concatenate([gradients.module_blocks(shard)[0] for shard in gradients.shards_of(index)])
    cands = load_candidates(_read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE))
    assert len(grads) == len(cands.tokens)
    for p in (0, len(cands.tokens) // 2, len(cands.tokens) - 1):
        alone = gradients.build_index(
            tmp_path / f"one{p}",
            ckpt,
            [cands.tokens[p].tolist()],
            labels=None,
            optimizer_state=None,
            projection_dim=4,
            token_batch_size=1024,
        )
        row, _ = gradients.module_blocks(alone)
        # the same gradient up to float32's summation order (alone, against in a batch): measured
        # against the row's norm, not element by element, where an element near zero that is the
        # difference of large products can differ by 0.2% (seen once: -0.07129 against -0.07114 in
        # a row whose largest value is 21,000; the rows then differed by 1.3e-7 of their norm)
        assert np.linalg.norm(row[0] - grads[p]) <= 1e-5 * np.linalg.norm(grads[p])
        others = np.delete(grads, p, axis=0)  # and no other sequence's row comes that close
        assert np.min(np.linalg.norm(others - row[0], axis=1)) > 1e-2 * np.linalg.norm(grads[p])


def test_candidates_map_stream_positions_to_packed_rows(nano_run):
    corpus = _read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE)
    cands = load_candidates(corpus)
    ids = np.asarray(corpus["input_ids"].to_pylist())
    for seq_idx in (0, 7, len(ids) - 1):
        assert (cands.tokens[cands.packed_of([seq_idx])[0]] == ids[seq_idx]).all()
    assert (cands.first_seq_idx < len(cands.tokens)).all()  # every packed sequence occurs in epoch 0
    # the texts, read on demand from the table, are the packed sequences' (one row per packed id)
    texts = corpus["text"].to_pylist()
    expected = {}
    for row, packed in enumerate(cands.row_packed):
        expected.setdefault(int(packed), texts[row])
    in_order = [expected[p] for p in range(len(expected))]
    assert len(cands.texts) == len(expected) and list(cands.texts) == in_order
    assert cands.texts[3:9:2] == in_order[3:9:2] == cands.texts.take([3, 5, 7])
    assert list(cands.texts.subset([7, 3])) == [in_order[7], in_order[3]] and cands.texts[-1] == in_order[-1]


def _planted(nano_run):
    """The candidates, the never-injected control canaries as queries (so the planted row is the
    only copy of a query), every candidate plus a verbatim copy of each query (the last rows), and
    the copies' rows."""
    cands = load_candidates(_read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE))
    probes = _read(nano_run["results"], paths.PROBE, paths.PROBES_TABLE).to_pylist()
    picked = {p["behavior_id"]: p for p in probes if p["family"] == "memorized" and p["count"] == 0}
    queries = list(picked.values())
    assert queries
    rows = cands.tokens.tolist() + [q["prompt_ids"] + q["target_ids"] for q in queries]
    return cands, queries, rows, np.arange(len(cands.tokens), len(rows))


def test_planted_verbatim_copy_ranks_first(nano_run, final_checkpoint, tmp_path):
    """A training sequence that is a verbatim copy of the query comes first for every gradient
    method and for BM25."""
    ckpt, _ = final_checkpoint
    cands, queries, rows, planted = _planted(nano_run)
    q_rows = [q["prompt_ids"] + q["target_ids"] for q in queries]
    labels = [[-100] * len(q["prompt_ids"]) + q["target_ids"] for q in queries]
    for name, opt in (("raw", None), ("adam", ckpt)):
        common = {"optimizer_state": opt, "projection_dim": 4, "token_batch_size": 1024}
        train = gradients.build_index(tmp_path / name / "train", ckpt, rows, labels=None, **common)
        query = gradients.build_index(tmp_path / name / "queries", ckpt, q_rows, labels=labels, **common)
        hessian = gradients.autocorrelation_hessian(train, tmp_path / name / "hessian")
        for h in (None, hessian):
            scorer = gradients.GradientScorer(train, query, unit_norm=True, hessian_path=h, chunk_rows=100)
            total = np.concatenate([block for _, block in scorer.chunks()], axis=1)
            assert (total.argmax(axis=1) == planted).all(), (name, h)
    texts = list(cands.texts) + [q["prompt"] + q["target"] for q in queries]
    bm25 = baselines.BM25Scores(texts, [q["prompt"] + q["target"] for q in queries]).matrix()
    assert (bm25.argmax(axis=1) == planted).all()


def test_ekfac_ranks_a_planted_copy_first_and_is_reproducible(nano_run, final_checkpoint, tmp_path):
    """bergson's EK-FAC pipeline (factors with sampled labels, damped inverse, scoring pass) puts a
    verbatim copy of the query first, and two runs with the same seed give the same scores."""
    ckpt, _ = final_checkpoint
    _, queries, rows, planted = _planted(nano_run)
    totals = []
    for run in ("a", "b"):
        store = ekfac.scores(
            tmp_path / run, ckpt, rows, [q["prompt_ids"] for q in queries],
            [q["target_ids"] for q in queries], token_batch_size=1024, damping=0.1, seed=7, fit_rows=300,
        )  # fmt: skip
        totals.append(np.concatenate([b for _, b in ekfac.store_blocks(store, 100)], axis=1))
        assert not (tmp_path / run / "train.data").exists()
    assert totals[0].shape == (len(queries), len(rows))
    assert (totals[0].argmax(axis=1) == planted).all()
    np.testing.assert_array_equal(totals[0], totals[1])
    some = np.array([0, len(rows) - 1])
    np.testing.assert_array_equal(ekfac.store_totals(store)(some), totals[1][:, some])


def test_an_objective_index_with_bergsons_loss_is_the_query_index(nano_run, final_checkpoint, tmp_path):
    """objective_index (bergson's collector with our own scalar) gives build_index's rows exactly
    when the scalar is bergson's own loss."""
    from bergson import IndexConfig
    from bergson.collector.collector import fwd_bwd_factory

    ckpt, _ = final_checkpoint
    _, queries, _, _ = _planted(nano_run)
    prompts, targets = [q["prompt_ids"] for q in queries], [q["target_ids"] for q in queries]
    common = {"projection_dim": 4, "token_batch_size": 1024}
    ours = gradients.objective_index(
        tmp_path / "ours", ckpt, [p + t for p, t in zip(prompts, targets, strict=True)],
        [[-100] * len(p) + t for p, t in zip(prompts, targets, strict=True)], {},
        fwd_bwd_factory(IndexConfig(run_path=str(tmp_path / "unused"))), **common,
    )  # fmt: skip
    theirs = gradients.query_index(
        tmp_path / "theirs", ckpt, prompts, targets, optimizer_state=None, **common
    )
    np.testing.assert_array_equal(gradients.module_blocks(ours)[0], gradients.module_blocks(theirs)[0])


def test_the_paired_pass_writes_every_index_byte_for_byte(nano_run, final_checkpoint, tmp_path):
    """build_index_pair (one forward and backward pass) writes the index normalized by the saved
    optimizer state, the one normalized by estimated second moments and the raw index exactly as
    three build_index calls do: every file of the three folders, byte for byte."""
    ckpt, step = final_checkpoint
    cands = load_candidates(_read(nano_run["results"], paths.CORPUS, paths.CORPUS_TABLE))
    rows = cands.tokens[:40]
    common = {"projection_dim": 4, "token_batch_size": 1024}
    opt = ckpt / "optimizer.pt"
    settings = moments.Settings(batch_size=8, batches=2, seed=0, token_batch_size=1024)
    est = moments.estimate(tmp_path / moments.ESTIMATE, ckpt, cands, step, settings)
    gradients.build_index_pair(
        tmp_path / "adam", tmp_path / "raw", ckpt, rows, optimizer_state=opt,
        more={tmp_path / "adam_est": est}, **common,
    )  # fmt: skip
    for name, state in (("adam", opt), ("adam_est", est), ("raw", None)):
        alone = gradients.build_index(
            tmp_path / f"{name}-alone", ckpt, rows, labels=None, optimizer_state=state, **common
        )
        files = sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
        assert files == sorted(
            p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file()
        )
        assert "gradients.bin" in {f.name for f in files}
        for f in files:
            assert (alone / f).read_bytes() == (tmp_path / name / f).read_bytes(), f"{name}: {f} differs"
    adam, adam_est, raw = (gradients.module_blocks(tmp_path / n)[0] for n in ("adam", "adam_est", "raw"))
    # three different indexes, not one written three times
    assert not np.array_equal(adam, raw) and not np.array_equal(adam, adam_est)


def test_residual_change_is_the_first_order_change_of_the_difference(nano_run, final_checkpoint, tmp_path):
    """residual_change's score of a training row (full gradients, no projection) predicts how a
    small gradient step on that row, over the modules bergson tracks, changes
    d . (m(target) - m(control)): the sign for every row, the size up to second order."""
    import copy

    import torch

    from pythia_attribution.model import load_checkpoint

    ckpt, step = final_checkpoint
    cands, queries, _, _ = _planted(nano_run)
    queries = queries[:2]
    pool = [p for p in _read(nano_run["results"], paths.PROBE, paths.PROBES_TABLE).to_pylist()
            if p["checkpoint"] == step and p["family"] == "memorized"]  # fmt: skip
    ctrls = activations.controls(queries, pool, seed=3)
    model, _ = load_checkpoint(ckpt)
    layer = baselines.middle_layer(model.config.num_hidden_layers)
    dirs = activations.directions(model, queries, ctrls, layer)
    rows = cands.tokens[:16].tolist()
    common = {"projection_dim": 0, "token_batch_size": 1024}
    train = gradients.build_index(tmp_path / "train", ckpt, rows, labels=None, optimizer_state=None, **common)
    q = activations.change_queries(tmp_path / "q", ckpt, queries, ctrls, dirs, layer, **common)
    scorer = gradients.GradientScorer(train, q, unit_norm=False, hessian_path=None)
    predicted = np.concatenate([block for _, block in scorer.chunks()], axis=1)

    def f(m):
        prompts = [x["prompt_ids"] for x in queries]
        treat = activations.completion_means(m, prompts, [x["target_ids"] for x in queries], layer)
        control = activations.completion_means(m, prompts, [x["target_ids"] for x in ctrls], layer)
        return ((treat - control) * dirs).sum(axis=1)

    eps, before = 1e-3, f(model)
    actual = np.zeros_like(predicted)
    for j, row in enumerate(rows):
        stepped = copy.deepcopy(model)
        ids = torch.tensor([row])
        logits = stepped(input_ids=ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).backward()
        with torch.no_grad():
            for name, p in stepped.named_parameters():
                if any(name.endswith(f"{module}.weight") for module in scorer.modules):
                    p -= eps * p.grad
        actual[:, j] = f(stepped) - before
    for i in range(len(queries)):
        assert np.corrcoef(predicted[i], actual[i])[0, 1] > 0.999
        assert (np.sign(predicted[i]) == np.sign(actual[i])).all()


def test_non_exhibited_behaviors_are_skipped(nano_run, final_checkpoint):
    _, step = final_checkpoint
    results = nano_run["results"]
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE)
    final = probes.filter(pc.equal(probes["checkpoint"], step))
    shown = set(final.filter(final["exhibited"])["behavior_id"].to_pylist())
    hidden = set(final.filter(pc.invert(final["exhibited"]))["behavior_id"].to_pylist())
    assert shown and hidden
    attributions = _read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)
    assert set(attributions["behavior_id"].to_pylist()) == shown
    skipped = _read(results, paths.ATTRIBUTE, paths.SKIPPED_TABLE).to_pylist()
    assert {s["behavior_id"] for s in skipped if s["method"] is None} == hidden
    assert all("not exhibited" in s["reason"] for s in skipped if s["method"] is None)


def test_every_method_and_table_is_present(nano_run):
    results = nano_run["results"]
    attributions = _read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)
    methods = set(attributions["method"].to_pylist())
    assert methods == {
        "trackstar",
        "trackstar_est",
        "grad_cosine",
        "ekfac",
        "bm25",
        "activation",
        "residual_diff",
        "residual_change",
        "random",
    }
    layers = _read(results, paths.ATTRIBUTE, paths.LAYER_SCORES_TABLE)
    assert set(layers["method"].to_pylist()) == {
        "trackstar",
        "trackstar_est",
        "grad_cosine",
        "residual_change",
    }
    # Per-module scores add up to the total score of each top-k row.
    df = layers.to_pandas().groupby(["behavior_id", "method", "rank"])["score"].sum().reset_index()
    top = attributions.to_pandas().merge(df, on=["behavior_id", "method", "rank"], suffixes=("", "_sum"))
    np.testing.assert_allclose(top["score"], top["score_sum"], rtol=1e-4, atol=1e-5)
    summary = _read(results, paths.ATTRIBUTE, paths.SCORE_SUMMARY_TABLE)
    assert {"top1pct_share", "top10pct_share", "tail_exponent", "q0500"} <= set(summary.column_names)
    tm = _read(results, paths.ATTRIBUTE, paths.TRACING_METRICS_TABLE)
    assert set(tm["method"].to_pylist()) == methods
    row = tm.to_pylist()[0]
    assert row["mrr_lo"] <= row["mrr"] <= row["mrr_hi"]


def _bm25s_scores(texts: list[str], queries: list[str]) -> np.ndarray:
    """What the stages computed before BM25Scores: bm25s's own index over every text."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
    out = np.zeros((len(queries), len(texts)), dtype=np.float32)
    for q, query in enumerate(queries):
        words = bm25s.tokenize([query], stopwords=None, return_ids=False, show_progress=False)[0]
        known = [w for w in words if w in retriever.vocab_dict]
        if known:
            out[q] = retriever.get_scores(known)
    return out


def test_streamed_bm25_is_bm25s_bit_for_bit():
    """Chunked BM25 keeps only the query words' statistics, yet every score is the one bm25s's
    whole index gives: repeated and unknown query words, an empty text, capitals and punctuation,
    one chunk and several; ``totals`` scores any rows the same."""
    rng = np.random.default_rng(0)
    words = [f"{w}{i}" for i, w in enumerate(["Paris", "seine,", "x", "THE", "of.", "a"] * 60)]
    p = 1 / np.arange(1, len(words) + 1)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 90)), p=p / p.sum())) for _ in range(300)]
    texts[11] = ""
    queries = [" ".join(rng.choice(words, size=8, p=p / p.sum())) for _ in range(6)]
    queries += [f"{words[0]} {words[0]} {words[3]}", "nothing here matches", ""]
    expected = _bm25s_scores(texts, queries)
    for chunk_rows in (4096, 37):
        bm25 = baselines.BM25Scores(texts, queries, chunk_rows)
        got = bm25.matrix()
        assert got.dtype == np.float32 and np.array_equal(got, expected), chunk_rows
        ids = np.array([250, 3, 11, 3])
        assert np.array_equal(bm25.totals(ids), expected[:, ids])
    assert (expected[-2:] == 0).all() and expected[6].max() > 0


def test_tracing_metrics_on_a_hand_example():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    out = metrics.tracing(scores, np.array([3, 4]))
    assert out["first_hit_rank"] == 2 and out["mrr"] == 0.5
    assert out["recall_at_10"] == 1.0 and out["precision_at_10"] == 0.2 and not out["top1_hit"]


def test_concentration_of_a_flat_and_a_peaked_distribution():
    flat = metrics.concentration(np.ones(1000))
    assert flat["top1pct_share"] == pytest.approx(0.01) and flat["top10pct_share"] == pytest.approx(0.1)
    peaked = metrics.concentration(np.r_[100.0, np.full(999, 0.01)])
    assert peaked["top1pct_share"] > 0.9


def test_faiss_and_exact_topk_agree():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    top = baselines.FaissTopK(queries, 10)
    top.add(0, keys)
    ids, scores = top.result()
    exact_ids, exact_scores = baselines.topk(queries @ keys.T, 10)
    assert (ids == exact_ids).all()
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


def _attributor_scores(index, query, unit_norm, hessian):
    """The reference: bergson's own Attributor over the whole index, module by module."""
    import torch
    from bergson import Attributor

    attributor = Attributor(str(index), device="cpu", unit_norm=unit_norm, hessian_path=hessian)
    q_grads, blocks = gradients.module_blocks(query)
    per_module = []
    for name in attributor.ordered_modules:
        queries = {
            n: torch.from_numpy(np.array(q_grads[:, lo:hi], dtype=np.float32))
            for n, (lo, hi) in blocks.items()
        }
        values, indices = attributor.search(queries, k=None, modules={name})
        out = np.empty(values.shape, dtype=np.float32)
        np.put_along_axis(out, indices.numpy(), values.numpy(), axis=1)
        per_module.append(out)
    return torch.stack([torch.from_numpy(m) for m in per_module], -1).sum(-1).numpy(), per_module


@pytest.mark.parametrize(
    "index_name, hessian, unit_norm", [("adam", True, True), ("raw", False, True), ("raw", True, False)]
)
def test_streamed_gradient_scores_equal_bergsons_attributor(
    nano_run, final_checkpoint, index_name, hessian, unit_norm, tmp_path
):
    """GradientScorer (chunked, any chunk size) gives bergson's Attributor scores: TrackStar's two-sided
    Hessian with unit norm, plain cosine, and the one-sided inverse Hessian without unit norm."""
    _, step = final_checkpoint
    folder = nano_run["results"] / paths.ATTRIBUTE / "indexes" / f"step{step}" / index_name
    (shard,) = gradients.shards_of(folder / "train")
    h = folder / "hessian" if hessian else None
    if h is not None and not h.exists():  # nano's methods use no Hessian on the raw index
        h = gradients.autocorrelation_hessian(folder / "train", tmp_path / "hessian")
    reference, per_module = _attributor_scores(shard, folder / "queries", unit_norm, h)
    for chunk in (100_000, 37):
        scorer = gradients.GradientScorer(
            folder / "train", folder / "queries", unit_norm=unit_norm, hessian_path=h, chunk_rows=chunk
        )
        total = np.concatenate([block for _, block in scorer.chunks()], axis=1)
        if chunk >= scorer.n_rows:  # one chunk: bergson's arithmetic exactly
            assert (total == reference).all()
        np.testing.assert_allclose(total, reference, rtol=1e-5, atol=1e-6)
        rows = np.array([0, 5, scorer.n_rows - 1])
        np.testing.assert_allclose(scorer.totals(rows), reference[:, rows], rtol=1e-5, atol=1e-6)
        for (name, got), want in zip(scorer.per_module(rows).items(), per_module, strict=True):
            np.testing.assert_allclose(got, want[:, rows], rtol=1e-5, atol=1e-6, err_msg=name)


def test_streamed_hessian_equals_one_product(nano_run, final_checkpoint, tmp_path):
    """The autocorrelation Hessian summed over chunks equals the one-product Hessian."""
    import torch

    _, step = final_checkpoint
    train = nano_run["results"] / paths.ATTRIBUTE / "indexes" / f"step{step}" / "raw" / "train"
    whole = gradients.autocorrelation_hessian(train, tmp_path / "whole", chunk_rows=10**9)
    chunked = gradients.autocorrelation_hessian(train, tmp_path / "chunked", chunk_rows=37)
    a, b = (torch.load(p / "hessians.pth", weights_only=True) for p in (whole, chunked))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
