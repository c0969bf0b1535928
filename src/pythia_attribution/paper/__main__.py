"""``python -m pythia_attribution.paper {assets,preview} --profile P``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pythia_attribution.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pythia_attribution.paper",
        description="Build the manuscript in paper/ from the Arrow tables of one profile.",
        epilog=(
            "assets:  figures, tables and _variables.yml into paper/ (Quarto's pre-render step)\n"
            "preview: assets, then HTML and PDF in paper/_output/ with pandoc 3 and typst (no Quarto)\n"
            "The profile defaults to $PYTHIA_ATTRIBUTION_PROFILE, else micro."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["assets", "preview"])
    parser.add_argument("--profile", default=os.environ.get("PYTHIA_ATTRIBUTION_PROFILE", "micro"))
    parser.add_argument("--paper-dir", type=Path, help="the Quarto project (default: paper/ of the checkout)")
    parser.add_argument(
        "--results", type=Path, help="the profile's results folder (default: results/<profile>)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from pythia_attribution.paper import build

    paper_dir = args.paper_dir or build.default_paper_dir()
    try:
        started = time.perf_counter()
        values = build.assets(args.profile, paper_dir, args.results)
        if args.command == "preview":
            html, pdf = build.preview(paper_dir, values)
            print(
                f"wrote {html} and {pdf} from profile {args.profile} in {time.perf_counter() - started:.1f} s"
            )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
