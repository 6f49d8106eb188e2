"""The suite of a generic protocol on any stored dataset (``--protocol leave-one-out |
leave-last-basket | temporal``, ``--candidates random | retrieved | full``).

``build_store_suite(config)`` reads the dataset's events from the store of the run's workspace,
holds out one case per eligible user (`eval.store_protocols`), and builds everything the rankers
need from the training events only (no held-out event is ever counted):

* the served pipeline's own store and indexes (`eval.pipeline.store_runtime`), with its fusion
  weights fitted as ``shoplens train`` fits them (unless ``untrained``);
* the served candidate generator's top N for every case (`DatasetArtifacts.generator`, the code
  `NextItemService.predict` retrieves with): the ``retrieved`` candidate set, and each case's
  ``candidate_hit`` (is a held-out item in it?) whatever the candidate set, so every report
  carries the generator's recall@N, the ceiling any reranker of its candidates works under;
* the eval-side sources (popularity, co-visitation, BM25 over titles, the served item
  embeddings) and their fusion, fitted on validation users whose held-out items are also kept
  out of every count.

Evaluated users are a seeded sample of the eligible users (`store_protocols.sample_users`);
validation users are drawn from the rest.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.domain.history import OWNED_EVENT_TYPES
from agent.domain.schemas import BehaviorEvent, parse_timestamp
from eval.protocols import RankingCase
from eval.store_protocols import (
    COLD,
    HeldOut,
    collapse,
    full_candidates,
    random_candidates,
    retrieved_candidates,
    sample_users,
    split_events,
    training_events,
    warm_only,
)

if TYPE_CHECKING:
    from agent.app.runtime import Runtime
    from eval.runner import RunConfig
    from eval.suites import Suite

log = logging.getLogger(__name__)

VALIDATION_USERS = 500  # at most; for the eval-side fusion weights only
MIN_VALIDATION = 20  # fewer: the eval-side fusion keeps equal weights (said in config.json)


@dataclass
class StoreData:
    """A stored dataset's events by user and its catalogue, read once."""

    by_user: dict[str, list[BehaviorEvent]]
    catalog: dict[str, Any]
    n_events: int = 0
    event_types: Counter[str] = field(default_factory=Counter)


def read_store(runtime: Runtime, dataset: str) -> StoreData:
    """Every event of ``dataset`` by user (oldest first) and its catalogue.

    Raises:
        ValueError: the dataset has no events (the message says how to load one).
    """
    by_user: dict[str, list[BehaviorEvent]] = {}
    types: Counter[str] = Counter()
    n = 0
    for e in runtime.store.iter_events(dataset):
        by_user.setdefault(e.user_id, []).append(e)
        types[e.event_type] += 1
        n += 1
    if not n:
        raise ValueError(f"--dataset {dataset}: no events in the store at {runtime.settings.workspace}; "
                         f"load them with `shoplens ingest --events FILE --name {dataset}`")
    return StoreData(by_user, runtime.store.items(dataset), n, types)


def parse_cutoff(value: str | None) -> datetime | None:
    """``--cutoff`` as an aware UTC datetime (ISO-8601 or unix seconds), or None.

    Raises:
        ValueError: naming the flag and the forms it accepts.
    """
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as e:
        raise ValueError(f"--cutoff {value!r}: {e} (e.g. --cutoff 2017-12-02T00:00:00Z)") from e


def served_top(runtime: Runtime, dataset: str, history: Sequence[BehaviorEvent], user_id: str, n: int,
               *, repurchase: bool = False) -> list[str]:
    """The served candidate generator's top ``n`` for one history: the same call, weights and
    exclusions as `NextItemService.predict` without a candidate list (purchases in the history are
    excluded unless ``repurchase``; reviews count as purchases: `OWNED_EVENT_TYPES`)."""
    arts = runtime.artifacts(dataset)
    exclude = set() if repurchase else {e.item_id for e in history if e.event_type in OWNED_EVENT_TYPES}
    return [c.item_id for c in arts.generator().generate([e.item_id for e in history], n=n, user_id=user_id,
                                                         exclude=exclude)]


def build_store_suite(config: RunConfig) -> Suite:
    """Cases and fitted sources of a generic protocol on ``config.dataset`` (see module doc).

    Raises:
        ValueError: no events, too few eligible users, a bad ``--cutoff`` or candidate count.
    """
    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService
    from agent.settings import load_settings
    from eval.pipeline import store_runtime
    from eval.suites import Suite, _workspace

    n = config.n_candidates
    if n < 2:
        raise ValueError(f"--n-candidates must be >= 2, got {n}")
    source_rt = Runtime(load_settings(workspace=config.workspace, data_dir=config.data_dir))
    data = read_store(source_rt, config.dataset)
    source_rt.store.close()
    split = warm_only(split_events(data.by_user, config.protocol, min_history=config.min_history,
                                   cutoff=parse_cutoff(config.cutoff)), data.by_user)
    if not split.cases:
        raise ValueError(f"--dataset {config.dataset} --protocol {config.protocol}: no user qualifies "
                         f"({dict(split.skipped)})" + ("; try --min-history 1" if config.min_history > 1 else "")
                         + ("; try an earlier --cutoff" if config.protocol == "temporal" else ""))
    users = sample_users(split, config.users, config.seed)
    val_users = ([] if config.protocol == "temporal" else
                 sample_users(split, VALIDATION_USERS, config.seed + 1, skip=users))
    held = {u: split.cases[u] for u in [*users, *val_users]}
    train = training_events(data.by_user, held, config.protocol, split.cutoff)
    catalog = data.catalog or {}
    # the training catalogue: negatives and the full candidate set come from it (see warm_only)
    catalogue = sorted({e.item_id for evs in train.values() for e in evs} & set(catalog))
    known = set(catalogue)
    for u in held:  # a target held out by other sampled users only is cold now
        split.cases[u] = HeldOut(u, held[u].history, tuple(i for i in held[u].relevant if i in known))
    for group in (users, val_users):
        group[:] = [u for u in group if split.cases[u].relevant]
    cold_now = len(held) - len(users) - len(val_users)
    if config.candidates == "random" and len(catalogue) < n:
        raise ValueError(f"--n-candidates {n}: the training events of {config.dataset} hold {len(catalogue)} "
                         "items")

    embedder = config.extra.get("embedder")
    rt = store_runtime(_workspace(config), config.dataset, train, catalog, embedder=embedder)
    arts = rt.artifacts(config.dataset)
    fusion = "default source weights (untrained)"
    if config.untrained:
        arts.fusion_weights, arts.fusion_note = None, ""
    elif arts.fusion_weights is None:
        try:
            ShopLensService(rt, use_model=False).train(config.dataset, users=config.extra.get("train_users", 2000),
                                                       seed=config.seed)
        except ValueError as e:  # too little data to fit: the served defaults
            fusion = f"default source weights (untrained: {e})"
    fusion = arts.fusion_note or fusion

    cases: list[tuple[RankingCase, list[str], bool]] = []
    extra: list[dict[str, Any]] = []
    skipped_small = 0
    for u in users:
        h = split.cases[u]
        top = served_top(rt, config.dataset, h.history, u, n, repurchase=config.repurchase)
        got = _case(h, top, catalogue, config)
        if got is None:
            skipped_small += 1
            continue
        cases.append(got)
        extra.append({"candidate_hit": bool(set(h.relevant) & set(top)), "candidate_k": n,
                      "target_in_history": h.target in set(h.history_items),
                      "n_history": len(h.history)})
    if not cases:
        raise ValueError(f"--n-candidates {n}: no evaluated user has {n} catalogue items they never touched")

    train_seqs = {u: collapse(e.item_id for e in evs) for u, evs in train.items()}
    titles = {i: it.title for i, it in catalog.items()}
    vecs = {i: v for i in arts.item_index.ids if (v := arts.item_index.vector(i)) is not None}
    ids = list(vecs)
    vectors = np.stack(list(vecs.values())) if ids else np.zeros((0, 1), np.float32)
    scorers, fused, fusion_info, validation = _eval_sources(train_seqs, titles, (ids, vectors), val_users, split,
                                                            catalogue, config)
    n_repeat = sum(x["target_in_history"] for x in extra)
    notes: dict[str, Any] = {
        "protocol": config.protocol, "candidates": config.candidates, "n_candidates": n,
        "events": data.n_events, "event_types": dict(data.event_types), "users_with_events": split.n_users,
        "eligible_users": len(split.cases), "skipped_users": dict(split.skipped),
        "evaluated_users": len(cases), "sampled": f"{len(users)} of {len(split.cases)} eligible users, seed "
        f"{config.seed}" + (f"; {skipped_small} left out: fewer than {n} untouched items" if skipped_small else ""),
        "min_history": config.min_history,
        "cold_targets": f"{split.skipped.get(COLD, 0)} eligible users skipped: their held-out item is in no "
                        f"training event (candidates come from the {len(catalogue)} items of the training "
                        f"events, of {len(catalog)} in the catalogue)"
                        + (f"; {cold_now} more sampled users dropped: their target was another sampled "
                           "user's held-out item only" if cold_now else ""),
        "counts": "popularity, co-visitation, indexes and fusion on the training events only: "
                  + ("every event before the cut-off" if config.protocol == "temporal" else
                     "all events minus each evaluated and validation user's held-out part"),
        "training_events": sum(len(v) for v in train.values()), "training_users": len(train),
        "targets_in_history": f"{n_repeat} of {len(cases)} targets are items the user touched before",
        "candidate_generator": f"the served generator's top {n} (history purchases excluded"
                               f"{'' if not config.repurchase else ' unless repurchase'}), {fusion}",
        "pipeline_store": str(rt.settings.workspace), "fusion": fusion,
        "eval_fusion": fusion_info, "validation_users": len(validation),
    }
    if split.cutoff is not None:
        notes["cutoff"] = split.cutoff.isoformat()
    return Suite(cases, f"{config.protocol}/{config.candidates}", titles, scorers, fused, notes, validation,
                 demo_pool={u: s for u, s in train_seqs.items() if u not in held}, embeddings=(ids, vectors),
                 train_by_user=train_seqs, runtime=rt,
                 histories={u: split.cases[u].history for u in users}, case_extra=extra)


def _case(h: HeldOut, top: list[str], catalogue: list[str],
          config: RunConfig) -> tuple[RankingCase, list[str], bool] | None:
    """One case under ``config.candidates``: (case, relevant ids, a relevant item is a candidate)."""
    position: Any = config.position
    if config.candidates == "random":
        got = random_candidates(h, catalogue, config.n_candidates, config.seed, position)
        return None if got is None else (got[0], got[1], True)
    if config.candidates == "retrieved":
        case, hit = retrieved_candidates(h, top, config.seed, position)
        return case, list(h.relevant), hit
    case, reachable = full_candidates(h, catalogue, config.seed, repurchase=config.repurchase)
    return case, list(h.relevant), reachable


def _eval_sources(train_seqs: dict[str, list[str]], titles: dict[str, str], embeddings: tuple[list[str], Any],
                  val_users: list[str], split: Any, catalogue: list[str],
                  config: RunConfig) -> tuple[dict[str, Any], Any, dict[str, Any], list[RankingCase]]:
    """The eval-side sources on the training sequences, and their fusion fitted on validation
    users' random-candidate cases (equal weights when there are too few of them)."""
    from eval.baselines import FusedRanker
    from eval.run_llmrank_baselines import FUSED_SOURCES, build_scorers, fit_fused

    ids, vectors = embeddings
    scorers = build_scorers(list(train_seqs.values()), titles, embeddings if len(ids) else None)
    validation = []
    for u in val_users:
        h = split.cases[u]  # one positive per validation case: the fusion fits a single target
        got = random_candidates(HeldOut(u, h.history, (h.target,)), catalogue, config.n_candidates,
                                config.seed, "shuffle")
        if got is not None:
            validation.append(got[0])
    if len(validation) < MIN_VALIDATION:
        names = [s for s in FUSED_SOURCES if s in scorers]
        fused = FusedRanker([scorers[s] for s in names], [1.0] * len(names), seed=config.seed)
        return scorers, fused, {"weights": f"equal: only {len(validation)} validation users"}, validation
    fused, info = fit_fused(scorers, validation)
    fused.seed = config.seed
    return scorers, fused, {**info, "fitted_on": f"{len(validation)} validation users' leave-out cases "
                                                 f"with {config.n_candidates - 1} random negatives"}, validation
