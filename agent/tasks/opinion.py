"""Opinion monitoring over stored reviews: sentiment per item per time window, turned items,
and a negative-review penalty that next-item ranking can apply. Pure code, no model.

A review's label comes from its star rating when present (1-2 negative, 3 neutral, 4-5
positive, the usual mapping for Amazon review data) and otherwise from a text scorer (the
lexicon baseline by default; pass a model-backed scorer to use the LLM).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent
from agent.tasks.sentiment import Polarity, lexicon_polarity

TextScorer = Callable[[str], Polarity]


def rating_polarity(stars: float) -> Polarity:
    """Stars 1-5 -> polarity: 1-2 negative, 3 neutral, 4-5 positive."""
    if stars <= 2:
        return "negative"
    return "neutral" if stars < 4 else "positive"


def review_polarity(ev: BehaviorEvent, scorer: TextScorer | None = None) -> tuple[Polarity, str] | None:
    """(polarity, 'rating'|'text') for a review event; None when it has neither rating nor text."""
    if ev.rating is not None:
        return rating_polarity(ev.rating), "rating"
    if ev.review_text and ev.review_text.strip():
        return (scorer or lexicon_polarity)(ev.review_text), "text"
    return None


@dataclass
class WindowStats:
    """Counts of one group in one window [start, end)."""

    start: str
    end: str
    n: int = 0
    negative: int = 0
    neutral: int = 0
    positive: int = 0

    @property
    def share_negative(self) -> float:
        return self.negative / self.n if self.n else 0.0


@dataclass
class GroupTrend:
    """One item's (or user's) windows, oldest first, and whether its sentiment turned."""

    key: str
    windows: list[WindowStats]
    n_reviews: int
    from_text: int = 0  # reviews labelled from text (no rating)
    turned: Literal["worse", "better"] | None = None
    delta_negative_pts: float | None = None  # share negative, last window minus the one before, x100
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for w, wd in zip(self.windows, d["windows"], strict=True):
            wd["share_negative"] = round(w.share_negative, 4)
        return d


def _reviews(events: Iterable[BehaviorEvent]) -> list[BehaviorEvent]:
    return [e for e in events if e.event_type == "review"]


def trends_from_events(
    events: Iterable[BehaviorEvent], *, by: Literal["item", "user"] = "item", window_days: int = 90,
    n_windows: int = 4, min_count: int = 5, turn_pts: float = 20.0, as_of: datetime | None = None,
    scorer: TextScorer | None = None,
) -> list[GroupTrend]:
    """Per-group sentiment in consecutive windows ending at `as_of`, and the turned groups.

    Args:
        by: group reviews by ``item`` or ``user``.
        window_days: window length in days; windows are anchored at `as_of` (default: the
            latest review), the last one being (as_of - window_days, as_of].
        n_windows: how many windows to report (oldest first).
        min_count: a turn needs at least this many reviews in both of the last two windows.
        turn_pts: a turn is a change of the negative share by more than this many percentage
            points between the last two windows (up: 'worse', down: 'better').
        scorer: polarity for reviews without a rating (default: the lexicon).

    Returns:
        One `GroupTrend` per group with a review in the reported windows; turned ones first
        (largest change first), then by review count.

    Raises:
        ValueError: bad `by`, `window_days` or `n_windows`.
    """
    if by not in ("item", "user"):
        raise ValueError(f"by must be 'item' or 'user', got {by!r}")
    if window_days < 1 or n_windows < 2:
        raise ValueError("window_days must be >= 1 and n_windows >= 2")
    revs = _reviews(events)
    if not revs:
        return []
    end = as_of or max(e.timestamp for e in revs)
    width = timedelta(days=window_days)
    starts = [end - width * (n_windows - i) for i in range(n_windows)]
    groups: dict[str, list[WindowStats]] = {}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in revs:
        if ev.timestamp > end or ev.timestamp <= starts[0]:
            continue
        idx = min(int((ev.timestamp - starts[0]) / width - 1e-9), n_windows - 1)
        lab = review_polarity(ev, scorer)
        if lab is None:
            continue
        key = ev.item_id if by == "item" else ev.user_id
        if key not in groups:
            groups[key] = [WindowStats(start=s.isoformat(), end=(s + width).isoformat()) for s in starts]
        w = groups[key][idx]
        w.n += 1
        setattr(w, lab[0], getattr(w, lab[0]) + 1)
        counts[key][0] += 1
        counts[key][1] += lab[1] == "text"
    out = []
    for key, wins in groups.items():
        t = GroupTrend(key=key, windows=wins, n_reviews=counts[key][0], from_text=counts[key][1])
        prev, last = wins[-2], wins[-1]
        if prev.n >= min_count and last.n >= min_count:
            delta = 100.0 * (last.share_negative - prev.share_negative)
            t.delta_negative_pts = round(delta, 2)
            if abs(delta) > turn_pts:
                t.turned = "worse" if delta > 0 else "better"
                t.reason = (f"negative share {100 * prev.share_negative:.0f}% -> {100 * last.share_negative:.0f}% "
                            f"({prev.n} -> {last.n} reviews) in the last two {window_days}-day windows")
        out.append(t)
    out.sort(key=lambda t: (t.turned is None, -abs(t.delta_negative_pts or 0.0), -t.n_reviews, t.key))
    return out


def sentiment_trends(store: EventStore, dataset: str, by: Literal["item", "user"] = "item",
                     window_days: int = 90, **kwargs: Any) -> list[GroupTrend]:
    """`trends_from_events` over a stored dataset's review events (see its arguments)."""
    return trends_from_events(store.iter_events(dataset), by=by, window_days=window_days, **kwargs)


def penalties_from_events(
    events: Iterable[BehaviorEvent], *, recent_days: int = 180, min_reviews: int = 3,
    threshold: float = 0.5, prior: float = 2.0, as_of: datetime | None = None,
    scorer: TextScorer | None = None,
) -> dict[str, dict[str, float]]:
    """Per item: recent review counts, smoothed negative share and penalty (see
    `negative_review_penalty`); only items with at least `min_reviews` recent reviews."""
    revs = _reviews(events)
    if not revs:
        return {}
    end = as_of or max(e.timestamp for e in revs)
    start = end - timedelta(days=recent_days)
    n: dict[str, int] = defaultdict(int)
    neg: dict[str, int] = defaultdict(int)
    for ev in revs:
        if not start < ev.timestamp <= end:
            continue
        lab = review_polarity(ev, scorer)
        if lab is None:
            continue
        n[ev.item_id] += 1
        neg[ev.item_id] += lab[0] == "negative"
    out = {}
    for item, cnt in n.items():
        if cnt < min_reviews:
            continue
        smoothed = neg[item] / (cnt + prior)  # shrunk toward 0: few reviews, little penalty
        penalty = max(0.0, (smoothed - threshold) / (1.0 - threshold))
        out[item] = {"n": cnt, "negative": neg[item], "share_negative": round(smoothed, 4),
                     "penalty": round(min(penalty, 1.0), 4)}
    return out


def negative_review_penalty(store: EventStore, dataset: str, **kwargs: Any) -> dict[str, float]:
    """Down-weighting factor in [0, 1] for items whose recent reviews are mostly negative.

    For each item with >= `min_reviews` reviews in the last `recent_days` (default 180) before
    `as_of` (default: the dataset's latest review): share_negative = n_negative / (n + prior)
    (prior 2 shrinks small counts toward 0), and penalty = (share_negative - threshold) /
    (1 - threshold) clipped to [0, 1] (threshold 0.5: "mostly negative"). Items with no
    penalty are left out. Use: ``score *= 1 - penalty`` (or subtract ``w * penalty``).

    Returns:
        item_id -> penalty in (0, 1].
    """
    details = penalties_from_events(store.iter_events(dataset), **kwargs)
    return {item: d["penalty"] for item, d in details.items() if d["penalty"] > 0}
