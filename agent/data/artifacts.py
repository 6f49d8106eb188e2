"""Per-dataset retrieval artifacts, built from the store once and saved under the workspace.

``<workspace>/indexes/<dataset>/``: ``items/`` and ``users/`` (FAISS + manifest),
``covisit.json``, ``popularity.json``, ``user_items.json`` and ``updates.json``. Loading checks
every index manifest against the embedder and the current catalogue, then brings the user side
up to the store (`agent.data.user_updates`, which also keeps it current as events arrive and
users are deleted).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent.data.candidates import CandidateGenerator
from agent.data.store import EventStore
from agent.data.user_updates import (
    UpdateLog,
    apply_sequences,
    build_user_index,
    catch_up,
    item_sequences,
    resync_from_store,
)
from agent.domain.schemas import CatalogItem
from agent.domain.verify import TitleIndex
from retrieval.covisit import CoVisitation
from retrieval.embedder import Embedder
from retrieval.files import write_atomic
from retrieval.index import VectorIndex, catalogue_hash
from retrieval.popularity import Popularity

log = logging.getLogger(__name__)


@dataclass
class DatasetArtifacts:
    dataset: str
    catalog: dict[str, CatalogItem]
    item_index: VectorIndex
    user_index: VectorIndex
    user_items: dict[str, list[str]]
    covisit: CoVisitation
    popularity: Popularity
    # item id -> {"n", "negative", "share_negative", "penalty"} from recent reviews
    # (agent.tasks.opinion.penalties_from_events); next-item ranking down-weights these items.
    review_penalties: dict[str, dict[str, float]] = field(default_factory=dict)
    # source -> weight learned by `shoplens train` (agent.tasks.fusion), and the note answers
    # carry about them; None: the hand-set DEFAULT_WEIGHTS
    fusion_weights: dict[str, float] | None = None
    fusion_note: str = ""
    # the model's share of the next-item score served for this dataset (`shoplens train --llm`,
    # agent.tasks.llm_weight: 0 until validation users show a significant gain), and its note
    llm_weight: float = 0.0
    llm_weight_note: str = ""
    # incremental updates since the build (`agent.data.user_updates`): counts, the co-visitation
    # changes not saved yet, and what /readyz reports
    updates: UpdateLog = field(default_factory=UpdateLog)

    def generator(self, weights: dict[str, float] | None = None) -> CandidateGenerator:
        """The candidate generator with `weights`, else the trained ones, else the defaults."""
        return CandidateGenerator(
            self.item_index, self.user_index, self.user_items, self.covisit, self.popularity,
            weights or self.fusion_weights,
        )

    def title(self, item_id: str) -> str:
        it = self.catalog.get(item_id)
        return it.title if it else f"item {item_id}"

    @cached_property
    def title_index(self) -> TitleIndex:
        """Every catalogue title, for the verifier to see which products a sentence names
        (`agent.domain.verify`); built on first use."""
        return TitleIndex(it.title for it in self.catalog.values())


def catalog_hash(catalog: dict[str, CatalogItem]) -> str:
    """The catalogue hash every index manifest records (ids + item text)."""
    return catalogue_hash((i, it.text()) for i, it in catalog.items())


def build_artifacts(
    store: EventStore, dataset: str, embedder: Embedder, folder: Path, *, show_progress: bool = True
) -> DatasetArtifacts:
    """Embed the catalogue, fit co-visitation and popularity, build both FAISS indexes, save.

    Sequences for co-visitation are each user's item ids in time order (consecutive repeats
    of the same item collapsed).

    Raises:
        ValueError: the dataset has no items in the store.
    """
    catalog = store.items(dataset)
    if not catalog:
        raise ValueError(f"dataset {dataset!r} has no items in the store: load its catalogue with "
                         f"`shoplens ingest --events FILE [--catalog ITEMS] --name {dataset}` (a built-in "
                         "dataset: `shoplens ingest <name>`)")
    ids = sorted(catalog)
    chash = catalog_hash(catalog)
    texts = [catalog[i].text() for i in ids]
    log.info("embedding %d items with %s", len(ids), embedder.name)
    vecs = _embed_batched(embedder, texts, show_progress)
    item_index = VectorIndex.build(ids, vecs, name="items", embedder=embedder.name, content_hash=chash)

    n_events = store.counts(dataset)["events"]  # before reading them: a later event makes the next load catch up
    user_items = item_sequences(store.iter_events(dataset))
    covisit = CoVisitation().fit(user_items.values())
    popularity = Popularity().fit(user_items.values())

    user_index = build_user_index(user_items, item_index)

    folder.mkdir(parents=True, exist_ok=True)
    UpdateLog(dirty=True).save(folder)  # a crash mid-build leaves files of two builds: the next load resyncs
    item_index.save(folder / "items")
    user_index.save(folder / "users")
    covisit.save(folder / "covisit.json")
    popularity.save(folder / "popularity.json")
    write_atomic(folder / "user_items.json", json.dumps(user_items))
    updates = UpdateLog(events=n_events)
    updates.save(folder)
    return DatasetArtifacts(dataset, catalog, item_index, user_index, user_items, covisit, popularity,
                            updates=updates)


def load_artifacts(store: EventStore, dataset: str, embedder_name: str, dim: int, folder: Path) -> DatasetArtifacts:
    """Load saved artifacts, checking manifests against the embedder and current catalogue, and
    bring the user side up to the store (`agent.data.user_updates.catch_up`, or
    `resync_from_store` when an update was interrupted).

    Raises:
        FileNotFoundError: never built (run `shoplens ingest`).
        IndexMismatchError: built with another embedder or an older catalogue.
        OSError: catching up could not write its files.
    """
    catalog = store.items(dataset)
    chash = catalog_hash(catalog)
    item_index = VectorIndex.load(folder / "items", embedder=embedder_name, dim=dim, content_hash=chash)
    saved = UpdateLog.load(folder)
    if saved is not None and saved.dirty:  # the user-side files may be from two updates: rebuilt, not read
        empty = build_user_index({}, item_index)
        arts = DatasetArtifacts(dataset, catalog, item_index, empty, {}, CoVisitation.load(folder / "covisit.json"),
                                Popularity())
        note: str | None = resync_from_store(arts, store, folder)
    else:
        user_index = VectorIndex.load(folder / "users", embedder=embedder_name, dim=dim, content_hash=chash)
        arts = DatasetArtifacts(
            dataset,
            catalog,
            item_index,
            user_index,
            json.loads((folder / "user_items.json").read_text()),
            CoVisitation.load(folder / "covisit.json"),
            Popularity.load(folder / "popularity.json"),
        )
        note = catch_up(arts, store, folder, saved)
    if note:
        log.info("%s: %s", dataset, note)
    return arts


def _embed_batched(embedder: Embedder, texts: list[str], show_progress: bool, batch: int = 256) -> np.ndarray:
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch), desc="embedding items", unit="batch",
                      disable=not show_progress or len(texts) <= batch):
        out[start : start + batch] = embedder.embed(texts[start : start + batch])
    return out


def drop_user_from_artifacts(arts: DatasetArtifacts, user_id: str, folder: Path, *,
                             events_removed: int = 0) -> bool:
    """Remove `user_id` from `arts` in place (user index, user_items, co-visitation and
    popularity by exact count deltas: the same result as a refit) and save the changed files
    under `folder`, co-visitation included, so no trace of the user stays on disk
    (`agent.data.user_updates.apply_sequences` with an empty sequence).

    Args:
        events_removed: how many events the store deleted (keeps ``updates.json``'s count).

    Returns:
        False if the user was absent.
    """
    if user_id not in arts.user_items and arts.user_index.vector(user_id) is None:
        return False
    events = None if arts.updates.events is None else arts.updates.events - events_removed
    arts.updates.pending.discard(user_id)
    apply_sequences(arts, {user_id: []}, folder, events=events)
    if arts.user_index.vector(user_id) is not None:  # indexed without a sequence: no count held the user
        arts.user_index = arts.user_index.removed([user_id])
        arts.user_index.save(folder / "users")
    return True
