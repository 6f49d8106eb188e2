"""Typed tools for the merchandiser chat: each wraps one ShopLens service function.

A tool is one `ToolSpec`: a name, a one-line description (what the router shows the model),
a pydantic args model, and an async `run(ctx, args)` returning a pydantic result. Tools exchange
typed data, never free text; the chat renders the results and the answer prompt quotes them.

Caller mistakes (unknown customer or item, a missing id) come back as a typed `NotFound` or
`NeedInfo` result with suggestions, never as an exception. Task tools wrap
`agent.app.tasks_service.TasksService`; `item_sentiment` (an item's review polarity, trend and
complaints, `agent.tasks.opinion`) and `churn_segment` (a month's buyers ranked by the churn
baseline) are pure code over the store, no model call.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import UnknownUserError
from agent.domain.predictions import NextItemPrediction
from agent.llm.prompting import load_prompt, render
from agent.tasks.next_item import NextItemConfig

ToolName = Literal[
    "next_item", "user_timeline", "item_lookup", "item_search",
    "intent", "churn", "churn_segment", "profile", "item_sentiment", "audience",
]
# Older names a routing answer may still use (the chat_route.v1 guide says "-> sentiment").
TOOL_ALIASES: dict[str, ToolName] = {"sentiment": "item_sentiment"}

# ---- args --------------------------------------------------------------------------------


class CustomerArgs(BaseModel):
    customer_id: str | None = Field(default=None, description="the customer's id in the dataset")


class NextItemArgs(CustomerArgs):
    k: int = Field(default=5, ge=1, le=10, description="how many items")


class ItemArgs(BaseModel):
    item_id: str | None = Field(default=None, description="a catalogue item id, e.g. 85123A")
    item_query: str | None = Field(default=None, max_length=120,
                                   description="product title words when no id is given")


class SearchArgs(BaseModel):
    query: str = Field(min_length=1, max_length=120, description="product words to search for")
    k: int = Field(default=8, ge=1, le=20)


class IntentArgs(CustomerArgs):
    item_id: str | None = Field(default=None, description="the product the intent is about")
    item_query: str | None = Field(default=None, max_length=120)


class ChurnArgs(CustomerArgs):
    month: int | None = Field(default=None, ge=1, le=12,
                              description="only customers who bought in this calendar month")


class SegmentArgs(BaseModel):
    month: int | None = Field(default=None, ge=1, le=12,
                              description="customers with a purchase in this calendar month (its latest "
                                          "occurrence in the data); default: the data's last month")
    n: int = Field(default=10, ge=1, le=50, description="how many customers")


# ---- results -----------------------------------------------------------------------------


class NotFound(BaseModel):
    """An unknown customer or item, with ids or titles that do exist."""

    kind: Literal["not_found"] = "not_found"
    entity: Literal["customer", "item"]
    query: str
    dataset: str
    suggestions: list[str] = Field(default_factory=list, description="existing ids, 'id: title' for items")

    @property
    def message(self) -> str:
        what = "customer" if self.entity == "customer" else "item"
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        return f"no {what} {self.query} in {self.dataset}{hint}"


class NeedInfo(BaseModel):
    """The question lacks an argument the tool needs (e.g. which customer)."""

    kind: Literal["need_info"] = "need_info"
    missing: str
    message: str


class Unavailable(BaseModel):
    """The task's module is not installed in this build yet, or it failed at runtime."""

    kind: Literal["unavailable"] = "unavailable"
    tool: str
    message: str


class TimelineEvent(BaseModel):
    timestamp: str = Field(description="ISO-8601, UTC")
    event_type: str
    item_id: str
    title: str
    quantity: int | None = None
    unit_price: float | None = None
    rating: float | None = None
    review_text: str | None = None
    event_id: str


class Timeline(BaseModel):
    kind: Literal["timeline"] = "timeline"
    dataset: str
    customer_id: str
    n_events: int = Field(ge=0)
    first: str | None = None
    last: str | None = None
    by_type: dict[str, int]
    top_items: list[tuple[str, str, int]] = Field(description="(item_id, title, events)")
    events: list[TimelineEvent] = Field(description="the most recent events, oldest first")


class NextItems(BaseModel):
    kind: Literal["next_item"] = "next_item"
    prediction: NextItemPrediction


class ItemInfo(BaseModel):
    item_id: str
    title: str
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    score: float | None = Field(default=None, description="search similarity, cosine")


class ItemDetails(BaseModel):
    kind: Literal["item"] = "item"
    dataset: str
    item: ItemInfo
    n_customers: int = Field(ge=0, description="customers with at least one event on the item")


class SearchHits(BaseModel):
    kind: Literal["search"] = "search"
    dataset: str
    query: str
    hits: list[ItemInfo]


class TaskResult(BaseModel):
    """A task module's own pydantic answer, carried as its JSON dump."""

    kind: Literal["task"] = "task"
    tool: str
    data: dict[str, Any]


class Complaint(BaseModel):
    event_id: str = Field(description="the review event")
    timestamp: str
    rating: float | None = None
    excerpt: str = Field(description="cleaned, instruction-filtered, PII-masked, <= 160 chars")


class ItemSentiment(BaseModel):
    kind: Literal["item_sentiment"] = "item_sentiment"
    dataset: str
    item_id: str
    title: str
    n_reviews: int = Field(ge=0)
    counts: dict[str, int] = Field(description="reviews by polarity: negative, neutral, positive")
    from_text: int = Field(ge=0, description="reviews without stars, labelled by the lexicon")
    window_days: int
    trend: list[dict[str, Any]] = Field(description="windows oldest first: start, end, n, negative, "
                                                    "neutral, positive, share_negative")
    turned: Literal["worse", "better"] | None = None
    trend_note: str = ""
    complaints: list[Complaint] = Field(description="negative reviews, lowest stars then newest first")
    evidence: list[str] = Field(description="review event ids the answer rests on")


class AtRiskCustomer(BaseModel):
    customer_id: str
    probability: float = Field(ge=0, le=1, description="churn baseline P(no purchase in 90 days)")
    risk_band: Literal["low", "medium", "high"]
    recency_days: float | None
    n_orders: int
    orders_last_90d: int
    monetary: float
    drivers: list[str] = Field(description="recency and frequency, as the churn task words them")
    last_purchase_event: str
    last_purchase_at: str


class ChurnSegment(BaseModel):
    kind: Literal["churn_segment"] = "churn_segment"
    dataset: str
    month: int = Field(ge=1, le=12)
    year: int
    as_of: str = Field(description="the end of the month; features use purchases before it")
    n_buyers: int = Field(ge=0, description="customers with a purchase in the month")
    baseline: str = Field(description="what the churn baseline was trained on")
    customers: list[AtRiskCustomer] = Field(description="riskiest first")


ToolResult = (NotFound | NeedInfo | Unavailable | Timeline | NextItems | ItemDetails | SearchHits
              | TaskResult | ItemSentiment | ChurnSegment)


# ---- context and registry ----------------------------------------------------------------


@dataclass
class ToolContext:
    runtime: Runtime
    service: ShopLensService
    dataset: str
    next_item_config: NextItemConfig | None = None


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
    base = ctx.next_item_config or NextItemConfig()
    cfg = NextItemConfig(**{**base.__dict__, "k": args.k})
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


def _tasks(ctx: ToolContext) -> Any:
    """The task service (intent, churn, profile, audience) over the same runtime, or None."""
    try:
        from agent.app.tasks_service import TasksService
    except ImportError:
        return None
    return TasksService(ctx.runtime, use_model=ctx.service.use_model)


def _task(name: str, data: BaseModel) -> TaskResult:
    return TaskResult(tool=name, data=data.model_dump(mode="json", exclude={"meta"}))


def _missing(name: str, what: str) -> Unavailable:
    return Unavailable(tool=name, message=f"the {name} task {what} is not part of this build yet")


async def profile(ctx: ToolContext, args: CustomerArgs) -> ToolResult:
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    svc = _tasks(ctx)
    return _missing("profile", "service") if svc is None else _task("profile", await svc.profile(ctx.dataset, uid))


async def churn(ctx: ToolContext, args: ChurnArgs) -> ToolResult:
    """One customer's churn risk as of the dataset's end; no customer: the cohort list."""
    if args.customer_id is None:
        return await churn_segment(ctx, SegmentArgs(month=args.month))
    uid = _customer_or_result(ctx, args.customer_id)
    if not isinstance(uid, str):
        return uid
    svc = _tasks(ctx)
    if svc is None:
        return _missing("churn", "service")
    from agent.app.tasks_service import robust_end

    return _task("churn", await svc.churn(ctx.dataset, uid, as_of=robust_end(ctx.runtime.store, ctx.dataset)))


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
    svc = _tasks(ctx)
    return _missing("intent", "service") if svc is None else _task("intent", await svc.intent(ctx.dataset, uid, item))


async def audience(ctx: ToolContext, args: ItemArgs) -> ToolResult:
    svc = _tasks(ctx)
    if svc is None:
        return _missing("audience", "service")
    if args.item_id or args.item_query:
        item = resolve_item(ctx, args.item_id, args.item_query)
        if isinstance(item, str):
            return _task("audience", await svc.audience(ctx.dataset, item_id=item, n=20))
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
    """(year, start, end-exclusive) of the latest `month` starting on or before `end`."""
    year = end.year if datetime(end.year, month, 1, tzinfo=UTC) <= end else end.year - 1
    nxt = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return year, datetime(year, month, 1, tzinfo=UTC), nxt


async def churn_segment(ctx: ToolContext, args: SegmentArgs) -> ToolResult:
    """Customers who bought in a month, riskiest first by the churn baseline as of the month's end."""
    from agent.app.tasks_service import robust_end
    from agent.tasks.churn import churn_drivers, driver_lines, risk_band

    svc = _tasks(ctx)
    if svc is None:
        return _missing("churn_segment", "service")
    end = robust_end(ctx.runtime.store, ctx.dataset)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    year, start, as_of = _month_window(args.month or end.month, end)
    bl, n_buyers, top = svc.churn_segment(ctx.dataset, start, as_of, n=args.n)
    rows = []
    for uid, f, p, last in top:
        drivers = [d for d in churn_drivers(f) if d.name in ("recency", "frequency")]
        rows.append(AtRiskCustomer(
            customer_id=uid, probability=round(p, 4), risk_band=risk_band(p), recency_days=f.recency_days,
            n_orders=f.n_orders, orders_last_90d=f.orders_last_90d, monetary=f.monetary,
            drivers=driver_lines(drivers), last_purchase_event=last.event_id,
            last_purchase_at=last.timestamp.isoformat()))
    return ChurnSegment(dataset=ctx.dataset, month=start.month, year=year, as_of=as_of.isoformat(),
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


# ---- how a result reads: facts for the answer prompt, and the no-model answer -----------


def result_facts(result: ToolResult) -> str:
    """The result as short fact lines for the answer prompt (every line traceable in the UI)."""
    if isinstance(result, NextItems):
        p = result.prediction
        lines = [f"Customer {p.user_id}: top {len(p.items)} predicted next items"
                 + (" (cold start: little history)" if p.cold_start else "")]
        for it in p.items:
            cites = "; ".join(f"{e.ref} {e.timestamp[:10]} {e.summary}" for e in it.evidence[:2])
            lines.append(f"{it.rank}. {it.title} [{it.item_id}] score {it.score:.2f}: {it.reason}"
                         + (f" (events: {cites})" if cites else ""))
        lines.append(f"Summary of the customer: {p.intent_summary}")
        return "\n".join(lines)
    if isinstance(result, Timeline):
        lines = [f"Customer {result.customer_id}: {result.n_events} events from "
                 f"{(result.first or '')[:10]} to {(result.last or '')[:10]}; by type {result.by_type}",
                 "Most frequent items: " + "; ".join(f"{t} [{i}] x{n}" for i, t, n in result.top_items),
                 "Latest events:"]
        lines += [f"- {e.timestamp[:10]} {e.event_type} {e.title} [{e.item_id}]"
                  + (f" qty {e.quantity}" if e.quantity else "") for e in result.events[-8:]]
        return "\n".join(lines)
    if isinstance(result, ItemDetails):
        it = result.item
        return (f"Item {it.item_id}: {it.title}" + (f", price {it.price:.2f}" if it.price else "")
                + f"; {result.n_customers} customers in {result.dataset} have events on it")
    if isinstance(result, SearchHits):
        return f"Search '{result.query}' in {result.dataset}:\n" + "\n".join(
            f"- {h.title} [{h.item_id}]" + (f" price {h.price:.2f}" if h.price else "")
            for h in result.hits)
    if isinstance(result, TaskResult):
        return json.dumps(result.data, ensure_ascii=False)[:3000]
    if isinstance(result, ItemSentiment):
        c = result.counts
        lines = [f"Item {result.item_id} ({result.title}): {result.n_reviews} reviews in {result.dataset}: "
                 f"{c['negative']} negative, {c['neutral']} neutral, {c['positive']} positive"
                 f" ({result.from_text} labelled from text, the rest from stars)"]
        if result.trend:
            lines.append(f"Trend, {result.window_days}-day windows, oldest first: " + "; ".join(
                f"{w['start'][:10]}..{w['end'][:10]}: {w['n']} reviews, {100 * w['share_negative']:.0f}% negative"
                for w in result.trend) + (f" (turned {result.turned}: {result.trend_note})" if result.turned else ""))
        lines.append("Complaints (negative reviews):" if result.complaints else "No negative reviews with text.")
        lines += [f"- [{x.event_id}] {x.timestamp[:10]}" + (f" {x.rating:g} stars" if x.rating else "")
                  + f": {x.excerpt}" for x in result.complaints]
        return "\n".join(lines)
    if isinstance(result, ChurnSegment):
        lines = [f"{result.n_buyers} customers bought in {result.year}-{result.month:02d} in {result.dataset}; "
                 f"churn risk as of {result.as_of[:10]} by the churn baseline ({result.baseline}), riskiest first:"]
        lines += [f"- customer {x.customer_id}: P(churn) {x.probability:.2f} ({x.risk_band}); "
                  + "; ".join(x.drivers) + f"; last purchase [{x.last_purchase_event}] {x.last_purchase_at[:10]}"
                  for x in result.customers]
        return "\n".join(lines)
    return result.message


def fallback_answer(result: ToolResult, lang: Literal["zh", "en"]) -> str:
    """A template answer from the result alone (model down, or nothing to explain)."""
    zh = lang == "zh"
    if isinstance(result, NotFound):
        what = ("客户" if result.entity == "customer" else "商品") if zh else result.entity
        hint = (f"；您是不是要找 {'、'.join(result.suggestions)}？" if zh else
                f"; did you mean {', '.join(result.suggestions)}?") if result.suggestions else ""
        return (f"{result.dataset} 中没有{what} {result.query}{hint}" if zh else
                f"There is no {what} {result.query} in {result.dataset}{hint}")
    if isinstance(result, NeedInfo | Unavailable):
        return result.message
    if isinstance(result, NextItems):
        p = result.prediction
        head = (f"客户 {p.user_id} 接下来最可能购买：" if zh else
                f"Customer {p.user_id} is most likely to buy next:")
        rows = [f"{it.rank}. {it.title} ({it.item_id}) — {it.reason}" for it in p.items]
        return "\n".join([head, *rows])
    if isinstance(result, Timeline):
        top = ", ".join(t for _, t, _ in result.top_items[:3])
        return (f"客户 {result.customer_id} 共有 {result.n_events} 条记录"
                f"（{(result.first or '')[:10]} 至 {(result.last or '')[:10]}），最常购买：{top}。" if zh else
                f"Customer {result.customer_id} has {result.n_events} events from "
                f"{(result.first or '')[:10]} to {(result.last or '')[:10]}; most frequent: {top}.")
    if isinstance(result, ItemSentiment):
        c, n = result.counts, result.n_reviews
        if not n:
            return (f"{result.title}（{result.item_id}）在 {result.dataset} 中还没有评价。" if zh else
                    f"{result.title} ({result.item_id}) has no reviews in {result.dataset}.")
        head = (f"{result.title}（{result.item_id}）共 {n} 条评价：差评 {c['negative']}、中评 {c['neutral']}、"
                f"好评 {c['positive']}。" if zh else
                f"{result.title} ({result.item_id}) has {n} reviews: {c['negative']} negative, "
                f"{c['neutral']} neutral, {c['positive']} positive.")
        if result.turned:
            head += (f" 近期口碑变{'差' if result.turned == 'worse' else '好'}（{result.trend_note}）。" if zh else
                     f" Recently it turned {result.turned} ({result.trend_note}).")
        rows = [f"- {x.excerpt} [{x.event_id}]" for x in result.complaints[:3]]
        return "\n".join([head, ("主要抱怨：" if zh else "Main complaints:") if rows else "", *rows]).strip()
    if isinstance(result, ChurnSegment):
        head = (f"{result.year}年{result.month}月有购买的 {result.n_buyers} 位客户中，流失风险最高的是"
                f"（截至 {result.as_of[:10]}）：" if zh else
                f"Of the {result.n_buyers} customers who bought in {result.year}-{result.month:02d}, the most at "
                f"risk of churning (as of {result.as_of[:10]}) are:")
        rows = [f"{i}. {x.customer_id}: {x.probability:.0%} ({x.risk_band}); {'; '.join(x.drivers)}"
                for i, x in enumerate(result.customers, 1)]
        return "\n".join([head, *rows])
    if isinstance(result, SearchHits):
        names = "; ".join(f"{h.title} ({h.item_id})" for h in result.hits[:5])
        return (f"与“{result.query}”相关的商品：{names}" if zh else
                f"Products matching '{result.query}': {names}")
    return result_facts(result)


def answer_messages(question: str, lang: Literal["zh", "en"], tool: str, result: ToolResult
                    ) -> list[dict[str, str]]:
    """The rendered ``chat_answer.v1`` prompt for one tool result."""
    return render(load_prompt("chat_answer.v1"), question=question, tool=tool,
                  facts=result_facts(result),
                  language_name="Chinese (简体中文)" if lang == "zh" else "English")
