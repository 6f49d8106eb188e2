"""The facade's data methods (part of `ShopLensService`): ingest, export, forget, datasets,
training the next-item fusion, recommendation feedback, and the churn segment (a baseline
ranking, no model call).

Writes hold the runtime's one write lock (ingest order and deletes stay simple) and drop the
dataset's shared caches afterwards, whichever surface made them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.app.events import Pseudonyms, validate_events
from agent.app.feedback import FeedbackEvent, FeedbackKind, FeedbackReport
from agent.app.results import DatasetSummary, IndexUpdates, IngestResult, UserEventsPage
from agent.data.artifacts import drop_user_from_artifacts
from agent.domain.errors import RequestError, UnknownDatasetError, UnknownUserError
from agent.domain.schemas import BehaviorEvent
from agent.tasks.churn import default_churn_baseline, rfm_vector
from agent.tasks.common import LogisticBaseline
from agent.tasks.encoder import FineTuneConfig
from agent.tasks.encoder_cases import EncoderTask, training_cutoffs
from agent.tasks.encoder_train import TrainedEncoder, encoder_dir, train_encoder
from agent.tasks.fusion import FittedFusion, fit_fusion, save_fusion
from agent.tasks.profile import UserFeatures, catalogue_prices, orders_of, user_features
from agent.tasks.rows import robust_end

if TYPE_CHECKING:
    from agent.app.runtime import Runtime
    from agent.app.state import AppState

log = logging.getLogger(__name__)
MAX_ID_CHARS = 256  # as agent.domain.schemas.NonEmptyStr and the API's UserId


class DataMethods:
    """Mixed into `ShopLensService` (which sets these attributes)."""

    runtime: Runtime
    pseudonyms: Pseudonyms

    @property
    def state(self) -> AppState:
        return self.runtime.state

    def stored_id(self, user_id: str) -> str:
        """The id the store holds for a caller's user id (pseudonymised when configured).

        Raises:
            RequestError: (``user_id``) longer than the 256 characters any stored id can have (the
                API refuses it in the schema; this guards the CLI and in-process callers).
        """
        if len(user_id) > MAX_ID_CHARS:
            raise RequestError(f"user_id: {len(user_id):,} characters; a user id has at most {MAX_ID_CHARS}",
                               param="user_id")
        return self.pseudonyms.stored(user_id)

    # ---- datasets and indexes -----------------------------------------------------------------
    def datasets(self) -> list[DatasetSummary]:
        """Every stored dataset: users, items, events, index state and embedder, by name."""
        return [self.state.summary(d) for d in self.runtime.store.datasets()]

    async def ensure_indexes(self, dataset: str) -> None:
        """Load (or build) a dataset's indexes once, off the event loop (see `AppState`)."""
        await self.state.ensure_indexes(dataset)

    async def warm_up(self) -> None:
        """Load every stored dataset's indexes; failures are kept in `index_states()`."""
        await self.state.warm_up()

    def index_states(self) -> dict[str, str]:
        """Every stored dataset's index state (`AppState.index_state`). Blocking SQLite reads."""
        return self.state.index_states()

    def readiness(self) -> tuple[dict[str, str], list[str]]:
        """(every dataset's index state, why the instance is not ready; [] when it is): see
        `AppState.readiness`. Blocking SQLite reads."""
        return self.state.readiness()

    def index_updates(self) -> dict[str, IndexUpdates]:
        """Each loaded dataset's incremental index updates (`AppState.index_updates`)."""
        return self.state.index_updates()

    # ---- training -------------------------------------------------------------------------
    def train(self, dataset: str, *, users: int = 2000, seed: int = 0,
              progress: Callable[[int, int], None] | None = None) -> tuple[FittedFusion, Path]:
        """Fit the dataset's next-item fusion weights (`agent.tasks.fusion`), save them beside
        its indexes and use them from now on in this process (others load them at start).

        Raises:
            ValueError: the dataset was never ingested, or has too few users to learn from.
        """
        arts = self.runtime.artifacts(dataset)
        fusion = fit_fusion(arts, n_users=users, seed=seed, progress=progress)
        path = save_fusion(fusion, self.runtime.settings.index_dir(dataset))
        arts.fusion_weights, arts.fusion_note = fusion.served()
        return fusion, path

    def encoder_cutoffs(self, dataset: str, *, horizon_hours: float = 48.0, n_cutoffs: int = 5,
                        until: datetime | None = None) -> list[datetime]:
        """The daily training cut-offs of `train_encoder`: `n_cutoffs`, the last one `horizon_hours`
        before `until` (default: the dataset's end, its last event time ignoring the top 0.5%).

        Raises:
            ValueError: an unknown dataset, `until` after the end, or every cut-off before the
                dataset's first event (each message names the flag to change).
        """
        store = self.runtime.store
        if not store.has_dataset(dataset):
            raise ValueError(f"--dataset {dataset}: no such dataset (datasets: {', '.join(store.datasets()) or 'none'}); "
                             "load it with `shoplens ingest`")
        end = robust_end(store, dataset)
        if until is not None:
            until = until if until.tzinfo else until.replace(tzinfo=UTC)
            if until > end:
                raise ValueError(f"--until {until.isoformat()}: after {dataset}'s end ({end.isoformat()}, its last "
                                 "event time ignoring the top 0.5%); give an earlier time or leave it out")
            end = until
        cutoffs = training_cutoffs(end - timedelta(hours=horizon_hours), n_cutoffs)
        start = store.time_quantile(dataset, 0.0)
        if start is not None and cutoffs[-1] <= start:
            raise ValueError(f"the cut-offs {cutoffs[0]:%Y-%m-%d %H:%M} .. {cutoffs[-1]:%Y-%m-%d %H:%M} fall before "
                             f"{dataset}'s first event ({start:%Y-%m-%d %H:%M}): give a later --until or a shorter "
                             "--horizon-hours")
        return cutoffs

    def train_encoder(self, dataset: str, task: EncoderTask, *, horizon_hours: float = 48.0, n_cutoffs: int = 5,
                      seed: int = 0, max_steps: int | None = None, neg_per_pos: float = 20.0,
                      until: datetime | None = None,
                      progress: Callable[[int, int, float | None], None] | None = None) -> tuple[TrainedEncoder, Path]:
        """Fine-tune the BERT encoder for click or purchase prediction on the dataset
        (`agent.tasks.encoder_train.train_encoder`): `n_cutoffs` daily cut-offs, the last one
        `horizon_hours` before the data's end, or before `until` when given (so every label
        period is complete and nothing from `until` on is learnt from). `neg_per_pos`: training
        negatives kept per positive. Saved as ``encoder-<task>/`` beside the dataset's indexes;
        served from then on by ``intent --scorer bert|blend`` (purchase), ``click`` (click) and
        the audience's ``predicted`` source. Resumes an interrupted run.

        Raises:
            ValueError: the dataset was never ingested, `until` is after its end, or it has no
                cases of both classes.
        """
        store = self.runtime.store
        cutoffs = self.encoder_cutoffs(dataset, horizon_hours=horizon_hours, n_cutoffs=n_cutoffs, until=until)
        folder = encoder_dir(self.runtime.settings.index_dir(dataset), task)
        fitted = train_encoder(store, dataset, task, cutoffs=cutoffs, horizon_h=horizon_hours,
                               folder=folder, cfg=FineTuneConfig(seed=seed, max_steps=max_steps), seed=seed,
                               neg_per_pos=neg_per_pos, progress=progress)
        self.state.encoders.pop((dataset, task), None)
        return fitted, folder

    # ---- events ---------------------------------------------------------------------------
    async def ingest_events(self, dataset: str, events: Sequence[Any], *, create: bool = False,
                            max_text_chars: int | None = None) -> IngestResult:
        """Validate each raw event on its own, mask PII (`Settings.mask_pii`), pseudonymise user
        ids, and store the good ones (committed before this returns). Idempotent by `event_id`
        (the client's, or a content hash of what is stored). When the dataset's indexes are
        loaded, the batch's users are then updated in them before this returns (user index,
        user_items, popularity, co-visitation: `AppState.update_users`); a failure there is
        logged and reported by /readyz, never raised.

        Args:
            events: raw event objects (dicts), as a client sent them.
            create: store under `dataset` even when it does not exist yet (it is created). False:
                an unknown dataset is refused, so a misspelt name never starts a new dataset.
            max_text_chars: review text longer than this is refused for that event.

        Raises:
            UnknownDatasetError: `dataset` does not exist and `create` is False (param
                ``dataset``; the message lists the datasets and how to create one).
            RequestError: no event is valid (names the first error's field).
        """
        if not create and not await asyncio.to_thread(self.runtime.store.has_dataset, dataset):
            known = await asyncio.to_thread(self.runtime.store.datasets)
            raise UnknownDatasetError(dataset, known, hint=(
                'to create it, send the batch again with "create": true (POST /v1/events), or load a '
                f"file with `shoplens ingest --events FILE --name {dataset}`"))
        good, errors = validate_events(events, pseudonyms=self.pseudonyms, mask=self.runtime.settings.mask_pii,
                                       max_text_chars=max_text_chars)
        if not good:
            first = errors[0]
            raise RequestError(f"no valid events; {len(errors)} errors, first: {first.param}: {first.message}",
                               code=first.code, param=first.param)
        async with self.state.write_lock:
            stored = await asyncio.to_thread(self.runtime.store.add_events, dataset, good)
            if stored:  # the users join (or change in) the similar-user index, user_items and the counts
                await self.state.update_users(dataset, {e.user_id for e in good}, added_events=stored)
                self.state.forget(dataset, catalogue=False)  # events never change the catalogue
        if stored:
            await self.mark_stale(dataset, [e.user_id for e in good])
        return IngestResult(dataset=dataset, received=len(events), stored=stored, duplicates=len(good) - stored,
                            rejected=len(events) - len(good), event_ids=[e.event_id for e in good], errors=errors)

    async def mark_stale(self, dataset: str, user_ids: Sequence[str]) -> int:
        """Flag the precomputed next-item answers of these stored user ids stale and queue them
        for a refresh (`agent.app.answers.AnswerStore.mark_stale`); users without one are
        skipped, so an ingest pays one indexed lookup per batch of ids. A failure is logged, never
        raised: the events are stored, and staleness is also detected from the events hash.

        Returns:
            How many users were marked.
        """
        try:
            return await asyncio.to_thread(self.runtime.answers.mark_stale, dataset, user_ids)
        except Exception:  # noqa: BLE001 - the ingest succeeded; a stored answer is checked when served
            log.exception("could not mark stored answers stale for %d users of %s", len(user_ids), dataset)
            return 0

    async def user_events(self, dataset: str, user_id: str, *, offset: int = 0, limit: int = 1_000) -> UserEventsPage:
        """A page of a user's stored events, oldest first (review text as stored: masked), with
        the caller's id in place of the stored one.

        Raises:
            UnknownDatasetError: no such dataset (param ``dataset``).
            UnknownUserError: the store has no events for this user.
        """
        try:
            await asyncio.to_thread(self.state.require_dataset, dataset)  # a typo is unknown_dataset, not unknown_user
            evs = await asyncio.to_thread(self.runtime.store.user_events, dataset, self.stored_id(user_id))
        except UnknownUserError as e:
            raise UnknownUserError(dataset, user_id, [] if self.pseudonyms.active else e.suggestions) from e
        page = evs[offset: offset + limit]
        if self.pseudonyms.active:
            page = [e.model_copy(update={"user_id": user_id}) for e in page]
        return UserEventsPage(dataset=dataset, user_id=user_id, total=len(evs), offset=offset, events=page)

    async def forget_user(self, dataset: str, user_id: str) -> int:
        """Delete a user's stored events and remove the user from the retrieval artifacts.

        The user's row leaves the user index and `user_items`; the user's counts leave
        co-visitation and popularity (exact deltas, the same as a refit; no re-embedding), and
        the artifacts are saved, co-visitation included, so a restart does not bring the user back.

        Returns:
            How many events were deleted.

        Raises:
            UnknownDatasetError: no such dataset (param ``dataset``).
            UnknownUserError: the store has no events for this user (no suggestions are given).
        """
        uid = self.stored_id(user_id)
        await asyncio.to_thread(self.state.require_dataset, dataset)  # a typo is unknown_dataset, not unknown_user
        async with self.state.write_lock, self.state.index_lock(dataset):
            n = await asyncio.to_thread(self._forget, dataset, uid, user_id)
            self.state.forget(dataset)
        return n

    def _forget(self, dataset: str, uid: str, user_id: str) -> int:
        store = self.runtime.store
        if not store.has_user(dataset, uid):
            raise UnknownUserError(dataset, user_id)
        n = store.delete_user(dataset, uid)
        self.runtime.feedback.forget_user(dataset, sorted({uid, user_id}))  # what was shown to them
        self.runtime.answers.forget_user(dataset, [uid])  # their precomputed answers and queued refreshes
        try:
            arts = self.runtime.artifacts(dataset)
        except ValueError as e:  # no catalogue, so no artifacts that could hold the user
            log.info("no artifacts to update for %s: %s", dataset, e)
            return n
        drop_user_from_artifacts(arts, uid, self.runtime.settings.index_dir(dataset), events_removed=n)
        return n

    # ---- recommendation feedback ----------------------------------------------------------
    async def record_feedback_event(self, recommendation_id: str, item_id: str, kind: FeedbackKind,
                                    at: float | None = None) -> FeedbackEvent:
        """Record an impression, click or purchase of an item a recommendation showed (against
        the list it showed last), off the event loop. No model call.

        Args:
            recommendation_id: the id a next-item answer carries.
            at: when it happened, unix seconds (default: now).

        Returns:
            The stored event, with the item's 1-based shown position and the answer's stage.

        Raises:
            UnknownRecommendationError: unknown recommendation id (404).
            RequestError: the item was not in its list (the message names the field and the fix).
        """
        return await asyncio.to_thread(self.runtime.feedback.record_event, recommendation_id, item_id, kind, at)

    async def record_feedback(self, recommendation_id: str, item_id: str, kind: FeedbackKind,
                              at: float | None = None) -> int:
        """`record_feedback_event`, returning only the item's 1-based shown position.

        Raises:
            UnknownRecommendationError / RequestError: see `record_feedback_event`.
        """
        return (await self.record_feedback_event(recommendation_id, item_id, kind, at)).position

    def feedback_report(self, dataset: str | None = None) -> FeedbackReport:
        """Click-through of what was shown, overall and by answer stage (see
        `agent.app.feedback.FeedbackStore.replay`). Blocking SQLite reads: call it from a
        worker thread in async code."""
        return self.runtime.feedback.replay(dataset)

    # ---- churn segment --------------------------------------------------------------------
    def churn_segment(self, dataset: str, start: datetime, end: datetime, *, n: int = 10
                      ) -> tuple[LogisticBaseline, int, list[tuple[str, UserFeatures, float, BehaviorEvent]],
                                 dict[str, float]]:
        """Customers with a purchase in [start, end), ranked by the churn BASELINE probability at
        as_of = `end` (RFM features from purchases strictly before `end`; no model call).

        Returns:
            (the baseline used, how many customers bought in the window, the top `n` as
            (stored user id, features, probability, last purchase event)), riskiest first, ties by
            id, and the window's median buyer (the baseline's inputs, each the median over the
            window's buyers; the reference of `agent.tasks.churn.baseline_drivers`). A dataset
            too small to fit a baseline uses the hand-set prior.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
        """
        catalog = self.state.catalog(dataset)
        try:
            bl = self.state.baselines.churn(dataset)
        except ValueError:  # no or one-class training rows (a tiny dataset)
            bl = default_churn_baseline()
        prices = catalogue_prices(catalog)
        by_user: dict[str, list[BehaviorEvent]] = defaultdict(list)
        for e in self.runtime.store.iter_events(dataset, before=end, event_types=("purchase",)):
            if e.item_id in catalog:
                by_user[e.user_id].append(e)
        fast = []  # RFM straight from the orders (as `user_features` computes them), for every buyer
        inputs: list[dict[str, float]] = []
        for uid, evs in by_user.items():  # oldest first per user
            if evs[-1].timestamp >= start:
                orders = orders_of(evs)
                rec = (end - orders[-1].timestamp).total_seconds() / 86_400.0
                x = {"log_recency": math.log1p(rec), "log_frequency": math.log1p(len(orders)),
                     "log_monetary": math.log1p(max(0.0, round(sum(o.spend for o in orders), 2)))}
                fast.append((uid, bl.predict(x)))
                inputs.append(x)
        median = {k: float(statistics.median(x[k] for x in inputs)) if inputs else 0.0 for k in bl.features}
        fast.sort(key=lambda r: (-r[1], r[0]))
        top = []  # full features (drivers) only for the top n
        for uid, _ in fast[:n]:
            f = user_features(by_user[uid], catalog, end, catalogue_prices=prices)
            top.append((uid, f, bl.predict(rfm_vector(f)), by_user[uid][-1]))
        return bl, len(fast), top, median
