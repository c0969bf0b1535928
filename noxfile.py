"""Sessions of the study. ``nox -s all`` runs every stage of a profile; ``nox -s tests`` tests.

Every stage session runs ``python -m pythia_attribution <stage>`` in one shared environment,
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
TORCH = "torch==2.13.0"
STAMP = VENV / ".lock-sha256"


def _python(session: nox.Session) -> str:
    """The interpreter holding the pinned stack; installs it into .venv/ when the lock changed."""
    override = os.environ.get("PYTHIA_ATTRIBUTION_PYTHON")
    if override:
        _print_versions(session, override)
        return override
    python = VENV / "bin" / "python"
    want = hashlib.sha256(LOCK.read_bytes() + TORCH.encode()).hexdigest()
    if not (python.exists() and STAMP.exists() and STAMP.read_text() == want):
        if VENV.exists():
            shutil.rmtree(VENV)
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        session.log("installing the pinned CPU stack into .venv/ (about 2 minutes, once)")
        session.run(*pip, TORCH, external=True)
        session.run(*pip, "--require-hashes", "--no-deps", "-r", str(LOCK), external=True)
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


@nox.session
def corpus(session: nox.Session) -> None:
    """Build micro-Pile (or the profile's corpus): sources, ground truth, tokenizer, training order."""
    _stage(session, "corpus")


@nox.session(requires=["corpus"])
def train(session: nox.Session) -> None:
    """Train micro-Pythia on exactly the corpus order; checkpoints, optimizer state, training log."""
    _stage(session, "train")


@nox.session(requires=["train"])
def probe(session: nox.Session) -> None:
    """Probe every behavior at every checkpoint and record whether the model exhibits it."""
    _stage(session, "probe")


@nox.session(requires=["probe"])
def attribute(session: nox.Session) -> None:
    """Attribute exhibited behaviors to training sequences: bergson methods and baselines."""
    _stage(session, "attribute")


@nox.session(requires=["attribute"])
def duplicates(session: nox.Session) -> None:
    """Classify each retrieved sequence: exact, near-duplicate, thematic or unrelated."""
    _stage(session, "duplicates")


@nox.session(requires=["duplicates"])
def memorization(session: nox.Session) -> None:
    """Memorization at every checkpoint, against duplication, and what drives memorized sequences."""
    _stage(session, "memorization")


@nox.session(requires=["memorization"])
def all(session: nox.Session) -> None:  # noqa: A001 - the session's public name
    """Run every stage of the profile in order (default profile: micro)."""
    session.log("all stages are current for this profile")


@nox.session
def paper(session: nox.Session) -> None:
    """Render paper/ to HTML and PDF from the profile's tables: Quarto if on PATH, else pandoc + typst.

    Reads the tables only (run `nox -s all` first; a missing table names the session that makes it).
    """
    profile, _ = _profile_and_rest(session)
    python = _python(session)
    quarto = shutil.which("quarto")
    if quarto:
        env = {
            "PYTHIA_ATTRIBUTION_PROFILE": profile,
            "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}",
        }
        session.run(quarto, "render", str(ROOT / "paper"), env=env, external=True)
    else:
        session.log("quarto is not on PATH: rendering the pandoc 3 + typst preview")
        session.run(python, "-m", "pythia_attribution.paper", "preview", "--profile", profile, external=True)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite offline (includes the nano pipeline end to end)."""
    session.run(_python(session), "-m", "pytest", *session.posargs, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    session.run(
        _python(session), "-m", "ruff", "check", "src", "tests", "noxfile.py", "experiments", external=True
    )


@nox.session(venv_backend="venv")
def lock(session: nox.Session) -> None:
    """Recompile requirements/cpu.lock from pyproject.toml with uv (needs the network)."""
    session.install("uv==0.13.8")
    session.run(
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        "cpu",
        "--extra",
        "dev",
        "--excludes",
        "requirements/excludes-cpu.txt",
        "--no-emit-package",
        "torch",
        "--python-version",
        "3.11",
        "--python-platform",
        "x86_64-manylinux_2_28",
        "--generate-hashes",
        "--no-header",
        "-o",
        str(LOCK),
    )
