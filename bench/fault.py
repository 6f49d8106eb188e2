"""The fast path while the model is killed: a real `shoplens serve` (uvicorn, the embedded model
server it starts) under a steady load of progressive next-item requests and event writes, with
the model server SIGKILLed part-way; and how long until /readyz is ready again (the API restarts
its model server: `agent.app.model_holder.ModelHolder`).

What is measured, per phase (model up / after the kill): HTTP statuses (a 5xx is a failure),
fast-answer latency, the refinement states the answers report, and whether every event the API
accepted is in the store afterwards (read back through ``GET /v1/users/{id}/events``).

The server runs on a copy of the workspace's store and indexes (SQLite backup API), so the
events written here never reach the real workspace.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from agent.settings import Settings
from bench.server import kill_model_server, read_back, serve
from bench.stats import load_average, ratio, summarize

KEY = "bench-fault-key"


def _copy_workspace(src: Settings, dst: Path, dataset: str) -> None:
    """The store (a consistent SQLite backup) and the dataset's indexes into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src.db_path) as a, sqlite3.connect(dst / src.db_path.name) as b:
        a.backup(b)
    shutil.copytree(src.index_dir(dataset), dst / src.index_dir(dataset).relative_to(src.workspace))


async def _load(url: str, dataset: str, users: list[str], items: list[str], *, seconds: float,
                kill_at_s: float, serve_pid: int, workers: int, pause_s: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    t_start = time.perf_counter()
    kill: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    accepted: dict[str, set[str]] = {}
    n_events = 0

    async def killer(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(kill_at_s)
        await kill_model_server(client, serve_pid, kill, t_start=t_start, give_up_at_s=seconds + 120)

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        nonlocal n_events
        i = 0
        while (t := time.perf_counter() - t_start) < seconds:
            phase = "after_kill" if "at_s" in kill else "model_up"
            u = rng.choice(users)
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/next-item", json={"dataset": dataset, "user_id": u, "k": 5, "wait_s": 0})
                status, body = r.status_code, (r.json() if r.headers.get("content-type", "").startswith(
                    "application/json") else {})
            except httpx.HTTPError as e:
                status, body = 0, {"error": repr(e)}
            samples.append({"kind": "next_item", "phase": phase, "t": t, "status": status,
                            "s": time.perf_counter() - t0,
                            "refinement": (body.get("refinement") or {}).get("state")})
            if i % 3 == 0:
                n_events += 1
                eid = f"bench-fault-{seed}-{w}-{i}"
                ev = {"event_id": eid, "user_id": u, "item_id": rng.choice(items), "event_type": "view",
                      "timestamp": "2011-12-10T12:00:00Z"}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/events", json={"dataset": dataset, "events": [ev]})
                    status = r.status_code
                    if status == 200 and eid in r.json().get("event_ids", [eid]):
                        accepted.setdefault(u, set()).add(eid)
                except httpx.HTTPError:
                    status = 0
                samples.append({"kind": "events", "phase": phase, "t": t, "status": status,
                                "s": time.perf_counter() - t0})
            i += 1
            await asyncio.sleep(pause_s)

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        watcher = asyncio.create_task(killer(client))
        await asyncio.gather(*(worker(w, client) for w in range(workers)))
        await watcher
        # every accepted event must be stored: read each user's events back through the API
        missing = 0
        for u, ids in accepted.items():
            missing += len(ids - await read_back(client, dataset, u))
        ready = (await client.get("/readyz")).status_code
    out: dict[str, Any] = {"killed_at_s": kill.get("at_s"), "model_back_after_s": kill.get("ready_after_s"),
                           "killed_pids": kill.get("pids", []),
                           "events_posted": n_events, "events_accepted": sum(map(len, accepted.values())),
                           "events_missing": missing, "readyz_after": ready, "phases": {}}
    for phase in ("model_up", "after_kill"):
        ni = [s for s in samples if s["kind"] == "next_item" and s["phase"] == phase]
        ev = [s for s in samples if s["kind"] == "events" and s["phase"] == phase]
        ok = [s["s"] for s in ni if s["status"] == 200]
        out["phases"][phase] = {
            "requests": len(ni), "statuses": dict(Counter(str(s["status"]) for s in ni)),
            "http_5xx": sum(1 for s in ni + ev if s["status"] >= 500 or s["status"] == 0),
            "fast": summarize(ok) if ok else None,
            "refinement_states": dict(Counter(str(s["refinement"]) for s in ni)),
            "event_posts": len(ev), "event_statuses": dict(Counter(str(s["status"]) for s in ev)),
        }
    up, down = out["phases"]["model_up"]["fast"], out["phases"]["after_kill"]["fast"]
    out["p95_after_vs_before"] = ratio(down["p95"], up["p95"]) if up and down else None
    return out


def model_killed(settings: Settings, dataset: str = "online-retail", *, seconds: float = 60.0,
                 kill_at_s: float = 20.0, workers: int = 4, pause_s: float = 0.05, users: int = 300,
                 seed: int = 0, ready_timeout_s: float = 300.0) -> dict[str, Any]:
    """Serve a copy of `settings.workspace`'s `dataset` with the embedded model, load it for
    `seconds`, SIGKILL the model server at `kill_at_s`.

    Returns:
        Per phase (``model_up``, ``after_kill``): next-item requests, HTTP statuses, 5xx count,
        fast-answer latency summary (seconds), refinement states; events posted / accepted /
        missing afterwards; the p95 ratio after / before the kill; /readyz after the run.

    Raises:
        RuntimeError: the server did not become ready (its log tail is in the message).
    """
    store_users = _users_and_items(settings, dataset, users, seed)
    res: dict[str, Any] = {"load": load_average(), "dataset": dataset, "seconds": seconds,
                           "kill_at_s": kill_at_s, "workers": workers, "pause_s": pause_s}
    with tempfile.TemporaryDirectory(prefix="shoplens-fault-") as tmp:
        ws = Path(tmp) / "ws"
        _copy_workspace(settings, ws, dataset)
        env = {**os.environ, "SHOPLENS_API_KEYS": KEY, "SHOPLENS_RATE_LIMIT_RPS": "0",
               "SHOPLENS_MODELS_DIR": str(settings.models_dir), "SHOPLENS_DATA_DIR": str(settings.data_dir),
               "SHOPLENS_LLM_PROFILE": settings.llm_profile}
        t0 = time.perf_counter()
        with serve(ws, env, Path(tmp) / "serve.log", ready_timeout_s=ready_timeout_s) as srv:
            res["ready_s"] = time.perf_counter() - t0
            res.update(asyncio.run(_load(srv.url, dataset, *store_users, seconds=seconds, kill_at_s=kill_at_s,
                                         serve_pid=srv.proc.pid, workers=workers, pause_s=pause_s, seed=seed)))
    return res


def _users_and_items(settings: Settings, dataset: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` seeded customers with purchases and 200 catalogue items of `dataset`."""
    from agent.data.store import EventStore

    store = EventStore(settings.db_path)
    users = sorted(store.user_ids(dataset))
    items = sorted(store.items(dataset))[:200]
    rng = random.Random(seed)
    return rng.sample(users, min(n, len(users))), items
