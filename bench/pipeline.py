"""Pipeline measurements: end-to-end next-item latency with a per-stage breakdown, and the
verbalizer ranking against LLM generation of a ranked list (same model, same users).

Both call ShopLens's real code: `agent.app.service.ShopLensService.next_item` on Online Retail
customers, and the eval harness's `VerbalizerRanker` / `GenerateRanker` on LLMRank's
Games-200 cases (`eval.protocols`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.llm.base import ChatModel, Completion, Message
from agent.llm.fake import FakeModel
from agent.tasks.next_item import NextItemConfig
from bench.llm import CallRecord, TimedModel
from bench.stats import load_average, model_time_estimate, ratio, summarize

STAGES = ("history+retrieval", "verbalizer calls", "fusion", "explanation call", "validation+output")


def stage_breakdown(t0: float, t1: float, calls: Sequence[CallRecord]) -> dict[str, float]:
    """Split one request's wall-clock window [t0, t1] (perf_counter seconds) into stages.

    Time before the first model call is history + retrieval; model calls count by kind;
    gaps between calls are fusion (and repair bookkeeping); time after the last call is
    validation and building the answer. With no calls, everything is history + retrieval.
    """
    out = dict.fromkeys(STAGES, 0.0)
    if not calls:
        out["history+retrieval"] = t1 - t0
        return out
    out["history+retrieval"] = calls[0].start - t0
    for prev, cur in zip(calls, calls[1:], strict=False):
        out["fusion"] += cur.start - prev.end
    for c in calls:
        out["verbalizer calls" if c.kind == "verbalizer" else "explanation call"] += c.seconds
    out["validation+output"] = t1 - calls[-1].end
    return out


async def end_to_end(rt: Runtime, model: ChatModel, dataset: str, users: Sequence[str],
                     rates: dict[str, Any], *, k: int = 5) -> dict[str, Any]:
    """Next-item latency per customer through the real service, against the model's own time.

    Model time is measured twice: the client-side wall time of the model calls, and issue #7's
    estimate from the server's rates (prompt tokens / pp rate + completion tokens / gen rate,
    the schema-constrained rate for the explanation call). Overhead = total - model time.

    Returns:
        Per-user records, latency summaries (seconds), stage means and overhead ratios.
    """
    res: dict[str, Any] = {"load": load_average(), "dataset": dataset, "users": list(users)}
    timed = TimedModel(model)

    async def provider() -> TimedModel:
        return timed

    service = ShopLensService(rt, model_provider=provider)
    arts = rt.artifacts(dataset)
    await prompt_pairs(rt, dataset, users[:1])  # warm every lazy path except the model
    records = []
    for uid in users:
        timed.calls.clear()
        t0 = time.perf_counter()
        pred = await service.next_item(dataset, uid, config=NextItemConfig(k=k))
        t1 = time.perf_counter()
        calls = list(timed.calls)
        est = sum(model_time_estimate(c.prompt_tokens, c.completion_tokens, rates["pp_tok_s"],
                                      rates["gen_json_tok_s" if c.kind == "structured" else "gen_tok_s"])
                  for c in calls)
        records.append({
            "user": uid, "total_s": t1 - t0, "model_calls_s": sum(c.seconds for c in calls),
            "model_estimate_s": est, "calls": len(calls),
            "prompt_tokens": sum(c.prompt_tokens for c in calls),
            "completion_tokens": sum(c.completion_tokens for c in calls),
            "stages_s": stage_breakdown(t0, t1, calls),
            "per_call": [{"kind": c.kind, "s": c.seconds, "prompt_tokens": c.prompt_tokens,
                          "completion_tokens": c.completion_tokens} for c in calls],
            "degraded": pred.meta.degraded, "degraded_reason": pred.meta.degraded_reason,
        })
    # retrieval alone (candidate generation for the same users), repeated for stable figures
    hist = {u: [e.item_id for e in rt.store.user_events(dataset, u)] for u in users}
    gen = arts.generator(None)
    ret = []
    for _ in range(20):
        for u in users:
            t = time.perf_counter()
            gen.generate(hist[u], n=20, user_id=u, exclude=set(hist[u]))  # all purchases here
            ret.append(time.perf_counter() - t)
    totals = [r["total_s"] for r in records]
    model_s = [r["model_calls_s"] for r in records]
    est_s = [r["model_estimate_s"] for r in records]
    res.update({
        "records": records,
        "total": summarize(totals),
        "model_calls": summarize(model_s),
        "model_estimate": summarize(est_s),
        "retrieval_only": summarize(ret),
        "stages_mean_s": {s: sum(r["stages_s"][s] for r in records) / len(records) for s in STAGES},
        # shares of the summed totals, so one slow customer weighs as much as its time
        "overhead_vs_calls": 1 - sum(model_s) / sum(totals),
        "overhead_vs_estimate": 1 - sum(est_s) / sum(totals),
        "total_vs_estimate": ratio(sum(totals), sum(est_s)),
    })
    return res


async def prompt_pairs(rt: Runtime, dataset: str, users: Sequence[str],
                       ) -> list[tuple[list[Message], list[Message]]]:
    """The real (forward, reverse) verbalizer prompts ShopLens sends for each user, captured
    with a fake model (instant, no server): explanation off, two permutations."""

    def respond(_call: Any) -> Completion:
        return Completion(text="A", top_logprobs=[{"A": 0.0}])

    fake = FakeModel(responder=respond)

    async def provider() -> FakeModel:
        return fake

    service = ShopLensService(rt, model_provider=provider)
    pairs = []
    for u in users:
        fake.calls.clear()
        await service.next_item(dataset, u, config=NextItemConfig(explain=False, permutations=2))
        if len(fake.calls) >= 2:
            pairs.append((fake.calls[0].messages, fake.calls[1].messages))
    return pairs


async def ranking_vs_generation(model: ChatModel, data_dir: Path, n_users: int, *,
                                permutations: int = 1, seed: int = 2023) -> dict[str, Any]:
    """Verbalizer ranking vs the model writing the ranked list, on the first ``n_users`` of
    LLMRank's Games-200 (20 random candidates, shuffled by the published protocol).

    Both rankers come from the eval harness (`eval.llm_rankers`), with the live model (no
    response cache). NDCG@10 is x100 as in eval reports.

    Returns:
        Per-ranker time summaries (seconds per user), NDCG@10, valid-answer rate, and the
        generation/verbalizer time ratio and verbalizer/generation NDCG ratio.
    """
    from agent.llm.prompting import load_prompt
    from eval.llm_rankers import GenerateRanker, VerbalizerRanker
    from eval.metrics import ndcg_at_k
    from eval.protocols import (
        llmrank_cases,
        load_llmrank_candidates,
        load_llmrank_interactions,
        load_llmrank_titles,
    )

    res: dict[str, Any] = {"load": load_average()}
    root = Path(data_dir) / "amazon-games"
    cand = load_llmrank_candidates(root / "Games-200" / "Games.random")
    users = list(cand)[:n_users]
    cases = llmrank_cases(load_llmrank_interactions(root), cand, users, seed=seed)
    titles = load_llmrank_titles(root)
    rankers = {
        "verbalizer": VerbalizerRanker(model, load_prompt("next_item_rank_titles.v1"), titles,
                                       permutations=permutations, seed=seed),
        "generation": GenerateRanker(model, load_prompt("next_item_generate.v1"), titles, seed=seed),
    }
    per: dict[str, dict[str, list[Any]]] = {n: {"s": [], "ndcg": [], "valid": [], "tokens": []}
                                           for n in rankers}
    for case in cases:
        for name, r in rankers.items():  # same user back to back: same machine state
            t0 = time.perf_counter()
            out = await r.arank(case)
            per[name]["s"].append(time.perf_counter() - t0)
            per[name]["ndcg"].append(100 * ndcg_at_k([c for c, _ in out.ranking], {case.target}, 10))
            per[name]["valid"].append(out.valid)
            per[name]["tokens"].append([out.prompt_tokens, out.completion_tokens])
    for name, v in per.items():
        res[name] = {"time": summarize(v["s"]), "ndcg@10": sum(v["ndcg"]) / len(v["ndcg"]),
                     "valid_rate": sum(v["valid"]) / len(v["valid"]), "per_user": v}
    res["users"] = users
    res["permutations"] = permutations
    res["time_ratio_gen_over_verb"] = ratio(res["generation"]["time"]["mean"],
                                            res["verbalizer"]["time"]["mean"])
    res["ndcg_ratio_verb_over_gen"] = ratio(res["verbalizer"]["ndcg@10"], res["generation"]["ndcg@10"])
    return res
