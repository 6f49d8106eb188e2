"""Paired comparison of two sentiment runs on the test cases they share (same ids, same gold).

    python -m eval.sentiment_eval --paired runs/sentiment-amazon_cells-llm-n150 \
        runs/sentiment-amazon_cells-bert-n150

Either side may be a run folder or a ``*.cases.jsonl`` file (e.g. one committed under
docs/results/), so a comparison can be redone without the model that made either run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.domain.stats import bootstrap_ci
from eval.runs import read_jsonl


def read_cases(path: Path) -> dict[str, dict[str, Any]]:
    """A run's case records by id, from a run folder (its cases.jsonl) or a cases file.

    Raises:
        FileNotFoundError: no such folder or file, or a folder without cases.jsonl.
    """
    path = Path(path)
    f = path / "cases.jsonl" if path.is_dir() else path
    if not f.exists():
        raise FileNotFoundError(f"{f}: no case records")
    return {r["id"]: r for r in read_jsonl(f)}


def paired_accuracy(first: Path, other: Path, n_boot: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Accuracy difference (other minus first) on the cases both runs scored.

    Returns:
        ``n`` shared cases; ``first`` / ``other`` accuracies on them and ``diff``, all in [0, 1]
        (diff in [-1, 1]); ``ci95`` a percentile bootstrap over cases (`n_boot` resamples,
        seeded) of the mean per-case difference; ``other_only_right`` / ``first_only_right``
        the discordant cases; ``mcnemar_p`` McNemar's exact two-sided test on them (McNemar,
        Psychometrika 1947: a binomial test of the discordant split against 1/2).

    Raises:
        ValueError: the runs share no case, or give a shared case different gold labels
            (they are not the same set).
    """
    from scipy.stats import binomtest

    a, b = read_cases(first), read_cases(other)
    ids = sorted(i for i in a if i in b)
    if not ids:
        raise ValueError(f"{first} and {other} share no test case (another set, n or seed?)")
    bad = [i for i in ids if a[i]["gold"] != b[i]["gold"]]
    if bad:
        raise ValueError(f"{len(bad)} shared cases have different gold labels (e.g. {bad[0]}): not the same set")
    ra = np.array([a[i]["pred"] == a[i]["gold"] for i in ids], dtype=float)
    rb = np.array([b[i]["pred"] == b[i]["gold"] for i in ids], dtype=float)
    d = rb - ra
    lo, hi = bootstrap_ci(d.tolist(), n_boot=n_boot, seed=seed)
    b_only, a_only = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(b_only, b_only + a_only, 0.5).pvalue if b_only + a_only else 1.0
    return {"n": len(ids), "first": float(ra.mean()), "other": float(rb.mean()), "diff": float(d.mean()),
            "ci95": (lo, hi), "other_only_right": b_only, "first_only_right": a_only, "mcnemar_p": float(p)}
