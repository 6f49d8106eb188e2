"""What every `ShopLensService` over one `Runtime` shares: catalogue and audience caches, the
dataset end times, each dataset's index state, the fitted baselines and the write locks.

The API, the chat mounted beside it and the CLI build their service over the same runtime, so
an ingest or a delete through any of them drops the same caches (`forget`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from agent.app.baselines import Baselines
from agent.app.progressive import ProgressiveJobs
from agent.app.results import DatasetSummary, IndexUpdates
from agent.data.user_updates import UpdateReport, update_status, update_users
from agent.domain.errors import ArtifactMismatchError, RequestError, UnknownDatasetError
from agent.domain.history import OWNED_EVENT_TYPES
from agent.domain.schemas import CatalogItem
from agent.tasks.audience import AudienceIndex
from agent.tasks.encoder_cases import EncoderTask
from agent.tasks.encoder_train import EncoderScorer
from agent.tasks.rows import robust_end

if TYPE_CHECKING:
    from agent.app.runtime import Runtime

log = logging.getLogger(__name__)


class AppState:
    """Per-runtime caches and locks (built by `Runtime.state`)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.catalogs: dict[str, dict[str, CatalogItem]] = {}
        self.audience: dict[str, AudienceIndex] = {}
        self.dataset_ends: dict[str, datetime] = {}
        self.indexes: dict[str, str] = {}  # dataset -> "loading" | "ready" | "unusable: ..." | "failed: ..."
        # the startup warm-up: True while it lists the datasets, then the ones it has yet to load
        self.warm_listing = False
        self.warming: set[str] = set()
        self.index_locks: dict[str, asyncio.Lock] = {}
        self.write_lock = asyncio.Lock()  # one writer at a time: ingest order and deletes stay simple
        self.progressive = ProgressiveJobs()  # progressive next-item answers, by recommendation id
        self.baselines = Baselines(runtime.store, runtime.workspace / "tasks", self.catalog)
        self.encoders: dict[tuple[str, str], EncoderScorer] = {}  # (dataset, task) -> a trained encoder

    # ---- datasets ---------------------------------------------------------------------------
    def require_dataset(self, dataset: str) -> None:
        """An indexed lookup per request; the full dataset list only on the error path.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
        """
        if not self.runtime.store.has_dataset(dataset):
            raise UnknownDatasetError(dataset, self.runtime.store.datasets())

    def catalog(self, dataset: str) -> dict[str, CatalogItem]:
        """The dataset's catalogue, read once.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
        """
        if dataset not in self.catalogs:
            self.require_dataset(dataset)
            self.catalogs[dataset] = self.runtime.store.items(dataset)
        return self.catalogs[dataset]

    def encoder(self, dataset: str, task: EncoderTask, param: str = "scorer") -> EncoderScorer:
        """The dataset's trained encoder for `task` (loaded once; blocking: call in a thread).

        Raises:
            RequestError: (field `param`) none trained, or it fails its manifest check; the
                message gives the train command.
        """
        key = (dataset, task)
        if key not in self.encoders:
            try:
                self.encoders[key] = EncoderScorer.load(self.runtime.settings.index_dir(dataset), dataset, task)
            except (FileNotFoundError, ArtifactMismatchError) as e:
                raise RequestError(f"{param}: {e}", param=param) from e
        return self.encoders[key]

    def dataset_end(self, dataset: str) -> datetime:
        """The dataset's last event time (top 0.5% ignored), read once.

        Raises:
            RequestError: the dataset has no events.
        """
        if dataset not in self.dataset_ends:
            self.dataset_ends[dataset] = robust_end(self.runtime.store, dataset)
        return self.dataset_ends[dataset]

    def audience_index(self, dataset: str) -> AudienceIndex:
        """The dataset's artifacts (item/user FAISS indexes, co-visitation) plus its buyers (users
        with a purchase or a review of the item: `OWNED_EVENT_TYPES`), recency-weighted with a
        90-day half-life; built once."""
        if dataset not in self.audience:
            arts = self.runtime.artifacts(dataset)
            buyers: dict[str, dict[str, float]] = defaultdict(dict)
            activity: dict[str, float] = defaultdict(float)
            # a reviewer has the item too (review-only data such as Amazon's is a purchase log)
            purchases = list(self.runtime.store.iter_events(dataset, event_types=tuple(sorted(OWNED_EVENT_TYPES))))
            last = max((e.timestamp for e in purchases), default=None)
            for e in purchases:
                w = 0.5 ** ((last - e.timestamp).total_seconds() / 86_400 / 90.0) if last else 1.0
                buyers[e.item_id][e.user_id] = buyers[e.item_id].get(e.user_id, 0.0) + w
                activity[e.user_id] += w
            self.audience[dataset] = AudienceIndex(arts.catalog, arts.item_index, arts.user_index, arts.covisit,
                                                   dict(buyers), dict(activity), None)
        return self.audience[dataset]

    def forget(self, dataset: str, *, catalogue: bool = True) -> None:
        """After ingest or delete: catalogue, audience index, end time and priors are rebuilt on
        next use. `catalogue=False` keeps the catalogue (events alone never change it: after
        ``POST /v1/events``)."""
        if catalogue:
            self.catalogs.pop(dataset, None)
        self.audience.pop(dataset, None)
        self.dataset_ends.pop(dataset, None)
        self.baselines.forget(dataset)

    # ---- indexes ----------------------------------------------------------------------------
    def index_lock(self, dataset: str) -> asyncio.Lock:
        return self.index_locks.setdefault(dataset, asyncio.Lock())

    async def ensure_indexes(self, dataset: str) -> None:
        """Load (or build) a dataset's artifacts once, off the event loop; the state is kept in
        `indexes` for readiness reports.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
            RequestError: the dataset cannot be indexed (no catalogue), code ``dataset_unusable``.
        """
        if self.indexes.get(dataset) == "ready":
            return
        await asyncio.to_thread(self.require_dataset, dataset)
        async with self.index_lock(dataset):
            if self.indexes.get(dataset) == "ready":
                return
            self.indexes[dataset] = "loading"
            try:
                await asyncio.to_thread(self.runtime.artifacts, dataset)
            except ValueError as e:
                self.indexes[dataset] = f"unusable: {e}"
                raise RequestError(str(e), param="dataset", code="dataset_unusable") from e
            except Exception as e:
                self.indexes[dataset] = f"failed: {type(e).__name__}: {e}"
                raise
            self.indexes[dataset] = "ready"

    async def update_users(self, dataset: str, user_ids: Iterable[str], *, added_events: int) -> UpdateReport | None:
        """After events for these stored user ids were stored: update the dataset's loaded
        artifacts in place, under its index lock, off the event loop (`agent.data.user_updates`).
        Artifacts not loaded in this process are left alone: loading catches up from the store.

        Never raises: the events are stored either way. A failure is logged and the users stay
        pending (`index_updates`), retried by the next update.

        Returns:
            What changed, or None (not loaded, or failed).
        """
        async with self.index_lock(dataset):
            arts = self.runtime.loaded_artifacts(dataset)
            if arts is None:
                return None
            try:
                return await asyncio.to_thread(update_users, arts, self.runtime.store, list(user_ids),
                                               self.runtime.settings.index_dir(dataset), added_events=added_events,
                                               defer=True)
            except Exception:  # noqa: BLE001 - the ingest succeeded; the users stay pending and are reported
                log.exception("could not add the new events of %s to its indexes", dataset)
                return None

    def index_updates(self) -> dict[str, IndexUpdates]:
        """Each dataset loaded in this process: how current its user-side artifacts are (for
        /readyz). In memory, no I/O."""
        return {d: IndexUpdates(**update_status(arts.updates, len(arts.user_index)))
                for d in self.runtime.loaded_datasets() if (arts := self.runtime.loaded_artifacts(d))}

    async def warm_up(self) -> None:
        """Load every stored dataset's indexes (failures are recorded in `indexes`). Until each
        dataset stored at start is loaded (or has failed), `readiness` says not ready."""
        self.warm_listing = True
        try:
            datasets = await asyncio.to_thread(self.runtime.store.datasets)
            self.warming = set(datasets)
            self.warm_listing = False
            for d in datasets:
                try:
                    await self.ensure_indexes(d)
                except Exception as e:  # recorded in self.indexes and reported by readiness checks
                    log.warning("indexes for %s not loaded: %s", d, e)
                finally:
                    self.warming.discard(d)
        finally:
            self.warm_listing, self.warming = False, set()

    def index_state(self, dataset: str, *, has_items: bool | None = None) -> str:
        """One stored dataset's index state, as /v1/datasets and /readyz report it: ``ready``
        (loaded in this process), ``loading`` (being loaded or built now), ``built`` (on disk;
        loaded by the first request), ``not built`` (the first request builds it), ``unusable:
        ...`` (no catalogue: nothing to index) or ``failed: ...``. Blocking: a file check and at
        most one indexed lookup (`has_items`, when the caller has not counted the items)."""
        state = self.indexes.get(dataset)
        if self.runtime.loaded_artifacts(dataset) is not None or state == "ready":
            return "ready"
        if state is not None and (state == "loading" or state.startswith("failed")):
            return state
        if not (self.runtime.store.has_items(dataset) if has_items is None else has_items):
            return (f"unusable: no catalogue; next-item and audience need one (`shoplens ingest --events FILE "
                    f"--name {dataset}` derives it from the file's events, or add --catalog FILE)")
        # an earlier "unusable" (no catalogue then) is stale now that there are items: the next request builds
        manifest = self.runtime.settings.index_dir(dataset) / "items" / "manifest.json"
        return "built" if manifest.exists() else "not built"

    def index_states(self) -> dict[str, str]:
        """Every stored dataset's `index_state`."""
        return {d: self.index_state(d) for d in self.runtime.store.datasets()}

    def readiness(self) -> tuple[dict[str, str], list[str]]:
        """(every stored dataset's `index_state`, why the instance is not ready: [] when it is).

        Not ready while the startup warm-up is loading the datasets stored at start, and when
        no dataset can serve (every one failed). A dataset created or changed since (for example
        by ``POST /v1/events`` with ``create``) never holds the others back: it is ``not built``
        or ``loading`` until a request builds it, or ``unusable`` without a catalogue. Blocking.
        """
        states = self.index_states()
        if self.warm_listing:
            return states, ["indexes: listing the datasets to load at startup"]
        problems = [f"indexes {d}: {states.get(d, 'not loaded')} (startup warm-up)" for d in sorted(self.warming)]
        if not problems and states and all(v.startswith("failed") for v in states.values()):
            problems = [f"indexes {d}: {v}" for d, v in states.items()] + ["no dataset can serve"]
        return states, problems

    def summary(self, dataset: str) -> DatasetSummary:
        """Counts, index state and embedder of one stored dataset.

        `indexes`: `index_state`. `embedder`: the one the indexes were built with, else the one a
        build would use.
        """
        counts = self.runtime.store.counts(dataset)
        manifest = self.runtime.settings.index_dir(dataset) / "items" / "manifest.json"
        state = self.index_state(dataset, has_items=counts["items"] > 0)
        embedder = None
        if manifest.exists():
            try:
                embedder = str(json.loads(manifest.read_text())["embedder"])
            except (OSError, ValueError, KeyError):
                embedder = None
        if embedder is None and counts["items"]:
            embedder = self.runtime.embedder_name_for(dataset)
        return DatasetSummary(name=dataset, users=counts["users"], items=counts["items"], events=counts["events"],
                              indexes=state, indexes_ready=state in ("ready", "built"), embedder=embedder)
