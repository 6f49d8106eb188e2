"""``--ranker pipeline``: the served next-item pipeline, measured on a protocol's cases.

Each case goes through `agent.app.service.ShopLensService.next_item` — the method
``POST /v1/next-item``, ``shoplens recommend`` and the chat call — with the case's history as
inline events and the protocol's candidate set as the request's ``candidates``. So the
candidate sources, their scaling and fusion weights, the LLM scorer (``NextItemConfig.llm_scorer``)
and the final blend are the served code; nothing here ranks.

What users of the served pipeline get is also what its store and indexes hold, so the store is
built from the protocol's training data only (no evaluated target): `pipeline_runtime` from
title-only sequences (`Suite.train_by_user`, LLMRank's files), `store_runtime` from a stored
dataset's real events (`eval.store_suite`), under ``<workspace>/pipeline/<dataset>-<hash>/``
(built once, then reused: the FAISS indexes carry their manifests as in production).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.ingest._common import SYNTHETIC_START
from agent.settings import load_settings
from agent.tasks.next_item import LlmScorer, NextItemConfig
from eval.cache import Recorder
from eval.llm_rankers import RankOutcome, _SyncMixin
from eval.protocols import RankingCase


def sequence_events(user_id: str, items: list[str] | tuple[str, ...]) -> list[BehaviorEvent]:
    """One purchase per item, a day apart, oldest first, on the loaders' synthetic clock for
    title-only sequences (`agent.ingest._common.SYNTHETIC_START`: no timestamps survive in
    LLMRank's files)."""
    return [BehaviorEvent(user_id=user_id, item_id=i, event_type="purchase",
                          timestamp=SYNTHETIC_START + timedelta(days=n)) for n, i in enumerate(items)]


def pipeline_runtime(workspace: Path, dataset: str, train_by_user: dict[str, list[str]],
                     titles: dict[str, str], *, embedder: str | None = None) -> Runtime:
    """A Runtime whose store holds exactly `train_by_user` and the `titles` catalogue.

    The folder is keyed by a hash of both, so a changed protocol never reuses another's store.
    `embedder`: the item embedder (default: the served setting, ``auto``).

    Raises:
        ValueError: no training sequences (the protocol does not provide them yet).
    """
    if not train_by_user:
        raise ValueError("the served pipeline needs the protocol's training sequences; this suite "
                         "has none (supported: --protocol llmrank on amazon-games)")
    return _keyed_runtime(
        workspace, dataset, embedder,
        {u: " ".join(train_by_user[u]) for u in train_by_user}, titles,
        lambda: [CatalogItem(item_id=i, title=t) for i, t in titles.items()],
        lambda: [e for u, seq in train_by_user.items() for e in sequence_events(u, seq)])


def store_runtime(workspace: Path, dataset: str, train_events: Mapping[str, Sequence[BehaviorEvent]],
                  catalog: Mapping[str, CatalogItem], *, embedder: str | None = None) -> Runtime:
    """A Runtime whose store holds exactly `train_events` (real events: types, times, baskets)
    and the dataset's whole `catalog` (titles, categories, brands, prices).

    The folder, ``<workspace>/pipeline/<dataset>-<hash>``, is keyed by a hash of the event ids and
    the catalogue's text, so another protocol, user sample or cut-off never reuses another's
    store. `embedder`: the item embedder (default: the served setting, ``auto``).

    Raises:
        ValueError: no training events.
    """
    if not any(train_events.values()):
        raise ValueError(f"dataset {dataset!r}: the protocol leaves no training events")
    return _keyed_runtime(
        workspace, dataset, embedder,
        {u: " ".join(e.event_id for e in train_events[u]) for u in train_events},
        {i: catalog[i].text() for i in catalog},
        lambda: list(catalog.values()), lambda: [e for evs in train_events.values() for e in evs])


def _keyed_runtime(workspace: Path, dataset: str, embedder: str | None, users: Mapping[str, str],
                   items: Mapping[str, str], catalog: Callable[[], list[CatalogItem]],
                   events: Callable[[], list[BehaviorEvent]]) -> Runtime:
    """A Runtime in ``<workspace>/pipeline/<dataset>-<hash>``, the hash taken over `users` (user
    id -> its training sequence as text) and `items` (item id -> its text), both in id order;
    its store is filled with `catalog()` and `events()` the first time only."""
    h = hashlib.sha256()
    for u in sorted(users):
        h.update(f"{u}\x1f{users[u]}\x1e".encode())
    for i in sorted(items):
        h.update(f"{i}\x1f{items[i]}\x1e".encode())
    folder = workspace / "pipeline" / f"{dataset}-{h.hexdigest()[:12]}"
    rt = Runtime(load_settings(workspace=folder, embedder=embedder))
    if not rt.store.has_dataset(dataset):
        rt.store.add_items(dataset, catalog())
        rt.store.add_events(dataset, events())
    return rt


class PipelineRanker(_SyncMixin):
    """Ranks a case with `ShopLensService.next_item` (inline history, the case's candidates).

    A case whose ``source`` is ``full`` (the whole catalogue, more ids than a request may send)
    is answered as the API answers without candidates: the pipeline retrieves from the whole
    catalogue itself and returns its top `full_k` (the rest of the catalogue is unranked).

    Args:
        runtime: from `pipeline_runtime` or `store_runtime` (store = training data only).
        dataset: the dataset name in that store.
        model: the (cached) model, or None for the pipeline without the LLM.
        llm_scorer: the LLM scorer; None: the served setting (`Settings.llm_scorer`).
        llm_weight: the model's weight in the final score; None: the served one (the store's
            fitted ``llm_weight.json``, else 0, when the model does not rank).
        histories: user id -> the case's history as real events (a stored dataset's); users not
            in it get their item ids as purchases on the synthetic clock (`sequence_events`).
        source: rank by this one served source (``covisit``, ``embedding``, ``similar_users``,
            ``popularity``: weight 1, the others 0) instead of the fused sources.
        repurchase: ``full`` cases: history purchases may be recommended.
        full_k: how many items a ``full`` case's answer ranks.
    """

    def __init__(self, runtime: Runtime, dataset: str, model: Any = None, *,
                 llm_scorer: LlmScorer | None = None, llm_weight: float | None = None, name: str = "pipeline",
                 histories: Mapping[str, Sequence[BehaviorEvent]] | None = None, source: str | None = None,
                 repurchase: bool = False, full_k: int = 20) -> None:
        self.runtime = runtime
        self.dataset = dataset
        self.name = name
        self.model = model
        self.histories = histories or {}
        self.source = source
        self.full_k = full_k
        use_model = model is not None
        self._rec: Recorder | None = None  # the current case's recorder (cases run one at a time)

        async def provider() -> Any:
            return self._rec

        self.service = ShopLensService(runtime, use_model=use_model, explain=False,
                                       model_provider=provider if use_model else None)
        base = self.service.next_item_config(k=1, use_model=use_model)
        self.config: NextItemConfig = replace(base, explain=False, llm_scorer=llm_scorer or base.llm_scorer,
                                              llm_weight=llm_weight if llm_weight is not None else base.llm_weight,
                                              repurchase=repurchase,
                                              source_weights={source: 1.0} if source else None)

    def describe(self) -> dict[str, Any]:
        """What config.json records: the served configuration and the store it ranks from."""
        c = self.config
        arts = self.runtime.artifacts(self.dataset)
        weight = c.weight_for(arts.llm_weight)
        return {"pipeline": {"use_llm_ranking": c.use_llm_ranking and weight > 0, "llm_scorer": c.llm_scorer,
                             "llm_weight": weight,
                             "llm_weight_from": "the run's --llm-weight" if c.llm_weight is not None
                             else arts.llm_weight_note, "window": c.window,
                             "source_weights": c.source_weights or "the dataset's fusion (see fusion)",
                             "single_source": self.source, "repurchase": c.repurchase,
                             "store": str(self.runtime.settings.workspace)}}

    async def arank(self, case: RankingCase) -> RankOutcome:
        t0 = time.perf_counter()
        full = case.source == "full"
        n = self.full_k if full else len(case.candidates)
        cfg = replace(self.config, k=n, n_candidates=n)
        rec = self._rec = Recorder(self.model) if self.model is not None else None
        stored = self.histories.get(case.user_id)
        events = list(stored) if stored is not None else sequence_events(case.user_id, case.history)
        pred = await self.service.next_item(self.dataset, case.user_id, events=events,
                                            candidates=None if full else list(case.candidates), config=cfg)
        m = pred.meta
        return RankOutcome(
            ranking=[(it.item_id, it.score) for it in pred.items],
            valid=not m.degraded or not self.config.use_llm_ranking,
            prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
            model_latency_s=m.model_latency_s,
            responses=rec.calls if rec else [], prompt=rec.first_messages if rec else None,
            extra={"degraded": m.degraded, "degraded_reason": m.degraded_reason,
                   "source_scores": {it.item_id: it.source_scores for it in pred.items},
                   "wall_s": round(time.perf_counter() - t0, 3)},
        )
