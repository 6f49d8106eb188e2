"""Per-dataset retrieval artifacts, built from the store once and saved under the workspace.

``<workspace>/indexes/<dataset>/``: ``items/`` and ``users/`` (FAISS + manifest),
``covisit.json``, ``popularity.json``, ``user_items.json``. Loading checks every index manifest
against the embedder and the current catalogue.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent.data.candidates import CandidateGenerator, user_vector
from agent.data.store import EventStore
from agent.domain.schemas import CatalogItem
from agent.domain.verify import TitleIndex
from retrieval.covisit import CoVisitation
from retrieval.embedder import Embedder
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

    user_items: dict[str, list[str]] = defaultdict(list)
    for e in store.iter_events(dataset):
        seq = user_items[e.user_id]
        if not seq or seq[-1] != e.item_id:
            seq.append(e.item_id)
    covisit = CoVisitation().fit(user_items.values())
    popularity = Popularity().fit(user_items.values())

    user_index = build_user_index(user_items, item_index)

    folder.mkdir(parents=True, exist_ok=True)
    item_index.save(folder / "items")
    user_index.save(folder / "users")
    covisit.save(folder / "covisit.json")
    popularity.save(folder / "popularity.json")
    (folder / "user_items.json").write_text(json.dumps(user_items))
    return DatasetArtifacts(dataset, catalog, item_index, user_index, dict(user_items), covisit, popularity)


def build_user_index(user_items: dict[str, list[str]], item_index: VectorIndex) -> VectorIndex:
    """A FAISS index of user vectors (recency-weighted mean of each user's last 50 item vectors);
    users with no indexed item are left out (cold start)."""
    uids, uvecs = [], []
    for uid, items in user_items.items():
        v = user_vector(items[-50:], item_index)
        if v is not None:
            uids.append(uid)
            uvecs.append(v)
    uarr = np.stack(uvecs) if uvecs else np.zeros((0, item_index.manifest.dim), np.float32)
    m = item_index.manifest
    return VectorIndex.build(uids, uarr, name="users", embedder=m.embedder, content_hash=m.catalogue_hash)


def load_artifacts(store: EventStore, dataset: str, embedder_name: str, dim: int, folder: Path) -> DatasetArtifacts:
    """Load saved artifacts, checking manifests against the embedder and current catalogue.

    Raises:
        FileNotFoundError: never built (run `shoplens ingest`).
        IndexMismatchError: built with another embedder or an older catalogue.
    """
    catalog = store.items(dataset)
    chash = catalog_hash(catalog)
    item_index = VectorIndex.load(folder / "items", embedder=embedder_name, dim=dim, content_hash=chash)
    user_index = VectorIndex.load(folder / "users", embedder=embedder_name, dim=dim, content_hash=chash)
    return DatasetArtifacts(
        dataset,
        catalog,
        item_index,
        user_index,
        json.loads((folder / "user_items.json").read_text()),
        CoVisitation.load(folder / "covisit.json"),
        Popularity.load(folder / "popularity.json"),
    )


def _embed_batched(embedder: Embedder, texts: list[str], show_progress: bool, batch: int = 256) -> np.ndarray:
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch), desc="embedding items", unit="batch",
                      disable=not show_progress or len(texts) <= batch):
        out[start : start + batch] = embedder.embed(texts[start : start + batch])
    return out


def drop_user_from_artifacts(arts: DatasetArtifacts, user_id: str, folder: Path) -> bool:
    """Remove `user_id` from `arts` in place (user index, user_items, refitted co-visitation and
    popularity) and save the changed files under `folder`. Returns False if the user was absent.
    """
    if user_id not in arts.user_items and arts.user_index.vector(user_id) is None:
        return False
    user_items = {u: seq for u, seq in arts.user_items.items() if u != user_id}
    keep = [u for u in arts.user_index.ids if u != user_id]
    old = arts.user_index
    dim = old.manifest.dim
    # every id in `keep` comes from the index, so each has a stored vector (None never occurs)
    kept = [v for u in keep if (v := old.vector(u)) is not None]
    vecs = np.stack(kept) if keep else np.zeros((0, dim), np.float32)
    user_index = VectorIndex.build(keep, vecs, name=old.manifest.name, embedder=old.manifest.embedder,
                                   content_hash=old.manifest.catalogue_hash, kind=old.manifest.kind)
    covisit = CoVisitation(arts.covisit.config).fit(user_items.values())
    popularity = Popularity().fit(user_items.values())
    folder.mkdir(parents=True, exist_ok=True)
    user_index.save(folder / "users")
    covisit.save(folder / "covisit.json")
    popularity.save(folder / "popularity.json")
    (folder / "user_items.json").write_text(json.dumps(user_items))
    arts.user_index, arts.user_items, arts.covisit, arts.popularity = (
        user_index, user_items, covisit, popularity
    )
    return True
