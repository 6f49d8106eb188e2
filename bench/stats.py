"""Pure helpers for the benchmark: percentiles, latency summaries, recall, ratios.

No timing happens here, so everything is unit-tested against hand-computed values
(tests/test_bench_stats.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) by linear interpolation between closest ranks
    (numpy's default "linear" method, Hyndman & Fan type 7).

    Raises:
        ValueError: no values, or q outside [0, 100].
    """
    if not len(values):
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Latency summary of samples in seconds: n, mean, p50, p95, min, max (seconds)."""
    return {
        "n": len(seconds),
        "mean": float(sum(seconds) / len(seconds)),
        "p50": percentile(seconds, 50),
        "p95": percentile(seconds, 95),
        "min": float(min(seconds)),
        "max": float(max(seconds)),
    }


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is 0 (nothing to compare with)."""
    return None if denominator == 0 else numerator / denominator


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean recall@k of an approximate index against the exact one.

    Per query: |top-k approx ids ∩ top-k exact ids| / k, averaged over queries. FAISS marks a
    missing neighbour with id -1; it never counts as a hit.

    Args:
        approx: (n_queries, >= k) int ids from the approximate index, best first.
        exact: (n_queries, >= k) int ids from the exact index, best first.

    Raises:
        ValueError: shapes differ in the number of queries, or either has fewer than k columns.
    """
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"{approx.shape[0]} approximate vs {exact.shape[0]} exact queries")
    if approx.shape[1] < k or exact.shape[1] < k:
        raise ValueError(f"need at least k={k} neighbours per query")
    if approx.shape[0] == 0:
        return 0.0
    hits = 0
    for a, e in zip(approx[:, :k], exact[:, :k], strict=True):
        hits += len({int(x) for x in a if x >= 0} & {int(x) for x in e})
    return hits / (k * approx.shape[0])


def load_average() -> dict[str, float]:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``) and the CPU count; recorded at
    the start of each section so a run taken on a busy machine is visible."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2),
            "cpus": os.cpu_count() or 0}


def model_time_estimate(prompt_tokens: int, completion_tokens: int, pp_rate: float,
                        gen_rate: float) -> float:
    """The model's own time (seconds) from its measured rates, as issue #7 defines it:
    prompt_tokens / prompt-processing rate + completion_tokens / generation rate.

    Raises:
        ValueError: a rate is not positive.
    """
    if pp_rate <= 0 or gen_rate <= 0:
        raise ValueError(f"rates must be positive, got pp={pp_rate}, gen={gen_rate}")
    return prompt_tokens / pp_rate + completion_tokens / gen_rate
