"""What the service returns besides the task predictions (those are `agent.domain.predictions`):
dataset summaries, a sentiment batch, an ingest outcome and a page of a user's events."""

from __future__ import annotations

from pydantic import BaseModel, Field

from agent.domain.predictions import SentimentFailure, SentimentResult
from agent.domain.schemas import BehaviorEvent


class DatasetSummary(BaseModel):
    """One stored dataset."""

    name: str
    users: int
    items: int = Field(description="catalogue items")
    events: int
    indexes: str = Field(description="ready (loaded), built (on disk), not built, loading, unusable: ..., "
                         "failed: ...")
    indexes_ready: bool = Field(description="the FAISS indexes are loaded or built and can serve")
    embedder: str | None = Field(description="the embedder the indexes were (or would be) built with; "
                                 "null without a catalogue")


class IndexUpdates(BaseModel):
    """How current one loaded dataset's user-side artifacts are (`agent.data.user_updates`):
    users join, change in and leave the user index, user_items, popularity and co-visitation as
    their events are stored or deleted; co-visitation's file is saved on a bounded schedule."""

    users_indexed: int = Field(description="users in the similar-user index")
    users_pending: int = Field(description="users with stored events not yet in the indexes (0 unless an update "
                               "failed; the next ingest retries them)")
    last_update: str | None = Field(description="ISO-8601 UTC time of the last incremental update; null: none "
                                    "since the indexes were built")
    users_updated: int = Field(description="users added, changed or removed incrementally since the build")
    covisit_unsaved_users: int = Field(description="changed users whose co-visitation counts are in memory but not "
                                       "yet in covisit.json (replayed on restart)")
    covisit_save_bound: str = Field(description="when covisit.json is re-saved, e.g. '500 users or 3600 s'")
    unsaved_users: int = Field(default=0, description="changed users whose user index, user_items and popularity "
                               "files are not yet re-saved (saved every 200 users or 10 s, after a delete and at "
                               "shutdown; a restart catches up from the store)")
    last_error: str | None = Field(description="why the last update failed; null after a success")


class SentimentBatchMeta(BaseModel):
    degraded: bool = Field(description="true when any text was judged by the lexicon fallback")
    degraded_reason: str | None = None
    n: int
    by_model: int
    by_lexicon: int
    failed: int = Field(description="texts that could not be judged (see their `error`)")
    reused: int = Field(default=0, description="texts answered from stored scores (no model call)")


class SentimentBatch(BaseModel):
    results: list[SentimentResult | SentimentFailure] = Field(description="one per text, in request order")
    meta: SentimentBatchMeta


class EventError(BaseModel):
    index: int = Field(description="position of the event in the request")
    param: str | None = Field(description="the field at fault, e.g. events[3].timestamp")
    message: str
    code: str


class IngestResult(BaseModel):
    dataset: str
    received: int
    stored: int = Field(description="events new to the store (committed before this returns)")
    duplicates: int = Field(description="valid events already stored (same event_id)")
    rejected: int
    event_ids: list[str] = Field(description="ids of the valid events, in request order")
    errors: list[EventError]


class UserEventsPage(BaseModel):
    dataset: str
    user_id: str
    total: int
    offset: int
    events: list[BehaviorEvent]
