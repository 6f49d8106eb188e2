"""Review scoring throughput (issue 20): reviews per minute with and without aspects, beside the
physical limit computed from the model's own token rates measured in the same run.

Each mode scores the same fresh mix of Chinese and English reviews (the labelled zh and
amazon_cells sets, first `n` of each seed-2024 test sample, no stored scores) through
`SentimentAnalyzer.analyze_batch`, the code `shoplens sentiment --file` runs:

* ``polarity``: aspects off, one ``max_tokens=1`` verbalizer call per review;
* ``joint``: aspects on, the one-call path (``--one-call``: label, then ``term | label`` lines);
* ``two_calls``: aspects on, the served default: polarity pass + JSON aspects call (on a smaller
  sample: it is slow).

The limit of a mode is what its calls' tokens cost at the calibrated rates:
sum over calls of (prompt_tokens - cached_tokens) / pp_tok_s + completion_tokens / gen_tok_s
(the JSON rate for schema calls), turned into reviews per minute for one request at a time (the
embedded 2-core server runs one; a batching vLLM server at concurrency > 1 can go past it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.llm.base import ChatModel
from agent.tasks.sentiment import SentimentAnalyzer, SentimentConfig, SentimentResult
from bench.llm import TimedModel
from bench.stats import load_average


def review_mix(data_dir: Path, n: int, seed: int = 2024) -> list[str]:
    """`n` reviews, alternating Chinese (zh set) and English (amazon_cells), from the test
    samples the sentiment eval draws (`eval.sentiment_eval.load_set`)."""
    from eval.sentiment_eval import load_set

    zh = [c.text for c in load_set("zh", data_dir, n, seed)[1]]
    en = [c.text for c in load_set("amazon_cells", data_dir, n, seed)[1]]
    mixed = [t for pair in zip(zh, en, strict=False) for t in pair]
    return mixed[:n]


def token_limit_s(calls: list[Any], rates: dict[str, Any]) -> float:
    """Seconds the calls' tokens cost at the calibrated rates (pure; unit-tested).

    Args:
        calls: `bench.llm.CallRecord`s.
        rates: `bench.llm.calibrate_rates` output (``pp_tok_s``, ``gen_tok_s``, ``gen_json_tok_s``).
    """
    total = 0.0
    for c in calls:
        gen = rates["gen_json_tok_s"] if c.kind == "structured" else rates["gen_tok_s"]
        total += max(0, c.prompt_tokens - c.cached_tokens) / rates["pp_tok_s"]
        total += max(0, c.completion_tokens - 1) / gen  # the first token comes with the prompt pass
    return total


async def review_throughput(model: ChatModel, texts: list[str], rates: dict[str, Any], *,
                            concurrency: int = 1, two_calls_n: int = 10) -> dict[str, Any]:
    """Reviews per minute per mode (see the module docstring), measured and at the token limit.

    Returns:
        {"n", "concurrency", "load", "modes": {mode: {"n", "seconds", "reviews_per_min",
        "limit_reviews_per_min", "measured_vs_limit", "calls", "prompt_tokens", "cached_tokens",
        "completion_tokens", "with_aspects", "degraded"}}}.
    """
    out: dict[str, Any] = {"n": len(texts), "concurrency": concurrency, "load": load_average(), "modes": {}}
    plans = (("polarity", False, SentimentConfig(), texts), ("joint", True, SentimentConfig(joint=True), texts),
             ("two_calls", True, SentimentConfig(joint=False), texts[:two_calls_n]))
    for mode, aspects, cfg, sample in plans:
        if not sample:
            continue
        timed = TimedModel(model)
        an = SentimentAnalyzer(timed, config=cfg)  # type: ignore[arg-type]
        await an.analyze("warm-up: the prompt prefix into the server's cache", aspects=aspects)
        timed.calls.clear()
        t0 = time.perf_counter()
        results = await an.analyze_batch(sample, aspects=aspects, concurrency=concurrency)
        seconds = time.perf_counter() - t0
        limit = token_limit_s(timed.calls, rates)  # serial: a batching server (vLLM, concurrency > 1) can beat it
        ok = [r for r in results if isinstance(r, SentimentResult)]
        out["modes"][mode] = {
            "n": len(sample), "seconds": seconds, "reviews_per_min": 60 * len(sample) / seconds,
            "limit_reviews_per_min": 60 * len(sample) / limit if limit > 0 else None,
            "measured_vs_limit": limit / seconds if seconds > 0 else None,
            "calls": len(timed.calls), "prompt_tokens": sum(c.prompt_tokens for c in timed.calls),
            "cached_tokens": sum(c.cached_tokens for c in timed.calls),
            "completion_tokens": sum(c.completion_tokens for c in timed.calls),
            "with_aspects": sum(1 for r in ok if r.aspects), "degraded": sum(1 for r in ok if r.meta.degraded)}
    return out
