import dataclasses

import pytest

from pythia_attribution import paths
from pythia_attribution.cli import main
from pythia_attribution.config import Profile, from_dict, known_profiles, load_profile
from pythia_attribution.errors import ConfigError


def test_shipped_profiles_load():
    assert {"micro", "nano"} <= set(known_profiles())
    for name in known_profiles():
        profile = load_profile(name)
        assert profile.name == name


@pytest.mark.parametrize("name", ["micro-seed1235", "micro-seed1236"])
def test_the_replicate_profiles_are_micro_but_for_their_seeds(name):
    """micro-seed1235 and -1236 exist to test whether micro's findings survive other seeds: any
    other difference would confound the comparison (experiments/replicate.py)."""
    micro, replicate = load_profile("micro"), load_profile(name)
    assert replicate.runtime.seed != micro.runtime.seed
    runtime = dataclasses.replace(replicate.runtime, seed=micro.runtime.seed)
    same = dataclasses.replace(replicate, name=micro.name, description=micro.description, runtime=runtime)
    assert same == micro


def test_a_base_profile_is_inherited_table_by_table(tmp_path):
    """A file naming a base is that profile with its own keys on top: a key it sets replaces the
    base's, the keys beside it in the same table stay the base's, its name is its own."""
    (tmp_path / "deeper.toml").write_text('base = "nano"\n[train]\nlayers = 3\n')
    (tmp_path / "deeper-seed9.toml").write_text('base = "deeper.toml"\n[runtime]\nseed = 9\n')
    nano, child = load_profile("nano"), load_profile(str(tmp_path / "deeper-seed9.toml"))
    assert (child.name, child.runtime.seed, child.train.layers) == ("deeper-seed9", 9, 3)
    assert child.train.hidden == nano.train.hidden and child.runtime.threads == nano.runtime.threads
    train = dataclasses.replace(child.train, layers=nano.train.layers)
    runtime = dataclasses.replace(child.runtime, seed=nano.runtime.seed)
    assert dataclasses.replace(child, name="nano", train=train, runtime=runtime) == nano


@pytest.mark.parametrize(
    ("files", "shown"),
    [
        ({"a": 'base = "no-such-profile"'}, r"a\.toml: key 'base' = 'no-such-profile': unknown profile"),
        ({"a": 'base = "gone.toml"'}, r"a\.toml: key 'base' = 'gone\.toml': no such file"),
        ({"a": "base = 3"}, r"a\.toml: key 'base' must be str .*got 3"),
        (
            {"a": 'base = "b.toml"', "b": 'base = "a.toml"'},
            r"b\.toml: key 'base' makes a cycle of profiles: a -> b -> a",
        ),
        # the base is checked as a profile of its own: its bad key is named in its own file
        ({"a": 'base = "b.toml"', "b": "[train]\nlayerz = 3"}, r"b\.toml: unknown key 'train\.layerz'"),
    ],
)
def test_a_bad_base_is_one_line_naming_the_file(tmp_path, files, shown):
    for stem, text in files.items():
        (tmp_path / f"{stem}.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=shown) as caught:
        load_profile(str(tmp_path / "a.toml"))
    assert "\n" not in str(caught.value)


def test_unknown_profile_lists_known_ones(capsys):
    assert main(["corpus", "--profile", "no-such-profile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown profile 'no-such-profile'" in err
    assert "micro" in err and "nano" in err


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlayers = 2\nlayerz = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'train\.layerz'"):
        load_profile(str(path))


def test_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[corpus]\nseq_len = "long"\n')
    with pytest.raises(ConfigError, match=r"key 'corpus\.seq_len' must be int"):
        load_profile(str(path))


@pytest.mark.parametrize(
    ("table", "text", "shown"),
    [
        # a method listed twice once ran twice: every top-k rank appeared twice in attributions.arrow
        ("attribute", 'methods = ["bm25", "random", "bm25"]', "names 'bm25' twice"),
        ("attribute", "checkpoints = [0, 20, 0]", "names 0 twice"),
        ("corpus", 'natural_sources = ["kjv", "kjv"]', "names 'kjv' twice"),
        ("memorization", "restricted_checkpoints = [300, 300]", "names 300 twice"),
    ],
)
def test_a_list_that_names_a_value_twice_is_refused(tmp_path, table, text, shown):
    path = tmp_path / "bad.toml"
    path.write_text(f"[{table}]\n{text}\n")
    key = text.split(" =")[0]
    with pytest.raises(ConfigError, match=rf"key '{table}\.{key}' {shown}"):
        load_profile(str(path))


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        # nano's leave_out once asked for 24 while attribute kept 20: the methods lost 4 removals each
        ("[attribute]\ntop_k = 20\n[leave_out]\ntop_k = 24\n", "leave_out.top_k", r"<= attribute.top_k \(20"),
        ("[attribute]\ntop_k = 10\n[causal]\ntop_k = 11\n", "causal.top_k", r"<= attribute.top_k \(10"),
        ("[attribute]\ntop_k = 10\n[analyses]\ntokenwise_top = 11\n", "analyses.tokenwise_top", "got 11"),
        ("[corpus]\nseq_len = 64\n[duplicates]\nngram = 66\n", "duplicates.ngram", r"seq_len \+ 1 \(65\)"),
        # the memorization windows' near-duplicate counts: every window without an n-gram the same
        ("[duplicates]\nngram = 65\n", "duplicates.ngram", r"memorization.continuation \(64\)"),
        # the random floor's further draws are compared with the random method's own run
        ('[leave_out]\nmethods = ["bm25"]\nrandom_draws = 3\n', "leave_out.random_draws", "unless 'random'"),
    ],
)
def test_a_stage_cannot_ask_for_more_than_its_upstream_keeps(tmp_path, text, key, shown):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"key '{key}' must be .*{shown}"):
        load_profile(str(path))
    path.write_text(text.replace(text.rsplit("= ", 1)[1], "1\n"))  # the same keys within the rule load
    load_profile(str(path))


def test_malformed_profile_names_file(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("[train\n")
    assert main(["corpus", "--profile", str(path)]) == 2
    assert "broken.toml: malformed TOML" in capsys.readouterr().err


def test_nested_tables_and_defaults():
    profile = from_dict(Profile, {"name": "x", "corpus": {"synthetic": {"canaries_per_count": 3}}}, "t")
    assert profile.corpus.synthetic.canaries_per_count == 3
    assert profile.corpus.seq_len == 128


def test_help_lists_stages_and_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in paths.STAGES:
        assert f"  {stage} " in out
    assert "--profile" in out and "corpus.seq_len" in out


@pytest.mark.parametrize(
    ("argv", "option", "owner"),
    [
        (["all", "--against", "elsewhere"], "--against", "verify"),
        (["probe", "--full"], "--full", "verify"),
        (["explorer", "--shard", "1"], "--shard", "index-shard"),
    ],
)
def test_an_option_of_another_command_is_refused(capsys, argv, option, owner):
    """`all --against DIR` once ran every stage and compared nothing: an option that belongs to
    one command is an error elsewhere, before anything runs."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: {option} applies to {owner} only, not to {argv[0]}"), err


@pytest.mark.parametrize(
    ("given", "why"),
    [("missing.toml", "no such file"), ("notes/README.md", "not a .toml file")],
)
def test_a_profile_path_that_is_not_a_profile_file_is_named(tmp_path, capsys, given, why):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("# not a profile\n")
    text = str(tmp_path / given)
    assert main(["check", "--profile", text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: --profile {text}: {why}; a profile is one of ")
    assert "micro" in err and "or the path of a .toml file" in err
