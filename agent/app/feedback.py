"""Recommendation feedback: what was shown, and what the user did with it.

Every next-item answer carries a recommendation id (uuid4 hex). The service logs the list it
showed under that id (`FeedbackStore.log_recommendation`); clients then report impressions,
clicks and purchases against it (`FeedbackStore.record`, ``POST /v1/feedback``), and the eval
harness replays the log into click-through numbers by answer stage (`FeedbackStore.replay`,
``GET /v1/feedback/report``, ``shoplens eval feedback``).

A progressive answer is logged more than once under one id (fast, then refined or explained);
each log replaces the shown list, and feedback counts against the list shown last, at that
position, labelled with that stage.

Storage: SQLite in WAL mode, ``<workspace>/feedback.sqlite3``, one connection shared by every
thread behind a lock (writes are one short row each).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from agent.data.sqlite import LockedSqlite
from agent.domain.errors import RequestError, UnknownRecommendationError

Stage = Literal["fast", "refined", "explained", "precomputed"]
"""How an answer was made: "fast" (retrieval fusion, no model), "refined" (LLM-ranked),
"explained" (LLM-ranked with the model's reasons), "precomputed" (served from a batch run)."""
FeedbackKind = Literal["impression", "click", "purchase"]
STAGES: tuple[Stage, ...] = ("fast", "refined", "explained", "precomputed")
KINDS: tuple[FeedbackKind, ...] = ("impression", "click", "purchase")
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval

_SCHEMA = """
CREATE TABLE IF NOT EXISTS recommendations (
    rec_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    user_id TEXT NOT NULL,
    stage TEXT NOT NULL,            -- the stage of the list shown last
    items TEXT NOT NULL,            -- JSON list of item ids, in shown order
    created_at REAL NOT NULL,       -- unix seconds, first log
    updated_at REAL NOT NULL        -- unix seconds, last log (a progressive upgrade)
);
CREATE INDEX IF NOT EXISTS recommendations_dataset ON recommendations (dataset);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rec_id TEXT NOT NULL REFERENCES recommendations (rec_id),
    item_id TEXT NOT NULL,
    kind TEXT NOT NULL,             -- impression | click | purchase
    position INTEGER NOT NULL,      -- 1-based, in the list shown when the feedback arrived
    stage TEXT NOT NULL,            -- that list's stage
    at REAL NOT NULL                -- unix seconds, the client's time or the arrival time
);
CREATE INDEX IF NOT EXISTS feedback_rec ON feedback (rec_id);
"""


class FeedbackEvent(BaseModel):
    """One recorded feedback event, as stored."""

    recommendation_id: str
    item_id: str
    kind: FeedbackKind
    position: int = Field(ge=1, description="1-based position of the item in the list shown")
    stage: Stage = Field(description="the stage of the list shown when the feedback arrived")
    at: float = Field(description="unix seconds")


class PositionCTR(BaseModel):
    """Click-through at one shown position (position bias shows up here).

    Counted over shown items (see `FeedbackSummary`): an item sits at the position of its first
    impression event."""

    position: int = Field(ge=1)
    impressions: int = Field(description="shown items at this position")
    clicks: int = Field(description="of them, the ones clicked at least once")
    ctr: float | None = Field(description="clicks / impressions, in [0, 1]; None without impressions")


class FeedbackSummary(BaseModel):
    """Counts and rates over one group of recommendations (a stage, or all).

    The unit is the *shown item*: a distinct (recommendation, item, stage) triple with at least
    one impression event. Clients' impression events are the only evidence of an item being
    seen (an answer's listed items are NOT assumed seen, so a client that logs no impressions
    gets no CTR). A shown item counts once in `impressions` however many impression events it
    has, and once in `clicks` however many times it was clicked, so CTR is a proportion in
    [0, 1]. Click events that cannot count are reported beside it: on an item with no impression
    (`clicks_without_impression`) or on a shown item already clicked (`repeat_clicks`); so
    click events = clicks + clicks_without_impression + repeat_clicks.
    """

    recommendations: int = Field(description="recommendation ids logged (by the stage shown last)")
    impressions: int = Field(description="shown items: distinct (recommendation, item, stage) with an impression event")
    clicks: int = Field(description="shown items clicked at least once")
    purchases: int = Field(description="purchase events")
    clicks_without_impression: int = Field(
        description="click events with no impression event for the same recommendation, item and stage "
                    "(orphan clicks; not in `clicks`)")
    repeat_clicks: int = Field(description="click events on a shown item after its first click (not in `clicks`)")
    ctr: float | None = Field(description="clicks / impressions, in [0, 1]; None without impressions")
    ctr_ci95: tuple[float, float] | None = Field(
        description="95% Wilson interval of the CTR (clicks of impressions); None without impressions")
    purchase_rate: float | None = Field(
        description="shown items purchased at least once / impressions, in [0, 1]; None without impressions")
    by_position: list[PositionCTR] = Field(description="CTR at positions 1..k, k the deepest position seen")


class FeedbackReport(BaseModel):
    """Click-through of what was shown, overall and by answer stage."""

    dataset: str | None = Field(description="the dataset replayed; None: every dataset")
    overall: FeedbackSummary
    by_stage: dict[Stage, FeedbackSummary] = Field(
        description="one summary per stage that has recommendations or feedback, in the order "
                    "fast, refined, explained, precomputed")


def rate(num: int, den: int) -> float | None:
    """`num / den`, or None when `den` is 0 (no denominator, no rate)."""
    return num / den if den else None


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion.

    Args:
        successes: k, with 0 <= k <= n.
        trials: n.
        z: the normal quantile (default 1.96: a two-sided 95% interval).

    Returns:
        (low, high), both probabilities in [0, 1]; None when `trials` is 0.

    Raises:
        ValueError: k < 0 or k > n.

    Source: E. B. Wilson, "Probable inference, the law of succession, and statistical
    inference", JASA 22 (1927); e.g. 2 of 10 gives (0.0567, 0.5098).
    """
    if not 0 <= successes <= max(trials, 0):
        raise ValueError(f"successes must be in [0, trials]; got {successes} of {trials}")
    if trials == 0:
        return None
    p, n, z2 = successes / trials, trials, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class FeedbackStore(LockedSqlite):
    """What each recommendation showed, and the feedback logged against it (SQLite, WAL).

    Thread-safe: one connection (``check_same_thread=False``) behind a lock. Call from a worker
    thread in async code (the service uses `asyncio.to_thread`).
    """

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    # ---- writes ---------------------------------------------------------------------------
    def log_recommendation(self, rec_id: str, dataset: str, user_id: str, item_ids: Sequence[str],
                           stage: str) -> None:
        """Record the list shown under `rec_id`, or replace it (a progressive answer upgraded
        from "fast" to "refined"/"explained"): feedback from now on counts against this list.
        The first log's dataset, user and ``created_at`` are kept; ``updated_at`` moves.

        Args:
            rec_id: the recommendation id the answer carries (uuid4 hex).
            item_ids: the shown items, best first (position 1 first).
            stage: one of "fast", "refined", "explained", "precomputed" (see `Stage`).

        Raises:
            ValueError: an unknown stage.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
        now = time.time()
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO recommendations (rec_id, dataset, user_id, stage, items, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(rec_id) DO UPDATE SET "
                "stage = excluded.stage, items = excluded.items, updated_at = excluded.updated_at",
                (rec_id, dataset, user_id, stage, json.dumps(list(item_ids)), now, now),
            )

    def record_event(self, rec_id: str, item_id: str, kind: FeedbackKind, at: float | None = None) -> FeedbackEvent:
        """Store one feedback event against the list `rec_id` showed last.

        Args:
            kind: "impression", "click" or "purchase".
            at: when it happened, unix seconds (default: now).

        Returns:
            The stored event: the item's 1-based shown position and the list's stage.

        Raises:
            UnknownRecommendationError: `rec_id` was never logged (404, param
                ``recommendation_id``).
            RequestError: the item was not in its list (param ``item_id``, code
                ``item_not_shown``), or `kind` is unknown (param ``kind``).
        """
        if kind not in KINDS:
            raise RequestError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}", param="kind")
        when = time.time() if at is None else float(at)
        if not math.isfinite(when):
            raise RequestError(f"timestamp must be finite unix seconds; got {at!r}", param="timestamp")
        with self._lock, self._conn:
            row = self._conn.execute("SELECT items, stage FROM recommendations WHERE rec_id = ?",
                                     (rec_id,)).fetchone()
            if row is None:
                raise UnknownRecommendationError(rec_id, message=f"recommendation_id {rec_id!r} not found: "
                                                 "send the id returned by POST /v1/next-item")
            items, stage = json.loads(row[0]), row[1]
            if item_id not in items:
                raise RequestError(f"item_id {item_id!r} was not shown in recommendation {rec_id!r}; "
                                   f"shown: {', '.join(items)}", param="item_id", code="item_not_shown")
            position = items.index(item_id) + 1
            self._conn.execute("INSERT INTO feedback (rec_id, item_id, kind, position, stage, at) "
                               "VALUES (?,?,?,?,?,?)", (rec_id, item_id, kind, position, stage, when))
        return FeedbackEvent(recommendation_id=rec_id, item_id=item_id, kind=kind, position=position,
                             stage=stage, at=when)

    def record(self, rec_id: str, item_id: str, kind: FeedbackKind, at: float | None = None) -> int:
        """`record_event`, returning only the item's 1-based shown position.

        Raises:
            RequestError: see `record_event`.
        """
        return self.record_event(rec_id, item_id, kind, at).position

    def forget_user(self, dataset: str, user_ids: Sequence[str]) -> int:
        """Delete the recommendations (and their feedback) logged for these ids of one user.

        Returns:
            How many recommendations were deleted.
        """
        if not user_ids:
            return 0
        marks = ",".join("?" * len(user_ids))
        with self._lock, self._conn:
            where = f"SELECT rec_id FROM recommendations WHERE dataset = ? AND user_id IN ({marks})"
            self._conn.execute(f"DELETE FROM feedback WHERE rec_id IN ({where})", (dataset, *user_ids))
            cur = self._conn.execute(f"DELETE FROM recommendations WHERE dataset = ? AND user_id IN ({marks})",
                                     (dataset, *user_ids))
            return cur.rowcount

    # ---- replay ---------------------------------------------------------------------------
    def replay(self, dataset: str | None = None) -> FeedbackReport:
        """Replay the log into click-through numbers, overall and by stage.

        Feedback is grouped by the stage recorded with each event (the list shown when it
        arrived); recommendations by the stage of the list they showed last. Counts are of
        shown items, distinct (recommendation, item, stage) triples with an impression event
        (shown items are not assumed seen), so CTR never exceeds 1 (see `FeedbackSummary`). A
        click counts as "without impression" when no impression event exists for the same
        recommendation, item and stage (in any order in time); a later click on an item
        already clicked is a repeat click.

        Args:
            dataset: only recommendations of this dataset; None: all.
        """
        ds_where, args = ("WHERE r.dataset = ?", (dataset,)) if dataset is not None else ("", ())
        with self._lock:
            recs = self._conn.execute(f"SELECT r.stage, COUNT(*) FROM recommendations r {ds_where} GROUP BY r.stage",
                                      args).fetchall()
            events = self._conn.execute(
                f"SELECT f.rec_id, f.item_id, f.kind, f.position, f.stage FROM feedback f "
                f"JOIN recommendations r ON r.rec_id = f.rec_id {ds_where} ORDER BY f.id", args).fetchall()
        n_recs: dict[str, int] = dict(recs)
        by_stage: dict[str, list[_Event]] = defaultdict(list)
        for event in events:
            by_stage[event[4]].append(event)
        stages = [s for s in STAGES if n_recs.get(s) or by_stage.get(s)]
        summaries = {s: _summary(n_recs.get(s, 0), by_stage.get(s, [])) for s in stages}
        overall = _summary(sum(n_recs.values()), [e for s in stages for e in by_stage[s]])
        return FeedbackReport(dataset=dataset, overall=overall, by_stage=summaries)


_Event = tuple[str, str, str, int, str]
"""One stored feedback event as replayed: (rec_id, item_id, kind, position, stage)."""


def _summary(recommendations: int, events: list[_Event]) -> FeedbackSummary:
    """The numbers of one group of events (a stage, or all), in the order they were stored.

    A shown item is a (rec_id, item_id, stage) with an impression event, at the position of its
    first one; clicks and purchases count once per shown item (see `FeedbackSummary`).
    """
    shown: dict[tuple[str, str, str], int] = {}
    for rec_id, item_id, kind, position, stage in events:
        if kind == "impression":
            shown.setdefault((rec_id, item_id, stage), position)
    clicked: set[tuple[str, str, str]] = set()
    purchased: set[tuple[str, str, str]] = set()
    orphans = repeats = purchases = 0
    for rec_id, item_id, kind, _, stage in events:
        key = (rec_id, item_id, stage)
        if kind == "click":
            if key not in shown:
                orphans += 1
            elif key in clicked:
                repeats += 1
            else:
                clicked.add(key)
        elif kind == "purchase":
            purchases += 1
            if key in shown:
                purchased.add(key)
    pos: dict[int, tuple[int, int]] = {}
    for key, p in shown.items():
        imp, clk = pos.get(p, (0, 0))
        pos[p] = (imp + 1, clk + (key in clicked))
    by_position = []
    for p in range(1, max(pos, default=0) + 1):  # every position down to the deepest seen
        imp, clk = pos.get(p, (0, 0))
        by_position.append(PositionCTR(position=p, impressions=imp, clicks=clk, ctr=rate(clk, imp)))
    impressions, clicks = len(shown), len(clicked)
    return FeedbackSummary(recommendations=recommendations, impressions=impressions, clicks=clicks,
                           purchases=purchases, clicks_without_impression=orphans, repeat_clicks=repeats,
                           ctr=rate(clicks, impressions), ctr_ci95=wilson_interval(clicks, impressions),
                           purchase_rate=rate(len(purchased), impressions), by_position=by_position)
