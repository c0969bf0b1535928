"""What the pipeline guarantees, checked on nano: outputs verified before they are trusted, a lock
per profile, runs killed at seeded moments and rerun give the same tables, two cold runs agree
apart from the volatile fields, and every bad input ends in one line."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pythia_attribution import paths, stage, tables, verify
from pythia_attribution.cli import main
from pythia_attribution.config import load_profile


def _one_line(capsys, prefix: str = "error: ") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "\n" not in err, err
    return err


@pytest.fixture
def nano_copy(nano_run, tmp_path, monkeypatch):
    """A private copy of the session's nano results (the reference stays untouched)."""
    root = tmp_path / "results"
    shutil.copytree(nano_run["results"], root / "nano")
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(root))
    # other session fixtures point the source cache elsewhere; nano's artifacts live in its own world
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_CACHE", str(nano_run["root"] / "world" / "cache"))
    return {"profile": str(nano_run["profile"]), "results": root / "nano", "reference": nano_run["results"]}


def _env(results_root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHIA_ATTRIBUTION_RESULTS": str(results_root), **extra}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pythia_attribution", *args]


def test_a_truncated_table_is_caught_by_verify_and_all(nano_copy, capsys):
    profile, results = nano_copy["profile"], nano_copy["results"]
    probes = paths.table_path(results / paths.PROBE, paths.PROBES_TABLE)
    original = probes.read_bytes()
    probes.write_bytes(original[: len(original) // 3])

    assert main(["verify", "--profile", profile, "-q"]) == 2
    out = capsys.readouterr().out
    assert f"FAIL    probe: {probes}" in out and "truncated" in out
    assert out.count("FAIL") == 2  # the size, and the table no longer opens

    # a stage that reads it stops with one line naming it, instead of a pyarrow traceback
    assert main(["attribute", "--force", "--profile", profile, "-q"]) == 2
    err = _one_line(capsys)
    assert str(probes) in err and f"nox -s probe -- --profile {Path(profile).resolve()}" in err

    # `all` recomputes the stage that owns it (with a warning) and keeps everything downstream
    downstream = (results / paths.ATTRIBUTE / paths.STAGE_RECORD).read_text()
    assert main(["all", "--profile", profile, "-q"]) == 0
    assert probes.read_bytes() == original
    assert (results / paths.ATTRIBUTE / paths.STAGE_RECORD).read_text() == downstream
    assert main(["verify", "--profile", profile, "-q"]) == 0


def test_an_edited_table_of_the_same_size_is_caught(nano_copy, capsys):
    profile, results = nano_copy["profile"], nano_copy["results"]
    path = paths.table_path(results / paths.DUPLICATES, paths.COMPOSITION_TABLE)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["verify", "--profile", profile, "-q"]) == 2
    assert "sha256 differs" in capsys.readouterr().out
    assert not stage.is_current(load_profile(profile), paths.DUPLICATES)


def test_verify_names_a_broken_provenance_chain(nano_copy, capsys):
    """A stage whose recorded inputs are not its upstream's current outputs fails verification."""
    profile, results = nano_copy["profile"], nano_copy["results"]
    record_path = results / paths.PROBE / paths.STAGE_RECORD
    record = json.loads(record_path.read_text())
    record["outputs"][paths.PROBES_TABLE + ".arrow"]["digest"] = "0" * 64
    record_path.write_text(json.dumps(record))
    assert main(["verify", "--profile", profile, "-q"]) == 2
    out = capsys.readouterr().out
    assert "attribute: the outputs of 'probe' it was computed from are not the current ones" in out
    assert "duplicates: the outputs of 'probe'" in out


def _package_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the package that stage fingerprints read from instead, free to edit."""
    copy = tmp_path / "pythia_attribution"
    shutil.copytree(paths.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(paths, "PACKAGE_ROOT", copy)
    return copy


def test_code_fingerprint_covers_every_imported_module(nano_run, tmp_path, monkeypatch):
    """Editing any module a stage imports, however indirectly, makes the stage stale."""
    copy = _package_copy(tmp_path, monkeypatch)
    profile = load_profile(str(nano_run["profile"]))
    spec = stage.SPECS[paths.MEMORIZATION]
    modules = stage._imported_modules(spec.module_for(profile))
    names = {str(p.relative_to(copy)) for p in modules}
    # memorization calls attribute's candidate and truth helpers and the shared model code
    assert {"memorization.py", "attribute/stage.py", "attribute/gradients.py", "model.py"} <= names
    before = stage._code_hash(spec, profile)
    for path in modules:
        text = path.read_text()
        path.write_text(text + "\n_EDITED = 1\n")
        assert stage._code_hash(spec, profile) != before, path
        path.write_text(text)
    assert stage._code_hash(spec, profile) == before


def test_code_fingerprint_ignores_comments_and_docstrings_only(tmp_path, monkeypatch):
    """Documentation edits leave a stage current; a changed string or statement does not."""
    profile = load_profile("nano")  # before the package root moves: profiles are found beside it
    copy = _package_copy(tmp_path, monkeypatch)
    spec = stage.SPECS[paths.MEMORIZATION]
    path = copy / "memorization.py"
    text = path.read_text()
    before = stage._code_hash(spec, profile)
    tree = ast.parse(text)
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n))
    docstring = ast.get_docstring(function, clean=False)
    assert docstring in text
    edits = {
        "comment": text + "\n# a comment\n",
        "blank lines": text.replace("\n\n", "\n\n\n", 3),
        "a function's docstring": text.replace(docstring, docstring + " More words.", 1),
        "the module's docstring": text.replace('"""', '"""Reworded. ', 1),
    }
    for what, edited in edits.items():
        path.write_text(edited)
        assert stage._code_hash(spec, profile) == before, what
    changed = {
        "a statement": text + "\n_EDITED = 1\n",
        "a string that is not a docstring": text + '\n_NAME = "x"\n',
    }
    for what, edited in changed.items():
        path.write_text(edited)
        assert stage._code_hash(spec, profile) != before, what


def test_a_second_run_waits_or_stops_naming_the_holder(nano_copy):
    """Two concurrent `probe --force`: one completes, the other exits 3 naming the first; with
    --wait the second queues behind the first and completes too."""
    profile, results = nano_copy["profile"], nano_copy["results"]
    env = _env(results.parent)
    first = subprocess.Popen(
        _cli("probe", "--force", "--profile", profile, "-q"), env=env, stderr=subprocess.PIPE
    )
    holder = results / ".lock.holder"
    deadline = time.monotonic() + 60
    while not holder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        _cli("probe", "--force", "--profile", profile, "-q"), env=env, capture_output=True, text=True
    )
    queued = subprocess.Popen(
        _cli("probe", "--force", "--profile", profile, "-q", "--wait", "120"), env=env, stderr=subprocess.PIPE
    )
    assert first.wait(timeout=120) == 0
    assert queued.wait(timeout=120) == 0
    assert second.returncode == 3
    err = second.stderr.strip()
    assert "\n" not in err and f"pid {first.pid}" in err and "probe --force" in err, err
    assert verify.compare(results, nano_copy["reference"], stages=(paths.PROBE,)) == []
    assert not holder.exists()


def test_a_killed_holder_leaves_no_lock(nano_copy, capsys):
    profile, results = nano_copy["profile"], nano_copy["results"]
    shutil.rmtree(results / paths.PROBE)
    proc = subprocess.Popen(_cli("probe", "--profile", profile, "-q"), env=_env(results.parent))
    while not (results / ".lock.holder").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (results / ".lock.holder").exists()  # the note stays; the kernel dropped the lock itself
    started = time.monotonic()
    assert main(["verify", "--profile", profile, "-q"]) == 2  # probe is gone, but nothing is locked
    assert "in use" not in capsys.readouterr().err
    assert time.monotonic() - started < 10


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", paths.STAGES)
def test_sigkill_at_seeded_moments_then_rerun_gives_the_same_tables(nano_copy, stage_name):
    """Kill the stage at two seeded moments while it runs, then rerun it: its tables equal an
    uninterrupted run's (volatile fields aside), and nothing of the killed runs remains."""
    profile, results, reference = nano_copy["profile"], nano_copy["results"], nano_copy["reference"]
    seconds = json.loads((reference / stage_name / paths.STAGE_RECORD).read_text())["seconds"]
    rng = random.Random(f"kill-{stage_name}")
    shutil.rmtree(results / stage_name)
    part = paths.partial_dir("nano", stage_name)
    assert part == results.parent / "nano" / f"{stage_name}.part"
    interrupted = 0
    for fraction in sorted(rng.uniform(0.1, 0.9) for _ in range(2)):
        proc = subprocess.Popen(
            _cli(stage_name, "--profile", profile, "-q"), env=_env(results.parent), stderr=subprocess.DEVNULL
        )
        while not part.exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(fraction * seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += part.exists()
        assert not (results / stage_name / paths.STAGE_RECORD).exists() or stage.is_current(
            load_profile(profile), stage_name
        ), "a killed run left a stage that looks complete but is not"
    assert interrupted, "no kill landed while the stage was running"
    assert main([stage_name, "--profile", profile, "-q"]) == 0
    assert not part.exists()
    diffs = verify.compare(results, reference, stages=(stage_name,))
    assert diffs == [], "\n".join(diffs)


@pytest.mark.slow
def test_two_cold_runs_agree_apart_from_volatile_fields(nano_run, tmp_path):
    """A second cold run, in another process with another hash seed, gives the same tables; the
    only differences allowed are the fields documented as volatile."""
    root = tmp_path / "results"
    proc = subprocess.run(
        _cli("all", "--profile", str(nano_run["profile"]), "-q"),
        env=_env(
            root, PYTHONHASHSEED="12345", PYTHIA_ATTRIBUTION_CACHE=str(nano_run["root"] / "world" / "cache")
        ),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = verify.compare(root / "nano", nano_run["results"])
    assert diffs == [], "\n".join(diffs)
    # and the volatile field really is volatile: the check is not vacuous
    log_a, log_b = (
        tables.read_table(paths.table_path(r / paths.TRAIN, paths.TRAINING_LOG_TABLE))
        for r in (root / "nano", nano_run["results"])
    )
    assert tables.volatile_columns(log_a.schema) == ["tokens_per_s"]
    assert log_a.drop_columns(["tokens_per_s"]).equals(log_b.drop_columns(["tokens_per_s"]))


def test_verify_against_takes_a_results_root_or_the_profiles_folder(nano_copy, capsys, tmp_path):
    profile, reference = nano_copy["profile"], nano_copy["reference"]
    for against in (reference.parent, reference):  # .../results, or .../results/nano
        assert main(["verify", "--profile", profile, "--against", str(against), "-q"]) == 0
        assert f"identical to {reference} apart from the volatile fields" in capsys.readouterr().out
    assert main(["verify", "--profile", profile, "--against", str(tmp_path / "elsewhere"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "elsewhere/nano is not a results folder of profile 'nano'" in err and err.count("\n") == 1


def test_compare_reports_a_changed_value(nano_copy):
    results, reference = nano_copy["results"], nano_copy["reference"]
    path = paths.table_path(results / paths.PROBE, paths.PROBE_SUMMARY_TABLE)
    table = tables.read_table(path)
    n = table["n"].to_pylist()
    n[0] += 1
    field = table.schema.field("n")
    changed = table.set_column(table.column_names.index("n"), field, pa.array(n, field.type))
    tables.write_table(path, changed, tables.provenance(table))
    assert verify.compare(results, reference, stages=(paths.PROBE,)) == [
        "probe/behavior_summary.arrow: values differ in n"
    ]
    # runs of two commits differ in provenance; the values are still compared
    other = {**tables.provenance(table), "fingerprint": "0" * 64}
    tables.write_table(path, changed, other)
    assert verify.compare(results, reference, stages=(paths.PROBE,)) == [
        "probe/behavior_summary.arrow: provenance differs in fingerprint; values differ in n"
    ]
    tables.write_table(path, table, other)
    assert verify.compare(results, reference, stages=(paths.PROBE,)) == [
        "probe/behavior_summary.arrow: provenance differs in fingerprint; values identical"
    ]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        # an undefined statistic is NaN in every run: the same NaN in the same place is no difference
        ([1.5, float("nan"), None], [1.5, float("nan"), None], True),
        ([1.5, float("nan")], [1.5, 2.0], False),
        ([1.5, float("nan")], [1.5, None], False),  # NaN is a value, null its absence
        ([[1.0, float("nan")], [], None], [[1.0, float("nan")], [], None], True),
        ([[1.0, float("nan")], [2.0]], [[1.0], [float("nan"), 2.0]], False),  # same values, other rows
        ([[1.0], None], [[1.0], []], False),
        ([1, 2], [1, 3], False),
    ],
)
def test_compare_counts_the_same_nan_as_the_same_value(a, b, same):
    """Arrow's equality says NaN != NaN; `verify --against` reported a second seed's identical
    score summary (one tail exponent NaN in both runs) as differing."""
    ta, tb = pa.table({"x": a}), pa.table({"x": b})
    assert verify._value_difference(ta, tb) == (None if same else "values differ in x")


# ---- bad input: one line, non-zero, nothing half-written ------------------------------------


def test_zero_batch_size_is_one_line(world, capsys, tmp_path):
    bad = world.parent / "nano.toml"
    bad.write_text(world.read_text().replace("batch_size = 8", "batch_size = 0"))
    assert main(["all", "--profile", str(bad), "-q"]) == 2
    err = _one_line(capsys)
    assert "corpus.batch_size" in err and ">= 1" in err and "got 0" in err
    assert not list((tmp_path / "results" / "nano").glob("*/"))


def test_threads_flag_is_held_to_the_profile_keys_rule(world, capsys):
    # 100,000 threads once got past the flag and died inside pyarrow's thread pool
    for value, shown in (("100000", "got 100000"), ("0", "got 0"), ("two", "got 'two'")):
        with pytest.raises(SystemExit) as exit_:
            main(["check", "--profile", str(world), "--threads", value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("python -m pythia_attribution: error: argument --threads:"), err
        assert ">= 1 and <= 1024" in err and shown in err


def test_more_threads_than_cpus_is_warned_once(world, capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert main(["check", "--profile", str(world), "--threads", "2", "-q"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "runtime.threads" in line]
    assert len(warnings) == 1 and "= 2, but this process may use 1 CPU:" in warnings[0], warnings
    assert main(["check", "--profile", str(world), "--threads", "1", "-q"]) == 0
    assert "runtime.threads" not in capsys.readouterr().err


def test_cross_key_rule_names_both_keys(world, capsys):
    bad = world.parent / "nano.toml"
    bad.write_text(world.read_text().replace("heads = 2", "heads = 3"))
    assert main(["corpus", "--profile", str(bad), "-q"]) == 2
    assert "train.hidden" in _one_line(capsys)


def _set_key(text: str, table: str, line: str) -> str:
    """The profile ``text`` with ``line`` (``key = value``) set in ``[table]``, replacing the key's
    line there if it has one, adding the table if it has none."""
    lines = text.splitlines()
    key = line.split("=")[0].strip()
    if f"[{table}]" not in lines:
        return "\n".join([*lines, f"[{table}]", line, ""])
    start = lines.index(f"[{table}]") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    own = [i for i in range(start, end) if lines[i].split("=")[0].strip() == key]
    if own:
        lines[own[0]] = line
    else:
        lines.insert(start, line)
    return "\n".join([*lines, ""])


@pytest.mark.parametrize(
    ("table", "line", "shown"),
    [
        # a misspelt method here once surfaced only when its stage came, after training
        ("causal", 'methods = ["trakstar"]', "causal.methods: 'trakstar' is not in attribute.methods"),
        ("analyses", 'methods = ["bm25"]', "analyses.methods: 'bm25' is not a gradient method"),
        ("memorization", 'methods = ["activation"]', "'activation' is of kind 'activation'"),
        # leave_out is not part of `all`: its own command checks it (and `check`); 'random' stays,
        # since nano draws the random floor twice and the draws need it
        ("leave_out", 'methods = ["ekfac_typo", "random"]', "leave_out.methods: 'ekfac_typo' is not in"),
    ],
)
def test_a_method_a_later_stage_cannot_use_stops_the_run_before_the_first_stage(
    world, capsys, tmp_path, table, line, shown
):
    bad = world.parent / "nano.toml"
    bad.write_text(_set_key(world.read_text(), table, line))
    command = "leave_out" if table == "leave_out" else "all"
    assert main([command, "--profile", str(bad), "-q"]) == 2
    assert shown in _one_line(capsys)
    assert not list((tmp_path / "results" / "nano").glob("*/*.arrow"))


def test_a_method_named_like_the_reference_row_is_refused(world, capsys, tmp_path):
    # the causal tables name the ground-truth sequences' row "ground_truth"; a method of that name
    # would be merged with it there
    methods = tmp_path / "methods.toml"
    text = (paths.project_root() / "experiments" / "methods.toml").read_text()
    methods.write_text(text + '\n[ground_truth]\nkind = "bm25"\n')
    bad = world.parent / "nano.toml"
    profile = _set_key(world.read_text(), "attribute", f'methods_file = "{methods}"')
    methods_line = next(line for line in profile.splitlines() if line.startswith("methods = ["))
    profile = profile.replace(methods_line, methods_line.replace("[", '["ground_truth", ', 1), 1)
    bad.write_text(profile)
    assert main(["check", "--profile", str(bad), "-q"]) == 2
    assert f"{methods}: 'ground_truth' names the causal evaluations' reference row" in _one_line(capsys)


def test_a_prompt_longer_than_the_context_is_refused_before_probing(nano_copy, tmp_path, capsys):
    folder = tmp_path / "behaviors"
    shutil.copytree(paths.project_root() / "experiments" / "behaviors", folder)
    (folder / "long.toml").write_text(
        '[[behavior]]\nid = "long"\nfamily = "style"\nprompt = "'
        + "the king said " * 1200
        + '"\ntarget = " pass"\n'
    )
    text = Path(nano_copy["profile"]).read_text()
    profile = tmp_path / "nano.toml"
    profile.write_text(text.replace('behaviors_dir = "experiments/behaviors"', f'behaviors_dir = "{folder}"'))
    before = (nano_copy["results"] / paths.PROBE / paths.STAGE_RECORD).read_text()
    for command in ("check", "probe"):
        assert main([command, "--profile", str(profile), "-q"]) == 2
        err = _one_line(capsys)
        assert "long.toml: behavior 'long'" in err and "positions of the model at step0" in err
    assert (nano_copy["results"] / paths.PROBE / paths.STAGE_RECORD).read_text() == before
    assert not (nano_copy["results"] / "probe.part").exists()


def test_an_unusable_results_root_is_one_line(world, capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(blocker / "results"))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the log's fallback, kept out of /tmp
    assert main(["corpus", "--profile", str(world), "-q"]) == 2
    err = _one_line(capsys)
    assert str(blocker / "results") in err and "Not a directory" in err
    # the traceback goes to the temp folder, since the results root cannot hold it
    (log,) = temp.glob("error-*.log")
    assert f"(details: {log})" in err and "NotADirectoryError" in log.read_text()


def test_a_bug_is_one_line_and_a_log_with_the_traceback(nano_copy, capsys, monkeypatch):
    import pythia_attribution.duplicates as duplicates

    def broken(ctx):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(duplicates, "run", broken)
    assert main(["duplicates", "--force", "--profile", nano_copy["profile"], "-q"]) == 1
    err = _one_line(capsys, prefix="internal error: ZeroDivisionError")
    log_path = Path(err.split("traceback is in ")[1].split(",")[0])
    assert log_path.parent == nano_copy["results"] / "logs"
    assert "Traceback" in log_path.read_text() and "in broken" in log_path.read_text()
    assert not (nano_copy["results"] / "duplicates.part").exists()
    assert main(["verify", "--profile", nano_copy["profile"], "-q"]) == 0  # the old outputs survive


def test_a_full_disk_reported_in_a_librarys_own_words_is_one_line(nano_copy, capsys, monkeypatch):
    """safetensors and torch.save do not raise OSError on a full disk (measured on a 6 MiB tmpfs:
    ``SafetensorError: ... (os error 28)``, ``RuntimeError: ... unexpected pos 576 vs 534``); the
    stage judges by the space left when the failure arrives."""
    import collections

    import pythia_attribution.duplicates as duplicates

    written = {}

    def fills_the_disk(ctx):
        (ctx.out_dir / "half.arrow").write_bytes(b"x" * 100)
        written["part"] = ctx.out_dir
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(duplicates, "run", fills_the_disk)
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    assert main(["duplicates", "--force", "--profile", nano_copy["profile"], "-q"]) == 2
    err = _one_line(capsys)
    assert f"cannot use {written['part']}: No space left on device (0.0 MiB free); the disk is full" in err
    assert "(details: " in err and not written["part"].exists()
    assert main(["verify", "--profile", nano_copy["profile"], "-q"]) == 0  # the old outputs survive
    # the same failure with space left is a bug, as before
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: usage(2**30, 2**29, 2**29))
    assert main(["duplicates", "--force", "--profile", nano_copy["profile"], "-q"]) == 1
    assert "internal error: RuntimeError" in _one_line(capsys, prefix="internal error: ")


def test_an_interruption_during_the_bookkeeping_leaves_nothing(nano_copy, capsys, monkeypatch):
    """Ctrl-C once left an empty ``attribute.part`` (it arrived while the stage's module was being
    imported, after the folder was made and before the ``try`` that removes it); the import, the
    outputs' record and the stage record are now inside it."""
    from pythia_attribution import outputs

    def interrupted(part):
        raise KeyboardInterrupt

    before = (nano_copy["results"] / paths.DUPLICATES / paths.STAGE_RECORD).read_text()
    monkeypatch.setattr(outputs, "record", interrupted)
    assert main(["duplicates", "--force", "--profile", nano_copy["profile"], "-q"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the stage's progress bar
    assert last == "error: interrupted; nothing half-written is kept (rerun to continue)"
    assert not (nano_copy["results"].parent / "nano" / "duplicates.part").exists()
    assert (nano_copy["results"] / paths.DUPLICATES / paths.STAGE_RECORD).read_text() == before


@pytest.mark.slow
def test_ctrl_c_while_a_stage_runs_is_one_line_and_leaves_nothing(nano_copy):
    profile, results = nano_copy["profile"], nano_copy["results"]
    part = paths.partial_dir("nano", paths.DUPLICATES)
    proc = subprocess.Popen(
        _cli(paths.DUPLICATES, "--force", "--profile", profile, "-q"),
        env=_env(results.parent),
        stderr=subprocess.PIPE,
        text=True,
    )
    while not part.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last == "error: interrupted; nothing half-written is kept (rerun to continue)"
    assert not part.exists()
    assert main(["verify", "--profile", profile, "-q"]) == 0


def test_outputs_set_aside_by_an_interrupted_swap_are_put_back(nano_copy, capsys):
    """A run stopped between moving the old outputs aside and moving the new ones in leaves the
    stage with none in place: the next run restores the old ones (and, being current, keeps them)."""
    results = nano_copy["results"]
    record = (results / paths.DUPLICATES / paths.STAGE_RECORD).read_text()
    set_aside = results / f"{paths.DUPLICATES}.old"
    (results / paths.DUPLICATES).rename(set_aside)
    main(["verify", "--profile", nano_copy["profile"]])
    assert f"{set_aside} holds outputs set aside by an interrupted run (the next run puts them back)" in (
        capsys.readouterr().out
    )
    assert main(["duplicates", "--profile", nano_copy["profile"], "-q"]) == 0
    assert not set_aside.exists()
    assert (results / paths.DUPLICATES / paths.STAGE_RECORD).read_text() == record  # not recomputed
    assert main(["verify", "--profile", nano_copy["profile"], "-q"]) == 0


def test_compare_names_a_folder_one_run_lacks_once(tmp_path):
    """A stage run in one results folder only (leave_out and its retrained models, dozens of
    files) is one line with its count of files; a file missing inside a folder both have is
    still named on its own."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "probe").mkdir(parents=True)
        (root / "probe" / "x.bin").write_bytes(b"same")
    (a / "probe" / "extra.bin").write_bytes(b"only here")
    for key in ("k1", "k2"):
        (b / "retrained" / key).mkdir(parents=True)
        (b / "retrained" / key / "model.safetensors").write_bytes(b"w")
    (b / "leave_out").mkdir()
    (b / "leave_out" / "leave_out.arrow").write_bytes(b"t")
    assert verify.compare(a, b) == [
        f"leave_out/: only in {b} (1 file)",
        f"probe/extra.bin: only in {a}",
        f"retrained/: only in {b} (2 files)",
    ]


def test_compare_takes_the_explorer_stamp_by_what_it_lists(tmp_path):
    """The explorer's build stamp holds a key over the code and the commit, so two runs of different
    commits differ there by design: ``compare`` (``verify --against``) reads it for the files it
    lists, each compared on its own, and reports a page that changed."""
    from pythia_attribution import derived, explorer

    assert explorer.STAMP == derived.EXPLORER_STAMP  # what the explorer writes is what compare reads
    runs = []
    for key in ("made-by-commit-a", "made-by-commit-b"):
        site = tmp_path / key / "explorer"
        (site / "behavior").mkdir(parents=True)
        (site / "index.html").write_text("<html>index</html>")
        (site / "behavior" / "x.html").write_text("<html>x</html>")
        derived.write_stamp(site, ["index.html", "behavior/x.html"], site / explorer.STAMP, key)
        runs.append(tmp_path / key)
    assert verify.compare(*runs) == []
    site = runs[1] / "explorer"
    (site / "behavior" / "x.html").write_text("<html>y</html>")
    derived.write_stamp(site, ["index.html", "behavior/x.html"], site / explorer.STAMP, "made-by-commit-b")
    assert verify.compare(*runs) == [
        "explorer/.built.json: lists other files or other contents",
        "explorer/behavior/x.html: bytes differ",
    ]
