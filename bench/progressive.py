"""Progressive next-item: time to each stage against the model's own time, and the fast path's
latency idle and while the model is busy.

Everything goes through `ShopLensService.next_item_progressive`, the method behind
`POST /v1/next-item` with `wait_s`:

* per customer: time to the fast answer (served pipeline without the model), to the
  LLM-refined ranking and to the explained answer; the physical limit of each model stage is
  its calls' tokens at the model's rates measured in the same run (`model_time_estimate`);
* the fast path (``use_llm=false``, nothing started in the background) over many customers,
  once with the model idle and once while one more refinement keeps the model busy on the same
  cores (the stage times above are taken without this probe).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.llm.base import ChatModel
from bench.llm import CallRecord, TimedModel
from bench.stats import load_average, model_time_estimate, ratio, summarize


def _estimate(calls: Sequence[CallRecord], rates: dict[str, Any]) -> float:
    """The calls' model time at the model's own rates (seconds): the prompt tokens the server
    had to evaluate (not those it reused from its prefix cache) plus the generated ones."""
    return sum(model_time_estimate(c.prompt_tokens - c.cached_tokens, c.completion_tokens, rates["pp_tok_s"],
                                   rates["gen_json_tok_s" if c.kind == "structured" else "gen_tok_s"])
               for c in calls)


async def _fast_samples(service: ShopLensService, dataset: str, users: Sequence[str], k: int,
                        stop: asyncio.Event | None = None, pause_s: float = 0.0) -> list[float]:
    """Fast-path latencies (seconds), one request per user in order (until `stop`, if given)."""
    out = []
    for u in users:
        if stop is not None and stop.is_set():
            break
        t = time.perf_counter()
        await service.next_item_progressive(dataset, u, k=k, use_model=False)
        out.append(time.perf_counter() - t)
        if pause_s:
            await asyncio.sleep(pause_s)
    return out


async def progressive(rt: Runtime, model: ChatModel, dataset: str, users: Sequence[str],
                      rates: dict[str, Any], *, k: int = 5, fast_users: int = 200, seed: int = 0,
                      ) -> dict[str, Any]:
    """Stage times per customer and fast-path latency idle / busy.

    Args:
        users: customers whose answers are refined by the model (one at a time).
        fast_users: customers sampled (seeded) from the dataset for the fast-path figures.

    Returns:
        ``records`` (per customer: seconds to fast, refined, explained; model estimates per
        stage), ``stages`` (summaries), ``fast_idle`` / ``fast_busy`` (latency summaries,
        seconds) and their ratio, the catalogue size and the load average.
    """
    res: dict[str, Any] = {"load": load_average(), "dataset": dataset, "users": list(users), "k": k}
    timed = TimedModel(model)

    async def provider() -> TimedModel:
        return timed

    service = ShopLensService(rt, model_provider=provider)
    arts = rt.artifacts(dataset)
    everyone = list(arts.user_index.ids)  # every customer with history in the index
    sample = random.Random(seed).sample(sorted(everyone), min(fast_users, len(everyone)))
    res["catalogue_items"] = len(arts.catalog)
    # the served model weight: at 0 (no fitted gain) the model only explains, so there is no
    # "refined" stage to time
    res["llm_weight"], res["llm_weight_note"] = arts.llm_weight, arts.llm_weight_note
    await _fast_samples(service, dataset, sample[:5], k)  # warm the lazy paths
    idle = await _fast_samples(service, dataset, sample, k)

    records = []
    for uid in users:
        timed.calls.clear()
        t0 = time.perf_counter()
        ans = await service.next_item_progressive(dataset, uid, k=k, wait_s=0)
        t_fast = time.perf_counter() - t0
        job = service.progressive.get(ans.recommendation_id)
        seen: dict[str, float] = {"fast": t_fast}
        async for stage, _ in job.follow():
            seen.setdefault(stage, time.perf_counter() - t0)
        calls = list(timed.calls)
        rank_calls = [c for c in calls if c.kind == "verbalizer"]
        expl_calls = [c for c in calls if c.kind == "structured"]
        records.append({
            "user": uid, "state": job.state, "error": job.error,
            "fast_s": t_fast, "refined_s": seen.get("refined"), "explained_s": seen.get("explained"),
            "rank_model_s": sum(c.seconds for c in rank_calls),
            "rank_estimate_s": _estimate(rank_calls, rates),
            "explain_model_s": sum(c.seconds for c in expl_calls),
            "explain_estimate_s": _estimate(expl_calls, rates),
            "prompt_tokens": sum(c.prompt_tokens for c in calls),
            "cached_tokens": sum(c.cached_tokens for c in calls),
            "completion_tokens": sum(c.completion_tokens for c in calls),
            "calls": len(calls),
        })

    # the fast path while the model refines one more answer (not timed above: the probe takes
    # CPU from the model on these cores)
    ans = await service.next_item_progressive(dataset, users[0], k=k, wait_s=0)
    job = service.progressive.get(ans.recommendation_id)
    stop = asyncio.Event()
    probe = asyncio.create_task(_fast_samples(service, dataset, sample * 10, k, stop=stop, pause_s=0.05))
    await job.wait(3600)
    stop.set()
    busy = await probe

    def stage(key: str) -> dict[str, float] | None:
        vals = [r[key] for r in records if r[key] is not None]
        return summarize(vals) if vals else None

    refined = [r for r in records if r["refined_s"] is not None]
    explained = [r for r in records if r["explained_s"] is not None]
    res.update({
        "records": records,
        "stages": {"fast": stage("fast_s"), "refined": stage("refined_s"), "explained": stage("explained_s")},
        # time to a stage over the physical limit (model time at its own rates, from the request)
        "refined_vs_limit": ratio(sum(r["refined_s"] for r in refined),
                                  sum(r["rank_estimate_s"] for r in refined)) if refined else None,
        "explained_vs_limit": ratio(sum(r["explained_s"] for r in explained),
                                    sum(r["rank_estimate_s"] + r["explain_estimate_s"] for r in explained))
        if explained else None,
        "fast_idle": summarize(idle),
        "fast_busy": summarize(busy) if busy else None,
        "busy_vs_idle_p95": ratio(summarize(busy)["p95"], summarize(idle)["p95"]) if busy else None,
    })
    return res
