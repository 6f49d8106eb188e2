"""Session-level purchase intent: P(the user buys anything in the current session, or within a
stated horizon), with the session's evidence cited.

A user's events are split into sessions by the data's `session_id` where events carry one, and
by an inactivity gap (`SESSION_GAP`, 30 minutes) where they do not (`split_sessions`); the current
session is the one holding the last events before the as-of time. Session features (`session_features`)
are computed in code from events strictly before the as-of time. The probability machinery is the
per-item intent's (`agent.tasks.intent`): a logistic baseline on the features, blended in logit space
with the model's yes/no verbalizer probability; a second, schema-constrained call names the stage
and writes a reason citing event references. No history at all: the base rate, labelled.

`session_rows` builds the labelled (session, cut point) rows the baseline is trained on and the
eval scores; their features never see an event at or after the cut.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from agent.domain.history import EventLine, HistoryView, build_history
from agent.domain.predictions import SessionIntentPrediction
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import ChatModel
from agent.llm.structured import CallTrace
from agent.tasks.common import Blend, LogisticBaseline, make_meta
from agent.tasks.intent import answer_fields, ask_intent_model

# 30 minutes of inactivity ends a session: the web-analytics convention (Google Analytics'
# default session timeout). It goes back to Catledge & Pitkow (1995), "Characterizing browsing
# strategies in the World-Wide Web": mean gap 9.3 min between browser events, a 25.5 min cut-off
# (1.5 standard deviations above the mean), rounded up to 30 min in practice.
SESSION_GAP = timedelta(minutes=30)
NO_PURCHASE_HOURS = 24 * 30.0  # "hours since the last purchase" for a user who never bought

SESSION_FEATURES = ["log_events", "log_views", "log_carts", "log_favs", "bought_in_session", "log_distinct_items",
                    "log_distinct_categories", "log_length_min", "log_events_per_min", "log_re_views", "cart_open",
                    "log_user_purchases", "user_buy_rate", "log_hours_since_purchase", "log_past_sessions"]


def split_sessions(events: Sequence[BehaviorEvent], gap: timedelta = SESSION_GAP) -> list[list[BehaviorEvent]]:
    """Split one user's events (oldest first) into sessions.

    The data's own `session_id` decides when both consecutive events carry one: a new id starts
    a new session, the same id continues it however long the pause (a shop's session id is the
    ground truth; the gap rule only guesses it). Otherwise (either event has no id) the
    inactivity rule applies: a pause of `gap` (30 min) or more starts a new session.
    """
    out: list[list[BehaviorEvent]] = []
    for e in events:
        prev = out[-1][-1] if out else None
        if prev is None:
            out.append([e])
        elif e.session_id is not None and prev.session_id is not None:
            if e.session_id == prev.session_id:
                out[-1].append(e)
            else:
                out.append([e])
        elif e.timestamp - prev.timestamp < gap:
            out[-1].append(e)
        else:
            out.append([e])
    return out


@dataclass
class SessionFeatures:
    """The current session (its events strictly before as_of) and the user's past."""

    session_start: str | None  # ISO time of the session's first event
    session_last: str | None  # ISO time of its last event before as_of
    n_events: int
    n_views: int  # views and clicks
    n_carts: int
    n_favs: int
    n_removes: int
    n_purchases: int  # purchases earlier in this session
    distinct_items: int
    distinct_categories: int  # of items with a catalogue category
    length_min: float  # first to last session event
    events_per_min: float  # n_events / length, the length floored at 1 minute
    re_views: int  # views of an item already viewed earlier in the session
    cart_open: bool  # an item carted in this session is neither removed nor bought since
    minutes_since_last_event: float | None  # as_of - the last session event
    past_sessions: int  # the user's sessions before this one
    past_sessions_with_purchase: int
    user_purchases: int  # all purchases before as_of
    user_buy_rate: float  # past sessions with a purchase / past sessions (0 with none)
    hours_since_last_purchase: float | None

    def vector(self) -> dict[str, float]:
        h = self.hours_since_last_purchase
        return {
            "log_events": math.log1p(self.n_events), "log_views": math.log1p(self.n_views),
            "log_carts": math.log1p(self.n_carts), "log_favs": math.log1p(self.n_favs),
            "bought_in_session": float(self.n_purchases > 0), "log_distinct_items": math.log1p(self.distinct_items),
            "log_distinct_categories": math.log1p(self.distinct_categories),
            "log_length_min": math.log1p(self.length_min), "log_events_per_min": math.log1p(self.events_per_min),
            "log_re_views": math.log1p(self.re_views), "cart_open": float(self.cart_open),
            "log_user_purchases": math.log1p(self.user_purchases), "user_buy_rate": self.user_buy_rate,
            "log_hours_since_purchase": math.log1p(min(h, NO_PURCHASE_HOURS) if h is not None else NO_PURCHASE_HOURS),
            "log_past_sessions": math.log1p(self.past_sessions),
        }


def session_features(events: Sequence[BehaviorEvent], as_of: datetime,
                     catalog: Mapping[str, CatalogItem] | None = None,
                     gap: timedelta = SESSION_GAP) -> SessionFeatures:
    """Features of the current session from the user's events strictly before `as_of` (oldest first)."""
    evs = [e for e in events if e.timestamp < as_of]
    sessions = split_sessions(evs, gap)
    cur, past = (sessions[-1], sessions[:-1]) if sessions else ([], [])
    n = {t: sum(e.event_type == t for e in cur) for t in ("view", "click", "cart", "favourite", "remove_from_cart",
                                                           "purchase")}
    viewed: set[str] = set()
    re_views = 0
    open_cart: set[str] = set()
    for e in cur:
        if e.event_type in ("view", "click"):
            re_views += e.item_id in viewed
            viewed.add(e.item_id)
        elif e.event_type == "cart":
            open_cart.add(e.item_id)
        elif e.event_type in ("remove_from_cart", "purchase"):
            open_cart.discard(e.item_id)
    cats = {c.category for e in cur if (c := (catalog or {}).get(e.item_id)) is not None and c.category}
    length = (cur[-1].timestamp - cur[0].timestamp).total_seconds() / 60 if cur else 0.0
    buys = [e for e in evs if e.event_type == "purchase"]
    with_buy = sum(any(e.event_type == "purchase" for e in s) for s in past)
    return SessionFeatures(
        session_start=cur[0].timestamp.isoformat() if cur else None,
        session_last=cur[-1].timestamp.isoformat() if cur else None,
        n_events=len(cur), n_views=n["view"] + n["click"], n_carts=n["cart"], n_favs=n["favourite"],
        n_removes=n["remove_from_cart"], n_purchases=n["purchase"], distinct_items=len({e.item_id for e in cur}),
        distinct_categories=len(cats), length_min=round(length, 3),
        events_per_min=round(len(cur) / max(1.0, length), 4), re_views=re_views, cart_open=bool(open_cart),
        minutes_since_last_event=round((as_of - cur[-1].timestamp).total_seconds() / 60, 3) if cur else None,
        past_sessions=len(past), past_sessions_with_purchase=with_buy, user_purchases=len(buys),
        user_buy_rate=round(with_buy / len(past), 4) if past else 0.0,
        hours_since_last_purchase=round((as_of - buys[-1].timestamp).total_seconds() / 3600, 3) if buys else None,
    )


# ---- labelled rows (baseline training and the eval) ---------------------------------------------


@dataclass
class SessionRow:
    user_id: str
    session_start: datetime
    cut: datetime  # the as-of time: features from events strictly before it
    label_end: datetime  # the label window is [cut, label_end)
    features: SessionFeatures
    label: int  # 1: a purchase in the label window

    @property
    def case_id(self) -> str:
        return f"{self.user_id}|{self.session_start.isoformat()}"


CutRule = str  # "k<N>" (after the session's first N events) or "first-cart" (after its first cart)


def check_cut_rule(rule: str) -> str:
    """`rule` if it is ``first-cart`` or ``k<N>`` with N >= 1.

    Raises:
        ValueError: anything else (the message names both forms).
    """
    if rule == "first-cart" or (rule.startswith("k") and rule[1:].isdigit() and int(rule[1:]) >= 1):
        return rule
    raise ValueError(f"cut rule {rule!r} must be 'k<N>' (e.g. k3) or 'first-cart'")


def cut_time(session: Sequence[BehaviorEvent], rule: CutRule) -> datetime | None:
    """The as-of time for a session under `rule`, or None when the rule does not apply.

    The cut is 1 s after the deciding event, so events sharing its timestamp fall before it.
    Whether a rule applies depends only on events before the cut (never on what follows).
    """
    if rule == "first-cart":
        carts = [e for e in session if e.event_type == "cart"]
        return carts[0].timestamp + timedelta(seconds=1) if carts else None
    k = int(check_cut_rule(rule)[1:])
    return session[k - 1].timestamp + timedelta(seconds=1) if len(session) >= k else None


def label_window_end(session: Sequence[BehaviorEvent], cut: datetime, horizon_hours: float | None,
                     gap: timedelta = SESSION_GAP) -> datetime:
    """End of the label window: the session's end (its last event + the gap, when the session is
    known to be over) or cut + horizon."""
    return session[-1].timestamp + gap if horizon_hours is None else cut + timedelta(hours=horizon_hours)


def session_rows(users: Iterable[tuple[str, Sequence[BehaviorEvent]]], rule: CutRule = "k3", *,
                 horizon_hours: float | None = None, start: datetime | None = None, end: datetime | None = None,
                 catalog: Mapping[str, CatalogItem] | None = None, gap: timedelta = SESSION_GAP) -> list[SessionRow]:
    """One labelled row per session where `rule` applies, with start <= cut and label_end <= end.

    Features come from the user's events strictly before the cut (earlier sessions included);
    label = a purchase at or after the cut, later in the same session (`horizon_hours` None) or
    within `horizon_hours` of the cut. No event at or after the cut reaches the features.
    """
    rows = []
    for uid, evs in users:
        evs = list(evs)
        for s in split_sessions(evs, gap):
            cut = cut_time(s, rule)
            if cut is None or (start is not None and cut < start):
                continue
            lend = label_window_end(s, cut, horizon_hours, gap)
            if end is not None and lend > end:
                continue
            pool = s if horizon_hours is None else evs
            label = int(any(cut <= e.timestamp < lend and e.event_type == "purchase" for e in pool))
            before = [e for e in evs if e.timestamp < cut]
            rows.append(SessionRow(uid, s[0].timestamp, cut, lend, session_features(before, cut, catalog, gap), label))
    return rows


def fit_session_baseline(rows: Sequence[SessionRow], trained_on: str) -> LogisticBaseline:
    return LogisticBaseline.fit([r.features.vector() for r in rows], [r.label for r in rows], SESSION_FEATURES,
                                trained_on)


def default_session_baseline() -> LogisticBaseline:
    """A hand-set prior, used only when no baseline could be fitted: carts, an open cart and a
    history of buying sessions dominate."""
    coef = {"log_carts": 1.0, "cart_open": 1.0, "bought_in_session": 0.3, "user_buy_rate": 1.5,
            "log_user_purchases": 0.3, "log_hours_since_purchase": -0.1, "log_events": 0.2, "log_favs": 0.3}
    return LogisticBaseline(SESSION_FEATURES, [coef.get(f, 0.0) for f in SESSION_FEATURES], -3.0, 0.05,
                            "hand-set prior")


# ---- the prediction (schema: agent.domain.predictions.intent.SessionIntentPrediction) ----------


def horizon_words(horizon_hours: float | None, gap: timedelta = SESSION_GAP) -> str:
    if horizon_hours is None:
        return f"later in this session (it ends after {gap.total_seconds() / 60:g} minutes without activity)"
    return f"within the next {horizon_hours:g} hours"


def _minutes_before(ts: datetime, as_of: datetime) -> str:
    m = (as_of - ts).total_seconds() / 60
    return f"{m:.0f} min before" if m < 90 else f"{m / 60:.1f} h before"


def session_prompt(user_id: str, evs: Sequence[BehaviorEvent], catalog: Mapping[str, CatalogItem],
                   as_of: datetime, f: SessionFeatures, horizon_hours: float | None,
                   window: int = 16) -> tuple[dict[str, Any], HistoryView, list[str]]:
    """What both session prompts render: the last `window` events before as_of with refs (times
    in minutes within the last day), the session facts and the horizon in words.

    Returns:
        (template variables, the history view, the refs of the current session's events).
    """
    hist = build_history(user_id, evs, catalog, window=window, as_of=as_of)
    hist.lines = [EventLine(x.ref, _minutes_before(x.event.timestamp, as_of), x.text, x.event)
                  if (as_of - x.event.timestamp).total_seconds() < 86_400 else x for x in hist.lines]
    start = datetime.fromisoformat(f.session_start) if f.session_start else None
    refs = [x.ref for x in hist.lines if start is not None and x.event.timestamp >= start]
    variables = dict(s=asdict(f), horizon_text=horizon_words(horizon_hours), session_refs=_span(refs),
                     **hist.prompt_vars())
    return variables, hist, refs


class SessionIntentService:
    """Session-level purchase intent for one user."""

    def __init__(self, model: ChatModel | None, baseline: LogisticBaseline | None = None, *,
                 model_sha256: str | None = None, explain: bool = True, window: int = 16,
                 prob_prompt: str = "session_intent.v1", explain_prompt: str = "session_intent_explain.v1"):
        self.model, self.model_sha256, self.explain, self.window = model, model_sha256, explain, window
        self.baseline = baseline or default_session_baseline()
        self.prob_prompt, self.explain_prompt = prob_prompt, explain_prompt

    async def predict(self, user_id: str, events: Sequence[BehaviorEvent], catalog: Mapping[str, CatalogItem], *,
                      as_of: datetime | None = None, horizon_hours: float | None = None,
                      dataset: str | None = None, base_rate: float | None = None) -> SessionIntentPrediction:
        """Predict whether `user_id` buys anything later in the current session (`horizon_hours`
        None) or within `horizon_hours` after `as_of`.

        Args:
            events: the user's events, oldest first; only those before `as_of` are used.
            as_of: the cut-off (default: 1 s after the last event).
            base_rate: the dataset's session purchase rate, the cold-start answer (default: the
                baseline's training rate).
        """
        t0, trace = time.perf_counter(), CallTrace()
        as_of = as_of or ((events[-1].timestamp + timedelta(seconds=1)) if events else datetime.now().astimezone())
        evs = [e for e in events if e.timestamp < as_of]
        f = session_features(evs, as_of, catalog)
        hz = horizon_words(horizon_hours)
        common: dict[str, Any] = dict(user_id=user_id, dataset=dataset, as_of=as_of.isoformat(), horizon_hours=horizon_hours,
                                      horizon=hz, session=asdict(f))
        if not evs:
            rate = base_rate if base_rate is not None else self.baseline.base_rate
            trace.notes.append("cold start (no history before as_of): the base rate, not a personal prediction")
            return SessionIntentPrediction(
                **common, probability=rate, probability_source="cold_start_base_rate", baseline_probability=rate,
                reason=f"[cold start] no history: the base session purchase rate {rate:.1%} is shown instead of "
                       "a personal probability.", reason_source="cold_start", cold_start=True,
                meta=make_meta("session_intent", self.model, trace, [], t0, self.model_sha256))
        if f.minutes_since_last_event is not None and f.minutes_since_last_event >= SESSION_GAP.total_seconds() / 60:
            trace.notes.append(f"the last session ended {f.minutes_since_last_event / 60:.1f} h before as_of; "
                               "its features are used as they were")
        p_base = self.baseline.predict(f.vector())
        variables, hist, srefs = session_prompt(user_id, evs, catalog, as_of, f, horizon_hours, self.window)
        asked = await ask_intent_model(self.model, self.prob_prompt, self.explain_prompt if self.explain else None,
                                       variables, hist, trace, catalog=catalog,
                                       probability=lambda pm: (self.baseline.blend or Blend())(p_base, pm))
        return SessionIntentPrediction(
            **common, **answer_fields(self.baseline, p_base, asked, hist,
                                      lambda: fallback_session_reason(f, hist, srefs)),
            meta=make_meta("session_intent", self.model, trace, asked.prompts, t0, self.model_sha256))


def _span(refs: list[str]) -> str:
    return "" if not refs else refs[0] if len(refs) == 1 else f"{refs[0]}-{refs[-1]}"


def fallback_session_reason(f: SessionFeatures, hist: HistoryView, session_refs: list[str]) -> tuple[str, list[str]]:
    """A truthful template reason citing the session's most telling events (purchases, carts first)."""
    order = {"purchase": 0, "cart": 1, "favourite": 2, "view": 3, "click": 3}
    mine = set(session_refs)
    lines = sorted((x for x in hist.lines if x.ref in mine),
                   key=lambda x: (order.get(x.event.event_type, 9), -int(x.ref[1:])))
    cart = " (one still in the cart)" if f.cart_open else ""
    return (f"[template] this session: {f.n_events} events in {f.length_min:.0f} min, {f.n_views} views, "
            f"{f.n_carts} carts{cart}, {f.n_favs} favourites; {f.past_sessions_with_purchase} of "
            f"{f.past_sessions} earlier sessions had a purchase", [x.ref for x in lines[:3]])
