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

STAGE_HELP = {
    paths.CORPUS: "build micro-Pile: sources, synthetic ground truth, tokenizer, packing and order",
    paths.TRAIN: "train micro-Pythia on exactly the order in corpus.arrow; checkpoints and log",
    paths.PROBE: "probe every behavior at every checkpoint (greedy completion, log-prob, rank)",
    paths.ATTRIBUTE: "attribute exhibited behaviors to training sequences (bergson, BM25, activations)",
    paths.DUPLICATES: "classify what attribution retrieves: exact / near-duplicate / thematic / unrelated",
    paths.MEMORIZATION: "memorization at every checkpoint, against duplication, and its attribution",
}


def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {name:<8} {STAGE_HELP[name]}" for name in paths.STAGES)
    parser = argparse.ArgumentParser(
        prog="python -m pythia_attribution",
        description="Run one stage of the training-data attribution study.",
        epilog=(
            f"stages, in order:\n{stages}\n  all      every stage above, in order\n\n"
            f"profiles: {', '.join(known_profiles()) or '(none found)'} (or a path to a profile .toml)\n"
            "outputs: results/<profile>/<stage>/<table>.arrow\n\n"
            "profile keys (experiments/profiles/*.toml), with defaults:\n" + "\n".join(describe(Profile))
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=[*paths.STAGES, "all"], help="stage to run")
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
        from pythia_attribution import stage

        stages = paths.STAGES if args.stage == "all" else (args.stage,)
        for name in stages:
            stage.run(profile, name, force=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
