"""Influence concentration and ground-truth tracing metrics (with bootstrap intervals)."""

from __future__ import annotations

import numpy as np

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def concentration(scores: np.ndarray, tail_fraction: float = 0.1) -> dict:
    """Summary of one query's score distribution over all candidates.

    ``top1pct_share`` / ``top10pct_share``: share of the total positive score held by the top
    1% / 10% of candidates. ``tail_exponent``: Hill estimator of the power-law index of the
    positive scores' upper tail (the top ``tail_fraction`` of positive scores); smaller means
    heavier-tailed, i.e. influence concentrated on fewer sequences.
    """
    s = np.sort(scores.astype(np.float64))[::-1]
    positive = s[s > 0]
    total = positive.sum()
    n = len(s)
    out = {f"q{int(q * 1000):04d}": float(np.quantile(s, q)) for q in QUANTILES}
    out.update(
        {
            "max": float(s[0]),
            "min": float(s[-1]),
            "mean": float(s.mean()),
            "n_candidates": n,
            "n_positive": int(len(positive)),
            "top1pct_share": float(positive[: max(1, n // 100)].sum() / total) if total > 0 else float("nan"),
            "top10pct_share": float(positive[: max(1, n // 10)].sum() / total) if total > 0 else float("nan"),
        }
    )
    k = int(len(positive) * tail_fraction)
    if k >= 2:
        logs = np.log(positive[:k] / positive[k])
        out["tail_exponent"] = float(1.0 / logs.mean()) if logs.mean() > 0 else float("nan")
    else:
        out["tail_exponent"] = float("nan")
    out["tail_k"] = k
    return out


def tracing(scores: np.ndarray, truth: np.ndarray) -> dict:
    """MRR, recall@10, precision@10 and top-1 hit of one query against its ground-truth rows."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    hits = np.isin(order, truth)
    first = int(np.argmax(hits)) if hits.any() else None
    top10 = hits[:10].sum()
    return {
        "mrr": 0.0 if first is None else 1.0 / (first + 1),
        "first_hit_rank": -1 if first is None else first + 1,
        "recall_at_10": float(top10 / len(truth)),
        "precision_at_10": float(top10 / 10),
        "top1_hit": bool(hits[0]),
        "n_truth": int(len(truth)),
    }


def bootstrap_ci(
    values: np.ndarray, seed: int, n_boot: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over behaviors."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11, len(values)]))
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_ratio_ci(
    num: np.ndarray, den: np.ndarray, seed: int, n_boot: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den) over paired units (resampled together)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(num) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13, len(num)]))
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))
