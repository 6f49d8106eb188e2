"""Served latency of the two next-item LLM scorers, side by side in one run.

    python -m bench.scorer_latency [--dataset online-retail] [--user 17850 --user 12347 ...]

For each user, `ShopLensService.next_item` ranks 20 retrieved candidates with the verbalizer
(letter labels, forward + reversed) and then with the pointwise scorer (one yes/no call per
candidate over a shared history prefix), explanation off, through the same guarded model.
Prints per-user wall and model seconds, prompt tokens and calls, the medians, and writes
``runs/scorer_latency.json``. Run it alone on the machine (the model is the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.settings import load_settings

DEFAULT_USERS = ("17850", "12347", "13047")  # the demo's real Online Retail customers


async def run(dataset: str, users: list[str]) -> dict[str, list[dict[str, Any]]]:
    """{scorer: [per-user row]} for "verbalizer" then "pointwise"."""
    rt = Runtime(load_settings())
    svc = ShopLensService(rt)
    await rt.model()  # started before timing
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for scorer in ("verbalizer", "pointwise"):
            rows = []
            for u in users:
                cfg = replace(svc.next_item_config(k=5), explain=False, llm_scorer=scorer)  # type: ignore[arg-type]
                t0 = time.perf_counter()
                p = await svc.next_item(dataset, u, config=cfg)
                rows.append({"user": u, "wall_s": round(time.perf_counter() - t0, 2),
                             "model_s": round(p.meta.model_latency_s, 2), "prompt_tokens": p.meta.prompt_tokens,
                             "calls": p.meta.attempts, "degraded": p.meta.degraded,
                             "top": [i.item_id for i in p.items]})
            out[scorer] = rows
            print(f"{scorer}: median wall {statistics.median(r['wall_s'] for r in rows):.1f} s, "
                  f"median prompt tokens {statistics.median(r['prompt_tokens'] for r in rows):.0f}", flush=True)
    finally:
        await rt.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="online-retail")
    ap.add_argument("--user", action="append", help="a user id (repeat); default: 3 demo customers")
    a = ap.parse_args()
    out = asyncio.run(run(a.dataset, a.user or list(DEFAULT_USERS)))
    Path("runs").mkdir(exist_ok=True)
    Path("runs/scorer_latency.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
