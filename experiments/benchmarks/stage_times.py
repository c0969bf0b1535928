"""Per-stage wall time of a cold run, then of an immediate second run (which must be a no-op).

    python experiments/benchmarks/stage_times.py --profile micro [--stages corpus train probe]

Runs each stage as the CLI does, in a fresh results folder (source artifacts come from the
usual cache), and prints one line per stage plus totals. Pass ``--results DIR`` to keep the
outputs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from pythia_attribution.paths import STAGES


def timed(stage: str, profile: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pythia_attribution", stage, "--profile", profile, "-q"], env=env, check=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--results", help="results folder to use (default: a fresh temporary one)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages, in order")
    args = parser.parse_args()
    results = args.results or tempfile.mkdtemp(prefix="pythia-attribution-bench-")
    env = {**os.environ, "PYTHIA_ATTRIBUTION_RESULTS": results}
    cold = {s: timed(s, args.profile, env) for s in args.stages}
    warm = {s: timed(s, args.profile, env) for s in args.stages}
    print(f"profile {args.profile}, results in {results}")
    print(f"{'stage':<12} {'cold (s)':>10} {'second run (s)':>15}")
    for s in args.stages:
        print(f"{s:<12} {cold[s]:>10.1f} {warm[s]:>15.1f}")
    print(f"{'total':<12} {sum(cold.values()):>10.1f} {sum(warm.values()):>15.1f}")


if __name__ == "__main__":
    main()
