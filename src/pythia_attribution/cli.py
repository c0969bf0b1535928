"""Command line: ``python -m pythia_attribution <stage> --profile P``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from pythia_attribution import paths
from pythia_attribution.config import Profile, describe, known_profiles, load_profile
from pythia_attribution.errors import UserError


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
    parser = argparse.ArgumentParser(
        prog="python -m pythia_attribution",
        description="Run one stage of the training-data attribution study.",
        epilog=(
            f"stages, in order:\n{stages}\n  all          every stage above, in order\n"
            "  pin          resolve the profile's Hub revisions and files to commits, sizes and sha256\n"
            "               and write world.manifest (needs the network, or the fixture world's cache)\n\n"
            f"profiles: {', '.join(known_profiles()) or '(none found)'} (or a path to a profile .toml)\n"
            "outputs: results/<profile>/<stage>/<table>.arrow\n\n"
            "profile keys (experiments/profiles/*.toml), with defaults:\n" + "\n".join(describe(Profile))
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=[*paths.STAGES, "all", "pin"], help="stage to run")
    parser.add_argument("--profile", default="micro", help="profile name or .toml path (default: micro)")
    parser.add_argument("--force", action="store_true", help="recompute even if the outputs are current")
    parser.add_argument("--threads", type=int, help="override runtime.threads of the profile")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    try:
        profile = load_profile(args.profile)
        if args.threads is not None:
            profile = dataclasses.replace(
                profile, runtime=dataclasses.replace(profile.runtime, threads=args.threads)
            )
        # Tokenizers' own thread pool fights torch for the two cores; its output does not depend on it.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        prepare_world(profile)
        from pythia_attribution import stage

        if args.stage == "pin":
            from pythia_attribution.sources.fixture import pin_profile

            print(pin_profile(profile))
            return 0
        stages = paths.STAGES if args.stage == "all" else (args.stage,)
        for name in stages:
            stage.run(profile, name, force=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
