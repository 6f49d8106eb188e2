"""Small statistics the product and the harness share (seeded, numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampling cases, seeded).

    A paired difference goes in as its per-case differences. Fewer than 2 values: the mean twice.
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        m = float(v.mean()) if len(v) else 0.0
        return m, m
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
