"""``python -m pythia_attribution.paper {assets,preview,quarto} --profile P``."""

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
            "quarto:  `quarto render paper/<manuscript>` (which runs assets first), the quarto on PATH\n"
            "The manuscript follows the profile's world: index.qmd (micro-Pile), pythia.qmd (the Pile).\n"
            "preview and quarto skip when paper/_output/ was rendered from the same tables, code,\n"
            "sources and commit and is whole (paper/.rendered.json); --force renders again.\n"
            "The profile defaults to $PYTHIA_ATTRIBUTION_PROFILE, else micro."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["assets", "preview", "quarto"])
    parser.add_argument("--profile", default=os.environ.get("PYTHIA_ATTRIBUTION_PROFILE", "micro"))
    parser.add_argument("--paper-dir", type=Path, help="the Quarto project (default: paper/ of the checkout)")
    parser.add_argument(
        "--results", type=Path, help="the profile's results folder (default: results/<profile>)"
    )
    parser.add_argument("--force", action="store_true", help="render even when the output is current")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from pythia_attribution import derived, paths
    from pythia_attribution.paper import build

    paper_dir = args.paper_dir or build.default_paper_dir()
    results = args.results or paths.results_root() / args.profile
    try:
        started = time.perf_counter()
        if args.command == "assets":
            build.assets(args.profile, paper_dir, results)
            return 0
        if args.command == "quarto" and args.results:
            raise build.PaperError(
                "--results is not passed on to Quarto's pre-render; set PYTHIA_ATTRIBUTION_RESULTS"
            )
        made_from = build.render_key(args.profile, paper_dir, results, args.command)
        stamp = paper_dir / build.STAMP
        if not args.force and derived.is_current(paper_dir, stamp, made_from):
            print(
                f"{paper_dir / build.OUTPUT} is up to date for profile {args.profile} (--force renders again)"
            )
            return 0
        stamp.unlink(missing_ok=True)  # a render that fails part-way leaves no claim behind
        if args.command == "preview":
            values = build.assets(args.profile, paper_dir, results)
            html, pdf = build.preview(paper_dir, values)
            done = f"wrote {html} and {pdf}"
        else:
            from pythia_attribution.paper.data import Study

            name = build.manuscript(Study(results, args.profile))
            build.quarto(args.profile, paper_dir, name)
            done = f"rendered {paper_dir / name} with Quarto"
        derived.write_stamp(paper_dir, build.rendered_files(paper_dir), stamp, made_from)
        print(f"{done} from profile {args.profile} in {time.perf_counter() - started:.1f} s")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
