"""Labelled (user, item, cut-off) cases for the fine-tuned encoder: click and purchase prediction.

Definitions (the same cut-off, horizon and look-back as ``shoplens eval intent``; features only
from events strictly before the cut-off, labels only from ``[cut-off, cut-off + horizon)``):

* ``purchase``: the candidates are the items the user viewed, clicked, carted or favourited in the
  72 h before the cut-off (exactly `agent.tasks.rows.intent_rows`); label 1 when the user buys
  the item within the horizon. No sampled negatives: the negatives are the touched items not bought.
* ``click``: the same touched items, label 1 when the user views or clicks the item again within
  the horizon; plus, per user, up to ``max_new`` items first viewed within the horizon (label 1),
  each with two sampled negatives the user did not act on before or within the horizon: one from
  the same category, drawn by the category's popularity before the cut-off, and one
  popularity-matched (the same popularity decile before the cut-off, any category). Without
  categories both negatives are popularity-matched.

Users are split by a seeded hash of their id (`user_split`, `user_fold`), so no user's cases are
in two splits. Each case is verbalised by the versioned template ``encoder_case.v1``
(`verbalise`); a trained model's manifest names the template.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Literal

from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.prompting import load_prompt, render
from agent.tasks.intent import Funnel, funnel_features
from agent.tasks.rows import INTENT_LOOKBACK_H, iter_user_events

EncoderTask = Literal["click", "purchase"]
TASKS: tuple[EncoderTask, ...] = ("click", "purchase")
TEMPLATE = "encoder_case.v1"
N_RECENT = 3  # the user's last events shown in a case's text
TOUCH = ("view", "click", "cart", "favourite")
CLICK = ("view", "click")
Split = Literal["train", "val", "test"]


@dataclass
class EncoderCase:
    """One labelled case. `source`: "touched" (a look-back item), "new" (first viewed within the
    horizon), "same_category" or "popularity" (a sampled negative)."""

    user_id: str
    item_id: str
    cutoff: datetime
    label: int
    text: str
    source: str
    funnel: Funnel

    @property
    def case_id(self) -> str:
        """``user|item|cut-off`` (ISO); at the eval's single cut-off, ``user|item`` is its intent case id."""
        return f"{self.user_id}|{self.item_id}|{self.cutoff.isoformat()}"


def _hash01(user_id: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def user_split(user_id: str, seed: int = 0, train: float = 0.7, val: float = 0.15) -> Split:
    """The user's split by a seeded hash: "train" with probability `train`, "val" `val`, else "test"."""
    x = _hash01(user_id, seed)
    return "train" if x < train else "val" if x < train + val else "test"


def user_fold(user_id: str, k: int, seed: int = 0) -> int:
    """The user's cross-fitting fold in ``0..k-1`` (a seeded hash; independent of `user_split`'s seed use)."""
    return int(_hash01(user_id, seed + 7919) * k)


def _ago(hours: float) -> str:
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.0f} d"


def _describe(item_id: str, catalog: Mapping[str, CatalogItem], words: int = 8) -> str:
    """The title's first `words` words; a title that only repeats ids (Taobao's "Taobao item 5120034
    (category 4145813)") is replaced by its category, the one word it carries."""
    it = catalog.get(item_id)
    if it is None:
        return f"item {item_id}"
    if item_id in it.title and it.category:
        return f"cat {it.category}"
    return " ".join(it.title.split()[:words])


def verbalise(before: Sequence[BehaviorEvent], item_id: str, cutoff: datetime, f: Funnel,
              catalog: Mapping[str, CatalogItem]) -> str:
    """The case's text (template ``encoder_case.v1``): the item, its funnel counts, the user's
    totals and the last `N_RECENT` events, each marked "same item" / "same category" or named.

    Args:
        before: the user's events strictly before `cutoff`, oldest first.
        f: `funnel_features(before, item_id, cutoff, catalog)`.
    """
    cat = catalog[item_id].category if item_id in catalog else None
    recent = []
    for e in reversed(before[-N_RECENT:]):
        c = catalog.get(e.item_id)
        what = ("same item" if e.item_id == item_id else
                "same cat" if cat and c is not None and c.category == cat else _describe(e.item_id, catalog, 4))
        recent.append(f"{e.event_type} {what} {_ago((cutoff - e.timestamp).total_seconds() / 3600)}")
    since = _ago(f.hours_since_last) if f.hours_since_last is not None else ""
    msgs = render(load_prompt(TEMPLATE), item=_describe(item_id, catalog), f=asdict(f), since=since,
                  recent=recent or ["none"])
    return msgs[1]["content"]


class _Popularity:
    """Events per item before a cut-off, with deciles and per-category draws."""

    def __init__(self, counts: Counter[str], catalog: Mapping[str, CatalogItem]):
        self.items = sorted(counts, key=lambda i: (counts[i], i))
        self.counts = counts
        self.rank = {it: r for r, it in enumerate(self.items)}
        self.by_cat: dict[str, list[str]] = defaultdict(list)
        for it in self.items:
            c = catalog[it].category if it in catalog else None
            if c:
                self.by_cat[c].append(it)

    def decile_peer(self, item_id: str, rng: random.Random, avoid: set[str]) -> str | None:
        """A random item in `item_id`'s popularity decile (items never seen count as the lowest)."""
        n = len(self.items)
        if not n:
            return None
        r = self.rank.get(item_id, 0)
        lo, hi = (r * 10 // n) * n // 10, min(n, ((r * 10 // n) + 1) * n // 10 + 1)
        pool = self.items[lo:hi]
        for _ in range(20):
            c = rng.choice(pool)
            if c not in avoid:
                return c
        return None

    def category_draw(self, category: str | None, rng: random.Random, avoid: set[str]) -> str | None:
        """An item of `category` drawn with probability proportional to its popularity."""
        pool = self.by_cat.get(category or "", [])
        if not pool:
            return None
        cum, tot = [], 0
        for it in pool:
            tot += self.counts[it]
            cum.append(tot)
        for _ in range(20):
            c = pool[bisect.bisect_right(cum, rng.random() * tot)] if tot else rng.choice(pool)
            if c not in avoid:
                return c
        return None


def build_cases(store: EventStore, dataset: str, task: EncoderTask, cutoffs: Sequence[datetime],
                horizon_h: float, catalog: Mapping[str, CatalogItem], *, seed: int = 0,
                lookback_h: float = INTENT_LOOKBACK_H, max_new: int = 3,
                users: Iterable[str] | None = None, stats: dict[str, int] | None = None) -> list[EncoderCase]:
    """Labelled cases of `task` at each cut-off (see the module docstring for the definitions).

    Args:
        cutoffs: the as-of times; a user contributes cases at every cut-off where they qualify.
        horizon_h: hours after a cut-off in which a purchase (or a click) makes the label 1.
        users: only these users (default: all).
        max_new: click only: new items first viewed within the horizon, per user and cut-off.
        stats: click only, filled in: ``user_cutoffs`` (users with events before a cut-off,
            summed over cut-offs), ``new_first_views`` (every item first viewed within a horizon,
            before the `max_new` cap) and ``catalogue_items``: what the real chance that an
            untouched item is first viewed is estimated from (`untouched_view_rate`).

    Returns:
        Cases ordered by cut-off, then user, then item (touched items first).

    Raises:
        ValueError: an unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {', '.join(TASKS)}")
    keep = set(users) if users is not None else None
    everyone = list(iter_user_events(store, dataset))
    per_user = [(u, evs) for u, evs in everyone if keep is None or u in keep]
    want = ("purchase",) if task == "purchase" else CLICK
    out: list[EncoderCase] = []
    for cut in sorted(cutoffs):
        start, end = cut - timedelta(hours=lookback_h), cut + timedelta(hours=horizon_h)
        pop: _Popularity | None = None
        if task == "click":
            counts: Counter[str] = Counter(e.item_id for _, evs in everyone for e in evs if e.timestamp < cut)
            pop = _Popularity(counts, catalog)
        for uid, evs in per_user:
            before = [e for e in evs if e.timestamp < cut]
            if not before:
                continue
            if stats is not None:
                stats["user_cutoffs"] = stats.get("user_cutoffs", 0) + 1
            during = [e for e in evs if cut <= e.timestamp < end]
            hit = {e.item_id for e in during if e.event_type in want}
            touched = list(dict.fromkeys(e.item_id for e in before if e.timestamp >= start and e.event_type in TOUCH))

            def case(item: str, label: int, source: str, cut: datetime = cut, before: list[BehaviorEvent] = before,
                     uid: str = uid) -> EncoderCase:
                f = funnel_features(before, item, cut, catalog)
                return EncoderCase(uid, item, cut, label, verbalise(before, item, cut, f, catalog), source, f)

            out.extend(case(it, int(it in hit), "touched") for it in touched)
            if task == "click" and pop is not None:
                seen = {e.item_id for e in before} | {e.item_id for e in during}
                rng = random.Random(f"{seed}:{uid}:{cut.isoformat()}")
                new = sorted(i for i in dict.fromkeys(e.item_id for e in during if e.event_type in CLICK)
                             if i not in {e.item_id for e in before})
                if stats is not None:
                    stats["new_first_views"] = stats.get("new_first_views", 0) + len(new)
                for it in rng.sample(new, min(max_new, len(new))):
                    out.append(case(it, 1, "new"))
                    cat = catalog[it].category if it in catalog else None
                    negs = [(pop.category_draw(cat, rng, seen), "same_category"),
                            (pop.decile_peer(it, rng, seen), "popularity")]
                    if negs[0][0] is None:
                        negs[0] = (pop.decile_peer(it, rng, seen), "popularity")
                    for neg, src in negs:
                        if neg is not None:
                            seen.add(neg)
                            out.append(case(neg, 0, src))
    if stats is not None:
        stats["catalogue_items"] = len(catalog)
    return out


def untouched_view_rate(stats: Mapping[str, int]) -> float | None:
    """The chance that a given catalogue item the user did not touch is first viewed within the
    horizon: first views of new items / (user cut-offs x catalogue items), from `build_cases`'
    `stats`. The click cases sample 2 negatives per new item (1 in 3 positive), so the encoder's
    P for an untouched item ranks users and items but is not this chance. None without data."""
    denom = stats.get("user_cutoffs", 0) * stats.get("catalogue_items", 0)
    return stats.get("new_first_views", 0) / denom if denom else None


def subsample(cases: Sequence[EncoderCase], neg_per_pos: float, seed: int = 0) -> tuple[list[EncoderCase], list[float]]:
    """All positives and about `neg_per_pos` negatives per positive (seeded, order kept), with
    each case's weight (1 for positives, 1 / the negatives' sampling rate for negatives), so
    weighted metrics refer to the natural class balance. Nothing is dropped when there are fewer
    negatives than asked for."""
    pos = sum(c.label for c in cases)
    neg = len(cases) - pos
    rate = min(1.0, neg_per_pos * max(pos, 1) / neg) if neg else 1.0
    rng = random.Random(seed)
    keep = [c for c in cases if c.label == 1 or rng.random() < rate]
    return keep, [1.0 if c.label == 1 else 1.0 / rate for c in keep]


def training_cutoffs(last: datetime, n: int, step_h: float = 24.0) -> list[datetime]:
    """`n` cut-offs ending at `last`, `step_h` hours apart (oldest first)."""
    return [last - timedelta(hours=step_h * k) for k in reversed(range(n))]
