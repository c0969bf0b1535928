"""Scoring at scale: queries x candidates per second and peak memory, from 10^4 to 10^5 rows.

A synthetic training index in bergson's on-disk format (random rows standing for projected
gradients: the scoring cost does not depend on where the rows came from) with pythia-70m's module
layout (6 layers x 4 Linear modules, projection 16: 24 x 256 = 6,144 dims per row, float16 as a GPU
build stores them), and a set of query rows. Each size runs in its own process, which builds the
files (not timed), then runs what the attribute stage runs for TrackStar: the autocorrelation
Hessian streamed over the index, then streaming scores with the running top-k, the tracing counts
against a truth set per query and the sampled summary, then per-module scores of the top-k rows.

Memory is sampled every 20 ms from /proc/self/status: ``RssAnon`` (the process's own memory:
what must stay flat), its peak over the whole run and over the streaming pass and the top-k step
(per-module scores of at most queries x k rows) alone, above the process's memory before it; and
``RssFile`` (pages of the memory-mapped index, which the kernel can drop at will). Usage:

    python experiments/benchmarks/scale.py --sizes 10000 100000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def memory_kib() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields["RssAnon"], fields["RssFile"]


class PeakMemory:
    """Peak RssAnon / RssFile over a block, sampled on a thread."""

    def __enter__(self):
        self.peak_anon, self.peak_file = memory_kib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            anon, file = memory_kib()
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def per_candidate(results: dict, sizes: list[int], names: list[str], digits: int = 1) -> str | None:
    """The memory per candidate of each named step, as a line: the slope of ``results[rows, name]
    ["mib"]`` between the smallest and the largest size (fixed costs cancel), and that carried to
    10^6 candidates as if it stayed linear. None with fewer than two sizes."""
    if len(sizes) < 2:
        return None
    lo, hi = min(sizes), max(sizes)
    per = {n: (results[hi, n]["mib"] - results[lo, n]["mib"]) * 2**20 / (hi - lo) for n in names}
    return (
        f"per candidate, from {lo} to {hi} rows: "
        + ", ".join(f"{n} {b / 1024:.{digits}f} KiB" for n, b in per.items())
        + "; carried to 10^6 candidates: "
        + ", ".join(f"{n} {b * 1e6 / 2**30:.{digits}f} GiB" for n, b in per.items())
    )


def run_child(*extra: str) -> dict:
    """Run the calling script again with this process's arguments plus ``extra`` (what puts it in
    its child mode, one measurement in a fresh process); the JSON it prints last."""
    cmd = [sys.executable, sys.argv[0], *sys.argv[1:], *extra]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_index(folder: Path, rows: int, modules: int, dim: int, dtype: str, seed: int) -> None:
    import numpy as np
    from bergson.gradients import GradientProcessor

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    grads = np.memmap(folder / "gradients.bin", mode="w+", dtype=dtype, shape=(rows, modules * dim))
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        grads[start : start + n] = rng.standard_normal((n, modules * dim), dtype=np.float32)
    grads.flush()
    del grads
    sizes = {f"layers.{m // 4}.module{m % 4}": dim for m in range(modules)}
    info = {
        "attribute_tokens": False,
        "num_items": rows,
        "num_grads": rows,
        "grad_sizes": sizes,
        "base_dtype": dtype,
    }
    (folder / "info.json").write_text(json.dumps(info))
    GradientProcessor(projection_dim=int(dim**0.5)).save(folder)


def child(args) -> dict:
    import numpy as np
    import torch

    from pythia_attribution.attribute import gradients
    from pythia_attribution.attribute.ranking import Ranking

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        train, queries = Path(tmp) / "train", Path(tmp) / "queries"
        write_index(train, args.rows, args.modules, args.dim, args.dtype, seed=1)
        write_index(queries, args.queries, args.modules, args.dim, "float32", seed=2)
        rng = np.random.default_rng(3)
        truth = [np.sort(rng.choice(args.rows, size=8, replace=False)) for _ in range(args.queries)]
        out = {"rows": args.rows, "queries": args.queries, "dims": args.modules * args.dim}
        baseline_anon, _ = memory_kib()
        peaks = {}
        start = time.perf_counter()
        with PeakMemory() as peak:
            hessian = gradients.autocorrelation_hessian(train, Path(tmp) / "hessian", args.chunk_rows)
        out["hessian_s"], peaks["hessian"] = time.perf_counter() - start, peak
        start = time.perf_counter()
        with PeakMemory() as peak:
            scorer = gradients.GradientScorer(
                train, queries, unit_norm=True, hessian_path=hessian, chunk_rows=args.chunk_rows
            )
            # two truth definitions, as the attribute stage counts (complete within partial)
            truths = {"partial": truth, "complete": [t[:2] for t in truth]}
            ranking = Ranking(args.queries, args.rows, args.k, truths, sample_size=args.sample, seed=0)
            ranking.consume(scorer.chunks(), scorer.totals)
        peaks["stream"] = peak
        with PeakMemory() as peak:
            ids, _ = ranking.top()
            scorer.per_module(np.unique(ids))
            [ranking.summary(q) for q in range(args.queries)]
            [ranking.tracing(q, name) for q in range(args.queries) for name in truths]
        out["score_s"], peaks["top-k"] = time.perf_counter() - start, peak
        for phase, p in peaks.items():
            out[f"anon_{phase}_mib"] = (p.peak_anon - baseline_anon) / 1024
        out["peak_anon_mib"] = max(out[f"anon_{phase}_mib"] for phase in peaks)
        out["peak_file_mib"] = max(p.peak_file for p in peaks.values()) / 1024
        out["pairs_per_s"] = args.rows * args.queries / out["score_s"]
        out["index_mib"] = (train / "gradients.bin").stat().st_size / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--modules", type=int, default=24, help="pythia-70m: 6 layers x 4 Linear modules")
    parser.add_argument("--dim", type=int, default=256, help="per-module dims (projection 16: 16 x 16)")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument(
        "--chunk-rows", type=int, default=4096, help="attribute.chunk_rows (the stage's default: 16384)"
    )
    parser.add_argument("--sample", type=int, default=100_000, help="attribute.summary_sample")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="where the synthetic indexes are written")
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.rows is not None:
        print(json.dumps(child(args)))
        return
    print(
        f"synthetic index: {args.modules} modules x {args.dim} dims ({args.dtype}), {args.queries} queries, "
        f"top {args.k}, chunks of {args.chunk_rows} rows, summary sample {args.sample}, "
        f"{args.threads} threads"
    )
    columns = ("index MiB", "hessian s", "score s", "q x c / s", "anon MiB", "stream", "top-k", "file MiB")
    print(f"{'rows':>9} " + " ".join(f"{c:>9}" for c in columns))
    results = []
    for rows in args.sizes:
        r = run_child("--rows", str(rows))
        results.append(r)
        print(
            f"{r['rows']:>9} {r['index_mib']:>9.0f} {r['hessian_s']:>9.2f} {r['score_s']:>8.2f} "
            f"{r['pairs_per_s']:>9.3g} {r['peak_anon_mib']:>9.0f} {r['anon_stream_mib']:>9.0f} "
            f"{r['anon_top-k_mib']:>9.0f} {r['peak_file_mib']:>9.0f}"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(
            f"{b['rows'] / a['rows']:.0f}x the rows: {b['score_s'] / a['score_s']:.1f}x the scoring time, "
            f"{b['peak_anon_mib'] / max(a['peak_anon_mib'], 1):.2f}x the peak anonymous memory "
            f"({b['anon_stream_mib'] / max(a['anon_stream_mib'], 1):.2f}x while streaming)"
        )


if __name__ == "__main__":
    main()
