"""The fast path end to end at catalogue scale: a synthetic shop of 10k / 100k items through the
real loader output, the SQLite store, the real index build and the served pipeline without the
model (`ShopLensService.next_item_progressive(..., use_model=False)`, what ``POST /v1/next-item``
answers first).

Why synthetic: the real datasets here stop at 16,859 items (Amazon Games). The shop is made so
that every source has signal: items belong to themes, each customer buys mostly within one or
two themes, so co-visitation, item similarity and similar customers all return candidates.

Why the ``hashing-384`` embedder: the served default (all-MiniLM-L6-v2, 384 dimensions) would
take minutes to embed 100k titles on 2 cores, and no text is embedded on the fast path: a request
reads the history's item vectors from the index and searches it. The index has the same
dimension and kind (flat up to `retrieval.index.AUTO_HNSW_ABOVE` rows, HNSW above) as with
MiniLM, so the search cost is the served one.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.ingest import ingest
from agent.ingest._common import LoadResult
from agent.ingest.report import LoadReport
from agent.settings import Settings
from bench.stats import load_average, summarize

ADJ = ["red", "blue", "vintage", "small", "large", "retro", "pink", "green", "gold", "silver", "white",
       "black", "floral", "striped", "spotty", "wooden", "glass", "ceramic", "paper", "metal"]
NOUN = ["mug", "lunch bag", "candle holder", "notebook", "cushion", "clock", "lantern", "tin", "jar",
        "bowl", "frame", "garland", "bottle", "tray", "basket", "doormat", "teapot", "plate", "bag", "card"]
THEME = ["christmas", "garden", "kitchen", "party", "baby", "bathroom", "office", "picnic", "wedding",
         "travel", "retrospot", "heart", "owl", "cake", "star", "polkadot", "regency", "woodland", "ocean",
         "alphabet"]
ITEMS_PER_THEME = 50


def synthetic_shop(n_items: int, n_users: int, *, seed: int = 0, mean_events: int = 20) -> LoadResult:
    """A shop of `n_items` titled items in themes of 50 and `n_users` customers, each buying
    (purchases, baskets of 1-4 items) mostly within one or two themes, over 2024.

    Returns:
        A `LoadResult` as a loader would return it (events sorted by user, then time).
    """
    rng = random.Random(seed)
    items = [CatalogItem(item_id=f"S{i:06d}",
                         title=f"{ADJ[i % 20]} {THEME[(i // 20) % 20]} {NOUN[(i // 400) % 20]} no. {i // 8000}",
                         category=THEME[(i // ITEMS_PER_THEME) % 20], price=round(1 + (i % 37) * 0.75, 2))
             for i in range(n_items)]
    n_themes = max(1, n_items // ITEMS_PER_THEME)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    events: list[BehaviorEvent] = []
    for u in range(n_users):
        themes = [rng.randrange(n_themes) for _ in range(2)]
        t = start + timedelta(days=rng.uniform(0, 300))
        n = max(2, int(rng.expovariate(1 / mean_events)))
        basket = 0
        while n > 0:
            basket += 1
            for _ in range(min(n, rng.randint(1, 4))):
                th = themes[0] if rng.random() < 0.7 else themes[1]
                # popular items within a theme: a skewed pick
                i = th * ITEMS_PER_THEME + min(ITEMS_PER_THEME - 1, int(rng.expovariate(1 / 8)))
                if rng.random() < 0.05:
                    i = rng.randrange(n_items)
                events.append(BehaviorEvent(user_id=f"U{u:06d}", item_id=items[min(i, n_items - 1)].item_id,
                                            event_type="purchase", timestamp=t, quantity=1,
                                            basket_id=f"B{u}-{basket}"))
                n -= 1
            t += timedelta(days=rng.uniform(1, 20))
    rep = LoadReport(dataset=f"synthetic-{n_items}", rows_read=len(events), events_kept=len(events),
                     items_kept=n_items)
    return LoadResult(events=events, items=items, report=rep)


async def _fast(service: ShopLensService, dataset: str, users: list[str], k: int) -> list[float]:
    out = []
    for u in users:
        t = time.perf_counter()
        await service.next_item_progressive(dataset, u, k=k, use_model=False)
        out.append(time.perf_counter() - t)
    return out


def fast_path_scale(sizes: list[int], *, users_per_item: float = 0.2, requests: int = 200, k: int = 5,
                    seed: int = 0) -> dict[str, Any]:
    """Build a synthetic shop per size in a temporary workspace and time the fast path.

    Args:
        sizes: catalogue sizes (items).
        users_per_item: customers per catalogue item (0.2: 20k customers at 100k items).
        requests: fast-path requests timed per size (distinct customers, seeded sample).

    Returns:
        Per size: items, customers, events, seconds to generate, store and index, and the fast
        path's latency summary (seconds: p50, p95, ...) with the index kinds used.
    """
    out: dict[str, Any] = {"load_before": load_average(), "sizes": {}}
    for n in sizes:
        rec: dict[str, Any] = {"items": n}
        t0 = time.perf_counter()
        shop = synthetic_shop(n, max(200, int(n * users_per_item)), seed=seed)
        rec["generate_s"] = time.perf_counter() - t0
        rec["customers"] = len({e.user_id for e in shop.events})
        rec["events"] = len(shop.events)
        with tempfile.TemporaryDirectory(prefix="shoplens-fastpath-") as tmp:
            rt = Runtime(Settings(workspace=Path(tmp), embedder="hashing-384"))
            name = f"synthetic-{n}"
            t0 = time.perf_counter()
            ingest(rt.store, name, shop, progress=False)
            rec["store_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            arts = rt.artifacts(name)
            rec["index_s"] = time.perf_counter() - t0
            rec["index_kinds"] = {"items": arts.item_index.manifest.kind, "users": arts.user_index.manifest.kind}
            svc = ShopLensService(rt, use_model=False)
            users = random.Random(seed).sample(sorted(arts.user_index.ids), min(requests, len(arts.user_index.ids)))

            async def run(svc: ShopLensService = svc, name: str = name, users: list[str] = users) -> list[float]:
                await _fast(svc, name, users[:5], k)  # warm the lazy paths
                return await _fast(svc, name, users, k)

            rec["fast"] = summarize(asyncio.run(run()))
            rec["load"] = load_average()
        out["sizes"][str(n)] = rec
    return out
