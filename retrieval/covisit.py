"""Co-visitation: item-to-item scores counted from behaviour sequences.

Two count tables are kept, both sparse ``item -> {item: weight}``:

* ``forward``: directional transitions, ``a -> b`` when ``b`` follows ``a`` within ``window``
  positions, weighted ``distance_decay ** (distance - 1)``: "what do people take next after a".
* ``cooc``: symmetric co-occurrence, once per (sequence, unordered pair) within
  ``cooc_window`` positions (``None``: anywhere in the sequence, i.e. item-based collaborative
  filtering over user-item sets, Sarwar et al., WWW 2001).

Scoring a history sums, over its most recent items (weight ``recency ** age``, newest first),
the normalised forward and co-occurrence weights to each candidate. Normalisation ``cosine``
divides a count by ``sqrt(n_a * n_b)`` (item occurrence counts), which keeps blockbusters from
dominating every row; ``row`` turns a row into P(b | a).

Knows nothing about agent/ or eval/: plain Python and numpy.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from retrieval.counts import added
from retrieval.files import write_atomic

Normalisation = Literal["cosine", "row", "none"]

FORMAT_VERSION = 1
_ZERO = 1e-9  # a count at or below this after `updated` subtracts it is gone (fit never stores one)


@dataclass(frozen=True)
class CoVisitationConfig:
    """Counting and scoring parameters; every default was picked on validation users.

    The validation users are Games-6k users outside the paper's Games-200 (see
    eval/run_llmrank_baselines.py); ranking with 20 random candidates.
    """

    window: int = 3  # forward transitions up to 3 steps ahead (1, 3 and 5 within 0.2 NDCG@10)
    distance_decay: float = 0.5  # a step further ahead counts half as much
    cooc_window: int | None = None  # None: whole-sequence co-occurrence (item CF)
    recency: float = 0.7  # weight of the k-th most recent history item: recency ** k (0.5: -1.3)
    max_history: int = 20  # only the 20 most recent items vote
    forward_weight: float = 1.0
    cooc_weight: float = 0.5  # 0.5..2 within 0.2 NDCG@10; either table alone loses 1-3 points
    # "none" beat "cosine" and "row" by ~1 NDCG@10: with random negatives the popularity that
    # raw counts carry is itself evidence.
    normalisation: Normalisation = "none"


class CoVisitation:
    """Item-to-item co-visitation counts with a recency-weighted scorer.

    Usage::

        cv = CoVisitation().fit(sequences)
        cv.score(history, candidates)  # {candidate: score}, 0.0 for unseen pairs
        cv.score(history, top_n=100)   # the 100 best items overall (candidate generation)
    """

    def __init__(self, config: CoVisitationConfig | None = None) -> None:
        self.config = config or CoVisitationConfig()
        self.forward: dict[str, dict[str, float]] = {}
        self.cooc: dict[str, dict[str, float]] = {}
        self.item_count: dict[str, int] = {}
        self._forward_row: dict[str, float] = {}
        self._cooc_row: dict[str, float] = {}

    # --- counting --------------------------------------------------------------------------

    def fit(self, sequences: Iterable[Sequence[str]]) -> CoVisitation:
        """Count transitions and co-occurrences.

        Args:
            sequences: item-id sequences, each chronological (oldest first). Whatever is passed
                is what the model knows: leave evaluated users' targets out.

        Returns:
            self, fitted.
        """
        cfg = self.config
        if cfg.window < 1:
            raise ValueError(f"window must be >= 1, got {cfg.window}")
        # Weights are floats (distance decay), which Counter's int-valued typing rejects; rows
        # start at int 0 exactly as a Counter's missing keys do.
        forward: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(int))
        cooc: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(int))
        counts: Counter[str] = Counter()
        for seq in sequences:
            seq = list(seq)
            counts.update(seq)
            n = len(seq)
            for i, a in enumerate(seq):
                for d in range(1, min(cfg.window, n - 1 - i) + 1):
                    b = seq[i + d]
                    if b != a:
                        forward[a][b] += cfg.distance_decay ** (d - 1)
            pairs: set[tuple[str, str]] = set()
            span = n if cfg.cooc_window is None else cfg.cooc_window
            for i, a in enumerate(seq):
                for j in range(i + 1, min(n, i + span + 1)):
                    b = seq[j]
                    if b != a:
                        pairs.add((a, b) if a < b else (b, a))
            for a, b in pairs:
                cooc[a][b] += 1.0
                cooc[b][a] += 1.0
        self.forward = {a: dict(row) for a, row in forward.items()}
        self.cooc = {a: dict(row) for a, row in cooc.items()}
        self.item_count = dict(counts)
        self._index()
        return self

    def updated(self, changes: Iterable[tuple[Sequence[str], Sequence[str]]]) -> CoVisitation:
        """The counts `fit` would give had it seen each ``new`` sequence in place of its ``old``
        one, without refitting: each change subtracts what ``old`` added and adds what ``new``
        adds (``[]`` is no sequence: a new user has ``old == []``, a deleted one ``new == []``).
        With the default ``distance_decay`` of 0.5 every weight is a binary fraction, so the
        result equals a refit exactly.

        Cost per change: forward transitions O(len(new) * window), only those into the appended
        items when ``new`` extends ``old`` (events arrive in time order), else both sequences';
        whole-sequence co-occurrence depends only on each sequence's set of items, so only the
        pairs of items that entered or left the set are counted, O(changed items * distinct
        items); windowed co-occurrence O((len(old) + len(new)) * cooc_window).

        Args:
            changes: (old, new) item-id sequences, each chronological. ``old`` must be what the
                counts hold for that sequence, or the counts go wrong.

        Returns:
            A new model; this one is left as it was (rows no change touches are shared), so
            scoring in other threads sees either the old counts or the new ones.
        """
        cfg = self.config
        fwd: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        cooc: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        counts: Counter[str] = Counter()
        for old_seq, new_seq in changes:
            old, new = list(old_seq), list(new_seq)
            if old == new:
                continue
            if new[: len(old)] == old:  # appended: only the transitions into the new items are new
                counts.update(new[len(old):])
                self._transitions(new, len(old), 1.0, fwd)
            else:
                counts.subtract(old)
                counts.update(new)
                self._transitions(old, 0, -1.0, fwd)
                self._transitions(new, 0, 1.0, fwd)
            if cfg.cooc_window is None:  # every pair of different items in the sequence, once
                old_set, new_set = set(old), set(new)
                gone, came = _pairs_with(old_set - new_set, old_set), _pairs_with(new_set - old_set, new_set)
            else:
                before, after = _pairs(old, cfg.cooc_window), _pairs(new, cfg.cooc_window)
                gone, came = before - after, after - before
            for pairs, sign in ((gone, -1.0), (came, 1.0)):
                for a, b in pairs:
                    cooc[a][b] += sign
                    cooc[b][a] += sign
        out = CoVisitation(cfg)
        out.forward, out._forward_row = _apply(self.forward, self._forward_row, fwd)
        out.cooc, out._cooc_row = _apply(self.cooc, self._cooc_row, cooc)
        out.item_count = added(self.item_count, counts)
        return out

    def _transitions(self, seq: list[str], start: int, sign: float,
                     fwd: defaultdict[str, defaultdict[str, float]]) -> None:
        """Add `sign` times the forward transitions `fit` counts in `seq` that end at or after
        position `start` (0: all of them) to `fwd`."""
        cfg = self.config
        for j in range(start, len(seq)):
            b = seq[j]
            for d in range(1, min(cfg.window, j) + 1):
                if (a := seq[j - d]) != b:
                    fwd[a][b] += sign * cfg.distance_decay ** (d - 1)

    def with_config(self, **changes: object) -> CoVisitation:
        """A scorer sharing these counts with different scoring parameters.

        Only scoring fields (``recency``, ``max_history``, ``forward_weight``, ``cooc_weight``,
        ``normalisation``) may change; the counting fields describe the counts themselves.

        Raises:
            ValueError: a counting field (``window``, ``distance_decay``, ``cooc_window``).
        """
        counting = {"window", "distance_decay", "cooc_window"} & set(changes)
        if counting:
            raise ValueError(f"{sorted(counting)} describe the counts; refit to change them")
        view = CoVisitation(replace(self.config, **changes))  # type: ignore[arg-type]
        view.forward, view.cooc, view.item_count = self.forward, self.cooc, self.item_count
        view._forward_row, view._cooc_row = self._forward_row, self._cooc_row
        return view

    def _index(self) -> None:
        self._forward_row = {a: sum(row.values()) for a, row in self.forward.items()}
        self._cooc_row = {a: sum(row.values()) for a, row in self.cooc.items()}

    # --- scoring ---------------------------------------------------------------------------

    def _norm(self, table: str, a: str, b: str, w: float) -> float:
        mode = self.config.normalisation
        if mode == "none":
            return w
        if mode == "row":
            rows = self._forward_row if table == "forward" else self._cooc_row
            return w / rows[a]
        return w / math.sqrt(self.item_count.get(a, 1) * self.item_count.get(b, 1))

    def _neighbours(self, history: Sequence[str]) -> dict[str, float]:
        cfg = self.config
        recent = list(history)[::-1][: cfg.max_history]
        acc: defaultdict[str, float] = defaultdict(float)
        for age, h in enumerate(recent):
            w = cfg.recency**age
            if cfg.forward_weight:
                for b, c in self.forward.get(h, {}).items():
                    acc[b] += w * cfg.forward_weight * self._norm("forward", h, b, c)
            if cfg.cooc_weight:
                for b, c in self.cooc.get(h, {}).items():
                    acc[b] += w * cfg.cooc_weight * self._norm("cooc", h, b, c)
        return acc

    def _pair(self, h: str, c: str) -> float:
        cfg = self.config
        s = 0.0
        if cfg.forward_weight and (f := self.forward.get(h, {}).get(c)):
            s += cfg.forward_weight * self._norm("forward", h, c, f)
        if cfg.cooc_weight and (o := self.cooc.get(h, {}).get(c)):
            s += cfg.cooc_weight * self._norm("cooc", h, c, o)
        return s

    def score(
        self,
        history: Sequence[str],
        candidates: Sequence[str] | None = None,
        top_n: int = 100,
    ) -> dict[str, float]:
        """Recency-weighted co-visitation scores.

        Args:
            history: the user's item ids, chronological (oldest first).
            candidates: ids to score; every one gets a key (0.0 when never seen with the
                history). ``None``: candidate generation, the ``top_n`` best items overall,
                items already in the history excluded.
            top_n: how many items to return when ``candidates`` is None.

        Returns:
            item id -> score (higher is better); with ``candidates`` None, best first.
        """
        if candidates is not None:
            cfg = self.config
            recent = list(history)[::-1][: cfg.max_history]
            out = {c: 0.0 for c in candidates}
            for age, h in enumerate(recent):
                w = cfg.recency**age
                for c in out:
                    if c != h:
                        out[c] += w * self._pair(h, c)
            return out
        acc = self._neighbours(history)
        seen = set(history)
        best = sorted((kv for kv in acc.items() if kv[0] not in seen), key=lambda kv: -kv[1])
        return dict(best[:top_n])

    # --- persistence -----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write counts and config as one JSON file (format version inside), atomically."""
        payload = {
            "format": "shoplens.covisitation",
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "item_count": self.item_count,
            "forward": self.forward,
            "cooc": self.cooc,
        }
        write_atomic(Path(path), json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path) -> CoVisitation:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is not a co-visitation file of a supported version.
        """
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != "shoplens.covisitation":
            raise ValueError(f"{path}: not a ShopLens co-visitation file")
        if payload.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format version {payload.get('version')}, expected {FORMAT_VERSION}"
            )
        model = cls(CoVisitationConfig(**payload["config"]))
        model.item_count = {k: int(v) for k, v in payload["item_count"].items()}
        model.forward = payload["forward"]
        model.cooc = payload["cooc"]
        model._index()
        return model


def _pairs(seq: Sequence[str], span: int) -> set[tuple[str, str]]:
    """The unordered pairs of different items `fit` counts as co-occurring in `seq` with a
    ``cooc_window`` of `span`: positions at most `span` apart, each pair once, as (smaller,
    larger)."""
    out: set[tuple[str, str]] = set()
    for j, b in enumerate(seq):
        for a in seq[max(0, j - span): j]:
            if a != b:
                out.add((a, b) if a < b else (b, a))
    return out


def _pairs_with(items: set[str], universe: set[str]) -> set[tuple[str, str]]:
    """Every unordered pair of different items with at least one in `items` and both in
    `universe` (`items` is a subset of it), as (smaller, larger)."""
    return {(a, b) if a < b else (b, a) for a in items for b in universe if a != b}


def _apply(table: dict[str, dict[str, float]], sums: dict[str, float],
           delta: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(`table` plus `delta`, its row sums): a new top-level dict, new rows only where `delta`
    touches them, entries at or below zero dropped (as `fit` never stores them)."""
    out, out_sums = dict(table), dict(sums)
    for a, changes in delta.items():
        row = added(table.get(a, {}), changes, floor=_ZERO)
        if row:
            out[a], out_sums[a] = row, sum(row.values())
        else:
            out.pop(a, None)
            out_sums.pop(a, None)
    return out, out_sums
