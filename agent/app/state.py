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
from datetime import datetime
from typing import TYPE_CHECKING

from agent.app.baselines import Baselines
from agent.app.progressive import ProgressiveJobs
from agent.app.results import DatasetSummary
from agent.domain.errors import RequestError, UnknownDatasetError
from agent.domain.history import OWNED_EVENT_TYPES
from agent.domain.schemas import CatalogItem
from agent.tasks.audience import AudienceIndex
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
        self.index_locks: dict[str, asyncio.Lock] = {}
        self.write_lock = asyncio.Lock()  # one writer at a time: ingest order and deletes stay simple
        self.progressive = ProgressiveJobs()  # progressive next-item answers, by recommendation id
        self.baselines = Baselines(runtime.store, runtime.workspace / "tasks", self.catalog)

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

    def forget(self, dataset: str) -> None:
        """After ingest or delete: catalogue, audience index, end time and priors are rebuilt on
        next use."""
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

    async def warm_up(self) -> None:
        """Load every stored dataset's indexes (failures are recorded in `indexes`)."""
        for d in await asyncio.to_thread(self.runtime.store.datasets):
            try:
                await self.ensure_indexes(d)
            except Exception as e:  # recorded in self.indexes and reported by readiness checks
                log.warning("indexes for %s not loaded: %s", d, e)

    def index_states(self) -> dict[str, str]:
        """Every stored dataset's index state: ``ready``, ``loading``, ``not loaded``, ``unusable: ...``
        or ``failed: ...``."""
        return {d: "not loaded" for d in self.runtime.store.datasets()} | self.indexes

    def summary(self, dataset: str) -> DatasetSummary:
        """Counts, index state and embedder of one stored dataset.

        `indexes`: ``ready`` (loaded in this process), ``built`` (on disk, loaded on first use),
        ``not built``, ``loading``, ``unusable: ...`` or ``failed: ...``. `embedder`: the one the
        indexes were built with, else the one a build would use.
        """
        counts = self.runtime.store.counts(dataset)
        manifest = self.runtime.settings.index_dir(dataset) / "items" / "manifest.json"
        state = self.indexes.get(dataset)
        if self.runtime.loaded_artifacts(dataset) is not None:
            state = "ready"
        elif state is None:
            state = "built" if manifest.exists() else "not built"
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
