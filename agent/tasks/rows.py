"""Labelled rows the task baselines are trained on, shared by the service and the eval harness.

* `iter_user_events`: (user id, events oldest first) for every user of a dataset.
* `intent_rows` / `fit_intent_baseline`: (user, item) pairs with funnel features, label "bought
  the item within the horizon after the cut-off".
* `churn_rows` / `fit_churn_baseline`: buyers with RFM features, label "no purchase within the
  horizon" (churned).
* `session_intent_rows`: (session, cut) rows, label "a purchase later in the session or within
  the horizon" (`agent.tasks.session_intent.session_rows`).
* `robust_end`: a dataset's last timestamp ignoring stray future rows; `horizon_key`: the horizon
  part of a baseline's cache key.

No event at or after a cut-off reaches a row's features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.data.store import EventStore
from agent.domain.errors import RequestError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.tasks.churn import RFM_FEATURES, rfm_vector
from agent.tasks.common import LogisticBaseline
from agent.tasks.intent import INTENT_FEATURES, Funnel, funnel_features
from agent.tasks.profile import UserFeatures, catalogue_prices, user_features
from agent.tasks.session_intent import SessionRow, session_rows

__all__ = [
    "INTENT_LOOKBACK_H", "SESSION_CUT", "ChurnRow", "IntentRow", "churn_rows", "fit_churn_baseline",
    "fit_intent_baseline", "horizon_key", "intent_rows", "iter_user_events", "robust_end", "session_intent_rows",
]

INTENT_LOOKBACK_H = 72.0  # candidate pairs: items the user touched in the 72 h before the cut-off
SESSION_CUT = "k3"  # session intent rows: the as-of time is just after a session's first 3 events


def iter_user_events(store: EventStore, dataset: str) -> Iterator[tuple[str, list[BehaviorEvent]]]:
    """(user id, events oldest first) for every user of a dataset, one user at a time."""
    cur: str | None = None
    buf: list[BehaviorEvent] = []
    for e in store.iter_events(dataset):
        if e.user_id != cur:
            if cur is not None:
                yield cur, buf
            cur, buf = e.user_id, []
        buf.append(e)
    if cur is not None:
        yield cur, buf


@dataclass
class IntentRow:
    user_id: str
    item_id: str
    funnel: Funnel
    label: int  # 1: bought the item within the horizon after the cut-off


def intent_rows(store: EventStore, dataset: str, cutoff: datetime, horizon_h: float,
                catalog: dict[str, CatalogItem], lookback_h: float = INTENT_LOOKBACK_H) -> list[IntentRow]:
    """Labelled (user, item) pairs: items viewed/clicked/carted/favourited in the `lookback_h`
    hours before `cutoff`; features from events strictly before `cutoff`, label from
    [cutoff, cutoff + horizon_h hours)."""
    start, end = cutoff - timedelta(hours=lookback_h), cutoff + timedelta(hours=horizon_h)
    rows = []
    for uid, evs in iter_user_events(store, dataset):
        before = [e for e in evs if e.timestamp < cutoff]
        bought = {e.item_id for e in evs if cutoff <= e.timestamp < end and e.event_type == "purchase"}
        touched = dict.fromkeys(e.item_id for e in before if e.timestamp >= start
                                and e.event_type in ("view", "click", "cart", "favourite"))
        for item in touched:
            rows.append(IntentRow(uid, item, funnel_features(before, item, cutoff, catalog), int(item in bought)))
    return rows


@dataclass
class ChurnRow:
    user_id: str
    features: UserFeatures
    label: int  # 1: no purchase within the horizon after as_of (churned)


def churn_rows(store: EventStore, dataset: str, as_of: datetime, horizon_days: int,
               catalog: dict[str, CatalogItem]) -> list[ChurnRow]:
    """Users with at least one purchase before `as_of`; label = no purchase in the next
    `horizon_days` days."""
    end = as_of + timedelta(days=horizon_days)
    prices = catalogue_prices(catalog)
    rows = []
    for uid, evs in iter_user_events(store, dataset):
        before = [e for e in evs if e.timestamp < as_of and e.item_id in catalog]
        if not any(e.event_type == "purchase" for e in before):
            continue
        again = any(as_of <= e.timestamp < end and e.event_type == "purchase" for e in evs)
        rows.append(ChurnRow(uid, user_features(before, catalog, as_of, catalogue_prices=prices), int(not again)))
    return rows


def session_intent_rows(store: EventStore, dataset: str, catalog: dict[str, CatalogItem], *,
                        rule: str = SESSION_CUT, horizon_hours: float | None = None, start: datetime | None = None,
                        end: datetime | None = None) -> list[SessionRow]:
    """Labelled (session, cut) rows of every user (`agent.tasks.session_intent.session_rows`)."""
    return session_rows(iter_user_events(store, dataset), rule, horizon_hours=horizon_hours, start=start, end=end,
                        catalog=catalog)


def fit_intent_baseline(rows: list[IntentRow], trained_on: str) -> LogisticBaseline:
    """The funnel-feature logistic baseline.

    Raises:
        ValueError: no rows, or rows of one class only (scikit-learn cannot fit).
    """
    return LogisticBaseline.fit([r.funnel.vector() for r in rows], [r.label for r in rows], INTENT_FEATURES, trained_on)


def fit_churn_baseline(rows: list[ChurnRow], trained_on: str) -> LogisticBaseline:
    """The RFM logistic baseline.

    Raises:
        ValueError: no rows, or rows of one class only (scikit-learn cannot fit).
    """
    return LogisticBaseline.fit([rfm_vector(r.features) for r in rows], [r.label for r in rows], RFM_FEATURES,
                                trained_on)


def robust_end(store: EventStore, dataset: str) -> datetime:
    """The dataset's last timestamp, ignoring the top 0.5% (Taobao has a few stray future rows).

    Raises:
        RequestError: the dataset has no events (param ``dataset``).
    """
    end = store.time_quantile(dataset, 0.995)
    if end is None:
        raise RequestError(f"dataset {dataset!r} has no events", param="dataset")
    return end


def horizon_key(task: str, horizon: float | None) -> str:
    """The horizon part of a baseline's cache key: ``48h`` (intent; None means the 48 h default),
    ``session`` or ``24h`` (session intent), ``90d`` (churn; None means 90 days)."""
    if task == "churn":
        return f"{horizon if horizon is not None else 90:g}d"
    if task == "session_intent":
        return "session" if horizon is None else f"{horizon:g}h"
    return f"{horizon if horizon is not None else 48.0:g}h"
