"""Clean and summarise a behaviour sequence into what a prompt shows (pure, deterministic).

Events get stable references (E1 = oldest shown event) that the model cites as evidence;
`HistoryView.resolve` maps a reference back to the real event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.domain.text import cut_at_word

_VERB = {
    "view": "viewed",
    "click": "clicked",
    "cart": "added to cart",
    "remove_from_cart": "removed from cart",
    "favourite": "favourited",
    "purchase": "bought",
    "review": "reviewed",
}

# Event types that mean the user has the item: a review is written by an owner (the Amazon
# review datasets are purchase logs with text). Next-item retrieval excludes these items unless
# repurchase is asked for; viewed, carted or favourited items stay candidates.
OWNED_EVENT_TYPES = frozenset({"purchase", "review"})


def event_verb(event_type: str) -> str:
    """The past-tense verb of an event type ("view" -> "viewed"); an unknown type as given."""
    return _VERB.get(event_type, event_type)


_STOP = {
    "of", "and", "the", "a", "set", "with", "in", "for", "to", "design", "small", "large",
    "mini", "pack", "box", "assorted", "colour", "new", "vintage", "&", "-", "+",
}


def relative_time(ts: datetime, as_of: datetime) -> str:
    """'same day', '3 days before', '2 weeks before', '5 months before' (coarse on purpose:
    small models read words better than timestamps)."""
    days = (as_of - ts).total_seconds() / 86_400
    if days < 1:
        return "same day"
    if days < 14:
        return f"{int(days)} day{'s' if int(days) != 1 else ''} before"
    if days < 60:
        return f"{int(days // 7)} weeks before"
    if days < 730:
        return f"{int(days // 30)} months before"
    return f"{int(days // 365)} years before"


@dataclass(frozen=True)
class EventLine:
    ref: str
    when: str
    text: str
    event: BehaviorEvent


@dataclass
class HistoryView:
    """What the prompt shows of one user.

    Attributes:
        lines: the most recent events (window), oldest first, with refs E1..En.
        profile: user-level facts for the prompt header (counts, span, themes).
    """

    user_id: str
    lines: list[EventLine]
    profile: dict[str, object]
    seen_items: set[str] = field(default_factory=set)
    purchased_items: set[str] = field(default_factory=set)  # OWNED_EVENT_TYPES: bought or reviewed

    def resolve(self, ref: str) -> EventLine | None:
        for line in self.lines:
            if line.ref == ref:
                return line
        return None

    @property
    def refs(self) -> list[str]:
        return [line.ref for line in self.lines]

    def prompt_vars(self) -> dict[str, object]:
        return {
            "user": {"user_id": self.user_id, **self.profile},
            "events": [{"ref": x.ref, "when": x.when, "text": x.text} for x in self.lines],
        }


def describe_event(e: BehaviorEvent, title: str) -> str:
    """One event in words: verb, quantity, title, price, basket, rating, review excerpt."""
    parts = [_VERB[e.event_type]]
    if e.quantity and e.quantity > 1:
        parts.append(f"{e.quantity} ×")
    parts.append(title)
    if e.unit_price is not None:
        parts.append(f"at {e.unit_price:.2f} each")
    text = " ".join(parts)
    if e.basket_id:
        text += f" (order {e.basket_id})"
    if e.rating is not None:
        text += f", rated {e.rating:g}/5"
    if e.review_text:
        excerpt = cut_at_word(" ".join(e.review_text.split()), 160)
        text += f': "{excerpt}"'
    return text


def title_words(title: str) -> list[str]:
    """The distinct words of a title as `themes` counts them: split on spaces, outer punctuation
    stripped, lower-cased, first-seen order ("T-LIGHT" stays one word: ``t-light``)."""
    # dict, not set: ties in most_common keep first-seen order, stable across processes
    # (set order of str depends on PYTHONHASHSEED and made prompts non-deterministic).
    return list(dict.fromkeys(w.strip(",.()'\"").lower() for w in title.split()))


def themes(titles: Sequence[str], n: int = 5) -> list[str]:
    """Most frequent content words across titles (a cheap, explainable interest summary)."""
    c: Counter[str] = Counter()
    for t in titles:
        c.update(w for w in title_words(t) if len(w) > 2 and w not in _STOP and not w.isdigit())
    return [w for w, _ in c.most_common(n)]


def build_history(
    user_id: str,
    events: Sequence[BehaviorEvent],
    catalog: Mapping[str, CatalogItem],
    *,
    window: int = 20,
    as_of: datetime | None = None,
) -> HistoryView:
    """Summarise a user's events (oldest first) into a `HistoryView`.

    Args:
        events: the user's events, oldest first (the store and loaders return them so).
        catalog: item id -> item, for titles; unknown items show as "item <id>".
        window: how many most recent events the prompt shows.
        as_of: the reference time for relative times (default: the last event's time).
    """
    if not events:
        return HistoryView(user_id, [], {"n_events": 0, "n_baskets": 0, "span": "no history",
                                         "top_themes": [], "as_of_label": "now"})
    ref_time = as_of or events[-1].timestamp
    shown = list(events)[-window:]

    def title(item_id: str) -> str:
        it = catalog.get(item_id)
        return it.title if it else f"item {item_id}"

    lines = [
        EventLine(f"E{i + 1}", relative_time(e.timestamp, ref_time), describe_event(e, title(e.item_id)), e)
        for i, e in enumerate(shown)
    ]
    baskets = {e.basket_id for e in events if e.basket_id}
    first, last = events[0].timestamp, events[-1].timestamp
    span_days = (last - first).days
    profile = {
        "n_events": len(events),
        "n_baskets": len(baskets),
        "span": f"from {first:%Y-%m-%d} to {last:%Y-%m-%d} ({span_days} day{'s' if span_days != 1 else ''})",
        "top_themes": themes([title(e.item_id) for e in events]),
        "as_of_label": "the last event" if as_of is None else f"{as_of:%Y-%m-%d}",
    }
    return HistoryView(
        user_id=user_id,
        lines=lines,
        profile=profile,
        seen_items={e.item_id for e in events},
        purchased_items={e.item_id for e in events if e.event_type in OWNED_EVENT_TYPES},
    )
