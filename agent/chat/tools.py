"""Typed tools for the merchandiser chat: each wraps one ShopLens service function.

A tool is one `ToolSpec`: a name, a one-line description (what the router shows the model),
a pydantic args model, and an async `run(ctx, args)` returning a pydantic result (the args and
results, and how each result reads, are in `agent/chat/results.py`).

Caller mistakes (unknown customer or item, a missing id) come back as a typed `NotFound` or
`NeedInfo` result with suggestions, never as an exception. Task tools wrap
the service facade (`agent.app.service.ShopLensService`); `item_sentiment` (an item's review polarity, trend and
complaints, `agent.tasks.opinion`) and `churn_segment` (a month's buyers ranked by the churn
baseline) are pure code over the store, no model call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.chat.results import (
    AtRiskCustomer,
    ChurnArgs,
    ChurnSegment,
    Complaint,
    CustomerArgs,
    IntentArgs,
    ItemArgs,
    ItemDetails,
    ItemInfo,
    ItemSentiment,
    NeedInfo,
    NextItemArgs,
    NextItems,
    NotFound,
    SearchArgs,
    SearchHits,
    SegmentArgs,
    TaskResult,
    Timeline,
    TimelineEvent,
    ToolName,
    ToolResult,
)
from agent.domain.errors import UnknownUserError
from agent.tasks.next_item import NextItemConfig
from agent.tasks.rows import robust_end

# ---- context and registry ----------------------------------------------------------------


@dataclass
class ToolContext:
    runtime: Runtime
    service: ShopLensService
    dataset: str
    next_item_config: NextItemConfig | None = None


def interactive_config(service: ShopLensService, k: int = 5) -> NextItemConfig:
    """The chat's next-item configuration: the served one (the API's) with retrieval fusion
    ranking and template reasons (seconds, not minutes on 2 CPU cores); the model routes the
    question and writes the answer from the cited events, each sentence verified
    (`agent.chat.checked`)."""
    return replace(service.next_item_config(k=k), use_llm_ranking=False, explain=False)


@dataclass(frozen=True)
class ToolSpec:
    name: ToolName
    description: str
    args: type[BaseModel]
    run: Callable[[ToolContext, Any], Awaitable[ToolResult]]
    needs: Literal["customer", "item", "query", "none"]


def _customer_or_result(ctx: ToolContext, customer_id: str | None) -> str | ToolResult:
    if not customer_id:
        return NeedInfo(missing="customer_id", message="which customer? give a customer id, e.g. 17850")
    if ctx.runtime.store.has_user(ctx.dataset, customer_id):
        return customer_id
    return NotFound(entity="customer", query=customer_id, dataset=ctx.dataset,
                    suggestions=ctx.runtime.store.similar_user_ids(ctx.dataset, customer_id))


def resolve_item(ctx: ToolContext, item_id: str | None, item_query: str | None) -> str | ToolResult:
    """An existing item id from an id (case-insensitive) or a title; else NotFound/NeedInfo."""
    catalog = ctx.runtime.artifacts(ctx.dataset).catalog
    if item_id:
        for cand in (item_id, item_id.upper()):
            if cand in catalog:
                return cand
        prefix = [i for i in catalog if i.upper().startswith(item_id.upper()[:4])][:3]
        return NotFound(entity="item", query=item_id, dataset=ctx.dataset,
                        suggestions=[f"{i}: {catalog[i].title}" for i in prefix])
    if item_query:
        q = " ".join(item_query.upper().split())
        exact = [i for i, it in catalog.items() if " ".join(it.title.upper().split()) == q]
        if exact:
            return exact[0]
        hits = search_items(ctx, item_query, 3)
        if hits and hits[0].score is not None and hits[0].score >= 0.75:
            return hits[0].item_id
        return NotFound(entity="item", query=item_query, dataset=ctx.dataset,
                        suggestions=[f"{h.item_id}: {h.title}" for h in hits])
    return NeedInfo(missing="item_id", message="which product? give an item id or its title")


def search_items(ctx: ToolContext, query: str, k: int) -> list[ItemInfo]:
    """Semantic search over the dataset's FAISS item index with the runtime's embedder."""
    arts = ctx.runtime.artifacts(ctx.dataset)
    vec = ctx.runtime.embedder.embed([query])
    out = []
    for item_id, score in arts.item_index.search(vec, k)[0]:
        it = arts.catalog.get(item_id)
        if it is not None:
            out.append(ItemInfo(item_id=item_id, title=it.title, category=it.category,
                                brand=it.brand, price=it.price, score=round(score, 4)))
    return out


async def user_timeline(ctx: ToolContext, args: CustomerArgs, max_events: int = 200) -> ToolResult:
    """The customer's events (most recent `max_events`), counts by type and top items."""
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    try:
        events = ctx.runtime.store.user_events(ctx.dataset, uid)
    except UnknownUserError as e:
        return NotFound(entity="customer", query=uid, dataset=ctx.dataset, suggestions=e.suggestions)
    catalog = ctx.runtime.artifacts(ctx.dataset).catalog

    def title(i: str) -> str:
        return catalog[i].title if i in catalog else f"item {i}"

    top = Counter(e.item_id for e in events).most_common(5)
    return Timeline(
        dataset=ctx.dataset, customer_id=uid, n_events=len(events),
        first=events[0].timestamp.isoformat() if events else None,
        last=events[-1].timestamp.isoformat() if events else None,
        by_type=dict(Counter(e.event_type for e in events)),
        top_items=[(i, title(i), n) for i, n in top],
        events=[TimelineEvent(timestamp=e.timestamp.isoformat(), event_type=e.event_type,
                              item_id=e.item_id, title=title(e.item_id), quantity=e.quantity,
                              unit_price=e.unit_price, rating=e.rating,
                              review_text=(e.review_text or None) and e.review_text[:500],
                              event_id=e.event_id)
                for e in events[-max_events:]],
    )


async def next_item(ctx: ToolContext, args: NextItemArgs) -> ToolResult:
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    base = ctx.next_item_config or ctx.service.next_item_config()  # the API's, from Settings
    cfg = replace(base, k=args.k)
    try:
        pred = await ctx.service.next_item(ctx.dataset, uid, config=cfg)
    except UnknownUserError as e:
        return NotFound(entity="customer", query=uid, dataset=ctx.dataset, suggestions=e.suggestions)
    return NextItems(prediction=pred)


async def item_lookup(ctx: ToolContext, args: ItemArgs) -> ToolResult:
    item = resolve_item(ctx, args.item_id, args.item_query)
    if not isinstance(item, str):
        return item
    it = ctx.runtime.artifacts(ctx.dataset).catalog[item]
    buyers = sum(item in items for items in ctx.runtime.artifacts(ctx.dataset).user_items.values())
    return ItemDetails(
        dataset=ctx.dataset, n_customers=buyers,
        item=ItemInfo(item_id=item, title=it.title, category=it.category, brand=it.brand, price=it.price),
    )


async def item_search(ctx: ToolContext, args: SearchArgs) -> ToolResult:
    return SearchHits(dataset=ctx.dataset, query=args.query, hits=search_items(ctx, args.query, args.k))


def _task(name: str, data: BaseModel, ctx: ToolContext | None = None, item_id: str | None = None) -> TaskResult:
    title = ctx.runtime.artifacts(ctx.dataset).catalog[item_id].title if ctx is not None and item_id else None
    return TaskResult(tool=name, data=data.model_dump(mode="json", exclude={"meta"}), title=title)


async def profile(ctx: ToolContext, args: CustomerArgs) -> ToolResult:
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    return _task("profile", await ctx.service.profile(ctx.dataset, uid))


async def churn(ctx: ToolContext, args: ChurnArgs) -> ToolResult:
    """One customer's churn risk as of the dataset's end; no customer but a month: the cohort
    list (`churn_segment`); neither: which customer? ("his churn risk" with no one known)."""
    if args.customer_id is None and args.month is not None:
        return await churn_segment(ctx, SegmentArgs(month=args.month))
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    return _task("churn", await ctx.service.churn(ctx.dataset, uid, as_of=robust_end(ctx.runtime.store, ctx.dataset)))


async def intent(ctx: ToolContext, args: IntentArgs) -> ToolResult:
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    if not args.item_id and not args.item_query:
        return NeedInfo(missing="item_id", message="purchase intent is asked per product: which item? "
                                                   "(e.g. 'will 17850 buy 85123A soon?')")
    item = resolve_item(ctx, args.item_id, args.item_query)
    if not isinstance(item, str):
        return item
    return _task("intent", await ctx.service.intent(ctx.dataset, uid, item), ctx, item)


async def audience(ctx: ToolContext, args: ItemArgs) -> ToolResult:
    svc = ctx.service
    if args.item_id or args.item_query:
        item = resolve_item(ctx, args.item_id, args.item_query)
        if isinstance(item, str):
            return _task("audience", await svc.audience(ctx.dataset, item_id=item, n=20), ctx, item)
        if args.item_query:  # no such title: target the words as a campaign text
            return _task("audience", await svc.audience(ctx.dataset, campaign_text=args.item_query, n=20))
        return item
    return NeedInfo(missing="item_id", message="which product should the audience be for?")


def _excerpt(text: str, n: int = 160) -> str:
    from agent.domain.pii import mask_pii
    from agent.tasks.sentiment import prepare_text

    t = mask_pii(prepare_text(text, 2000)[0]).replace("\n", " ")
    return t if len(t) <= n else t[: n - 1].rsplit(" ", 1)[0] + "…"


def _reviewed_suggestions(ctx: ToolContext, query: str, reviews: list[Any]) -> list[str]:
    """Items with reviews sharing the longest prefix with `query` (then the most reviewed)."""
    catalog = ctx.runtime.artifacts(ctx.dataset).catalog
    n = Counter(e.item_id for e in reviews)

    def shared(i: str) -> int:
        return next((k for k in range(min(len(i), len(query)), 0, -1) if i[:k].upper() == query[:k].upper()), 0)

    best = sorted(n, key=lambda i: (-shared(i), -n[i], i))[:3]
    return [f"{i}: {catalog[i].title}" if i in catalog else i for i in best]


async def item_sentiment(ctx: ToolContext, args: ItemArgs, *, window_days: int = 90,
                         n_complaints: int = 5) -> ToolResult:
    """An item's reviews by polarity (stars; the lexicon when a review has none), the trend over
    the last 4 windows (`agent.tasks.opinion`) and the top complaints, citing review event ids."""
    from agent.tasks.opinion import review_polarity, trends_from_events

    reviews = list(ctx.runtime.store.iter_events(ctx.dataset, event_types=("review",)))
    item = resolve_item(ctx, args.item_id, args.item_query)
    if isinstance(item, NotFound) and reviews and args.item_id:
        item.suggestions = _reviewed_suggestions(ctx, args.item_id, reviews)
    if not isinstance(item, str):
        return item
    revs = sorted((e for e in reviews if e.item_id == item), key=lambda e: e.timestamp)
    counts = {"negative": 0, "neutral": 0, "positive": 0}
    negative, from_text = [], 0
    for e in revs:
        lab = review_polarity(e)
        if lab is None:
            continue
        counts[lab[0]] += 1
        from_text += lab[1] == "text"
        if lab[0] == "negative" and e.review_text and e.review_text.strip():
            negative.append(e)
    negative.sort(key=lambda e: (e.rating if e.rating is not None else 2.0, -e.timestamp.timestamp()))
    complaints = [Complaint(event_id=e.event_id, timestamp=e.timestamp.isoformat(), rating=e.rating,
                            excerpt=_excerpt(e.review_text or "")) for e in negative[:n_complaints]]
    trends = trends_from_events(revs, by="item", window_days=window_days, min_count=3)
    t = trends[0] if trends else None
    recent = [e.event_id for e in reversed(revs) if e.event_id not in {c.event_id for c in complaints}]
    return ItemSentiment(
        dataset=ctx.dataset, item_id=item, title=ctx.runtime.artifacts(ctx.dataset).catalog[item].title,
        n_reviews=sum(counts.values()), counts=counts, from_text=from_text, window_days=window_days,
        trend=t.as_dict()["windows"] if t else [], turned=t.turned if t else None,
        trend_note=t.reason if t else "", complaints=complaints,
        evidence=[c.event_id for c in complaints] + recent[: max(0, 10 - len(complaints))],
    )


def _month_window(month: int, end: datetime) -> tuple[int, datetime, datetime]:
    """(year, start, end-exclusive) of the latest `month` starting on or before `end`; a month
    the data ends in ends with the data (just after `end`), not at the month's last day."""
    year = end.year if datetime(end.year, month, 1, tzinfo=UTC) <= end else end.year - 1
    nxt = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return year, datetime(year, month, 1, tzinfo=UTC), min(nxt, end + timedelta(seconds=1))


async def churn_segment(ctx: ToolContext, args: SegmentArgs) -> ToolResult:
    """Customers who bought in a month (or the data's last `args.days` days), riskiest first by the churn baseline as of the month's end;
    each with the baseline's own drivers against the month's median buyer (`baseline_drivers`)."""
    from agent.tasks.churn import baseline_drivers, driver_lines, rfm_vector, risk_band

    svc = ctx.service
    end = robust_end(ctx.runtime.store, ctx.dataset)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    if args.days is not None:
        as_of = end + timedelta(seconds=1)  # the last event is inside the window
        start, year = as_of - timedelta(days=args.days), end.year
    else:
        year, start, as_of = _month_window(args.month or end.month, end)
    bl, n_buyers, top, median = svc.churn_segment(ctx.dataset, start, as_of, n=args.n)
    rows = []
    for uid, f, p, last in top:
        drivers = [d for d in baseline_drivers(bl, rfm_vector(f), median) if d.effect != "neutral"]
        rows.append(AtRiskCustomer(
            customer_id=uid, probability=round(p, 4), risk_band=risk_band(p), recency_days=f.recency_days,
            n_orders=f.n_orders, orders_last_90d=f.orders_last_90d, monetary=f.monetary,
            drivers=driver_lines(drivers), last_purchase_event=last.event_id,
            last_purchase_at=last.timestamp.isoformat()))
    return ChurnSegment(dataset=ctx.dataset, month=start.month if args.days is None else end.month, year=year,
                        days=args.days, start=start.isoformat(), as_of=as_of.isoformat(),
                        n_buyers=n_buyers, baseline=bl.trained_on, customers=rows)


# The one place tools are declared. Descriptions are what the routing prompt shows the model.
TOOLS: dict[str, ToolSpec] = {
    t.name: t
    for t in [
        ToolSpec("next_item", "predict which products a customer will buy next, and why",
                 NextItemArgs, next_item, "customer"),
        ToolSpec("user_timeline", "list a customer's past events (purchase history, orders, dates)",
                 CustomerArgs, user_timeline, "customer"),
        ToolSpec("item_lookup", "details of one product given its item id (title, price, buyers)",
                 ItemArgs, item_lookup, "item"),
        ToolSpec("item_search", "find products in the catalogue matching words or a description",
                 SearchArgs, item_search, "query"),
        ToolSpec("intent", "a customer's current purchase intent: what they are shopping for now",
                 IntentArgs, intent, "customer"),
        ToolSpec("churn", "one customer's churn risk: is this customer likely to stop buying, and why",
                 ChurnArgs, churn, "customer"),
        ToolSpec("churn_segment", "which customers (e.g. who bought in a month) are most at risk of churning",
                 SegmentArgs, churn_segment, "none"),
        ToolSpec("profile", "describe a customer's shopping style and preferences (a profile)",
                 CustomerArgs, profile, "customer"),
        ToolSpec("item_sentiment", "what customers feel about a product: review sentiment, trend and complaints",
                 ItemArgs, item_sentiment, "item"),
        ToolSpec("audience", "which customers to target for a product (audience / segment)",
                 ItemArgs, audience, "item"),
    ]
}


async def run_tool(ctx: ToolContext, name: str, args: BaseModel) -> ToolResult:
    """Run a registered tool with validated args.

    Raises:
        KeyError: unknown tool name (a programming error: the router only emits known names).
    """
    spec = TOOLS[name]
    return await spec.run(ctx, spec.args.model_validate(args.model_dump()))
