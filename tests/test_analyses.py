"""The analyses stage on nano: tokenwise scores are an exact split of the sequence's score and sit
on a planted copy of the query; layer thirds partition the modules; word-order variants are data
whose mistakes are named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pythia_attribution import paths, tables
from pythia_attribution.analyses import THIRDS, WHOLE, third_modules
from pythia_attribution.attribute import gradients
from pythia_attribution.attribute.candidates import load_candidates
from pythia_attribution.errors import ConfigError
from pythia_attribution.variants import read_variants


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def test_tokenwise_scores_sum_to_the_sequence_score(nano_run):
    results = nano_run["results"]
    tok = _read(results, paths.ANALYSES, paths.TOKENWISE_TABLE).to_pandas()
    att = _read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).to_pandas()
    assert set(tok["method"]) == {"trackstar", "trackstar_est", "grad_cosine"}
    sums = tok.groupby(["behavior_id", "method", "checkpoint", "rank"], as_index=False)["score"].sum()
    both = sums.merge(att, on=["behavior_id", "method", "checkpoint", "rank"], suffixes=("_tokens", ""))
    assert len(both) == len(sums) > 0
    np.testing.assert_allclose(both["score_tokens"], both["score"], rtol=1e-4, atol=1e-6)
    # every exhibited behavior of the final checkpoint, each method's top 3
    final = att[att["checkpoint"] == att["checkpoint"].max()]
    assert sums.groupby("method")["behavior_id"].nunique().to_dict() == {
        m: final["behavior_id"].nunique() for m in ("trackstar", "trackstar_est", "grad_cosine")
    }
    assert set(sums["rank"]) == {1, 2, 3}


@pytest.mark.parametrize("adam", [True, False], ids=["adam", "raw"])
def test_a_planted_copy_holds_most_of_its_token_influence(nano_run, tmp_path, adam):
    """A never-injected canary (64 random tokens) pasted into three sequences of unrelated text: the
    positions of the copy hold most of the sequence's score, with and without Adam normalization.
    Projected to 16 x 16 per module, as micro is: nano's 4 x 4 is too coarse to separate them."""
    results = nano_run["results"]
    ckpts = _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    ckpt = results / paths.TRAIN / ckpts[-1]["path"]
    truth = _read(results, paths.CORPUS, paths.GROUND_TRUTH_TABLE).to_pylist()
    canary = next(t for t in truth if t["item_id"].startswith("canary/") and t["count"] == 0)
    prompt, target = list(canary["prompt_ids"]), list(canary["target_ids"])
    cands = load_candidates(_read(results, paths.CORPUS, paths.CORPUS_TABLE))
    common = {"optimizer_state": ckpt / "optimizer.pt" if adam else None, "projection_dim": 16,
              "token_batch_size": 1024}  # fmt: skip
    query = gradients.build_index(
        tmp_path / "query", ckpt, [prompt + target], labels=[[-100] * len(prompt) + target], **common
    )
    copy = np.array(prompt + target)
    shares = []
    for host_row, start in ((0, 0), (40, 60), (80, 120)):
        host = np.concatenate([cands.tokens[host_row + j] for j in range(3)]).astype(np.int64)
        host[start : start + len(copy)] = copy
        name = f"{host_row}-{start}"
        whole = gradients.build_index(tmp_path / f"whole{name}", ckpt, host[None], labels=None, **common)
        parts = gradients.build_index(
            tmp_path / f"tokens{name}", ckpt, host[None], labels=None, attribute_tokens=True, **common
        )
        scorer = gradients.GradientScorer(whole, query, unit_norm=True, hessian_path=None)
        token_rows, _ = gradients.module_blocks(parts)
        per_token = scorer.parts(token_rows, scorer.gather(np.array([0]))[0]).sum(-1)[0]
        total = scorer.totals(np.array([0]))[0, 0]
        assert len(per_token) == len(host) - 1  # the last token predicts nothing
        assert per_token.sum() == pytest.approx(total, rel=1e-4, abs=1e-6)
        shares.append(per_token[start : start + len(copy)].sum() / total)
    assert min(shares) > 0.5, shares


def test_layer_thirds_partition_the_modules_and_all_matches_attribution(nano_run):
    modules = [f"layers.{i}.{m}" for i in range(6) for m in ("attention.dense", "mlp.dense_4h_to_h")]
    groups = third_modules(modules)
    assert [len(groups[t]) for t in THIRDS] == [4, 4, 4]
    assert sorted(np.concatenate([groups[t] for t in THIRDS]).tolist()) == groups[WHOLE].tolist()
    assert [modules[i] for i in groups["upper"]][0].startswith("layers.4.")
    two_layers = [f"layers.{i}.{m}" for i in range(2) for m in ("attention.dense", "mlp.dense_4h_to_h")]
    assert [third_modules(two_layers)[t].tolist() for t in THIRDS] == [[0, 1], [2], [3]]  # by module
    assert set(third_modules(["layers.0.x", "layers.1.x"])) == {"lower", "middle", WHOLE}  # no empty third

    results = nano_run["results"]
    layers = _read(results, paths.ANALYSES, paths.LAYER_THIRDS_TABLE).to_pandas()
    att = _read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).to_pandas()
    whole = layers[layers["third"] == WHOLE].merge(
        att, on=["behavior_id", "method", "checkpoint", "rank"], suffixes=("", "_attribute")
    )
    assert len(whole) == (layers["third"] == WHOLE).sum() > 0
    np.testing.assert_allclose(whole["score"], whole["score_attribute"], rtol=1e-5, atol=1e-6)
    assert set(layers["category"]) <= {"exact", "near_duplicate", "thematic", "unrelated"}
    summary = _read(results, paths.ANALYSES, paths.LAYER_THIRDS_SUMMARY_TABLE).to_pandas()
    assert set(summary["third"]) == {*THIRDS, WHOLE}  # nano's two layers: split by module


def test_word_order_covers_every_variant_and_method(nano_run):
    results = nano_run["results"]
    word = _read(results, paths.ANALYSES, paths.WORD_ORDER_TABLE).to_pandas()
    assert set(word["variant"]) == {"original", "swapped", "no_prompt", "entity_replaced", "unrelated"}
    per_item = word.groupby(["item_id", "method"])["variant"].nunique()
    assert (per_item == 5).all()
    assert set(word["kind"]) == {"insult", "bio"}
    metrics = _read(results, paths.ANALYSES, paths.WORD_ORDER_METRICS_TABLE)
    original = metrics.filter(pc.equal(metrics["variant"], "original")).to_pandas()
    np.testing.assert_allclose(original["relative"], 1.0)


def _ground_truth() -> pa.Table:
    items = [
        {
            "item_id": f"insult/{n}",
            "kind": "insult",
            "seq_idxs": [1],
            "detail": f'{{"name": "{n}", "insult": "{i}"}}',
        }
        for n, i in (("Ann Lee", "base knave"), ("Bo Ray", "proud cur"))
    ]
    return pa.Table.from_pylist(items)


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]  # one token per character: every boundary is a token boundary


def test_variants_fill_fields_and_pair_each_item_with_the_next(tmp_path):
    path = tmp_path / "word_order.toml"
    path.write_text(
        '[[variant_set]]\nitems = "insult/*"\norder = "single"\n'
        '[[variant_set.variant]]\nname = "entity_replaced"\n'
        'prompt = "{name} is a"\ntarget = " {other.insult}"\n'
        '[[variant_set.variant]]\nname = "no_prompt"\nprompt = ""\ntarget = "{insult}"\n'
    )
    queries = read_variants(path, _ground_truth(), _encode)
    replaced = {q.item_id: q.target for q in queries if q.variant == "entity_replaced"}
    assert replaced == {"insult/Ann Lee": " proud cur", "insult/Bo Ray": " base knave"}
    alone = next(q for q in queries if q.variant == "no_prompt" and q.item_id == "insult/Ann Lee")
    assert alone.prompt_ids == _encode("b") and alone.target_ids == _encode("ase knave")


# the file's own mistakes: found whether or not its items exist in this corpus (``check`` before
# the corpus stage passes no encoder); the last three were internal errors from str.format
STRUCTURE = [
    ('name = "x"\nprompt = "{name} is a"\ntarget = " "', "key 'target' is empty"),
    ('name = "x"\nprompt = "{name}"\ntarget = " {insult}"\ncolour = 1', "unknown key"),
    ('name = "x"\nprompt = "{name is a"\ntarget = " {insult}"', "expected '}' before end of string"),
    ('name = "x"\nprompt = "a } b {name}"\ntarget = " {insult}"', "Single '}' encountered"),
    ('name = "x"\nprompt = "{name!x} is a"\ntarget = " {insult}"', "unknown conversion '!x'"),
]
# mistakes that show when a template is filled with an item's fields
FILLING = [
    ('name = "x"\nprompt = "{nme} is a"\ntarget = " {insult}"', "unknown field '{nme}'"),
    ('name = "x"\nprompt = "{name:>{w}} is a"\ntarget = " {insult}"', "cannot fill .*KeyError"),
]


def _variant_file(tmp_path, items: str, variant: str):
    path = tmp_path / "word_order.toml"
    path.write_text(
        f'[[variant_set]]\nitems = "{items}"\norder = "single"\n[[variant_set.variant]]\n{variant}\n'
    )
    return path


@pytest.mark.parametrize(("variant", "message"), STRUCTURE + FILLING)
def test_a_bad_variant_is_named(tmp_path, variant, message):
    path = _variant_file(tmp_path, "insult/*", variant)
    with pytest.raises(ConfigError, match=message) as err:
        read_variants(path, _ground_truth(), _encode)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("variant", "message"), STRUCTURE)
def test_a_bad_variant_is_named_without_items_or_tokenizer(tmp_path, variant, message):
    path = _variant_file(tmp_path, "nothing/*", variant)
    with pytest.raises(ConfigError, match=message):
        read_variants(path, pa.table({}), None)


def test_methods_sharing_an_index_get_their_own_tokenwise_split(tmp_path, monkeypatch):
    """Two gradient methods over one bergson index (TrackStar without Adam state and gradient cosine
    both use the raw index): each builds its own per-token gradients, and each sequence's tokens
    still sum to that method's score (a shared work folder once left the second method reading the
    first one's tokens)."""
    from conftest import build_world, write_profile

    from pythia_attribution.cli import main

    manifest = build_world(tmp_path / "world")
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_CACHE", str(tmp_path / "world" / "cache"))
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(tmp_path / "results"))
    profile = write_profile(
        tmp_path / "profiles",
        manifest,
        **{
            'methods = ["trackstar", "trackstar_est", "grad_cosine", "ekfac", "bm25", "activation", '
            '"residual_diff", "residual_change", "random"]': (
                'methods = ["trackstar", "trackstar_noadam", "grad_cosine", "random"]'
            ),
            "finetune_min_count = 8": "finetune_min_count = 8\nfinetune_families = []",
        },
    )
    assert main(["all", "--profile", str(profile), "-q"]) == 0
    results = tmp_path / "results" / "nano"
    tok = _read(results, paths.ANALYSES, paths.TOKENWISE_TABLE).to_pandas()
    att = _read(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE).to_pandas()
    assert set(tok["method"]) == {"trackstar", "trackstar_noadam", "grad_cosine"}
    sums = tok.groupby(["behavior_id", "method", "checkpoint", "rank"], as_index=False)["score"].sum()
    both = sums.merge(att, on=["behavior_id", "method", "checkpoint", "rank"], suffixes=("_tokens", ""))
    assert len(both) == len(sums) > 0
    np.testing.assert_allclose(both["score_tokens"], both["score"], rtol=1e-4, atol=1e-6)
