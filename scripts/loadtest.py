"""Drive a running ShopLens API on loopback for a fixed time at several concurrency levels.

    python scripts/loadtest.py --base-url http://127.0.0.1:8000 --key $KEY \\
        --dataset online-retail --users 17850,12347,13047 --duration 30 --concurrency 1,2,4,8

Or let it start the real app itself over a workspace (the model as configured by SHOPLENS_*,
started in the background; answers are degraded until it is ready):

    python scripts/loadtest.py --serve --workspace var --dataset online-retail --duration 30

Prints, per level: requests, throughput (req/s), p50/p95/p99 latency (s), HTTP errors,
transport errors and degraded answers. Loopback only: it refuses any other host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Level:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    degraded: int = 0
    wall_s: float = 0.0

    def row(self) -> dict[str, object]:
        lat = sorted(self.latencies)
        q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))  # noqa: E731
        n = sum(self.statuses.values())
        return {
            "concurrency": self.concurrency, "requests": n, "rps": round(n / self.wall_s, 2) if self.wall_s else 0,
            "p50_s": round(q(0.50), 3), "p95_s": round(q(0.95), 3), "p99_s": round(q(0.99), 3),
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "http_errors": sum(c for s, c in self.statuses.items() if s >= 400),
            "server_errors_5xx": sum(c for s, c in self.statuses.items() if s >= 500),
            "transport_errors": self.transport_errors, "degraded": self.degraded,
            "statuses": dict(self.statuses),
        }


async def _worker(client: httpx.AsyncClient, body_for: list[dict[str, object]], stop_at: float,
                  level: Level, offset: int) -> None:
    i = offset
    while time.monotonic() < stop_at:
        body = body_for[i % len(body_for)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/next-item", json=body)
        except httpx.HTTPError:
            level.transport_errors += 1
            continue
        level.latencies.append(time.perf_counter() - t0)
        level.statuses[r.status_code] += 1
        if r.status_code == 200 and r.json()["meta"].get("degraded"):
            level.degraded += 1


async def run_level(base_url: str, key: str, bodies: list[dict[str, object]], concurrency: int,
                    duration_s: float, timeout_s: float) -> Level:
    level = Level(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=timeout_s, limits=limits) as client:
        t0 = time.monotonic()
        stop_at = t0 + duration_s
        await asyncio.gather(*(_worker(client, bodies, stop_at, level, w) for w in range(concurrency)))
        level.wall_s = time.monotonic() - t0
    return level


def _loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    ok = host == "localhost"
    with contextlib.suppress(ValueError):
        ok = ok or ipaddress.ip_address(host).is_loopback
    if not ok:
        raise SystemExit(f"refusing to load-test {host!r}: loopback only (127.0.0.1, ::1, localhost)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running server (loopback)")
    ap.add_argument("--key", default=os.environ.get("SHOPLENS_LOADTEST_KEY", ""), help="API key")
    ap.add_argument("--serve", action="store_true", help="start the real app in-process instead")
    ap.add_argument("--workspace", type=Path, help="workspace for --serve (default: settings)")
    ap.add_argument("--dataset", default="online-retail")
    ap.add_argument("--users", default="17850,12347,13047", help="comma-separated stored user ids")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--no-llm", action="store_true", help="ask for retrieval-only answers")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--timeout", type=float, default=180.0, help="client timeout per request (s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    args = ap.parse_args(argv)

    bodies = [{"dataset": args.dataset, "user_id": u, "k": args.k, "use_llm": not args.no_llm}
              for u in args.users.split(",") if u]
    levels = [int(c) for c in args.concurrency.split(",")]
    with contextlib.ExitStack() as stack:
        base_url, key = args.base_url, args.key
        if args.serve:
            from agent.app.runtime import Runtime
            from agent.settings import load_settings
            from ui.api import ApiSettings, create_app
            from ui.api.config import hash_key
            from ui.api.testing import live_server

            key = key or "loadtest-key"
            api = ApiSettings(api_keys=f"sha256:{hash_key(key)}", rate_limit_rps=0)
            runtime = Runtime(load_settings(workspace=args.workspace))
            base_url = stack.enter_context(live_server(create_app(runtime, api)))
        if not base_url:
            raise SystemExit("give --base-url (and --key) or --serve")
        _loopback_only(base_url)
        print(f"# {base_url} dataset={args.dataset} users={len(bodies)} duration={args.duration:g}s "
              f"use_llm={not args.no_llm}", file=sys.stderr)
        header = f"{'conc':>4} {'reqs':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'err':>4} {'5xx':>4} {'degr':>5}"
        if not args.json:
            print(header)
        for c in levels:
            row = asyncio.run(run_level(base_url, key, bodies, c, args.duration, args.timeout)).row()
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{row['concurrency']:>4} {row['requests']:>5} {row['rps']:>7} {row['p50_s']:>7} "
                      f"{row['p95_s']:>7} {row['p99_s']:>7} {row['http_errors'] + row['transport_errors']:>4} "
                      f"{row['server_errors_5xx']:>4} {row['degraded']:>5}")


if __name__ == "__main__":
    main()
