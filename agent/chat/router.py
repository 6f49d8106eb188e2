"""The merchandiser chat's agent: question -> tool call -> typed result -> streamed answer.

A deterministic pre-parser pulls ids, a month and the language out of the question; one
schema-constrained call (`structured_call`, prompt ``chat_route.v1``) returns a pydantic
`ToolCall` whose tool name is an enum and whose ids are enums of the pre-parsed ids; the tool
runs; a second call (``chat_answer.v2``) streams the answer in the question's language. With no
model the keyword router (`rule_route`) picks the tool and a template writes the answer.

The answer streams through the same guarded model (`ChatModel.stream`) every other surface
uses, so chat calls share the API's deadline, retry, priority lanes and metrics.

There is no LangChain tool-calling loop: with a 1.5B model a native tool-calling loop picks
tools less reliably than one schema-constrained routing call whose tool name and ids are enums,
and the embedded llama-cpp-python server does not call tools in its default chat format.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, model_validator

from agent.chat.checked import LABEL, Outcome, chat_facts, checked_answer
from agent.chat.preparse import Language, ParsedQuestion, detect_language, preparse
from agent.chat.results import (
    ANSWER_PROMPT,
    TOOL_ALIASES,
    NextItems,
    TaskResult,
    Timeline,
    ToolName,
    ToolResult,
    answer_messages,
    fallback_answer,
    ranking_head,
)
from agent.chat.tools import TOOLS, ToolContext, run_tool
from agent.domain.errors import RequestError
from agent.domain.predictions.common import Verification
from agent.llm.base import ChatModel, ModelUnavailableError, OutputValidationError
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call

__all__ = ["ChatAgent", "ChatEvent", "Conversation", "Language", "ParsedQuestion", "Route", "ToolCall",
           "detect_language", "model_route", "preparse", "route_schema", "rule_route"]
ROUTE_PROMPT = "chat_route.v1"
T = TypeVar("T")

# ---- the tool call -----------------------------------------------------------------------


class ToolCall(BaseModel):
    """One tool with its arguments, validated against the tool's own args model."""

    tool: ToolName
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_args(self) -> ToolCall:
        self.args = TOOLS[self.tool].args.model_validate(self.args).model_dump(exclude_none=True)
        return self

    def typed_args(self) -> BaseModel:
        return TOOLS[self.tool].args.model_validate(self.args)


class RouteDecision(BaseModel):
    """The model's routing answer (flat, so a 1.5B model fills it reliably)."""

    tool: ToolName | Literal["sentiment"]  # an alias the v1 prompt's guide still names
    customer_id: str | None = None
    item_id: str | None = None
    query: str | None = Field(default=None, max_length=120)


def route_schema(parsed: ParsedQuestion) -> dict[str, Any]:
    """JSON schema for the routing call: ids restricted to the pre-parsed ones."""

    def ids(values: list[str]) -> dict[str, Any]:
        return {"enum": [*values, None]} if values else {"type": "null"}

    return {
        "title": "RouteDecision", "type": "object",
        "properties": {
            "tool": {"type": "string", "enum": [*TOOLS, *TOOL_ALIASES]},
            "customer_id": ids(parsed.customer_ids),
            "item_id": ids(parsed.item_ids),
            "query": {"anyOf": [{"type": "string", "maxLength": 120}, {"type": "null"}]},
        },
        "required": ["tool", "customer_id", "item_id", "query"],
        "additionalProperties": False,
    }


def to_call(tool: str, parsed: ParsedQuestion, customer_id: str | None = None,
            item_id: str | None = None, query: str | None = None) -> ToolCall:
    """Assemble typed args: ids from the pre-parser win, the model only fills what code cannot.

    An alias (`TOOL_ALIASES`) becomes its tool; `churn` without a customer is the cohort
    question ("which customers who bought in October ...") and becomes `churn_segment`.
    """
    tool = TOOL_ALIASES.get(tool, tool)
    customer_id = customer_id or (parsed.customer_ids[0] if parsed.customer_ids else None)
    if tool == "churn" and not customer_id and not about_one_customer(parsed.question):
        tool = "churn_segment"  # "his churn risk" with no customer known stays churn: which customer?
    needs = TOOLS[tool].needs
    args: dict[str, Any] = {}
    if tool == "churn_segment":
        args["month"], args["days"] = parsed.month, parsed.days
    if needs == "customer":
        args["customer_id"] = customer_id
        if tool == "intent":
            args["item_id"] = item_id or (parsed.item_ids[0] if parsed.item_ids else None)
            args["item_query"] = None if args["item_id"] else parsed.title
    elif needs == "item":
        args["item_id"] = item_id or (parsed.item_ids[0] if parsed.item_ids else None)
        if not args["item_id"]:
            args["item_query"] = parsed.title or query
    elif needs == "query":
        args["query"] = (query or parsed.title or parsed.question)[:120]
    return ToolCall(tool=tool, args=args)  # type: ignore[arg-type]


_RULES: list[tuple[ToolName, re.Pattern[str]]] = [
    ("churn", re.compile(r"churn|at[- ]risk|stop(ped)? buying|lapse|leav|流失|不再|风险", re.I)),
    ("item_sentiment", re.compile(r"review|feel|complain|rating|opinion|sentiment|评价|口碑|抱怨|差评|好评|感觉|评论", re.I)),
    ("audience", re.compile(r"target|audience|market to|promot|segment|who (would|might|will) (like|want|buy)|customers would|interested in|目标|推广|促销|人群|受众|卖给谁", re.I)),
    ("profile", re.compile(r"style|profile|describe|what kind of|preferen|persona|画像|风格|偏好|描述|什么样", re.I)),
    ("intent", re.compile(r"intent|right now|currently|shopping for|looking for|意图|正在|目前想", re.I)),
    ("next_item", re.compile(r"next|recommend|suggest|will .* buy|likely to buy|推荐|接下来|下一|可能买|会买", re.I)),
    ("user_timeline", re.compile(r"history|timeline|past|orders?|bought|purchased|when did|记录|历史|买过|订单|时间线", re.I)),
    ("item_search", re.compile(r"find|search|look up|do we (sell|have)|products? (like|with)|查找|搜索|找|有没有|有哪些", re.I)),
]


def rule_route(parsed: ParsedQuestion) -> ToolCall:
    """Keyword routing without a model: the fallback when the model is down, and a baseline."""
    q = parsed.question
    for tool, pat in _RULES:
        if pat.search(q):
            if tool == "item_search" and parsed.item_ids and not parsed.title:
                return to_call("item_lookup", parsed)
            return to_call(tool, parsed)
    if parsed.item_ids:
        return to_call("item_lookup", parsed)
    if parsed.customer_ids:
        return to_call("user_timeline", parsed)
    return to_call("item_search", parsed)


def keyword_route(parsed: ParsedQuestion) -> ToolCall | None:
    """The keyword route when it is unambiguous, else None (then the model routes): exactly one
    tool's keywords match and the question names the id that tool needs. On the 48 routing
    questions (`eval/routing_questions.jsonl`) it decides 36 and all 36 are right
    (`tests/test_chat.py`); the routing call it saves takes ~20 s on 2 CPU cores."""
    if sum(bool(pat.search(parsed.question)) for _, pat in _RULES) != 1:
        return None
    call = rule_route(parsed)
    needs = TOOLS[call.tool].needs
    if (needs == "customer" and not call.args.get("customer_id")) or (needs == "item" and not call.args.get("item_id")):
        return None
    return call


@dataclass
class Route:
    call: ToolCall
    parsed: ParsedQuestion
    # model: the routing call; rules: keywords because the model is down or failed; keywords:
    # an unambiguous keyword match (`keyword_route`), no call needed; context: a follow-up
    source: Literal["model", "rules", "keywords", "context"]
    note: str | None = None
    trace: CallTrace = field(default_factory=CallTrace)


# A question about several customers ("which customers ...", "哪些客户") never inherits one customer
# ("Which items will he buy next?" does), unless it points at one ("who is he?", "他是谁？").
_COHORT = re.compile(r"\b(?:customers|clients|buyers|shoppers|users)\b|\bwho\b|\bsegment\b|哪些|哪几|哪位|谁|客户们", re.I)
_SINGLE = re.compile(r"\b(?:he|him|his|she|her|hers|this customer|that customer|the same customer)\b"
                     r"|他|她|这位|该客户|这个客户|此客户", re.I)


_IT = re.compile(r"\b(?:it|its|this (?:item|product|one)|that (?:item|product|one)|the same (?:item|product))\b"
                 r"|它|这个商品|该商品|这款|这件|此商品", re.I)


def about_one_customer(question: str) -> bool:
    """Whether the question points at one customer it does not name ("his churn risk", "他呢")."""
    return bool(_SINGLE.search(question))


@dataclass
class Conversation:
    """What the earlier turns of one chat settled, for follow-up questions: the dataset, the
    customer, the product and the tool of the last turn that named them ("And his churn risk?",
    "What about customer 12347?", "那12347呢？"). One per chat session (the UI keeps it in its
    session state); a turn on another dataset starts it afresh."""

    customer_id: str | None = None
    item_id: str | None = None
    tool: ToolName | None = None
    dataset: str | None = None

    def for_dataset(self, dataset: str) -> Conversation:
        """This conversation, emptied first if it was about another dataset."""
        if self.dataset != dataset:
            self.customer_id = self.item_id = self.tool = None
            self.dataset = dataset
        return self

    def fill(self, parsed: ParsedQuestion) -> dict[str, str]:
        """Give `parsed` the conversation's customer and product where the question names none
        (a question about several customers keeps no customer); returns what was carried over
        ({"customer_id": ..., "item_id": ...}) for the route's note."""
        carried = {}
        q = parsed.question
        one = about_one_customer(q)
        names_item, names_customer = bool(parsed.item_ids or parsed.title), bool(parsed.customer_ids)
        # the customer: where the question names none and points at one or names nothing else
        if not names_customer and self.customer_id and (one or not (names_item or _COHORT.search(q))):
            parsed.customer_ids = [self.customer_id]
            carried["customer_id"] = self.customer_id
        # the product: where the question names none and says "it" or names nothing else
        if not names_item and self.item_id and (_IT.search(q) or not names_customer):
            parsed.item_ids = [self.item_id]
            carried["item_id"] = self.item_id
        return carried

    def follow_up_tool(self, parsed: ParsedQuestion) -> ToolName | None:
        """The previous turn's tool when the question names no task of its own ("What about
        customer 12347?", "Why?", "那12347呢？"): no keyword of the rule router matches, and the
        question names nothing that tool does not take (an item for a customer tool, a customer
        for an item tool, a month or a window of days)."""
        if self.tool is None or any(pat.search(parsed.question) for _, pat in _RULES):
            return None
        if parsed.month or parsed.days:
            return None
        needs = TOOLS[self.tool].needs
        intent_pair = self.tool == "intent" and bool(parsed.customer_ids)  # intent takes both
        if (parsed.item_ids or parsed.title) and needs != "item" and not intent_pair:
            return None
        if parsed.customer_ids and needs in ("item", "query"):
            return None
        if self.tool == "churn_segment" and parsed.customer_ids:  # "what about customer 12347?"
            return "churn"
        return self.tool

    def remember(self, call: ToolCall, result: ToolResult) -> None:
        """After a turn: keep its tool and the customer and product it was about (resolved ids
        from the result where the call gave a title)."""
        if result.kind in {"not_found", "need_info", "unavailable"}:
            return
        self.tool = call.tool
        data = result.data if isinstance(result, TaskResult) else {}
        customer = call.args.get("customer_id") or data.get("user_id")
        item = (call.args.get("item_id") or data.get("item_id") or getattr(result, "item_id", None)
                or getattr(getattr(result, "item", None), "item_id", None))
        if customer:
            self.customer_id = str(customer)
        if item:
            self.item_id = str(item)


def _carried_note(call: ToolCall, carried: dict[str, str]) -> str | None:
    """What the conversation gave this call, only where the call uses it."""
    used = [f"{'customer' if k == 'customer_id' else 'item'} {v}" for k, v in carried.items()
            if call.args.get(k) == v]
    return f"{' and '.join(used)} from earlier in the conversation" if used else None


async def model_route(model: ChatModel, parsed: ParsedQuestion, *, max_attempts: int = 2) -> Route:
    """The schema-constrained routing call.

    Raises:
        ModelUnavailableError / OutputValidationError: from `structured_call`.
    """
    tpl = load_prompt(ROUTE_PROMPT)
    tools = [{"name": n, "description": t.description} for n, t in TOOLS.items()]
    messages = render(tpl, tools=tools, question=parsed.question,
                      customer_ids=parsed.customer_ids, item_ids=parsed.item_ids)
    trace = CallTrace()
    d = await structured_call(model, messages, RouteDecision, json_schema=route_schema(parsed),
                              max_attempts=max_attempts, max_tokens=96, trace=trace)
    return Route(to_call(d.tool, parsed, d.customer_id, d.item_id, d.query), parsed, "model", trace=trace)


# ---- the conversation turn ---------------------------------------------------------------


@dataclass
class ChatEvent:
    """One update of a turn, in order: status*, route, evidence*, token*, done."""

    kind: Literal["status", "route", "evidence", "token", "done"]
    text: str = ""
    # token: who wrote it: the model, the template's facts (a next-item answer's ranking, by
    # design), or the labelled template (a fallback); None for other kinds
    source: Literal["model", "facts", "template"] | None = None
    route: Route | None = None
    result: ToolResult | None = None
    answer_source: Literal["model", "template"] | None = None
    verification: Verification | None = None  # done: what the verifier did to the model's sentences


async def _heartbeat(aw: Awaitable[T], label: str, every_s: float) -> AsyncIterator[ChatEvent | T]:
    """Await `aw`, yielding a status event every `every_s` seconds until it finishes.

    If the consumer stops (the UI's Stop button closes the generator), the pending task, and
    with it the HTTP request to the model server, is cancelled.
    """
    task = asyncio.ensure_future(aw)
    t0 = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if done:
                yield task.result()
                return
            yield ChatEvent("status", f"{label}: the model is slow, still working ({time.monotonic() - t0:.0f} s)")
    finally:
        if not task.done():
            task.cancel()


async def _stream_heartbeat(chunks: AsyncIterator[str], label: str, every_s: float
                            ) -> AsyncIterator[str | ChatEvent]:
    """Relay `chunks`, yielding a status event whenever none arrives for `every_s` seconds
    (the first token can take minutes on a busy CPU). Closing this generator cancels the
    pending read and closes `chunks` (and so the HTTP stream)."""
    t0 = time.monotonic()
    it = aiter(chunks)
    try:
        while True:
            nxt = asyncio.ensure_future(anext(it))
            try:
                while not (await asyncio.wait({nxt}, timeout=every_s))[0]:
                    yield ChatEvent("status", f"{label}: the model is slow, still working "
                                              f"({time.monotonic() - t0:.0f} s)")
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            finally:
                if not nxt.done():
                    nxt.cancel()
            yield chunk
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


class ChatAgent:
    """Runs one merchandiser question end to end, as a stream of `ChatEvent`s.

    Args:
        ctx: the tool context (runtime, service, dataset, next-item config).
        use_model: False routes by keyword rules and answers from templates.
        heartbeat_s: how often a slow model call reports that it is still working.
        answer_prompt: the answer prompt's name (default ``chat_answer.v2``).
        facts_first: a next-item answer opens with the ranking from the template
            (`ranking_head`) and the model writes only why (``chat_rationale.v1``); False: the
            model writes the whole answer (``answer_prompt``).
        fast_routing: an unambiguous keyword match (`keyword_route`) routes without the model's
            routing call (the answer is still the model's); False: the model routes every turn.
    """

    def __init__(self, ctx: ToolContext, *, use_model: bool = True, heartbeat_s: float = 8.0,
                 answer_prompt: str = ANSWER_PROMPT, facts_first: bool = True, fast_routing: bool = True):
        self.ctx = ctx
        self.use_model = use_model
        self.heartbeat_s = heartbeat_s
        self.answer_prompt = answer_prompt  # a prompts/ name; the eval compares versions
        self.facts_first = facts_first  # next-item answers open with the template's ranking
        self.fast_routing = fast_routing  # an unambiguous keyword match routes without the model

    async def _model(self) -> tuple[ChatModel | None, str | None]:
        if not self.use_model:
            return None, "model disabled"
        return await self.ctx.service.model_or_none()

    async def route(self, question: str, conversation: Conversation | None = None) -> Route:
        """Pre-parse (with what the conversation settled), then the model's routing call;
        keyword rules if the model fails. A follow-up that names no task of its own reuses the
        previous turn's tool without a model call (source "context")."""
        store, ds = self.ctx.runtime.store, self.ctx.dataset
        catalog = self.ctx.runtime.artifacts(ds).catalog
        try:  # "this month" is the dataset's last month
            end: datetime | None = await asyncio.to_thread(self.ctx.service.state.dataset_end, ds)
        except RequestError:  # no events yet: no relative month
            end = None
        parsed = preparse(question, today=end, has_user=lambda u: store.has_user(ds, u),
                          has_item=lambda i: i in catalog)
        conv = (conversation or Conversation()).for_dataset(ds)
        same_tool = conv.follow_up_tool(parsed)
        carried = conv.fill(parsed)

        def noted(route: Route, first: str | None) -> Route:
            route.note = "; ".join(x for x in (first, _carried_note(route.call, carried)) if x) or None
            return route

        if same_tool is not None:
            return noted(Route(to_call(same_tool, parsed), parsed, "context"), f"a follow-up: {same_tool} again")
        if self.fast_routing and (call := keyword_route(parsed)) is not None:
            return noted(Route(call, parsed, "keywords"), None)
        model, why = await self._model()
        if model is None:
            return noted(Route(rule_route(parsed), parsed, "rules"), f"model unavailable ({why})")
        try:
            return noted(await model_route(model, parsed), None)
        except (ModelUnavailableError, OutputValidationError) as e:
            return noted(Route(rule_route(parsed), parsed, "rules"), f"routing model failed ({e})")

    async def ask(self, question: str, conversation: Conversation | None = None) -> AsyncIterator[ChatEvent]:
        """One turn. Always yields at least one event; never raises for model failures.

        `conversation` (kept by the caller across turns) gives a follow-up the earlier turns'
        customer, product and tool, and is updated with this turn's.
        """
        question = question.strip()
        lang = detect_language(question)
        yield ChatEvent("status", "正在理解问题…" if lang == "zh" else "Reading the question…")
        route: Route | None = None
        async for step in _heartbeat(self.route(question, conversation), "routing", self.heartbeat_s):
            if isinstance(step, Route):
                route = step
            else:
                yield step
        assert route is not None
        yield ChatEvent("route", route.note or "", route=route)
        args = route.call.typed_args()
        if TOOLS[route.call.tool].needs == "customer" and route.call.tool != "user_timeline" \
                and getattr(args, "customer_id", None):
            tl = await run_tool(self.ctx, "user_timeline", args)
            if isinstance(tl, Timeline):
                yield ChatEvent("evidence", result=tl)
        result: ToolResult | None = None
        async for out in _heartbeat(run_tool(self.ctx, route.call.tool, args), route.call.tool,
                                    self.heartbeat_s):
            if isinstance(out, ChatEvent):
                yield out
            else:
                result = out
        assert result is not None
        if conversation is not None:
            conversation.remember(route.call, result)
        yield ChatEvent("evidence", result=result)
        async for ev in self._answer(question, lang, route, result):
            yield ev

    async def _answer(self, question: str, lang: Language, route: Route, result: ToolResult
                      ) -> AsyncIterator[ChatEvent]:
        reply_lang: Literal["en", "zh"] = "zh" if lang == "zh" else "en"
        template = fallback_answer(result, lang)
        if result.kind in {"not_found", "need_info", "unavailable"}:  # a message, not an answer
            yield ChatEvent("token", template)
            yield ChatEvent("done", route.note or "", answer_source="template")
            return
        labelled = LABEL[reply_lang] + template  # an answer the model did not write says so
        model, why = (None, route.note) if route.source == "rules" else await self._model()
        if model is None:
            yield ChatEvent("token", labelled)
            yield ChatEvent("done", why or "", answer_source="template")
            return
        # a next-item answer: the ranking is stated by the template, the model says why
        head = ranking_head(result, reply_lang) if isinstance(result, NextItems) and self.facts_first else ""
        if head:
            yield ChatEvent("token", head + " ", source="facts")
        messages = answer_messages(question, lang, route.call.tool, result, self.answer_prompt, head=head or None)
        catalogue = self.ctx.runtime.artifacts(self.ctx.dataset).title_index
        out = Outcome()
        chunks = checked_answer(model, messages, chat_facts(result, question, catalogue), catalogue, template,
                                reply_lang, out, after=head)
        got = False
        try:
            async for chunk in _stream_heartbeat(chunks, "answer", self.heartbeat_s):
                if isinstance(chunk, ChatEvent):
                    yield chunk
                    continue
                got = got or bool(chunk.strip())
                yield ChatEvent("token", chunk, source="template" if chunk.lstrip().startswith(LABEL[reply_lang])
                                else "model")
        except ModelUnavailableError as e:
            yield ChatEvent("token", ("\n\n" if got or head else "") + labelled, source="template")
            yield ChatEvent("done", f"model failed while answering ({e})", answer_source="template",
                            verification=out.verification() if out.checked else None)
            return
        if not got:
            yield ChatEvent("token", ("\n\n" if head else "") + labelled, source="template")
            yield ChatEvent("done", "model gave an empty answer", answer_source="template")
            return
        note = (f"{out.replaced} sentence(s) failed the verifier after a repair: the template answer follows"
                if out.replaced else "")
        yield ChatEvent("done", note, answer_source=out.source, verification=out.verification())
