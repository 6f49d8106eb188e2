"""The plumbing every `ShopLensService` method shares: the model source, the request deadline,
caller ids (pseudonyms), the one masked `history()` every task reads, and the run-under-policy
helper. Split from `agent.app.service` so each file holds one family of methods."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from agent.app.data_methods import DataMethods
from agent.app.events import Pseudonyms, as_stored, unique_events
from agent.app.model_holder import ModelSource
from agent.app.policy import P, Run, run_task
from agent.app.runtime import Runtime
from agent.domain.errors import RequestError, UnknownUserError
from agent.domain.pii import mask_pii
from agent.domain.schemas import BehaviorEvent
from agent.llm.base import ChatModel, ModelUnavailableError

log = logging.getLogger(__name__)


class ServiceBase(DataMethods):
    """Constructor and plumbing of `ShopLensService` (see its docstring for the arguments)."""

    def __init__(self, runtime: Runtime, *, use_model: bool = True, model_provider: ModelSource | None = None,
                 explain: bool = True, deadline_s: float | None = None, min_retry_after_s: float = 0.0):
        self.runtime = runtime
        self.use_model = use_model
        self.model_provider = model_provider
        self.explain = explain
        self.deadline_s = deadline_s
        self.min_retry_after_s = min_retry_after_s
        key = runtime.settings.pseudonymise_key
        secret = key.get_secret_value() if key is not None else ""
        self.pseudonyms = Pseudonyms(secret.encode() if secret else None)

    # ---- plumbing -------------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        return self.deadline_s if self.deadline_s is not None else self.runtime.settings.request_timeout_s

    def _source(self) -> ModelSource:
        return self.model_provider or self.runtime.model_source()

    def _use(self, use_model: bool | None) -> bool:
        return self.use_model if use_model is None else use_model

    async def model_or_none(self) -> tuple[ChatModel | None, str | None]:
        """The model, or (None, reason) when it is disabled or cannot be had right now."""
        if not self.use_model:
            return None, "model disabled by the caller"
        try:
            return await self._source()(), None
        except ModelUnavailableError as e:
            log.warning("model unavailable: %s", e)
            return None, str(e)

    def require_dataset(self, dataset: str) -> None:
        """Raises UnknownDatasetError (param "dataset", listing the ingested ones)."""
        self.state.require_dataset(dataset)

    def _unknown(self, e: UnknownUserError, user_id: str) -> UnknownUserError:
        """The caller's id in the error; no close ids when ids are pseudonymised."""
        return UnknownUserError(e.dataset, user_id, [] if self.pseudonyms.active else e.suggestions)

    async def check_user(self, dataset: str, user_id: str) -> str:
        """The stored id of a known user.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
            UnknownUserError: the store has no events for this user (the caller's id named).
        """
        await asyncio.to_thread(self.require_dataset, dataset)
        uid = self.stored_id(user_id)
        if not await asyncio.to_thread(self.runtime.store.has_user, dataset, uid):
            sugg = [] if self.pseudonyms.active else await asyncio.to_thread(
                self.runtime.store.similar_user_ids, dataset, uid)
            raise UnknownUserError(dataset, user_id, sugg)
        return uid

    def history(self, dataset: str, user_id: str, events: Sequence[BehaviorEvent] | None = None,
                *, before: datetime | None = None, notes: list[str] | None = None) -> list[BehaviorEvent]:
        """Inline events (sorted oldest first) if given, else the stored user's events; `user_id`
        is the stored id. Review text is passed through `mask_pii` here, so e-mails and phone
        numbers never reach a prompt, whichever way the events came in.

        Inline events are taken as the store would keep them (`as_stored`: caller ids
        pseudonymised, the stored `event_id`) and each `event_id` counts once (`unique_events`,
        the store's rule), so a retried or repeated batch does not double the history; how many
        were dropped goes into `notes`.

        Raises:
            UnknownUserError: no inline events and the store has no such user.
            RequestError: inline events name other users.
        """
        if events:
            s = self.runtime.settings
            stored = [as_stored(e, pseudonyms=self.pseudonyms, mask=s.mask_pii) for e in events]
            others = sorted({e.user_id for e in stored} - {user_id})
            if others:
                raise RequestError(f"inline events belong to other users {others[:3]}; "
                                   f"all must have user_id {user_id!r}", param="events")
            unique, dropped = unique_events(stored)
            if dropped and notes is not None:
                notes.append(f"inline events: {dropped} of {len(stored)} repeated an earlier event_id (the "
                             "client's, else the content hash of an identical event) and were counted once")
            ordered = sorted(unique, key=lambda e: e.timestamp)
            return _masked([e for e in ordered if before is None or e.timestamp < before])
        return _masked(self.runtime.store.user_events(dataset, user_id, before=before))

    def _events_or_note(self, dataset: str, uid: str, user_id: str, notes: list[str]) -> list[BehaviorEvent]:
        """The user's masked events, or [] with a cold-start note naming the caller's id."""
        try:
            return self.history(dataset, uid)
        except UnknownUserError as e:
            e = self._unknown(e, user_id)
            notes.append(f"user {user_id!r} is not in {dataset!r}"
                         + (f" (did you mean {', '.join(e.suggestions)}?)" if e.suggestions else ""))
            return []

    async def _run(self, run: Run[P], *, use_model: bool, fallback: bool = True, needs_model: str | None = None,
                   hint: str = "") -> P:
        async def without() -> P:
            return await run(None, None)

        return await run_task(self._source(), run, use_model=use_model, deadline_s=self.deadline,
                              fallback=without if fallback else None, needs_model=needs_model, hint=hint,
                              min_retry_after_s=self.min_retry_after_s)


def _masked(events: list[BehaviorEvent]) -> list[BehaviorEvent]:
    return [
        e.model_copy(update={"review_text": mask_pii(e.review_text)}) if e.review_text else e
        for e in events
    ]
