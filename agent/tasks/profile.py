"""User profile: interests, price level, style affinity, purchase rhythm and lifecycle stage.

Every attribute is computed in plain code from the user's events (`user_features`); the model
only writes the summary and a few claims, each citing event references, and may claim nothing
about sensitive attributes (gender, age, health, religion, ethnicity): `ProfileAnswer` rejects
such keys and claims with a message the model can act on.

The order/RFM features here are shared with churn (`agent.tasks.churn`).
"""

from __future__ import annotations

import bisect
import re
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from agent.domain.history import HistoryView, build_history, themes, title_words
from agent.domain.predictions import (
    Attribute,
    Evidence,
    Lifecycle,
    PriceBand,
    ProfileAnswer,
    ProfileClaim,
    UserProfile,
    sensitive_hits,  # noqa: F401 (re-exported: the sensitive-attribute rules live with the schemas)
)
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.domain.verify import Facts, TitleIndex
from agent.llm.base import ChatModel, Message
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.tasks.common import ask_or_degrade, evidence_from_refs, make_meta
from agent.tasks.verified import Checked, cited_facts, verify_answer

# Words that describe a style rather than a product type (Online Retail gift-ware titles).
STYLE_WORDS = (
    "vintage", "retro", "regency", "antique", "rustic", "french", "english", "scandinavian",
    "christmas", "floral", "polkadot", "spotty", "heart", "hearts", "love", "pink", "red", "blue",
    "green", "gold", "silver", "glass", "wooden", "paper", "ceramic", "enamel", "metal", "zinc",
)


# ---- features ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """One basket: all purchase lines sharing a basket id (or, without one, an instant)."""

    basket_id: str
    timestamp: datetime
    spend: float  # GBP (currency units): sum of quantity * unit_price over positive lines
    item_ids: tuple[str, ...]


def orders_of(events: Sequence[BehaviorEvent]) -> list[Order]:
    """Group purchase events into orders, oldest first."""
    groups: dict[str, list[BehaviorEvent]] = {}
    for e in events:
        if e.event_type != "purchase":
            continue
        key = e.basket_id or e.timestamp.isoformat()
        groups.setdefault(key, []).append(e)
    out = []
    for key, evs in groups.items():
        spend = sum((e.quantity or 1) * (e.unit_price or 0.0) for e in evs if (e.quantity or 1) > 0)
        out.append(Order(key, min(e.timestamp for e in evs), round(spend, 4),
                         tuple(dict.fromkeys(e.item_id for e in evs))))
    return sorted(out, key=lambda o: (o.timestamp, o.basket_id))


def median_gap_days(orders: Sequence[Order]) -> float | None:
    """Median days between consecutive orders (purchase rhythm); None with fewer than 2."""
    if len(orders) < 2:
        return None
    gaps = [(b.timestamp - a.timestamp).total_seconds() / 86_400 for a, b in zip(orders, orders[1:], strict=False)]
    return round(statistics.median(gaps), 2)


@dataclass
class UserFeatures:
    """Plain features of one user at `as_of` (all from events strictly before it)."""

    as_of: datetime
    n_events: int
    n_orders: int
    recency_days: float | None  # days since the last order
    tenure_days: float | None  # days since the first order
    monetary: float  # total spend, currency units
    avg_order_value: float
    spend_last_90d: float
    spend_prev_90d: float  # 90..180 days before as_of
    monetary_trend: float  # (last - prev) / (last + prev) in [-1, 1]; 0 when both are 0
    orders_last_90d: int
    median_gap_days: float | None
    category_drift: float | None  # 1 - Jaccard(themes of last 90 d, themes before); None if either empty
    lifecycle: Lifecycle
    interests: list[tuple[str, float]] = field(default_factory=list)  # (theme, share of lines)
    style: list[tuple[str, float]] = field(default_factory=list)
    median_unit_price: float | None = None
    price_percentile: float | None = None  # of the user's median unit price among item prices
    price_band: PriceBand | None = None


def lifecycle_stage(n_orders: int, recency: float | None, tenure: float | None, gap: float | None) -> Lifecycle:
    """new: first order < 30 days ago; active: last order within max(30, 2 x rhythm) days
    (at most 90); at-risk: within 180 days; lapsed: longer."""
    if n_orders == 0 or recency is None or tenure is None:
        return "new"
    if tenure < 30:
        return "new"
    if recency <= min(90.0, max(30.0, 2 * (gap or 0))):
        return "active"
    return "at-risk" if recency <= 180 else "lapsed"


def theme_weights(titles: Sequence[str], n: int = 5) -> list[tuple[str, float]]:
    """Top themes with the share of titles (0..1) that contain them."""
    if not titles:
        return []
    top = themes(titles, n)
    words = [set(title_words(t)) for t in titles]  # the words `themes` counted ("t-light" is one)
    return [(w, round(sum(w in ws for ws in words) / len(words), 4)) for w in top]


def style_weights(titles: Sequence[str], n: int = 3) -> list[tuple[str, float]]:
    if not titles:
        return []
    c: Counter[str] = Counter()
    for t in titles:
        c.update(set(re.findall(r"[\w']+", t.lower())) & set(STYLE_WORDS))
    return [(w, round(k / len(titles), 4)) for w, k in c.most_common(n)]


def price_percentile(value: float, catalogue_prices: Sequence[float]) -> float:
    """Share (0..1) of catalogue prices strictly below `value`, ties counted half."""
    s = sorted(catalogue_prices)
    if not s:
        return 0.5
    lo, hi = bisect.bisect_left(s, value), bisect.bisect_right(s, value)
    return round((lo + 0.5 * (hi - lo)) / len(s), 4)


def price_band(pct: float) -> PriceBand:
    return "budget" if pct < 1 / 3 else "mid" if pct < 2 / 3 else "premium"


def _interest_label(item: CatalogItem | None, item_id: str) -> str:
    if item is None:
        return f"item {item_id}"
    return f"category {item.category}" if item.category else item.title


def user_features(events: Sequence[BehaviorEvent], catalog: Mapping[str, CatalogItem],
                  as_of: datetime, *, catalogue_prices: Sequence[float] | None = None) -> UserFeatures:
    """Compute a user's features from events strictly before `as_of`.

    Interests are title words (or category ids where the catalogue has categories, e.g. Taobao),
    weighted by the share of the user's lines that mention them.
    """
    evs = [e for e in events if e.timestamp < as_of]
    orders = orders_of(evs)
    day = 86_400.0
    recency = (as_of - orders[-1].timestamp).total_seconds() / day if orders else None
    tenure = (as_of - orders[0].timestamp).total_seconds() / day if orders else None
    monetary = round(sum(o.spend for o in orders), 2)
    t90, t180 = as_of - timedelta(days=90), as_of - timedelta(days=180)
    last = round(sum(o.spend for o in orders if o.timestamp >= t90), 2)
    prev = round(sum(o.spend for o in orders if t180 <= o.timestamp < t90), 2)
    trend = round((last - prev) / (last + prev), 4) if last + prev > 0 else 0.0
    gap = median_gap_days(orders)
    buys = [e for e in evs if e.event_type == "purchase"] or evs
    labels = [_interest_label(catalog.get(e.item_id), e.item_id) for e in buys]
    recent = [lab for e, lab in zip(buys, labels, strict=True) if e.timestamp >= t90]
    older = [lab for e, lab in zip(buys, labels, strict=True) if e.timestamp < t90]
    drift = None
    if recent and older:
        a, b = set(themes(recent, 10)), set(themes(older, 10))
        drift = round(1 - len(a & b) / len(a | b), 4) if a | b else 0.0
    prices = [e.unit_price for e in buys if e.unit_price is not None]
    med = round(statistics.median(prices), 4) if prices else None
    pct = price_percentile(med, catalogue_prices) if med is not None and catalogue_prices else None
    return UserFeatures(
        as_of=as_of, n_events=len(evs), n_orders=len(orders),
        recency_days=None if recency is None else round(recency, 2),
        tenure_days=None if tenure is None else round(tenure, 2), monetary=monetary,
        avg_order_value=round(monetary / len(orders), 2) if orders else 0.0,
        spend_last_90d=last, spend_prev_90d=prev, monetary_trend=trend,
        orders_last_90d=sum(o.timestamp >= t90 for o in orders), median_gap_days=gap,
        category_drift=drift, lifecycle=lifecycle_stage(len(orders), recency, tenure, gap),
        interests=theme_weights(labels), style=style_weights(labels), median_unit_price=med,
        price_percentile=pct, price_band=price_band(pct) if pct is not None else None,
    )


def catalogue_prices(catalog: Mapping[str, CatalogItem]) -> list[float]:
    return sorted(it.price for it in catalog.values() if it.price is not None)


# ---- the task ------------------------------------------------------------------------------------


def _attr_evidence(hist: HistoryView, word: str, n: int = 2) -> list[Evidence]:
    rx = re.compile(rf"\b{re.escape(word)}\b", re.I)
    refs = [x.ref for x in reversed(hist.lines) if rx.search(x.text)][:n]
    return evidence_from_refs(hist, refs)


def profile_attributes(f: UserFeatures, hist: HistoryView) -> list[Attribute]:
    attrs: list[Attribute] = []
    for w, wt in f.interests:
        attrs.append(Attribute(name="interest", value=w, weight=wt, kind="inferred",
                               evidence=_attr_evidence(hist, w)))
    for w, wt in f.style:
        attrs.append(Attribute(name="style_affinity", value=w, weight=wt, kind="inferred",
                               evidence=_attr_evidence(hist, w)))
    if f.price_band:
        attrs.append(Attribute(name="price_level", value=f"{f.price_band} (median unit price "
                               f"{f.median_unit_price:.2f}, percentile {f.price_percentile:.0%} of catalogue)",
                               weight=f.price_percentile, kind="inferred"))
    if f.median_gap_days is not None:
        attrs.append(Attribute(name="purchase_rhythm", value=f"median {f.median_gap_days:.1f} days "
                               f"between {f.n_orders} orders", kind="observed"))
    attrs.append(Attribute(name="lifecycle_stage", value=f.lifecycle, kind="inferred"))
    return attrs


def feature_lines(f: UserFeatures) -> list[str]:
    """The computed profile, in words, for the prompt."""
    out = [f"orders: {f.n_orders}, total spend {f.monetary:.2f}, average order {f.avg_order_value:.2f}",
           f"lifecycle stage: {f.lifecycle}"]
    if f.recency_days is not None:
        out.append(f"days since last order: {f.recency_days:.0f}")
    if f.median_gap_days is not None:
        out.append(f"median days between orders: {f.median_gap_days:.1f}")
    if f.interests:
        out.append("interests (share of lines): " + ", ".join(f"{w} {v:.0%}" for w, v in f.interests))
    if f.style:
        out.append("style words: " + ", ".join(f"{w} {v:.0%}" for w, v in f.style))
    if f.price_band:
        out.append(f"price level: {f.price_band} (median unit price {f.median_unit_price:.2f})")
    return out


class ProfileService:
    """Builds `UserProfile`s; the model (optional) writes the summary and cited claims."""

    def __init__(self, model: ChatModel | None, *, model_sha256: str | None = None,
                 prompt: str = "user_profile.v1", max_attempts: int = 2, window: int = 20):
        self.model, self.model_sha256, self.prompt = model, model_sha256, prompt
        self.max_attempts, self.window = max_attempts, window

    async def predict(self, user_id: str, events: Sequence[BehaviorEvent], catalog: Mapping[str, CatalogItem],
                      *, as_of: datetime | None = None, dataset: str | None = None,
                      prices: Sequence[float] | None = None) -> UserProfile:
        t0, trace = time.perf_counter(), CallTrace()
        as_of = as_of or ((events[-1].timestamp + timedelta(seconds=1)) if events else datetime.now().astimezone())
        evs = [e for e in events if e.timestamp < as_of]
        known = [e for e in evs if e.item_id in catalog]
        if not known:
            trace.notes.append("cold start: no history with known items; nothing is inferred")
            return UserProfile(user_id=user_id, dataset=dataset, as_of=as_of.isoformat(), lifecycle_stage="new",
                               attributes=[], summary="[cold start] No purchase history with known items: "
                               "no profile can be inferred yet.", summary_source="cold_start",
                               cold_start=True, meta=make_meta("profile", self.model, trace, [], t0, self.model_sha256))
        f = user_features(known, catalog, as_of, catalogue_prices=prices if prices is not None else catalogue_prices(catalog))
        hist = build_history(user_id, known, catalog, window=self.window, as_of=as_of)
        attrs = profile_attributes(f, hist)
        prompts: list[str] = []
        summary = fallback_profile_summary(f)
        source: Literal["model", "fallback", "cold_start"] = "fallback"
        claims: list[ProfileClaim] = []
        tpl = load_prompt(self.prompt)

        messages = render(tpl, features=feature_lines(f), **hist.prompt_vars())
        context = {"refs": set(hist.refs)}

        async def step(model: ChatModel) -> tuple[ProfileAnswer, Checked[ProfileAnswer]]:
            prompts.append(tpl.ref)
            first = await structured_call(model, messages, ProfileAnswer, context=context,
                                          max_attempts=self.max_attempts, max_tokens=400, trace=trace)
            checked = await verify_answer(model, messages, first, lambda a: profile_sentences(a, messages, hist, catalog),
                                          TitleIndex(it.title for it in catalog.values()), trace, context=context,
                                          max_tokens=400)
            return first, checked

        got = await ask_or_degrade(self.model, step, trace, what="profile summary",
                                   fallback="computed profile with a template summary")
        if got is not None:
            ans, checked = got
            if (ok := checked.pick.get("summary")) is not None:
                summary, source = ok.summary, "model"
            for i, c in enumerate(ans.claims):
                use = checked.pick.get(f"claim{i}")
                claim = use.claims[i] if use is not None else c
                ev = evidence_from_refs(hist, claim.evidence)
                claims.append(ProfileClaim(text=claim.text, inferred=claim.inferred, evidence=ev) if use is not None
                              else ProfileClaim(text="[template] " + "; ".join(e.summary for e in ev), inferred=False,
                                                evidence=ev))
        return UserProfile(user_id=user_id, dataset=dataset, as_of=as_of.isoformat(), lifecycle_stage=f.lifecycle,
                           attributes=attrs, summary=summary, summary_source=source, claims=claims,
                           meta=make_meta("profile", self.model, trace, prompts, t0, self.model_sha256))


def profile_sentences(a: ProfileAnswer, messages: list[Message], hist: HistoryView,
                      catalog: Mapping[str, CatalogItem]) -> dict[str, tuple[str, Facts]]:
    """A profile answer's model-written sentences with what each may say (`agent.tasks.verified`):
    the summary (the products of the history window, its refs, the prompt's numbers: the
    features), and each claim (``claim0``...: its cited events' products and refs only)."""
    titles = [catalog[x.event.item_id].title for x in hist.lines if x.event.item_id in catalog]
    out = {"summary": (a.summary, Facts(titles=titles, refs=hist.refs, numbers=[str(m["content"]) for m in messages],
                                        may_rank_first=True, event_titles=titles))}
    for i, c in enumerate(a.claims):
        out[f"claim{i}"] = (c.text, cited_facts(messages, hist, c.evidence, catalog))
    return out


def fallback_profile_summary(f: UserFeatures) -> str:
    return "[template] " + "; ".join(feature_lines(f)) + "."
