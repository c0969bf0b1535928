"""bergson index building against plain forward + backward, on a GPU, at Pythia's real shapes.

A randomly initialised GPTNeoX with pythia-70m's and pythia-160m's exact configurations (their
public config.json values below; the weights do not change the cost), random training sequences
of 2,049 tokens cut to the model's 2,048 positions as the attribute stage cuts them, then in the
same run, in each ``--precision`` (fp32 is what the stages use, bergson's default, no TF32; bf16
is bergson's option for the model's parameters): (a) plain forward + backward over the same
batches (one sequence each: bergson's token batch cannot exceed 2,048) and (b)
``gradients.build_index``, the attribute stage's own call (per-module projection 16, no optimizer
normalizer). With ``--paired`` (fp32 only), also (c) ``gradients.build_index_pair``, the real
profiles' pass: the index normalized by an optimizer state (a synthetic one here, in the form
``moments.estimate`` writes) and the raw index in one forward and backward pass, and whether its
raw index equals (b)'s on this device. Prints tokens/s, ratios, the peak GPU memory of each, and
the GPU. bergson reports about 80k tokens/s per GPU for pythia-70m. Never needed for CI; run
whenever a GPU is at hand:

    python experiments/benchmarks/gpu_index.py --models 70m 160m --sequences 256 \
        --precision fp32 bf16 --paired

On a CPU it runs too (``--models tiny --sequences 4``), to check the script, not to measure.
Measured figures: README ("Measured", GPU benchmark) and docs/gpu-benchmark.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# config.json of EleutherAI/pythia-70m-deduped and -160m-deduped (architecture fields only)
SHAPES = {
    "70m": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048},
    "160m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
}
COMMON = {
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "gelu",
    "bos_token_id": 0,
    "eos_token_id": 0,
}


WARM = 2  # rows of the first call, which times a call's setup (loading the model, bergson's hooks)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> str:
    """The peak GPU memory since the last ``peak_reset`` ('' on a CPU)."""
    return f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""


def plain(model, rows: np.ndarray, device: str, dtype) -> float:
    """tokens/s of forward + backward, one sequence per batch (after one warm-up batch)."""
    model = model.to(device=device, dtype=dtype)

    def step(row):
        ids = torch.from_numpy(row[None].astype(np.int64)).to(device)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(rows[0])
    sync(device)
    start = time.perf_counter()
    for row in rows:
        step(row)
    sync(device)
    return len(rows) * (rows.shape[1] - 1) / (time.perf_counter() - start)


def synthetic_state(model, out: Path, seed: int) -> Path:
    """An ``optimizer.pt`` as ``moments.estimate`` writes it, with random positive second
    moments: what the normalizer divides by does not change the cost."""
    from pythia_attribution.attribute import moments

    generator = torch.Generator().manual_seed(seed)
    second = {
        name: torch.rand(p.shape, generator=generator) * 1e-6 + 1e-9 for name, p in model.named_parameters()
    }
    torch.save(moments.optimizer_state(second, 1, "random (gpu_index.py)"), out)
    return out


def main() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pythia_attribution.attribute import gradients

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["70m", "160m"], choices=list(SHAPES))
    parser.add_argument("--sequences", type=int, default=256, help=f"more than {WARM}")
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--paired", action="store_true", help="also time build_index_pair (fp32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.sequences <= WARM:
        parser.error(f"--sequences must be more than {WARM} (the warm-up call's rows)")
    if args.paired and "fp32" not in args.precision:
        parser.error("--paired compares with the fp32 index: --precision must include fp32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = (
        torch.cuda.get_device_name() if device == "cuda" else "CPU (a check of the script, not a measurement)"
    )
    print(f"device: {name}; torch {torch.__version__}")
    rng = np.random.default_rng(args.seed)
    rows = rng.integers(2, COMMON["vocab_size"], size=(args.sequences, 2049), dtype=np.int64)
    for key in args.models:
        torch.manual_seed(args.seed)
        config = GPTNeoXConfig(**COMMON, **SHAPES[key])
        model = GPTNeoXForCausalLM(config)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        cut = rows[:, : config.max_position_embeddings]  # what build_index keeps of a 2,049-token row
        tokens = cut.shape[1] - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "model"
            model.to(torch.float32).save_pretrained(checkpoint)
            per_call = {}
            for precision in args.precision:
                peak_reset(device)
                base = plain(model, cut, device, DTYPES[precision])
                base_peak = peak(device)
                model.to("cpu")
                peak_reset(device)
                kwargs = {
                    "labels": None, "optimizer_state": None, "projection_dim": args.projection_dim,
                    "token_batch_size": 2048, "precision": precision,
                }  # fmt: skip
                start = time.perf_counter()
                gradients.build_index(Path(tmp) / f"warm-{precision}", checkpoint, cut[:WARM], **kwargs)
                sync(device)
                setup = time.perf_counter() - start  # mostly loading the model; WARM rows' compute besides
                start = time.perf_counter()
                gradients.build_index(Path(tmp) / f"index-{precision}", checkpoint, cut, **kwargs)
                sync(device)
                seconds = time.perf_counter() - start
                built = per_call[precision] = len(cut) * tokens / seconds
                # a call costs setup + rows x per-row time, and the warm call did WARM rows: the
                # difference of the two calls is (rows - WARM) rows' compute alone
                # (meaningless when the rows are so few that the warm call's one-off costs, CUDA's
                # kernel loading say, outweigh the rows' compute: then it says so)
                steady = (len(cut) - WARM) * tokens / (seconds - setup) if seconds > setup else None
                print(
                    f"pythia-{key} shapes ({params:.0f}M parameters), {precision}, {len(cut)} x "
                    f"{cut.shape[1]} tokens: plain forward+backward {base:,.0f} tokens/s{base_peak}; "
                    f"bergson index {built:,.0f} tokens/s per call (ratio {built / base:.2f}), "
                    + (
                        f"{steady:,.0f} without the {setup:.1f} s setup of a call (ratio {steady / base:.2f})"
                        if steady
                        else f"no steady rate: the {WARM}-row warm call took longer than the whole call"
                    )
                    + peak(device),
                    flush=True,
                )
            if args.paired:
                opt = synthetic_state(model, Path(tmp) / "optimizer.pt", args.seed)
                peak_reset(device)
                start = time.perf_counter()
                gradients.build_index_pair(
                    Path(tmp) / "pair-adam", Path(tmp) / "pair-raw", checkpoint, cut, optimizer_state=opt,
                    projection_dim=args.projection_dim, token_batch_size=2048,
                )  # fmt: skip
                sync(device)
                pair = len(cut) * tokens / (time.perf_counter() - start)
                alone = np.asarray(gradients.module_blocks(Path(tmp) / "index-fp32")[0], dtype=np.float64)
                raw = np.asarray(gradients.module_blocks(Path(tmp) / "pair-raw")[0], dtype=np.float64)
                same = (
                    "identical"
                    if np.array_equal(alone, raw)
                    else f"max |difference| {np.max(np.abs(alone - raw)):.2e} of max |value| "
                    f"{np.max(np.abs(alone)):.2e}"
                )
                print(
                    f"pythia-{key} shapes, fp32: build_index_pair (normalized + raw indexes, one pass) "
                    f"{pair:,.0f} tokens/s per call (ratio {pair / per_call['fp32']:.2f} to one index's "
                    f"call); its raw index against build_index's on this device: {same}{peak(device)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
