"""Training throughput of micro-Pythia under the options the CPU build of torch offers, in one run.

    python experiments/benchmarks/train_options.py --profile micro --steps 15 --rounds 2

Each variant runs the train stage's step (forward, cross-entropy, backward, clipping, AdamW with the
profile's two parameter groups) on the first batches of ``corpus.arrow``, in its own process (so
that environment variables such as OpenMP's wait policy apply from the start), at the profile's
thread count; variants alternate for ``--rounds`` rounds and the median is reported with its ratio
to ``baseline`` and whether the weights after the steps are bit-identical to the baseline's and to
the same variant's other rounds (a variant the train stage may use must be deterministic).

Variants: ``baseline`` (the train stage today), ``fused`` (AdamW's fused kernel), ``foreach_off``
(AdamW's per-tensor loop), ``passive`` / ``active`` (``OMP_WAIT_POLICY``), ``compile``
(``torch.compile`` of the model; the first step, which compiles, is timed separately),
``bf16`` (autocast to bfloat16), ``mmap`` (glibc's default allocator settings, which map every
block above 32 MiB afresh; every other variant runs with ``model.keep_freed_memory_for_reuse``, as
the stages do since it was measured here) and ``heap_env`` (the same allocator settings through
glibc's environment variables, from the process's start, to check the runtime call matches them).

``--profile-ops N`` instead shows where a baseline step's time goes: first ``N`` steps timed
phase by phase without a profiler (forward, loss, backward, clipping and AdamW), with the minor
page faults of each phase; then ``N`` steps under torch's profiler (the operators with the most
self CPU time) with the page faults it causes, since under the profiler large blocks are faulted in
afresh again and the operators that touch them look slower than they are; then the
language-model head's share of a step, timed against whole steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

VARIANTS = ["baseline", "fused", "foreach_off", "passive", "active", "compile", "bf16", "mmap", "heap_env"]
ENV = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "heap_env": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
}


def one(profile_name: str, variant: str, steps: int, profile_ops: bool = False) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXForCausalLM

    from pythia_attribution import paths, tables
    from pythia_attribution.config import load_profile
    from pythia_attribution.model import pythia_config, set_threads
    from pythia_attribution.train import param_groups

    profile = load_profile(profile_name)
    cfg = profile.train
    set_threads(profile.runtime.threads, keep_freed_memory=variant != "mmap")
    corpus = tables.read_table(
        paths.table_path(paths.stage_dir(profile.name, paths.CORPUS), paths.CORPUS_TABLE), made_by="corpus"
    )
    width = corpus.schema.field("input_ids").type.list_size
    batch = profile.corpus.batch_size
    rows = corpus.slice(0, batch * (steps + 1))["input_ids"].combine_chunks().flatten().to_numpy()
    tokens = torch.from_numpy(np.asarray(rows, dtype=np.int64).reshape(-1, width))
    torch.manual_seed(profile.runtime.seed)
    model = GPTNeoXForCausalLM(pythia_config(cfg, profile.corpus.vocab_size))
    model.train()
    kwargs = {"fused": True} if variant == "fused" else {"foreach": False} if variant == "foreach_off" else {}
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
    )
    forward = torch.compile(model) if variant == "compile" else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()

    def step(b, mark=lambda phase: None) -> None:
        with autocast:
            logits = forward(input_ids=b[:, :-1]).logits
        mark("forward")
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1))
        mark("loss")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("clip and AdamW")

    start = time.perf_counter()
    step(tokens[:batch])  # warm-up (compiles under `compile`)
    first = time.perf_counter() - start
    if profile_ops:
        import resource

        from torch.profiler import ProfilerActivity, profile

        def faults() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        spent: dict[str, tuple[float, int]] = {}  # phase -> (seconds, page faults), all steps
        last = [time.perf_counter(), faults()]  # when and at what count the previous phase ended

        def mark(phase: str) -> None:
            now, count = time.perf_counter(), faults()
            seconds, faulted = spent.get(phase, (0.0, 0))
            spent[phase] = (seconds + now - last[0], faulted + count - last[1])
            last[:] = [now, count]

        for s in range(1, steps + 1):
            step(tokens[s * batch : (s + 1) * batch], mark)
        total = sum(seconds for seconds, _ in spent.values())
        print(f"{steps} steps without a profiler: {total / steps:.3f} s a step")
        for phase, (seconds, faulted) in spent.items():
            share = f"{seconds / steps:.3f} s ({seconds / total:.0%})"
            print(f"  {phase:<15} {share:<13} {faulted / steps:,.0f} page faults a step")
        before = faults()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(1, steps + 1):
                step(tokens[s * batch : (s + 1) * batch])
        print(f"{steps} steps under torch's profiler: {(faults() - before) / steps:,.0f} page faults a step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        # The language-model head alone: its forward, the cross-entropy and their backward, on
        # hidden states of the step's shape, against whole steps, timed alternately.
        head = model.get_output_embeddings()
        hidden = torch.randn(batch * (width - 1), head.in_features, requires_grad=True)
        labels = tokens[1 : batch + 1, 1:].reshape(-1)
        spent = {"step": 0.0, "head": 0.0}
        for s in range(1, steps + 1):
            start = time.perf_counter()
            step(tokens[s * batch : (s + 1) * batch])
            spent["step"] += time.perf_counter() - start
            start = time.perf_counter()
            F.cross_entropy(head(hidden), labels).backward()
            head.zero_grad(set_to_none=True)
            spent["head"] += time.perf_counter() - start
        share = spent["head"] / spent["step"]
        print(f"language-model head (forward, cross-entropy, backward): {share:.0%} of a step")
        return {}
    start = time.perf_counter()
    for s in range(1, steps + 1):
        step(tokens[s * batch : (s + 1) * batch])
    elapsed = time.perf_counter() - start
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    rate = steps * batch * (width - 1) / elapsed
    return {"tokens_per_s": rate, "first_step_s": first, "weights": digest.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="micro")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile-ops", type=int, default=0, metavar="N", help="profile N baseline steps")
    args = parser.parse_args()
    if args.profile_ops:
        one(args.profile, "baseline", args.profile_ops, profile_ops=True)
        return
    if args.child:
        print(json.dumps(one(args.profile, args.child, args.steps)))
        return
    # the baseline always runs: every ratio and the weights' comparison are against it
    results: dict[str, list[dict]] = {v: [] for v in ["baseline", *args.variants]}
    for _ in range(args.rounds):
        for variant in results:
            command = [sys.executable, __file__, "--profile", args.profile, "--steps", str(args.steps)]
            out = subprocess.run(
                [*command, "--child", variant],
                env={**os.environ, **ENV.get(variant, {})},
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results["baseline"]
    base_rate = float(np.median([r["tokens_per_s"] for r in base]))
    print(f"profile {args.profile}: {args.steps} timed steps after one warm-up step, {args.rounds} rounds")
    print(f"{'variant':<12} {'tokens/s':>9} {'ratio':>6} {'first step s':>13}  weights")
    for variant, runs in results.items():
        rate = float(np.median([r["tokens_per_s"] for r in runs]))
        first = float(np.median([r["first_step_s"] for r in runs]))
        same_runs = len({r["weights"] for r in runs}) == 1
        same_base = runs[0]["weights"] == base[0]["weights"]
        weights = ("= baseline" if same_base else "differ from baseline") + (
            ", same every round" if same_runs else ", DIFFER between rounds"
        )
        print(f"{variant:<12} {rate:9.0f} {rate / base_rate:6.2f} {first:13.2f}  {weights}")


if __name__ == "__main__":
    main()
