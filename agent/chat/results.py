"""What the chat's tools take and return, and how a result reads.

Args and results are pydantic models: tools exchange typed data, never free text. Each result
knows its facts (`result_facts`: short lines for the answer prompt, every line traceable in the
UI) and its no-model answer (`fallback_answer`, English and Chinese templates). The tools
themselves (`agent/chat/tools.py`) wrap the service facade.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from agent.domain.predictions import NextItemPrediction
from agent.llm.prompting import load_prompt, render

ToolName = Literal[
    "next_item", "user_timeline", "item_lookup", "item_search",
    "intent", "churn", "churn_segment", "profile", "item_sentiment", "audience",
]
# Older names a routing answer may still use (the chat_route.v1 guide says "-> sentiment").
TOOL_ALIASES: dict[str, ToolName] = {"sentiment": "item_sentiment"}

ANSWER_PROMPT = "chat_answer.v2"  # the chat's answer prompt (prompts/); v1 kept for comparison
# next-item answers: the ranking from the template (`ranking_head`), the why from the model
RATIONALE_PROMPT = "chat_rationale.v1"

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
    days: int | None = Field(default=None, ge=1, le=366,
                             description="instead of a month: customers with a purchase in the data's last "
                                         "`days` days (\"last 30 days\", \"最近30天\")")
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
    title: str | None = Field(default=None, description="the product's title when the answer is about one")


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
    drivers: list[str] = Field(description="the churn baseline's drivers against the month's median buyer, "
                                                 "as `agent.tasks.churn.baseline_drivers` words them (neutral ones left out)")
    last_purchase_event: str
    last_purchase_at: str


class ChurnSegment(BaseModel):
    kind: Literal["churn_segment"] = "churn_segment"
    dataset: str
    month: int = Field(ge=1, le=12, description="the window's calendar month (a days window: its last day's)")
    year: int
    days: int | None = Field(default=None, description="a window of the data's last `days` days, not a month")
    start: str | None = Field(default=None, description="the window's first moment (ISO-8601)")
    as_of: str = Field(description="the window's end; features use purchases before it")
    n_buyers: int = Field(ge=0, description="customers with a purchase in the window")
    baseline: str = Field(description="what the churn baseline was trained on")
    customers: list[AtRiskCustomer] = Field(description="riskiest first")


ToolResult = (NotFound | NeedInfo | Unavailable | Timeline | NextItems | ItemDetails | SearchHits
              | TaskResult | ItemSentiment | ChurnSegment)


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
        info = result.item
        return (f"Item {info.item_id}: {info.title}" + (f", price {info.price:.2f}" if info.price else "")
                + f"; {result.n_customers} customers in {result.dataset} have events on it")
    if isinstance(result, SearchHits):
        return f"Search '{result.query}' in {result.dataset}:\n" + "\n".join(
            f"- {h.title} [{h.item_id}]" + (f" price {h.price:.2f}" if h.price else "")
            for h in result.hits)
    if isinstance(result, TaskResult):
        return "\n".join(task_lines(result, "en", max_rows=20))
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
        lines = [f"{result.n_buyers} customers bought in {window_words(result, 'en')} in {result.dataset}; "
                 f"churn risk as of {result.as_of[:10]} by the churn baseline ({result.baseline}), riskiest first:"]
        lines += [f"- customer {x.customer_id}: P(churn) {x.probability:.2f} ({x.risk_band}); "
                  + "; ".join(x.drivers) + f"; last purchase [{x.last_purchase_event}] {x.last_purchase_at[:10]}"
                  for x in result.customers]
        return "\n".join(lines)
    return result.message


def _pct(p: Any) -> str:
    return f"{100 * float(p):.0f}%"


_BAND_ZH = {"low": "低", "medium": "中", "high": "高"}
_STAGE_ZH = {"new": "新客户", "active": "活跃", "at-risk": "有流失风险", "lapsed": "已流失"}
_ACTIONS = {  # the churn task's closed action set, in words
    "no_action_needed": ("no action needed", "无需行动"), "loyalty_reward": ("a loyalty reward", "忠诚度奖励"),
    "new_arrivals_in_interests": ("new arrivals in their interests", "推送其感兴趣的新品"),
    "reminder_of_past_favourites": ("a reminder of past favourites", "提醒其以往喜爱的商品"),
    "win_back_offer": ("a win-back offer", "挽回优惠")}


def task_lines(result: TaskResult, lang: Literal["zh", "en"], *, max_rows: int = 10) -> list[str]:
    """A task answer as lines a merchandiser reads (the template answer) and the model's facts:
    an audience's customers by name (id), score and reason; a profile's stage, summary and
    attributes; a churn answer's probability, band, drivers with their direction and action;
    an intent answer's probability and stage. Numbers are the answer's, rounded as written.
    Another tool's answer: its JSON (at most 3000 characters)."""
    d, zh = result.data, lang == "zh"
    if result.tool == "audience":
        what = (f"{result.title} ({d.get('item_id')})" if result.title else
                f"item {d['item_id']}" if d.get("item_id") else f"'{d.get('campaign_text')}'")
        users = d.get("users", [])
        head = (f"{what} 的目标客户（共 {len(users)} 位，按得分排序）：" if zh else
                f"Customers to target for {what} ({len(users)}, best first):")
        rows = [(f"{u['rank']}. 客户 {u['user_id']}（得分 {u['score']:.2f}）：{u['reason']}" if zh else
                 f"{u['rank']}. customer {u['user_id']} (score {u['score']:.2f}): {u['reason']}")
                for u in users[:max_rows]]
        more = len(users) - len(rows)
        tail = ([f"……另有 {more} 位见表格。" if zh else f"... and {more} more in the table."] if more > 0 else [])
        return [head, *rows, *tail] if users else [
            f"{what} 暂无合适的目标客户。" if zh else f"No customers to target for {what}."]
    if result.tool == "profile":
        stage = d.get("lifecycle_stage", "")
        head = (f"客户 {d.get('user_id')}（{_STAGE_ZH.get(stage, stage)}）：{d.get('summary', '')}" if zh else
                f"Customer {d.get('user_id')} ({d.get('lifecycle_stage')}): {d.get('summary', '')}")
        return [head, *(f"- {a['name']}: {a['value']} ({a['kind']})" for a in d.get("attributes", [])[:max_rows])]
    if result.tool == "churn":
        band, action = d.get("risk_band", ""), _ACTIONS.get(d.get("action", ""), (d.get("action"),) * 2)
        head = (f"客户 {d.get('user_id')} 在 {d.get('horizon_days')} 天内不再购买的概率为 {_pct(d['probability'])}"
                f"（{_BAND_ZH.get(band, band)}风险，截至 {str(d.get('as_of', ''))[:10]}）；建议：{action[1]}。" if zh else
                f"Customer {d.get('user_id')}: P(no purchase within {d.get('horizon_days')} days) "
                f"{_pct(d['probability'])} ({band} risk, as of {str(d.get('as_of', ''))[:10]}); "
                f"suggested action: {action[0]}.")
        drivers = [f"- {x['name']}: {x['detail']} ({x['effect'].replace('_', ' ')})" for x in d.get("drivers", [])]
        return [head, ("主要因素：" if zh else "Drivers:"), *drivers, f"{'理由' if zh else 'Reason'}: {d.get('reason', '')}"]
    if result.tool == "intent":
        hours = d.get("horizon_hours")
        in_hours = (f"{hours:g} 小时" if zh else f"{hours:g} hours") if hours else ("该时段" if zh else "the horizon")
        horizon = d.get("horizon") or in_hours
        item = f" / {result.title} ({d['item_id']})" if result.title and d.get("item_id") else (
            f" / item {d['item_id']}" if d.get("item_id") else "")
        stage = d.get("stage")
        head = (f"客户 {d.get('user_id')}{item}：在 {horizon} 内购买的概率为 {_pct(d['probability'])}"
                + (f"（阶段：{stage}）" if stage else "") + "。" if zh else
                f"Customer {d.get('user_id')}{item}: P(purchase within {horizon}) {_pct(d['probability'])}"
                + (f" (stage: {stage})" if stage else "") + ".")
        return [head, f"{'理由' if zh else 'Reason'}: {d.get('reason', '')}"]
    return [json.dumps(d, ensure_ascii=False)[:3000]]


def window_words(seg: ChurnSegment, lang: Literal["zh", "en"]) -> str:
    """The segment's purchase window in words: "2011-10" / "2011年10月", or for a days window
    "the last 30 days (2011-11-09 to 2011-12-09)" / "最近30天（2011-11-09至2011-12-09）"."""
    if seg.days is None:
        return f"{seg.year}年{seg.month}月" if lang == "zh" else f"{seg.year}-{seg.month:02d}"
    span = f"{(seg.start or '')[:10]}", f"{seg.as_of[:10]}"
    return (f"最近{seg.days}天（{span[0]}至{span[1]}）" if lang == "zh" else
            f"the last {'day' if seg.days == 1 else f'{seg.days} days'} ({span[0]} to {span[1]})")


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
    if isinstance(result, ChurnSegment) and not result.customers:
        return (f"{window_words(result, 'zh')}没有客户购买（截至 {result.as_of[:10]}），无法列出流失风险。" if zh else
                f"No customer bought in {window_words(result, 'en')} (as of {result.as_of[:10]}), so no one is "
                "listed at risk.")
    if isinstance(result, ChurnSegment):
        head = (f"{window_words(result, 'zh')}有购买的 {result.n_buyers} 位客户中，流失风险最高的是"
                f"（截至 {result.as_of[:10]}）：" if zh else
                f"Of the {result.n_buyers} customers who bought in {window_words(result, 'en')}, the most at "
                f"risk of churning (as of {result.as_of[:10]}) are:")
        rows = [f"{i}. {x.customer_id}: {x.probability:.0%} ({_BAND_ZH[x.risk_band] if zh else x.risk_band})"
                + (f"; {'; '.join(x.drivers)}" if x.drivers else "") for i, x in enumerate(result.customers, 1)]
        return "\n".join([head, *rows])
    if isinstance(result, ItemDetails):
        info = result.item
        price = f"，价格 {info.price:.2f}" if zh and info.price else f", price {info.price:.2f}" if info.price else ""
        return (f"商品 {info.item_id}：{info.title}{price}；{result.dataset} 中有 {result.n_customers} 位客户与它有过互动。"
                if zh else f"Item {info.item_id}: {info.title}{price}; {result.n_customers} customers in "
                f"{result.dataset} have events on it.")
    if isinstance(result, TaskResult):  # labelled as a whole by the caller: no label inside
        return "\n".join(task_lines(result, lang)).replace("[template] ", "")
    if isinstance(result, SearchHits) and not result.hits:
        return f"没有与“{result.query}”相关的商品。" if zh else f"No products match '{result.query}'."
    if isinstance(result, SearchHits):
        names = "; ".join(f"{h.title} ({h.item_id})" for h in result.hits[:5])
        return (f"与“{result.query}”相关的商品：{names}" if zh else
                f"Products matching '{result.query}': {names}")
    return result_facts(result)


def ranking_head(result: NextItems, lang: Literal["zh", "en"], n: int = 3) -> str:
    """The first sentence of a next-item answer, from the template: the top `n` items in their
    order ("Customer 17850 is most likely to buy A, then B and C." / "客户 17850 接下来最可能购买
    A，其次是 B 和 C。"); the model continues it with the why (`RATIONALE_PROMPT`)."""
    p = result.prediction
    titles = [it.title for it in p.items[:n]]
    if not titles:
        return ""
    rest = titles[1:]
    if lang == "zh":
        tail = f"，其次是 {' 和 '.join(rest)}" if rest else ""
        return f"客户 {p.user_id} 接下来最可能购买 {titles[0]}{tail}。"
    tail = ", then " + (f"{', '.join(rest[:-1])} and {rest[-1]}" if len(rest) > 1 else rest[0]) if rest else ""
    return f"Customer {p.user_id} is most likely to buy {titles[0]}{tail}."


def answer_messages(question: str, lang: Literal["zh", "en"], tool: str, result: ToolResult,
                    prompt: str = ANSWER_PROMPT, head: str | None = None) -> list[dict[str, str]]:
    """The rendered answer prompt (``chat_answer.v2``; v1: without the verifier's rules) for
    one tool result; with `head` (the answer's first sentence, already shown), the rationale
    prompt (``chat_rationale.v1``) that continues it."""
    language_name = "Chinese (简体中文)" if lang == "zh" else "English"
    if head:
        return render(load_prompt(RATIONALE_PROMPT), question=question, tool=tool, facts=result_facts(result),
                      head=head, language_name=language_name)
    return render(load_prompt(prompt), question=question, tool=tool, facts=result_facts(result),
                  language_name=language_name)
