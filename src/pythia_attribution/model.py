"""micro-Pythia: a transformers GPTNeoX with Pythia's architecture choices, and its loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging

from pythia_attribution.config import TrainConfig


def pythia_config(cfg: TrainConfig, vocab_size: int) -> GPTNeoXConfig:
    """Pythia's choices: rotary on 25% of head dims, parallel residual, untied embeddings."""
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.hidden,
        max_position_embeddings=cfg.max_positions,
        rotary_pct=cfg.rotary_pct,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        attn_implementation="sdpa",
    )


def set_threads(threads: int, *, keep_freed_memory: bool = True) -> None:
    """Set torch's thread count; also silence transformers' per-file progress bars, and (unless
    ``keep_freed_memory`` is false) keep the C allocator's freed memory for reuse
    (:func:`keep_freed_memory`)."""
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    if keep_freed_memory:
        keep_freed_memory_for_reuse()


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's allocator serve large blocks from its heap and keep what is freed there.

    torch's CPU tensors come from ``malloc``, and glibc maps every block above 32 MiB afresh with
    ``mmap`` and unmaps it on ``free``: each training step of micro allocates its logits, their
    log-probabilities and both gradients (134 MB each) and pays the kernel's page faults and
    zero-filling for every one. With ``M_MMAP_MAX`` 0 and a trim threshold of 2 GiB (the most
    ``mallopt`` takes) the blocks come from the heap and are reused. Only where memory comes from
    changes, not the arithmetic: the outputs are bit-identical, training 1.18 to 1.46 times as
    fast on one machine on two days, a raw gradient index 1.35 to 1.70 times
    (``experiments/benchmarks/allocator.py``). The cost: the process keeps its peak memory until
    it exits (1.39 times the peak there). Returns
    whether it applied (not where the C library has no working ``mallopt``: macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))


def model_limits(train_dir: Path, checkpoints: list[dict]) -> dict[int, tuple[int, int]]:
    """(max_position_embeddings, vocab_size) of every checkpoint, from its own config."""
    limits = {}
    for ckpt in checkpoints:
        config = AutoConfig.from_pretrained(train_dir / ckpt["path"])
        limits[ckpt["step"]] = (config.max_position_embeddings, config.vocab_size)
    return limits


def compute_device() -> str:
    """Where gradients and scores are computed: the first GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_checkpoint(path: Path, device: str = "cpu"):
    """Load a checkpoint folder (model and tokenizer) in eval mode on ``device``: the CPU unless the
    caller asks for another (the forward-only stages pass ``compute_device()``)."""
    model = GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@torch.no_grad()
def memorization_test(
    model, windows: np.ndarray, context: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact-match flags and teacher-forced accuracy for windows of ``context`` + continuation tokens.

    The language-model head, the largest matrix of a small model, runs on the continuation's
    positions only (``logits_to_keep``): half the test's time on micro, the same flags.
    """
    keep = windows.shape[1] - context
    memorized = np.zeros(len(windows), dtype=bool)
    accuracy = np.zeros(len(windows), dtype=np.float32)
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(np.asarray(windows[start : start + batch_size], dtype=np.int64)).to(
            model.device
        )
        logits = model(input_ids=batch[:, :-1], logits_to_keep=keep).logits
        hits = logits.argmax(-1) == batch[:, context:]
        memorized[start : start + len(batch)] = hits.all(dim=1).cpu().numpy()
        accuracy[start : start + len(batch)] = hits.float().mean(dim=1).cpu().numpy()
    return memorized, accuracy
