"""Per-stage wall time of a cold run, then of an immediate second run (which must be a no-op).

    python experiments/benchmarks/stage_times.py --profile micro [--stages corpus train probe]
        [--processes one|per-stage]

Runs the stages as the CLI does, in a fresh results folder (source artifacts come from the
usual cache), and prints one line per stage plus totals. Pass ``--results DIR`` to keep the
outputs. ``--processes one`` (the default) runs the stages one after the other in one Python
process, as ``nox -s all`` (``python -m pythia_attribution all``) does since commit 4b85b6d, so
only the first stage pays for importing torch, transformers and bergson; the time outside the
stages (the interpreter's start and the CLI's imports) is printed on its own line.
``--processes per-stage`` runs each stage in its own process, as ``nox -s all`` did before
(each stage then pays for its own imports, about 9 s on micro).

Machine calibration, measured in the same run (before the stages and again after them, since a
machine's speed drifts): plain forward + backward tokens/s of the profile's model on random
tokens at the profile's thread count and under its ``runtime.cpu_isa`` cap (in a process of its
own, as the stages' kernels; before commit 4d82e54 the calibration ran uncapped in this process,
about 7% faster than capped on an AVX-512 machine, none on an AVX2 one). Each stage's time is
also printed in units of that calibration (Mtok: the stage costs as much as this many million
calibration tokens), which is what to compare between machines. Beside it, each stage's peak
resident memory in the cold run, from its ``_stage.json`` (``peak_rss_mib``: with ``--processes
one`` it includes what the process held when the stage began).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pythia_attribution.paths import STAGE_RECORD, STAGES

# Each stage through the CLI's own entry point, one after the other in this one process; prints
# {stage: seconds} as JSON.
ONE_PROCESS = """
import json, sys, time
from pythia_attribution import cli
times = {}
for stage in sys.argv[2:]:
    start = time.perf_counter()
    if cli.main([stage, "--profile", sys.argv[1], "-q"]):
        sys.exit(f"stage {stage} failed")
    times[stage] = time.perf_counter() - start
print(json.dumps(times))
"""


def timed(stage: str, profile: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pythia_attribution", stage, "--profile", profile, "-q"], env=env, check=True
    )
    return time.perf_counter() - start


def timed_together(stages: list[str], profile: str, env: dict) -> tuple[dict[str, float], float]:
    """Each stage's seconds, run in one process, and that process's whole wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, profile, *stages], env=env, check=True, stdout=subprocess.PIPE
    )
    wall = time.perf_counter() - start
    return json.loads(done.stdout.decode().strip().splitlines()[-1]), wall


# Forward + backward tokens/s of the profile's model (random tokens, its batch shape), in a process
# of its own so that its kernels are those the stages run: the profile's runtime.cpu_isa applied
# before torch loads, as the CLI does. Prints the tokens/s and the cap applied.
CALIBRATE = """
import sys, time
from pythia_attribution.cli import hold_cpu_isa
from pythia_attribution.config import load_profile
profile = load_profile(sys.argv[1])
applied = hold_cpu_isa(profile.runtime.cpu_isa)
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM
from pythia_attribution.model import pythia_config
torch.set_num_threads(profile.runtime.threads)
torch.manual_seed(0)
model = GPTNeoXForCausalLM(pythia_config(profile.train, profile.corpus.vocab_size))
shape = (profile.corpus.batch_size, profile.corpus.seq_len + 1)
tokens = torch.randint(0, profile.corpus.vocab_size, shape)
def step():
    logits = model(input_ids=tokens[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)
steps = int(sys.argv[2])
step()  # warm-up
start = time.perf_counter()
for _ in range(steps):
    step()
rate = steps * shape[0] * (shape[1] - 1) / (time.perf_counter() - start)
print(rate, profile.runtime.cpu_isa if applied else "none")
"""


def calibrate(profile_name: str, env: dict, steps: int = 8) -> tuple[float, str]:
    """Forward + backward tokens/s of the profile's model under the stages' kernel settings, and
    the instruction-set cap applied ('none': the libraries' own choice, or the user's variables)."""
    command = [sys.executable, "-c", CALIBRATE, profile_name, str(steps)]
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE)
    rate, isa = done.stdout.decode().split()[-2:]
    return float(rate), isa


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--results", help="results folder to use (default: a fresh temporary one)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages, in order")
    parser.add_argument(
        "--processes",
        choices=("one", "per-stage"),
        default="one",
        help="run the stages in one process, as nox -s all does (default), or each in its own",
    )
    args = parser.parse_args()
    if args.results:
        report(args, args.results)
        return
    with tempfile.TemporaryDirectory(prefix="pythia-attribution-bench-") as results:
        report(args, results)  # the outputs are removed afterwards (--results keeps them)


def cold_peaks(results: str, profile: str, stages: list[str]) -> dict[str, float | None]:
    """Each stage's ``peak_rss_mib`` from its record (the second run skips the stages and keeps the
    cold run's records); None where the platform could not measure it."""
    from pythia_attribution.config import load_profile

    name = load_profile(profile).name
    records = {s: Path(results) / name / s / STAGE_RECORD for s in stages}
    return {s: json.loads(path.read_text()).get("peak_rss_mib") for s, path in records.items()}


def report(args, results: str) -> None:
    env = {**os.environ, "PYTHIA_ATTRIBUTION_RESULTS": results}
    before, isa = calibrate(args.profile, env)
    outside = {}
    if args.processes == "one":
        cold, wall = timed_together(args.stages, args.profile, env)
        outside["cold"] = wall - sum(cold.values())
        warm, wall = timed_together(args.stages, args.profile, env)
        outside["warm"] = wall - sum(warm.values())
    else:
        cold = {s: timed(s, args.profile, env) for s in args.stages}
        warm = {s: timed(s, args.profile, env) for s in args.stages}
    after, _ = calibrate(args.profile, env)
    calibration = (before + after) / 2
    how = "one process" if args.processes == "one" else "one process per stage"
    kept = results if args.results else "a temporary folder, removed"
    print(f"profile {args.profile}, results in {kept}, the stages run in {how}")
    print(
        f"calibration: forward+backward {before:,.0f} tokens/s before the stages, {after:,.0f} after "
        f"(mean {calibration:,.0f}; 1 Mtok = {1e6 / calibration:.1f} s on this machine; "
        f"kernels capped at: {isa}, as the stages run them)"
    )
    peaks = cold_peaks(results, args.profile, args.stages)
    print(f"{'stage':<12} {'cold (s)':>10} {'cold (Mtok)':>12} {'second run (s)':>15} {'peak (GiB)':>11}")
    for s in args.stages:
        peak = f"{peaks[s] / 1024:>11.2f}" if peaks[s] is not None else f"{'n/a':>11}"
        print(f"{s:<12} {cold[s]:>10.1f} {cold[s] * calibration / 1e6:>12.2f} {warm[s]:>15.1f} {peak}")
    if outside:
        print(
            f"{'(outside)':<12} {outside['cold']:>10.1f} {outside['cold'] * calibration / 1e6:>12.2f} "
            f"{outside['warm']:>15.1f}   <- the process's start and imports before the first stage"
        )
    total = sum(cold.values()) + outside.get("cold", 0.0)
    warm_total = sum(warm.values()) + outside.get("warm", 0.0)
    print(f"{'total':<12} {total:>10.1f} {total * calibration / 1e6:>12.2f} {warm_total:>15.1f}")


if __name__ == "__main__":
    main()
