"""Protocols over any dataset in the store: held-out next-item cases from a user's own events.

Every function here is pure (events in, cases out) so each rule can be checked by hand.
A user's events are taken oldest first (time, then ingest order), and consecutive repeats of the
same item count as one item, as the served artifacts count them (`agent.data.artifacts`).

* ``leave-one-out``: the user's last item is the target, every event before it the history
  (the protocol of SASRec, Kang & McAuley, ICDM 2018, and of LLMRank, Hou et al., ECIR 2024).
* ``leave-last-basket``: the last purchase basket (its ``basket_id``, else every purchase at the
  last purchase's timestamp) is held out; any of its items is a hit (next-basket evaluation, as
  in Rendle et al., "Factorizing personalized Markov chains for next-basket recommendation",
  WWW 2010). The history is every event strictly before the basket's first event.
* ``temporal``: one global cut-off time; events at or after it are the test period (a global
  time split, the leak-free protocol argued for by Ji et al., "A Critical Study on Data Leakage
  in Recommender System Offline Evaluation", ACM TOIS 2023). The target is the user's first
  item after the cut-off that differs from their last item before it; every user's events before
  the cut-off are the training data.

Cold targets are left out (:func:`warm_only`, counted): a held-out item that no training event
holds would be the only never-counted item among candidates drawn from the catalogue (every
catalogue item of an ingested export has at least one event), so "zero count" alone would
find it; measured on the Taobao sample, that artifact put popularity below random and lifted
learned fusions by tens of NDCG points. Candidates are therefore drawn from the items of the
training events (the training catalogue), which every kept target belongs to.

Candidate sets (:func:`random_candidates`, :func:`full_candidates`) follow LLMRank: the relevant
items plus items the user never interacted with, sampled with a per-user seeded RNG.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from agent.domain.schemas import BehaviorEvent
from eval.protocols import Position, RankingCase, case_rng

StoreProtocol = Literal["leave-one-out", "leave-last-basket", "temporal"]
STORE_PROTOCOLS: tuple[str, ...] = ("leave-one-out", "leave-last-basket", "temporal")
CandidateSet = Literal["random", "retrieved", "full"]
CANDIDATE_SETS: tuple[str, ...] = ("random", "retrieved", "full")
DEFAULT_CUTOFF_QUANTILE = 0.9  # temporal: the last 10% of events (by time) are the test period


@dataclass(frozen=True)
class HeldOut:
    """One user's held-out case.

    Attributes:
        user_id: the dataset's user id.
        history: the user's events before the held-out part, oldest first.
        relevant: held-out item ids, distinct, in event order; the first is the target.
    """

    user_id: str
    history: tuple[BehaviorEvent, ...]
    relevant: tuple[str, ...]

    @property
    def target(self) -> str:
        return self.relevant[0]

    @property
    def history_items(self) -> tuple[str, ...]:
        """The history's item ids, oldest first (repeats kept, as the served pipeline reads them)."""
        return tuple(e.item_id for e in self.history)


@dataclass
class Split:
    """The eligible cases of one protocol and why the other users were left out.

    Attributes:
        protocol: ``leave-one-out``, ``leave-last-basket`` or ``temporal``.
        cases: user id -> held-out case, for every eligible user.
        skipped: reason -> number of users left out for it.
        n_users: users with any event.
        cutoff: ``temporal`` only: the start of the test period (UTC).
    """

    protocol: str
    cases: dict[str, HeldOut]
    skipped: Counter[str] = field(default_factory=Counter)
    n_users: int = 0
    cutoff: datetime | None = None


def collapse(items: Iterable[str]) -> list[str]:
    """Item ids with consecutive repeats of the same item collapsed: ``a a b a -> a b a``."""
    out: list[str] = []
    for i in items:
        if not out or out[-1] != i:
            out.append(i)
    return out


def default_cutoff(events: Iterable[BehaviorEvent], quantile: float = DEFAULT_CUTOFF_QUANTILE) -> datetime:
    """The timestamp below which ``quantile`` of the events lie (the temporal split's default).

    Raises:
        ValueError: no events, or ``quantile`` outside (0, 1).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    stamps = sorted(e.timestamp for e in events)
    if not stamps:
        raise ValueError("no events to split in time")
    return stamps[min(len(stamps) - 1, int(quantile * len(stamps)))]


def split_events(by_user: Mapping[str, Sequence[BehaviorEvent]], protocol: str, *, min_history: int = 1,
                 cutoff: datetime | None = None) -> Split:
    """Held-out cases of ``protocol`` for every user who has enough events.

    Args:
        by_user: user id -> events, oldest first (``EventStore.iter_events`` order).
        protocol: one of :data:`STORE_PROTOCOLS`.
        min_history: distinct items (consecutive repeats collapsed) a history needs; users with
            fewer are skipped and counted in ``Split.skipped``.
        cutoff: ``temporal``: the start of the test period; default :func:`default_cutoff`.

    Raises:
        ValueError: an unknown protocol, or ``min_history`` < 1.
    """
    if protocol not in STORE_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(STORE_PROTOCOLS)}")
    if min_history < 1:
        raise ValueError(f"--min-history must be >= 1, got {min_history}")
    if protocol == "temporal" and cutoff is None:
        cutoff = default_cutoff(e for evs in by_user.values() for e in evs)
    split = Split(protocol, {}, n_users=len(by_user), cutoff=cutoff if protocol == "temporal" else None)
    for uid in sorted(by_user):
        evs = list(by_user[uid])
        if protocol == "leave-one-out":
            case, why = _leave_one_out(uid, evs, min_history)
        elif protocol == "leave-last-basket":
            case, why = _last_basket(uid, evs, min_history)
        else:
            assert cutoff is not None
            case, why = _temporal(uid, evs, min_history, cutoff)
        if case is None:
            split.skipped[why] += 1
        else:
            split.cases[uid] = case
    return split


def _leave_one_out(uid: str, evs: list[BehaviorEvent], min_history: int) -> tuple[HeldOut | None, str]:
    start = len(evs) - 1  # the first event of the last run of the same item
    while start > 0 and evs[start - 1].item_id == evs[-1].item_id:
        start -= 1
    history = evs[:start]
    if len(collapse(e.item_id for e in history)) < min_history:
        return None, f"fewer than {min_history + 1} items (consecutive repeats collapsed)"
    return HeldOut(uid, tuple(history), (evs[-1].item_id,)), ""


def _last_basket(uid: str, evs: list[BehaviorEvent], min_history: int) -> tuple[HeldOut | None, str]:
    purchases = [e for e in evs if e.event_type == "purchase"]
    if not purchases:
        return None, "no purchase"
    last = purchases[-1]
    basket = ([e for e in purchases if e.basket_id == last.basket_id] if last.basket_id
              else [e for e in purchases if e.timestamp == last.timestamp])
    start = min(e.timestamp for e in basket)
    history = [e for e in evs if e.timestamp < start]
    if len(collapse(e.item_id for e in history)) < min_history:
        return None, f"fewer than {min_history} items before the last basket"
    return HeldOut(uid, tuple(history), tuple(dict.fromkeys(e.item_id for e in basket))), ""


def _temporal(uid: str, evs: list[BehaviorEvent], min_history: int,
              cutoff: datetime) -> tuple[HeldOut | None, str]:
    history = [e for e in evs if e.timestamp < cutoff]
    after = [e for e in evs if e.timestamp >= cutoff]
    if not after:
        return None, "no event after the cut-off"
    if len(collapse(e.item_id for e in history)) < min_history:
        return None, f"fewer than {min_history} items before the cut-off"
    last = history[-1].item_id
    target = next((e.item_id for e in after if e.item_id != last), None)
    if target is None:
        return None, "no new item after the cut-off"
    return HeldOut(uid, tuple(history), (target,)), ""


COLD = "target never in the training events (cold item)"


def warm_only(split: Split, by_user: Mapping[str, Sequence[BehaviorEvent]]) -> Split:
    """``split`` without the cases whose held-out items no training event could hold: an item is
    warm for a user when it occurs in an event other than the user's own held-out part (for
    ``temporal``: in an event before the cut-off). A basket keeps its warm items; a case with none
    left is skipped and counted under :data:`COLD`."""
    kept: dict[str, HeldOut] = {}
    skipped = Counter(split.skipped)
    if split.protocol == "temporal":
        assert split.cutoff is not None
        before = {e.item_id for evs in by_user.values() for e in evs if e.timestamp < split.cutoff}
    else:
        total = Counter(e.item_id for evs in by_user.values() for e in evs)
    for uid, case in split.cases.items():
        if split.protocol == "temporal":
            warm = [i for i in case.relevant if i in before]
        else:
            removed = Counter(e.item_id for e in list(by_user[uid])[len(case.history):])
            warm = [i for i in case.relevant if total[i] - removed[i] >= 1]
        if warm:
            kept[uid] = HeldOut(uid, case.history, tuple(warm))
        else:
            skipped[COLD] += 1
    return Split(split.protocol, kept, skipped, split.n_users, split.cutoff)


def training_events(by_user: Mapping[str, Sequence[BehaviorEvent]], held: Mapping[str, HeldOut],
                    protocol: str, cutoff: datetime | None = None) -> dict[str, list[BehaviorEvent]]:
    """The events that popularity, co-visitation, the indexes and the fusion may count.

    ``leave-one-out`` / ``leave-last-basket``: every user's events, except that a user in
    ``held`` keeps only their history (the held-out part and anything after it are removed).
    ``temporal``: every user's events before ``cutoff`` (the test period is removed for all).
    Users left with no event are left out.

    Raises:
        ValueError: ``temporal`` without a cut-off.
    """
    out: dict[str, list[BehaviorEvent]] = {}
    for uid, evs in by_user.items():
        if protocol == "temporal":
            if cutoff is None:
                raise ValueError("the temporal protocol needs its cut-off")
            keep = [e for e in evs if e.timestamp < cutoff]
        elif uid in held:
            keep = list(held[uid].history)
        else:
            keep = list(evs)
        if keep:
            out[uid] = keep
    return out


def sample_users(split: Split, n: int | None, seed: int, *, skip: Iterable[str] = ()) -> list[str]:
    """``n`` eligible users (all when None) in a seeded random order that does not depend on the
    order of the store; ``skip`` are left out (e.g. the evaluated users when picking validation
    users)."""
    left = set(skip)
    users = [u for u in sorted(split.cases) if u not in left]
    random.Random(f"{seed}:users:{split.protocol}").shuffle(users)
    return users if n is None else users[:n]


def _order(uid: str, items: list[str], target: str, seed: int, position: Position) -> tuple[str, ...]:
    """``items`` (target included once) shuffled per user, or with the target first / last."""
    others = [i for i in items if i != target]
    if position == "first":
        return (target, *others)
    if position == "last":
        return (*others, target)
    out = [*others, target]
    case_rng(seed, uid).shuffle(out)
    return tuple(out)


def random_candidates(case: HeldOut, catalogue: Sequence[str], n: int, seed: int,
                      position: Position = "shuffle") -> tuple[RankingCase, list[str]] | None:
    """The relevant items plus random items the user never interacted with, ``n`` in all
    (LLMRank's random candidates; one relevant item per leave-one-out / temporal case, up to
    ``n // 2`` of a basket's).

    Args:
        case: the held-out case.
        catalogue: every item id that may be a negative (the dataset's catalogue), in a stable order.
        n: candidates per case, relevant items included (LLMRank: 20).
        seed: each user's sample depends only on (seed, user id).
        position: ``shuffle`` (published protocol), ``first`` or ``last`` (the target's place).

    Returns:
        The ranking case and its relevant ids (the relevant items shown), or None when the
        catalogue holds fewer than ``n`` items the user never interacted with.
    """
    positives = list(case.relevant[: max(1, n // 2)])
    excluded = set(case.history_items) | set(case.relevant)
    need = n - len(positives)
    rng = case_rng(seed, f"neg:{case.user_id}")
    negatives: list[str] = []
    picked: set[str] = set()
    for _ in range(20 * need):  # rejection sampling: the catalogue is usually far larger than n
        if len(negatives) == need:
            break
        item = catalogue[rng.randrange(len(catalogue))]
        if item not in excluded and item not in picked:
            picked.add(item)
            negatives.append(item)
    if len(negatives) < need:  # a small catalogue: draw from what is left
        pool = [i for i in catalogue if i not in excluded and i not in picked]
        if len(pool) < need - len(negatives):
            return None
        negatives += rng.sample(pool, need - len(negatives))
    items = _order(case.user_id, [*negatives, *positives], case.target, seed, position)
    return RankingCase(case.user_id, case.history_items, items, case.target, seed=seed, position=position,
                       source="random"), positives


def full_candidates(case: HeldOut, catalogue: Sequence[str], seed: int, *,
                    repurchase: bool = False) -> tuple[RankingCase, bool]:
    """The whole catalogue as the candidate set (history items left out unless ``repurchase``).

    Returns:
        The case and whether a relevant item is among the candidates. When none is (the only
        relevant items are history items and repurchase is off) the case's ``target`` is a
        placeholder and the case counts as a miss.
    """
    seen = set() if repurchase else set(case.history_items)
    items = tuple(i for i in catalogue if i not in seen)
    known = set(items)
    reachable = [i for i in case.relevant if i in known]
    target = reachable[0] if reachable else items[0]
    return RankingCase(case.user_id, case.history_items, items, target, seed=seed, source="full"), bool(reachable)


def retrieved_candidates(case: HeldOut, top: Sequence[str], seed: int,
                         position: Position = "shuffle") -> tuple[RankingCase, bool]:
    """The served candidate generator's own top N as the candidate set, shuffled per user (so no
    ranker reads the generator's order from the list).

    Returns:
        The case and whether a relevant item was retrieved; when none was, the case's ``target``
        is a placeholder and the case counts as a miss (the generator's ceiling).

    Raises:
        ValueError: the generator returned nothing.
    """
    if not top:
        raise ValueError(f"user {case.user_id}: the candidate generator returned no item")
    shown = set(top)
    hit = [i for i in case.relevant if i in shown]
    target = hit[0] if hit else top[0]
    items = _order(case.user_id, list(top), target, seed, position if hit else "shuffle")
    return RankingCase(case.user_id, case.history_items, items, target, seed=seed, position=position,
                       source="retrieved"), bool(hit)
