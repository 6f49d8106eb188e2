"""Service entry points for purchase intent (per item and per session), churn, user profile and
audience targeting.

Beside `agent.app.service.ShopLensService` (next-item): resolves the dataset and user, fits or loads
each task's baseline (cached as JSON under ``<workspace>/tasks/``), and runs the task pipeline.
The labelled-row builders the baselines are trained on are `agent.tasks.rows` (shared with eval).
An unknown user is answered with an explicit cold-start prediction (the note names close ids).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import RequestError, UnknownUserError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.tasks.audience import AudienceIndex, AudiencePrediction, AudienceService, rank_users
from agent.tasks.churn import (
    ChurnPrediction,
    ChurnService,
    default_churn_baseline,
    rfm_vector,
)
from agent.tasks.common import LogisticBaseline
from agent.tasks.intent import (
    IntentPrediction,
    IntentService,
)
from agent.tasks.profile import (
    ProfileService,
    UserFeatures,
    UserProfile,
    catalogue_prices,
    orders_of,
    user_features,
)
from agent.tasks.rows import (  # the row builders live in agent.tasks (eval imports them); re-exported here
    SESSION_CUT,
    churn_rows,
    fit_churn_baseline,
    fit_intent_baseline,
    horizon_key,
    intent_rows,
    robust_end,
    session_intent_rows,
)
from agent.tasks.session_intent import (
    SessionIntentPrediction,
    SessionIntentService,
    default_session_baseline,
    fit_session_baseline,
)

log = logging.getLogger(__name__)

class TasksService(ShopLensService):
    """Intent, churn, profile and audience over one `Runtime` (shares `ShopLensService`'s
    model handling and history resolution)."""

    def __init__(self, runtime: Runtime, *, use_model: bool = True, explain: bool = True):
        super().__init__(runtime, use_model=use_model)
        self.explain = explain
        self._catalogs: dict[str, dict[str, CatalogItem]] = {}
        self._audience: dict[str, AudienceIndex] = {}

    def _dataset(self, dataset: str) -> dict[str, CatalogItem]:
        if dataset not in self._catalogs:
            self.require_dataset(dataset)
            self._catalogs[dataset] = self.runtime.store.items(dataset)
        return self._catalogs[dataset]

    def _events(self, dataset: str, user_id: str, notes: list[str]) -> list[BehaviorEvent]:
        try:  # the one history(): review text is masked (PII) for every task
            return self.history(dataset, user_id)
        except UnknownUserError as e:
            notes.append(f"user {user_id!r} is not in {dataset!r}"
                         + (f" (did you mean {', '.join(e.suggestions)}?)" if e.suggestions else ""))
            return []

    def baseline_path(self, task: str, dataset: str) -> Path:
        return self.runtime.workspace / "tasks" / f"{task}-{dataset}.json"

    def intent_baseline(self, dataset: str, horizon_h: float = 48.0) -> LogisticBaseline:
        """Load the cached baseline for this horizon, or fit it at cut-off = dataset end - horizon
        and cache it (one file per horizon: the label depends on it)."""
        path = self.baseline_path(f"intent-{horizon_key('intent', horizon_h)}", dataset)
        if path.exists():
            return LogisticBaseline.load(path)
        cutoff = robust_end(self.runtime.store, dataset) - timedelta(hours=horizon_h)
        rows = intent_rows(self.runtime.store, dataset, cutoff, horizon_h, self._dataset(dataset))
        bl = fit_intent_baseline(rows, f"{dataset} pairs at {cutoff:%Y-%m-%d %H:%M}, horizon {horizon_h:g} h")
        bl.save(path)
        return bl

    def session_intent_baseline(self, dataset: str, horizon_hours: float | None = None) -> LogisticBaseline:
        """Load the cached baseline, or fit it on every session whose label window ends before the
        dataset's end (cut after the first 3 events) and cache it.

        Raises:
            ValueError: too few (or one-class) labelled sessions to fit one.
        """
        hz = horizon_key("session_intent", horizon_hours)
        path = self.baseline_path(f"session_intent-{hz}", dataset)
        if path.exists():
            return LogisticBaseline.load(path)
        end = robust_end(self.runtime.store, dataset)
        rows = session_intent_rows(self.runtime.store, dataset, self._dataset(dataset), horizon_hours=horizon_hours,
                                   end=end)
        bl = fit_session_baseline(rows, f"{dataset} sessions ending before {end:%Y-%m-%d %H:%M}, cut "
                                  f"{SESSION_CUT}, label: purchase {hz}")
        bl.save(path)
        return bl

    def churn_baseline(self, dataset: str, horizon_days: int = 90) -> LogisticBaseline:
        path = self.baseline_path(f"churn-{horizon_key('churn', horizon_days)}", dataset)
        if path.exists():
            return LogisticBaseline.load(path)
        as_of = robust_end(self.runtime.store, dataset) - timedelta(days=2 * horizon_days)
        rows = churn_rows(self.runtime.store, dataset, as_of, horizon_days, self._dataset(dataset))
        bl = fit_churn_baseline(rows, f"{dataset} users at {as_of:%Y-%m-%d}, horizon {horizon_days} d")
        bl.save(path)
        return bl

    def churn_segment(self, dataset: str, start: datetime, end: datetime, *, n: int = 10
                      ) -> tuple[LogisticBaseline, int, list[tuple[str, UserFeatures, float, BehaviorEvent]]]:
        """Customers with a purchase in [start, end), ranked by the churn BASELINE probability at
        as_of = `end` (RFM features from purchases strictly before `end`; no model call).

        Returns:
            (the baseline used, how many customers bought in the window, the top `n` as
            (user id, features, probability, last purchase event)), riskiest first, ties by id.
            A dataset too small to fit a baseline uses the hand-set prior (`default_churn_baseline`).
        """
        catalog = self._dataset(dataset)
        try:
            bl = self.churn_baseline(dataset)
        except ValueError:  # no or one-class training rows (a tiny dataset)
            bl = default_churn_baseline()
        prices = catalogue_prices(catalog)
        by_user: dict[str, list[BehaviorEvent]] = defaultdict(list)
        for e in self.runtime.store.iter_events(dataset, before=end, event_types=("purchase",)):
            if e.item_id in catalog:
                by_user[e.user_id].append(e)
        fast = []  # RFM straight from the orders (as `user_features` computes them), for every buyer
        for uid, evs in by_user.items():  # oldest first per user
            if evs[-1].timestamp >= start:
                orders = orders_of(evs)
                rec = (end - orders[-1].timestamp).total_seconds() / 86_400.0
                x = {"log_recency": math.log1p(rec), "log_frequency": math.log1p(len(orders)),
                     "log_monetary": math.log1p(max(0.0, round(sum(o.spend for o in orders), 2)))}
                fast.append((uid, bl.predict(x)))
        fast.sort(key=lambda r: (-r[1], r[0]))
        top = []  # full features (drivers) only for the top n
        for uid, _ in fast[:n]:
            f = user_features(by_user[uid], catalog, end, catalogue_prices=prices)
            top.append((uid, f, bl.predict(rfm_vector(f)), by_user[uid][-1]))
        return bl, len(fast), top

    async def intent(self, dataset: str, user_id: str, item_id: str, *, as_of: datetime | None = None,
                     horizon_hours: float = 48.0) -> IntentPrediction:
        catalog = self._dataset(dataset)
        notes: list[str] = []
        events = self._events(dataset, user_id, notes)
        model, why = await self.model_or_none()
        bl = self.intent_baseline(dataset, horizon_hours)
        svc = IntentService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain)
        pred = await svc.predict(user_id, item_id, events, catalog, as_of=as_of, horizon_hours=horizon_hours,
                                 dataset=dataset)
        return _finish(pred, notes, why, self.use_model)

    async def session_intent(self, dataset: str, user_id: str, *, as_of: datetime | None = None,
                             horizon_hours: float | None = None) -> SessionIntentPrediction:
        """P(the user buys anything later in the current session, or within `horizon_hours`)."""
        catalog = self._dataset(dataset)
        notes: list[str] = []
        events = self._events(dataset, user_id, notes)
        model, why = await self.model_or_none()
        try:
            bl = self.session_intent_baseline(dataset, horizon_hours)
        except ValueError:  # no or one-class training rows (a tiny dataset)
            bl = default_session_baseline()
            notes.append(f"session intent baseline: hand-set prior ({dataset!r} has too few labelled sessions)")
        svc = SessionIntentService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain)
        pred = await svc.predict(user_id, events, catalog, as_of=as_of, horizon_hours=horizon_hours, dataset=dataset)
        return _finish(pred, notes, why, self.use_model)

    async def churn(self, dataset: str, user_id: str, *, as_of: datetime, horizon_days: int = 90) -> ChurnPrediction:
        catalog = self._dataset(dataset)
        notes: list[str] = []
        events = self._events(dataset, user_id, notes)
        model, why = await self.model_or_none()
        svc = ChurnService(model, self.churn_baseline(dataset, horizon_days), model_sha256=self.runtime.model_sha256,
                           explain=self.explain)
        pred = await svc.predict(user_id, events, catalog, as_of=as_of, horizon_days=horizon_days, dataset=dataset,
                                 prices=catalogue_prices(catalog))
        return _finish(pred, notes, why, self.use_model)

    async def profile(self, dataset: str, user_id: str, *, as_of: datetime | None = None) -> UserProfile:
        catalog = self._dataset(dataset)
        notes: list[str] = []
        events = self._events(dataset, user_id, notes)
        model, why = await self.model_or_none()
        pred = await ProfileService(model, model_sha256=self.runtime.model_sha256).predict(
            user_id, events, catalog, as_of=as_of, dataset=dataset)
        return _finish(pred, notes, why, self.use_model)

    def audience_index(self, dataset: str) -> AudienceIndex:
        """Reuses the dataset's artifacts (item/user FAISS indexes, co-visitation); adds buyers."""
        if dataset not in self._audience:
            arts = self.runtime.artifacts(dataset)
            buyers: dict[str, dict[str, float]] = defaultdict(dict)
            activity: dict[str, float] = defaultdict(float)
            purchases = [e for e in self.runtime.store.iter_events(dataset) if e.event_type == "purchase"]
            last = max((e.timestamp for e in purchases), default=None)
            for e in purchases:
                w = 0.5 ** ((last - e.timestamp).total_seconds() / 86_400 / 90.0) if last else 1.0
                buyers[e.item_id][e.user_id] = buyers[e.item_id].get(e.user_id, 0.0) + w
                activity[e.user_id] += w
            self._audience[dataset] = AudienceIndex(arts.catalog, arts.item_index, arts.user_index, arts.covisit,
                                                    dict(buyers), dict(activity), None)
        return self._audience[dataset]

    async def audience(self, dataset: str, *, item_id: str | None = None, campaign_text: str | None = None,
                       n: int = 50, score_top: int = 3) -> AudiencePrediction:
        if not item_id and not campaign_text:
            raise RequestError("give an item id or a campaign text", param="item")
        self._dataset(dataset)
        idx = self.audience_index(dataset)
        query = self.runtime.embedder.embed([campaign_text])[0] if campaign_text and not item_id else None
        model, why = await self.model_or_none()
        svc = AudienceService(model, model_sha256=self.runtime.model_sha256, score_top=score_top if model else 0)
        ranked_ids = [u for u, _, _ in rank_users(idx, item_id, query, n=score_top)] if model and score_top else []
        user_events = {u: self.history(dataset, u) for u in ranked_ids}
        pred = await svc.predict(idx, item_id=item_id, campaign_text=campaign_text, query=query, n=n,
                                 dataset=dataset, user_events=user_events)
        return _finish(pred, [], why, self.use_model)


P = TypeVar("P", IntentPrediction, SessionIntentPrediction, ChurnPrediction, UserProfile, AudiencePrediction)


def _finish(pred: P, notes: list[str], why: str | None, use_model: bool) -> P:
    """Add service notes, and mark the answer degraded when the model was wanted but missing."""
    pred.meta.notes.extend(notes)
    if why and use_model:
        pred.meta.degraded = True
        pred.meta.degraded_reason = f"model unavailable ({why}); " + (pred.meta.degraded_reason or "")
    return pred
