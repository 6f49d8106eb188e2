"""Popularity: how often each item occurs in the training sequences.

The classic "Pop" baseline of sequential-recommendation papers (e.g. LLMRank, Hou et al.,
ECIR 2024, Table 2) and a prior for fused rankers. Plain Python; knows nothing about agent/ or
eval/.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from retrieval.counts import added
from retrieval.files import write_atomic

FORMAT_VERSION = 1


class Popularity:
    """Item occurrence counts.

    ``score`` returns raw counts (``log=False``) or ``log(1 + count)``, the scale that fuses
    better with similarity scores.
    """

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.total: int = 0
        self._ranked: tuple[int, list[str]] | None = None  # (id of the counts it was sorted from, order)

    def fit(self, sequences: Iterable[Sequence[str]]) -> Popularity:
        """Count every occurrence of every item in ``sequences``.

        Returns:
            self, fitted.
        """
        counts: Counter[str] = Counter()
        for seq in sequences:
            counts.update(seq)
        self.count = dict(counts)
        self.total = sum(counts.values())
        return self

    def updated(self, changes: Iterable[tuple[Sequence[str], Sequence[str]]]) -> Popularity:
        """The counts `fit` would give had it seen each ``new`` sequence in place of its ``old``
        one (``[]``: none), without refitting; O(total length of the changed sequences).

        Returns:
            A new model; this one is left as it was (scoring in other threads is unaffected).
        """
        delta: Counter[str] = Counter()
        for old, new in changes:  # `old` is what the counts hold: no count goes below zero on the way
            delta.update(new)
            delta.subtract(old)
        count = added(self.count, delta)
        out = Popularity()
        out.count, out.total = count, sum(count.values())
        return out

    def score(self, candidates: Sequence[str], log: bool = False) -> dict[str, float]:
        """Popularity of each candidate; 0 for items never seen.

        Args:
            candidates: item ids.
            log: return ``log(1 + count)`` instead of the count.
        """
        if log:
            return {c: math.log1p(self.count.get(c, 0)) for c in candidates}
        return {c: float(self.count.get(c, 0)) for c in candidates}

    def top(self, n: int = 100, exclude: Iterable[str] = ()) -> list[str]:
        """The ``n`` most frequent items, most frequent first, ``exclude`` left out."""
        skip = set(exclude)
        out: list[str] = []
        for i in self._order():
            if len(out) >= n:
                break
            if i not in skip:
                out.append(i)
        return out

    def _order(self) -> list[str]:
        """Every item, most frequent first (ties by id): sorted once per fitted or loaded count
        table, not per call (sorting 100k items took ~0.15 s, most of a request's time at that
        catalogue size; bench/fastpath.py). Replacing `count` re-sorts; mutate it only through
        `fit`."""
        if self._ranked is None or self._ranked[0] != id(self.count):
            self._ranked = (id(self.count), sorted(self.count, key=lambda i: (-self.count[i], i)))
        return self._ranked[1]

    def save(self, path: str | Path) -> None:
        """Write counts as JSON (format version inside), atomically."""
        payload = {"format": "shoplens.popularity", "version": FORMAT_VERSION, "count": self.count}
        write_atomic(Path(path), json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path) -> Popularity:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is not a popularity file of a supported version.
        """
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != "shoplens.popularity" or payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a ShopLens popularity file (version {FORMAT_VERSION})")
        model = cls()
        model.count = {k: int(v) for k, v in payload["count"].items()}
        model.total = sum(model.count.values())
        return model
