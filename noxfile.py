"""Sessions of the study. ``nox -s all`` runs every stage of a profile; ``nox -s tests`` tests.

Every stage session runs ``python -m pythia_attribution <stage>`` (and ``all`` runs
``python -m pythia_attribution all``: every stage in order, in one process) in one shared environment,
``.venv/``, installed from ``requirements/cpu.lock`` (exact pins with hashes; torch 2.13.0 is
installed first on its own). The environment is rebuilt only when the lock changes. Inside the
Docker image, ``PYTHIA_ATTRIBUTION_PYTHON`` names the image's interpreter, which already holds
the CUDA lock, and nothing is installed.

Profile: ``nox -s all -- --profile micro`` (default micro); other arguments after ``--`` go to
the stage command (``--force``, ``--threads N``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2025.02.09"
nox.options.default_venv_backend = "none"
nox.options.sessions = ["all"]

ROOT = Path(__file__).parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements" / "cpu.lock"
CUDA_LOCK = ROOT / "requirements" / "cuda.lock"
TORCH = "torch==2.13.0"
UV = "uv==0.13.8"  # installs the lock (docs/timings-history.md: 4.9 s where pip took 87) and recompiles it
STAMP = VENV / ".lock-sha256"


def _python(session: nox.Session) -> str:
    """The interpreter holding the pinned stack; installs it into .venv/ when the lock changed."""
    override = os.environ.get("PYTHIA_ATTRIBUTION_PYTHON")
    if override:
        _print_versions(session, override)
        return override
    python = VENV / "bin" / "python"
    want = hashlib.sha256(LOCK.read_bytes() + TORCH.encode() + UV.encode()).hexdigest()
    if not (python.exists() and STAMP.exists() and STAMP.read_text() == want):
        if VENV.exists():
            shutil.rmtree(VENV)
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        session.log("installing the pinned CPU stack into .venv/ (under a minute, once)")
        # torch (which the lock leaves out) through pip, which finds the CPU build this machine's pip
        # configuration points at; the lock, hash-checked, through uv (parallel downloads, no .pyc
        # compiled up front: Python writes them on first import).
        session.run(*pip, TORCH, UV, external=True)
        uv = [str(VENV / "bin" / "uv"), "pip", "install", "--quiet", "--python", str(python)]
        session.run(*uv, "--require-hashes", "--no-deps", "-r", str(LOCK), external=True)
        session.run(*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT), external=True)
        STAMP.write_text(want)
    _print_versions(session, str(python))
    return str(python)


_VERSIONS_SHOWN: set[str] = set()


def _print_versions(session: nox.Session, python: str) -> None:
    """Versions of python, torch and bergson, once per nox run (from metadata: no heavy imports)."""
    if python in _VERSIONS_SHOWN:
        return
    _VERSIONS_SHOWN.add(python)
    session.run(
        python,
        "-c",
        "import platform; from importlib.metadata import version as v; "
        'print(f\'python {platform.python_version()}, torch {v("torch")}, '
        'transformers {v("transformers")}, bergson {v("bergson")}\')',
        external=True,
    )


# `-- --profile P` (default micro) is shared by every session; the rest of the posargs go on as given
_PROFILE = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_PROFILE.add_argument("--profile", default="micro")


def _profile_and_rest(session: nox.Session) -> tuple[str, list[str]]:
    known, rest = _PROFILE.parse_known_args(session.posargs)
    return known.profile, rest


def _stage(session: nox.Session, stage: str) -> None:
    profile, rest = _profile_and_rest(session)
    session.run(
        _python(session), "-m", "pythia_attribution", stage, "--profile", profile, *rest, external=True
    )


def _graph() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The stage graph and each stage's one-line help, from the package's
    paths module (standard library only, so it loads here without the pinned stack)."""
    spec = importlib.util.spec_from_file_location(
        "_pa_paths", ROOT / "src" / "pythia_attribution" / "paths.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GRAPH, module.STAGE_HELP


GRAPH, STAGE_HELP = _graph()


def _stage_session(stage: str):
    def session_fn(session: nox.Session) -> None:
        _stage(session, stage)

    session_fn.__doc__ = STAGE_HELP[stage][0].upper() + STAGE_HELP[stage][1:] + "."
    return nox.session(name=stage, requires=list(GRAPH[stage]))(session_fn)


# One session per stage, each requiring the stages whose tables it reads (the declared graph).
for _name in GRAPH:
    _stage_session(_name)


@nox.session
def all(session: nox.Session) -> None:  # noqa: A001 - the session's public name
    """Run every stage of the profile in order (default profile: micro); `leave_out` runs by name.

    One process for all stages (`python -m pythia_attribution all`), where the stage sessions are
    one process each: every stage imports torch, transformers and bergson, about 9 s a stage here,
    so a cold run saves about a minute (docs/timings-history.md, the fourth run); the tables are
    the same either way.
    """
    _stage(session, "all")


@nox.session
def pin(session: nox.Session) -> None:
    """Resolve a real-scale profile's Hub revisions and files to commits and sha256 (network)."""
    _stage(session, "pin")


@nox.session
def verify(session: nox.Session) -> None:
    """Check every output of the profile against its record, the provenance chain and fingerprints.

    `-- --full` hashes large files in full; `-- --against DIR` compares with DIR/<profile>.
    """
    _stage(session, "verify")


@nox.session
def check(session: nox.Session) -> None:
    """Validate the profile, behavior files, method table and manifests without running anything."""
    _stage(session, "check")


@nox.session
def paper(session: nox.Session) -> None:
    """Render paper/ to HTML and PDF from the profile's tables: Quarto if on PATH, else pandoc + typst.

    Reads the tables only (run `nox -s all` first; a missing table names the session that makes it).
    Builds the explorer first (results/<profile>/explorer/), which the paper links to. Both are
    skipped when made from the same tables, code and sources and still whole; `-- --force` redoes them.
    """
    profile, rest = _profile_and_rest(session)
    force = ["--force"] if "--force" in rest else []
    python = _python(session)
    # the rest goes to the explorer's command line, whose parser refuses a misspelt option (nox -s
    # all paper shares its arguments, so what `all` takes, e.g. --threads, is taken here too)
    session.run(
        python, "-m", "pythia_attribution", "explorer", "--profile", profile, "-q", *rest, external=True
    )
    renderer = "quarto" if shutil.which("quarto") else "preview"
    if renderer == "preview":
        session.log("quarto is not on PATH: rendering the pandoc 3 + typst preview")
    session.run(
        python, "-m", "pythia_attribution.paper", renderer, "--profile", profile, *force, external=True
    )


@nox.session
def explorer(session: nox.Session) -> None:
    """Write the explorer, a static HTML site of each behavior's top sequences, to results/<profile>/.

    Made from the tables (run `nox -s all` first; `nox -s paper` builds it too); open its
    explorer/index.html in a browser. Skipped when made from the same tables and code and still
    whole; `-- --force` rebuilds it."""
    _stage(session, "explorer")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite offline, the nano pipeline end to end included (pytest-xdist workers).

    Two workers where two CPUs are usable (`-- -n N` chooses another count, `-- -n 0` none)."""
    args = list(session.posargs)
    if not any(a.startswith(("-n", "--numprocesses")) for a in args):
        args = ["-n", str(_test_workers()), *args]
    session.run(_python(session), "-m", "pytest", *args, external=True)


def _test_workers() -> int:
    """Two workers where two CPUs are usable, else none. Most tests run one thread (nano's
    profile) or wait on subprocesses, so one process left a 2-core machine's second core idle:
    CI's suite took 1,014 s in one process and 672 s in two (docs/performance.md). Each worker
    runs whole test files (`--dist loadfile` in pyproject.toml), so a file's shared fixtures are
    built once, and builds nano once for itself."""
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 0


@nox.session
def image(session: nox.Session) -> None:
    """Check the CUDA image without a Docker engine: hadolint, and its install steps replayed.

    The replay (.ci/replay-image-install) runs the Dockerfile's pip steps in a fresh venv: the lock
    resolves with every hash, and the project installs."""
    python = _python(session)
    session.run(str(Path(python).parent / "hadolint"), "Dockerfile", external=True)
    session.run(python, str(ROOT / ".ci" / "replay-image-install"), external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    session.run(
        _python(session), "-m", "ruff", "check", "src", "tests", "noxfile.py", "experiments", external=True
    )


@nox.session(venv_backend="venv")
def lock(session: nox.Session) -> None:
    """Recompile requirements/cpu.lock and requirements/cuda.lock from pyproject.toml with uv (network).

    The CUDA lock is resolved under the CPU lock's versions as constraints, so the two differ only
    in the CUDA-specific wheels (torch's CUDA runtime, triton, faiss-gpu instead of faiss-cpu):
    tests/test_image.py checks that.
    """
    session.install(UV)
    common = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
    common += ["--generate-hashes", "--no-header"]
    session.run(
        "uv", "pip", "compile", "pyproject.toml", "--extra", "cpu", "--extra", "dev",
        "--excludes", "requirements/excludes-cpu.txt", "--no-emit-package", "torch",
        *common, "-o", str(LOCK),
    )  # fmt: skip
    lines = LOCK.read_text().splitlines()
    pins = [line.split(" ")[0] for line in lines if "==" in line and not line[0].isspace()]
    constraints = Path(session.create_tmp()) / "cpu-versions.txt"
    constraints.write_text("\n".join(p for p in pins if not p.startswith("faiss-")) + "\n")
    session.run(
        "uv", "pip", "compile", "pyproject.toml", "--extra", "cuda", "--extra", "dev",
        "--excludes", "requirements/excludes-cuda.txt", "-c", str(constraints),
        *common, "-o", str(CUDA_LOCK),
    )  # fmt: skip
