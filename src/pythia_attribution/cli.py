"""Command line: ``python -m pythia_attribution <stage> --profile P``.

Exit codes: 0 done; 1 an internal error (a bug: one line on stderr, the traceback in a log file
it names); 2 bad input, a failed check, an operating-system error or an unreachable Hub (one line
naming the file, key, path or address); 3 another run holds the profile's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pythia_attribution import paths
from pythia_attribution.config import Profile, RuntimeConfig, describe, known_profiles, load_profile
from pythia_attribution.errors import LockedError, UserError, one_line

EXIT_BUG, EXIT_INPUT, EXIT_LOCKED = 1, 2, 3
COMMANDS = ("all", "pin", "verify", "check", "index-shard", "explorer")


def _threads(text: str) -> int:
    """``--threads``: held to the rule of the profile key it overrides (``runtime.threads``)."""
    rule = next(f.metadata["rule"] for f in dataclasses.fields(RuntimeConfig) if f.name == "threads")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer {rule.text()}, got {text!r}") from None
    if why := rule.violation(value):
        raise argparse.ArgumentTypeError(f"{why}, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from pythia_attribution.stage import SPECS

    lines = []
    for name, spec in SPECS.items():
        lines.append(f"  {name:<12} {spec.help}")
        if spec.upstream:
            lines.append(f"  {'':<12} reads the tables of: {', '.join(spec.upstream)}")
        if isinstance(spec.module, dict):
            lines.append(f"  {'':<12} sources ({name}.source): {', '.join(spec.module)}")
    stages = "\n".join(lines)
    every = f"every stage above but {', '.join(paths.OPTIONAL_STAGES)}, in order"
    parser = argparse.ArgumentParser(
        prog="python -m pythia_attribution",
        description="Run one stage of the training-data attribution study.",
        epilog=(
            f"stages, in order:\n{stages}\n  all          {every}\n"
            "  pin          resolve the profile's Hub revisions and files to commits, sizes and sha256\n"
            "               and write world.manifest (needs the network, or the fixture world's cache);\n"
            "               stops if two revisions serve identical weights (not distinct checkpoints)\n"
            "  verify       check every output of the profile against its record, the provenance chain\n"
            "               and the fingerprints (--full: hash large files in full; --against DIR:\n"
            "               compare with another results folder of the profile, volatile fields aside)\n"
            "  check        validate the profile, its behavior files, method table and manifests\n"
            "               without running anything (against the checkpoints, once trained)\n"
            "  index-shard  build shard --shard I of the training indexes (attribute.index_shards) into\n"
            "               results/<profile>/shards/, for another machine's attribute stage to adopt;\n"
            "               takes no lock, so several shards can be built at once\n"
            "  explorer     write results/<profile>/explorer/, a static HTML site of every behavior's\n"
            "               top sequences by method (open its index.html in a browser); skipped\n"
            "               when made from the same tables and code and still whole (--force)\n\n"
            f"profiles: {', '.join(known_profiles()) or '(none found)'} (or a path to a profile .toml)\n"
            "outputs: results/<profile>/<stage>/<table>.arrow\n"
            "exit codes: 0 done, 1 internal error (traceback in the log file named), 2 bad input, a\n"
            "failed check, an operating-system error or an unreachable Hub, 3 another run holds the\n"
            "profile's results (see --wait)\n\n"
            "profile keys (experiments/profiles/*.toml), with defaults and allowed values:\n"
            "  base = (none): a profile (its name, or a .toml path from this file's folder) whose keys\n"
            "    this file inherits, its own on top table by table (e.g. micro-seed1235.toml)\n"
            + "\n".join(describe(Profile))
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "stage", choices=[*paths.STAGES, *paths.OPTIONAL_STAGES, *COMMANDS], help="stage or command to run"
    )
    parser.add_argument("--profile", default="micro", help="profile name or .toml path (default: micro)")
    parser.add_argument("--force", action="store_true", help="recompute even if the outputs are current")
    parser.add_argument("--threads", type=_threads, help="override runtime.threads of the profile")
    parser.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="when another run holds the profile's results, wait this long for it (default: exit at once)",
    )
    parser.add_argument("--full", action="store_true", help="verify: hash every file in full")
    parser.add_argument(
        "--against",
        type=Path,
        metavar="DIR",
        help="verify: compare with DIR/<profile> (or DIR, when it is the <profile> folder)",
    )
    parser.add_argument("--shard", type=int, metavar="I", help="index-shard: which shard (0-based)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


# options that belong to one command: given to another, they would be ignored without a word
COMMAND_OPTIONS = {"--full": ("verify",), "--against": ("verify",), "--shard": ("index-shard",)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, commands in COMMAND_OPTIONS.items():
        if getattr(args, option[2:]) not in (None, False) and args.stage not in commands:
            parser.error(f"{option} applies to {' and '.join(commands)} only, not to {args.stage}")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    command = " ".join(["python -m pythia_attribution", *(sys.argv[1:] if argv is None else argv)])
    try:
        return _run(args, command)
    except LockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written is kept (rerun to continue)", file=sys.stderr)
        return 130
    except Exception as exc:
        log_path = _log_traceback(args.profile, command)
        said = describe_network_error(exc) or describe_out_of_memory(exc)
        if said is not None or isinstance(exc, OSError):
            print(f"error: {said or describe_os_error(exc)} (details: {log_path})", file=sys.stderr)
            return EXIT_INPUT
        # a bug: one line, the traceback in a file
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"internal error: {type(exc).__name__}: {first[:300]} (a bug; the traceback is in {log_path}, "
            "please include it in a report)",
            file=sys.stderr,
        )
        return EXIT_BUG


# runtime.cpu_isa -> the variables that cap each library's kernels; read when the library loads
CPU_ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
}


def hold_cpu_isa(isa: str, environ=os.environ) -> dict[str, str]:
    """Cap the CPU kernels' instruction set (``runtime.cpu_isa``) through the variables torch (ATen),
    MKL and oneDNN read when they load; a variable the user set is left as it is. Returns what was
    set; nothing where ``isa`` is '' or torch is already loaded (too late: the kernels are chosen)."""
    if not isa:
        return {}
    if "torch" in sys.modules:
        logging.getLogger(__name__).info("runtime.cpu_isa = %s not applied: torch was loaded first", isa)
        return {}
    applied = {k: v for k, v in CPU_ISA_ENV[isa].items() if k not in environ}
    environ.update(applied)
    return applied


def _run(args, command: str) -> int:
    from pythia_attribution.lock import profile_lock

    profile = load_profile(args.profile)
    if args.threads is not None:
        profile = dataclasses.replace(
            profile, runtime=dataclasses.replace(profile.runtime, threads=args.threads)
        )
    _warn_oversubscribed(profile.runtime.threads)
    hold_cpu_isa(profile.runtime.cpu_isa)
    # Tokenizers' own thread pool fights torch for the two cores; its output does not depend on it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage == "index-shard":  # no lock: shards are written atomically, one folder each
        from pythia_attribution.attribute.shards import build_for_profile

        if args.shard is None:
            raise UserError("index-shard needs --shard I (0-based, below attribute.index_shards)")
        prepare_world(profile)
        for path in build_for_profile(profile, args.shard):
            print(path)
        return 0
    with profile_lock(profile.name, args.wait, command):
        if args.stage != "verify":  # verify reads what is there and builds nothing
            prepare_world(profile)
        if args.stage == "check":
            from pythia_attribution.check import check_inputs

            for line in check_inputs(profile):
                print(line)
            return 0
        if args.stage == "verify":
            return _verify(profile, args)
        if args.stage == "explorer":
            from pythia_attribution.explorer import build_if_stale

            root = paths.results_root() / profile.name
            print(build_if_stale(root, root / "explorer", force=args.force) / "index.html")
            return 0
        if args.stage == "pin":
            from pythia_attribution.sources.hub import pin_profile

            print(pin_profile(profile))
            return 0
        from pythia_attribution import stage
        from pythia_attribution.check import check_inputs

        stages = paths.STAGES if args.stage == "all" else (args.stage,)
        # every input's structure first: a misnamed causal method once surfaced after training
        check_inputs(profile, deep=False, stages={*paths.STAGES, *stages})
        started = time.perf_counter()
        ran = {}
        for name in stages:
            before = stage.read_record(profile.name, name)
            stage.run(profile, name, force=args.force)
            after = stage.read_record(profile.name, name)
            if after is not None and after != before:
                ran[name] = after.get("seconds")
        if len(stages) > 1:
            logging.getLogger(__name__).info(
                "%s", run_summary(profile.name, stages, ran, time.perf_counter() - started)
            )
    return 0


def run_summary(profile: str, stages: tuple[str, ...], ran: dict[str, float | None], seconds: float) -> str:
    """One line after ``all``: which stages ran (each with its recorded seconds), which were up to
    date, the whole time, and where the tables are."""
    done = ", ".join(f"{name} {s:.0f} s" if s is not None else name for name, s in ran.items())
    current = [name for name in stages if name not in ran]
    parts = [f"{len(ran)} ran" + (f" ({done})" if ran else "")]
    if current:
        parts.append(f"{len(current)} up to date" + (f" ({', '.join(current)})" if ran else ""))
    where = paths.results_root() / profile
    return f"all: {len(stages)} stages of profile {profile} in {seconds:.0f} s: {'; '.join(parts)} -> {where}"


def _warn_oversubscribed(threads: int) -> None:
    """More torch threads than CPUs is allowed (a profile travels between machines, and the thread
    count is part of every stage's fingerprint) but slow: on 2 CPUs, 1,024 threads made the nano
    probe stage about 100 times slower (29 s a checkpoint against 0.27 s at 1 thread). Say so once,
    before any work."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or threads
    if threads > usable:
        logging.getLogger("pythia_attribution").warning(
            "runtime.threads = %d, but this process may use %d CPU%s: torch's threads will compete "
            "for them and every stage runs slower (pass --threads %d, or measure with "
            "experiments/benchmarks/threads.py)",
            threads,
            usable,
            "" if usable == 1 else "s",
            usable,
        )


def _verify(profile: Profile, args) -> int:
    from pythia_attribution import verify

    report = verify.verify(profile, full=args.full)
    for line in report.lines:
        print(line)
    problems = report.problems
    if args.against is not None:
        other = args.against / profile.name  # DIR is a results root holding <profile>/ ...
        if not other.is_dir() and args.against.name == profile.name:
            other = args.against  # ... or that profile's folder itself
        if not other.is_dir():
            raise UserError(
                f"--against: {other} is not a results folder of profile '{profile.name}' (give a results "
                f"root holding {profile.name}/, or the {profile.name}/ folder itself)"
            )
        diffs = verify.compare(paths.results_root() / profile.name, other)
        for line in diffs:
            print(f"DIFF    {line}")
        if not diffs:
            print(f"ok      identical to {other} apart from the volatile fields")
        problems += len(diffs)
    if problems:
        print(f"{problems} problem(s) in results/{profile.name}", file=sys.stderr)
        return EXIT_INPUT
    return 0


def describe_network_error(exc: BaseException) -> str | None:
    """One line for a failure to reach the Hub, naming the address and what to do, or None when
    neither ``exc`` nor what it was raised from is one: no connection (DNS, refused, timed out),
    an HTTP error the Hub answered with (missing repository or revision, gated, rate-limited),
    offline mode, or a file neither cached nor downloadable."""
    try:
        import httpx2
        from huggingface_hub import errors as hub
    except ImportError:  # pragma: no cover - both come with the lock
        return None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        said = one_line(exc)
        if isinstance(exc, hub.OfflineModeIsEnabled):
            return f"the Hub is not reachable in offline mode: {said}"
        if isinstance(exc, hub.LocalEntryNotFoundError):
            return f"not in the Hub cache, and the Hub was not reached: {said}"
        if isinstance(exc, hub.HfHubHTTPError):
            return f"the Hub refused a request: {said}"
        if isinstance(exc, httpx2.TransportError):
            try:
                url = exc.request.url
                where = f"{url.scheme}://{url.host}"
            except RuntimeError:  # no request attached
                where = "the Hub"
            return (
                f"cannot reach {where}: {said or type(exc).__name__}; pinning and each artifact's first "
                "download need the network (later runs read the Hub cache)"
            )
        exc = exc.__cause__ or exc.__context__
    return None


OOM_KEYS = "probe.batch_size, attribute.token_batch_size, memorization.batch_size, causal.finetune_batch"


def describe_out_of_memory(exc: BaseException) -> str | None:
    """One line for a tensor that did not fit (torch's ``OutOfMemoryError`` on an accelerator, its
    CPU allocator's refusal on the host): not a bug, a batch too large for the machine. (Where the
    kernel's OOM killer ends the process instead, no process is left to report it.)"""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if isinstance(exc, torch.OutOfMemoryError):
        where = "the accelerator"
    elif isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc):
        where = "the host"
    else:
        return None
    said = one_line(str(exc).split("\n")[0], 200)
    return f"out of memory on {where}: {said}; lower the running stage's batch size ({OOM_KEYS})"


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and what the operating system said."""
    what = exc.strerror or (errno.errorcode.get(exc.errno, "") if exc.errno else "") or str(exc)
    where = exc.filename if exc.filename is not None else "(no path given)"
    hint = {
        errno.EACCES: "check its permissions",
        errno.EPERM: "check its permissions",
        errno.EROFS: "the file system is read-only; set PYTHIA_ATTRIBUTION_RESULTS to a writable folder",
        errno.ENOSPC: "the disk is full; free space and rerun (completed stages are kept)",
        errno.EDQUOT: "the disk quota is exhausted; free space and rerun (completed stages are kept)",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
    }.get(exc.errno or -1, "")
    return f"cannot use {where}: {what}" + (f"; {hint}" if hint else "")


def _log_traceback(profile: str, command: str) -> Path:
    """Write the current exception's traceback to results/<profile>/logs/ (or the temp folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = f"{command}\n{time.ctime()}\n\n{traceback.format_exc()}"
    name = Path(profile).stem if profile.endswith(".toml") else profile
    for folder in (paths.results_root() / name / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("(no writable folder for the log)")


def prepare_world(profile: Profile) -> None:
    """Point the Hub libraries at the profile's cache (and offline mode) and build its fixture world.

    Environment variables are set for anything imported later; the sources also pass the cache
    and ``local_files_only`` explicitly, so an already-imported huggingface_hub behaves the same.
    """
    world = profile.world
    if world.hub_cache:
        os.environ["HF_HUB_CACHE"] = str(paths.expand(world.hub_cache, profile.name))
    if world.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if world.fixture:
        from pythia_attribution.sources.fixture import ensure_world

        ensure_world(profile)
