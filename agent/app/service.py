"""The service the delivery layers call: CLI, JSON API and chat share these functions.

It resolves a request (a stored user, or inline events) to a history, picks the dataset's
artifacts and the model, and runs the task pipeline. Caller mistakes raise `UnknownUserError`
or `RequestError`; runtime failures come back as degraded answers (`meta.degraded`), never as
invented ones.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from agent.app.runtime import Runtime
from agent.data.artifacts import drop_user_from_artifacts
from agent.domain.errors import RequestError, UnknownUserError
from agent.domain.pii import mask_pii
from agent.domain.predictions import NextItemPrediction
from agent.domain.schemas import BehaviorEvent
from agent.llm.base import ChatModel, ModelUnavailableError
from agent.tasks.next_item import NextItemConfig, NextItemService

log = logging.getLogger(__name__)


class ShopLensService:
    """Task entry points over one `Runtime`.

    Args:
        runtime: the composition root (store, embedder, artifacts, model).
        use_model: False answers from retrieval only (e.g. `--no-llm`).
        model_provider: where the model comes from (default `runtime.model`); the API passes
            one that wraps the model with a timeout, retries and a concurrency cap, and that
            raises `ModelUnavailableError` at once while the model is still loading.
    """

    def __init__(
        self, runtime: Runtime, *, use_model: bool = True,
        model_provider: Callable[[], Awaitable[ChatModel]] | None = None,
    ):
        self.runtime = runtime
        self.use_model = use_model
        self.model_provider = model_provider or runtime.model

    def require_dataset(self, dataset: str) -> None:
        """Raises RequestError (param "dataset") listing the ingested ones, if `dataset` is unknown.
        Per-request check: an indexed lookup, the full dataset list only on the error path."""
        if not self.runtime.store.has_dataset(dataset):
            raise RequestError(f"unknown dataset {dataset!r}; ingested: {self.runtime.store.datasets()}",
                               param="dataset")

    async def model_or_none(self) -> tuple[ChatModel | None, str | None]:
        """The model, or (None, reason) when it cannot be had right now."""
        if not self.use_model:
            return None, "model disabled by the caller"
        try:
            return await self.model_provider(), None
        except ModelUnavailableError as e:
            log.warning("model unavailable: %s", e)
            return None, str(e)

    def history(
        self, dataset: str, user_id: str, events: Sequence[BehaviorEvent] | None = None,
        *, before: datetime | None = None,
    ) -> list[BehaviorEvent]:
        """Inline events (sorted oldest first) if given, else the stored user's events.

        Review text is passed through `mask_pii` here, so e-mails and phone numbers never reach
        a prompt, whichever way the events were ingested.

        Raises:
            UnknownUserError: no inline events and the store has no such user.
            RequestError: inline events name other users.
        """
        if events:
            others = sorted({e.user_id for e in events} - {user_id})
            if others:
                raise RequestError(f"inline events belong to other users {others[:3]}; "
                                   f"all must have user_id {user_id!r}", param="events")
            ordered = sorted(events, key=lambda e: e.timestamp)
            return _masked([e for e in ordered if before is None or e.timestamp < before])
        return _masked(self.runtime.store.user_events(dataset, user_id, before=before))

    async def next_item(
        self,
        dataset: str,
        user_id: str,
        *,
        events: Sequence[BehaviorEvent] | None = None,
        config: NextItemConfig | None = None,
        as_of: datetime | None = None,
    ) -> NextItemPrediction:
        """Top-k next items for a stored user or for inline events.

        Raises:
            UnknownUserError / RequestError: caller mistakes.
            ValueError: the dataset was never ingested.
        """
        self.require_dataset(dataset)
        hist = self.history(dataset, user_id, events, before=as_of)
        arts = self.runtime.artifacts(dataset)
        model, why = await self.model_or_none()
        pred = await NextItemService(model, model_sha256=self.runtime.model_sha256).predict(
            user_id, hist, arts, config, as_of=as_of
        )
        if model is None and why and self.use_model:
            pred.meta.degraded = True
            pred.meta.degraded_reason = f"model unavailable ({why}); " + (pred.meta.degraded_reason or "")
        return pred

    def forget_user(self, dataset: str, user_id: str) -> int:
        """Delete a user's stored events and remove the user from the retrieval artifacts.

        The user's row leaves the user index and `user_items`; co-visitation and popularity are
        refitted from the remaining users' sequences (no re-embedding), and the artifacts are
        saved, so a restart does not bring the user back.

        Returns:
            How many events were deleted.

        Raises:
            UnknownUserError: the store has no events for this user (no suggestions are given).
        """
        store = self.runtime.store
        if not store.has_user(dataset, user_id):
            raise UnknownUserError(dataset, user_id)
        n = store.delete_user(dataset, user_id)
        try:
            arts = self.runtime.artifacts(dataset)
        except ValueError as e:  # no catalogue, so no artifacts that could hold the user
            log.info("no artifacts to update for %s: %s", dataset, e)
            return n
        drop_user_from_artifacts(arts, user_id, self.runtime.settings.index_dir(dataset))
        return n


def _masked(events: list[BehaviorEvent]) -> list[BehaviorEvent]:
    return [
        e.model_copy(update={"review_text": mask_pii(e.review_text)}) if e.review_text else e
        for e in events
    ]
