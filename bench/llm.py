"""Model-side measurements that need only an OpenAI-compatible server: a call-timing proxy,
the server's prompt-processing and generation rates, prefix caching, and throughput under
concurrency.

Everything goes through the one model seam (`agent.llm.base.ChatModel`), so the same code runs
against the embedded llama-cpp-python server or a vLLM server given with ``--base-url``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.llm.base import ChatModel, Completion, Message
from bench.stats import load_average, ratio, summarize

COUNT_PROMPT = "Count from 1 to 1000, separated by single spaces. Do not stop early."
NUMBERS_SCHEMA: dict[str, Any] = {
    "title": "numbers",
    "type": "object",
    "properties": {"numbers": {"type": "array", "items": {"type": "integer"}}},
    "required": ["numbers"],
}
# Filler for prompt-processing runs: product titles like the real prompts carry.
FILLER = ("WHITE HANGING HEART T-LIGHT HOLDER, REGENCY CAKESTAND 3 TIER, JUMBO BAG RED RETROSPOT, "
          "PARTY BUNTING, LUNCH BAG RED RETROSPOT, ASSORTED COLOUR BIRD ORNAMENT, SET OF 3 CAKE "
          "TINS PANTRY DESIGN, PACK OF 72 RETROSPOT CAKE CASES, NATURAL SLATE HEART CHALKBOARD, ")


@dataclass
class CallRecord:
    """One model call as the client saw it: kind, perf_counter window (seconds), tokens."""

    kind: str  # "verbalizer" (label log-probs), "structured" (JSON schema) or "text"
    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int
    messages: list[Message] = field(repr=False, default_factory=list)
    cached_tokens: int = 0  # of prompt_tokens, reused from the server's prefix cache

    @property
    def seconds(self) -> float:
        return self.end - self.start


class TimedModel:
    """A `ChatModel` proxy that records every call's wall-clock window and token usage.

    Args:
        inner: the model that answers.
    """

    def __init__(self, inner: ChatModel):
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[CallRecord] = []

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        t0 = time.perf_counter()
        comp = await self.inner.complete(messages, schema=schema, max_tokens=max_tokens,
                                         temperature=temperature, top_logprobs=top_logprobs)
        kind = "verbalizer" if top_logprobs > 0 else "structured" if schema else "text"
        self.calls.append(CallRecord(kind, t0, time.perf_counter(), comp.usage.prompt_tokens,
                                     comp.usage.completion_tokens, messages, comp.usage.cached_tokens))
        return comp


def nonce_messages(messages: Sequence[Message]) -> list[Message]:
    """`messages` with a fresh random tag at the very start of the first message, so no server
    can reuse a cached prefix beyond the chat template's first few tokens."""
    first, *rest = messages
    tag = f"[request {uuid.uuid4().hex[:12]}] "
    return [{**first, "content": tag + first["content"]}, *rest]


def _user(text: str) -> list[Message]:
    return nonce_messages([{"role": "user", "content": text}])


async def _timed(model: ChatModel, messages: list[Message], **kw: Any) -> tuple[float, Completion]:
    t0 = time.perf_counter()
    comp = await model.complete(messages, **kw)
    return time.perf_counter() - t0, comp


async def calibrate_rates(model: ChatModel, *, prompt_repeats: int = 15, reps: int = 3,
                          gen_tokens: int = 64) -> dict[str, Any]:
    """The server's own speed, from direct calls with uncacheable prompts.

    * prompt processing: ``reps`` calls of a ~``100 * prompt_repeats``-token prompt with
      ``max_tokens=1``; rate = prompt tokens / latency (tokens/s, median over calls).
    * generation: a counting prompt answered with ``max_tokens=1`` and ``max_tokens=gen_tokens``;
      rate = extra tokens / extra seconds (tokens/s), plain text and JSON-schema-constrained.

    Returns:
        {"pp_tok_s", "gen_tok_s", "gen_json_tok_s", "samples": {...}, "load": ...}. The
        prompt samples have the same length, so their rates should agree: the report warns when
        the fastest is > 1.2x the slowest (the machine was busy).
    """
    out: dict[str, Any] = {"load": load_average(), "samples": {"pp": [], "gen": [], "gen_json": []}}
    text = "Summarise these products in one word: " + FILLER * prompt_repeats
    for _ in range(reps):
        s, comp = await _timed(model, _user(text), max_tokens=1)
        out["samples"]["pp"].append({"s": s, "prompt_tokens": comp.usage.prompt_tokens})
    pp = sorted(x["prompt_tokens"] / x["s"] for x in out["samples"]["pp"])
    out["pp_tok_s"] = pp[len(pp) // 2]
    for key, schema in (("gen", None), ("gen_json", NUMBERS_SCHEMA)):
        rates = []
        for _ in range(max(1, reps - 1)):
            s1, c1 = await _timed(model, _user(COUNT_PROMPT), max_tokens=1, schema=schema)
            sn, cn = await _timed(model, _user(COUNT_PROMPT), max_tokens=gen_tokens, schema=schema)
            extra = cn.usage.completion_tokens - c1.usage.completion_tokens
            pp_diff = (cn.usage.prompt_tokens - c1.usage.prompt_tokens) / out["pp_tok_s"]
            dt = sn - s1 - pp_diff
            if extra >= gen_tokens // 4 and dt > 0:  # else the answer stopped early: no rate
                rates.append(extra / dt)
            out["samples"][key].append({"s_1": s1, "s_n": sn, "tokens_n": cn.usage.completion_tokens})
        out[f"{key}_tok_s"] = sorted(rates)[len(rates) // 2] if rates else None
    if out["gen_json_tok_s"] is None:  # fall back to the plain rate for estimates
        out["gen_json_tok_s"], out["gen_json_fallback"] = out["gen_tok_s"], True
    return out


async def prefix_caching(model: ChatModel, prompts: Sequence[tuple[list[Message], list[Message]]],
                         ) -> dict[str, Any]:
    """Latency of one verbalizer call (``max_tokens=1``) with and without a cached prefix.

    For each user's (forward, reverse) verbalizer prompts, in this order:

    * ``cold``: the forward prompt behind a random tag, nothing reusable;
    * (untimed) the same system prompt with an unrelated user message, so only the shared
      system prompt is cached;
    * ``system_cached``: the forward prompt, whose system prompt is in the cache;
    * ``history_cached``: the reverse permutation right after, sharing system prompt + history
      (what ShopLens's second verbalizer pass gets).

    Returns:
        Per-condition latency summaries (seconds) and speed-ups vs ``cold``.
    """
    res: dict[str, Any] = {"load": load_average()}
    times: dict[str, list[float]] = {"cold": [], "system_cached": [], "history_cached": []}
    tokens: list[int] = []
    for fwd, rev in prompts:
        other = [fwd[0], {"role": "user", "content": "An unrelated customer."}]
        kw: dict[str, Any] = {"max_tokens": 1, "top_logprobs": 20}
        s, comp = await _timed(model, nonce_messages(fwd), **kw)
        times["cold"].append(s)
        tokens.append(comp.usage.prompt_tokens)
        await model.complete(other, **kw)
        times["system_cached"].append((await _timed(model, fwd, **kw))[0])
        times["history_cached"].append((await _timed(model, rev, **kw))[0])
    res["prompt_tokens_mean"] = sum(tokens) / max(len(tokens), 1)
    res["conditions"] = {k: summarize(v) for k, v in times.items()}
    cold = res["conditions"]["cold"]["p50"]
    res["speedup_vs_cold"] = {k: ratio(cold, v["p50"]) for k, v in res["conditions"].items()}
    return res


async def concurrency(model: ChatModel, levels: Sequence[int], *, requests_per_level: int = 2,
                      prompt_repeats: int = 2, max_tokens: int = 32) -> dict[str, Any]:
    """Throughput with ``c`` requests in flight, for each ``c`` in ``levels``.

    Each request is uncacheable (a random tag first), ``prompt_repeats`` lines of product titles
    (~100 tokens each) and ``max_tokens`` generated tokens; ``max(4, requests_per_level * c)`` requests run per level,
    at most ``c`` at a time.

    Returns:
        Per level: requests/s, generated tokens/s, latency summary (seconds), and throughput
        relative to concurrency 1 (or the first level).
    """
    res: dict[str, Any] = {"load": load_average(), "levels": {}}
    text = "Write a one-line product description for: " + FILLER * prompt_repeats
    for c in levels:
        res["levels"][str(c)] = await _level(model, c, max(4, requests_per_level * c), text,
                                             max_tokens)
    base = res["levels"][str(levels[0])]["req_s"]
    for v in res["levels"].values():
        v["throughput_vs_first"] = ratio(v["req_s"], base)
    return res


async def _level(model: ChatModel, c: int, n: int, text: str, max_tokens: int) -> dict[str, Any]:
    """Run n uncacheable requests, at most c in flight; throughput and latency."""
    sem = asyncio.Semaphore(c)

    async def one() -> tuple[float, int, int]:
        async with sem:
            s, comp = await _timed(model, _user(text), max_tokens=max_tokens)
            return s, comp.usage.prompt_tokens, comp.usage.completion_tokens

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    return {"requests": n, "wall_s": wall, "req_s": n / wall,
            "prompt_tokens_mean": sum(p for _, p, _ in done) / n,
            "gen_tok_s": sum(g for _, _, g in done) / wall,
            "latency": summarize([s for s, _, _ in done])}
