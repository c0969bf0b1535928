"""Running a stage: fingerprints, skipping, atomic completion, provenance.

A stage is skipped only when its record exists, every output it lists still matches (size and
hash, see ``outputs``), and the fingerprint stored there (config, upstream output digests, stage
code without its comments and docstrings) matches the one computed now; otherwise it recomputes
into ``<stage>.part/`` and renames that into place when everything is written.
"""

from __future__ import annotations

import ast
import errno
import functools
import hashlib
import importlib
import json
import logging
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import pyarrow as pa

from pythia_attribution import __version__, outputs, paths, tables
from pythia_attribution.config import Profile, config_hash, to_jsonable
from pythia_attribution.errors import ConfigError, CorruptOutputError, MissingInputError

log = logging.getLogger(__name__)


def _manifest_files(profile: Profile) -> list[Path]:
    return [paths.resolve_input(profile.corpus.manifest)]


def _method_files(profile: Profile) -> list[Path]:
    return [paths.resolve_input(profile.attribute.methods_file)]


def _behavior_files(profile: Profile) -> list[Path]:
    return sorted(paths.resolve_input(profile.probe.behaviors_dir).glob("*.toml"))


def _paraphrase_files(profile: Profile) -> list[Path]:
    file = profile.causal.paraphrase_file
    return [paths.resolve_input(file)] if file and profile.causal.finetune_families else []


def _word_order_files(profile: Profile) -> list[Path]:
    file = profile.analyses.word_order_file
    return [paths.resolve_input(file)] if file else []


def _world_files(profile: Profile) -> list[Path]:
    return [paths.expand(profile.world.manifest, profile.name)] if profile.world.manifest else []


@dataclass(frozen=True)
class StageSpec:
    """How a stage is run: its module (per source, for stages that read a source), upstream
    stages, and the config sections it reads.

    ``files`` names input files outside the results tree (manifests, behavior definitions) whose
    content is part of the fingerprint. The code in the fingerprint is derived: the module's own
    file and every package module it imports, transitively.
    """

    name: str
    module: str | dict[str, str]
    upstream: tuple[str, ...]
    sections: tuple[str, ...]
    files: Callable[[Profile], list[Path]] = lambda profile: []
    help: str = ""

    def module_for(self, profile: Profile) -> str:
        """The module that runs this stage for ``profile``: a source chosen by ``<section>.source``."""
        if isinstance(self.module, str):
            return self.module
        source = getattr(profile, self.name).source
        if source not in self.module:
            raise ConfigError(
                f"profile '{profile.name}': {self.name}.source = '{source}' is not a source "
                f"(known: {', '.join(self.module)})"
            )
        return self.module[source]


def _files(*getters: Callable[[Profile], list[Path]]) -> Callable[[Profile], list[Path]]:
    return lambda profile: [f for g in getters for f in g(profile)]


# The stage graph, declared once: the CLI's listing and the nox sessions are derived from it.
# Every stage's entry point is ``<module>.run(ctx: StageContext) -> None``.
SPECS: dict[str, StageSpec] = {
    paths.CORPUS: StageSpec(
        paths.CORPUS,
        {
            "micro-pile": "pythia_attribution.corpus.build",
            "pythia-preshuffled": "pythia_attribution.sources.pile",
        },
        paths.GRAPH[paths.CORPUS],
        ("runtime", "corpus", "world"),
        _files(_manifest_files, _world_files),
        help=paths.STAGE_HELP[paths.CORPUS],
    ),
    paths.TRAIN: StageSpec(
        paths.TRAIN,
        {"train": "pythia_attribution.train", "hub": "pythia_attribution.sources.hub"},
        paths.GRAPH[paths.TRAIN],
        ("runtime", "train", "world"),
        _world_files,
        help=paths.STAGE_HELP[paths.TRAIN],
    ),
    paths.PROBE: StageSpec(
        paths.PROBE,
        "pythia_attribution.probe",
        paths.GRAPH[paths.PROBE],
        ("runtime", "probe"),
        _behavior_files,
        help=paths.STAGE_HELP[paths.PROBE],
    ),
    paths.ATTRIBUTE: StageSpec(
        paths.ATTRIBUTE,
        "pythia_attribution.attribute.stage",
        paths.GRAPH[paths.ATTRIBUTE],
        ("runtime", "attribute"),
        _method_files,
        help=paths.STAGE_HELP[paths.ATTRIBUTE],
    ),
    paths.DUPLICATES: StageSpec(
        paths.DUPLICATES,
        "pythia_attribution.duplicates",
        paths.GRAPH[paths.DUPLICATES],
        ("runtime", "duplicates"),
        help=paths.STAGE_HELP[paths.DUPLICATES],
    ),
    paths.MEMORIZATION: StageSpec(
        paths.MEMORIZATION,
        "pythia_attribution.memorization",
        paths.GRAPH[paths.MEMORIZATION],
        ("runtime", "memorization", "duplicates", "attribute", "world"),
        _files(_method_files, _world_files),
        help=paths.STAGE_HELP[paths.MEMORIZATION],
    ),
    paths.CAUSAL: StageSpec(
        paths.CAUSAL,
        "pythia_attribution.causal",
        paths.GRAPH[paths.CAUSAL],
        ("runtime", "causal", "train", "attribute"),
        _files(_method_files, _paraphrase_files),
        help=paths.STAGE_HELP[paths.CAUSAL],
    ),
    paths.ANALYSES: StageSpec(
        paths.ANALYSES,
        "pythia_attribution.analyses",
        paths.GRAPH[paths.ANALYSES],
        ("runtime", "analyses", "attribute", "duplicates"),
        _files(_method_files, _word_order_files),
        help=paths.STAGE_HELP[paths.ANALYSES],
    ),
    paths.LEAVE_OUT: StageSpec(
        paths.LEAVE_OUT,
        "pythia_attribution.leave_out",
        paths.GRAPH[paths.LEAVE_OUT],
        ("runtime", "leave_out", "train", "attribute"),
        _method_files,
        help=paths.STAGE_HELP[paths.LEAVE_OUT],
    ),
}

PACKAGES = ("torch", "transformers", "tokenizers", "pyarrow", "numpy", "faker", "bergson")


@functools.cache
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "pythia-attribution": __version__}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.cache
def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels run with in this process ('AVX2', 'AVX512',
    ...; see ``runtime.cpu_isa``), loading torch if no stage has yet, so that a stage without torch
    kernels (corpus) records the same as the rest of its run."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def git_state() -> dict[str, str | bool]:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=paths.project_root(), capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": False}


def _imported_modules(module: str) -> list[Path]:
    """Source files of ``module`` and every ``pythia_attribution`` module it imports, transitively
    (read from the syntax tree, so imports inside functions count too)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        rel = Path(*name.split(".")[1:])
        path = paths.PACKAGE_ROOT / f"{rel}.py" if name.count(".") else paths.PACKAGE_ROOT / "__init__.py"
        if not path.is_file():
            path = paths.PACKAGE_ROOT / rel / "__init__.py"
            if not path.is_file():
                continue  # a name imported from a module, not a module
        seen[name] = path
        todo += _read_module(path.read_text())[0]
    return sorted(seen.values())


def code_text(path: Path) -> str:
    """What a module computes, as text: its syntax tree without docstrings (comments, blank lines
    and formatting are not in the tree), so that editing documentation leaves results current.

    The tree's text depends on the Python version, so a new Python makes every stage stale once,
    which is what a reproducibility package wants anyway."""
    return _read_module(path.read_text())[1]


@functools.lru_cache(maxsize=256)
def _read_module(source: str) -> tuple[tuple[str, ...], str]:
    """A module's ``pythia_attribution`` imports (and the names imported from them, which may be
    modules) and its ``code_text``, from one parse; cached on the source, since stages share modules."""
    imports: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [a.name for a in node.names if a.name.startswith("pythia_attribution")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pythia_attribution"):
            imports.append(node.module)
            imports += [f"{node.module}.{a.name}" for a in node.names]
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:] or [ast.Pass()]
    # a tuple: the cache hands the same object to every caller
    return tuple(imports), ast.dump(tree, annotate_fields=False, include_attributes=False)


def _code_hash(spec: StageSpec, profile: Profile) -> str:
    digest = hashlib.sha256()
    for path in _imported_modules(spec.module_for(profile)):
        digest.update(str(path.relative_to(paths.PACKAGE_ROOT)).encode())
        digest.update(code_text(path).encode())
    return digest.hexdigest()


def read_record(profile: str, stage: str) -> dict | None:
    path = paths.stage_dir(profile, stage) / paths.STAGE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: not a readable stage record; the stage counts as never completed", path)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
        log.warning("%s: not a stage record; the stage counts as never completed", path)
        return None
    if not all(isinstance(entry, dict) for entry in record["outputs"].values()):
        log.warning(
            "%s: recorded by an older version of the package (no sizes or digests); the stage counts "
            "as never completed",
            path,
        )
        return None
    return record


@dataclass
class StageContext:
    """What a stage's ``run`` receives: its config, where to write, and its upstream folders."""

    profile: Profile
    spec: StageSpec
    out_dir: Path
    inputs: dict[str, Path]
    fingerprint: str
    input_hashes: dict[str, dict[str, str]]

    @property
    def config(self):
        return getattr(self.profile, self.spec.name)

    def input_table(self, stage: str, table: str) -> pa.Table:
        return tables.read_table(paths.table_path(self.inputs[stage], table), made_by=stage)

    def provenance(self, table: str, **extra) -> dict:
        record = {
            "stage": self.spec.name,
            "table": table,
            "profile": self.profile.name,
            "config": {s: to_jsonable(getattr(self.profile, s)) for s in self.spec.sections},
            "config_hash": config_hash(
                {s: to_jsonable(getattr(self.profile, s)) for s in self.spec.sections}
            ),
            "fingerprint": self.fingerprint,
            "inputs": self.input_hashes,
            "versions": package_versions(),
            "cpu_capability": cpu_capability(),
            **git_state(),
        }
        record.update(extra)
        return record

    def write_table(self, table_name: str, table: pa.Table, **extra) -> Path:
        path = paths.table_path(self.out_dir, table_name)
        tables.write_table(path, table, self.provenance(table_name, **extra))
        return path


def fingerprint(profile: Profile, spec: StageSpec) -> tuple[str, dict[str, dict[str, str]]]:
    """Fingerprint of a stage run: config sections, upstream output digests, stage code."""
    input_hashes = {}
    for up in spec.upstream:
        record = read_record(profile.name, up)
        if record is None:
            raise MissingInputError(
                f"stage '{spec.name}' needs the outputs of stage '{up}' "
                f"({paths.stage_dir(profile.name, up)}); run `{paths.session(up, profile.name)}` first"
            )
        input_hashes[up] = outputs.digests(record["outputs"])
    files = {f.name: tables.sha256_file(f) for f in spec.files(profile) if f.is_file()}
    payload = {
        "stage": spec.name,
        "files": files,
        "config": {s: to_jsonable(getattr(profile, s)) for s in spec.sections},
        "inputs": input_hashes,
        "code": _code_hash(spec, profile),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), input_hashes


@dataclass(frozen=True)
class Status:
    """Where a stage's outputs stand: ``current``, ``missing`` (never completed), ``corrupt`` (a
    file no longer matches the record; ``problems`` names each) or ``stale`` (config, code or
    upstream outputs changed since; ``problems`` says which)."""

    state: str
    problems: tuple[str, ...] = ()


def status(profile: Profile, stage: str, full: bool = False) -> Status:
    spec = SPECS[stage]
    record = read_record(profile.name, stage)
    if record is None:
        return Status("missing")
    broken = outputs.check_all(paths.stage_dir(profile.name, stage), record["outputs"], full)
    if broken:
        return Status("corrupt", tuple(broken))
    try:
        current, _ = fingerprint(profile, spec)
    except MissingInputError as exc:
        return Status("stale", (str(exc),))
    if record.get("fingerprint") != current:
        return Status("stale", (f"{stage}: config, code or upstream outputs changed since it ran",))
    return Status("current")


def is_current(profile: Profile, stage: str) -> bool:
    """True when the stage's fingerprint matches and every recorded output still matches its record."""
    return status(profile, stage).state == "current"


# Below this much free space after a failed stage, the disk is taken to be why it failed.
DISK_FULL_BYTES = 16 * 2**20


def _disk_full_error(exc: BaseException, part: Path) -> OSError | None:
    """An ``OSError(ENOSPC)`` naming ``part`` when a stage failed on a full disk but its library said
    so in its own words: safetensors raises ``SafetensorError`` ('... (os error 28)'), torch.save a
    ``RuntimeError`` ('unexpected pos 576 vs 534'). Judged by the space left on ``part``'s file
    system when the failure arrives, before the partial outputs are removed; None for an
    ``OSError`` (it says what it is) or an interruption, or when space is left."""
    if isinstance(exc, OSError | KeyboardInterrupt | SystemExit):
        return None
    try:
        free = shutil.disk_usage(part).free
    except OSError:
        return None
    if free >= DISK_FULL_BYTES:
        return None
    return OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free)", str(part))


def _swap_into_place(part: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``part``: the old outputs step aside to ``<stage>.old``
    and are removed once the new ones are in place (:func:`_restore_set_aside` undoes a swap
    interrupted between its two renames)."""
    old = paths.set_aside_dir(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    part.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _restore_set_aside(final: Path) -> None:
    """A run stopped between :func:`_swap_into_place`'s two renames leaves the previous complete
    outputs in ``<stage>.old`` and none in place: put them back (they are still verified against
    their record before they are trusted). A leftover ``.old`` beside current outputs is removed."""
    old = paths.set_aside_dir(final)
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old)
    else:
        log.warning("%s: restoring the outputs set aside by an interrupted run (%s)", final.name, old)
        old.rename(final)


def _reset_peak_memory() -> bool:
    """Restart the kernel's count of this process's peak resident memory (Linux: writing 5 to
    ``/proc/self/clear_refs`` sets ``VmHWM`` to the current resident size); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_memory_mib() -> float | None:
    """This process's peak resident memory since the last reset (``VmHWM``), in MiB."""
    try:
        status_lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in status_lines:
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def run(profile: Profile, stage: str, force: bool = False) -> Path:
    """Run ``stage`` for ``profile`` unless its outputs are current; return its folder.

    An upstream output that no longer matches its record stops the run (it would be read); one
    of this stage's own outputs that no longer matches is recomputed, with a warning naming it.
    """
    spec = SPECS[stage]
    final = paths.stage_dir(profile.name, stage)
    _restore_set_aside(final)
    fp, input_hashes = fingerprint(profile, spec)
    for up in spec.upstream:
        up_status = status(profile, up)
        if up_status.state == "corrupt":
            raise CorruptOutputError(
                f"stage '{stage}' reads the outputs of '{up}', which no longer match their record: "
                f"{up_status.problems[0]}; run `{paths.session(up, profile.name)}` to recompute them"
            )
        if up_status.state == "stale":
            log.warning(
                "%s: upstream stage '%s' is out of date for this profile (config or code changed); "
                "using its existing outputs. Run `nox -s %s` to refresh everything.",
                stage,
                up,
                stage,
            )
    own = status(profile, stage)
    if own.state == "corrupt":
        log.warning("%s: %s; recomputing the stage", stage, own.problems[0])
    if not force and own.state == "current":
        log.info("%s: up to date (fingerprint %s), skipping", stage, fp[:12])
        return final

    module = importlib.import_module(spec.module_for(profile))
    part = paths.partial_dir(profile.name, stage)
    started = time.perf_counter()
    # The peak is the process's resident memory while the stage ran (what it held before the stage
    # included: the stages share one process), not its child processes' (bergson's launcher's workers).
    measure_peak = _reset_peak_memory()
    log.info("%s: running (profile %s, fingerprint %s)", stage, profile.name, fp[:12])
    # The stage's module is imported before the partial folder exists, and everything from making
    # that folder to writing its last file is inside the try: an interruption anywhere (Ctrl-C
    # during the imports or the bookkeeping, not only during the work) leaves no partial folder.
    try:
        if part.exists():
            shutil.rmtree(part)
        part.mkdir(parents=True)
        inputs = {up: paths.stage_dir(profile.name, up) for up in spec.upstream}
        module.run(StageContext(profile, spec, part, inputs, fp, input_hashes))
        written = outputs.record(part)
        resolved = {s: to_jsonable(getattr(profile, s)) for s in spec.sections}
        (part / paths.RESOLVED_CONFIG).write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        record = {
            "stage": stage,
            "profile": profile.name,
            "fingerprint": fp,
            "inputs": input_hashes,
            "outputs": written,
            "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mib": _peak_memory_mib() if measure_peak else None,
            "versions": package_versions(),
            "cpu_capability": cpu_capability(),
            **git_state(),
        }
        (part / paths.STAGE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except BaseException as exc:
        disk_full = _disk_full_error(exc, part)
        shutil.rmtree(part, ignore_errors=True)  # a failed stage leaves nothing half-written
        if disk_full is not None:
            raise disk_full from exc
        raise
    _swap_into_place(part, final)
    peak = f", peak {record['peak_rss_mib'] / 1024:.1f} GiB resident" if record["peak_rss_mib"] else ""
    log.info("%s: done in %.1f s%s -> %s", stage, record["seconds"], peak, final)
    return final
