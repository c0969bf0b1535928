"""The nano pipeline end to end: corpus -> train -> probe, then a second run that is a no-op."""

import dataclasses
import json
import logging
import re

import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from pythia_attribution import paths, stage, tables
from pythia_attribution.cli import main, run_summary
from pythia_attribution.config import load_profile
from pythia_attribution.train import checkpoint_steps, lr_at, param_groups


def _read(results, stage_name, table):
    return tables.read_table(paths.table_path(results / stage_name, table))


def test_every_table_carries_provenance(nano_run):
    for stage_name, table in [
        (paths.CORPUS, paths.CORPUS_TABLE),
        (paths.CORPUS, paths.GROUND_TRUTH_TABLE),
        (paths.TRAIN, paths.TRAINING_LOG_TABLE),
        (paths.TRAIN, paths.CHECKPOINTS_TABLE),
        (paths.PROBE, paths.PROBES_TABLE),
        (paths.PROBE, paths.PROBE_SUMMARY_TABLE),
    ]:
        prov = tables.provenance(paths.table_path(nano_run["results"] / stage_name, table))
        assert prov["stage"] == stage_name and prov["profile"] == "nano"
        assert len(prov["fingerprint"]) == 64 and prov["versions"]["torch"].startswith("2.13")
        assert "git_commit" in prov
        if stage_name != paths.CORPUS:
            assert paths.CORPUS in prov["inputs"]


def test_checkpoints_load_and_follow_the_schedule(nano_run):
    results = nano_run["results"]
    profile = load_profile(str(nano_run["profile"]))
    ckpts = _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    n_steps = max(c["step"] for c in ckpts)
    assert [c["step"] for c in ckpts] == checkpoint_steps(profile.train, n_steps)
    final = results / paths.TRAIN / ckpts[-1]["path"]
    model = GPTNeoXForCausalLM.from_pretrained(final)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert model.config.use_parallel_residual and not model.config.tie_word_embeddings
    state = torch.load(final / "optimizer.pt", weights_only=False)
    names = {e["param_name"] for e in state["state"].values()}
    assert names == {n for n, _ in model.named_parameters()}
    assert all("exp_avg_sq" in e for e in state["state"].values())


def test_step1_is_exactly_one_step_on_the_first_batch(nano_run):
    """Training follows corpus.arrow's order: redo step 1 by hand from step0 and compare."""
    results = nano_run["results"]
    profile = load_profile(str(nano_run["profile"]))
    corpus = _read(results, paths.CORPUS, paths.CORPUS_TABLE)
    batch_size = profile.corpus.batch_size
    ids = torch.tensor(corpus.slice(0, batch_size)["input_ids"].to_pylist())
    model = GPTNeoXForCausalLM.from_pretrained(results / paths.TRAIN / "checkpoints" / "step0")
    n_steps = len(corpus) // batch_size
    cfg = profile.train
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(cfg, 0, n_steps),
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    torch.set_num_threads(profile.runtime.threads)
    logits = model(input_ids=ids[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    trained = GPTNeoXForCausalLM.from_pretrained(results / paths.TRAIN / "checkpoints" / "step1")
    for (name, a), (_, b) in zip(model.named_parameters(), trained.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_training_log(nano_run):
    log = _read(nano_run["results"], paths.TRAIN, paths.TRAINING_LOG_TABLE)
    assert set(log.column_names) >= {"step", "loss", "lr", "tokens_per_s"}
    losses = log["loss"].to_pylist()
    assert losses[-1] < losses[0]


def test_probes_cover_every_behavior_and_checkpoint(nano_run):
    results = nano_run["results"]
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE)
    ckpts = _read(results, paths.TRAIN, paths.CHECKPOINTS_TABLE)
    n_behaviors = len(set(probes["behavior_id"].to_pylist()))
    assert len(probes) == n_behaviors * len(ckpts)
    assert set(probes["family"].to_pylist()) == {
        "factual",
        "fictional_fact",
        "memorized",
        "stereotype",
        "toxic",
        "style",
    }
    # Greedy generation and the teacher-forced argmax decide "exhibited" identically.
    assert probes["exhibited"].to_pylist() == probes["exhibited_teacher_forced"].to_pylist()
    ranks = probes["first_token_rank"].to_numpy()
    assert ranks.min() >= 1
    # Exhibited implies the first target token is the argmax.
    exhibited = probes["exhibited"].to_numpy(zero_copy_only=False)
    assert (ranks[exhibited] == 1).all()
    for row in probes.filter(probes["exhibited"]).to_pylist():
        assert row["completion"].startswith(row["target"]), row["behavior_id"]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_second_run_is_a_noop(nano_run):
    before = {p: p.stat().st_mtime_ns for p in nano_run["results"].rglob("*") if p.is_file()}
    logged = _Lines()
    logger = logging.getLogger("pythia_attribution")
    logger.addHandler(logged)
    try:
        assert main(["all", "--profile", str(nano_run["profile"])]) == 0
    finally:
        logger.removeHandler(logged)
    after = {p: p.stat().st_mtime_ns for p in nano_run["results"].rglob("*") if p.is_file()}
    assert before == after
    # the closing line says so: nothing ran, every stage up to date, and where the tables are
    (summary,) = [line for line in logged.lines if line.startswith("all: ")]
    n = len(paths.STAGES)
    where = re.escape(str(nano_run["results"]))
    expected = rf"all: {n} stages of profile nano in \d+ s: 0 ran; {n} up to date -> {where}"
    assert re.fullmatch(expected, summary), summary


def test_run_summary_names_what_ran_and_what_was_current():
    line = run_summary("micro", ("corpus", "train", "probe"), {"train": 261.36, "probe": 19.5}, 282.4)
    assert line.startswith("all: 3 stages of profile micro in 282 s: 2 ran (train 261 s, probe 20 s); ")
    assert "1 up to date (corpus) -> " in line
    # a record without its seconds (an older version's) is named without them
    line = run_summary("micro", ("corpus", "train"), {"corpus": None, "train": 1.0}, 7.0)
    assert line.split(" -> ")[0] == "all: 2 stages of profile micro in 7 s: 2 ran (corpus, train 1 s)"


def test_config_change_invalidates_downstream(nano_run):
    profile = load_profile(str(nano_run["profile"]))
    assert stage.is_current(profile, paths.TRAIN)
    changed = dataclasses.replace(profile, train=dataclasses.replace(profile.train, lr=profile.train.lr / 2))
    assert not stage.is_current(changed, paths.TRAIN)
    record = json.loads((nano_run["results"] / paths.TRAIN / paths.STAGE_RECORD).read_text())
    upstream = stage.read_record("nano", paths.CORPUS)["outputs"]
    assert record["inputs"][paths.CORPUS] == {rel: entry["digest"] for rel, entry in upstream.items()}


def test_summary_matches_probes(nano_run):
    results = nano_run["results"]
    probes = _read(results, paths.PROBE, paths.PROBES_TABLE)
    summary = _read(results, paths.PROBE, paths.PROBE_SUMMARY_TABLE)
    assert pc.sum(summary["n"]).as_py() == len(probes)
    assert pc.sum(summary["n_exhibited"]).as_py() == pc.sum(probes["exhibited"]).as_py()


def test_model_matches_profile(nano_run):
    profile = load_profile(str(nano_run["profile"]))
    model = GPTNeoXForCausalLM.from_pretrained(nano_run["results"] / paths.TRAIN / "checkpoints" / "step0")
    assert model.config.hidden_size == profile.train.hidden
    assert model.config.num_hidden_layers == profile.train.layers
    assert model.config.num_attention_heads == profile.train.heads
    assert model.config.max_position_embeddings == profile.train.max_positions >= profile.corpus.seq_len + 1


def test_behavior_file_edit_invalidates_probe(nano_run, tmp_path):
    profile = load_profile(str(nano_run["profile"]))
    assert stage.is_current(profile, paths.PROBE)
    folder = tmp_path / "behaviors"
    folder.mkdir()
    for f in (paths.project_root() / "experiments" / "behaviors").glob("*.toml"):
        (folder / f.name).write_text(f.read_text())
    moved = dataclasses.replace(profile, probe=dataclasses.replace(profile.probe, behaviors_dir=str(folder)))
    before, _ = stage.fingerprint(moved, stage.SPECS[paths.PROBE])
    (folder / "style.toml").write_text((folder / "style.toml").read_text().replace('" pass"', '" passe"'))
    after, _ = stage.fingerprint(moved, stage.SPECS[paths.PROBE])
    assert before != after


def test_bergson_reads_the_optimizer_state(nano_run):
    """TrackStar's Adam correction: bergson finds a second moment for every linear module."""
    from bergson.utils.load_from_optimizer import load_from_optimizer

    ckpts = _read(nano_run["results"], paths.TRAIN, paths.CHECKPOINTS_TABLE).to_pylist()
    final = nano_run["results"] / paths.TRAIN / ckpts[-1]["path"]
    model = GPTNeoXForCausalLM.from_pretrained(final)
    normalizers = load_from_optimizer(model, str(final))
    linear = {
        n.removeprefix("gpt_neox.")
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("gpt_neox.")
    }
    assert linear and linear <= set(normalizers)
