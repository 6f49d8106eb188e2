"""Binary-classification metrics with bootstrap intervals, for comparing scorers on the same cases.

All metrics are fractions in [0, 1] (log loss in nats). Cases may carry weights (1 / the
sampling rate of their class when negatives were subsampled): ROC AUC does not depend on the
class balance, so it is computed unweighted; PR AUC, log loss and ECE use the weights, so they
refer to the natural class balance.

Intervals are 95% percentile intervals of a stratified bootstrap (positives and negatives
resampled separately, so every replicate keeps both classes; Hanley & McNeil 1982 motivate
keeping the class counts fixed for AUC). A paired difference resamples the same cases for both
scorers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def weighted_ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error over `n_bins` equal-width probability bins, case-weighted."""
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    tot, ece = w.sum(), 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += w[m].sum() / tot * abs(np.average(y[m], weights=w[m]) - np.average(p[m], weights=w[m]))
    return float(ece)


def _point(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    pc = np.clip(p, 1e-7, 1 - 1e-7)
    return {"roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p, sample_weight=w)),
            "log_loss": float(np.average(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)), weights=w)),
            "ece": weighted_ece(y, p, w)}


def compare_scorers(y: Sequence[int], scores: Mapping[str, Sequence[float]], *, weights: Sequence[float] | None = None,
                    reference: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each scorer's ROC AUC, PR AUC, log loss and ECE with 95% bootstrap intervals, and its paired
    ROC AUC / PR AUC difference from `reference`.

    Args:
        y: 0/1 labels, shape (n,), both classes present.
        scores: scorer -> P(label 1) per case, each shape (n,).
        weights: per-case weights (see the module doc), default 1.

    Returns:
        scorer -> {"n", "positives", "roc_auc", "roc_auc_ci", "pr_auc", "pr_auc_ci", "log_loss",
        "log_loss_ci", "ece", and with a reference: "roc_auc_diff", "roc_auc_diff_ci",
        "pr_auc_diff", "pr_auc_diff_ci"}, values rounded to 4 decimals.

    Raises:
        ValueError: one class only, or a scorer's length differs from `y`.
    """
    ya = np.asarray(y, dtype=int)
    if len(set(ya.tolist())) < 2:
        raise ValueError(f"{len(ya)} cases of one class: no AUC")
    wa = np.ones(len(ya)) if weights is None else np.asarray(weights, dtype=float)
    ps = {k: np.asarray(v, dtype=float) for k, v in scores.items()}
    for k, v in ps.items():
        if len(v) != len(ya):
            raise ValueError(f"scorer {k}: {len(v)} scores for {len(ya)} labels")
    point = {k: _point(ya, v, wa) for k, v in ps.items()}
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(ya == 1), np.flatnonzero(ya == 0)
    reps: dict[str, list[dict[str, float]]] = {k: [] for k in ps}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for k, v in ps.items():
            reps[k].append(_point(ya[idx], v[idx], wa[idx]))

    def ci(vals: Sequence[float]) -> list[float]:
        return [round(float(np.percentile(vals, 2.5)), 4), round(float(np.percentile(vals, 97.5)), 4)]

    out: dict[str, dict[str, Any]] = {}
    for k in ps:
        r = reps[k]
        row: dict[str, Any] = {"n": len(ya), "positives": int(ya.sum())}
        for m in ("roc_auc", "pr_auc", "log_loss"):
            row[m] = round(point[k][m], 4)
            row[f"{m}_ci"] = ci([x[m] for x in r])
        row["ece"] = round(point[k]["ece"], 4)
        if reference is not None and reference in ps and k != reference:
            for m in ("roc_auc", "pr_auc"):
                row[f"{m}_diff"] = round(point[k][m] - point[reference][m], 4)
                row[f"{m}_diff_ci"] = ci([a[m] - b[m] for a, b in zip(r, reps[reference], strict=True)])
        out[k] = row
    return out
